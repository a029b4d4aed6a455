"""The command line: help, version, tags, validate/plan/render exit codes, the run lock, and
end-to-end renders of the demo model (CliRunner and a real subprocess; marked slow)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import soundfile as sf
from click.testing import CliRunner

from khala_cli import __version__, outputs
from khala_cli import plan as pl
from khala_cli.cli import _register, cli
from khala_cli.engine.config import ModelInfo
from khala_cli.manifest import jobs as mf

_register()
ROOT = Path(__file__).resolve().parents[1]


def invoke(*args: str):
    return CliRunner().invoke(cli, [str(a) for a in args])


def write_model_json(path: Path, fingerprint: str = "c" * 64) -> Path:
    """A model directory as far as the parent process reads it (model.json only)."""
    path.mkdir(parents=True, exist_ok=True)
    info = ModelInfo(name="test-model", fingerprint=fingerprint)
    (path / "model.json").write_text(json.dumps(info.to_dict()))
    return path


def write_manifest(tmp_path: Path, model: str = "model", extra: str = "") -> Path:
    path = tmp_path / "jobs.yaml"
    path.write_text(textwrap.dedent(f"""\
        model: {model}
        output_dir: out
        defaults:
          max_minutes: 0.05
        jobs:
          - id: night-wind
            title: Night Wind
            tags: [J-Pop, Female Vocals]
            lyrics: |
              The night wind walks along the river
            seeds: [1, 2]
          - id: lofi
            title: Lofi
            mode: instrumental
            prompt: a dreamy lo-fi beat
            seeds: [7]
        """) + extra)
    return path


# -- help, version, tags --------------------------------------------------------------------


def test_help_lists_commands_and_exit_codes():
    r = invoke("--help")
    assert r.exit_code == 0
    for cmd in ("render", "validate", "plan", "tags"):
        assert re.search(rf"^\s+{cmd}\s", r.output, re.M), cmd
    for code in ("0", "1", "2", "3", "75", "130"):
        assert re.search(rf"^\s+{code}\s+\S", r.output, re.M), code


def test_render_help_lists_the_options():
    r = invoke("render", "--help")
    assert r.exit_code == 0
    for opt in ("--model", "--output-dir", "--force", "--only", "--shard", "--devices",
                "--batch-size", "--residency", "--decode-path", "--retries", "--stall-timeout", "--save-codes",
                "--quiet", "--max-renders"):
        assert opt in r.output, opt


def test_version():
    r = invoke("--version")
    assert r.exit_code == 0 and __version__ in r.output
    proc = subprocess.run([sys.executable, "-m", "khala_cli", "--version"], capture_output=True,
                          text=True, cwd=ROOT)
    assert proc.returncode == 0 and f"khala, version {__version__}" in proc.stdout


def test_tags():
    r = invoke("tags")
    assert r.exit_code == 0
    assert "Genre/Style" in r.output and "Female Vocals" in r.output and "Guzheng" in r.output
    r = invoke("tags", "--json")
    data = json.loads(r.output)
    shipped = json.loads((ROOT / "khala_cli" / "data" / "tags.json").read_text("utf-8"))
    assert data == shipped
    assert set(data) == {"genre_style", "vocal_instrument", "emotion_mood", "production_other"}


def test_example_manifests_are_valid():
    for name in ("demo", "catalogue", "sweep"):
        r = invoke("validate", ROOT / "jobs" / f"{name}.yaml", "--model", "demo")
        assert r.exit_code == 0, (name, r.output)
        assert "warning" not in r.output, (name, r.output)
    m = mf.load(ROOT / "jobs" / "demo.yaml")
    assert m.model == "demo" and m.render_count <= 4
    assert all(j.max_minutes is not None and j.max_minutes <= 0.2 for j in m.jobs)
    assert "untrained" in (ROOT / "jobs" / "demo.yaml").read_text().lower()


# -- exit codes before rendering -------------------------------------------------------------


def test_validate_ok_and_model_errors(tmp_path):
    write_model_json(tmp_path / "model")
    path = write_manifest(tmp_path)
    r = invoke("validate", path)
    assert r.exit_code == 0, r.output
    assert "2 jobs, 3 renders" in r.output and "test-model" in r.output
    r = invoke("validate", path, "--model", tmp_path / "missing")
    assert r.exit_code == 3 and "does not exist" in r.output and "khala convert" in r.output
    (tmp_path / "broken").mkdir()
    r = invoke("render", path, "--model", tmp_path / "broken", "--devices", "cpu")
    assert r.exit_code == 3 and "not a khala model directory" in r.output
    assert not (tmp_path / "out").exists()


def test_render_usage_errors_write_nothing(tmp_path):
    write_model_json(tmp_path / "model")
    path = write_manifest(tmp_path)
    r = invoke("render", path, "--only", "night-wnd", "--devices", "cpu")
    assert r.exit_code == 2 and "did you mean 'night-wind'" in r.output
    r = invoke("render", path, "--shard", "2/2", "--devices", "cpu")
    assert r.exit_code == 2 and "--shard" in r.output
    r = invoke("render", path, "--batch-size", "0")
    assert r.exit_code == 2
    r = invoke("render", path, "--residency", "sometimes")
    assert r.exit_code == 2
    r = invoke("render", path, "--devices", "banana")
    assert r.exit_code == 3 and "--devices" in r.output
    r = invoke("render", path, "--devices", "9")
    assert r.exit_code == 3 and "--devices 9" in r.output
    assert not (tmp_path / "out").exists()


def test_lock_held_exits_75_and_writes_no_report(tmp_path):
    from khala_cli.runner.lock import RunLock

    write_model_json(tmp_path / "model")
    path = write_manifest(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    with RunLock(out):
        r = invoke("render", path, "--devices", "cpu")
    assert r.exit_code == 75, r.output
    assert f"pid {os.getpid()}" in r.output
    assert not (out / "reports").exists()
    assert not any(p.name in ("night-wind", "lofi") for p in out.iterdir())


def done_takes(path: Path, fingerprint: str = "c" * 64) -> list[pl.Render]:
    """Write every take of a manifest as a worker would (short synthetic audio, real files)."""
    import numpy as np

    renders = pl.build_renders(mf.load(path), fingerprint)
    audio = np.zeros((44100, 2), np.float32)
    for r in renders:
        outputs.write_take(r, audio, 44100, info={"model": {"name": "test-model",
                                                             "fingerprint": fingerprint}})
    return renders


def test_render_with_everything_done_skips_and_reports(tmp_path):
    write_model_json(tmp_path / "model")
    path = write_manifest(tmp_path)
    done_takes(path)
    r = invoke("render", path, "--devices", "cpu")
    assert r.exit_code == 0, r.output
    assert "nothing to render" in r.output
    latest = json.loads((tmp_path / "out" / "reports" / "latest.json").read_text())
    assert latest["summary"]["skipped"] == 3 and latest["summary"]["rendered"] == 0
    assert latest["renders"] == []  # counted, not listed
    assert latest["model"]["fingerprint"] == "c" * 64
    assert not (tmp_path / "out" / ".khala" / "lock").exists()  # released


def test_a_run_that_renders_nothing_writes_a_short_report(tmp_path):
    """A no-op cron run over many takes: its report does not grow with the takes."""
    sizes = {}
    for n in (2, 60):
        d = tmp_path / f"n{n}"
        write_model_json(d / "model")
        path = d / "jobs.yaml"
        path.write_text("model: model\noutput_dir: out\ndefaults: {max_minutes: 0.05}\njobs:\n"
                        f"  - {{id: one, tags: [Pop], lyrics: la, seeds: \"1-{n}\"}}\n")
        done_takes(path)
        r = invoke("render", path, "--devices", "cpu")
        assert r.exit_code == 0 and "nothing to render" in r.output, r.output
        reports = d / "out" / "reports"
        rep = json.loads((reports / "latest.json").read_text())
        assert rep["summary"]["skipped"] == n and rep["renders"] == []
        sizes[n] = [(reports / f"latest.{x}").stat().st_size for x in ("json", "csv")]
    # 58 more takes skipped; only digits differ (counts, the folder name, the wall time)
    assert sizes[60][0] - sizes[2][0] < 64 and sizes[60][1] == sizes[2][1], sizes


def test_shards_of_one_array_run_together_and_nothing_else_beside_them(tmp_path):
    from khala_cli.runner.lock import RunLock

    write_model_json(tmp_path / "model")
    path = write_manifest(tmp_path)
    done_takes(path)
    out = tmp_path / "out"
    with RunLock(out, shard=(0, 8)):  # a task of an array of 8 is running
        r = invoke("render", path, "--shard", "1/8", "--devices", "cpu")
        assert r.exit_code == 0, r.output  # its sibling runs beside it
        for other in (("--shard", "0/4"), ()):  # another count, or the whole directory
            r = invoke("render", path, *other, "--devices", "cpu")
            assert r.exit_code == 75, r.output
            assert "(khala render, shard 0/8)" in r.output and f"pid {os.getpid()}" in r.output
    with RunLock(out):  # an unsharded run holds it: no shard beside it
        r = invoke("render", path, "--shard", "0/2", "--devices", "cpu")
        assert r.exit_code == 75, r.output
    reports = sorted(p.name for p in (out / "reports").iterdir())
    assert "latest-shard-1-of-8.json" in reports and "latest.json" not in reports
    assert not any(n.startswith(("latest-shard-0-of-4", "latest-shard-0-of-2")) for n in reports)


def test_analyse_on_a_read_only_output_directory_exits_74_naming_it(small_fs):
    fs = small_fs(1)
    (fs / ".khala").mkdir()
    small_fs.read_only(fs)
    r = invoke("analyse", fs)  # it cannot take the lock there
    assert r.exit_code == 74, r.output
    assert "Read-only file system" in r.output and str(fs) in r.output


def _other_host() -> None:
    if subprocess.run(["unshare", "--uts", "true"], capture_output=True).returncode != 0:
        pytest.skip("needs unshare --uts (root) to run a process with another host name")


def test_another_hosts_lock_is_respected_while_fresh_and_taken_over_once_silent(tmp_path):
    from khala_cli.runner.lock import STALE_AFTER_S

    _other_host()
    write_model_json(tmp_path / "model")
    path = write_manifest(tmp_path)
    done_takes(path)
    out = tmp_path / "out"
    holder = textwrap.dedent("""
        import sys
        from khala_cli.runner.lock import RunLock
        RunLock(sys.argv[1]).acquire()
        print("GOT", flush=True)
        sys.stdin.read()
    """)
    # a khala process on node-17 holds the output directory (its heartbeat thread runs)
    node = subprocess.Popen(["unshare", "--uts", "sh", "-c",
                             'hostname node-17 && exec "$0" -c "$1" "$2"', sys.executable,
                             holder, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, cwd=ROOT)
    try:
        assert node.stdout.readline().strip() == "GOT"
        r = invoke("render", path, "--devices", "cpu")
        assert r.exit_code == 75, r.output
        assert f"pid {node.pid} on host node-17" in r.output
    finally:
        node.kill()  # the node dies: nothing releases its lock
        node.wait(timeout=60)
    lock = out / ".khala" / "lock"
    r = invoke("render", path, "--devices", "cpu")  # dead, but its heartbeat is still fresh
    assert r.exit_code == 75, r.output
    # the heartbeat has been silent for longer than the timeout (by the file system's clock)
    t = lock.stat().st_mtime - 2 * 3600
    assert 2 * 3600 > STALE_AFTER_S
    os.utime(lock, (t, t))
    r = invoke("render", path, "--devices", "cpu")
    assert r.exit_code == 0, r.output
    assert f"taking over a stale lock {lock} left by pid {node.pid} on host node-17" in r.output
    assert "silent for 2.0 h" in r.output
    assert not lock.exists()


def test_parent_never_imports_torch(tmp_path):
    write_model_json(tmp_path / "model")
    path = write_manifest(tmp_path)
    done_takes(path)
    code = textwrap.dedent(f"""
        import sys
        from click.testing import CliRunner
        from khala_cli.cli import _register, cli
        _register()
        for args in (["--help"], ["validate", {str(path)!r}], ["plan", {str(path)!r}, "--json"],
                     ["tags"], ["render", {str(path)!r}, "--devices", "cpu"]):
            r = CliRunner().invoke(cli, args)
            assert r.exit_code == 0, (args, r.output)
        engine = sorted(m for m in sys.modules if m.startswith("khala_cli.engine.")
                        and m not in ("khala_cli.engine.config", "khala_cli.engine.tokens"))
        print("torch" in sys.modules, engine)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False []"


# -- end to end with the demo model (the runner, workers and the engine) -------------------


def read_back(r: pl.Render) -> dict:
    side = json.loads(r.path(".json").read_text())
    wav = sf.info(str(r.path(".wav")))
    assert (wav.samplerate, wav.channels, wav.subtype) == (44100, 2, "PCM_24")
    mp3 = sf.info(str(r.path(".mp3")))
    assert (mp3.samplerate, mp3.channels, mp3.format) == (44100, 2, "MP3")
    assert abs(mp3.duration - wav.duration) < 0.2
    assert side["audio"]["seconds"] == pytest.approx(wav.duration, abs=1e-3)
    proc = subprocess.run([outputs.ffmpeg_exe(), "-hide_banner", "-i", str(r.path(".mp3")),
                           "-f", "ffmetadata", "-"], capture_output=True, text=True, check=True)
    assert f"title={r.title}" in proc.stdout
    assert re.search(r"Audio: mp3.*, 320 kb/s", proc.stderr), proc.stderr
    return side


@pytest.mark.slow
def test_render_demo_with_clirunner_then_resume_and_force(tmp_path, demo_model_dir):
    path = write_manifest(tmp_path, model="demo")
    r = invoke("render", path, "--devices", "cpu")
    assert r.exit_code == 0, r.output
    assert "untrained" in r.output and "noise" in r.output
    renders = pl.build_renders(mf.load(path), ModelInfo.from_json(
        demo_model_dir / "model.json").fingerprint)
    for x in renders:
        side = read_back(x)
        assert side["render_key"] == x.key and side["model"]["demo"] is True
        assert "noise" in side["note"]
        assert side["tokens"]["backbone"] <= x.max_new_tokens
        assert side["device"].startswith("cpu")
        assert outputs.is_done(x)
    rep = json.loads((tmp_path / "out" / "reports" / "latest.json").read_text())
    assert rep["summary"]["rendered"] == 3 and rep["summary"]["failed"] == 0
    assert rep["summary"]["audio_minutes_rendered"] > 0
    assert all(e["attempts"] >= 1 and e["device"] for e in rep["renders"])
    assert outputs.temp_files(tmp_path / "out") == []
    wav_mtime = renders[0].path(".wav").stat().st_mtime_ns

    # Resume: nothing to do.
    r = invoke("render", path, "--devices", "cpu")
    assert r.exit_code == 0 and "nothing to render" in r.output
    assert renders[0].path(".wav").stat().st_mtime_ns == wav_mtime

    # A changed setting re-renders only that job; --force --only re-renders one job.
    path.write_text(path.read_text().replace("seeds: [7]", "seeds: [7]\n    temperature: 0.9"))
    p = json.loads(invoke("plan", path, "--json").output)
    assert [x["status"] for x in p["renders"]] == ["skip", "skip", "rerender"]
    r = invoke("render", path, "--devices", "cpu", "--force", "--only", "night-wind",
               "--save-codes")
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "out" / "reports" / "latest.json").read_text())
    assert [(e["job_id"], e["status"]) for e in rep["renders"]] == [("night-wind", "rendered")] * 2
    assert renders[0].path(".wav").stat().st_mtime_ns != wav_mtime
    import numpy as np

    codes = np.load(renders[0].path(".codes.npy"))
    assert codes.dtype == np.int16 and codes.ndim == 2 and codes.shape[0] == 64


@pytest.mark.slow
def test_render_demo_in_a_subprocess_plain_output(tmp_path, demo_model_dir):
    path = write_manifest(tmp_path, model="demo")
    env = {**os.environ, "KHALA_DEMO_DIR": str(demo_model_dir)}
    proc = subprocess.run([sys.executable, "-m", "khala_cli", "render", str(path), "--devices",
                           "cpu"], capture_output=True, text=True, cwd=tmp_path, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    # Not a terminal: plain timestamped lines, and the demo warning.
    assert re.search(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\dZ .*rendered night-wind s1", proc.stderr,
                     re.M), proc.stderr
    assert "untrained" in proc.stderr
    assert "rendered" in proc.stdout and "report:" in proc.stdout
    for job, seed in (("night-wind", 1), ("night-wind", 2), ("lofi", 7)):
        side = json.loads((tmp_path / "out" / job / f"{job}-s{seed}.json").read_text())
        assert side["seed"] == seed and side["model"]["demo"] is True
    csv_text = (tmp_path / "out" / "reports" / "latest.csv").read_text()
    assert csv_text.count(",rendered,") == 3


@pytest.mark.slow
def test_mp3_failure_fails_the_render_and_keeps_the_others(tmp_path, demo_model_dir):
    write_manifest(tmp_path, model="demo")
    path = tmp_path / "jobs.yaml"
    # An ffmpeg that passes the pre-flight check (it lists libmp3lame) but cannot encode.
    fake = tmp_path / "ffmpeg"
    fake.write_text("#!/bin/sh\ncase \"$*\" in *-encoders*) echo ' A..... libmp3lame'; "
                    "exit 0;; esac\necho 'Error opening output: disk on fire' >&2\nexit 1\n")
    fake.chmod(0o755)
    env = {**os.environ, "KHALA_DEMO_DIR": str(demo_model_dir), "KHALA_FFMPEG": str(fake)}
    proc = subprocess.run([sys.executable, "-m", "khala_cli", "render", str(path), "--devices",
                           "cpu", "--only", "lofi", "--retries", "0"], capture_output=True,
                          text=True, cwd=tmp_path, env=env, timeout=600)
    assert proc.returncode == 1, proc.stderr
    assert "MP3 encoding failed" in proc.stderr
    rep = json.loads((tmp_path / "out" / "reports" / "latest.json").read_text())
    (e,) = rep["renders"]
    assert e["status"] == "failed" and "MP3 encoding failed" in e["error"]
    assert "disk on fire" in e["error"]
    # encoding comes before any write: nothing under the take's names, and the rendered take
    # is kept whole for the next attempt, which only writes it
    for suffix in (".wav", ".mp3", ".json"):
        assert not (tmp_path / "out" / "lofi" / f"lofi-s7{suffix}").exists()
    assert len(list((tmp_path / "out" / ".khala" / "work").glob("lofi-s7.*.take.npz"))) == 1


@pytest.mark.slow
def test_render_on_a_terminal_shows_the_progress_display(tmp_path, demo_model_dir):
    import pty
    import select

    path = tmp_path / "jobs.yaml"
    path.write_text("model: demo\noutput_dir: out\njobs:\n  - id: one\n    mode: instrumental\n"
                    "    tags: [Ambient]\n    max_minutes: 0.05\n")
    env = {**os.environ, "KHALA_DEMO_DIR": str(demo_model_dir), "COLUMNS": "120",
           "TERM": "xterm"}
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "khala_cli", "render", str(path),
                             "--devices", "cpu"], stdin=slave, stdout=slave, stderr=slave,
                            cwd=tmp_path, env=env, close_fds=True)
    os.close(slave)
    chunks = []
    while True:
        ready, _, _ = select.select([master], [], [], 300)
        if not ready:
            proc.kill()
            break
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    assert proc.wait(timeout=60) == 0
    os.close(master)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", b"".join(chunks).decode("utf-8", "replace"))
    assert "all renders" in text and "ETA" in text  # the overall bar
    assert "cpu:0 one s1" in text  # the worker's line
    assert "khala render: summary" in text
    assert not re.search(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\dZ ", text, re.M)  # no plain lines


def test_missing_mp3_encoder_exits_3_before_rendering(tmp_path, monkeypatch):
    write_model_json(tmp_path / "model")
    path = write_manifest(tmp_path)
    fake = tmp_path / "ffmpeg"
    fake.write_text("#!/bin/sh\necho ' A..... aac'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("KHALA_FFMPEG", str(fake))
    r = invoke("render", path, "--devices", "cpu")
    assert r.exit_code == 3 and "no libmp3lame" in r.output
    assert not (tmp_path / "out").exists()
    monkeypatch.setenv("KHALA_FFMPEG", str(tmp_path / "nothing-here"))
    r = invoke("validate", path)
    assert r.exit_code == 3 and "cannot run ffmpeg" in r.output


def test_output_dir_that_is_a_file_exits_3(tmp_path):
    write_model_json(tmp_path / "model")
    path = write_manifest(tmp_path)
    (tmp_path / "out").write_text("not a folder")
    r = invoke("render", path, "--devices", "cpu")
    assert r.exit_code == 3 and "cannot create the output directory" in r.output


@pytest.mark.slow
def test_interrupt_exits_130_and_writes_the_report(tmp_path, demo_model_dir):
    import signal
    import time

    path = write_manifest(tmp_path, model="demo")
    env = {**os.environ, "KHALA_DEMO_DIR": str(demo_model_dir)}
    proc = subprocess.Popen([sys.executable, "-m", "khala_cli", "render", str(path),
                             "--devices", "cpu"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=env)
    # Wait for the first render to start, then interrupt: the run stops handing out work.
    # A reader thread feeds a queue, so the deadline holds even while no line comes.
    import queue
    import threading

    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stderr] and None,
                     daemon=True).start()
    deadline = time.monotonic() + 300
    seen = []
    while True:
        left = deadline - time.monotonic()
        assert left > 0, "no backbone progress within 300 s: " + "".join(seen)
        try:
            line = lines.get(timeout=left)
        except queue.Empty:
            continue
        seen.append(line)
        if " backbone " in line:
            break
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=300)
    err = "".join(seen)
    while not lines.empty():
        err += lines.get()
    assert proc.returncode == 130, err
    rep = json.loads((tmp_path / "out" / "reports" / "latest.json").read_text())
    s = rep["summary"]
    assert s["interrupted"] is True and s["exit_code"] == 130
    assert s["rendered"] + s["cancelled"] == 3 and s["cancelled"] >= 1
    assert outputs.temp_files(tmp_path / "out") == []
    assert not (tmp_path / "out" / ".khala" / "lock").exists()


@pytest.mark.parametrize("cmd", ["plan", "validate"])
def test_the_demo_warning_is_said_once(tmp_path, demo_model_dir, cmd):
    """The demo model is named as untrained noise, once, by a real process (stdout and stderr
    together, as a terminal shows them)."""
    args = [cmd, "jobs/demo.yaml"] + (["--output-dir", str(tmp_path)] if cmd == "plan" else [])
    proc = subprocess.run([str(Path(sys.executable).with_name("khala")), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    both = proc.stdout + proc.stderr
    assert both.count("untrained") == 1, both
