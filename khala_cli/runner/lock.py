"""The run lock: who may write an output directory now (cron-, Slurm- and Kubernetes-safe).

Each holder has one lock file under `<output_dir>/.khala/`: `lock` for a run of the whole
directory (an unsharded `khala render`, `analyse`, `verify --fix`, `keep`), and
`lock-shard-K-of-N` for shard K of an array of N. The shards of one array hold the directory
together; a run of the whole directory, or a shard of another count, is refused while any of
them holds it, and the refusal names the holder.

A lock file holds JSON {pid, host, pidns, started, started_at, pid_start, token, shard,
purpose, heartbeat_s, stale_after_s}. It is created atomically: the content is written to a
private temporary file, then hard-linked to the lock name, which fails when the lock exists,
so no reader ever sees a half-written lock (where the file system has no hard links,
O_CREAT|O_EXCL is used instead).

The holder's heartbeat is the lock file's mtime: a thread of the holding process touches it
every HEARTBEAT_S seconds, whatever else the process (or its workers) is doing. A lock is
stale, and the next run takes it over with a warning, when
- its heartbeat is older than STALE_AFTER_S, from any host; the age is measured by the file
  system's clock (the lock's mtime against that of a file touched now), never by comparing
  the holder's wall clock with ours; or
- its holder is a process of this host (and PID namespace) that is gone, or whose pid now
  belongs to another process.
Takeovers are serialised by an flock on `lock.guard`; where the file system has no flock, a
takeover moves the stale file aside and checks what it moved, so racing runs still end with
one holder.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path

import psutil

# fcntl is imported where the guard needs it: it exists only on POSIX, and without it the
# takeover guard is skipped.

log = logging.getLogger(__name__)

LOCK_NAME = "lock"
HEARTBEAT_S = 30.0  # the holder touches its lock this often
STALE_AFTER_S = 300.0  # a lock not touched for this long (file system clock) is stale
UNREADABLE_STALE_S = 60.0  # an unreadable lock file older than this is garbage

Shard = tuple[int, int]
_LOCK_FILE = re.compile(r"lock(?:-shard-(\d+)-of-(\d+))?")


def lock_name(shard: Shard | None) -> str:
    return LOCK_NAME if shard is None else f"{LOCK_NAME}-shard-{shard[0]}-of-{shard[1]}"


def _scope_of(name: str) -> Shard | None | bool:
    """The shard a lock file name belongs to; None for the whole directory; False: not a lock."""
    m = _LOCK_FILE.fullmatch(name)
    if not m:
        return False
    return (int(m.group(1)), int(m.group(2))) if m.group(1) else None


def _excludes(a: Shard | None, b: Shard | None) -> bool:
    """Whether holders of scopes a and b may not hold the directory together."""
    return a is None or b is None or a[1] != b[1] or a == b


def span(seconds: float) -> str:
    """A duration for people: '45 s', '12 min', '5.2 h', '2.0 days'."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def _what(holder: dict) -> str:
    """'khala render, shard 0/8' from a lock's content."""
    what = str(holder.get("purpose") or "khala")
    shard = holder.get("shard")
    if isinstance(shard, list) and len(shard) == 2:
        what += f", shard {shard[0]}/{shard[1]}"
    return what


class LockHeld(Exception):
    """Another live run holds the output directory (the CLI exits 75)."""

    def __init__(self, path: Path, holder: dict, age: float | None = None, why: str = ""):
        self.path = path
        self.holder = holder
        super().__init__(describe_holder(path, holder, age) + (f" {why}" if why else ""))


def describe_holder(path: Path, holder: dict, age: float | None = None) -> str:
    pid = holder.get("pid", "?")
    host = holder.get("host", "?")
    since = holder.get("started_at", "an unknown time")
    heard = f", last heartbeat {span(max(0.0, age))} ago" if age is not None else ""
    limit = float(holder.get("stale_after_s") or STALE_AFTER_S)
    return (f"another khala run ({_what(holder)}) holds {path}: pid {pid} on host {host}, "
            f"started {since}{heard}. Wait for it to finish; a lock whose heartbeat stops for "
            f"{span(limit)} is taken over by the next run.")


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


def _pid_namespace() -> str | None:
    with contextlib.suppress(OSError):
        return os.readlink("/proc/self/ns/pid")
    return None


def holder_is_gone(holder: dict) -> bool:
    """True when the holder is a process of this host and PID namespace that is gone (or
    whose pid was reused). Of another host or namespace we cannot tell: False."""
    if holder.get("host") != socket.gethostname():
        return False
    if holder.get("pidns") not in (None, _pid_namespace()):
        return False
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


@contextlib.contextmanager
def flocked(path: Path, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold an exclusive flock on `path` (created if needed) for the block, waiting for it if
    another process holds it (`on_wait` hears that once). Without flock (not POSIX, or a file
    system that refuses it) the block runs unguarded. The kernel drops the flock when its
    holder dies, so it never goes stale."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait:
                on_wait()
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            pass  # a file system without flock
        yield
    finally:
        os.close(fd)


class RunLock:
    """`with RunLock(output_dir, shard=...):` — raises LockHeld when another live run holds
    the directory in a way that excludes this one. Holding it, a thread refreshes the
    heartbeat; if the lock is ever found taken over, `warn` hears it and `on_lost` is called."""

    def __init__(self, output_dir: str | Path, warn: Callable[[str], None] | None = None, *,
                 shard: Shard | None = None, purpose: str = "khala render",
                 heartbeat: float = HEARTBEAT_S, stale_after: float = STALE_AFTER_S,
                 on_lost: Callable[[], None] | None = None):
        self.dir = Path(output_dir) / ".khala"
        self.shard = shard
        self.path = self.dir / lock_name(shard)
        self.purpose = purpose
        self.token = uuid.uuid4().hex
        self.warn = warn or log.warning
        self.heartbeat = heartbeat
        self.stale_after = stale_after
        self.on_lost = on_lost
        self.taken_over: dict | None = None  # the (last) stale holder we replaced, if any
        self.lost: dict | None = None  # who holds our lock now, once it was taken from us
        self.held = False
        self._stop = threading.Event()
        self._beater: threading.Thread | None = None

    # -- the file ----------------------------------------------------------------------------

    def _content(self) -> bytes:
        now = time.time()
        return json.dumps({
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "pidns": _pid_namespace(),
            "started": now,
            "started_at": datetime.fromtimestamp(now, timezone.utc).isoformat(timespec="seconds"),
            "pid_start": _pid_start(os.getpid()),
            "token": self.token,
            "shard": list(self.shard) if self.shard else None,
            "purpose": self.purpose,
            "heartbeat_s": self.heartbeat,
            "stale_after_s": self.stale_after,
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

    def _age(self, path: Path) -> float | None:
        """Seconds since `path` was last touched, by the file system's clock; None if gone."""
        probe = self.dir / f".clock.{os.getpid()}.{self.token[:8]}"
        try:
            os.close(os.open(probe, os.O_WRONLY | os.O_CREAT, 0o644))
            os.utime(probe)  # now, as the file system (the NFS server) stamps it
            now = probe.stat().st_mtime
        finally:
            with contextlib.suppress(OSError):
                probe.unlink()
        try:
            return now - path.stat().st_mtime
        except FileNotFoundError:
            return None

    # -- taking it -------------------------------------------------------------------------

    def _why_stale(self, holder: dict, age: float) -> str | None:
        """Why the lock of `holder`, silent for `age` seconds, is stale; None if it is live."""
        silent = f"its heartbeat has been silent for {span(max(0.0, age))}"
        if not holder:
            return silent if age > UNREADABLE_STALE_S else None
        if holder_is_gone(holder):
            return f"which is no longer running ({silent})"
        limit = float(holder.get("stale_after_s") or self.stale_after)
        if age > limit:
            return f"{silent}, longer than {span(limit)}"
        return None

    def _take_over(self, path: Path, holder: dict) -> bool:
        """Remove the stale lock at `path`; False when another run took it first. The file is
        moved aside before it is removed: if what was moved is not the stale lock (a racing
        run replaced it in between, where there is no flock), it is put back."""
        aside = self.dir / f".{path.name}.stale.{self.token[:8]}"
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            return False
        moved = read_holder(aside)
        if moved != holder:
            with contextlib.suppress(OSError):
                os.link(aside, path)
        with contextlib.suppress(OSError):
            os.unlink(aside)
        return moved == holder

    def _clear(self, path: Path, why_held: str = "") -> None:
        """Take away the lock at `path` when it is stale; LockHeld when its holder is live."""
        holder = read_holder(path)
        if holder == {}:
            time.sleep(0.05)  # a lock being written with O_EXCL: give its writer a moment
            holder = read_holder(path)
        if holder is None:
            return
        age = self._age(path)
        if age is None:
            return  # released meanwhile
        why = self._why_stale(holder, age)
        if why is None:
            raise LockHeld(path, holder, age, why_held)
        if self._take_over(path, holder):
            self.taken_over = holder
            self.warn(f"taking over a stale lock {path} left by pid {holder.get('pid', '?')} "
                      f"on host {holder.get('host', '?')} ({_what(holder)}, started "
                      f"{holder.get('started_at', '?')}), {why}")

    def _rivals(self) -> list[Path]:
        """The other lock files of this directory whose holders exclude us."""
        out = []
        for p in sorted(self.dir.iterdir()):
            scope = _scope_of(p.name)
            if scope is not False and p != self.path and _excludes(self.shard, scope):
                out.append(p)
        return out

    def _why_excluded(self) -> str:
        if self.shard is None:
            return (f"This {self.purpose} needs the whole directory, so it waits until that "
                    "run ends.")
        k, n = self.shard
        return (f"This run, shard {k}/{n}, may run only beside the other shards of an array "
                f"of {n}: otherwise the same takes would be rendered twice.")

    def acquire(self) -> RunLock:
        self.dir.mkdir(parents=True, exist_ok=True)
        with flocked(self.dir / "lock.guard"):
            for _ in range(50):
                if self._try_create():
                    break
                self._clear(self.path)
            else:
                raise LockHeld(self.path, read_holder(self.path) or {})
            try:
                for rival in self._rivals():
                    self._clear(rival, self._why_excluded())
            except BaseException:
                self._unlink_if_ours()
                raise
        self.held = True
        self._stop.clear()
        self._beater = threading.Thread(target=self._beat, name="khala-lock-heartbeat",
                                        daemon=True)
        self._beater.start()
        return self

    # -- holding it ------------------------------------------------------------------------

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat):
            holder = read_holder(self.path)
            if holder == {}:
                continue  # cannot read it now (a network hiccup): try again next time
            if holder is not None and holder.get("token") == self.token:
                with contextlib.suppress(OSError):
                    os.utime(self.path)
                continue
            self.lost = holder or {}
            now = (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} holds it now"
                   if holder else "it is gone")
            self.warn(f"this run's lock {self.path} was taken from it ({now}): this process "
                      f"was silent for longer than {span(self.stale_after)} (was it suspended?)")
            if self.on_lost:
                self.on_lost()
            return

    def _unlink_if_ours(self) -> None:
        holder = read_holder(self.path)
        if holder and holder.get("token") == self.token:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        self._stop.set()
        if self._beater is not None:
            self._beater.join(timeout=10)
        self._unlink_if_ours()

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
