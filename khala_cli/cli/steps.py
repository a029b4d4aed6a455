"""The steps that `render`, `validate` and `plan` share. Each returns its result, or raises
Failure with the exit code (from exit_codes) and the lines that explain it."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click

from khala_cli import analysis, exit_codes, mend, outputs
from khala_cli.cli import Failure
from khala_cli.engine.config import TransformerConfig
from khala_cli.manifest import jobs as mf
from khala_cli.manifest.checks import closest
from khala_cli.plan import Plan, build_renders, make_plan, parse_shard
from khala_cli.review.keep import read_marks
from khala_cli.runner.devices import DeviceError, check_decode_path, parse_devices
from khala_cli.runner.lock import LockHeld, RunLock, flocked
from khala_cli.weights import stack
from khala_cli.weights.resolve import (
    MODEL_JSON,
    ModelError,
    default_destination,
    demo_dir,
    find_download,
    read_info,
    resolve_model,
)

DEMO_LINE = ("model: demo (tiny and untrained: it renders noise, not music; it is here to try "
             "the pipeline. See the README for the real weights.)")

MANIFEST_ARG = click.argument(
    "manifest", type=click.Path(exists=True, dir_okay=False, path_type=Path))


def warn(text: str) -> None:
    click.echo(f"warning: {text}", err=True)


def load_manifest(path: Path, *, max_renders: int, output_dir: Path | None = None,
                  model: str | None = None, quiet: bool = False) -> mf.Manifest:
    """The valid manifest; its warnings are printed unless quiet."""
    try:
        m = mf.load(path, max_renders=max_renders, output_dir=output_dir, model=model)
    except mf.ManifestError as exc:
        n = len(exc.issues)
        raise Failure(exit_codes.USAGE,
                      f"error: {path} is not a valid manifest ({n} error{'s' if n != 1 else ''}; "
                      "nothing was rendered or written):",
                      *(f"  {issue}" for issue in exc.issues)) from None
    if not quiet:
        for w in m.warnings:
            warn(str(w))
    return m


def shard(spec: str | None) -> tuple[int, int] | None:
    if spec is None:
        return None
    try:
        return parse_shard(spec)
    except ValueError as exc:
        raise Failure(exit_codes.USAGE, f"error: {exc}") from None


def only(m: mf.Manifest, values: tuple[str, ...]) -> tuple[str, ...]:
    """The job ids of repeated or comma-separated --only options; each must exist."""
    ids = [j.id for j in m.jobs]
    wanted = [s.strip() for item in values for s in item.split(",") if s.strip()]
    for w in wanted:
        if w not in ids:
            sug = closest(w, ids)
            raise Failure(exit_codes.USAGE, f"error: --only {w}: no job with that id in "
                          f"{m.path}" + (f" (did you mean '{sug}'?)" if sug else ""))
    return tuple(wanted)


def devices(spec: str, decode_path: str | None = None) -> list:
    """The devices of a --devices spec, checked against the --decode-path they will run."""
    try:
        found = parse_devices(spec)
        check_decode_path(found, decode_path)
        return found
    except DeviceError as exc:
        raise Failure(exit_codes.MODEL, f"error: {exc}") from None


def model(m: mf.Manifest, *, build_demo: bool = True, convert: bool = False,
          announce: Callable[[str], None] | None = None) -> tuple[Path | None, Any]:
    """(model dir, ModelInfo); (None, None) for a demo model not built yet when not building."""
    try:
        if m.model == "demo" and not build_demo:
            d = demo_dir()
            return (d, read_info(d)) if (d / "model.json").exists() else (None, None)
        with _one_build(m, convert, announce):
            return resolve_model(m.model, m.model_base, convert=convert, announce=announce)
    except ModelError as exc:
        where = f" ({m.path}:{m.model_line})" if m.model_line else ""
        lines = [f"error: model {m.model!r}{where}: {exc}"]
        if "does not exist" in str(exc):
            lines.append("  A model directory is made once from the Khala download with "
                         "`khala convert DOWNLOAD DIR` (see the README); `--model demo` tries "
                         "the pipeline with the untrained demo model (noise).")
        raise Failure(exit_codes.MODEL, *lines) from None


def _build_target(m: mf.Manifest, convert: bool) -> Path | None:
    """The model directory that resolving `model:` would build (the demo, or a conversion
    of a raw download), or None."""
    if m.model == "demo":
        target = demo_dir()
    else:
        path = (m.model_base / m.model).expanduser().resolve()
        if not convert or (path / MODEL_JSON).exists() or find_download(path) is None:
            return None
        target = default_destination(path)
    return None if (target / MODEL_JSON).exists() else target


@contextlib.contextmanager
def _one_build(m: mf.Manifest, convert: bool,
               announce: Callable[[str], None] | None) -> Iterator[None]:
    """Build the model at most once when several runs (the shards of an array) start at
    once: the first builds under an flock beside the target, the others wait, then find it
    built."""
    target = _build_target(m, convert)
    with contextlib.ExitStack() as stack:
        if target is not None:
            def waiting() -> None:
                if announce:
                    announce(f"waiting for another khala to finish building {target} ...")
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                stack.enter_context(flocked(target.parent / f".{target.name}.build-lock",
                                            on_wait=waiting))
            except OSError:
                pass  # cannot lock there: the build fails with its own error there too
        yield


def write_code(exc: OSError) -> int:
    """The exit code of a failed write: 74 for a full or read-only disk, else 3."""
    return exit_codes.NO_SPACE if exc.errno in outputs.NO_SPACE_ERRNOS else exit_codes.MODEL


@contextlib.contextmanager
def locked(output_dir: Path, *, purpose: str, shard: tuple[int, int] | None = None,
           on_lost: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold the output directory's run lock (runner/lock.py) for the block; exit 75 naming
    the holder when another run holds it."""
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(RunLock(output_dir, warn=warn, shard=shard, purpose=purpose,
                                        on_lost=on_lost))
        except LockHeld as exc:
            raise Failure(exit_codes.LOCKED, f"error: {exc}") from None
        except OSError as exc:
            raise Failure(write_code(exc), f"error: cannot take the lock in {output_dir}: "
                          f"{exc.strerror or exc} ({exc.filename or output_dir})") from None
        yield


def model_dict(model_dir: Path | None, info: Any, ref: str) -> dict[str, Any]:
    """The model as the run report and `plan --json` record it."""
    if info is None:
        return {"ref": ref, "name": ref, "dir": None, "fingerprint": None,
                "demo": ref == "demo"}
    return {"ref": ref, "name": info.name, "dir": str(model_dir),
            "fingerprint": info.fingerprint, "demo": bool(info.demo)}


def ffmpeg() -> None:
    problem = outputs.check_ffmpeg()
    if problem:
        raise Failure(exit_codes.MODEL, f"error: {problem}")


def codec_stack() -> None:
    """torch, torchaudio and the codec import as a set, checked before any child needs them."""
    problem = stack.check()
    if problem is not None:
        raise Failure(exit_codes.MODEL, f"error: {problem.message}", f"  fix: {problem.fix}")


def plan(m: mf.Manifest, info: Any, *, force: bool, only: tuple[str, ...],
         shard: tuple[int, int] | None, save_codes: bool | None,
         model_dir: Path | None = None, after_parents: bool = False) -> Plan:
    """The plan of a run; `save_codes` None: the manifest's `save_codes` (default true). The
    keepers of the output directory are never re-rendered for a changed setting without
    `force`. Re-rolls and extensions are planned from their parent takes on disk; those whose
    parent this run renders first wait for it (`Plan.waiting`); `after_parents`: the run
    has rendered them, so only a parent that is still not done (it failed) holds them."""
    codes = m.save_codes if save_codes is None else save_codes
    renders = build_renders(m, info.fingerprint, save_codes=codes)
    todo = {(r.job_id, r.seed) for r in renders
            if (force and not after_parents) or not outputs.is_done(r)}
    kids = mend.Children([], [])
    if any(j.parent for j in m.jobs):
        seq = TransformerConfig.from_json(Path(model_dir) / "backbone.json").max_seq_len
        try:
            kids = mend.manifest_children(m, fingerprint=info.fingerprint, max_seq_len=seq,
                                          save_codes=codes, planned=todo)
        except mend.MendError as exc:
            raise Failure(exit_codes.USAGE, f"error: {exc}", "  nothing was rendered or "
                          "written") from None
    p = make_plan(renders + kids.renders, is_done=outputs.is_done, force=force, only=only,
                  shard=shard, kept=read_marks(m.output_dir), passes=analysis.passes)
    p.waiting = [(j.id, j.parent.take) for j in kids.waiting if not only or j.id in only]
    return p


KEPT_SHOWN = 20  # keepers named in the note; the rest are counted


def kept_note(p: Plan, output_dir: Path) -> str | None:
    """The line that names the keepers this run leaves alone although their settings or model
    changed, and what to do about them; None when there are none."""
    if not p.kept:
        return None
    ids = [f"{it.render.job_id}:{it.render.seed}" for it in p.kept]
    shown = ", ".join(ids[:KEPT_SHOWN]) + (f" and {len(ids) - KEPT_SHOWN} more"
                                           if len(ids) > KEPT_SHOWN else "")
    return (f"kept: not re-rendered: {len(ids)} kept take{'s' if len(ids) != 1 else ''} "
            f"whose settings or model changed ({shown}). Drop them with `khala keep "
            f"{output_dir} --drop JOB:SEED` to let them re-render, or pass --force to "
            "re-render them anyway (the old versions move to "
            f"{output_dir / outputs.SUPERSEDED}/)")


def waiting_note(waiting: list[tuple[str, str]], then: str) -> str:
    """The line naming re-rolls and extensions whose parent take is not rendered yet."""
    jobs = ", ".join(f"{job} (of {take})" for job, take in waiting)
    return f"waiting for their parent take: {jobs}; `khala render` will {then}"
