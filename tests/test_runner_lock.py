"""The run lock: exclusive per output directory, names its holder, takes over stale locks."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from khala_cli.runner.lock import LockHeld, RunLock


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _write_lock(out: Path, **holder) -> Path:
    path = out / ".khala" / "lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(holder))
    return path


def test_lock_records_the_holder_and_is_released(tmp_path):
    with RunLock(tmp_path) as lock:
        data = json.loads(lock.path.read_text())
        assert data["pid"] == os.getpid()
        assert data["host"] == socket.gethostname()
        assert data["started_at"].endswith("+00:00")
        assert lock.path == tmp_path / ".khala" / "lock"
    assert not lock.path.exists()
    # no temporary files left next to it
    assert sorted(p.name for p in (tmp_path / ".khala").iterdir()) == ["lock.guard"]


def test_second_lock_names_the_holder(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(LockHeld) as err:
            RunLock(tmp_path).acquire()
    msg = str(err.value)
    assert f"pid {os.getpid()}" in msg and socket.gethostname() in msg
    assert err.value.holder["pid"] == os.getpid()


HOLDER = textwrap.dedent("""
    import sys
    from khala_cli.runner.lock import RunLock, LockHeld
    try:
        lock = RunLock(sys.argv[1]).acquire()
    except LockHeld as exc:
        print("HELD", exc, flush=True)
        sys.exit(75)
    print("GOT", flush=True)
    sys.stdin.read()          # hold until the test closes our stdin
    lock.release()
""")


def _holder(out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)


def test_lock_held_by_another_live_process(tmp_path):
    p = _holder(tmp_path)
    try:
        assert p.stdout.readline().strip() == "GOT"
        with pytest.raises(LockHeld, match=f"pid {p.pid} on host"):
            RunLock(tmp_path).acquire()
    finally:
        p.stdin.close()
        p.wait(timeout=30)
    # released by its holder: free again
    with RunLock(tmp_path):
        pass


def test_stale_lock_of_a_dead_process_is_taken_over_with_a_warning(tmp_path):
    dead = _dead_pid()
    _write_lock(tmp_path, pid=dead, host=socket.gethostname(), started_at="yesterday")
    warnings: list[str] = []
    with RunLock(tmp_path, warn=warnings.append) as lock:
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
        assert lock.taken_over["pid"] == dead
    assert len(warnings) == 1 and f"pid {dead}" in warnings[0] and "stale" in warnings[0]


def test_reused_pid_is_stale(tmp_path):
    # Our own pid is alive, but the lock says it belonged to a process started long ago.
    _write_lock(tmp_path, pid=os.getpid(), host=socket.gethostname(), pid_start=1000.0)
    warnings: list[str] = []
    with RunLock(tmp_path, warn=warnings.append) as lock:
        assert lock.taken_over is not None and lock.taken_over["pid"] == os.getpid()
    (text,) = warnings
    assert text.startswith(f"taking over a stale lock {tmp_path / '.khala' / 'lock'}")
    assert f"left by pid {os.getpid()} on host {socket.gethostname()}" in text
    assert "no longer running" in text


def test_lock_of_another_host_is_never_taken_over(tmp_path):
    _write_lock(tmp_path, pid=_dead_pid(), host="some-other-host", started_at="t")
    with pytest.raises(LockHeld, match="some-other-host"):
        RunLock(tmp_path).acquire()
    assert json.loads((tmp_path / ".khala" / "lock").read_text())["host"] == "some-other-host"


def test_release_leaves_a_lock_that_is_not_ours(tmp_path):
    lock = RunLock(tmp_path).acquire()
    # Someone removed our lock and another run took it: our release must not delete theirs.
    lock.path.unlink()
    other = RunLock(tmp_path).acquire()
    lock.release()
    assert lock.path.exists() and json.loads(lock.path.read_text())["token"] == other.token
    other.release()
    assert not lock.path.exists()


def test_racing_runs_on_a_stale_lock_exactly_one_wins(tmp_path):
    _write_lock(tmp_path, pid=_dead_pid(), host=socket.gethostname())
    procs = [_holder(tmp_path) for _ in range(4)]
    try:
        first = [p.stdout.readline().split(" ", 1)[0].strip() for p in procs]
    finally:
        for p in procs:
            p.stdin.close()
        codes = [p.wait(timeout=60) for p in procs]
    assert sorted(first) == ["GOT", "HELD", "HELD", "HELD"]
    assert sorted(codes) == [0, 75, 75, 75]
