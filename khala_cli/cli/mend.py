"""`khala reroll` and `khala extend`: continue a finished take, through the same runner as
`khala render` (devices, batches, resume, retries, the lock, the report and the page)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from khala_cli import exit_codes, mend
from khala_cli.cli import Failure, cli, steps
from khala_cli.cli.render import RenderOptions, click_options, run_manifest
from khala_cli.engine.config import TransformerConfig
from khala_cli.manifest import checks as chk
from khala_cli.manifest.jobs import (
    MAX_RENDERS,
    Job,
    Manifest,
    ParentSpec,
    child_id,
    until_seeds,
    written_id,
)
from khala_cli.model_numbers import ANALYSIS_FLAGS, SCORE_RANGE
from khala_cli.review.takes import NotAnOutputDir, check_output_dir, latest_reports

# render's options that name a manifest's parts: here the parent take decides them
_SKIP = ("output_dir", "only", "shard", "max_renders", "convert")
_OUTPUT_DIR = click.argument("output_dir", type=click.Path(file_okay=False, path_type=Path))
_TAKE = click.argument("take", metavar="JOB:SEED")
_JOB = click.option("--job", "job_id", metavar="ID", help="Job id of the new takes (default: "
                    "made from the take and the time, e.g. anthem-s7-from-1m10s).")


def _until_options(fn):
    """--until-passing, --max-takes, --gate-flags, --min-score: a manifest's `until` and
    `gates`, for one command."""
    for decl, kw in reversed((
            ("--until-passing", dict(type=int, metavar="K", help="Roll seeds (the given ones, "
                                     "then counting up) until K takes pass the gates.")),
            ("--max-takes", dict(type=int, metavar="M", help="With --until-passing: render at "
                                 "most M takes (default 16).")),
            ("--gate-flags", dict(metavar="FLAGS", help="With --until-passing: the analysis "
                                  "flags that fail a take, comma-separated (default: any).")),
            ("--min-score", dict(type=float, metavar="X", help="With --until-passing: the "
                                 "least score a passing take has.")))):
        fn = click.option(decl, **kw)(fn)
    return fn


@cli.command()
@_OUTPUT_DIR
@_TAKE
@click.option("--from", "at", required=True, metavar="TIME",
              help="Keep the take up to here (seconds or m:ss, snapped to a whole frame).")
@click.option("--seeds", required=True, metavar="LIST",
              help="New seeds, as a manifest's `seeds`: 7, 1,2,5 or 10-17.")
@_JOB
@_until_options
@click_options(skip=_SKIP)
def reroll(output_dir: Path, take: str, at: str, seeds: str, job_id: str | None,
           **given: Any) -> None:
    """Render take JOB:SEED of OUTPUT_DIR again from TIME on, once per new seed.

    Each new take keeps the parent's first TIME bit for bit (tokens, codes and samples, with
    a 46 ms crossfade ending at the cut) and samples the rest with its own seed; re-rolling
    with the parent's own seed gives the parent back. The take must have its codes (saved by
    default). Running the same command again renders nothing. With --until-passing K, seeds
    render in order (the given ones, then counting up) until K takes pass the gates."""
    sys.exit(_run(mend.REROLL, output_dir, take, at, seeds, job_id, given))


@cli.command()
@_OUTPUT_DIR
@_TAKE
@click.option("--to", "at", required=True, metavar="TIME",
              help="The new length (seconds or m:ss), past the take's end.")
@click.option("--seeds", default=None, metavar="LIST", help="Seeds of the continuation, as a "
              "manifest's `seeds` (default: the take's own seed, which continues a take cut "
              "at its token cap as if the cap had been longer).")
@_JOB
@_until_options
@click_options(skip=_SKIP)
def extend(output_dir: Path, take: str, at: str, seeds: str | None, job_id: str | None,
           **given: Any) -> None:
    """Continue take JOB:SEED of OUTPUT_DIR past its end, to TIME.

    The whole take is kept. A take that ended by itself continues from just before its
    end-of-song token (which is dropped); the prompt, its duration token included, stays as
    rendered. End-of-song is not sampled again before TIME: the new take is TIME long. The
    model's length (prompt plus tokens) is the limit."""
    sys.exit(_run(mend.EXTEND, output_dir, take, at, seeds, job_id, given))


def _run(kind: str, output_dir: Path, take: str, at: str, seeds: str | None,
         job_id: str | None, given: dict[str, Any]) -> int:
    roll = _roll(take, {k: given.pop(k) for k in ("until_passing", "max_takes", "gate_flags",
                                             "min_score")})
    o = RenderOptions(**given)
    flag = "--from" if kind == mend.REROLL else "--to"
    try:
        root = check_output_dir(output_dir).resolve()
    except NotAnOutputDir as exc:
        raise Failure(exit_codes.USAGE, f"error: {exc}") from None
    job, seed = _parsed(chk.parse_take, take, repr(take))
    seconds = _parsed(chk.parse_time, at, f"{flag} {at!r}")
    spec = ParentSpec(kind, job, seed, seconds)
    try:
        parent = mend.read_parent(root, job, seed)
    except mend.MendError as exc:
        raise Failure(exit_codes.USAGE, f"error: {exc}") from None
    new_seeds = _seeds(seeds) if seeds is not None else (seed,)
    if roll:
        new_seeds = until_seeds(new_seeds, roll["until"]["max_takes"])
    m = Manifest(path=parent.sidecar, model=o.model or _model_of(root, parent),
                 model_base=Path.cwd(), output_dir=root, save_codes=True, jobs=[Job(
                     id=job_id or child_id(kind, job, seed, seconds), title="", line=0,
                     seeds=new_seeds, index=int(parent.data.get("job_index") or 0),
                     parent=spec, **roll)])
    _check_job_id(m.jobs[0].id)
    model_dir, info = steps.model(m)
    try:
        seq = TransformerConfig.from_json(Path(model_dir) / "backbone.json").max_seq_len
        mend.cut(parent, spec, fingerprint=info.fingerprint, max_seq_len=seq)
    except mend.MendError as exc:
        raise Failure(exit_codes.USAGE, f"error: {exc}", "  nothing was rendered or written") from None
    return run_manifest(m, o, f"khala {kind} {take} {flag} {chk.clock(seconds)}")


def _parsed(parse: Any, text: str, shown: str) -> Any:
    """parse(text), or exit 2 naming the value as `shown`."""
    try:
        return parse(text)
    except ValueError as exc:
        raise Failure(exit_codes.USAGE, f"error: {shown}: {exc}") from None


def _seeds(text: str) -> tuple[int, ...]:
    """--seeds as a manifest's `seeds`: 7, 1,2,5 or 10-17."""
    value: Any = text.strip()
    if "," in value or value.isdigit():
        items = [s.strip() for s in value.split(",")]
        if not all(s.isdigit() for s in items):
            raise Failure(exit_codes.USAGE, f"error: --seeds {text!r}: expected seeds as 7, "
                          "1,2,5 or 10-17")
        value = [int(s) for s in items]
    ck = chk.Checker(Path("--seeds"), "--seeds", MAX_RENDERS)
    got = chk.seeds(ck.at(0, fld="--seeds"), value)
    if got is None:
        raise Failure(exit_codes.USAGE, *(f"error: --seeds {text!r}: {i.message}"
                                          for i in ck.errors))
    return got


def _roll(take: str, opts: dict[str, Any]) -> dict[str, Any]:
    """The Job's `until` and `gates` from the command's options, checked as a manifest's;
    {} without --until-passing."""
    if opts["until_passing"] is None:
        extra = [f"--{k.replace('_', '-')}" for k, v in opts.items() if v is not None]
        if extra:
            raise Failure(exit_codes.USAGE, f"error: {', '.join(extra)} needs --until-passing")
        return {}
    ck = chk.Checker(Path("--until-passing"), "command line", MAX_RENDERS)
    until = chk.until(ck.at(0, fld="until"), {"passing": opts["until_passing"],
                                              "max_takes": 16 if opts["max_takes"] is None
                                              else opts["max_takes"]})
    gates_in = {k: v for k, v in (("flags", opts["gate_flags"] and [
        f.strip() for f in opts["gate_flags"].split(",") if f.strip()]),
        ("min_score", opts["min_score"])) if v is not None}
    gates = chk.gates(ck.at(0, fld="gates"), gates_in, ANALYSIS_FLAGS, SCORE_RANGE)
    if ck.errors:
        names = {"until.passing": "--until-passing", "until.max_takes": "--max-takes",
                 "gates.flags": "--gate-flags", "gates.min_score": "--min-score"}
        raise Failure(exit_codes.USAGE, *(
            f"error: {take}: {names.get(i.field or '', i.field)}: {i.message}"
            for i in ck.errors))
    return {"until": until, "gates": gates if gates_in else None}


def _check_job_id(job_id: str) -> None:
    ck = chk.Checker(Path("--job"), "--job", MAX_RENDERS)
    if written_id(ck.at(0, fld="--job"), job_id) is None:
        raise Failure(exit_codes.USAGE, *(f"error: --job {job_id!r}: {i.message}"
                                          for i in ck.errors))


def _model_of(root: Path, parent: mend.Parent) -> str:
    """The model that rendered the parent: the demo, or the model directory of the output
    directory's latest run report when its fingerprint is the parent's."""
    model = parent.data.get("model") or {}
    if model.get("demo"):
        return "demo"
    for rep in latest_reports(root):
        m = rep.get("model") or {}
        if m.get("dir") and m.get("fingerprint") == model.get("fingerprint"):
            return str(m["dir"])
    raise Failure(exit_codes.USAGE, f"error: {parent.take}: cannot tell which model directory "
                  f"rendered it (model {model.get('name', '?')!r}); give --model DIR")
