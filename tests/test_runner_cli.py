"""The runner through `khala render`: exit codes 1, 3, 75 and 130, the report's device and
attempts, no orphan processes. Real subprocesses, CPU workers, the demo model; faults come
from the workers' test-only failpoints (`--test-faults`, runner/faults.py)."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from processes import assert_gone, descendants, wait_for

from khala_cli import outputs
from khala_cli.cli import _register, cli

ROOT = Path(__file__).resolve().parents[1]


def write_manifest(tmp_path: Path, model_dir: Path, jobs: list[str]) -> Path:
    lines = [f"model: {model_dir}", "output_dir: out",
             "defaults: {mode: instrumental, duration: 1, max_minutes: 0.05, seeds: [1]}",
             "jobs:"]
    for i, j in enumerate(jobs):
        lines += [f"  - id: {j}", f"    tags: [Piano, Style {i}]"]
    path = tmp_path / "jobs.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def khala(tmp_path: Path, *args: str, faults: str = "", env: dict | None = None
          ) -> subprocess.Popen:
    if faults:
        args = (*args, "--test-faults", faults, "--test-fault-dir", str(tmp_path / "faults"))
    env = {**os.environ, **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "khala_cli", "render", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=tmp_path, env=env)








def report(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "out" / "reports" / "latest.json").read_text())


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


# -- exit 3: devices -------------------------------------------------------------------------


def test_devices_naming_a_missing_gpu_exits_3(tmp_path, monkeypatch):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    smi = bindir / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho '0, GPU-aaaa, 24576 MiB, 24000 MiB'\n"
                   "echo '1, GPU-bbbb, 24576 MiB, 24000 MiB'\n")
    smi.chmod(smi.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    path = tmp_path / "jobs.yaml"
    path.write_text("model: demo\noutput_dir: out\njobs:\n  - id: a\n    mode: instrumental\n"
                    "    tags: [Piano]\n")
    _register()
    for spec, words in (("9", "there is no GPU 9; this machine has 2 GPUs (0, 1)"),
                        ("cpu:0", "1..64"), ("0,x", "expected auto, cpu, cpu:N")):
        r = CliRunner().invoke(cli, ["render", str(path), "--devices", spec])
        assert r.exit_code == 3, r.output
        assert words in r.output
    assert not (tmp_path / "out").exists()


def test_cuda_graphs_on_a_cpu_worker_exits_3_before_writing(tmp_path):
    path = tmp_path / "jobs.yaml"
    path.write_text("model: demo\noutput_dir: out\njobs:\n  - id: a\n    mode: instrumental\n"
                    "    tags: [Piano]\n")
    _register()
    r = CliRunner().invoke(cli, ["render", str(path), "--devices", "cpu", "--decode-path",
                                 "cuda_graphs"])
    assert r.exit_code == 3, r.output
    assert "--decode-path cuda_graphs needs CUDA GPUs, and cpu:0 is a CPU worker" in r.output
    assert not (tmp_path / "out").exists()


# -- whole runs ------------------------------------------------------------------------------


@pytest.mark.slow
def test_decode_path_compile_reaches_the_worker_and_renders_eagers_codes(tmp_path,
                                                                          demo_model_dir):
    path = write_manifest(tmp_path, demo_model_dir, ["a"])
    codes = {}
    for decode in ("eager", "compile"):
        out = tmp_path / decode
        proc = khala(tmp_path, str(path), "--devices", "cpu", "--output-dir", str(out),
                     "--save-codes", "--decode-path", decode)
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
        logs = "".join(p.read_text() for p in (out / ".khala/logs").glob("*.log"))
        assert f"{decode} decode" in logs
        rep = json.loads((out / "reports" / "latest.json").read_text())
        assert rep["options"]["decode_path"] == decode
        codes[decode] = np.load(out / "a" / "a-s1.codes.npy")
    assert np.array_equal(codes["compile"], codes["eager"])


@pytest.mark.slow
def test_killed_worker_is_retried_and_the_report_shows_it(tmp_path, demo_model_dir):
    path = write_manifest(tmp_path, demo_model_dir, ["a", "b", "c"])
    run = khala(tmp_path, str(path), "--devices", "cpu:2", faults="hang_once:b")
    logs = tmp_path / "out" / ".khala" / "logs"

    def hung() -> list[Path]:  # the log of the worker stopped in the middle of b
        return [p for p in logs.glob("*.log") if "TEST FAULT hang_once:b" in p.read_text()]
    wait_for(hung, "a worker to stop in the middle of b")
    pid = int(hung()[0].read_text().split("worker pid ", 1)[1].split()[0])
    assert pid in descendants(run.pid)
    os.kill(pid, signal.SIGKILL)
    out, err = run.communicate(timeout=600)
    assert run.returncode == 0, err
    rep = report(tmp_path)
    by_job = {e["job_id"]: e for e in rep["renders"]}
    assert by_job["b"]["status"] == "rendered" and by_job["b"]["attempts"] == 2
    assert by_job["a"]["attempts"] == 1 and by_job["c"]["attempts"] == 1
    assert {e["device"] for e in rep["renders"]} <= {"cpu:0", "cpu:1"}
    assert set(rep["summary"]["device_busy_s"]) == {"cpu:0", "cpu:1"}
    assert_gone([pid])


@pytest.mark.slow
def test_render_that_always_crashes_exits_1_and_the_others_render(tmp_path, demo_model_dir):
    path = write_manifest(tmp_path, demo_model_dir, ["ok", "bad"])
    run = khala(tmp_path, str(path), "--devices", "cpu", "--retries", "1", faults="crash:bad")
    out, err = run.communicate(timeout=600)
    assert run.returncode == 1, err
    by_job = {e["job_id"]: e for e in report(tmp_path)["renders"]}
    assert by_job["ok"]["status"] == "rendered"
    assert by_job["bad"]["status"] == "failed" and by_job["bad"]["attempts"] == 2
    assert "SIGKILL" in by_job["bad"]["error"]
    assert by_job["bad"]["log"] and Path(by_job["bad"]["log"]).exists()
    assert "failed: bad seed 1" in err


@pytest.mark.slow
def test_second_run_on_the_same_output_exits_75_and_writes_nothing(tmp_path, demo_model_dir):
    path = write_manifest(tmp_path, demo_model_dir, ["a"])
    # a grace far longer than the test: only the second Ctrl-C can end this run in time
    first = khala(tmp_path, str(path), "--devices", "cpu", "--grace", "3600", faults="hang:a")
    logs = tmp_path / "out" / ".khala" / "logs"
    wait_for(lambda: any("TEST FAULT hang:a" in p.read_text() for p in logs.glob("*.log")),
             "the first run to be busy")
    before = snapshot(tmp_path / "out")

    second = khala(tmp_path, str(path), "--devices", "cpu")
    out, err = second.communicate(timeout=300)
    assert second.returncode == 75, err
    assert f"pid {first.pid}" in err
    assert snapshot(tmp_path / "out") == before

    # Ctrl-C twice ends the first run at once: exit 130, report written, nothing left over.
    workers = descendants(first.pid)
    assert workers
    first.send_signal(signal.SIGINT)
    for line in first.stderr:
        if "stopping" in line:
            break
    first.send_signal(signal.SIGINT)
    t0 = time.monotonic()
    try:
        _, err1 = first.communicate(timeout=60)
    finally:
        first.kill()
    assert time.monotonic() - t0 < 30  # at once, not after the grace period
    assert first.returncode == 130, err1
    rep = report(tmp_path)
    assert rep["summary"]["interrupted"] is True
    assert rep["renders"][0]["status"] == "cancelled"
    assert rep["renders"][0]["error"] == "interrupted"  # not "... grace period over"
    assert_gone(workers)
    assert not (tmp_path / "out" / ".khala" / "lock").exists()


@pytest.mark.slow
@pytest.mark.parametrize("to", ["the parent", "every process"])
def test_sigterm_mid_run_exits_130_with_a_report_and_no_orphans(tmp_path, demo_model_dir, to):
    path = write_manifest(tmp_path, demo_model_dir, ["a", "b", "c"])
    faults = tmp_path / "faults"
    run = khala(tmp_path, str(path), "--devices", "cpu", "--grace", "300", faults="pause:b")
    wait_for((faults / "paused-b").exists, "the worker to reach b")
    workers = descendants(run.pid)
    assert workers
    # every process: as Slurm and systemd stop a job, SIGTERM to each of its processes at
    # once; the running render (b) still gets the grace period
    for pid in (run.pid, *(workers if to == "every process" else ())):
        os.kill(pid, signal.SIGTERM)
    seen = []
    for line in run.stderr:  # the parent says it is stopping before b may go on
        seen.append(line)
        if "stopping" in line:
            break
    (faults / "resume-b").touch()
    _, err = run.communicate(timeout=300)
    assert run.returncode == 130, "".join(seen) + err
    rep = report(tmp_path)
    assert rep["summary"]["interrupted"] is True and rep["summary"]["exit_code"] == 130
    status = {e["job_id"]: e["status"] for e in rep["renders"]}
    assert status == {"a": "rendered", "b": "rendered", "c": "cancelled"}
    page = (tmp_path / "out" / "reports" / "index.html").read_text()  # rewritten after it
    assert 'id="job-a"' in page and 'id="job-b"' in page and 'id="job-c"' not in page
    assert_gone(workers)
    assert outputs.temp_files(tmp_path / "out") == []
    assert not (tmp_path / "out" / ".khala" / "lock").exists()


@pytest.mark.slow
def test_grace_option_bounds_how_long_a_running_render_may_finish(tmp_path, demo_model_dir):
    path = write_manifest(tmp_path, demo_model_dir, ["a", "b"])
    faults = tmp_path / "faults"
    run = khala(tmp_path, str(path), "--devices", "cpu", "--grace", "1", faults="pause:a")
    wait_for((faults / "paused-a").exists, "the worker to reach a")
    workers = descendants(run.pid)
    run.send_signal(signal.SIGTERM)  # a never resumes: only the grace period can end it
    _, err = run.communicate(timeout=300)
    assert run.returncode == 130, err
    rep = report(tmp_path)
    assert rep["options"]["grace"] == 1.0
    assert {e["job_id"]: e["status"] for e in rep["renders"]} == {"a": "cancelled",
                                                                "b": "cancelled"}
    assert_gone(workers)


# -- faults that waste nothing ----------------------------------------------------------


def test_a_failpoint_in_the_environment_never_fires(tmp_path, demo_model_dir):
    path = write_manifest(tmp_path, demo_model_dir, ["a"])
    run = khala(tmp_path, str(path), "--devices", "cpu",
                env={"KHALA_TEST_FAULT": "crash:a", "KHALA_TEST_FAULT_DIR": str(tmp_path)})
    _, err = run.communicate(timeout=300)
    assert run.returncode == 0, err
    assert "ignoring KHALA_TEST_FAULT, KHALA_TEST_FAULT_DIR from the environment" in err
    assert report(tmp_path)["renders"][0]["attempts"] == 1
    logs = "".join(p.read_text() for p in (tmp_path / "out/.khala/logs").glob("*.log"))
    assert "TEST FAULT" not in logs


def test_asked_for_failpoints_are_loud(tmp_path, demo_model_dir):
    path = write_manifest(tmp_path, demo_model_dir, ["a"])
    run = khala(tmp_path, str(path), "--devices", "cpu", "--retries", "0", faults="fail:a")
    _, err = run.communicate(timeout=300)
    assert run.returncode == 1
    assert "TEST FAULTS ARE ACTIVE (fail:a)" in err


def test_a_full_disk_stops_the_run_without_rendering_twice(tmp_path, demo_model_dir, small_fs):
    fs = small_fs(1)  # about one 3-second take of WAV + MP3
    path = write_manifest(tmp_path, demo_model_dir, ["a", "b", "c", "d"])
    text = path.read_text().replace("output_dir: out", f"output_dir: {fs / 'out'}")
    path.write_text(text)
    run = khala(tmp_path, str(path), "--devices", "cpu")
    _, err = run.communicate(timeout=600)
    assert run.returncode == 74, err
    assert "No space left on device" in err and "System error" not in err
    assert "MB free" in err and "one take needs about" in err and str(fs / "out") in err
    rep = json.loads((fs / "out" / "reports" / "latest.json").read_text())
    status = {e["job_id"]: e for e in rep["renders"]}
    failed = [e for e in status.values() if e["status"] == "failed"]
    assert failed and all("No space left on device" in e["error"] for e in failed)
    assert all(e["attempts"] <= 1 for e in status.values())  # nothing rendered twice
    assert status["d"]["status"] == "cancelled"  # no work handed out after the disk filled
    assert rep["summary"]["exit_code"] == 74 and rep["summary"]["no_space"]
    assert outputs.temp_files(fs / "out") == []


def test_a_failed_write_keeps_the_take_and_the_rerun_writes_it_without_rendering(
        tmp_path, demo_model_dir):
    path = write_manifest(tmp_path, demo_model_dir, ["a", "b", "c"])
    first = khala(tmp_path, str(path), "--devices", "cpu", faults="enospc:b")
    _, err = first.communicate(timeout=600)
    assert first.returncode == 74, err
    rep = report(tmp_path)
    st = {e["job_id"]: e for e in rep["renders"]}
    assert st["a"]["status"] == "rendered"
    assert st["b"]["status"] == "failed" and st["b"]["attempts"] == 1
    assert "is kept" in st["b"]["error"]
    assert st["c"]["status"] == "cancelled"
    kept = list((tmp_path / "out" / ".khala" / "work").glob("b-s1.*.take.npz"))
    assert len(kept) == 1

    second = khala(tmp_path, str(path), "--devices", "cpu")
    _, err = second.communicate(timeout=600)
    assert second.returncode == 0, err
    st = {e["job_id"]: e for e in report(tmp_path)["renders"]}
    assert st["b"]["status"] == "rendered" and st["c"]["status"] == "rendered"
    logs = "".join(p.read_text() for p in sorted((tmp_path / "out/.khala/logs").glob("*.log")))
    assert "b-s1: writing the take kept from an earlier failed write (no rendering)" in logs
    assert "b-s1: resuming" not in logs.split("writing the take kept")[-1]
    assert not kept[0].exists()
    side = json.loads((tmp_path / "out" / "b" / "b-s1.json").read_text())
    assert side["analysis"]["ended"] == "token_cap" and side["analysis"]["logprob_mean"] < 0


def test_a_read_only_output_directory_exits_before_rendering(tmp_path, demo_model_dir,
                                                             small_fs):
    fs = small_fs(4)
    small_fs.read_only(fs)
    path = write_manifest(tmp_path, demo_model_dir, ["a"])
    path.write_text(path.read_text().replace("output_dir: out", f"output_dir: {fs}"))
    run = khala(tmp_path, str(path), "--devices", "cpu")
    _, err = run.communicate(timeout=300)
    assert run.returncode == 74, err
    assert "Read-only file system" in err and str(fs) in err
    assert list(fs.iterdir()) == []


# -- beside other runs and as a cluster stops a job ---------------------------------------------


def _seeds_of_both_shards(tmp_path: Path, model_dir: Path) -> tuple[Path, list, list]:
    """A manifest of one job with one seed of shard 0/2 and one of shard 1/2 (so both
    shards write into the same job folder); the renders of each shard."""
    from khala_cli import plan
    from khala_cli.manifest import jobs as manifest
    from khala_cli.weights.resolve import read_info

    path = write_manifest(tmp_path, model_dir, ["a"])
    text = path.read_text()
    path.write_text(text.replace("seeds: [1]", f"seeds: {list(range(1, 21))}"))
    renders = plan.build_renders(manifest.load(path), read_info(model_dir).fingerprint)
    first = [next(r for r in renders if plan.shard_of(r, 2) == k) for k in (0, 1)]
    path.write_text(text.replace("seeds: [1]", f"seeds: {[r.seed for r in first]}"))
    return path, [first[0]], [first[1]]


def test_a_shard_starting_sweeps_only_its_own_temporary_files(tmp_path, demo_model_dir):
    from khala_cli.runner.lock import RunLock
    from khala_cli.runner.worker import work_path

    path, ours, theirs = _seeds_of_both_shards(tmp_path, demo_model_dir)
    out = tmp_path / "out"
    # Shard 0/2 is writing: it holds its lock, and its files are being written under
    # temporary names in the shared job folder and in .khala/work.
    (o,) = ours
    being_written = [Path(o.out_dir) / f"{outputs.TMP_PREFIX}{o.stem}.wav.a1b2c3d4",
                     work_path(out, o.key).with_name(f"{outputs.TMP_PREFIX}{o.key}.q01.npy.42")]
    # and shard 1/2 left a half-written file of its own when it was killed long ago
    (t,) = theirs
    left_over = Path(t.out_dir) / f"{outputs.TMP_PREFIX}{t.stem}.mp3.zz9y8x7w"
    for p in (*being_written, left_over):
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"half a file")
    with RunLock(out, shard=(0, 2)):
        run = khala(tmp_path, str(path), "--devices", "cpu", "--shard", "1/2")
        _, err = run.communicate(timeout=600)
    assert run.returncode == 0, err
    assert all(p.read_bytes() == b"half a file" for p in being_written)  # nothing lost
    assert not left_over.exists()
    assert outputs.is_done(t) and not outputs.is_done(o)


def _invoke(*args: str):
    _register()
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_analyse_verify_fix_and_keep_refuse_during_a_render(tmp_path, demo_model_dir):
    path = write_manifest(tmp_path, demo_model_dir, ["a", "b"])
    faults = tmp_path / "faults"
    out = tmp_path / "out"
    run = khala(tmp_path, str(path), "--devices", "cpu", faults="pause:b")
    try:
        wait_for((faults / "paused-b").exists, "the render to be busy with b (a is written)")
        takes = {k: v for k, v in snapshot(out).items() if not k.startswith(".khala")}
        assert "a/a-s1.json" in takes
        for args in (("analyse", out, "--force"), ("verify", out, "--fix"), ("keep", out, "a:1")):
            r = _invoke(*args)
            assert r.exit_code == 75, r.output
            assert f"another khala run (khala render) holds {out / '.khala' / 'lock'}: pid " \
                   f"{run.pid}" in r.output
        assert _invoke("verify", out).exit_code == 0  # reading is fine beside a render
        assert {k: v for k, v in snapshot(out).items() if not k.startswith(".khala")} == takes
    finally:
        (faults / "resume-b").touch()
        _, err = run.communicate(timeout=600)
    assert run.returncode == 0, err
    r = _invoke("analyse", out, "--force")
    assert r.exit_code == 0 and "analysed 2 takes" in r.output, r.output
    assert not (out / ".khala" / "lock").exists()


def _fill(fs: Path) -> None:
    with open(fs / "filler", "wb") as f:
        try:
            while True:
                f.write(b"\0" * (1 << 20))
                f.flush()
        except OSError:
            pass


def test_a_full_khala_work_stops_the_run_like_a_full_output_disk(tmp_path, demo_model_dir,
                                                                  small_fs):
    work = small_fs(20, at=tmp_path / "out" / ".khala" / "work")
    _fill(work)
    path = write_manifest(tmp_path, demo_model_dir, ["a", "b", "c"])
    run = khala(tmp_path, str(path), "--devices", "cpu")
    _, err = run.communicate(timeout=600)
    assert run.returncode == 74, err
    assert "No space left on device" in err and f"{work} has 0.0 MB free" in err
    rep = report(tmp_path)
    st = {e["job_id"]: e for e in rep["renders"]}
    assert st["a"]["status"] == "failed" and st["a"]["attempts"] == 1
    assert f"cannot write {work}/" in st["a"]["error"]
    assert st["c"]["status"] == "cancelled"  # nothing more went out into the full disk
    assert all(e["attempts"] <= 1 for e in st.values())
    assert rep["summary"]["exit_code"] == 74
    assert sorted(p.name for p in work.iterdir()) == ["filler"]  # nothing half-written


@pytest.mark.slow
def test_shards_starting_together_convert_the_download_once(tmp_path):
    from megatron_fixtures import write_raw_download

    write_raw_download(tmp_path / "dl")
    manifest = tmp_path / "jobs.yaml"
    manifest.write_text("model: dl\noutput_dir: out\n"
                        "defaults: {mode: instrumental, duration: 1, max_minutes: 0.05}\n"
                        "jobs:\n  - id: tiny\n    tags: [Pop]\n    seeds: [1]\n")
    runs = [khala(tmp_path, str(manifest), "--convert", "--shard", f"{k}/3", "--devices", "cpu")
            for k in range(3)]
    ends = [(r, *r.communicate(timeout=900)) for r in runs]
    for r, _, err in ends:
        assert r.returncode == 0, err
    assert sum(err.count("converting the download") for _, _, err in ends) == 1
    assert (tmp_path / "dl-khala" / "model.json").exists()
    assert len(list((tmp_path / "out").rglob("*.wav"))) == 1


def test_the_cluster_examples_end_their_grace_before_the_cluster_kills():
    import shlex

    import yaml

    margin = 10  # seconds to write the report and the review page (README, signals)
    sbatch = (ROOT / "deploy" / "slurm" / "render.sbatch").read_text()
    words = shlex.split(next(x for x in sbatch.splitlines() if x.startswith("exec khala")))
    slurm_kill_wait = 30  # slurm.conf's default KillWait
    assert float(words[words.index("--grace") + 1]) + margin < slurm_kill_wait
    job = yaml.safe_load((ROOT / "deploy" / "kubernetes" / "render-job.yaml").read_text())
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    cmd = container["command"]
    assert float(cmd[cmd.index("--grace") + 1]) + margin < pod["terminationGracePeriodSeconds"]
