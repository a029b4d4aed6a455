"""`khala render`: the manifest's renders that are not done yet, on the local devices.

The parent process never imports torch: the engine runs in the runner's worker processes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import click

from khala_cli import exit_codes, outputs
from khala_cli import report as rp
from khala_cli.cli import Failure, cli, display, steps
from khala_cli.cli.review import review_page
from khala_cli.engine.config import DECODE_PATHS
from khala_cli.manifest.jobs import MAX_RENDERS, Manifest
from khala_cli.plan import Plan, est_minutes
from khala_cli.runner import RunOptions, RunResult, run_renders
from khala_cli.runner.devices import DeviceError
from khala_cli.runner.events import Event, Finished


def _option(default: Any, *decls: str, report: bool = False, **click_kw: Any) -> Any:
    """A RenderOptions field that is also a command-line option (`report`: the run report
    records it)."""
    return dataclasses.field(default=default, metadata={"decls": decls, "click": click_kw,
                                                        "report": report})


@dataclass(frozen=True)
class RenderOptions:
    """`khala render`'s options: each field is one command-line option, declared here only."""

    model: str | None = _option(None, "--model", metavar="DIR", help="Model directory (or "
                                "'demo') instead of the manifest's `model:`.")
    output_dir: Path | None = _option(
        None, "--output-dir", type=click.Path(file_okay=False, path_type=Path),
        help="Output directory instead of the manifest's `output_dir:`.")
    force: bool = _option(False, "--force", is_flag=True, report=True,
                          help="Re-render renders that are already done, and kept takes whose "
                          "settings or model changed (old versions move to "
                          ".khala/superseded/).")
    only: tuple[str, ...] = _option(
        (), "--only", multiple=True, metavar="JOB_ID", report=True,
        help="Only these jobs (repeatable, or comma-separated).")
    shard: str | None = _option(
        None, "--shard", metavar="K/N|auto", help="Only shard K of N (K from 0). `auto` reads "
        "K and N from a Slurm job array or a Kubernetes Indexed Job (`auto/N` gives N). Every "
        "render belongs to exactly one shard, decided by its key.")
    devices: str = _option(
        "auto", "--devices", show_default=True, metavar="SPEC", report=True,
        help="auto (every visible GPU, else the CPU), cpu, cpu:N, or GPU ids like 0,1,3.")
    batch_size: int | None = _option(
        None, "--batch-size", type=click.IntRange(min=1), report=True,
        help="Takes rendered together, of one song or several: a job's seeds first, then "
        "other songs (default: from device memory; 1 on CPU).")
    residency: str | None = _option(
        None, "--residency", type=click.Choice(["keep_loaded", "one_shot"]), report=True,
        help="keep_loaded: all three models stay in memory; one_shot: one stage at a time "
        "(default: keep_loaded when they fit).")
    decode_path: str | None = _option(
        None, "--decode-path", type=click.Choice(list(DECODE_PATHS)), report=True,
        help="The backbone's decode step: eager, compile (torch.compile) or cuda_graphs "
        "(default: the fastest path proven equal to eager on the device, which is eager until "
        "make gpu-check proves another; khala doctor says which).")
    retries: int = _option(2, "--retries", type=click.IntRange(min=0), show_default=True,
                           report=True, help="Retries of a render whose worker crashed, hung "
                           "or ran out of memory.")
    stall_timeout: float = _option(
        600.0, "--stall-timeout", type=click.FloatRange(min=1.0), show_default=True,
        metavar="SECONDS", report=True,
        help="Replace a worker that reports no progress for this long.")
    grace: float = _option(
        60.0, "--grace", type=click.FloatRange(min=0.0), show_default=True, metavar="SECONDS",
        report=True, help="After the first Ctrl-C / SIGTERM, how long running renders may "
        "take to finish before their workers are stopped.")
    save_codes: bool | None = _option(
        None, "--save-codes/--no-save-codes", report=True, help="Keep each take's RVQ codes "
        "as <stem>.codes.npy (int16), or not (default: the manifest's `save_codes`, true "
        "unless it says false). Changes no render key: no take is rendered again for it.")
    max_renders: int = _option(
        MAX_RENDERS, "--max-renders", type=click.IntRange(min=1), show_default=True,
        help="Refuse manifests with more renders (jobs x seeds) than this.")
    quiet: bool = _option(False, "--quiet", "-q", is_flag=True,
                          help="No progress output; errors and a one-line summary only.")
    convert: bool = _option(False, "--convert", is_flag=True, help="If `model:` is a raw Khala "
                            "download, convert it first (once, into <download>-khala).")
    test_faults: str = _option("", "--test-faults", hidden=True,
                               help="TEST ONLY: worker failpoints (khala_cli/runner/faults.py).")
    test_fault_dir: str = _option("", "--test-fault-dir", hidden=True)

    def reported(self) -> dict[str, Any]:
        """The options the run report records."""
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v
                for f in fields(self) if f.metadata["report"]}

    def runner(self, model_dir: Path, output_dir: Path) -> RunOptions:
        """The runner's options: those of its fields that are also ours, and the paths (our
        output_dir is only the override of the manifest's)."""
        ours = {f.name for f in fields(self)} - {"output_dir"}
        shared = {f.name: getattr(self, f.name) for f in fields(RunOptions) if f.name in ours}
        return RunOptions(model_dir=str(model_dir), output_dir=str(output_dir), **shared)


def click_options(skip: tuple[str, ...] = ()) -> Callable[[Callable], Callable]:
    """The RenderOptions fields as click options, but those in `skip`."""
    def wrap(fn: Callable) -> Callable:
        for f in reversed(fields(RenderOptions)):
            if f.name not in skip:
                fn = click.option(*f.metadata["decls"], f.name, default=f.default,
                                  **f.metadata["click"])(fn)
        return fn
    return wrap


@cli.command()
@steps.MANIFEST_ARG
@click_options()
def render(manifest: Path, **given: Any) -> None:
    """Render every job x seed of MANIFEST that is not done yet.

    Resumes where the last run stopped: a take whose sidecar carries the same render key is
    skipped; a changed setting or model re-renders it, unless it is kept (`khala keep`).
    Replaced files move to <output_dir>/.khala/superseded/. Writes
    <output_dir>/<job>/<job>-s<seed>.wav|.mp3|.json and a run report under
    <output_dir>/reports/.
    """
    sys.exit(run(manifest, RenderOptions(**given)))


def run(manifest: Path, o: RenderOptions) -> int:
    """Check everything, render what is not done, write the report; the run's exit code."""
    m = steps.load_manifest(manifest, max_renders=o.max_renders, output_dir=o.output_dir,
                            model=o.model, quiet=o.quiet)
    return run_manifest(m, o, f"khala render {manifest}")


def run_manifest(m: Manifest, o: RenderOptions, label: str) -> int:
    """`run` for a loaded manifest (`khala reroll` and `extend` make theirs); `label` opens
    the run's first line."""
    started = datetime.now(timezone.utc)
    shard = steps.shard(o.shard)
    only = steps.only(m, o.only)
    n_devices = len(steps.devices(o.devices, o.decode_path))
    steps.codec_stack()
    model_dir, info = steps.model(m, convert=o.convert,
                                  announce=None if o.quiet else _echo_err)
    steps.ffmpeg()
    if info.demo:
        steps.warn(steps.DEMO_LINE)
    _make_output_dir(m.output_dir)
    with _writable(m.output_dir), steps.locked(m.output_dir, purpose="khala render",
                                               shard=shard, on_lost=_stop_self):
        p = steps.plan(m, info, force=o.force, only=only, shard=shard,
                       save_codes=o.save_codes, model_dir=model_dir)
        result = _execute(m, p, o, model_dir, n_devices, shard, label)
        if p.waiting and not (result.interrupted or result.no_space):
            p, result = _after_parents(m, p, result, o, (model_dir, info), n_devices, shard,
                                       label)
        run_info = rp.RunInfo(
            manifest=str(m.path), output_dir=str(m.output_dir),
            model=steps.model_dict(model_dir, info, m.model), started_at=started,
            finished_at=datetime.now(timezone.utc), interrupted=result.interrupted,
            device_busy_s=dict(result.device_busy_s or {}), shard=shard,
            no_space=result.no_space, options=o.reported(), excluded=p.excluded)
        return _finish(m, p, result, run_info, o.quiet)


def _after_parents(m: Manifest, p: Plan, result: RunResult, o: RenderOptions,
                   model: tuple[Path, Any], n_devices: int, shard: tuple[int, int] | None,
                   label: str) -> tuple[Plan, RunResult]:
    """The re-rolls and extensions that waited for their parent takes, planned now that the
    parents are on disk; the run's plan and result with theirs added."""
    waited = {job for job, _ in p.waiting}
    model_dir, info = model
    p2 = steps.plan(m, info, force=o.force, only=tuple(waited), shard=shard,
                    save_codes=o.save_codes, model_dir=model_dir, after_parents=True)
    r2 = _execute(m, p2, o, model_dir, n_devices, shard, label)
    plan = Plan(items=p.items + p2.items, excluded=p.excluded, shard=p.shard,
                waiting=p2.waiting)
    busy = dict(result.device_busy_s or {})
    for dev, s in (r2.device_busy_s or {}).items():
        busy[dev] = busy.get(dev, 0.0) + s
    return plan, RunResult(list(result.outcomes) + list(r2.outcomes), r2.interrupted, busy,
                           r2.no_space)


def _echo_err(text: str) -> None:
    click.echo(text, err=True)


def _make_output_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise Failure(steps.write_code(exc), f"error: cannot create the output directory {path}: "
                      f"{exc.strerror or exc}") from None


@contextlib.contextmanager
def _writable(out_dir: Path) -> Iterator[None]:
    """The lock or the output folder itself cannot be written: a clear error, not a trace."""
    try:
        yield
    except OSError as exc:
        raise Failure(steps.write_code(exc), f"error: cannot write in {out_dir}: "
                      f"{exc.strerror or exc} ({exc.filename or out_dir})") from None


def _stop_self() -> None:
    """The lock was taken from this run (it was silent too long): stop as on a SIGTERM."""
    os.kill(os.getpid(), signal.SIGTERM)


def _execute(m: Manifest, p: Plan, o: RenderOptions, model_dir: Path, n_devices: int,
             shard: tuple[int, int] | None, label: str) -> RunResult:
    """Render the plan's renders to do, showing the run as it goes."""
    shown, log = display.for_run(len(p.to_run), o.quiet)
    counts = p.counts()
    log.line(f"{label}: {len(p.items)} renders, {len(p.to_run)} to render "
             f"({counts['rerender']} re-render), {counts['skip']} already done; "
             f"~{p.minutes():.1f} audio minutes; output {m.output_dir}"
             + (f"; shard {shard[0]}/{shard[1]}" if shard else ""))
    _warn_disk(m.output_dir, p)
    if note := steps.kept_note(p, m.output_dir):
        steps.warn(note)
    _warn_faults(o)
    if not p.to_run:
        log.line("nothing to render: every planned render is already done"
                 + ("" if not p.items else " (use --force to render again)"))
        return RunResult([], False, {})
    seen: list[Any] = []

    def on_event(ev: Event) -> None:
        if isinstance(ev, Finished):
            seen.append(ev.outcome)
        shown.event(ev)

    shown.start()
    try:
        return run_renders(p.to_run, o.runner(model_dir, m.output_dir), on_event, p.passing())
    except DeviceError as exc:
        raise Failure(exit_codes.MODEL, f"error: {exc}") from None
    except KeyboardInterrupt:
        # The runner normally turns Ctrl-C into an orderly stop; this is the fallback.
        return RunResult(seen, True, {})
    finally:
        shown.stop()


def _warn_faults(o: RenderOptions) -> None:
    if o.test_faults:
        _echo_err(f"WARNING: TEST FAULTS ARE ACTIVE ({o.test_faults}): workers will crash, "
                  "hang or fail on purpose. This option is for khala's own tests only.")
    ignored = sorted(k for k in os.environ if k.startswith("KHALA_TEST_FAULT"))
    if ignored:
        steps.warn(f"ignoring {', '.join(ignored)} from the environment: test failpoints are "
                   "never taken from it")


def _finish(m: Manifest, p: Plan, result: RunResult, run_info: rp.RunInfo, quiet: bool) -> int:
    """Write the report and the review page, print the summary; the run's exit code."""
    rep = rp.build(p, list(result.outcomes), run_info)
    try:
        paths = rp.write(rep, m.output_dir, run_info.started_at, run_info.shard)
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
                   + "".join(f"; short: {u['job_id']} {rp.until_text(u)}"
                             for u in rp.short_of_passing(rep))
                   + f"; report {paths['json']}" + (f"; review page {page}" if page else ""))
    else:
        out = display.out_console()
        out.print(rp.summary_table(rep))
        out.print(f"report: {paths['json']} (and {paths['csv'].name}, "
                  f"{paths['latest_json'].name})")
        if page:
            out.print(f"review page: {page}")
    if p.waiting:
        steps.warn(steps.waiting_note(p.waiting, "render them once the parent renders: run "
                                      "the same command again"))
    if result.no_space:
        _echo_err(f"error: {_no_space_text(result.no_space, m.output_dir, p)}")
    return s["exit_code"]


# -- disk space ------------------------------------------------------------------------------


def _disk_need(p: Plan) -> tuple[int, int]:
    """(bytes the takes still to render need, bytes one take needs at most)."""
    sizes = [outputs.bytes_per_take(est_minutes(r), r.save_codes) for r in p.to_run]
    return sum(sizes), max(sizes, default=0)


def _free(path: Path) -> int:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return -1


def _warn_disk(output_dir: Path, p: Plan) -> None:
    need, _ = _disk_need(p)
    free = _free(output_dir)
    if 0 <= free < need:
        steps.warn(f"{output_dir} has {free / 1e6:,.0f} MB free, but the {len(p.to_run)} takes "
                   f"to render need about {need / 1e6:,.0f} MB (WAV + MP3 per audio minute); "
                   "the run stops when the disk is full")


def _no_space_text(no_space: dict, output_dir: Path, p: Plan) -> str:
    _, one = _disk_need(p)
    where = Path(no_space.get("path") or output_dir)  # the output disk, or .khala/work's
    where = where if where.is_dir() else where.parent
    return (f"the output disk refused a write: {no_space['error']}. {where} has "
            f"{max(0, _free(where)) / 1e6:,.1f} MB free; one take needs about "
            f"{one / 1e6:,.1f} MB. No more work was handed out. Free some space (or make the "
            "folder writable) and run the same command again: takes already rendered are "
            "written without rendering them again.")
