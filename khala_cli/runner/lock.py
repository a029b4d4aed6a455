"""The run lock: one `khala render` per output directory at a time (cron-safe).

`<output_dir>/.khala/lock` holds JSON {pid, host, started, started_at, token, pid_start}. It is
created atomically: the content is written to a private temporary file, then hard-linked to
the lock name, which fails when the lock exists, so no reader ever sees a half-written lock
(where the file system has no hard links, O_CREAT|O_EXCL is used instead). A lock whose
holder is a dead process on this host is stale and is taken over, with a warning.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import psutil

# fcntl is imported where the lock needs it: it exists only on POSIX, and without it the
# takeover guard is skipped.

log = logging.getLogger(__name__)

LOCK_NAME = "lock"


class LockHeld(Exception):
    """Another live run holds the output directory (the CLI exits 75)."""

    def __init__(self, path: Path, holder: dict):
        self.path = path
        self.holder = holder
        super().__init__(describe_holder(path, holder))


def describe_holder(path: Path, holder: dict) -> str:
    pid = holder.get("pid", "?")
    host = holder.get("host", "?")
    since = holder.get("started_at", "an unknown time")
    return (f"another khala run holds {path}: pid {pid} on host {host}, started {since}. "
            f"Wait for it to finish, or delete the lock file if that run is gone.")


def _pid_start(pid: int) -> float | None:
    """When a process started (to tell a reused pid from the holder), or None."""
    try:
        return psutil.Process(pid).create_time()
    except Exception:
        return None


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def holder_is_stale(holder: dict) -> bool:
    """True when the holder is a process on this host that is gone (or whose pid was reused)."""
    if holder.get("host") != socket.gethostname():
        return False  # another machine: we cannot tell; never take it over
    try:
        pid = int(holder.get("pid"))
    except (TypeError, ValueError):
        return False
    if not _pid_alive(pid):
        return True
    recorded = holder.get("pid_start")
    if recorded is not None:
        actual = _pid_start(pid)
        if actual is not None and abs(actual - float(recorded)) > 1.0:
            return True  # the pid now belongs to another process
    return False


def read_holder(path: Path) -> dict | None:
    """The lock's content; {} when it exists but is unreadable; None when it is absent."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError:
        return {}
    try:
        data = json.loads(text)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


class RunLock:
    """`with RunLock(output_dir):` — raises LockHeld when another live run holds it."""

    def __init__(self, output_dir: str | Path, warn: Callable[[str], None] | None = None):
        self.dir = Path(output_dir) / ".khala"
        self.path = self.dir / LOCK_NAME
        self.token = uuid.uuid4().hex
        self.warn = warn or log.warning
        self.taken_over: dict | None = None  # the stale holder we replaced, if any
        self.held = False

    def _content(self) -> bytes:
        now = time.time()
        return json.dumps({
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": now,
            "started_at": datetime.fromtimestamp(now, timezone.utc).isoformat(timespec="seconds"),
            "pid_start": _pid_start(os.getpid()),
            "token": self.token,
        }).encode()

    def _try_create(self) -> bool:
        """Create the lock with its full content; False when it already exists."""
        tmp = self.dir / f".lock.{os.getpid()}.{self.token[:8]}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, self._content())
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
                raise
            return self._create_excl()  # no hard links here
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)

    def _create_excl(self) -> bool:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        try:
            os.write(fd, self._content())
            os.fsync(fd)
        finally:
            os.close(fd)
        return True

    @contextlib.contextmanager
    def _guard(self):
        """Serialise stale-lock takeover between runs racing for the same directory."""
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            yield
            return
        fd = os.open(self.dir / "lock.guard", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError:
                pass  # a file system without flock: the link/O_EXCL step still decides
            yield
        finally:
            os.close(fd)

    def acquire(self) -> RunLock:
        self.dir.mkdir(parents=True, exist_ok=True)
        with self._guard():
            for _ in range(50):
                if self._try_create():
                    self.held = True
                    return self
                holder = read_holder(self.path)
                if holder is None:
                    continue  # released between our two looks: try again
                if holder == {}:
                    # Unreadable: a lock being written with O_EXCL, or garbage. Give a writer
                    # a moment; garbage older than a minute is treated as stale.
                    try:
                        age = time.time() - self.path.stat().st_mtime
                    except FileNotFoundError:
                        continue
                    if age < 60:
                        time.sleep(0.05)
                        holder = read_holder(self.path)
                        if holder is None or holder:
                            continue
                        raise LockHeld(self.path, {})
                elif not holder_is_stale(holder):
                    raise LockHeld(self.path, holder)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)
                self.taken_over = holder
                self.warn(
                    f"taking over a stale lock {self.path} left by pid {holder.get('pid', '?')} "
                    f"on host {holder.get('host', '?')} (started {holder.get('started_at', '?')}), "
                    "which is no longer running")
        raise LockHeld(self.path, read_holder(self.path) or {})

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        holder = read_holder(self.path)
        if holder and holder.get("token") == self.token:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
