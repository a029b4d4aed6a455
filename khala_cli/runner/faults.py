"""Test-only failpoints: a worker crashes, hangs, runs out of memory or fails on purpose.

They fire only when the test harness asks for them explicitly: `RunOptions.test_faults`
(the hidden `khala render --test-faults SPEC` option), passed to each worker on its command
line. Nothing is read from the environment, so a variable left in a shell profile, a CI
environment or a Slurm job can never fire one; the parent warns loudly whenever any are set.

SPEC is a comma-separated list of `kind:job_id`, acting when the worker processes a batch
holding that job:
    crash / crash_once        SIGKILL itself at the first progress event (mid-render)
    hang / hang_once          stop answering at the first progress event
    hang_after_backbone       stop answering once the backbone tokens are saved
    oom / oom_batch           raise CUDA out-of-memory (oom_batch: only in a batch of > 1)
    fail                      raise an ordinary error for that batch (the worker lives on)
    pause                     create <fault dir>/paused-<job>, wait for <fault dir>/resume-<job>
    enospc                    the take's MP3 write fails with ENOSPC (a full disk)
`*_once` faults act once per fault directory (a marker file there; default
<output_dir>/.khala/test-faults).
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import time
from pathlib import Path

# torch is imported only by the oom fault that raises its error: the worker imports this
# module before it has loaded torch (see worker.py).

KINDS = ("crash", "hang", "hang_after_backbone", "oom", "oom_batch", "fail", "pause", "enospc")
_POINTS = {"progress": ("crash", "hang", "oom", "oom_batch", "fail", "pause"),
           "after_backbone": ("hang_after_backbone",), "write": ("enospc",)}


class FaultSpecError(ValueError):
    pass


def parse(spec: str) -> list[tuple[str, str]]:
    """'crash:a, hang_once:b' -> [("crash", "a"), ("hang_once", "b")]; FaultSpecError if bad."""
    rules = []
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        kind, sep, job = item.partition(":")
        if not sep or kind.removesuffix("_once") not in KINDS or not job:
            raise FaultSpecError(f"bad test fault {item!r} (kinds: {', '.join(KINDS)})")
        rules.append((kind, job))
    return rules


class Faults:
    def __init__(self, spec: str, marker_dir: Path):
        self.rules = parse(spec)
        self.marker_dir = marker_dir

    def __bool__(self) -> bool:
        return bool(self.rules)

    def _once(self, kind: str, job: str) -> bool:
        """True the first time in this fault directory."""
        self.marker_dir.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.marker_dir / f"{kind}-{job}", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return False
        os.close(fd)
        return True

    def fire(self, point: str, job_ids: set[str], batch_size: int) -> None:
        for kind, job in list(self.rules):
            base = kind.removesuffix("_once")
            if job not in job_ids or base not in _POINTS[point]:
                continue
            if base == "oom_batch" and batch_size < 2:
                continue
            if kind.endswith("_once") and not self._once(kind, job):
                continue
            print(f"worker: TEST FAULT {kind}:{job} at {point}", file=sys.stderr, flush=True)
            self._act(base, kind, job)

    def _act(self, base: str, kind: str, job: str) -> None:
        if base == "crash":
            os.kill(os.getpid(), signal.SIGKILL)
        if base in ("hang", "hang_after_backbone"):
            while True:
                time.sleep(3600)
        if base in ("oom", "oom_batch"):
            import torch

            raise torch.cuda.OutOfMemoryError("CUDA out of memory (test fault)")
        if base == "fail":
            raise RuntimeError(f"test fault for job {job}")
        if base == "enospc":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        if base == "pause":
            self.marker_dir.mkdir(parents=True, exist_ok=True)
            (self.marker_dir / f"paused-{job}").touch()
            while not (self.marker_dir / f"resume-{job}").exists():
                time.sleep(0.05)
            self.rules = [(k, j) for k, j in self.rules if (k, j) != (kind, job)]
