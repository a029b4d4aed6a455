"""The worker pool with real worker subprocesses on CPU and the demo model.

Faults are injected through the workers' test-only failpoints (RunOptions.test_faults, see
khala_cli/runner/faults.py); kills and signals are real. Timeouts here are safety limits only.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from processes import assert_gone, wait_for

from khala_cli import outputs
from khala_cli.manifest import jobs as manifest
from khala_cli.plan import build_renders
from khala_cli.runner import Outcome, RunOptions, run_renders
from khala_cli.runner.events import Event, Finished, Progress, WorkerChanged
from khala_cli.runner.worker import work_path
from khala_cli.weights.resolve import read_info

# Every test here runs real worker subprocesses.
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


# -- helpers -------------------------------------------------------------------------------


def write_manifest(tmp_path: Path, model_dir: Path, jobs: dict[str, list[int]],
                   name: str = "jobs.yaml", out: str = "out", same_tags: bool = False) -> Path:
    """Instrumental jobs of ~3 s of audio each (max_minutes 0.05)."""
    lines = [f"model: {model_dir}", f"output_dir: {out}",
             "defaults: {mode: instrumental, duration: 1, max_minutes: 0.05}", "jobs:"]
    for i, (job, seeds) in enumerate(jobs.items()):
        tags = "[Piano]" if same_tags else f"[Piano, Style {i}]"
        lines += [f"  - id: {job}", f"    tags: {tags}", f"    seeds: {list(seeds)}"]
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


def load_renders(path: Path, save_codes: bool = False, todo_only: bool = True):
    m = manifest.load(path)
    model_dir = Path(m.model_base) / m.model
    renders = build_renders(m, read_info(model_dir).fingerprint, save_codes=save_codes)
    if todo_only:
        renders = [r for r in renders if not outputs.is_done(r)]
    return renders, m.output_dir, model_dir


class Events:
    def __init__(self, action=None):
        self.all: list[dict] = []
        self.pids: dict[int, int] = {}  # worker index -> pid of its current process
        self.action = action

    def __call__(self, ev: Event) -> None:
        self.all.append(ev)
        if isinstance(ev, WorkerChanged):
            self.pids[ev.worker] = ev.pid
        if self.action:
            self.action(self, ev)

    def of(self, kind: type, **match) -> list:
        return [e for e in self.all if isinstance(e, kind)
                and all(getattr(e, k) == v for k, v in match.items())]

    def results(self) -> list[Outcome]:
        return [e.outcome for e in self.of(Finished)]

    def worker_pids(self) -> set[int]:
        return {e.pid for e in self.of(WorkerChanged)}




def by_stem(result) -> dict[str, Outcome]:
    return {o.render.stem: o for o in result.outcomes}


def no_leftovers(out: Path) -> None:
    assert outputs.temp_files(out) == []
    work = out / ".khala" / "work"
    assert not work.exists() or list(work.iterdir()) == []


class _Faults:
    """The workers' test-only failpoints, asked for explicitly through RunOptions."""

    def __init__(self, fault_dir: Path):
        self.dir = fault_dir
        self.opts: dict[str, str] = {}

    def __call__(self, spec: str) -> Path:
        self.opts = {"test_faults": spec, "test_fault_dir": str(self.dir)}
        return self.dir


@pytest.fixture
def faults(tmp_path) -> _Faults:
    return _Faults(tmp_path / "faults")


# -- the happy path ------------------------------------------------------------------------


def test_two_cpu_workers_render_six_renders_each_exactly_once(tmp_path, demo_model_dir):
    # a and b have the same settings: the same render keys, but their own files
    path = write_manifest(tmp_path, demo_model_dir, {"a": [1, 2], "b": [1, 2], "c": [7, 8]},
                          same_tags=True)
    renders, out, model = load_renders(path)
    assert len(renders) == 6 and renders[0].key == renders[2].key
    # leftovers of runs long ago: a log, and the saved tokens of a render since changed
    old = [out / ".khala" / "logs" / "20200101T000000Z-1-cpu0-1.log",
           out / ".khala" / "work" / "0123456789abcdef01234567.q01.npy"]
    for p in old:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"old")
        os.utime(p, (time.time() - 40 * 86400,) * 2)
    ev = Events()
    result = run_renders(renders, RunOptions(str(model), str(out), devices="cpu:2"), ev)

    assert not result.interrupted
    assert [o.render.key for o in result.outcomes] == [r.key for r in renders]
    assert all(o.status == "rendered" and o.attempts == 1 and o.error is None
               for o in result.outcomes)
    # each render reported once, and done on disk with its own key
    reported = [o.render.stem for o in ev.results()]
    assert sorted(reported) == sorted(r.stem for r in renders)
    for r in renders:
        assert outputs.is_done(r)
        side = json.loads(r.path(".json").read_text())
        assert side["render_key"] == r.key and side["seed"] == r.seed
    # both workers started and were ready for work (on a loaded machine one may finish
    # everything before the other is ready: which one renders what is not fixed); busy
    # time is counted per device, and every device that rendered was busy
    assert {e.worker for e in ev.of(WorkerChanged, state="ready")} == {0, 1}
    assert {o.device for o in result.outcomes} <= {"cpu:0", "cpu:1"}
    assert set(result.device_busy_s) == {"cpu:0", "cpu:1"}
    assert all(result.device_busy_s[o.device] > 0 for o in result.outcomes)
    # progress came from the workers, then they stopped cleanly and are gone
    assert {e.phase for e in ev.of(Progress)} >= {"backbone", "superres", "decoding"}
    assert len(ev.of(WorkerChanged, state="stopped")) == 2  # both, cleanly
    assert not ev.of(WorkerChanged, state="died")
    assert_gone(ev.worker_pids())
    no_leftovers(out)
    assert not any(p.exists() for p in old)
    logs = sorted((out / ".khala" / "logs").glob("*.log"))
    assert len(logs) == 2 and all("ready after" in p.read_text() for p in logs)


def test_seeds_of_a_job_share_a_batch_and_match_a_lone_render(tmp_path, demo_model_dir):
    path = write_manifest(tmp_path, demo_model_dir, {"p": [1, 2, 3], "q": [5]})
    renders, out, model = load_renders(path, save_codes=True)
    ev = Events()
    result = run_renders(renders, RunOptions(str(model), str(out), devices="cpu",
                                             batch_size=3, residency="one_shot"), ev)
    assert all(o.status == "rendered" for o in result.outcomes)
    busy = ev.of(WorkerChanged, state="busy")
    # one_shot: one wave, each stage over both batches; the seeds of p in one batch
    assert len(busy) == 1
    assert busy[0].batches == (3, 1)
    assert busy[0].renders == ("p-s1", "p-s2", "p-s3", "q-s5")
    assert ev.of(WorkerChanged, state="starting")[0].residency == "one_shot"
    # each stage ran over the whole wave: every model loaded once, in stage order
    phases = [(e.phase, e.job_id) for e in ev.of(Progress)]
    loads = [p for p, _ in phases if p.startswith("loading_")]
    assert sorted(set(loads), key=loads.index) == [
        "loading_backbone", "loading_superres", "loading_decoder"]
    assert [e.done for e in ev.of(Progress, phase="loading_superres")] == [0, 1]
    first_sr = phases.index(("superres", "p"))
    assert {j for p, j in phases[:first_sr] if p == "backbone"} == {"p", "q"}

    # The same seed alone (batch 1, keep_loaded) gives the same codes: the batch's rows
    # went to the right renders.
    alone = write_manifest(tmp_path, demo_model_dir, {"p": [2]}, name="alone.yaml",
                           out="alone")
    r2, out2, _ = load_renders(alone, save_codes=True)
    res2 = run_renders(r2, RunOptions(str(model), str(out2), devices="cpu"))
    assert res2.outcomes[0].status == "rendered"
    batched = np.load(out / "p" / "p-s2.codes.npy")
    single = np.load(out2 / "p" / "p-s2.codes.npy")
    assert np.array_equal(batched, single)
    other = np.load(out / "p" / "p-s1.codes.npy")
    assert not np.array_equal(batched, other)


# -- failures ------------------------------------------------------------------------------


def test_worker_killed_mid_render_is_replaced_and_the_render_retried(
        tmp_path, demo_model_dir, faults):
    # hang_once holds the worker mid-render the first time, so the kill lands mid-render.
    marker = faults("hang_once:b") / "hang_once-b"
    path = write_manifest(tmp_path, demo_model_dir, {"a": [1], "b": [1], "c": [1]})
    renders, out, model = load_renders(path)
    killed: list[int] = []

    def kill_on_b(events: Events, ev: Event) -> None:
        if isinstance(ev, Progress) and ev.job_id == "b" and not killed:
            wait_for(marker.exists, "the worker to stop mid-render")
            pid = events.pids[ev.worker]
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    ev = Events(kill_on_b)
    result = run_renders(renders, RunOptions(str(model), str(out), **faults.opts, devices="cpu:2"), ev)
    o = by_stem(result)
    assert killed
    assert all(x.status == "rendered" for x in result.outcomes)
    assert o["b-s1"].attempts == 2
    assert o["a-s1"].attempts == 1 and o["c-s1"].attempts == 1
    died = ev.of(WorkerChanged, state="died")
    assert [d.pid for d in died] == killed and "SIGKILL" in died[0].error
    assert_gone(ev.worker_pids())
    no_leftovers(out)


def test_hanging_worker_is_replaced_after_the_stall_timeout(tmp_path, demo_model_dir, faults):
    faults("hang_once:a")
    path = write_manifest(tmp_path, demo_model_dir, {"a": [1], "b": [1]})
    renders, out, model = load_renders(path)
    ev = Events()
    result = run_renders(renders, RunOptions(str(model), str(out), **faults.opts, devices="cpu",
                                             stall_timeout=8.0), ev)
    o = by_stem(result)
    assert o["a-s1"].status == "rendered" and o["a-s1"].attempts >= 2
    assert o["b-s1"].status == "rendered"
    stalled = ev.of(WorkerChanged, state="stalled")
    assert stalled and "no progress for 8 s" in stalled[0].error
    assert len(ev.of(WorkerChanged, state="starting")) >= 2  # replaced
    assert_gone(ev.worker_pids())
    no_leftovers(out)


def test_render_that_always_crashes_its_worker_fails_and_the_rest_render(
        tmp_path, demo_model_dir, faults):
    faults("crash:bad")
    path = write_manifest(tmp_path, demo_model_dir, {"ok1": [1], "bad": [1], "ok2": [1]})
    renders, out, model = load_renders(path)
    ev = Events()
    result = run_renders(renders, RunOptions(str(model), str(out), **faults.opts, devices="cpu:2",
                                             retries=1), ev)
    o = by_stem(result)
    assert o["bad-s1"].status == "failed"
    assert o["bad-s1"].attempts == 2  # the first try and one retry
    assert "SIGKILL" in o["bad-s1"].error and "after 2 attempts" in o["bad-s1"].error
    assert o["bad-s1"].log and Path(o["bad-s1"].log).exists()
    assert "TEST FAULT crash:bad" in Path(o["bad-s1"].log).read_text()
    assert not o["bad-s1"].render.path(".json").exists()
    for stem in ("ok1-s1", "ok2-s1"):
        assert o[stem].status == "rendered" and outputs.is_done(o[stem].render)
    assert len(ev.of(WorkerChanged, state="died")) == 2
    assert_gone(ev.worker_pids())
    no_leftovers(out)


def test_an_ordinary_error_fails_the_render_and_keeps_the_worker(
        tmp_path, demo_model_dir, faults):
    faults("fail:bad")
    path = write_manifest(tmp_path, demo_model_dir, {"bad": [1], "ok": [1]})
    renders, out, model = load_renders(path)
    ev = Events()
    result = run_renders(renders, RunOptions(str(model), str(out), **faults.opts, devices="cpu",
                                             retries=1), ev)
    o = by_stem(result)
    assert o["bad-s1"].status == "failed" and o["bad-s1"].attempts == 2
    assert "RuntimeError: test fault for job bad" in o["bad-s1"].error
    assert o["ok-s1"].status == "rendered"
    assert len(ev.of(WorkerChanged, state="starting")) == 1  # the same worker all along
    assert_gone(ev.worker_pids())


def test_out_of_memory_halves_the_batch_then_goes_one_shot_then_fails(
        tmp_path, demo_model_dir, faults):
    # x: OOM only in a batch of two -> retried one seed at a time, and renders.
    # z: OOM always -> the device goes one_shot (no retry used), then the retries run out.
    faults("oom_batch:x,oom:z")
    path = write_manifest(tmp_path, demo_model_dir, {"x": [1, 2], "z": [1]})
    renders, out, model = load_renders(path)
    ev = Events()
    result = run_renders(renders, RunOptions(str(model), str(out), **faults.opts, devices="cpu",
                                             batch_size=2, retries=1), ev)
    o = by_stem(result)
    assert o["x-s1"].status == "rendered" and o["x-s2"].status == "rendered"
    assert o["x-s1"].attempts == 2 and o["x-s2"].attempts == 2
    busy = [e.batches for e in ev.of(WorkerChanged, state="busy")]
    assert busy[:3] == [(2,), (1,), (1,)]
    assert o["z-s1"].status == "failed"
    assert o["z-s1"].attempts == 3  # keep_loaded, one_shot, one_shot again
    assert "out of memory" in o["z-s1"].error
    starts = [e.residency for e in ev.of(WorkerChanged, state="starting")]
    assert starts[0] == "keep_loaded" and starts[-1] == "one_shot"
    assert len(ev.of(WorkerChanged, state="oom")) == 4
    assert_gone(ev.worker_pids())


def test_unloadable_model_fails_every_render_without_looping(tmp_path, demo_model_dir):
    bad_model = tmp_path / "broken-model"
    bad_model.mkdir()
    for f in demo_model_dir.iterdir():
        if f.is_file():
            (bad_model / f.name).write_bytes(f.read_bytes())
    (bad_model / "backbone.json").write_text("{not json")
    path = write_manifest(tmp_path, demo_model_dir, {"a": [1], "b": [1]})
    renders, out, _ = load_renders(path)
    ev = Events()
    result = run_renders(renders, RunOptions(str(bad_model), str(out), devices="cpu:2"), ev)
    assert [o.status for o in result.outcomes] == ["failed", "failed"]
    assert "no device can render" in result.outcomes[0].error
    assert "backbone.json" in result.outcomes[0].error
    assert len(ev.of(WorkerChanged, state="starting")) == 2  # one per device, no restarts
    assert_gone(ev.worker_pids())


# -- the parent dies or is signalled ---------------------------------------------------------

SCRIPT = textwrap.dedent("""
    import dataclasses, json, sys
    from khala_cli import outputs
    from khala_cli.manifest import jobs as manifest
    from khala_cli.runner.events import Finished
    from khala_cli.plan import build_renders
    from khala_cli.runner import RunOptions, run_renders
    from khala_cli.runner.lock import RunLock
    from khala_cli.weights.resolve import read_info
    from pathlib import Path

    def emit(obj):
        print(json.dumps(obj), flush=True)

    def on_event(ev):
        if isinstance(ev, Finished):
            o = ev.outcome
            emit({"type": "result", "stem": o.render.stem, "status": o.status,
                  "attempts": o.attempts, "error": o.error, "resumed": ev.resumed})
        else:
            emit({"type": ev.kind, **dataclasses.asdict(ev)})

    if __name__ == "__main__":
        m = manifest.load(sys.argv[1])
        model = Path(m.model_base) / m.model
        save_codes = True
        renders = build_renders(m, read_info(model).fingerprint, save_codes=save_codes)
        todo = [r for r in renders if not outputs.is_done(r)]
        emit({"type": "plan", "todo": [r.stem for r in todo]})
        opts = RunOptions(str(model), str(m.output_dir), **json.loads(sys.argv[2]))
        with RunLock(m.output_dir, warn=lambda msg: emit({"type": "warning", "msg": msg})):
            result = run_renders(todo, opts, on_event)
        emit({"type": "final", "interrupted": result.interrupted,
              "torch_imported": "torch" in sys.modules})
""")


class Script:
    """The pool in a real parent process of its own, reporting events as JSON lines."""

    def __init__(self, tmp_path: Path, manifest_path: Path, options: dict, env: dict):
        script = tmp_path / "run_pool.py"
        script.write_text(SCRIPT)
        self.proc = subprocess.Popen(
            [sys.executable, str(script), str(manifest_path), json.dumps(options)],
            stdout=subprocess.PIPE, text=True, cwd=ROOT, env={**os.environ, **env})
        self.events: list[dict] = []

    def read_until(self, pred) -> dict:
        for line in self.proc.stdout:
            ev = json.loads(line)
            self.events.append(ev)
            if pred(ev):
                return ev
        raise AssertionError(f"the run ended first; events: {self.events[-5:]}")

    def finish(self) -> int:
        for line in self.proc.stdout:
            self.events.append(json.loads(line))
        return self.proc.wait(timeout=300)

    def of(self, kind: str) -> list[dict]:
        return [e for e in self.events if e["type"] == kind]

    def worker_pids(self) -> set[int]:
        return {e["pid"] for e in self.of("worker")}




def test_parent_killed_then_rerun_resumes_without_redoing_anything(tmp_path, demo_model_dir):
    path = write_manifest(tmp_path, demo_model_dir, {"a": [1], "b": [1], "c": [1]})
    renders, out, _ = load_renders(path, save_codes=True)
    rb = next(r for r in renders if r.job_id == "b")
    q_path = work_path(out, rb.key)

    # Run 1 renders a, then stops for good after b's backbone (test fault): killed there.
    run1 = Script(tmp_path, path, {"devices": "cpu", "test_faults": "hang_after_backbone:b",
                                   "test_fault_dir": str(tmp_path / "faults")}, {})
    run1.read_until(lambda e: e["type"] == "result" and e["stem"] == "a-s1")
    wait_for(q_path.exists, "b's saved backbone tokens")
    workers = psutil.Process(run1.proc.pid).children(recursive=True)
    assert workers
    run1.proc.kill()
    run1.proc.wait(timeout=60)
    assert_gone([w.pid for w in workers])  # the workers died with their parent
    assert (out / ".khala" / "lock").exists()  # a stale lock is left behind

    # Tamper with b's saved tokens (still valid codes), so the rerun shows it used them;
    # leave a temporary file as a write interrupted by the kill would.
    saved = np.load(q_path)
    tampered = (saved + 1) % 1024
    np.save(q_path, tampered)
    stray = out / "b" / f"{outputs.TMP_PREFIX}b-s1.wav.x1y2"
    stray.parent.mkdir(parents=True, exist_ok=True)
    stray.write_bytes(b"half a wav")
    a_files = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (out / "a").iterdir()}

    run2 = Script(tmp_path, path, {"devices": "cpu"}, {})
    assert run2.finish() == 0
    assert run2.of("plan")[0]["todo"] == ["b-s1", "c-s1"]  # a is done: not rendered again
    assert any("stale" in w["msg"] for w in run2.of("warning"))
    results = {e["stem"]: e for e in run2.of("result")}
    assert set(results) == {"b-s1", "c-s1"}
    assert all(e["status"] == "rendered" and e["attempts"] == 1 for e in results.values())
    assert results["b-s1"]["resumed"] is True and results["c-s1"]["resumed"] is False
    # b's take was built on the saved tokens, not on a new backbone run
    codes = np.load(out / "b" / "b-s1.codes.npy")
    assert np.array_equal(codes[:2], tampered)
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (out / "a").iterdir()} == a_files
    assert all(outputs.is_done(r) for r in renders)
    assert not (out / ".khala" / "lock").exists()
    assert run2.of("final")[0]["torch_imported"] is False
    no_leftovers(out)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_or_sighup_lets_running_renders_finish_and_starts_no_more(
        tmp_path, demo_model_dir, sig):
    path = write_manifest(tmp_path, demo_model_dir, {"a": [1], "b": [1], "c": [1]})
    renders, out, _ = load_renders(path)
    fault_dir = tmp_path / "faults"
    run = Script(tmp_path, path, {"devices": "cpu", "test_faults": "pause:b",
                                   "test_fault_dir": str(fault_dir)}, {})
    wait_for((fault_dir / "paused-b").exists, "the worker to reach b")
    run.proc.send_signal(sig)
    run.read_until(lambda e: e["type"] == "interrupt")
    (fault_dir / "resume-b").touch()  # b goes on only once the parent has begun stopping
    assert run.finish() == 0
    final = run.of("final")[0]
    assert final["interrupted"] is True
    status = {e["stem"]: e["status"] for e in run.of("result")}
    assert status == {"a-s1": "rendered", "b-s1": "rendered", "c-s1": "cancelled"}
    assert not (out / "c").exists()
    assert_gone(run.worker_pids())
    no_leftovers(out)


def test_grace_period_over_kills_the_worker_and_cancels(tmp_path, demo_model_dir):
    path = write_manifest(tmp_path, demo_model_dir, {"a": [1], "b": [1]})
    renders, out, _ = load_renders(path)
    run = Script(tmp_path, path, {"devices": "cpu", "grace": 1.0, "test_faults": "hang:a",
                                   "test_fault_dir": str(tmp_path / "f")}, {})
    run.read_until(lambda e: e["type"] == "progress" and e["job_id"] == "a")
    pids = run.worker_pids()
    run.proc.send_signal(signal.SIGTERM)
    assert run.finish() == 0
    assert run.of("final")[0]["interrupted"] is True
    status = {e["stem"]: (e["status"], e["error"]) for e in run.of("result")}
    assert status["a-s1"][0] == "cancelled" and "grace" in status["a-s1"][1]
    assert status["b-s1"][0] == "cancelled"
    assert_gone(pids)
    no_leftovers(out)


def test_second_signal_kills_workers_at_once(tmp_path, demo_model_dir):
    path = write_manifest(tmp_path, demo_model_dir, {"a": [1]})
    renders, out, _ = load_renders(path)
    run = Script(tmp_path, path, {"devices": "cpu", "grace": 3600.0, "test_faults": "hang:a",
                                   "test_fault_dir": str(tmp_path / "f")}, {})
    run.read_until(lambda e: e["type"] == "progress" and e["job_id"] == "a")
    pids = run.worker_pids()
    run.proc.send_signal(signal.SIGINT)
    run.read_until(lambda e: e["type"] == "interrupt")
    run.proc.send_signal(signal.SIGINT)
    t0 = time.monotonic()
    watchdog = threading.Timer(60, run.proc.kill)  # an ignored signal fails, never hangs
    watchdog.start()
    try:
        assert run.finish() == 0
    finally:
        watchdog.cancel()
    assert time.monotonic() - t0 < 30  # at once: the grace period is an hour
    status = {e["stem"]: (e["status"], e["error"]) for e in run.of("result")}
    assert status == {"a-s1": ("cancelled", "interrupted")}  # not "grace period over"
    assert run.of("final")[0]["interrupted"] is True
    assert_gone(pids)
