"""Keepers: the takes a person chose, marked in one file of the output directory.

    <output_dir>/keepers.json   {"version": 1, "keepers": [{"job_id", "seed"}, ...],
                                 "updated_at": ...}, written atomically

A take is named `JOB:SEED`. Only rendered takes (a readable sidecar whose files exist) can be
kept. `--top N` keeps the N best-scored unflagged takes of each job. The review page and the
CLI share one command format (`keep_command`). No torch here.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from khala_cli.outputs import write_bytes
from khala_cli.review.takes import TakeFile, latest_reports, load_json, read_takes

KEEPERS = "keepers.json"
TAKE_RE = re.compile(r"^(?P<job>[a-z0-9][a-z0-9._-]*):(?P<seed>\d+)$")

TakeId = tuple[str, int]


class KeepError(Exception):
    """A take that cannot be kept or dropped; the message names it."""


@dataclass
class Takes:
    """The rendered takes of an output directory, by (job, seed), and the jobs it knows."""

    rendered: dict[TakeId, dict[str, Any]]
    failed: set[TakeId]
    jobs: set[str]


def parse_take(text: str) -> TakeId:
    m = TAKE_RE.match(text.strip())
    if not m:
        raise KeepError(f"{text!r} is not a take: write JOB:SEED (for example night-wind:3)")
    return m["job"], int(m["seed"])


def _files_exist(t: TakeFile) -> bool:
    files = (t.data or {}).get("files") or {}
    return bool(files) and all((t.path.parent / n).exists() for n in files.values())


def takes_of(output_dir: Path) -> Takes:
    rendered, jobs = {}, set()
    for t in read_takes(output_dir):
        if t.data is None:
            continue
        jobs.add(str(t.data["job_id"]))
        if _files_exist(t):
            rendered[(str(t.data["job_id"]), int(t.data["seed"]))] = dict(t.data, _path=t.path)
    failed = set()
    for report in latest_reports(output_dir):
        for e in report.get("renders") or []:
            jobs.add(str(e.get("job_id")))
            if e.get("status") in ("failed", "cancelled"):
                failed.add((str(e.get("job_id")), int(e.get("seed", -1))))
    return Takes(rendered, failed - set(rendered), jobs)


def check_keepable(takes: Takes, take: TakeId) -> None:
    job, seed = take
    if take in takes.rendered:
        return
    if job not in takes.jobs:
        raise KeepError(f"{job}:{seed}: no job {job!r} in this output directory")
    if take in takes.failed:
        raise KeepError(f"{job}:{seed}: this take failed; it has no audio to keep")
    raise KeepError(f"{job}:{seed}: job {job!r} has no rendered take with seed {seed}")


def read_marks(output_dir: Path) -> list[TakeId]:
    """The keepers, in the order they were marked (an absent file: none)."""
    data = load_json(Path(output_dir) / KEEPERS) or {}
    out = []
    for k in data.get("keepers") or []:
        if isinstance(k, dict) and "job_id" in k and "seed" in k:
            out.append((str(k["job_id"]), int(k["seed"])))
    return out


def write_marks(output_dir: Path, marks: list[TakeId]) -> Path:
    path = Path(output_dir) / KEEPERS
    data = {"version": 1, "keepers": [{"job_id": j, "seed": s} for j, s in marks],
            "updated_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
    write_bytes(path, (json.dumps(data, indent=2) + "\n").encode("utf-8"))
    return path


def best_unflagged(takes: Takes, n: int, only: set[str] | None = None) -> list[TakeId]:
    """The n best-scored unflagged takes of every job (or of the `only` jobs)."""
    by_job: dict[str, list[tuple[float, int]]] = {}
    for (job, seed), data in takes.rendered.items():
        a = data.get("analysis") or {}
        if (only and job not in only) or a.get("flags") or a.get("score") is None:
            continue
        by_job.setdefault(job, []).append((float(a["score"]), seed))
    out = []
    for job in sorted(by_job):
        out += [(job, seed) for _, seed in sorted(by_job[job], key=lambda x: (-x[0], x[1]))[:n]]
    return out


def apply(output_dir: Path, keep: list[TakeId], drop: list[TakeId], *, top: int | None = None,
          only: set[str] | None = None) -> tuple[list[TakeId], list[TakeId]]:
    """Check every take named, then update the marks; (kept now, dropped). Nothing is
    written when any take is bad (KeepError names every one)."""
    takes = takes_of(output_dir)
    problems = []
    for t in keep:
        try:
            check_keepable(takes, t)
        except KeepError as exc:
            problems.append(str(exc))
    for job in sorted(only or ()):
        if job not in takes.jobs:
            problems.append(f"--only {job}: no job {job!r} in this output directory")
    if problems:
        raise KeepError("\n".join(problems))
    wanted = list(keep) + (best_unflagged(takes, top, only) if top else [])
    marks = read_marks(output_dir)
    for t in wanted:
        if t not in marks:
            marks.append(t)
    dropped = [t for t in drop if t in marks]
    marks = [t for t in marks if t not in set(drop)]
    write_marks(output_dir, marks)
    return marks, dropped


def keep_command(output_dir: str, keep: list[TakeId], drop: list[TakeId]) -> str:
    """The exact shell command that applies these changes."""
    words = ["khala", "keep", output_dir] + [f"{j}:{s}" for j, s in keep]
    for j, s in drop:
        words += ["--drop", f"{j}:{s}"]
    return shlex.join(words)
