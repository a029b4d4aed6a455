"""`khala verify`: every file of every take checked against its sidecar and decoded.

A take is damaged when a file its sidecar names is missing, has another size or hash than
the sidecar records, or does not decode (WAV and MP3 through soundfile, codes through numpy).
Sidecars from before the records are checked by decoding alone. `fix` moves a damaged take's
sidecar aside (to `.khala/damaged/`), so that the next `khala render` renders exactly those
takes again. No torch here.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from khala_cli.review.takes import TakeFile, read_takes

DAMAGED_DIR = Path(".khala") / "damaged"


@dataclass
class Damage:
    sidecar: Path
    file: Path
    problem: str


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _decode(path: Path, kind: str) -> str | None:
    """Why the file does not decode, or None."""
    try:
        if kind == "codes":
            c = np.load(path, allow_pickle=False)
            return None if c.ndim == 2 and c.size else f"codes of shape {c.shape}"
        audio, _ = sf.read(str(path), dtype="float32", always_2d=True)
        return None if audio.shape[0] > 0 else "no audio in it"
    except Exception as exc:  # noqa: BLE001 - any failure to decode is the finding
        return f"does not decode: {type(exc).__name__}: {exc}"


def check_take(take: TakeFile) -> list[Damage]:
    if take.data is None:
        return [Damage(take.path, take.path, take.problem or "unreadable sidecar")]
    files = take.data.get("files") or {}
    records = take.data.get("file_records") or {}
    found = []
    for kind in ("wav", "mp3", "codes"):
        name = files.get(kind)
        if not name:
            continue
        path = take.path.parent / name
        rec = records.get(kind) or {}
        problem = None
        if not path.exists():
            problem = "missing"
        elif "bytes" in rec and path.stat().st_size != rec["bytes"]:
            problem = f"{path.stat().st_size} bytes, the sidecar records {rec['bytes']}"
        elif "sha256" in rec and _sha256(path) != rec["sha256"]:
            problem = "its sha256 differs from the sidecar's record"
        else:
            problem = _decode(path, kind)
        if problem:
            found.append(Damage(take.path, path, problem))
    return found


def verify(output_dir: Path) -> tuple[int, list[Damage]]:
    """(takes checked, every damage found)."""
    takes = read_takes(output_dir)
    return len(takes), [d for t in takes for d in check_take(t)]


def set_aside(output_dir: Path, sidecar: Path) -> Path:
    """Move a damaged take's sidecar under .khala/damaged/ (so it renders again)."""
    dest = output_dir / DAMAGED_DIR / sidecar.relative_to(output_dir)
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(sidecar, dest)
    return dest
