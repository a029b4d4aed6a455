"""`khala render`, `validate`, `plan` and `tags`.

The parent process never imports torch: these commands use manifest, plan, outputs, report
and the runner's torch-free parts (devices, lock, pool); the engine runs in worker processes.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import click

from khala_cli.cli import cli
from khala_cli.cli.review import review_page

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_MODEL, EXIT_LOCKED, EXIT_INTERRUPTED = 0, 1, 2, 3, 75, 130
EXIT_NO_SPACE = 74  # the output disk is full, over quota or read-only (EX_IOERR)
DEMO_LINE = ("model: demo (tiny and untrained: it renders noise, not music; it is here to try "
             "the pipeline. See the README for the real weights.)")

MANIFEST_ARG = click.argument(
    "manifest", type=click.Path(exists=True, dir_okay=False, path_type=Path))


def _err_console():
    from rich.console import Console

    return Console(stderr=True, highlight=False, soft_wrap=True)


def _out_console():
    from rich.console import Console

    return Console(highlight=False, soft_wrap=True)


def _echo_err(msg: str) -> None:
    click.echo(msg, err=True)


# -- shared steps, each exits with its own code -----------------------------------------------


def _load(path: Path, *, max_renders: int, output_dir: Path | None, model: str | None,
          quiet: bool = False):
    from khala_cli import manifest as mf

    try:
        m = mf.load(path, max_renders=max_renders, output_dir=output_dir, model=model)
    except mf.ManifestError as exc:
        n = len(exc.issues)
        _echo_err(f"error: {path} is not a valid manifest "
                  f"({n} error{'s' if n != 1 else ''}; nothing was rendered or written):")
        for issue in exc.issues:
            _echo_err(f"  {issue}")
        sys.exit(EXIT_USAGE)
    if not quiet:
        for w in m.warnings:
            _echo_err(f"warning: {w}")
    return m


def _shard(spec: str | None) -> tuple[int, int] | None:
    if spec is None:
        return None
    from khala_cli.plan import parse_shard

    try:
        return parse_shard(spec)
    except ValueError as exc:
        _echo_err(f"error: {exc}")
        sys.exit(EXIT_USAGE)


def _only(m, only: tuple[str, ...]) -> tuple[str, ...]:
    from khala_cli.manifest import closest

    ids = [j.id for j in m.jobs]
    wanted: list[str] = []
    for item in only:
        wanted += [s.strip() for s in item.split(",") if s.strip()]
    for w in wanted:
        if w not in ids:
            sug = closest(w, ids)
            _echo_err(f"error: --only {w}: no job with that id in {m.path}"
                      + (f" (did you mean '{sug}'?)" if sug else ""))
            sys.exit(EXIT_USAGE)
    return tuple(wanted)


def _model(m, *, build_demo: bool = True, convert: bool = False,
           announce: Callable[[str], None] | None = None) -> tuple[Path | None, Any]:
    """(model dir, ModelInfo); (None, None) for a demo model not built yet when not building."""
    from khala_cli.weights.resolve import ModelError, demo_dir, read_info, resolve_model

    try:
        if m.model == "demo" and not build_demo:
            d = demo_dir()
            return (d, read_info(d)) if (d / "model.json").exists() else (None, None)
        return resolve_model(m.model, m.model_base, convert=convert, announce=announce)
    except ModelError as exc:
        _echo_err(f"error: model {m.model!r}"
                  + (f" ({m.path}:{m.model_line})" if m.model_line else "") + f": {exc}")
        if "does not exist" in str(exc):
            _echo_err("  A model directory is made once from the Khala download with "
                      "`khala convert DOWNLOAD DIR` (see the README); `--model demo` tries "
                      "the pipeline with the untrained demo model (noise).")
        sys.exit(EXIT_MODEL)


def _model_dict(model_dir: Path | None, info: Any, ref: str) -> dict[str, Any]:
    if info is None:
        return {"ref": ref, "name": ref, "dir": None, "fingerprint": None,
                "demo": ref == "demo"}
    return {"ref": ref, "name": info.name, "dir": str(model_dir),
            "fingerprint": info.fingerprint, "demo": bool(info.demo)}


def _plan(m, info, *, force, only, shard, save_codes):
    from khala_cli import outputs
    from khala_cli.plan import build_renders, make_plan

    renders = build_renders(m, info.fingerprint, save_codes=save_codes)
    return make_plan(renders, is_done=outputs.is_done, force=force, only=only, shard=shard)


# -- khala validate ---------------------------------------------------------------------------


@cli.command()
@MANIFEST_ARG
@click.option("--model", "model", metavar="DIR", help="Model directory (or 'demo') instead "
              "of the manifest's `model:`.")
@click.option("--max-renders", type=click.IntRange(min=1), default=10_000, show_default=True,
              help="Refuse manifests with more renders (jobs x seeds) than this.")
def validate(manifest: Path, model: str | None, max_renders: int) -> None:
    """Check MANIFEST without rendering: syntax, keys, ranges, seeds, ids, lyrics files, model.

    Exit 0 when valid, 2 with every error (file:line, job, field) when not, 3 when the model
    directory is not usable. Writes nothing.
    """
    m = _load(manifest, max_renders=max_renders, output_dir=None, model=model)
    model_dir, info = _model(m, build_demo=False)
    _ffmpeg()
    minutes = sum(j.est_minutes * len(j.seeds) for j in m.jobs)
    click.echo(f"ok: {manifest}: {len(m.jobs)} job{'s' if len(m.jobs) != 1 else ''}, "
               f"{m.render_count} render{'s' if m.render_count != 1 else ''}, "
               f"~{minutes:.1f} audio minutes; output {m.output_dir}")
    if m.model == "demo":
        click.echo(DEMO_LINE + ("" if info else " It is built on first use."))
    else:
        click.echo(f"model: {info.name} ({model_dir})")
    if m.warnings:
        click.echo(f"{len(m.warnings)} warning{'s' if len(m.warnings) != 1 else ''} (above)")


# -- khala plan -------------------------------------------------------------------------------


@cli.command("plan")
@MANIFEST_ARG
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@click.option("--model", "model", metavar="DIR", help="Model directory (or 'demo').")
@click.option("--output-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Output directory instead of the manifest's `output_dir:`.")
@click.option("--force", is_flag=True, help="Plan to re-render renders that are done.")
@click.option("--only", multiple=True, metavar="JOB_ID", help="Only these jobs (repeatable, "
              "or comma-separated).")
@click.option("--shard", metavar="K/N|auto", help="Only the renders of shard K of N (K from 0; "
              "auto: from a Slurm array or a Kubernetes Indexed Job).")
@click.option("--save-codes", is_flag=True, help="Plan as `render --save-codes` would.")
@click.option("--max-renders", type=click.IntRange(min=1), default=10_000, show_default=True)
def plan_cmd(manifest: Path, as_json: bool, model: str | None, output_dir: Path | None,
             force: bool, only: tuple[str, ...], shard: str | None, save_codes: bool,
             max_renders: int) -> None:
    """Show what `khala render MANIFEST` would do: each render's status (todo: new;
    rerender: its outputs are from other settings, or --force; skip: already done), and the
    audio minutes to render. Writes nothing to the output directory."""
    m = _load(manifest, max_renders=max_renders, output_dir=output_dir, model=model,
              quiet=as_json)
    shard_t = _shard(shard)
    only_t = _only(m, only)
    model_dir, info = _model(m)
    p = _plan(m, info, force=force, only=only_t, shard=shard_t, save_codes=save_codes)
    counts = p.counts()
    summary = {**counts, "renders": len(p.items), "excluded": p.excluded,
               "audio_minutes_to_render": round(p.minutes(), 3),
               "audio_minutes_done": round(p.minutes(("skip",)), 3)}
    if as_json:
        data = {
            "manifest": str(m.path), "output_dir": str(m.output_dir),
            "model": _model_dict(model_dir, info, m.model),
            "shard": f"{shard_t[0]}/{shard_t[1]}" if shard_t else None,
            "summary": summary,
            "warnings": [str(w) for w in m.warnings],
            "renders": [it.to_dict() for it in p.items],
        }
        click.echo(json.dumps(data, indent=2, ensure_ascii=False))
        return
    from rich.table import Table

    out = _out_console()
    if info.demo:
        out.print(f"[yellow]{DEMO_LINE}[/yellow]")
    t = Table(title=f"plan: {manifest} -> {m.output_dir}", title_justify="left")
    for col in ("job", "seeds", "todo", "rerender", "skip", "~minutes"):
        t.add_column(col, justify="left" if col in ("job", "seeds") else "right")
    per_job: dict[str, dict[str, Any]] = {}
    for it in p.items:
        row = per_job.setdefault(it.render.job_id, {"seeds": [], "todo": 0, "rerender": 0,
                                                    "skip": 0, "min": 0.0})
        row["seeds"].append(it.render.seed)
        row[it.status] += 1
        if it.status != "skip":
            row["min"] += it.est_minutes
    for job_id, row in per_job.items():
        t.add_row(job_id, _seeds_text(row["seeds"]), str(row["todo"]), str(row["rerender"]),
                  str(row["skip"]), f"{row['min']:.1f}")
    out.print(t)
    out.print(f"{len(p.items)} renders: {counts['todo']} todo, {counts['rerender']} rerender, "
              f"{counts['skip']} skip (done); ~{p.minutes():.1f} audio minutes to render"
              + (f"; {p.excluded} left to other shards / --only" if p.excluded else ""))


def _seeds_text(seeds: list[int]) -> str:
    seeds = sorted(seeds)
    if len(seeds) > 2 and seeds == list(range(seeds[0], seeds[-1] + 1)):
        return f"{seeds[0]}-{seeds[-1]}"
    text = ",".join(str(s) for s in seeds[:8])
    return text + (f",... ({len(seeds)})" if len(seeds) > 8 else "")


# -- khala tags -------------------------------------------------------------------------------


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print the catalogue as JSON.")
def tags(as_json: bool) -> None:
    """The tag catalogue, by category (the tags the reference front end offers). A job's
    `tags:` may use others; they are passed to the model as written."""
    from khala_cli.manifest import tag_catalogue

    cat = tag_catalogue()
    if as_json:
        click.echo(json.dumps(cat, indent=2, ensure_ascii=False))
        return
    for key, c in cat.items():
        click.echo(f"{c.get('label', key)} [{key}] ({len(c['tags'])})")
        click.echo("  " + ", ".join(c["tags"]))
        click.echo()


# -- khala render -----------------------------------------------------------------------------


@cli.command()
@MANIFEST_ARG
@click.option("--model", "model", metavar="DIR", help="Model directory (or 'demo') instead "
              "of the manifest's `model:`.")
@click.option("--output-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Output directory instead of the manifest's `output_dir:`.")
@click.option("--force", is_flag=True, help="Re-render renders that are already done.")
@click.option("--only", multiple=True, metavar="JOB_ID",
              help="Only these jobs (repeatable, or comma-separated).")
@click.option("--shard", metavar="K/N|auto", help="Only shard K of N (K from 0). `auto` reads "
              "K and N from a Slurm job array or a Kubernetes Indexed Job (`auto/N` gives N). "
              "Every render belongs to exactly one shard, decided by its key.")
@click.option("--devices", default="auto", show_default=True, metavar="SPEC",
              help="auto (every visible GPU, else the CPU), cpu, cpu:N, or GPU ids like 0,1,3.")
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Seeds of one job rendered together (default: from device memory; 1 on CPU).")
@click.option("--residency", type=click.Choice(["keep_loaded", "one_shot"]), default=None,
              help="keep_loaded: all three models stay in memory; one_shot: one stage at a "
              "time (default: keep_loaded when they fit).")
@click.option("--retries", type=click.IntRange(min=0), default=2, show_default=True,
              help="Retries of a render whose worker crashed, hung or ran out of memory.")
@click.option("--stall-timeout", type=click.FloatRange(min=1.0), default=600.0,
              show_default=True, metavar="SECONDS",
              help="Replace a worker that reports no progress for this long.")
@click.option("--grace", type=click.FloatRange(min=0.0), default=60.0, show_default=True,
              metavar="SECONDS", help="After the first Ctrl-C / SIGTERM, how long running "
              "renders may take to finish before their workers are stopped.")
@click.option("--save-codes", is_flag=True,
              help="Also keep each take's RVQ codes as <stem>.codes.npy (int16).")
@click.option("--max-renders", type=click.IntRange(min=1), default=10_000, show_default=True,
              help="Refuse manifests with more renders (jobs x seeds) than this.")
@click.option("--quiet", "-q", is_flag=True, help="No progress output; errors and a one-line "
              "summary only.")
@click.option("--convert", is_flag=True, help="If `model:` is a raw Khala download, convert it "
              "first (once, into <download>-khala).")
@click.option("--test-faults", default="", hidden=True,
              help="TEST ONLY: worker failpoints (khala_cli/runner/faults.py).")
@click.option("--test-fault-dir", default="", hidden=True)
def render(manifest: Path, model: str | None, output_dir: Path | None, force: bool,
           only: tuple[str, ...], shard: str | None, devices: str, batch_size: int | None,
           residency: str | None, retries: int, stall_timeout: float, grace: float,
           save_codes: bool,
           max_renders: int, quiet: bool, convert: bool, test_faults: str,
           test_fault_dir: str) -> None:
    """Render every job x seed of MANIFEST that is not done yet.

    Resumes where the last run stopped: a take whose sidecar carries the same render key is
    skipped; a changed setting or model re-renders it. Writes
    <output_dir>/<job>/<job>-s<seed>.wav|.mp3|.json and a run report under
    <output_dir>/reports/.
    """
    started = datetime.now(timezone.utc)
    m = _load(manifest, max_renders=max_renders, output_dir=output_dir, model=model,
              quiet=quiet)
    shard_t = _shard(shard)
    only_t = _only(m, only)
    devs = _devices(devices)
    model_dir, info = _model(m, convert=convert, announce=None if quiet else _echo_err)
    _ffmpeg()
    if info.demo:
        _echo_err(f"warning: {DEMO_LINE}")

    out_dir = m.output_dir
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        from khala_cli.outputs import NO_SPACE_ERRNOS

        _echo_err(f"error: cannot create the output directory {out_dir}: "
                  f"{exc.strerror or exc}")
        sys.exit(EXIT_NO_SPACE if exc.errno in NO_SPACE_ERRNOS else EXIT_MODEL)
    from khala_cli.runner.lock import LockHeld, RunLock

    lock_dir = out_dir if shard_t is None else out_dir / ".khala" / \
        f"shard-{shard_t[0]}-of-{shard_t[1]}"
    try:
        with RunLock(lock_dir, warn=lambda msg: _echo_err(f"warning: {msg}")):
            code = _render_locked(
                m, manifest, model_dir, info, started=started, force=force, only=only_t,
                shard=shard_t, devices=devices, n_devices=len(devs), batch_size=batch_size,
                residency=residency, retries=retries, stall_timeout=stall_timeout,
                grace=grace, save_codes=save_codes, quiet=quiet,
                faults=(test_faults, test_fault_dir))
    except LockHeld as exc:
        _echo_err(f"error: {exc}")
        sys.exit(EXIT_LOCKED)
    except OSError as exc:  # the lock or the output folder itself cannot be written
        from khala_cli.outputs import NO_SPACE_ERRNOS

        _echo_err(f"error: cannot write in {out_dir}: {exc.strerror or exc} "
                  f"({exc.filename or out_dir})")
        sys.exit(EXIT_NO_SPACE if exc.errno in NO_SPACE_ERRNOS else EXIT_MODEL)
    sys.exit(code)


def _ffmpeg() -> None:
    from khala_cli.outputs import check_ffmpeg

    problem = check_ffmpeg()
    if problem:
        _echo_err(f"error: {problem}")
        sys.exit(EXIT_MODEL)


def _devices(spec: str) -> list:
    from khala_cli.runner.devices import DeviceError, parse_devices

    try:
        return parse_devices(spec)
    except DeviceError as exc:
        _echo_err(f"error: {exc}")
        sys.exit(EXIT_MODEL)


def _render_locked(m, manifest: Path, model_dir: Path, info, *, started: datetime, force: bool,
                   only: tuple[str, ...], shard, devices: str, n_devices: int,
                   batch_size: int | None, residency: str | None, retries: int,
                   stall_timeout: float, grace: float, save_codes: bool, quiet: bool,
                   faults: tuple[str, str] = ("", "")) -> int:
    from khala_cli import report as rp

    p = _plan(m, info, force=force, only=only, shard=shard, save_codes=save_codes)
    to_run = p.to_run
    counts = p.counts()
    err = _err_console()
    tty = err.is_terminal and not quiet
    log = _PlainLog(quiet=quiet or tty)
    log.line(f"khala render {manifest}: {len(p.items)} renders, {len(to_run)} to render "
             f"({counts['rerender']} re-render), {counts['skip']} already done; "
             f"~{p.minutes():.1f} audio minutes; output {m.output_dir}"
             + (f"; shard {shard[0]}/{shard[1]}" if shard else ""))
    _warn_disk(m.output_dir, p)
    if faults[0]:
        _echo_err(f"WARNING: TEST FAULTS ARE ACTIVE ({faults[0]}): workers will crash, hang or "
                  "fail on purpose. This option is for khala's own tests only.")
    ignored = sorted(k for k in os.environ if k.startswith("KHALA_TEST_FAULT"))
    if ignored:
        _echo_err(f"warning: ignoring {', '.join(ignored)} from the environment: test "
                  "failpoints are never taken from it")

    outcomes: list[Any] = []
    interrupted = False
    no_space = None
    busy: dict[str, float] = {}
    if to_run:
        from khala_cli.runner import RunOptions, run_renders

        opts = RunOptions(model_dir=str(model_dir), output_dir=str(m.output_dir),
                          devices=devices, batch_size=batch_size, residency=residency,
                          retries=retries, stall_timeout=stall_timeout, grace=grace,
                          test_faults=faults[0], test_fault_dir=faults[1])
        display = _TtyProgress(err, len(to_run), n_devices) if tty else None
        seen: list[Any] = []

        def on_event(ev: dict[str, Any]) -> None:
            if ev.get("type") == "result":
                seen.append(ev["outcome"])
            if display is not None:
                display.event(ev)
            else:
                log.event(ev, len(seen), len(to_run))

        from khala_cli.runner.devices import DeviceError

        try:
            if display is not None:
                display.start()
            try:
                result = run_renders(to_run, opts, on_event)
            finally:
                if display is not None:
                    display.stop()
            outcomes = list(result.outcomes)
            interrupted = bool(result.interrupted)
            no_space = result.no_space
            busy = dict(result.device_busy_s or {})
        except DeviceError as exc:
            _echo_err(f"error: {exc}")
            return EXIT_MODEL
        except KeyboardInterrupt:
            # The runner normally turns Ctrl-C into an orderly stop; this is the fallback.
            outcomes, interrupted = seen, True
    else:
        log.line("nothing to render: every planned render is already done"
                 + ("" if not p.items else " (use --force to render again)"))

    finished = datetime.now(timezone.utc)
    run = rp.RunInfo(
        manifest=str(m.path), output_dir=str(m.output_dir),
        model=_model_dict(model_dir, info, m.model), started_at=started,
        finished_at=finished, interrupted=interrupted, device_busy_s=busy, shard=shard,
        no_space=no_space,
        options={"devices": devices, "batch_size": batch_size, "residency": residency,
                 "retries": retries, "stall_timeout": stall_timeout, "grace": grace,
                 "force": force,
                 "only": list(only), "save_codes": save_codes},
        excluded=p.excluded)
    rep = rp.build(p, outcomes, run)
    try:
        paths = rp.write(rep, m.output_dir, started, shard)
    except OSError as exc:  # a full or read-only disk: the summary still reaches the terminal
        _echo_err(f"error: cannot write the run report under {m.output_dir / 'reports'}: "
                  f"{exc.strerror or exc}")
        paths = {k: Path("(not written)") for k in ("json", "csv", "latest_json")}
    page = review_page(m.output_dir)
    s = rep["summary"]
    for e in rp.failures(rep):
        _echo_err(f"failed: {e['job_id']} seed {e['seed']}: {e['error']}"
                  + (f" (log: {e['log']})" if e.get("log") else ""))
    if quiet:
        click.echo(f"{s['rendered']} rendered, {s['skipped']} skipped, {s['failed']} failed"
                   + (f", {s['cancelled']} not finished" if s["cancelled"] else "")
                   + f"; report {paths['json']}" + (f"; review page {page}" if page else ""))
    else:
        out = _out_console()
        out.print(rp.summary_table(rep))
        out.print(f"report: {paths['json']} (and {paths['csv'].name}, "
                  f"{paths['latest_json'].name})")
        if page:
            out.print(f"review page: {page}")
    if no_space:
        _echo_err(f"error: {_no_space_text(no_space, m.output_dir, p)}")
    return s["exit_code"]


def _disk_need(p) -> tuple[int, int]:
    """(bytes the takes still to render need, bytes one take needs at most)."""
    from khala_cli.outputs import bytes_per_take
    from khala_cli.plan import est_minutes

    sizes = [bytes_per_take(est_minutes(r), r.save_codes) for r in p.to_run]
    return sum(sizes), max(sizes, default=0)


def _free(path: Path) -> int:
    import shutil

    try:
        return shutil.disk_usage(path).free
    except OSError:
        return -1


def _warn_disk(output_dir: Path, p) -> None:
    need, _ = _disk_need(p)
    free = _free(output_dir)
    if 0 <= free < need:
        _echo_err(f"warning: {output_dir} has {free / 1e6:,.0f} MB free, but the "
                  f"{len(p.to_run)} takes to render need about {need / 1e6:,.0f} MB "
                  "(WAV + MP3 per audio minute); the run stops when the disk is full")


def _no_space_text(no_space: dict, output_dir: Path, p) -> str:
    _, one = _disk_need(p)
    return (f"the output disk refused a write: {no_space['error']}. {output_dir} has "
            f"{max(0, _free(output_dir)) / 1e6:,.1f} MB free; one take needs about "
            f"{one / 1e6:,.1f} MB. No more work was handed out. Free some space (or make the "
            "folder writable) and run the same command again: takes already rendered are "
            "written without rendering them again.")


# -- progress display -------------------------------------------------------------------------

_PHASE_SPAN = {  # share of one render's work, for the overall bar
    "loading_backbone": (0.0, 0.0), "backbone": (0.0, 0.75), "loading_superres": (0.75, 0.75),
    "superres": (0.75, 0.95), "loading_decoder": (0.95, 0.95), "decoding": (0.95, 1.0),
}


def _fraction(phase: str, done: Any, total: Any) -> float:
    lo, hi = _PHASE_SPAN.get(phase, (0.0, 0.0))
    try:
        f = min(1.0, max(0.0, float(done) / float(total))) if total else 0.0
    except (TypeError, ValueError):
        f = 0.0
    return lo + (hi - lo) * f


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


class _PlainLog:
    """Timestamped lines for logs and cron mail: phase changes, results, a periodic heartbeat."""

    HEARTBEAT_S = 60.0

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.phase: dict[Any, tuple] = {}
        self.last: dict[Any, float] = {}

    def line(self, text: str) -> None:
        if not self.quiet:
            click.echo(f"{_now()} {text}", err=True)

    def event(self, ev: dict[str, Any], n_done: int, n_total: int) -> None:
        kind = ev.get("type")
        if kind == "interrupt":
            self.line(f"interrupted: no new renders; running ones may finish for "
                      f"{ev.get('grace', 0):g} s (interrupt again to stop at once)")
        elif kind == "no_space":
            click.echo(f"{_now()} error: {ev.get('error')}: no more renders are handed out; "
                       "running ones are kept under .khala/work", err=True)
        elif kind == "worker":
            extra = f" (pid {ev['pid']})" if ev.get("pid") else ""
            reason = f": {ev['error']}" if ev.get("error") else ""
            self.line(f"worker {ev.get('worker')} ({ev.get('device')}): {ev.get('state')}"
                      f"{extra}{reason}")
        elif kind == "progress":
            w = ev.get("worker")
            seeds = ",".join(str(s) for s in ev.get("seeds") or [])
            state = (ev.get("job_id"), seeds, ev.get("phase"))
            now = time.monotonic()
            if self.phase.get(w) != state or now - self.last.get(w, 0.0) >= self.HEARTBEAT_S:
                self.phase[w], self.last[w] = state, now
                tps = ev.get("tokens_per_s")
                self.line(f"{ev.get('device')}: {ev.get('job_id')} s{seeds} {ev.get('phase')} "
                          f"{ev.get('done')}/{ev.get('total')}"
                          + (f" ({tps:.1f} tokens/s)" if isinstance(tps, (int, float)) and tps
                             else ""))
        elif kind == "result":
            o = ev["outcome"]
            r = o.render
            tail = f"in {o.seconds:.1f}s on {o.device}" if o.seconds is not None else ""
            if o.status == "rendered":
                self.line(f"[{n_done}/{n_total}] rendered {r.job_id} s{r.seed} {tail}")
            else:
                self.line(f"[{n_done}/{n_total}] {o.status} {r.job_id} s{r.seed} {tail}: "
                          f"{o.error}")


class _TtyProgress:
    """A rich display: the overall bar with ETA, and one line per worker."""

    def __init__(self, console, total: int, n_workers: int):
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.console = console
        self.total = total
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[note]}"), TimeElapsedColumn(), TextColumn("ETA"),
            TimeRemainingColumn(), console=console, transient=False, refresh_per_second=4)
        self.overall = self.progress.add_task("all renders", total=total, note="")
        self.workers: dict[Any, int] = {}
        self.partial: dict[Any, tuple[str, list[int], float]] = {}  # worker -> job, seeds, f
        self.finished = 0
        self.failed = 0

    def start(self) -> None:
        self.progress.start()

    def stop(self) -> None:
        self._refresh_overall()
        self.progress.stop()

    def _worker_task(self, w: Any, device: Any) -> int:
        if w not in self.workers:
            self.workers[w] = self.progress.add_task(f"  {device}", total=None, note="starting")
        return self.workers[w]

    def _refresh_overall(self) -> None:
        partial = sum(f * len(seeds) for _, seeds, f in self.partial.values())
        done = min(float(self.total), self.finished + partial)
        note = f"[red]{self.failed} failed[/red]" if self.failed else ""
        self.progress.update(self.overall, completed=done, note=note)

    def event(self, ev: dict[str, Any]) -> None:
        kind = ev.get("type")
        if kind == "interrupt":
            self.console.print(f"[yellow]interrupted[/yellow]: no new renders; running ones may "
                               f"finish for {ev.get('grace', 0):g} s (interrupt again to stop "
                               "at once)")
        elif kind == "no_space":
            self.console.print(f"[red]error[/red]: {ev.get('error')}: no more renders are "
                               "handed out; running ones are kept under .khala/work")
        elif kind == "worker":
            t = self._worker_task(ev.get("worker"), ev.get("device"))
            self.progress.update(t, note=str(ev.get("state")))
            if ev.get("state") in ("stopped", "died", "stalled", "failed", "oom"):
                self.partial.pop(ev.get("worker"), None)
        elif kind == "progress":
            w = ev.get("worker")
            t = self._worker_task(w, ev.get("device"))
            seeds = list(ev.get("seeds") or [])
            phase = str(ev.get("phase"))
            tps = ev.get("tokens_per_s")
            rate = f" {tps:.1f} tok/s" if isinstance(tps, (int, float)) and tps else ""
            seeds_txt = ",".join(str(s) for s in seeds)
            total = ev.get("total") or None
            self.progress.update(
                t, description=f"  {ev.get('device')} {ev.get('job_id')} s{seeds_txt}",
                total=total, completed=ev.get("done") or 0, note=f"{phase}{rate}")
            self.partial[w] = (str(ev.get("job_id")), seeds,
                               _fraction(phase, ev.get("done"), ev.get("total")))
            self._refresh_overall()
        elif kind == "result":
            o = ev["outcome"]
            self.finished += 1
            if o.status == "failed":
                self.failed += 1
                self.console.print(f"[red]failed[/red] {o.render.job_id} s{o.render.seed}: "
                                   f"{o.error}")
            for w, (job, seeds, f) in list(self.partial.items()):
                if job == o.render.job_id and o.render.seed in seeds:
                    rest = [s for s in seeds if s != o.render.seed]
                    if rest:
                        self.partial[w] = (job, rest, f)
                    else:
                        del self.partial[w]
            self._refresh_overall()

