"""tools/gpu-check: the dry run on the CPU (a real subprocess running the real bench, render
and doctor), the budget, results kept through a kill, and the proven-path rule."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "gpu-check"
sys.path.insert(0, str(ROOT / "tools"))

import gpu_results  # noqa: E402

STEPS = ["install", "nvidia_smi", "cuda_tests", "model", "e2e_eager", "e2e_cuda_graphs",
         "catalogue", "render", "doctor", "e2e_one_shot", "e2e_long", "e2e_compile"]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """WORK shared by this module's runs, so the bench model is built once."""
    return tmp_path_factory.mktemp("gpu-check-work")


def env(out: Path, work: Path, **more: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if k not in ("BUDGET_S", "FULL", "STEPS")}
    return {**base, "OUT": str(out), "WORK": str(work), "PYTHON": sys.executable, **more}


def results(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def steps_of(records: list[dict]) -> dict[str, dict]:
    lines = [r for r in records if r["step"] not in ("plan", "e2e run")]
    assert len(lines) == len({r["step"] for r in lines}), "one result line per step"
    return {r["step"]: r for r in lines}


@pytest.mark.slow
def test_dry_run_runs_every_step_on_the_cpu_and_proves_no_cuda_path(tmp_path, work):
    out = tmp_path / "out"
    # torch.compile on the CPU alone outlasts the dry run's budget (it is skipped by that
    # budget in a plain dry run); here it is left out by name, so no figure depends on speed.
    proc = subprocess.run([str(SCRIPT), "--dry-run"], capture_output=True, text=True,
                          env=env(out, work, BUDGET_S="100000", STEPS=",".join(STEPS[:-1])),
                          timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    records = results(out)
    assert records[0]["step"] == "plan" and [n for n, _ in records[0]["figures"]["steps"]] \
        == STEPS
    steps = steps_of(records)
    assert list(steps) == STEPS
    for name in ("install", "model", "e2e_eager", "render", "doctor", "e2e_one_shot",
                 "e2e_long"):
        assert steps[name]["status"] == "pass", steps[name]
        assert steps[name]["seconds"] > 0 and steps[name]["estimate"] > 0
    for name in ("nvidia_smi", "cuda_tests", "e2e_cuda_graphs"):
        assert steps[name]["status"] == "skip"
        assert steps[name]["reason"] == "CUDA only: this is a CPU dry run"
    assert steps["catalogue"]["reason"].startswith("cross-song batching not built yet")
    assert (steps["e2e_compile"]["status"], steps["e2e_compile"]["reason"]) \
        == ("skip", "not in STEPS")
    assert steps["install"]["figures"]["cuda_available"] is False
    assert steps["render"]["figures"] == {"takes": 2}
    # every e2e render wrote its own line as it ended, before its step's line
    runs = [r["figures"] for r in records if r["step"] == "e2e run"]
    assert [(r["batch"], r["residency"], r["minutes"]) for r in runs] == [
        (1, "keep_loaded", 0.01), (2, "keep_loaded", 0.01), (2, "one_shot", 0.01),
        (2, "keep_loaded", 0.02)]
    assert all(r["path"] == "eager" and r["device_type"] == "cpu" for r in runs)
    # one_shot was checked against the tokens e2e_eager saved (keep_loaded, same batch)
    assert all(r["tokens_equal_eager"] is True for r in runs)
    assert steps["e2e_eager"]["figures"]["runs"] == 2
    assert "cuda_graphs" in steps["e2e_one_shot"]["figures"]["left_out"]  # eager alone here
    summary = (out / "summary.txt").read_text()
    assert "proven decode paths on CUDA: none" in summary
    assert "PROVEN_ON_CUDA = ()" in summary and summary in proc.stdout
    rebuilt = subprocess.run([str(SCRIPT), "--summary", str(out)], capture_output=True,
                             text=True, env=env(out, work))
    assert rebuilt.returncode == 0 and rebuilt.stdout == summary


def _kill_session(sid: int) -> None:
    """SIGKILL every process of the run's session: gpu-check and the step it was running."""
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == sid:
                p.kill()
        except (psutil.Error, ProcessLookupError, PermissionError):
            pass


@pytest.mark.slow
def test_a_run_killed_mid_step_keeps_every_result_written_before(tmp_path, work):
    out = tmp_path / "out"
    proc = _start_and_wait_for_a_render(out, work, start_new_session=True)
    try:
        assert proc.poll() is None, "the run ended before it could be killed mid-step"
    finally:
        _kill_session(proc.pid)
        proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    records, bad = gpu_results.read(out)
    assert bad == 0
    steps = steps_of(records)
    assert [n for n, s in steps.items() if s["status"] == "pass"] == ["install", "model"]
    assert "e2e_eager" not in steps  # killed while it ran: no line of its own
    runs = [r for r in records if r["step"] == "e2e run"]
    assert runs and runs[0]["figures"]["batch"] == 1
    rebuilt = subprocess.run([str(SCRIPT), "--summary", str(out)], capture_output=True,
                             text=True, env=env(out, work))
    assert rebuilt.returncode == 1, rebuilt.stdout  # the run did not finish
    assert "no result (the run stopped before them): " + ", ".join(STEPS[4:]) \
        in rebuilt.stdout
    assert "float32   0.01  1 keep_loaded eager" in rebuilt.stdout
    assert "proven decode paths on CUDA: none" in rebuilt.stdout


def _start_and_wait_for_a_render(out: Path, work: Path, **popen) -> subprocess.Popen:
    proc = subprocess.Popen([str(SCRIPT), "--dry-run"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, **popen,
                            env=env(out, work, BUDGET_S="100000",
                                    STEPS="install,model,e2e_eager,render"))
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        text = (out / "results.jsonl").read_text() if (out / "results.jsonl").exists() else ""
        if '"step": "e2e run"' in text:
            break
        time.sleep(0.2)
    return proc


@pytest.mark.slow
def test_sigterm_stops_the_step_in_flight_and_says_so(tmp_path, work):
    out = tmp_path / "out"
    proc = _start_and_wait_for_a_render(out, work)
    assert proc.poll() is None, "the run ended before it could be stopped mid-step"
    proc.send_signal(signal.SIGTERM)  # gpu-check alone: it must stop its step's processes
    assert proc.wait(60) == 128 + signal.SIGTERM
    steps = steps_of(results(out))
    assert steps["e2e_eager"]["status"] == "fail"
    assert steps["e2e_eager"]["reason"] == "stopped by SIGTERM mid-way"
    target = str((out / "results.jsonl").resolve())
    left = []  # a bench left running would go on appending renders to the results
    for p in psutil.process_iter(["cmdline"]):
        if target in (p.info["cmdline"] or []):
            left.append(p)
            p.kill()
    assert not left
    assert "e2e_eager         fail" in (out / "summary.txt").read_text()


def test_a_budget_too_small_for_a_step_skips_it_and_says_so(tmp_path, work):
    out = tmp_path / "out"
    proc = subprocess.run([str(SCRIPT), "--dry-run"], capture_output=True, text=True,
                          env=env(out, work, BUDGET_S="3"), timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    steps = steps_of(results(out))
    est = steps["install"]["estimate"]
    assert est > 3 and steps["install"]["status"] == "skip"
    said = re.fullmatch(rf"needs ~{est:.0f} s, ([0-3]) s left of BUDGET_S=3",
                        steps["install"]["reason"])
    assert said, steps["install"]["reason"]
    assert f"skip: {said.group(0)}" in proc.stdout
    assert steps["model"]["reason"] == "needs install, which did not pass"
    assert list(steps) == STEPS and all(s["status"] == "skip" for s in steps.values())
    assert "install           skip" in (out / "summary.txt").read_text()


def run(path: str, tok_s: float, equal: bool | None = True, batch: int = 1,
        device_type: str = "cuda") -> dict:
    return {"path": path, "tokens_per_s_row": tok_s, "tokens_equal_eager": equal,
            "batch": batch, "residency": "keep_loaded", "dtype": "bfloat16", "minutes": 1.0,
            "device_type": device_type}


def test_a_path_is_proven_when_equal_to_eager_on_every_run_and_faster_at_each():
    eager = [run("eager", 100), run("eager", 90, batch=8)]
    graphs = [run("cuda_graphs", 300), run("cuda_graphs", 250, batch=8)]
    compiled = [run("compile", 150), run("compile", 120, batch=8)]
    assert gpu_results.proven_paths(eager + compiled + graphs)[0] == ["cuda_graphs", "compile"]
    proven, why = gpu_results.proven_paths(eager + graphs[:1] + [run("cuda_graphs", 80, batch=8)])
    assert proven == [] and why == ["cuda_graphs: not faster than eager at B=8 keep_loaded "
                                    "(80 vs 90 tok/s/row)"]
    proven, why = gpu_results.proven_paths(eager + [graphs[0], {**graphs[1],
                                                               "tokens_equal_eager": False}])
    assert proven == [] and "not equal to eager's at B=8" in why[0]
    assert gpu_results.proven_paths(graphs)[0] == []  # no eager run to compare
    cpu = [{**r, "device_type": "cpu"} for r in eager + graphs]
    assert gpu_results.proven_paths(cpu) == ([], [])


def test_the_wheel_folder_takes_the_locks_pins_for_the_images_python():
    import gpu_wheels

    pins = gpu_wheels.lock_versions()
    lock = (ROOT / "requirements.lock").read_text()
    # of several pins of a name, the one whose marker holds for CPython 3.12 on x86-64 Linux
    newest = re.findall(r"^([\w.-]+)==(\S+) ; python_full_version >= '3\.1[12]' \\$", lock,
                        re.M)
    assert newest
    assert all(pins[name.lower()] == version for name, version in newest)
    windows = re.findall(r"^([\w.-]+)==\S+ ; sys_platform == 'win32' \\$", lock, re.M)
    assert windows and not any(name.lower() in pins for name in windows)
    for name in gpu_wheels.NEEDED:  # every wheel of the carry has a version to fetch
        assert name in gpu_wheels.PINNED or name in pins, name
