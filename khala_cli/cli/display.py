"""The two ways `khala render` shows a run: timestamped plain lines (logs, cron mail, pipes)
and a rich display on a terminal. Both read the runner's typed events."""

from __future__ import annotations

import time
from datetime import datetime, timezone

import click
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.progress import Progress as Bars

from khala_cli.runner.events import (
    Event,
    Finished,
    Interrupted,
    NoSpace,
    Outcome,
    Progress,
    WorkerChanged,
)

_PHASE_SPAN = {  # share of one render's work, for the overall bar
    "loading_backbone": (0.0, 0.0), "backbone": (0.0, 0.75), "loading_superres": (0.75, 0.75),
    "superres": (0.75, 0.95), "loading_decoder": (0.95, 0.95), "decoding": (0.95, 1.0),
}
_GONE = ("stopped", "died", "stalled", "failed", "oom")  # states that drop a worker's batch
INTERRUPT_TEXT = ("no new renders; running ones may finish for {grace:g} s (interrupt again to "
                  "stop at once)")
NO_SPACE_TEXT = "{error}: no more renders are handed out; running ones are kept under .khala/work"


def err_console() -> Console:
    return Console(stderr=True, highlight=False, soft_wrap=True)


def out_console() -> Console:
    return Console(highlight=False, soft_wrap=True)


def stamp() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


def fraction(ev: Progress) -> float:
    """How much of its batch's render a progress event stands for, 0..1."""
    lo, hi = _PHASE_SPAN.get(ev.phase, (0.0, 0.0))
    f = min(1.0, max(0.0, ev.done / ev.total)) if ev.total else 0.0
    return lo + (hi - lo) * f


def _rate(ev: Progress, unit: str) -> str:
    return f" {ev.tokens_per_s:.1f} {unit}" if ev.tokens_per_s else ""


def takes_label(takes: list[tuple[str, int]], most_songs: int | None = None) -> str:
    """(job, seed) pairs as "a s1,2 · b s5": every take named; with more than most_songs
    songs, just "N songs"."""
    by: dict[str, list[int]] = {}
    for job, seed in takes:
        by.setdefault(job, []).append(seed)
    if most_songs is not None and len(by) > most_songs:
        return f"{len(by)} songs"
    return " · ".join(f"{job} s{','.join(str(s) for s in seeds)}" for job, seeds in by.items())


def gate_text(o: Outcome) -> str:
    """How a rendered until take fared at its gates ("" for any other take)."""
    if o.passed is None:
        return ""
    return " (passes the gates)" if o.passed else \
        f" (fails the gates: {', '.join(o.gate_reasons)})"


BAR_SONGS = 3  # a worker's bar names up to this many songs of its batch, else "N songs"


class PlainLog:
    """Timestamped lines: phase changes, results, and a heartbeat per worker."""

    HEARTBEAT_S = 60.0

    def __init__(self, total: int, quiet: bool):
        self.total, self.quiet = total, quiet
        self.finished = 0
        self.phase: dict[int, tuple] = {}
        self.last: dict[int, float] = {}

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def line(self, text: str) -> None:
        if not self.quiet:
            click.echo(f"{stamp()} {text}", err=True)

    def event(self, ev: Event) -> None:
        match ev:
            case Interrupted():
                self.line("interrupted: " + INTERRUPT_TEXT.format(grace=ev.grace))
            case NoSpace():
                click.echo(f"{stamp()} error: " + NO_SPACE_TEXT.format(error=ev.error), err=True)
            case WorkerChanged():
                pid = f" (pid {ev.pid})" if ev.pid else ""
                why = f": {ev.error}" if ev.error else ""
                if ev.state == "busy" and ev.renders:
                    why = f": {' '.join(ev.renders)}" + (
                        f" (batches of {', '.join(str(n) for n in ev.batches)})"
                        if ev.batches else "")
                self.line(f"worker {ev.worker} ({ev.device}): {ev.state}{pid}{why}")
            case Progress():
                self._progress(ev)
            case Finished():
                self._finished(ev)

    def _progress(self, ev: Progress) -> None:
        state = (tuple(ev.takes()), ev.phase)
        now = time.monotonic()
        if (self.phase.get(ev.worker) == state
                and now - self.last.get(ev.worker, 0.0) < self.HEARTBEAT_S):
            return
        self.phase[ev.worker], self.last[ev.worker] = state, now
        rate = f" ({ev.tokens_per_s:.1f} tokens/s)" if ev.tokens_per_s else ""
        self.line(f"{ev.device}: {takes_label(ev.takes())} {ev.phase} "
                  f"{ev.done}/{ev.total}{rate}")

    def _finished(self, ev: Finished) -> None:
        self.finished += 1
        o, r = ev.outcome, ev.outcome.render
        tail = f" in {o.seconds:.1f}s on {o.device}" if o.status != "spare" else ""
        head = f"[{self.finished}/{self.total}] {o.status} {r.job_id} s{r.seed}{tail}"
        self.line(head + gate_text(o) if o.status == "rendered" else f"{head}: {o.error}")


class TtyProgress:
    """A rich display: the overall bar with ETA, and one line per worker."""

    def __init__(self, console: Console, total: int):
        self.console, self.total = console, total
        self.bars = Bars(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[note]}"), TimeElapsedColumn(), TextColumn("ETA"),
            TimeRemainingColumn(), console=console, transient=False, refresh_per_second=4)
        self.overall = self.bars.add_task("all renders", total=total, note="")
        self.workers: dict[int, int] = {}  # worker -> its bar
        self.partial: dict[int, tuple[list[tuple[str, int]], float]] = {}  # worker -> takes, f
        self.finished = 0
        self.failed = 0

    def start(self) -> None:
        self.bars.start()

    def stop(self) -> None:
        self._refresh_overall()
        self.bars.stop()

    def line(self, text: str) -> None:
        self.console.print(text)

    def event(self, ev: Event) -> None:
        match ev:
            case Interrupted():
                self.console.print("[yellow]interrupted[/yellow]: "
                                   + INTERRUPT_TEXT.format(grace=ev.grace))
            case NoSpace():
                self.console.print("[red]error[/red]: " + NO_SPACE_TEXT.format(error=ev.error))
            case WorkerChanged():
                self.bars.update(self._bar(ev.worker, ev.device), note=ev.state)
                if ev.state in _GONE:
                    self.partial.pop(ev.worker, None)
            case Progress():
                self._progress(ev)
            case Finished():
                self._finished(ev)

    def _bar(self, worker: int, device: str) -> int:
        if worker not in self.workers:
            self.workers[worker] = self.bars.add_task(f"  {device}", total=None, note="starting")
        return self.workers[worker]

    def _refresh_overall(self) -> None:
        partial = sum(f * len(takes) for takes, f in self.partial.values())
        done = min(float(self.total), self.finished + partial)
        note = f"[red]{self.failed} failed[/red]" if self.failed else ""
        self.bars.update(self.overall, completed=done, note=note)

    def _progress(self, ev: Progress) -> None:
        self.bars.update(self._bar(ev.worker, ev.device),
                         description=f"  {ev.device} {takes_label(ev.takes(), BAR_SONGS)}",
                         total=ev.total or None, completed=ev.done,
                         note=f"{ev.phase}{_rate(ev, 'tok/s')}")
        self.partial[ev.worker] = (ev.takes(), fraction(ev))
        self._refresh_overall()

    def _finished(self, ev: Finished) -> None:
        o = ev.outcome
        self.finished += 1
        if o.status == "failed":
            self.failed += 1
            self.console.print(f"[red]failed[/red] {o.render.job_id} s{o.render.seed}: {o.error}")
        done = (o.render.job_id, o.render.seed)
        for w, (takes, f) in list(self.partial.items()):
            if done in takes:
                rest = [t for t in takes if t != done]
                if rest:
                    self.partial[w] = (rest, f)
                else:
                    del self.partial[w]
        self._refresh_overall()


def for_run(total: int, quiet: bool) -> tuple[PlainLog | TtyProgress, PlainLog]:
    """(what shows the run's events, what prints the run's plain lines): the rich display on a
    terminal unless quiet; plain lines otherwise (none at all when quiet)."""
    err = err_console()
    tty = err.is_terminal and not quiet
    log = PlainLog(total, quiet=quiet or tty)
    return (TtyProgress(err, total) if tty else log), log
