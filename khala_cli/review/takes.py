"""The takes on disk of an output directory: finding their sidecars and reading them back.

    <output_dir>/<job_id>/<job_id>-s<seed>.json   a take's sidecar (outputs.py writes it);
                                                  the only files read as takes; a re-roll's
                                                  or an extend's names its `parent`
    <output_dir>/reports/                         run reports and the review page
    <output_dir>/.khala/                          lock, logs, work files

No torch here.
"""

from __future__ import annotations

import glob
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

from khala_cli.analysis import analyse
from khala_cli.manifest.jobs import ID_RE, RESERVED_IDS
from khala_cli.outputs import read_sidecar, write_json


class NotAnOutputDir(Exception):
    """The folder holds no takes, no reports and no khala state."""


@dataclass
class TakeFile:
    """One sidecar on disk; `data` is None when it cannot be read as a take."""

    path: Path
    data: dict[str, Any] | None
    problem: str | None = None

    @property
    def stem(self) -> str:
        return self.path.name[: -len(".json")]


@dataclass(frozen=True)
class Parent:
    """The take a re-roll or an extend continues (a sidecar's `parent` record)."""

    job_id: str
    seed: int
    render_key: str | None
    kind: str  # reroll (cut inside the parent) | extend (cut at the parent's end)
    cut_s: float

    @property
    def take(self) -> tuple[str, int]:
        return self.job_id, self.seed


def parent_of(data: dict[str, Any]) -> Parent | None:
    """A take's parent, or None: a take of its own, or a `parent` record that cannot be read
    (then the take is shown as one of its own)."""
    p = data.get("parent")
    if not isinstance(p, dict):
        return None
    try:
        return Parent(str(p["job_id"]), int(p["seed"]), p.get("render_key"),
                      str(p.get("kind") or "reroll"), float(p["cut_s"]))
    except (KeyError, TypeError, ValueError):
        return None


def sidecar_paths(output_dir: Path) -> list[Path]:
    """Every take sidecar under output_dir, job folder by job folder, sorted.

    Only where takes live: <job_id>/<job_id>-s<seed>.json, in a folder named as a job id can
    be. Anything else (an export inside the output directory and its catalogue.json,
    keepers.json, reports/, .khala/) is khala's own or the user's, never a take."""
    found = []
    for job in sorted(p for p in output_dir.iterdir() if p.is_dir()):
        if not ID_RE.fullmatch(job.name) or job.name in RESERVED_IDS:
            continue
        name = re.compile(rf"{re.escape(job.name)}-s\d+\.json")
        found += sorted(p for p in job.glob(f"{glob.escape(job.name)}-s*.json")
                        if name.fullmatch(p.name))
    return found


def check_output_dir(output_dir: str | Path) -> Path:
    """The path, if it looks like a khala output directory; NotAnOutputDir otherwise."""
    root = Path(output_dir)
    if not root.is_dir():
        raise NotAnOutputDir(f"{root} is not a directory")
    if (root / ".khala").is_dir() or (root / "reports").is_dir() or sidecar_paths(root):
        return root
    raise NotAnOutputDir(f"{root} is not a khala output directory (no take sidecars, no "
                         "reports/ and no .khala/ in it): give the output_dir of a manifest")


def read_take(path: Path) -> TakeFile:
    data = read_sidecar(path)
    if data is None:
        return TakeFile(path, None, "unreadable: not valid JSON")
    missing = [k for k in ("job_id", "seed", "render_key") if k not in data]
    if missing:
        return TakeFile(path, None, f"unreadable: no {', '.join(missing)}")
    return TakeFile(path, data)


def read_takes(output_dir: Path) -> list[TakeFile]:
    return [read_take(p) for p in sidecar_paths(output_dir)]


def _inferred_ended(data: dict[str, Any]) -> str | None:
    """How an old take's backbone ended, from its token count against its cap."""
    tokens = (data.get("tokens") or {}).get("backbone")
    cap = data.get("max_new_tokens")
    if tokens is None or cap is None:
        return None
    return "token_cap" if int(tokens) >= int(cap) - 1 else "end_of_song"


def measure_again(take: TakeFile) -> dict[str, Any]:
    """A take's analysis from its WAV (and saved codes, when there are any)."""
    data = take.data or {}
    files = data.get("files") or {}
    wav = take.path.parent / files.get("wav", f"{take.stem}.wav")
    audio, sr = sf.read(str(wav), dtype="float32", always_2d=True)
    q0 = None
    codes = take.path.parent / files.get("codes", f"{take.stem}.codes.npy")
    if codes.exists():
        q0 = np.load(codes, allow_pickle=False)[0]
    stats = data.get("analysis") or {}  # --force: keep what only the render knew
    ended = stats.get("ended") or _inferred_ended(data)
    result = analyse(audio, sr, q0=q0, ended=ended, logprob_mean=stats.get("logprob_mean"))
    result["measured_from"] = "wav" + ("+codes" if q0 is not None else "")
    if not stats.get("ended") and ended is not None:
        result["inferred"] = ["ended"]
    return result


def backfill(take: TakeFile, force: bool = False) -> bool:
    """Fill in a sidecar's analysis (only where it has none, unless force); True if written.
    Nothing else in the sidecar changes."""
    if take.data is None or ("analysis" in take.data and not force):
        return False
    data = dict(take.data)
    data["analysis"] = measure_again(take)
    write_json(take.path, data)
    take.data = data
    return True


def load_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def latest_reports(output_dir: Path) -> list[dict[str, Any]]:
    """The newest run report of each shard (reports/latest.json, latest-shard-K-of-N.json),
    oldest first: all that the page and `keep` read of the reports, never every run's."""
    found = [d for p in sorted((Path(output_dir) / "reports").glob("latest*.json"))
             if (d := load_json(p)) and isinstance(d.get("summary"), dict)]
    return sorted(found, key=lambda d: str(d.get("started_at") or ""))

