"""What the runner tells its caller while it works, as typed events, and each render's
outcome. No torch here."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

from khala_cli.plan import Render


@dataclass
class Outcome:
    """How one render ended."""

    render: Render
    status: str  # rendered | failed | cancelled | spare (an until-job's, not needed)
    error: str | None = None
    seconds: float = 0.0
    device: str | None = None
    attempts: int = 0
    files: dict[str, str] = field(default_factory=dict)
    log: str | None = None
    passed: bool | None = None  # a rendered until take: whether it passes the gates
    gate_reasons: tuple[str, ...] = ()  # why it does not


@dataclass(frozen=True)
class WorkerChanged:
    """A worker process changed state: starting, loading, ready, busy, stopping, stopped,
    died, stalled, failed or oom."""

    kind: ClassVar[str] = "worker"
    worker: int  # the device slot's index: a replacement worker keeps it
    device: str
    state: str
    pid: int = 0
    log: str = ""  # the worker's stderr log file
    error: str | None = None  # why it failed, died or stalled
    residency: str | None = None  # starting: keep_loaded | one_shot
    renders: tuple[str, ...] = ()  # busy: the stems of its wave
    batches: tuple[int, ...] = ()  # busy: the wave's batch sizes


@dataclass(frozen=True)
class Progress:
    """A worker's progress on the takes of one engine call: seeds[i] of jobs[i] (several
    songs when a batch holds several); job_id is the first take's job."""

    kind: ClassVar[str] = "progress"
    worker: int
    device: str
    job_id: str
    seeds: tuple[int, ...]
    phase: str  # loading_backbone, backbone, loading_superres, superres, loading_decoder, decoding
    done: int
    total: int
    tokens_per_s: float | None = None
    jobs: tuple[str, ...] = ()  # one per seed (empty: every seed is job_id's)

    def takes(self) -> list[tuple[str, int]]:
        """(job, seed) of every take worked on."""
        jobs = self.jobs if len(self.jobs) == len(self.seeds) else (self.job_id,) * len(self.seeds)
        return list(zip(jobs, self.seeds, strict=True))


@dataclass(frozen=True)
class Finished:
    """A render's outcome is final (rendered, failed for good, or cancelled)."""

    kind: ClassVar[str] = "result"
    outcome: Outcome
    resumed: bool = False  # it reused backbone tokens kept by an earlier try


@dataclass(frozen=True)
class Interrupted:
    """The first Ctrl-C / SIGTERM / SIGHUP: no new work; running waves get `grace` seconds."""

    kind: ClassVar[str] = "interrupt"
    grace: float


@dataclass(frozen=True)
class NoSpace:
    """The output disk refused a write: no more work is handed out."""

    kind: ClassVar[str] = "no_space"
    path: str
    error: str


Event = WorkerChanged | Progress | Finished | Interrupted | NoSpace
OnEvent = Callable[[Event], None]
