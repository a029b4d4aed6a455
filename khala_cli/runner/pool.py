"""The runner's supervisor: worker processes per device, their pipes, kills and signals.

`run_renders(renders, options, on_event)` renders every given render (the caller decided
what to skip, and holds the run lock) and returns one Outcome per render, in order.

- One worker subprocess per device (`python -m khala_cli.runner.worker`), in its own
  process group (so a terminal's Ctrl-C reaches only the parent, which decides), with
  CUDA_VISIBLE_DEVICES naming its GPU (empty for CPU workers); stderr goes to a log file
  under <output_dir>/.khala/logs/. No torch here.
- Every decision (the queue, batches and waves, retries, out-of-memory steps, stalls, a full
  disk, cancels) is the policy's (policy.py): the supervisor tells it what happened and
  carries out what it decided.
- First SIGINT/SIGTERM/SIGHUP: no new work; running waves finish within `grace` seconds; the
  result says interrupted. Second: workers are killed at once. Workers ignore these signals
  (Slurm and systemd send SIGTERM to every process of a job: it must not kill them before
  their grace); the parent kills them with SIGKILL. Workers never outlive the
  parent: killed on the way out, SIGKILLed by the kernel if the parent dies
  (PR_SET_PDEATHSIG), and they exit when their stdin closes.
- Test-only failpoints reach the workers only from `RunOptions.test_faults` (faults.py);
  none is taken from the environment.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from khala_cli.outputs import temp_files
from khala_cli.plan import Render
from khala_cli.runner import protocol
from khala_cli.runner.devices import DevicePlan, plan_devices
from khala_cli.runner.events import (
    Finished,
    Interrupted,
    NoSpace,
    OnEvent,
    Outcome,
    Progress,
    WorkerChanged,
)
from khala_cli.runner.policy import EXIT_WAIT, Device, Item, Lost, Policy, timer_kill
from khala_cli.runner.worker import kept_path, q01_stats_path, work_path

# ---------------------------------------------------------------------------------------
# The contract (docs/DESIGN.md)


@dataclass
class RunOptions:
    model_dir: str
    output_dir: str
    devices: str = "auto"  # auto | cpu | cpu:N | 0,1,3
    batch_size: int | None = None  # None: from device memory (1 on CPU)
    residency: str | None = None  # keep_loaded | one_shot | None (auto)
    decode_path: str | None = None  # eager | compile | cuda_graphs | None (auto)
    retries: int = 2
    stall_timeout: float = 600.0
    grace: float = 60.0  # after the first Ctrl-C / SIGTERM / SIGHUP
    test_faults: str = ""  # TEST ONLY: failpoints for the workers (runner/faults.py)
    test_fault_dir: str = ""


@dataclass
class RunResult:
    outcomes: list[Outcome]
    interrupted: bool
    device_busy_s: dict[str, float]
    no_space: dict[str, str] | None = None  # {path, error}: a full or read-only output disk


KEEP_DAYS = 30  # worker logs and unused saved backbone tokens older than this are removed


@dataclass
class _Slot:
    device: Device
    plan: DevicePlan
    generation: int = 0
    busy_s: float = 0.0
    worker: _Worker | None = None

    @property
    def name(self) -> str:
        return self.device.name


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
    inflight: dict[int, Item] = field(default_factory=dict)
    oom: dict | None = None
    fatal: str | None = None
    kill_reason: str | None = None
    stop_sent: bool = False
    stop_deadline: float | None = None
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
    def __init__(self, renders: list[Render], options: RunOptions, on_event: OnEvent | None,
                 passing: dict[str, int] | None = None):
        self.options = options
        self.on_event = on_event or (lambda e: None)
        stems = [(r.out_dir, r.stem) for r in renders]
        if len(set(stems)) != len(stems):
            raise ValueError("run_renders: two renders would write the same files")
        # Two jobs with the same settings share a render key (not their files): items are
        # told apart by their index.
        self.policy = Policy(list(renders), [], options.retries, passing)
        self.output_dir = Path(options.output_dir).resolve()
        self.khala_dir = self.output_dir / ".khala"
        self.log_dir = self.khala_dir / "logs"
        self.run_id = (datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
                       + f"-{os.getpid()}")
        self.slots: list[_Slot] = []
        self.sel = selectors.DefaultSelector()
        self.wave_seq = 0
        self.signals = 0
        self.deadline: float | None = None
        self.interrupted = False
        self.no_space_told = False

    # -- events ----------------------------------------------------------------------------

    def _worker_event(self, w: _Worker, state: str, **detail: Any) -> None:
        self.on_event(WorkerChanged(worker=w.slot.device.index, device=w.slot.name,
                                    state=state, pid=w.pid, log=str(w.log_path), **detail))

    @staticmethod
    def _outcome(it: Item) -> Outcome:
        return Outcome(render=it.render, status=it.state.value, error=it.error,
                       seconds=round(it.seconds, 3), device=it.device,
                       attempts=it.attempts, files=dict(it.files), log=it.log,
                       passed=it.passed, gate_reasons=tuple(it.gate_reasons))

    def _flush(self) -> None:
        """Report the outcomes the policy has decided."""
        for it in self.policy.take_finished():
            self.on_event(Finished(self._outcome(it), resumed=bool(it.resumed)))
        if self.policy.no_space and not self.no_space_told:
            self.no_space_told = True
            self.on_event(NoSpace(**self.policy.no_space))

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
               "--label", dev.name, "--residency", slot.device.residency,
               "--decode-path", slot.plan.decode_path,
               "--threads", str(threads), "--parent-pid", str(os.getpid())]
        if self.options.test_faults:
            cmd += ["--test-faults", self.options.test_faults]
            if self.options.test_fault_dir:
                cmd += ["--test-fault-dir", self.options.test_fault_dir]
        # Failpoints come only from the options, never from the environment (faults.py).
        env = {k: v for k, v in os.environ.items() if not k.startswith("KHALA_TEST_FAULT")}
        env.update(dev.env)
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
        env["PYTHONUNBUFFERED"] = "1"
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
        pkg_root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (pkg_root, env.get("PYTHONPATH", "")) if p)
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
                self.policy.start_failed(slot.device, f"cannot start a worker: {exc} "
                                                      f"(log: {log_path})")
                return
        now = _now()
        w = _Worker(slot=slot, proc=proc, log_path=log_path, spawned=now, pid=proc.pid,
                    last_heard=now)
        slot.worker = w
        self.sel.register(proc.stdout, selectors.EVENT_READ, w)
        self._worker_event(w, "starting", residency=slot.device.residency)

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

    def _dispatch(self, w: _Worker) -> bool:
        wave = self.policy.next_wave(w.slot.device)
        if not wave:
            return False
        self.wave_seq += 1
        w.wave = self.wave_seq
        now = _now()
        w.wave_started = w.last_heard = now
        for it in (it for b in wave for it in b):
            it.log = str(w.log_path)
            w.inflight[it.id] = it
        msg = {"type": "work", "wave": w.wave,
               "batches": [[{"id": it.id, "render": it.render.to_dict()} for it in b]
                           for b in wave]}
        w.state = "busy"
        w.wants = False
        self._worker_event(w, "busy", renders=tuple(it.render.stem for b in wave for it in b),
                           batches=tuple(len(b) for b in wave))
        self._send(w, msg)
        return True

    # -- messages --------------------------------------------------------------------------

    def _on_message(self, w: _Worker, msg: dict) -> None:
        w.last_heard = _now()
        kind = msg["type"]
        if kind == "hello":
            w.pid = int(msg.get("pid") or w.pid)
            self._worker_event(w, "loading")
        elif kind == "ready":
            w.ready = True
            self.policy.worker_ready(w.slot.device)
            w.state = "idle"
            self._worker_event(w, "ready")
        elif kind == "want":
            w.wants = True
            if w.state == "busy":
                w.state = "idle"
        elif kind == "progress":
            self.on_event(Progress(
                worker=w.slot.device.index, device=w.slot.name, job_id=str(msg.get("job_id")),
                seeds=tuple(msg.get("seeds") or ()), jobs=tuple(msg.get("jobs") or ()),
                phase=str(msg.get("phase")),
                done=int(msg.get("done") or 0), total=int(msg.get("total") or 0),
                tokens_per_s=msg.get("tokens_per_s")))
        elif kind == "result":
            self._on_result(w, msg)
        elif kind == "wave_done":
            self._wave_over(w)
        elif kind == "oom":
            w.oom = msg
        elif kind == "fatal":
            w.fatal = str(msg.get("error") or "worker failed")

    def _on_result(self, w: _Worker, msg: dict) -> None:
        try:
            it = w.inflight.pop(int(msg.get("id")), None)
        except (TypeError, ValueError):
            it = None
        if it is None:
            return
        secs = float(msg.get("seconds") or 0.0)
        it.seconds += secs
        it.resumed = it.resumed or bool(msg.get("resumed"))
        error = str(msg.get("error") or "render failed")
        if msg.get("status") == "rendered":
            self.policy.rendered(it, secs, {k: str(v) for k, v in (msg.get("files") or {}).items()},
                                 msg.get("analysis"))
        elif msg.get("no_space"):
            self.policy.disk_refused(it, error, str(msg.get("path") or ""), bool(msg.get("kept")))
        else:
            self.policy.attempt_failed(it, error)
        self._flush()

    def _wave_over(self, w: _Worker) -> None:
        if w.wave is not None:
            w.slot.busy_s += _now() - w.wave_started
        w.wave = None
        if w.state == "busy":
            w.state = "idle"

    # -- worker exits ----------------------------------------------------------------------

    def _reap(self, w: _Worker) -> int | None:
        with contextlib.suppress(Exception):
            self.sel.unregister(w.proc.stdout)
        try:
            code = w.proc.wait(timeout=EXIT_WAIT)
        except Exception:  # noqa: BLE001 - closed its stdout but lingers
            self._kill(w)
            code = w.proc.wait()
        for f in (w.proc.stdout, w.proc.stdin):
            with contextlib.suppress(Exception):
                f.close()
        return code

    def _on_exit(self, w: _Worker) -> None:
        code = self._reap(w)
        self._wave_over(w)
        w.state = "dead"
        w.slot.worker = None
        items = list(w.inflight.values())
        w.inflight.clear()
        reason = w.kill_reason or _describe_exit(code)
        lost = Lost(device=w.slot.device, items=items, ready=w.ready, reason=reason,
                    log=str(w.log_path), oom=w.oom, fatal=w.fatal)
        if w.oom is not None:
            self._worker_event(w, "oom", error=w.oom.get("error"))
        elif w.fatal is not None:
            self._worker_event(w, "failed", error=w.fatal)
        elif w.stop_sent and not items and not w.kill_reason:
            self._worker_event(w, "stopped")
            return
        else:
            stalled = bool(w.kill_reason and "stall" in w.kill_reason)
            self._worker_event(w, "stalled" if stalled else "died", error=reason)
        self.policy.worker_lost(lost)
        self._flush()

    # -- signals ---------------------------------------------------------------------------

    def _on_signal(self, signum, frame) -> None:  # noqa: ARG002
        self.signals += 1

    def _begin_stop(self) -> None:
        self.policy.interrupt()
        self.interrupted = True
        self.deadline = _now() + max(0.0, float(self.options.grace))
        self.on_event(Interrupted(grace=float(self.options.grace)))
        for s in self.slots:
            if s.worker:
                # busy workers finish their wave (within the grace period) and then stop
                self._worker_event(s.worker, "stopping")
                if s.worker.state != "busy":
                    self._stop(s.worker)

    def _kill_all(self, reason: str) -> None:
        for s in self.slots:
            if s.worker and s.worker.state != "dead":
                self._kill(s.worker, reason)

    # -- the loop --------------------------------------------------------------------------

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
            if not data:
                self._on_exit(w)
                continue
            try:
                for line in w.buf.feed(data):
                    self._on_message(w, protocol.decode(line, protocol.FROM_WORKER))
            except protocol.ProtocolError as exc:
                self._kill(w, f"protocol error: {exc}")

    def _check_timers(self) -> None:
        now = _now()
        for w in self._alive():
            if w.kill_reason:
                continue
            why = timer_kill(now=now, busy=w.state == "busy", ready=w.ready,
                             last_heard=w.last_heard, spawned=w.spawned,
                             stop_deadline=w.stop_deadline if w.stop_sent else None,
                             stall_timeout=float(self.options.stall_timeout))
            if why:
                self._kill(w, why)
        if self.deadline is not None and now > self.deadline:
            self._kill_all("interrupted: grace period over")
            self.deadline = None

    def _step(self) -> None:
        if self.signals and not self.policy.stopping:
            self._begin_stop()
        if self.signals >= 2:
            self._kill_all("interrupted")
        if self.policy.handing_out():
            self.policy.no_device_left()
            self._flush()
            for s in self.slots:
                if not s.device.retired and s.worker is None and self.policy.pending():
                    self._spawn(s)
            for w in self._alive():
                if w.wants and w.state == "idle" and not w.stop_sent:
                    if not self._dispatch(w) and not self.policy.active():
                        self._stop(w)
        else:
            for w in self._alive():
                if w.state != "busy" and not w.stop_sent:
                    self._stop(w)
        self._read(0.2)
        self._check_timers()

    def run(self) -> RunResult:
        if not self.policy.items:
            return RunResult([], False, {})
        plans = plan_devices(self.options.devices, self.options.model_dir,
                             self.options.batch_size, self.options.residency,
                             decode_path=self.options.decode_path)
        self.slots = [_Slot(Device(i, p.device.name, p.residency, p.batch_size), p)
                      for i, p in enumerate(plans)]
        self.policy.use_devices([s.device for s in self.slots])
        self._sweep()

        in_main = threading.current_thread() is threading.main_thread()
        old = {}
        if in_main:
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                old[sig] = signal.signal(sig, self._on_signal)
        try:
            while self._alive() or (self.policy.handing_out() and self.policy.active()):
                self._step()
        finally:
            self._kill_all("run ended")
            for w in self._alive():
                self._on_exit(w)
            for sig, handler in old.items():
                signal.signal(sig, handler)
            self.sel.close()
        self.policy.cancel_the_rest()
        self._flush()
        return RunResult(outcomes=[self._outcome(it) for it in self.policy.items],
                         interrupted=self.interrupted,
                         device_busy_s={s.name: round(s.busy_s, 3) for s in self.slots},
                         no_space=self.policy.no_space)

    def _sweep(self) -> None:
        """Remove temporary files a killed earlier run left of this run's own renders (the
        shards of an array share job folders and .khala/work: another shard's are live), and
        logs and saved tokens older than KEEP_DAYS (renders whose settings changed)."""
        work = self.khala_dir / "work"
        own: dict[Path, set[str]] = {work: set()}
        for it in self.policy.items:
            r = it.render
            own.setdefault(Path(r.out_dir), set()).add(r.stem)
            q01 = work_path(self.output_dir, r.key)
            own[work] |= {q01.name, q01_stats_path(q01).name, kept_path(self.output_dir, r).name}
        for d, stems in own.items():
            if d.is_dir():
                for p in temp_files(d, stems):
                    with contextlib.suppress(OSError):
                        p.unlink()
        old = time.time() - KEEP_DAYS * 86400
        for d, pattern in ((self.log_dir, "*.log"), (work, "*.q01.*"), (work, "*.take.npz")):
            if d.is_dir():
                for p in d.glob(pattern):
                    with contextlib.suppress(OSError):
                        if p.stat().st_mtime < old:
                            p.unlink()


def run_renders(renders: list[Render], options: RunOptions,
                on_event: OnEvent | None = None,
                passing: dict[str, int] | None = None) -> RunResult:
    """Render `renders` on the devices of `options`; one Outcome per render, in order.
    `passing`: per until-job, its takes on disk that pass (`Plan.passing()`); an until-job's
    renders not needed end "spare".

    Raises DeviceError (devices.py) before starting anything when the devices cannot be
    had. The caller holds the output directory's RunLock.
    """
    return Pool(list(renders), options, on_event, passing).run()
