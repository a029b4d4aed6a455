"""The run lock: exclusive per output directory, names its holder, takes over stale locks."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from processes import wait_for

from khala_cli.runner.lock import STALE_AFTER_S, LockHeld, RunLock, read_holder


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


def _age_lock(path: Path, seconds: float) -> None:
    """As if the lock's holder had stopped touching it `seconds` ago."""
    t = path.stat().st_mtime - seconds
    os.utime(path, (t, t))


def test_fresh_lock_of_another_host_is_respected(tmp_path):
    _write_lock(tmp_path, pid=_dead_pid(), host="some-other-host", started_at="t")
    with pytest.raises(LockHeld, match="some-other-host") as err:
        RunLock(tmp_path).acquire()
    assert "last heartbeat 0 s ago" in str(err.value)
    assert json.loads((tmp_path / ".khala" / "lock").read_text())["host"] == "some-other-host"


def test_lock_of_another_host_whose_heartbeat_stopped_is_taken_over(tmp_path):
    # a Slurm node that died two days ago: its lock no longer blocks the requeued task
    path = _write_lock(tmp_path, pid=4242, host="node-17", started_at="two days ago")
    _age_lock(path, 2 * 86400)
    warnings: list[str] = []
    with RunLock(tmp_path, warn=warnings.append) as lock:
        assert json.loads(lock.path.read_text())["token"] == lock.token
        assert lock.taken_over["host"] == "node-17"
    (text,) = warnings
    assert "stale lock" in text and "pid 4242 on host node-17" in text
    assert "silent for 2.0 days" in text


def test_age_is_the_file_systems_clock_not_the_holders(tmp_path):
    # The content says the holder started in 1970 (its clock is wrong), the file system says
    # it touched the lock just now: respected.
    _write_lock(tmp_path, pid=4242, host="node-17", started=0.0, started_at="1970")
    with pytest.raises(LockHeld):
        RunLock(tmp_path).acquire()
    # The content claims now, but nothing touched the file for longer than the timeout.
    path = _write_lock(tmp_path, pid=4242, host="node-17", started=time.time())
    _age_lock(path, STALE_AFTER_S + 60)
    with RunLock(tmp_path) as lock:
        assert lock.taken_over["host"] == "node-17"


def test_the_holder_refreshes_its_heartbeat(tmp_path):
    with RunLock(tmp_path, heartbeat=0.05) as lock:
        _age_lock(lock.path, 3600)
        # the heartbeat thread touches it again, by the file system's clock
        wait_for(lambda: lock._age(lock.path) < 3600, "the heartbeat to touch the lock")
        data = json.loads(lock.path.read_text())
        assert data["heartbeat_s"] == 0.05 and data["stale_after_s"] == STALE_AFTER_S
        # a run starting now sees a live holder
        with pytest.raises(LockHeld):
            RunLock(tmp_path).acquire()


def test_a_holder_whose_lock_was_taken_says_so_and_is_told(tmp_path):
    warnings: list[str] = []
    told: list[bool] = []
    lock = RunLock(tmp_path, warn=warnings.append, heartbeat=0.05,
                   on_lost=lambda: told.append(True)).acquire()
    try:
        # it was suspended longer than the timeout, and another run took over meanwhile
        _write_lock(tmp_path, pid=4242, host="node-17", token="theirs")
        wait_for(lambda: told, "the holder to notice")
        assert lock.lost["token"] == "theirs"
        assert "was taken from it (pid 4242 on host node-17 holds it now)" in warnings[0]
    finally:
        lock.release()
    assert json.loads(lock.path.read_text())["token"] == "theirs"  # theirs is left alone


def test_release_leaves_a_lock_that_is_not_ours(tmp_path):
    lock = RunLock(tmp_path).acquire()
    # Someone removed our lock and another run took it: our release must not delete theirs.
    lock.path.unlink()
    other = RunLock(tmp_path).acquire()
    lock.release()
    assert lock.path.exists() and json.loads(lock.path.read_text())["token"] == other.token
    other.release()
    assert not lock.path.exists()


@pytest.mark.parametrize("stale", ["dead pid here", "silent on another host"])
def test_racing_runs_on_a_stale_lock_exactly_one_wins(tmp_path, stale):
    if stale == "dead pid here":
        _write_lock(tmp_path, pid=_dead_pid(), host=socket.gethostname())
    else:
        _age_lock(_write_lock(tmp_path, pid=4242, host="node-17"), STALE_AFTER_S + 1)
    procs = [_holder(tmp_path) for _ in range(4)]
    try:
        first = [p.stdout.readline().split(" ", 1)[0].strip() for p in procs]
    finally:
        for p in procs:
            p.stdin.close()
        codes = [p.wait(timeout=60) for p in procs]
    assert sorted(first) == ["GOT", "HELD", "HELD", "HELD"]
    assert sorted(codes) == [0, 75, 75, 75]


def test_a_takeover_that_lost_the_race_puts_the_winners_lock_back(tmp_path):
    # Without flock, two runs may both read the stale lock; the one that moves it second
    # moves the winner's fresh lock instead, sees that, and puts it back.
    stale = _write_lock(tmp_path, pid=_dead_pid(), host=socket.gethostname())
    seen = read_holder(stale)
    late = RunLock(tmp_path)
    late.dir.mkdir(exist_ok=True)
    with RunLock(tmp_path) as winner:
        assert late._take_over(winner.path, seen) is False
        assert json.loads(winner.path.read_text())["token"] == winner.token
        assert sorted(p.name for p in winner.dir.iterdir()) == ["lock", "lock.guard"]


# -- shards: the shards of one array together; nothing else beside them ------------------------


def test_shards_of_one_array_hold_the_directory_together(tmp_path):
    with RunLock(tmp_path, shard=(0, 8)) as first, RunLock(tmp_path, shard=(1, 8)) as second:
        assert first.path.name == "lock-shard-0-of-8" and second.path.name == "lock-shard-1-of-8"
        with pytest.raises(LockHeld, match=r"\(khala render, shard 0/8\)"):
            RunLock(tmp_path, shard=(0, 8)).acquire()  # the same shard twice


@pytest.mark.parametrize("refused", [(0, 4), None], ids=["another count", "unsharded"])
def test_a_different_shard_count_or_an_unsharded_run_is_refused_beside_a_shard(tmp_path,
                                                                             refused):
    with RunLock(tmp_path, shard=(0, 8)):
        with pytest.raises(LockHeld) as err:
            RunLock(tmp_path, shard=refused).acquire()
    msg = str(err.value)
    assert "(khala render, shard 0/8) holds" in msg and "lock-shard-0-of-8: " in msg
    assert f"pid {os.getpid()}" in msg
    assert "rendered twice" in msg if refused else "whole directory" in msg
    # the refused run left no lock of its own
    assert sorted(p.name for p in (tmp_path / ".khala").iterdir()) == ["lock.guard"]


def test_a_shard_is_refused_beside_a_run_of_the_whole_directory(tmp_path):
    with RunLock(tmp_path, purpose="khala analyse"):
        with pytest.raises(LockHeld, match=r"\(khala analyse\) holds"):
            RunLock(tmp_path, shard=(3, 4)).acquire()


def test_a_stale_shard_lock_does_not_block_the_whole_directory(tmp_path):
    stale = tmp_path / ".khala" / "lock-shard-2-of-4"
    stale.parent.mkdir()
    stale.write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname(),
                                 "shard": [2, 4], "purpose": "khala render"}))
    warnings: list[str] = []
    with RunLock(tmp_path, warn=warnings.append):
        assert not stale.exists()
    assert "lock-shard-2-of-4" in warnings[0] and "shard 2/4" in warnings[0]
