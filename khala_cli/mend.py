"""Re-rolls and extensions: a finished take on disk and a time -> the renders that continue it.

A re-roll keeps its parent's first frames (the cut, snapped to a whole frame) and renders the
rest again at new seeds; an extension keeps the whole parent and continues it to a later
time. Both take the parent's prompt and settings from its sidecar, and their render key
derives from the parent's key, the cut and the seed: a parent rendered again with other
settings gives its re-rolls new keys, so they are rendered again against it (keepers stay,
as any keeper does). No torch here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import soundfile as sf

from khala_cli import outputs
from khala_cli.manifest.checks import clock
from khala_cli.manifest.jobs import Job, Manifest, ParentSpec, job_dir
from khala_cli.plan import Render, render_key, until_of

REROLL, EXTEND = "reroll", "extend"


class MendError(ValueError):
    """A re-roll or extension that cannot be made (exit 2): the message names the take and
    the value; `field` is the manifest field it came from (reroll.take, extend.to, ...)."""

    def __init__(self, message: str, field: str = "") -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class Parent:
    """A finished take read back: its sidecar and the numbers a continuation needs."""

    job_id: str
    seed: int
    sidecar: Path
    data: dict[str, Any]
    frames: int  # codec frames (q0/q1 pairs) of the take
    hop: int  # audio samples per frame
    sample_rate: int

    @property
    def take(self) -> str:
        return f"{self.job_id}:{self.seed}"

    @property
    def seconds(self) -> float:
        return self.frames * self.hop / self.sample_rate

    def path(self, kind: str) -> Path:
        return self.sidecar.parent / self.data["files"][kind]

    def frames_at(self, seconds: float) -> int:
        """The whole frame nearest to a time."""
        return int(round(seconds * self.sample_rate / self.hop))

    def time_of(self, frames: int) -> float:
        return frames * self.hop / self.sample_rate


def read_parent(output_dir: Path, job_id: str, seed: int) -> Parent:
    """The finished take JOB:SEED of an output directory, with its codes; MendError names
    what is missing and how to get it."""
    take = f"{job_id}:{seed}"
    try:
        folder = job_dir(output_dir, job_id)
    except ValueError as exc:
        raise MendError(f"{take}: {exc}", "take") from None
    side = folder / f"{job_id}-s{seed}.json"
    data = outputs.read_sidecar(side)
    if data is None:
        raise MendError(f"{take}: no take in {output_dir} ({_known(output_dir, job_id)})",
                        "take")
    files = data.get("files") or {}
    if "wav" not in files or not (side.parent / files["wav"]).is_file():
        raise MendError(f"{take}: the take is not complete (its WAV is missing): render it "
                        "again first", "take")
    if "codes" not in files or not (side.parent / files["codes"]).is_file():
        raise MendError(f"{take}: the take has no codes (<stem>.codes.npy), so it cannot be "
                        "continued: it was rendered with save_codes off. Render it again with "
                        f"codes (`khala render MANIFEST --only {job_id} --force --save-codes`; "
                        "the same settings give the same take)", "take")
    try:
        samples = sf.info(str(side.parent / files["wav"])).frames
    except (OSError, RuntimeError) as exc:
        raise MendError(f"{take}: cannot read its WAV: {exc}", "take") from None
    frames = int((data.get("tokens") or {}).get("backbone", 0)) // 2
    if frames < 1:
        raise MendError(f"{take}: the take has no frames to continue", "take")
    return Parent(job_id, int(seed), side, data, frames, samples // frames,
                  int(data["audio"]["sample_rate"]))


def _known(output_dir: Path, job_id: str) -> str:
    folder = Path(output_dir) / job_id
    seeds = sorted(int(p.stem.rsplit("-s", 1)[1]) for p in folder.glob(f"{job_id}-s*.json")
                   if p.stem.rsplit("-s", 1)[1].isdigit()) if folder.is_dir() else []
    if seeds:
        return f"job {job_id} has seeds {', '.join(map(str, seeds))}"
    return f"no job {job_id!r} there"


@dataclass(frozen=True)
class Cut:
    """Where a continuation starts and ends, in frames of the parent."""

    kind: str
    kept_frames: int
    to_frames: int | None  # extend: the new take's length; reroll: None (the parent's cap)


def cut(parent: Parent, spec: ParentSpec, *, fingerprint: str, max_seq_len: int) -> Cut:
    """Check a re-roll or extension of `parent` against the model and the take's length."""
    model = (parent.data.get("model") or {}).get("fingerprint")
    if model and model != fingerprint:
        raise MendError(f"{parent.take} was rendered by another model (fingerprint "
                        f"{model[:12]}, this model is {fingerprint[:12]}): a take continues "
                        "only on the model that made it", "take")
    end = parent.seconds
    if spec.kind == REROLL:
        kept = parent.frames_at(spec.seconds)
        if spec.seconds <= 0 or kept < 1:
            raise MendError(f"{parent.take}: from {clock(spec.seconds)} keeps nothing; "
                            "give a time after 0", spec.field)
        if kept >= parent.frames:
            raise MendError(f"{parent.take}: from {clock(spec.seconds)} is at or past the "
                            f"take's end ({clock(end)}); to continue past it use extend",
                            spec.field)
        return Cut(REROLL, kept, None)
    prompt = int((parent.data.get("tokens") or {}).get("prompt", 0))
    longest = (max_seq_len - prompt) // 2
    to = parent.frames_at(spec.seconds)
    if to <= parent.frames:
        raise MendError(f"{parent.take}: to {clock(spec.seconds)} is not past the take's end "
                        f"({clock(end)})", spec.field)
    if to > longest:
        raise MendError(f"{parent.take}: to {clock(spec.seconds)} is past the model's length "
                        f"({max_seq_len} positions, {prompt} of them the prompt): the longest "
                        f"is {clock(math.floor(parent.time_of(longest) * 10) / 10)}",
                        spec.field)
    return Cut(EXTEND, parent.frames, to)


# The sidecar fields a continuation copies: its prompt and settings are its parent's.
_COPIED = ("mode", "prompt_mode", "prompt", "lyrics", "top_k_bb", "top_k_sr", "temperature")
_CATALOGUE = ("artist", "album", "year", "genre")


def child_renders(parent: Parent, c: Cut, job: Job, output_dir: Path, *, fingerprint: str,
                  save_codes: bool) -> list[Render]:
    """The renders of `job` (one per seed) continuing `parent` at cut `c`."""
    d = parent.data
    record = {"job_id": parent.job_id, "seed": parent.seed, "render_key": d["render_key"],
              "kind": c.kind, "kept_frames": c.kept_frames, "frames": parent.frames,
              "to_frames": c.to_frames, "cut_s": round(parent.time_of(c.kept_frames), 3),
              "sidecar": str(parent.sidecar), "wav": str(parent.path("wav")),
              "codes": str(parent.path("codes"))}
    cap = int(d["max_new_tokens"]) if c.to_frames is None else 2 * c.to_frames
    out_dir = job_dir(output_dir, job.id)
    catalogue = {k: d.get(k) or ("" if k != "year" else None) for k in _CATALOGUE}
    catalogue |= {k: getattr(job, k) for k in _CATALOGUE if getattr(job, k) not in ("", None)}
    return [Render(
        job_id=job.id, seed=int(seed),
        key=render_key({"parent": d["render_key"], "kind": c.kind, "kept_frames": c.kept_frames,
                        "to_frames": c.to_frames, "seed": int(seed)}, fingerprint),
        out_dir=str(out_dir), stem=f"{job.id}-s{seed}", title=job.title or d.get("title", ""),
        track=job.track, job_index=job.index, tags=tuple(d.get("tags") or ()),
        save_codes=save_codes, extra={"line": job.line}, parent=record, until=until_of(job),
        duration=int(d["duration_min"]), max_new_tokens=cap,
        **{k: d[k] for k in _COPIED}, **catalogue,
    ) for seed in job.seeds]


@dataclass
class Children:
    """The continuations of a manifest: renders ready to plan, and jobs whose parent take is
    still to be rendered in this run (they are planned once it is)."""

    renders: list[Render]
    waiting: list[Job]


def manifest_children(m: Manifest, *, fingerprint: str, max_seq_len: int, save_codes: bool,
                      planned: set[tuple[str, int]]) -> Children:
    """The re-roll and extension jobs of a manifest. `planned`: the (job, seed) this run
    renders; a job whose parent is among them waits for it. MendError for the others."""
    out = Children([], [])
    for job in m.jobs:
        spec = job.parent
        if spec is None:
            continue
        if (spec.job_id, spec.seed) in planned:
            out.waiting.append(job)
            continue
        try:
            parent = read_parent(m.output_dir, spec.job_id, spec.seed)
            c = cut(parent, spec, fingerprint=fingerprint, max_seq_len=max_seq_len)
        except MendError as exc:
            fld = exc.field if "." in exc.field else f"{spec.kind}.{exc.field or 'take'}"
            raise MendError(f"{m.path}:{spec.line}: job '{job.id}', field '{fld}': {exc}",
                            fld) from None
        out.renders += child_renders(parent, c, job, m.output_dir, fingerprint=fingerprint,
                                     save_codes=save_codes)
    return out
