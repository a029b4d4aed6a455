"""Jobs x seeds -> renders: stable keys, output paths, done/skip decisions, shards.

No torch here: the parent process plans.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Render:
    """One take to render: one job at one seed. Everything a worker needs, JSON-serialisable."""

    job_id: str
    seed: int
    key: str  # render key: hash of every audio-changing setting + model fingerprint
    out_dir: str  # <output_dir>/<job_id>, absolute
    stem: str  # "<job_id>-s<seed>"; files are <out_dir>/<stem>.wav|.mp3|.json|.codes.npy
    title: str = ""
    artist: str = ""
    album: str = ""
    mode: str = "vocal"  # vocal | instrumental
    prompt_mode: str = "tags"  # tags | natural
    tags: tuple[str, ...] = ()
    prompt: str = ""
    lyrics: str = ""  # cleaned
    duration: int = 3  # minutes: the duration token
    top_k_bb: int = 80
    top_k_sr: int = 10
    temperature: float = 1.0
    max_new_tokens: int = 23552  # backbone cap, from max_minutes
    save_codes: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def path(self, suffix: str) -> Path:
        """Output file path for a suffix such as '.wav', '.mp3', '.json', '.codes.npy'."""
        return Path(self.out_dir) / f"{self.stem}{suffix}"

    @property
    def batch_group(self) -> tuple:
        """Renders with equal groups differ only by seed and may share one batched forward."""
        return (self.job_id, self.mode, self.prompt_mode, self.tags, self.prompt, self.lyrics,
                self.duration, self.top_k_bb, self.top_k_sr, self.temperature,
                self.max_new_tokens)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["tags"] = list(self.tags)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Render:
        d = dict(d)
        d["tags"] = tuple(d.get("tags", ()))
        return cls(**d)
