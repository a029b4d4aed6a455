"""Manifest YAML -> validated jobs, with file:line locations for every error and warning.

No torch here: `khala validate` and `khala plan` load manifests in the parent process.

A manifest is one YAML mapping:

    model: demo                  # "demo" or a model directory (relative to the manifest)
    output_dir: out/catalogue    # relative to the manifest; default out/<manifest name>
    defaults: {duration: 3, seeds: [1]}
    jobs:
      - id: night-wind
        tags: [J-Pop, Female Vocals]
        lyrics: |
          ...

Ranges are the reference model's; a value outside its range is an error naming the range
(nothing is silently clamped). All errors are collected and reported together.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from khala_cli.manifest.checks import (  # noqa: F401 - the manifest's results, re-exported
    At,
    Checker,
    Issue,
    ManifestError,
    parse_take,
    parse_time,
    type_name,
    unknown_keys,
)
from khala_cli.manifest.fields import FIELDS, JOB_KEYS, SETTING_KEYS, TOP_KEYS, check_settings
from khala_cli.manifest.yaml_lines import MarkedDict, item_lines, parse, syntax_error
from khala_cli.model_numbers import (  # noqa: F401 - MAX_NEW_TOKENS re-exported
    DEFAULT_DURATION,
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP_K_BB,
    DEFAULT_TOP_K_SR,
    MAX_NEW_TOKENS,
    SEED_RANGE,
    est_minutes,
    max_new_tokens,
)
from khala_cli.prompt import clean_lyrics

MAX_RENDERS = 10_000

ID_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
ID_MAX_LEN = 100
# Names a job directory may not take: they are the run's own folders under output_dir.
RESERVED_IDS = frozenset({"reports"})


@dataclass(frozen=True)
class ParentSpec:
    """The take a re-roll or an extension continues, and where: `reroll` keeps the take's
    first `seconds`; `extend` keeps all of it and continues to `seconds`."""

    kind: str  # "reroll" | "extend"
    job_id: str
    seed: int
    seconds: float
    line: int = 0

    @property
    def take(self) -> str:
        return f"{self.job_id}:{self.seed}"

    @property
    def field(self) -> str:
        return f"{self.kind}.{'from' if self.kind == 'reroll' else 'to'}"


PARENT_KINDS = ("reroll", "extend")
PARENT_TIME_KEY = {"reroll": "from", "extend": "to"}
# What a re-roll or extension may set beside its parent: the rest is the parent's.
PARENT_JOB_KEYS = ("id", "title", "seeds", "artist", "album", "year", "genre", "track",
                   "until", "gates")


def child_id(kind: str, job_id: str, seed: int, seconds: float) -> str:
    """The job id of a re-roll or extension made on the command line: `anthem-s7-from-1m10s`,
    `anthem-s7-to-4m30s` (tenths of a second where the time has them)."""
    m, s = divmod(round(float(seconds), 1), 60)
    secs = f"{s:.1f}".removesuffix(".0")
    word = "from" if kind == "reroll" else "to"
    return f"{job_id[:ID_MAX_LEN - 24]}-s{seed}-{word}-{int(m)}m{secs}s"


@dataclass(frozen=True)
class Job:
    """One validated job: a prompt and its settings, rendered once per seed."""

    id: str
    title: str
    line: int
    seeds: tuple[int, ...]
    mode: str = "vocal"
    prompt_mode: str = "tags"
    tags: tuple[str, ...] = ()
    prompt: str = ""
    lyrics: str = ""  # cleaned; "" in instrumental mode (the reference ignores it)
    duration: int = DEFAULT_DURATION
    top_k_bb: int = DEFAULT_TOP_K_BB
    top_k_sr: int = DEFAULT_TOP_K_SR
    temperature: float = DEFAULT_TEMPERATURE
    max_minutes: float | None = None  # None: the reference's token cap
    artist: str = ""
    album: str = ""
    lyrics_file: str | None = None
    track: int | None = None  # the catalogue's track number; None: manifest order
    year: int | None = None
    genre: str = ""
    index: int = 0  # the job's place in the manifest (0-based)
    until: dict[str, int] | None = None  # {passing, max_takes}: `seeds` are then all M
    gates: dict[str, Any] | None = None  # {flags, min_score}; None: any flag fails
    parent: ParentSpec | None = None  # a re-roll or extension of that take

    @property
    def max_new_tokens(self) -> int:
        return max_new_tokens(self.max_minutes)

    @property
    def est_minutes(self) -> float:
        return est_minutes(self.duration, self.max_new_tokens)


@dataclass
class Manifest:
    path: Path  # absolute
    model: str  # "demo" or a model directory, as written (relative to `model_base`)
    model_base: Path  # the manifest's folder, or the current directory for --model
    output_dir: Path  # absolute
    jobs: list[Job]
    save_codes: bool = True  # `save_codes:`; render --save-codes/--no-save-codes overrides
    warnings: list[Issue] = field(default_factory=list)
    model_line: int = 0

    @property
    def base(self) -> Path:
        return self.path.parent

    @property
    def render_count(self) -> int:
        return sum(len(j.seeds) for j in self.jobs)

    def job(self, job_id: str) -> Job:
        for j in self.jobs:
            if j.id == job_id:
                return j
        raise KeyError(job_id)


def slugify(text: str) -> str:
    """A job id from a title: ASCII lower-case letters, digits, '.', '_' and '-'."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    slug = re.sub(r"[^a-z0-9._-]+", "-", ascii_text.lower())
    slug = re.sub(r"-{2,}", "-", slug)
    slug = re.sub(r"^[^a-z0-9]+", "", slug)
    slug = slug[:64].rstrip("-._")
    return slug


# -- the whole file --------------------------------------------------------------------------


def load(path: str | Path, *, max_renders: int = MAX_RENDERS,
         output_dir: str | Path | None = None, model: str | None = None) -> Manifest:
    """Read and validate a manifest. Raises ManifestError listing every error found.

    `output_dir` and `model` (command-line overrides, relative to the current directory)
    replace the manifest's.
    """
    shown = str(path)
    path = Path(path).expanduser().resolve()
    ck = Checker(path, shown, max_renders)
    doc = _read(ck, path)
    top = ck.at(doc.line or 1)
    unknown_keys(top, doc, TOP_KEYS)
    model_ref, model_base, model_line = _model(top, doc, path, model)
    out = _output_dir(top, doc, path, output_dir)
    save_codes = _save_codes(top, doc)
    defaults = _defaults(top, doc)  # checked once, where they are written
    jobs = _jobs(top, doc, defaults, path)
    total = sum(len(j.seeds) for j in jobs)
    if not ck.errors and total > max_renders:
        top.key(doc, "jobs").error(
            f"{total} renders (jobs x seeds) is more than the limit of {max_renders}; "
            f"pass --max-renders {total} if you mean it")
    if ck.errors:
        raise ck.fail()
    assert out is not None
    return Manifest(path=path, model=model_ref, model_base=model_base, output_dir=out,
                    jobs=jobs, save_codes=save_codes, warnings=ck.warnings,
                    model_line=model_line)


def _read(ck: Checker, path: Path) -> MarkedDict:
    """The manifest's top-level mapping; ManifestError when there is none to check."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        ck.at(1).error(f"cannot read the manifest: {exc.strerror or exc}")
        raise ck.fail() from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        ck.at(raw[: exc.start].count(b"\n") + 1).error("the manifest is not UTF-8 text")
        raise ck.fail() from None
    try:
        doc = parse(text)
    except yaml.YAMLError as exc:
        line, message = syntax_error(exc)
        ck.at(line).error(message)
        raise ck.fail() from None
    if doc is None:
        ck.at(1).error("the manifest is empty; expected a mapping with `jobs:` (see the README)")
    elif not isinstance(doc, dict):
        ck.at(getattr(doc, "line", 1) or 1).error(
            f"expected a mapping with `jobs:` at the top level, got {type_name(doc)}")
    else:
        return doc
    raise ck.fail()


def _model(top: At, doc: MarkedDict, path: Path, override: str | None
           ) -> tuple[str, Path, int]:
    """(model as written, the folder it is relative to, its line)."""
    at = top.key(doc, "model")
    ref = ""
    if "model" in doc:
        ref = FIELDS["model"].check(at, doc["model"]) or ""
    if override:
        return override, Path.cwd(), at.line
    if "model" not in doc:
        replace(top, field="model").error(
            "missing `model:` (\"demo\" or a model directory), or pass --model")
    return ref, path.parent, at.line


def _output_dir(top: At, doc: MarkedDict, path: Path, override: str | Path | None
                ) -> Path | None:
    if override is not None:
        return Path(override).expanduser().resolve()
    if "output_dir" not in doc:
        return (path.parent / "out" / (slugify(path.stem) or "run")).resolve()
    got = FIELDS["output_dir"].check(top.key(doc, "output_dir"), doc["output_dir"])
    return (path.parent / Path(got).expanduser()).resolve() if got else None


def _save_codes(top: At, doc: MarkedDict) -> bool:
    if "save_codes" not in doc:
        return FIELDS["save_codes"].default
    got = FIELDS["save_codes"].check(top.key(doc, "save_codes"), doc["save_codes"])
    return FIELDS["save_codes"].default if got is None else got


def _defaults(top: At, doc: MarkedDict) -> dict[str, Any]:
    """The valid settings under `defaults`."""
    if "defaults" not in doc or doc["defaults"] is None:
        return {}
    at, d = top.key(doc, "defaults"), doc["defaults"]
    if not isinstance(d, dict):
        at.error(f"expected a mapping of settings, got {type_name(d)}")
        return {}
    hint = next((FIELDS[k].defaults_hint for k in d
                 if k in FIELDS and FIELDS[k].defaults_hint), "")
    inside = replace(at, field=None)
    unknown_keys(inside, d, SETTING_KEYS, "defaults.", hint)
    return check_settings(inside, d, "defaults.")


def _jobs(top: At, doc: MarkedDict, defaults: dict[str, Any], path: Path) -> list[Job]:
    """The valid jobs, in manifest order; a repeated id is an error."""
    if "jobs" not in doc:
        replace(top, field="jobs").error("missing `jobs:` (a list of jobs to render)")
        return []
    at, items = top.key(doc, "jobs"), doc["jobs"]
    if not isinstance(items, list):
        at.error(f"expected a list of jobs, got {type_name(items)}")
        return []
    if not items:
        at.error("the job list is empty")
        return []
    jobs: list[Job] = []
    seen: dict[str, int] = {}
    for idx, (item, line) in enumerate(zip(items, item_lines(items, at.line), strict=True)):
        job = _job(top.ck.at(line, f"#{idx + 1}"), item, idx, defaults, path)
        if job is None:
            continue
        if job.id in seen:
            top.ck.at(job.line, job.id, "id").error(
                f"duplicate job id (first used on line {seen[job.id]})")
            continue
        seen[job.id] = job.line
        jobs.append(job)
    return jobs


# -- one job ---------------------------------------------------------------------------------


def _job(at: At, item: Any, idx: int, defaults: dict[str, Any], manifest: Path) -> Job | None:
    """One job, with the defaults under its own settings; None after an error."""
    if not isinstance(item, dict):
        at.error(f"expected a mapping (id, tags/prompt, lyrics, ...), got {type_name(item)}")
        return None
    d: MarkedDict = item  # type: ignore[assignment]
    at = replace(at, line=d.line or at.line)
    if any(k in d for k in PARENT_KINDS):
        return _parent_job(at, d, idx, defaults)
    n_errors = len(at.ck.errors)
    job_id, title = _identity(at, d)  # first, so every later message can name the job
    at = replace(at, job=job_id or at.job)
    unknown_keys(at, d, JOB_KEYS)
    s = {**{k: FIELDS[k].default for k in SETTING_KEYS}, **defaults, **check_settings(at, d)}
    tags, prompt, prompt_mode = _prompt(at, d)
    raw_lyrics, lyrics_at, lyrics_file = _lyrics(at, d, manifest.parent)
    track = FIELDS["track"].check(at.key(d, "track"), d["track"]) if "track" in d else None
    lyrics = _lyrics_for_mode(lyrics_at, clean_lyrics(raw_lyrics), s["mode"],
                              clean=len(at.ck.errors) == n_errors)
    if len(at.ck.errors) > n_errors or job_id is None:
        return None
    s["seeds"] = _take_seeds(at, d, s)
    if s["seeds"] is None:
        return None
    return Job(id=job_id, title=title or job_id, line=at.line, prompt_mode=prompt_mode,
               tags=tags, prompt=prompt, lyrics=lyrics, lyrics_file=lyrics_file, track=track,
               index=idx, **{**s, "seeds": tuple(s["seeds"])})


def until_seeds(seeds: tuple[int, ...] | list[int], max_takes: int) -> tuple[int, ...]:
    """An until-job's seeds, in the order they render: its own, then counting up from its
    last (skipping seeds it already has), max_takes in all."""
    out = list(dict.fromkeys(seeds))[:max_takes]
    have, nxt = set(out), out[-1] + 1
    while len(out) < max_takes:
        if nxt not in have:
            out.append(nxt)
        nxt += 1
    return tuple(out)


def _take_seeds(at: At, d: MarkedDict, s: dict[str, Any]) -> tuple[int, ...] | None:
    """The seeds a job renders: its `seeds`, or with `until` the M seeds of its roll; None
    after an error."""
    if s["until"] is None:
        if "gates" in d:
            at.key(d, "gates").warn("gates apply only to a job with `until`; ignored here")
        return tuple(s["seeds"])
    m = s["until"]["max_takes"]
    where = at.key(d, "until") if "until" in d else replace(at, field="until")
    if len(s["seeds"]) > m:
        replace(where, field="until.max_takes").warn(
            f"the job lists {len(s['seeds'])} seeds but max_takes is {m}: seeds after the "
            f"first {m} are not rendered")
    seeds = until_seeds(s["seeds"], m)
    if max(seeds) > SEED_RANGE[1]:
        replace(where, field="until.max_takes").error(
            f"counting up to {m} takes passes the last seed {SEED_RANGE[1]}; start from a "
            "lower seed")
        return None
    return seeds


def _parent_job(at: At, d: MarkedDict, idx: int, defaults: dict[str, Any]) -> Job | None:
    """A re-roll or extension: its parent take and time, its seeds and catalogue fields; the
    prompt and sampling settings come from the parent take when it is planned."""
    n_errors = len(at.ck.errors)
    named = "id" in d or "title" in d
    job_id, title = _identity(at, d) if named else (None, None)
    at = replace(at, job=job_id or at.job)
    parent = _parent(at, d)
    if not named and parent is not None:
        job_id = child_id(parent.kind, parent.job_id, parent.seed, parent.seconds)
        at = replace(at, job=job_id)
    for key in d:
        if key not in PARENT_JOB_KEYS + PARENT_KINDS:
            what = "an extension" if "extend" in d else "a re-roll"
            at.key(d, key).error(f"{what} keeps its parent take's prompt and settings: "
                                 f"remove `{key}`")
    s = {**{k: FIELDS[k].default for k in SETTING_KEYS}, **defaults, **check_settings(at, d)}
    track = FIELDS["track"].check(at.key(d, "track"), d["track"]) if "track" in d else None
    if len(at.ck.errors) > n_errors or job_id is None or parent is None:
        return None
    s["seeds"] = _take_seeds(at, d, s)
    if s["seeds"] is None:
        return None
    return Job(id=job_id, title=title or "", line=at.line, track=track, index=idx,
               parent=parent, **s)


def _parent(at: At, d: MarkedDict) -> ParentSpec | None:
    """The `reroll:` or `extend:` mapping, checked: {take: JOB:SEED, from|to: TIME}."""
    kinds = [k for k in PARENT_KINDS if k in d]
    if len(kinds) > 1:
        at.key(d, "extend").error("give either `reroll` or `extend`, not both")
        return None
    kind = kinds[0]
    pat, v = at.key(d, kind), d[kind]
    time_key = PARENT_TIME_KEY[kind]
    if not isinstance(v, dict):
        pat.error(f"expected {{take: JOB:SEED, {time_key}: TIME}}, got {type_name(v)}")
        return None
    unknown_keys(replace(pat, field=None), v, ("take", time_key), f"{kind}.")
    take = time = None
    for key in ("take", time_key):
        kat = pat.key(v, key, f"{kind}.")
        if key not in v:
            kat.error(f"missing `{kind}.{key}`")
            continue
        try:
            if key == "take":
                take = parse_take(v[key])
            else:
                time = parse_time(v[key])
                if time <= 0:
                    kat.error(f"{v[key]!r}: the time must be after 0")
                    time = None
        except ValueError as exc:
            kat.error(str(exc))
    if take is None or time is None:
        return None
    return ParentSpec(kind, take[0], take[1], time, pat.line)


def _identity(at: At, d: MarkedDict) -> tuple[str | None, str | None]:
    """(id, title): the id as written, or made from the title."""
    title = FIELDS["title"].check(at.key(d, "title"), d["title"]) if "title" in d else None
    if "id" in d:
        return written_id(at.key(d, "id"), d["id"]), title
    if not title:
        replace(at, field="id").error("missing `id` (or a `title` to derive it from)")
        return None, title
    job_id = slugify(title)
    if not job_id or _id_problem(job_id):
        replace(at.key(d, "title"), field="id").error(
            f"cannot make a job id from the title {title!r}; add `id:` "
            "(lower-case letters, digits, '.', '_', '-')")
        return None, title
    return job_id, title


def written_id(at: At, v: Any) -> str | None:
    job_id = FIELDS["id"].check(at, v)
    if job_id is None:
        return None
    problem = _id_problem(job_id)
    if not problem:
        return job_id
    msg = f"{job_id!r} {problem}"
    sug = slugify(job_id)
    if sug and sug != job_id and not _id_problem(sug):
        msg += f" (try '{sug}')"
    at.error(msg)
    return None


def _prompt(at: At, d: MarkedDict) -> tuple[tuple[str, ...], str, str]:
    """(tags, prompt, prompt_mode): tags mode or natural mode, never both."""
    tags: tuple[str, ...] = ()
    prompt = ""
    has_tags, has_prompt = "tags" in d, "prompt" in d
    if has_tags and has_prompt:
        at.key(d, "prompt").error(
            "give either `tags` (tags mode) or `prompt` (natural mode), not both")
    elif not has_tags and not has_prompt:
        replace(at, field="tags").error("missing `tags` (tags mode) or `prompt` (natural mode)")
    elif has_tags:
        tags = FIELDS["tags"].check(at.key(d, "tags"), d["tags"]) or ()
    else:
        prompt = FIELDS["prompt"].check(at.key(d, "prompt"), d["prompt"]) or ""
    implied = "natural" if has_prompt and not has_tags else "tags"
    if "prompt_mode" in d:
        pm_at = at.key(d, "prompt_mode")
        pm = FIELDS["prompt_mode"].check(pm_at, d["prompt_mode"])
        if pm is not None and pm != implied and has_tags != has_prompt:
            given = "tags" if has_tags else "prompt"
            needs = "natural mode needs `prompt`" if pm == "natural" else "tags mode needs `tags`"
            pm_at.error(f"prompt_mode is {pm!r} but the job gives `{given}` "
                        f"({implied} mode); {needs}")
    return tags, prompt, implied


def _lyrics(at: At, d: MarkedDict, folder: Path) -> tuple[str, At, str | None]:
    """(lyrics as written, where they are, the lyrics file or None): inline or from a file
    relative to the manifest's folder."""
    if "lyrics" in d and "lyrics_file" in d:
        at.key(d, "lyrics_file").error("give either `lyrics` or `lyrics_file`, not both")
        return "", replace(at, field="lyrics"), None
    if "lyrics" in d:
        lat = at.key(d, "lyrics")
        inline = d["lyrics"]
        return ("" if inline is None else FIELDS["lyrics"].check(lat, inline) or ""), lat, None
    if "lyrics_file" not in d:
        return "", replace(at, field="lyrics"), None
    lat = at.key(d, "lyrics_file")
    rel = FIELDS["lyrics_file"].check(lat, d["lyrics_file"])
    if rel is None:
        return "", lat, None
    lf = (folder / Path(rel).expanduser()).resolve()
    try:
        return lf.read_text(encoding="utf-8"), lat, str(lf)
    except FileNotFoundError:
        lat.error(f"lyrics file {lf} does not exist (paths are relative to the manifest's "
                  f"folder {folder})")
    except UnicodeDecodeError:
        lat.error(f"lyrics file {lf} is not UTF-8 text")
    except OSError as exc:
        lat.error(f"cannot read lyrics file {lf}: {exc.strerror or exc}")
    return "", lat, str(lf)


def _lyrics_for_mode(at: At, lyrics: str, mode: str, clean: bool) -> str:
    """The lyrics the model gets: none in instrumental mode. `clean`: the job has no errors
    so far (an empty-lyrics warning would only add noise to them)."""
    if mode == "instrumental":
        if lyrics:
            at.warn("lyrics are ignored in instrumental mode")
        return ""
    if mode == "vocal" and not lyrics and clean:
        replace(at, field="lyrics").warn(
            "vocal mode with empty lyrics: the reference model is unstable without lyrics "
            "(add lyrics, or use mode: instrumental)")
    return lyrics


def _id_problem(job_id: str) -> str | None:
    """Why `job_id` cannot name a folder under output_dir, or None if it can."""
    if len(job_id) > ID_MAX_LEN:
        return f"is longer than {ID_MAX_LEN} characters"
    if not ID_RE.match(job_id):
        return ("is not a valid id: use lower-case letters, digits, '.', '_' and '-', "
                "starting with a letter or digit")
    if job_id in RESERVED_IDS:
        return f"is reserved for the run's own folder <output_dir>/{job_id}/"
    return None


def job_dir(output_dir: Path, job_id: str) -> Path:
    """<output_dir>/<job_id>, refusing any id that would resolve outside output_dir."""
    problem = _id_problem(job_id)
    if problem:
        raise ValueError(f"job id {job_id!r} {problem}")
    root = Path(output_dir).resolve()
    path = (root / job_id).resolve()
    if path.parent != root:
        raise ValueError(f"job id {job_id!r} would write outside {root}")
    return path
