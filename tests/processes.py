"""Helpers for tests that drive real processes: bounded waits and orphan checks."""

from __future__ import annotations

import time

import psutil


def wait_for(pred, what: str, limit: float = 300.0) -> None:
    """Poll until pred() is true. `limit` is a safety net, not an assertion on time."""
    deadline = time.monotonic() + limit
    while not pred():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.05)


def descendants(pid: int) -> list[int]:
    return [p.pid for p in psutil.Process(pid).children(recursive=True)]


def assert_gone(pids, limit: float = 60.0) -> None:
    """Every pid has exited (a zombie counts as gone). `limit` is only a safety net."""
    deadline = time.monotonic() + limit
    alive = set(pids)
    while alive and time.monotonic() < deadline:
        for pid in list(alive):
            try:
                if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                    alive.discard(pid)
            except psutil.NoSuchProcess:
                alive.discard(pid)
        if alive:
            time.sleep(0.1)
    assert not alive, f"processes still running (orphans): {sorted(alive)}"
