"""The parent side of the runner: worker processes per device, the queue, retries, signals.

`run_renders(renders, options, on_event)` renders every given render (the caller decided
what to skip, and holds the run lock) and returns one Outcome per render, in order.

- One worker subprocess per device (`python -m khala_cli.runner.worker`), in its own
  process group (so a terminal's Ctrl-C reaches only the parent, which decides), with
  CUDA_VISIBLE_DEVICES naming its GPU (empty for CPU workers); stderr goes to a log file
  under <output_dir>/.khala/logs/. No torch here.
- The parent owns the queue. A worker asks for work and gets a wave: one batch (renders of
  one job differing only by seed, up to the device's batch size), or in one_shot residency
  several batches, each stage running over the whole wave before the models swap.
- A worker that exits, stays silent for `stall_timeout` while working, or reports out of
  memory is replaced. Its unfinished renders are retried: after an OOM with a smaller batch
  (halved), then, at batch 1, with the device in one_shot residency (these steps do not use
  up retries); after a crash or stall of a batch, one render at a time (so a render that
  kills its worker does not take its batch-mates down with it), up to `retries` more times;
  then they fail with the reason and the log path, and the run goes on.
- First SIGINT/SIGTERM: no new work; running waves finish within `grace` seconds; the
  result says interrupted. Second: workers are killed at once. Workers never outlive the
  parent: killed on the way out, SIGKILLed by the kernel if the parent dies
  (PR_SET_PDEATHSIG), and they exit when their stdin closes.
"""

from __future__ import annotations

import contextlib
import math
import os
import selectors
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from khala_cli.plan import Render
from khala_cli.runner import protocol
from khala_cli.runner.devices import DevicePlan, plan_devices

# ---------------------------------------------------------------------------------------
# The contract (docs/DESIGN.md)


@dataclass
class RunOptions:
    model_dir: str
    output_dir: str
    devices: str = "auto"  # auto | cpu | cpu:N | 0,1,3
    batch_size: int | None = None  # None: from device memory (1 on CPU)
    residency: str | None = None  # keep_loaded | one_shot | None (auto)
    retries: int = 2
    stall_timeout: float = 600.0
    grace: float = 60.0  # after the first Ctrl-C / SIGTERM


@dataclass
class Outcome:
    render: Render
    status: str  # rendered | failed | cancelled
    error: str | None = None
    seconds: float = 0.0
    device: str | None = None
    attempts: int = 0
    files: dict[str, str] = field(default_factory=dict)
    log: str | None = None


@dataclass
class RunResult:
    outcomes: list[Outcome]
    interrupted: bool
    device_busy_s: dict[str, float]


Event = Callable[[dict], None]

# How long a starting worker may take to import torch and load the model before it counts
# as stalled (never less than the stall timeout itself).
START_TIMEOUT = 600.0
MAX_START_FAILURES = 3  # consecutive failed starts on one device: the device is given up
ONE_SHOT_WAVE_BATCHES = 4  # batches per wave in one_shot residency
EXIT_WAIT = 30.0  # how long a stopped worker may take to exit before it is killed
KEEP_DAYS = 30  # worker logs and unused saved backbone tokens older than this are removed


# ---------------------------------------------------------------------------------------
# State


@dataclass
class _Item:
    id: int
    render: Render
    state: str = "pending"  # pending | running | rendered | failed | cancelled
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


@dataclass
class _Slot:
    index: int
    plan: DevicePlan
    residency: str
    batch_size: int
    generation: int = 0
    start_failures: int = 0
    retired: str | None = None  # why this device is given up
    busy_s: float = 0.0
    worker: _Worker | None = None

    @property
    def name(self) -> str:
        return self.plan.device.name


@dataclass
class _Worker:
    slot: _Slot
    proc: Any
    log_path: Path
    spawned: float
    state: str = "starting"  # starting | idle | busy | stopping | dead
    pid: int = 0
    buf: protocol.LineBuffer = field(default_factory=protocol.LineBuffer)
    last_heard: float = 0.0
    wants: bool = False
    wave: int | None = None
    wave_started: float = 0.0
    inflight: dict[int, _Item] = field(default_factory=dict)
    oom: dict | None = None
    fatal: str | None = None
    kill_reason: str | None = None
    stop_sent: bool = False
    stop_deadline: float = 0.0
    ready: bool = False


def _now() -> float:
    return time.monotonic()


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "worker did not exit"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"worker killed by {name}"
    return f"worker exited with code {code}"


class Pool:
    def __init__(self, renders: list[Render], options: RunOptions, on_event: Event | None):
        self.options = options
        self.on_event = on_event or (lambda e: None)
        # Two jobs with the same settings share a render key (not their files): items are
        # told apart by their index.
        self.items = [_Item(i, r) for i, r in enumerate(renders)]
        stems = [(r.out_dir, r.stem) for r in renders]
        if len(set(stems)) != len(stems):
            raise ValueError("run_renders: two renders would write the same files")
        self.output_dir = Path(options.output_dir).resolve()
        self.khala_dir = self.output_dir / ".khala"
        self.log_dir = self.khala_dir / "logs"
        self.run_id = (datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
                       + f"-{os.getpid()}")
        self.slots: list[_Slot] = []
        self.sel = selectors.DefaultSelector()
        self.wave_seq = 0
        self.signals = 0
        self.stopping = False
        self.deadline: float | None = None
        self.interrupted = False

    # -- events ----------------------------------------------------------------------------

    def _emit(self, event: dict) -> None:
        self.on_event(event)

    def _worker_event(self, w: _Worker, state: str, **extra: Any) -> None:
        self._emit({"type": "worker", "worker": w.slot.index, "device": w.slot.name,
                    "state": state, "pid": w.pid, "log": str(w.log_path), **extra})

    def _outcome(self, it: _Item) -> Outcome:
        return Outcome(render=it.render, status=it.state, error=it.error,
                       seconds=round(it.seconds, 3), device=it.device,
                       attempts=it.attempts, files=dict(it.files), log=it.log)

    def _finish(self, it: _Item, state: str, error: str | None = None) -> None:
        it.state = state
        if error is not None:
            it.error = error
        if state == "rendered":
            it.error = None
        self._emit({"type": "result", "outcome": self._outcome(it), "resumed": it.resumed})

    # -- workers ---------------------------------------------------------------------------

    def _spawn(self, slot: _Slot) -> None:
        slot.generation += 1
        dev = slot.plan.device
        self.log_dir.mkdir(parents=True, exist_ok=True)
        safe = dev.name.replace(":", "")
        log_path = self.log_dir / f"{self.run_id}-{safe}-{slot.generation}.log"
        # CPU workers share the cores; a GPU worker needs few (tokenizing, MP3 encoding).
        threads = max(1, (os.cpu_count() or 1) // max(1, len(self.slots)))
        cmd = [sys.executable, "-m", "khala_cli.runner.worker",
               "--model-dir", str(self.options.model_dir),
               "--output-dir", str(self.output_dir),
               "--device", "cuda" if dev.kind == "cuda" else "cpu",
               "--label", dev.name, "--residency", slot.residency,
               "--threads", str(threads), "--parent-pid", str(os.getpid())]
        env = dict(os.environ)
        env.update(dev.env)
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
        env["PYTHONUNBUFFERED"] = "1"
        if threads:
            env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
        pkg_root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (pkg_root, env.get("PYTHONPATH", "")) if p)
        import subprocess

        with open(log_path, "ab") as log:
            log.write(f"# khala worker {dev.name} #{slot.generation}, run {self.run_id}, "
                      f"{datetime.now(timezone.utc).isoformat(timespec='seconds')}\n"
                      f"# {' '.join(cmd)}\n".encode())
            log.flush()
            try:
                proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=log, env=env, start_new_session=True,
                                        close_fds=True)
            except OSError as exc:
                log.write(f"# cannot start the worker: {exc}\n".encode())
                self._start_failed(slot, f"cannot start a worker: {exc} (log: {log_path})")
                return
        now = _now()
        w = _Worker(slot=slot, proc=proc, log_path=log_path, spawned=now, pid=proc.pid,
                    last_heard=now)
        slot.worker = w
        self.sel.register(proc.stdout, selectors.EVENT_READ, w)
        self._worker_event(w, "starting", residency=slot.residency,
                           batch_size=slot.batch_size)

    def _send(self, w: _Worker, msg: dict) -> bool:
        try:
            w.proc.stdin.write(protocol.encode(msg))
            w.proc.stdin.flush()
            return True
        except (BrokenPipeError, OSError, ValueError):
            return False  # it is dying; its EOF is handled by the loop

    def _kill(self, w: _Worker, reason: str | None = None) -> None:
        if reason and not w.kill_reason:
            w.kill_reason = reason
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(w.proc.pid, signal.SIGKILL)  # the worker and anything it started
        with contextlib.suppress(ProcessLookupError):
            w.proc.kill()

    def _stop(self, w: _Worker) -> None:
        if not w.stop_sent:
            w.stop_sent = True
            w.state = "stopping"
            self._send(w, {"type": "stop"})
            w.stop_deadline = _now() + EXIT_WAIT

    # -- the queue -------------------------------------------------------------------------

    def _pending(self) -> list[_Item]:
        return [it for it in self.items if it.state == "pending"]

    def _live_slots(self) -> list[_Slot]:
        return [s for s in self.slots if not s.retired]

    def _next_wave(self, slot: _Slot) -> list[list[_Item]]:
        pending = self._pending()
        if not pending:
            return []
        max_batches = ONE_SHOT_WAVE_BATCHES if slot.residency == "one_shot" else 1
        fair = math.ceil(len(pending) / max(1, len(self._live_slots())))
        taken: set[int] = set()
        wave: list[list[_Item]] = []
        count = 0
        for first in pending:
            if len(wave) >= max_batches or (wave and count >= fair):
                break
            if id(first) in taken:
                continue
            limit = min(slot.batch_size, first.batch_limit or slot.batch_size,
                        max(1, fair - count))
            group = first.render.batch_group
            batch = [first]
            taken.add(id(first))
            for other in pending:
                if len(batch) >= limit:
                    break
                if id(other) in taken or other.render.batch_group != group:
                    continue
                if (other.batch_limit or limit) < limit:
                    continue
                batch.append(other)
                taken.add(id(other))
            wave.append(batch)
            count += len(batch)
        return wave

    def _dispatch(self, w: _Worker) -> bool:
        wave = self._next_wave(w.slot)
        if not wave:
            return False
        self.wave_seq += 1
        w.wave = self.wave_seq
        now = _now()
        w.wave_started = now
        w.last_heard = now
        for batch in wave:
            for it in batch:
                it.state = "running"
                it.attempts += 1
                it.batch_len = len(batch)
                it.device = w.slot.name
                it.log = str(w.log_path)
                w.inflight[it.id] = it
        msg = {"type": "work", "wave": w.wave,
               "batches": [[{"id": it.id, "render": it.render.to_dict()} for it in b]
                           for b in wave]}
        w.state = "busy"
        w.wants = False
        self._worker_event(w, "busy", wave=w.wave,
                           renders=[it.render.stem for b in wave for it in b],
                           batches=[len(b) for b in wave])
        self._send(w, msg)
        return True

    # -- messages --------------------------------------------------------------------------

    def _on_message(self, w: _Worker, msg: dict) -> None:
        now = _now()
        w.last_heard = now
        kind = msg["type"]
        if kind == "hello":
            w.pid = int(msg.get("pid") or w.pid)
            self._worker_event(w, "loading")
        elif kind == "ready":
            w.ready = True
            w.slot.start_failures = 0
            w.state = "idle"
            self._worker_event(w, "ready", label=msg.get("device"))
        elif kind == "want":
            w.wants = True
            if w.state == "busy":
                w.state = "idle"
        elif kind == "progress":
            self._emit({"type": "progress", "worker": w.slot.index, "device": w.slot.name,
                        "job_id": msg.get("job_id"), "seeds": msg.get("seeds") or [],
                        "phase": msg.get("phase"), "done": msg.get("done"),
                        "total": msg.get("total"), "tokens_per_s": msg.get("tokens_per_s")})
        elif kind == "result":
            try:
                it = w.inflight.pop(int(msg.get("id")), None)
            except (TypeError, ValueError):
                it = None
            if it is None:
                return
            secs = float(msg.get("seconds") or 0.0)
            it.seconds += secs
            it.resumed = it.resumed or bool(msg.get("resumed"))
            if msg.get("status") == "rendered":
                it.seconds = secs
                it.files = {k: str(v) for k, v in (msg.get("files") or {}).items()}
                self._finish(it, "rendered")
            else:
                self._attempt_failed(it, str(msg.get("error") or "render failed"),
                                     count=True)
        elif kind == "wave_done":
            self._wave_over(w)
        elif kind == "oom":
            w.oom = msg
        elif kind == "fatal":
            w.fatal = str(msg.get("error") or "worker failed")

    def _wave_over(self, w: _Worker) -> None:
        if w.wave is not None:
            w.slot.busy_s += _now() - w.wave_started
        w.wave = None
        if w.state == "busy":
            w.state = "idle"

    def _attempt_failed(self, it: _Item, error: str, count: bool) -> None:
        if count:
            it.failures += 1
        it.error = error
        if self.stopping:
            it.state = "pending"  # cancelled at the end, with this error
        elif it.failures > self.options.retries:
            # the worker's log is in the outcome's `log`
            n = it.attempts
            self._finish(it, "failed", f"{error} (after {n} attempt{'s' if n != 1 else ''})")
        else:
            it.state = "pending"

    # -- worker exits ----------------------------------------------------------------------

    def _on_exit(self, w: _Worker) -> None:
        with contextlib.suppress(Exception):
            self.sel.unregister(w.proc.stdout)
        try:
            code = w.proc.wait(timeout=EXIT_WAIT)
        except Exception:  # noqa: BLE001 - closed its stdout but lingers
            self._kill(w)
            code = w.proc.wait()
        with contextlib.suppress(Exception):
            w.proc.stdout.close()
        with contextlib.suppress(Exception):
            w.proc.stdin.close()
        slot = w.slot
        self._wave_over(w)
        w.state = "dead"
        slot.worker = None
        lost = list(w.inflight.values())
        w.inflight.clear()
        log = str(w.log_path)

        if w.oom is not None:
            self._worker_event(w, "oom", error=w.oom.get("error"))
            oom_ids = set(w.oom.get("ids") or [])
            if not oom_ids and not w.ready:  # out of memory while loading the models
                if slot.residency == "keep_loaded":
                    slot.residency = "one_shot"
                else:
                    self._start_failed(slot, f"out of memory loading the model: "
                                             f"{w.oom.get('error')} (log: {log})")
            for it in lost:
                it.log = log
                if it.id not in oom_ids:
                    it.state = "pending"  # a batch-mate ran out of memory, not this one
                elif it.batch_len > 1:
                    it.batch_limit = max(1, it.batch_len // 2)
                    it.state = "pending"
                elif slot.residency == "keep_loaded":
                    slot.residency = "one_shot"
                    it.state = "pending"
                else:
                    self._attempt_failed(it, f"out of memory: {w.oom.get('error')}", count=True)
            return
        if w.fatal is not None:
            self._worker_event(w, "failed", error=w.fatal)
            slot.retired = f"{w.fatal} (log: {log})"
            for it in lost:
                it.state = "pending"
            return
        if w.stop_sent and not lost and not w.kill_reason:
            self._worker_event(w, "stopped", exit_code=code)
            return
        reason = w.kill_reason or _describe_exit(code)
        self._worker_event(w, "stalled" if w.kill_reason and "stall" in w.kill_reason else "died",
                           reason=reason, exit_code=code)
        if not w.ready and not lost:
            self._start_failed(slot, f"{reason} while starting (log: {log})")
        for it in lost:
            it.log = log
            if len(lost) > 1:
                it.batch_limit = 1  # retry alone: find the render that kills its worker
            self._attempt_failed(it, reason, count=True)

    def _start_failed(self, slot: _Slot, error: str) -> None:
        slot.start_failures += 1
        if slot.start_failures >= MAX_START_FAILURES:
            slot.retired = error

    # -- signals ---------------------------------------------------------------------------

    def _on_signal(self, signum, frame) -> None:  # noqa: ARG002
        self.signals += 1

    def _begin_stop(self) -> None:
        self.stopping = True
        self.interrupted = True
        self.deadline = _now() + max(0.0, float(self.options.grace))
        self._emit({"type": "interrupt", "grace": float(self.options.grace)})
        for s in self.slots:
            if s.worker:
                # busy workers finish their wave (within the grace period) and then stop
                self._worker_event(s.worker, "stopping", grace=float(self.options.grace))
                if s.worker.state != "busy":
                    self._stop(s.worker)

    def _kill_all(self, reason: str) -> None:
        for s in self.slots:
            if s.worker and s.worker.state != "dead":
                self._kill(s.worker, reason)

    # -- the loop --------------------------------------------------------------------------

    def _active(self) -> bool:
        return any(it.state in ("pending", "running") for it in self.items)

    def _alive(self) -> list[_Worker]:
        return [s.worker for s in self.slots if s.worker is not None]

    def _read(self, timeout: float) -> None:
        if not self.sel.get_map():
            time.sleep(timeout)
            return
        for key, _ in self.sel.select(timeout):
            w: _Worker = key.data
            try:
                data = os.read(key.fd, 65536)
            except OSError:
                data = b""
            if data:
                try:
                    lines = w.buf.feed(data)
                except protocol.ProtocolError as exc:
                    self._kill(w, f"protocol error: {exc}")
                    lines = []
                for line in lines:
                    try:
                        msg = protocol.decode(line, protocol.FROM_WORKER)
                    except protocol.ProtocolError as exc:
                        self._kill(w, f"protocol error: {exc}")
                        break
                    self._on_message(w, msg)
            else:
                self._on_exit(w)

    def _check_timers(self) -> None:
        now = _now()
        stall = float(self.options.stall_timeout)
        for w in self._alive():
            if w.kill_reason:
                continue
            if w.state == "busy" and now - w.last_heard > stall:
                self._kill(w, f"stalled: no progress for {stall:g} s")
            elif not w.ready and now - w.spawned > max(stall, START_TIMEOUT):
                self._kill(w, f"stalled: not ready after {max(stall, START_TIMEOUT):g} s")
            elif w.stop_sent and now > w.stop_deadline:
                self._kill(w, "did not exit when asked to stop")
        if self.deadline is not None and now > self.deadline:
            self._kill_all("interrupted: grace period over")
            self.deadline = None

    def _step(self) -> None:
        if self.signals and not self.stopping:
            self._begin_stop()
        if self.signals >= 2:
            self._kill_all("interrupted")
        if not self.stopping:
            live = self._live_slots()
            if not live:
                error = "; ".join(f"{s.name}: {s.retired}" for s in self.slots)
                for it in self._pending():
                    self._finish(it, "failed", f"no device can render: {error}")
            for s in live:
                if s.worker is None and self._pending():
                    self._spawn(s)
            for w in self._alive():
                if w.wants and w.state == "idle" and not w.stop_sent:
                    if not self._dispatch(w) and not self._active():
                        self._stop(w)
        else:
            for w in self._alive():
                if w.state != "busy" and not w.stop_sent:
                    self._stop(w)
        self._read(0.2)
        self._check_timers()

    def run(self) -> RunResult:
        if not self.items:
            return RunResult([], False, {})
        plans = plan_devices(self.options.devices, self.options.model_dir,
                             self.options.batch_size, self.options.residency)
        self.slots = [_Slot(i, p, p.residency, p.batch_size) for i, p in enumerate(plans)]
        self._sweep()

        in_main = threading.current_thread() is threading.main_thread()
        old = {}
        if in_main:
            for sig in (signal.SIGINT, signal.SIGTERM):
                old[sig] = signal.signal(sig, self._on_signal)
        try:
            while True:
                if self.stopping:
                    if not self._alive():
                        break
                elif not self._active() and not self._alive():
                    break
                self._step()
        finally:
            self._kill_all("run ended")
            for w in self._alive():
                self._on_exit(w)
            for sig, handler in old.items():
                signal.signal(sig, handler)
            self.sel.close()
        for it in self.items:
            if it.state in ("pending", "running"):
                self._finish(it, "cancelled", it.error or "interrupted before it was rendered")
        return RunResult(outcomes=[self._outcome(it) for it in self.items],
                         interrupted=self.interrupted,
                         device_busy_s={s.name: round(s.busy_s, 3) for s in self.slots})

    def _sweep(self) -> None:
        """Remove temporary files a killed earlier run left (we hold the lock: none is live),
        and logs and saved tokens older than KEEP_DAYS (renders whose settings changed)."""
        from khala_cli.outputs import temp_files

        dirs = {Path(it.render.out_dir) for it in self.items} | {self.khala_dir / "work"}
        for d in dirs:
            if d.is_dir():
                for p in temp_files(d):
                    with contextlib.suppress(OSError):
                        p.unlink()
        old = time.time() - KEEP_DAYS * 86400
        for d, pattern in ((self.log_dir, "*.log"), (self.khala_dir / "work", "*.q01.npy")):
            if d.is_dir():
                for p in d.glob(pattern):
                    with contextlib.suppress(OSError):
                        if p.stat().st_mtime < old:
                            p.unlink()


def run_renders(renders: list[Render], options: RunOptions,
                on_event: Event | None = None) -> RunResult:
    """Render `renders` on the devices of `options`; one Outcome per render, in order.

    Raises DeviceError (devices.py) before starting anything when the devices cannot be
    had. The caller holds the output directory's RunLock.
    """
    return Pool(list(renders), options, on_event).run()
