"""The runner's rules, with no process in sight: events in, decisions out.

The policy holds the queue and every render's state, cuts the queue into batches and waves,
and decides what happens after each event the supervisor (pool.py) reports:

- a render's result: rendered; failed and retried (up to `retries` more times); failed at
  once when the output disk is full or read-only (no retry can help; no more work goes out);
- a worker lost mid-wave:
  - out of memory: the batch is halved; at batch 1 the device goes one_shot (these steps do
    not use up retries); out of memory in one_shot at batch 1 uses up a retry;
  - out of memory while loading: the device goes one_shot, or, already one_shot, the start
    counts as failed;
  - crashed or stalled: each render of the batch is retried alone (so a render that kills
    its worker does not take its batch-mates down) and the attempt counts;
  - cannot work at all (fatal): the device is given up and its renders go back to the queue;
- a worker that cannot start MAX_START_FAILURES times in a row: the device is given up; when
  every device is given up, what is left fails with the reasons;
- an interrupt: nothing more goes out, and what never finished is cancelled at the end;
- an until-job (renders carrying `until`): its renders are held back and released a batch
  (the largest live device's batch size) at a time, in seed order, each batch once the one
  before has finished; each rendered take's analysis is checked against the gates
  (`analysis.passes`), counted with the takes on disk that pass; once K pass, the held
  rest are spare: not rendered, not failed.
Timers: a busy worker silent for the stall timeout, a starting one not ready in time, and a
stopping one that does not exit are killed (`timer_kill`).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from khala_cli.analysis import passes
from khala_cli.plan import Render

MAX_START_FAILURES = 3  # consecutive failed starts on one device: the device is given up
ONE_SHOT_WAVE_BATCHES = 4  # batches per wave in one_shot residency
START_TIMEOUT = 600.0  # a starting worker may take this long (at least the stall timeout)
EXIT_WAIT = 30.0  # how long a stopped worker may take to exit before it is killed


class State(enum.Enum):
    PENDING = "pending"
    RUNNING = "running"
    RENDERED = "rendered"
    FAILED = "failed"
    CANCELLED = "cancelled"
    HELD = "held"  # an until-job's render, not released yet
    SPARE = "spare"  # an until-job's render left unrendered: enough of its takes pass


UNFINISHED = (State.PENDING, State.RUNNING, State.HELD)


@dataclass
class Item:
    id: int
    render: Render
    state: State = State.PENDING
    attempts: int = 0  # times handed to a worker
    failures: int = 0  # failed attempts that count against the retries
    batch_limit: int | None = None  # smaller batches after an OOM or a crash
    batch_len: int = 1  # size of the batch of the current attempt
    error: str | None = None
    seconds: float = 0.0
    device: str | None = None
    files: dict[str, str] = field(default_factory=dict)
    log: str | None = None
    resumed: bool = False
    group: tuple = field(default=(), repr=False)  # render.batch_group: the takes of one song
    roll: RollState | None = field(default=None, repr=False)  # its until-job's roll
    passed: bool | None = None  # an until take: whether it passes the gates
    gate_reasons: list[str] = field(default_factory=list)  # why it does not

    def __post_init__(self) -> None:
        self.group = self.render.batch_group


@dataclass
class RollState:
    """One until-job's roll: its renders in seed order, and the takes that pass."""

    wanted: int  # K
    passing: int  # passing takes: on disk before the run, and rendered since
    items: list[Item] = field(default_factory=list)

    @property
    def met(self) -> bool:
        return self.passing >= self.wanted


@dataclass
class Device:
    """What the policy knows of one device: how it renders, and whether it is given up."""

    index: int
    name: str
    residency: str
    batch_size: int
    start_failures: int = 0
    retired: str | None = None  # why this device is given up


@dataclass
class Lost:
    """A worker that ended while holding renders (or while starting)."""

    device: Device
    items: list[Item]
    ready: bool  # it had loaded the model
    reason: str  # how it ended (signal, exit code, kill reason)
    log: str
    oom: dict | None = None  # {"ids": [...], "error": ...}: it ran out of memory
    fatal: str | None = None  # it cannot work at all


class Policy:
    def __init__(self, renders: list[Render], devices: list[Device], retries: int,
                 passing: Mapping[str, int] | None = None):
        """`passing`: per until-job id, its takes on disk that pass (the plan counts them)."""
        self.items = [Item(i, r) for i, r in enumerate(renders)]
        self.devices: list[Device] = []
        self.retries = retries
        self.stopping = False  # an interrupt: nothing more goes out
        self.no_space: dict[str, str] | None = None  # the output disk refused a write
        self.finished: list[Item] = []  # outcomes decided since the last `take_finished`
        self.rolls: dict[str, RollState] = {}
        for it in self.items:
            if it.render.until is not None:
                job = it.render.job_id
                it.roll = self.rolls.setdefault(job, RollState(
                    int(it.render.until["passing"]), int((passing or {}).get(job, 0))))
                it.roll.items.append(it)
                it.state = State.HELD
        self.use_devices(devices)

    def use_devices(self, devices: list[Device]) -> None:
        """The devices to render on; an until-job's first batch is sized by them."""
        self.devices = devices
        for roll in self.rolls.values():
            self._roll_on(roll)

    # -- until-jobs ------------------------------------------------------------------------

    def _roll_on(self, roll: RollState) -> None:
        """Spare what a met roll holds; else, once its batch is over, release the next."""
        held = [it for it in roll.items if it.state is State.HELD]
        if roll.met:
            for it in held:
                self._finish(it, State.SPARE, f"not rendered: {roll.passing} of "
                                              f"{roll.wanted} takes pass")
            return
        live = self.live_devices()
        if not live or not self.handing_out() or any(
                it.state in (State.PENDING, State.RUNNING) for it in roll.items):
            return
        for it in held[:max(d.batch_size for d in live)]:
            it.state = State.PENDING

    # -- the queue -------------------------------------------------------------------------

    def pending(self) -> list[Item]:
        return [it for it in self.items if it.state is State.PENDING]

    def active(self) -> bool:
        return any(it.state in UNFINISHED for it in self.items)

    def live_devices(self) -> list[Device]:
        return [d for d in self.devices if not d.retired]

    def handing_out(self) -> bool:
        return not self.stopping and self.no_space is None

    def next_wave(self, dev: Device) -> list[list[Item]]:
        """The next wave for a device: batches of up to the device's batch size (or an item's
        smaller limit), packed from the whole queue in manifest order: a batch starts with
        the first pending render and its job's other pending seeds (a sweep stays
        together), then takes any other pending renders (other songs: the engine decodes
        rows of different songs together). One batch (several in one_shot), and no more
        than a fair share of what is pending. The items become RUNNING."""
        pending = self.pending()
        if not pending or not self.handing_out():
            return []
        max_batches = ONE_SHOT_WAVE_BATCHES if dev.residency == "one_shot" else 1
        fair = math.ceil(len(pending) / max(1, len(self.live_devices())))
        taken: set[int] = set()
        wave: list[list[Item]] = []
        count = 0
        for first in pending:
            if len(wave) >= max_batches or (wave and count >= fair):
                break
            if first.id in taken:
                continue
            limit = min(dev.batch_size, first.batch_limit or dev.batch_size, max(1, fair - count))
            batch = [first]
            taken.add(first.id)
            for other in sorted(pending, key=lambda o: o.group != first.group):
                if len(batch) >= limit:
                    break
                if other.id in taken or (other.batch_limit or limit) < limit:
                    continue
                batch.append(other)
                taken.add(other.id)
            wave.append(batch)
            count += len(batch)
        for batch in wave:
            for it in batch:
                it.state = State.RUNNING
                it.attempts += 1
                it.batch_len = len(batch)
                it.device = dev.name
        return wave

    # -- outcomes --------------------------------------------------------------------------

    def _finish(self, it: Item, state: State, error: str | None = None) -> None:
        it.state = state
        it.error = None if state is State.RENDERED else (error if error is not None else it.error)
        self.finished.append(it)
        if it.roll is not None and state is not State.SPARE:
            self._roll_on(it.roll)

    def take_finished(self) -> list[Item]:
        done, self.finished = self.finished, []
        return done

    def attempt_failed(self, it: Item, error: str, count: bool = True) -> None:
        if count:
            it.failures += 1
        it.error = error
        if self.stopping:
            it.state = State.PENDING  # cancelled at the end, with this error
        elif it.failures > self.retries:
            n = it.attempts
            self._finish(it, State.FAILED, f"{error} (after {n} attempt{'s' if n != 1 else ''})")
        else:
            it.state = State.PENDING

    def rendered(self, it: Item, seconds: float, files: dict[str, str],
                 analysis: Mapping[str, Any] | None = None) -> None:
        """A take is written; `analysis` (its flags and score) decides an until take."""
        it.seconds = seconds
        it.files = dict(files)
        if it.roll is not None:
            it.passed, it.gate_reasons = passes(analysis, it.render.until)
            it.roll.passing += int(it.passed)
        self._finish(it, State.RENDERED)

    def disk_refused(self, it: Item, error: str, path: str, kept: bool) -> None:
        """The output disk is full, over quota or read-only: no retry can help until a
        person acts, so the render fails now and nothing more goes out."""
        if self.no_space is None:
            self.no_space = {"path": path, "error": error}
        note = (" (the rendered take is kept: the next run writes it without rendering it "
                "again)") if kept else ""
        self._finish(it, State.FAILED, error + note)

    # -- devices and workers ---------------------------------------------------------------

    def start_failed(self, dev: Device, error: str) -> None:
        dev.start_failures += 1
        if dev.start_failures >= MAX_START_FAILURES:
            dev.retired = error

    def worker_ready(self, dev: Device) -> None:
        dev.start_failures = 0

    def worker_lost(self, lost: Lost) -> None:
        """Decide what becomes of a lost worker's renders and of its device."""
        if lost.oom is not None:
            self._out_of_memory(lost)
        elif lost.fatal is not None:
            lost.device.retired = f"{lost.fatal} (log: {lost.log})"
            for it in lost.items:
                it.state = State.PENDING
        else:
            if not lost.ready and not lost.items:
                self.start_failed(lost.device, f"{lost.reason} while starting (log: {lost.log})")
            for it in lost.items:
                it.log = lost.log
                if len(lost.items) > 1:
                    it.batch_limit = 1  # retry alone: find the render that kills its worker
                self.attempt_failed(it, lost.reason)

    def _out_of_memory(self, lost: Lost) -> None:
        dev, error = lost.device, (lost.oom or {}).get("error")
        oom_ids = set((lost.oom or {}).get("ids") or [])
        if not oom_ids and not lost.ready:  # out of memory while loading the models
            if dev.residency == "keep_loaded":
                dev.residency = "one_shot"
            else:
                self.start_failed(dev, f"out of memory loading the model: {error} "
                                       f"(log: {lost.log})")
        for it in lost.items:
            it.log = lost.log
            if it.id not in oom_ids:
                it.state = State.PENDING  # a batch-mate ran out of memory, not this one
            elif it.batch_len > 1:
                it.batch_limit = max(1, it.batch_len // 2)
                it.state = State.PENDING
            elif dev.residency == "keep_loaded":
                dev.residency = "one_shot"
                it.state = State.PENDING
            else:
                self.attempt_failed(it, f"out of memory: {error}")

    def no_device_left(self) -> None:
        """Every device is given up: what is pending fails with the reasons."""
        if self.live_devices():
            return
        error = "; ".join(f"{d.name}: {d.retired}" for d in self.devices)
        for it in [it for it in self.items if it.state in (State.PENDING, State.HELD)]:
            self._finish(it, State.FAILED, f"no device can render: {error}")

    def interrupt(self) -> None:
        self.stopping = True

    def cancel_the_rest(self) -> None:
        why = ("not started: the output disk is full or read-only" if self.no_space
               else "interrupted before it was rendered")
        for it in self.items:
            if it.state in UNFINISHED:
                self._finish(it, State.CANCELLED, it.error or why)


def timer_kill(*, now: float, busy: bool, ready: bool, last_heard: float, spawned: float,
               stop_deadline: float | None, stall_timeout: float) -> str | None:
    """Why a worker must be killed now, or None."""
    if busy and now - last_heard > stall_timeout:
        return f"stalled: no progress for {stall_timeout:g} s"
    limit = max(stall_timeout, START_TIMEOUT)
    if not ready and now - spawned > limit:
        return f"stalled: not ready after {limit:g} s"
    if stop_deadline is not None and now > stop_deadline:
        return "did not exit when asked to stop"
    return None
