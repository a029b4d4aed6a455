"""Jobs x seeds -> renders: stable keys, output paths, done/skip decisions, shards.

No torch here: the parent process plans.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from khala_cli import model_numbers as mn
from khala_cli.manifest.jobs import Job, Manifest, job_dir


@dataclass(frozen=True)
class Render(mn.Controls):
    """One take to render: one job at one seed. Everything a worker needs, JSON-serialisable.
    The sampling controls are the Controls fields (duration, top-k, temperature, cap)."""

    job_id: str
    seed: int
    key: str  # render key: hash of every audio-changing setting + model fingerprint
    out_dir: str  # <output_dir>/<job_id>, absolute
    stem: str  # "<job_id>-s<seed>"; files are <out_dir>/<stem>.wav|.mp3|.json|.codes.npy
    title: str = ""
    artist: str = ""
    album: str = ""
    track: int | None = None  # catalogue fields: like the title, not part of the key
    year: int | None = None
    genre: str = ""
    job_index: int = 0  # the job's place in the manifest: the track number without `track`
    mode: str = "vocal"  # vocal | instrumental
    prompt_mode: str = "tags"  # tags | natural
    tags: tuple[str, ...] = ()
    prompt: str = ""
    lyrics: str = ""  # cleaned
    save_codes: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    # An until-job's roll, the same on each of its renders (not in the key): {passing: K,
    # max_takes: M, flags: [...] or None (any flag fails), min_score: float or None}
    until: dict[str, Any] | None = None
    # a re-roll or extension: the parent take it continues (made by mend.child_renders; its
    # key, kind and cut are in the render key): job_id, seed, render_key, kind, kept_frames,
    # frames, to_frames, cut_s, and the paths of the parent's sidecar, wav and codes
    parent: dict[str, Any] | None = None

    def path(self, suffix: str) -> Path:
        """Output file path for a suffix such as '.wav', '.mp3', '.json', '.codes.npy'."""
        return Path(self.out_dir) / f"{self.stem}{suffix}"

    @property
    def batch_group(self) -> tuple:
        """Renders with equal groups differ only by seed and may share one batched forward."""
        cut = None if self.parent is None else (self.parent["render_key"],
                                                 self.parent["kept_frames"])
        return (self.job_id, self.mode, self.prompt_mode, self.tags, self.prompt, self.lyrics,
                *mn.controls_of(self).values(), cut)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["tags"] = list(self.tags)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Render:
        d = dict(d)
        d["tags"] = tuple(d.get("tags", ()))
        return cls(**d)


# -- planning: jobs x seeds -> renders, keys, statuses, shards --------------------------------

RENDER_KEY_VERSION = 1
# new, already done, outputs of other settings exist, a keeper whose settings changed, an
# until-job's seed that is not needed (enough of its takes pass already)
STATUSES = ("todo", "skip", "rerender", "kept", "spare")
TO_RUN = ("todo", "rerender")
CHANGED = "settings or model changed"
KEPT = "kept: not re-rendered"


def render_key(settings: dict[str, Any], fingerprint: str) -> str:
    """Hash of every setting that changes the audio, plus the model fingerprint."""
    payload = json.dumps({"v": RENDER_KEY_VERSION, "model": fingerprint, **settings},
                         sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:24]


def audio_settings(job: Job, seed: int) -> dict[str, Any]:
    """Everything that changes a take's audio (titles and tags of the MP3 do not)."""
    return {
        "seed": int(seed),
        "mode": job.mode,
        "prompt_mode": job.prompt_mode,
        "tags": [t.strip() for t in job.tags],
        "prompt": job.prompt.strip(),
        "lyrics": job.lyrics if job.mode == "vocal" else "",
        **mn.controls_of(job),
    }


# The Job fields a Render carries as they are (the controls come through mn.controls_of).
FROM_JOB = ("title", "artist", "album", "track", "year", "genre", "mode", "prompt_mode",
            "prompt", "lyrics")


def until_of(job: Job) -> dict[str, Any] | None:
    """The `until` every render of an until-job carries: its wish and its gates."""
    if job.until is None:
        return None
    gates = job.gates or {}
    flags = gates.get("flags")
    return {"passing": job.until["passing"], "max_takes": job.until["max_takes"],
            "flags": None if flags is None else list(flags),
            "min_score": gates.get("min_score")}


def build_renders(manifest: Manifest, fingerprint: str, *, output_dir: str | Path | None = None,
                  save_codes: bool = False) -> list[Render]:
    """Every job at every seed, in manifest order (an until-job's seeds in the order they
    roll; re-rolls and extensions aside)."""
    root = Path(output_dir or manifest.output_dir).resolve()
    renders = []
    for job in manifest.jobs:
        if job.parent is not None:
            continue  # its renders need the parent take on disk: mend.child_renders
        out_dir = job_dir(root, job.id)
        until = until_of(job)
        for seed in job.seeds:
            renders.append(Render(
                job_id=job.id, seed=int(seed),
                key=render_key(audio_settings(job, seed), fingerprint),
                out_dir=str(out_dir), stem=f"{job.id}-s{seed}", job_index=job.index,
                tags=tuple(job.tags), save_codes=save_codes, extra={"line": job.line},
                until=until,
                **{name: getattr(job, name) for name in FROM_JOB}, **mn.controls_of(job),
            ))
    return renders


SHARD_COUNT_ENV = "KHALA_SHARD_COUNT"  # the shard count of a Kubernetes Indexed Job


def parse_shard(spec: str, env: Mapping[str, str] | None = None) -> tuple[int, int]:
    """"K/N" -> (K, N), 0 <= K < N. "auto" or "auto/N": K (and N) from the engine that
    started this task: a Slurm job array (SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN, of
    SLURM_ARRAY_TASK_COUNT) or a Kubernetes Indexed Job (JOB_COMPLETION_INDEX, of N or
    $KHALA_SHARD_COUNT). ValueError says what is missing or inconsistent."""
    text = (spec or "").strip()
    if text == "auto" or text.startswith("auto/"):
        return _auto_shard(text, os.environ if env is None else env)
    m = re.fullmatch(r"(\d+)\s*/\s*(\d+)", text)
    if not m:
        raise ValueError(f"--shard {spec!r}: expected K/N, e.g. 3/16 (K counts from 0), "
                         "or auto (Slurm arrays, Kubernetes Indexed Jobs)")
    return _checked_shard(f"--shard {spec!r}", int(m.group(1)), int(m.group(2)))


def _checked_shard(what: str, k: int, n: int) -> tuple[int, int]:
    if n < 1:
        raise ValueError(f"{what}: N must be at least 1")
    if not 0 <= k < n:
        raise ValueError(f"{what}: K must be in 0..{n - 1} (K counts from 0), got {k}")
    return k, n


def _env_int(env: Mapping[str, str], name: str) -> int | None:
    value = env.get(name)
    if value is None or value.strip() == "":
        return None
    if not value.strip().isdigit():
        raise ValueError(f"--shard auto: ${name} is {value!r}, not a whole number")
    return int(value)


def _auto_shard(text: str, env: Mapping[str, str]) -> tuple[int, int]:
    given = None
    if text != "auto":
        count = text.removeprefix("auto/").strip()
        if not count.isdigit():
            raise ValueError(f"--shard {text!r}: expected auto or auto/N")
        given = int(count)
    slurm_id = _env_int(env, "SLURM_ARRAY_TASK_ID")
    k8s_index = _env_int(env, "JOB_COMPLETION_INDEX")
    if slurm_id is not None:
        k = slurm_id - (_env_int(env, "SLURM_ARRAY_TASK_MIN") or 0)
        n = _env_int(env, "SLURM_ARRAY_TASK_COUNT")
        where = "the Slurm array"
    elif k8s_index is not None:
        k, n = k8s_index, _env_int(env, SHARD_COUNT_ENV)
        where = "the Kubernetes Indexed Job"
    else:
        raise ValueError("--shard auto: no task index found: set by a Slurm job array "
                         "($SLURM_ARRAY_TASK_ID) or a Kubernetes Indexed Job "
                         "($JOB_COMPLETION_INDEX); elsewhere give --shard K/N")
    if given is not None and n is not None and n != given:
        raise ValueError(f"--shard {text}: {where} says {n} tasks, not {given}")
    n = given if n is None else n
    if n is None:
        raise ValueError(f"--shard auto: {where} gives no task count: use --shard auto/N or "
                         f"set ${SHARD_COUNT_ENV}")
    return _checked_shard(f"--shard {text} ({where}: task {k} of {n}; Slurm arrays must be "
                          "contiguous, e.g. --array=0-15)", k, n)


def shard_of(render: Render, n: int) -> int:
    """The shard (0..n-1) that owns a render: stable for its key, the same on every machine."""
    return int(hashlib.sha256(render.key.encode()).hexdigest()[:16], 16) % n


@dataclass(frozen=True)
class PlannedRender:
    render: Render
    status: str  # todo | skip | rerender | kept | spare
    reason: str = ""
    est_minutes: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        r = self.render
        return {
            "job_id": r.job_id, "seed": r.seed, "key": r.key, "status": self.status,
            "reason": self.reason, "est_minutes": round(self.est_minutes, 3),
            "duration": r.duration, "max_new_tokens": r.max_new_tokens,
            "files": {"wav": str(r.path(".wav")), "mp3": str(r.path(".mp3")),
                      "json": str(r.path(".json"))},
        }


@dataclass(frozen=True)
class Roll:
    """One until-job as the plan finds it: what it wants, and its takes already on disk."""

    job_id: str
    wanted: int  # K: takes that must pass
    max_takes: int  # M
    done: int  # takes of its seeds done with these settings (every shard's)
    passing: int  # of those, the ones that pass its gates

    @property
    def met(self) -> bool:
        return self.passing >= self.wanted

    def to_dict(self) -> dict[str, Any]:
        return {"job_id": self.job_id, "passing": self.passing, "wanted": self.wanted,
                "takes": self.done, "max_takes": self.max_takes, "met": self.met}


@dataclass
class Plan:
    items: list[PlannedRender]
    excluded: int = 0  # renders of the manifest left to other shards or outside --only
    shard: tuple[int, int] | None = None
    rolls: dict[str, Roll] = field(default_factory=dict)  # the until-jobs, by job id
    # (job, parent take) of re-rolls and extensions whose parent this run renders first
    waiting: list[tuple[str, str]] = field(default_factory=list)

    def passing(self) -> dict[str, int]:
        """The takes on disk that pass, per until-job: the runner's policy counts on."""
        return {job: r.passing for job, r in self.rolls.items()}

    @property
    def to_run(self) -> list[Render]:
        return [p.render for p in self.items if p.status in TO_RUN]

    @property
    def kept(self) -> list[PlannedRender]:
        """Keepers whose settings or model changed, left as they are."""
        return [p for p in self.items if p.status == "kept"]

    def counts(self) -> dict[str, int]:
        out = {s: 0 for s in STATUSES}
        for p in self.items:
            out[p.status] += 1
        return out

    def minutes(self, statuses: tuple[str, ...] = TO_RUN) -> float:
        return sum(p.est_minutes for p in self.items if p.status in statuses)


def est_minutes(render: Render) -> float:
    """Rough audio length of a take: its duration token, cut by its token cap."""
    return mn.est_minutes(render.duration, render.max_new_tokens)


def _sidecar(render: Render) -> dict[str, Any]:
    try:
        data = json.loads(render.path(".json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _sidecar_key(render: Render) -> str | None:
    return _sidecar(render).get("render_key")


Passes = Callable[[Mapping[str, Any] | None, Mapping[str, Any]], tuple[bool, list[str]]]


def _rolls(renders: list[Render], is_done: Callable[[Render], bool], force: bool,
           passes: Passes | None) -> dict[str, Roll]:
    """The until-jobs among `renders` with the takes they have on disk; `force` counts
    none (every take renders again)."""
    rolls: dict[str, Roll] = {}
    for r in renders:
        if r.until is None:
            continue
        roll = rolls.get(r.job_id) or Roll(r.job_id, int(r.until["passing"]),
                                           int(r.until["max_takes"]), 0, 0)
        if not force and is_done(r):
            ok = passes is not None and passes(_sidecar(r).get("analysis"), r.until)[0]
            roll = replace(roll, done=roll.done + 1, passing=roll.passing + int(ok))
        rolls[r.job_id] = roll
    return rolls


def _status(render: Render, is_done: Callable[[Render], bool], force: bool) -> tuple[str, str]:
    if not render.path(".json").exists():
        return "todo", "new"
    if is_done(render):
        return ("rerender", "--force") if force else ("skip", "done with these settings")
    key = _sidecar_key(render)
    if key is None:
        return "rerender", "sidecar unreadable"
    if key != render.key:
        return "rerender", CHANGED
    return "rerender", "output files missing"


def make_plan(renders: list[Render], *, is_done: Callable[[Render], bool], force: bool = False,
              only: tuple[str, ...] | list[str] = (),
              shard: tuple[int, int] | None = None,
              kept: Collection[tuple[str, int]] = (), passes: Passes | None = None) -> Plan:
    """Statuses for the renders this run owns (after --only and --shard).

    `is_done` is `outputs.is_done` and `passes` is `analysis.passes` (passed in: both sit
    above plan in the layers). `kept`: the keepers (job, seed). A keeper whose settings or
    model changed is never re-rendered for it (status "kept") unless `force`. An until-job
    counts the takes of all its seeds on disk (every shard's) that pass; once K pass, the
    rest of its seeds are "spare"; otherwise the runner's policy rolls them.
    """
    kept = set(kept)
    chosen = [r for r in renders if not only or r.job_id in only]
    rolls = _rolls(chosen, is_done, force, passes)
    if shard is not None:
        k, n = shard
        chosen = [r for r in chosen if shard_of(r, n) == k]
    items = []
    for r in chosen:
        status, reason = _status(r, is_done, force)
        if (r.job_id, r.seed) in kept:
            if status == "rerender" and reason == CHANGED and not force:
                status, reason = "kept", f"{KEPT} ({CHANGED})"
            elif status == "rerender":
                reason += "; kept: the old version moves aside"
        roll = rolls.get(r.job_id) if r.until is not None else None
        if roll is not None and roll.met and status in TO_RUN:
            status, reason = "spare", f"until: {roll.passing} of {roll.wanted} takes pass already"
        items.append(PlannedRender(r, status, reason, est_minutes(r)))
    own = {p.render.job_id for p in items}
    return Plan(items=items, excluded=len(renders) - len(chosen), shard=shard,
                rolls={j: r for j, r in rolls.items() if j in own})
