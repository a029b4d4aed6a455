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

import difflib
import json
import re
import unicodedata
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from khala_cli.model_numbers import (  # noqa: F401 - the manifest's controls, re-exported
    DEFAULT_DURATION,
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP_K_BB,
    DEFAULT_TOP_K_SR,
    DURATION_RANGE,
    MAX_MINUTES_RANGE,
    MAX_NEW_TOKENS,
    MODES,
    PROMPT_MODES,
    SEED_RANGE,
    TEMPERATURE_RANGE,
    TOKENS_PER_MINUTE,
    TOP_K_BB_RANGE,
    TOP_K_SR_RANGE,
    est_minutes,
    max_new_tokens,
)
from khala_cli.prompt import clean_lyrics

# -- ranges and constants (the reference's controls) -----------------------------------------

TRACK_RANGE = (1, 999)
YEAR_RANGE = (1000, 9999)
MAX_RENDERS = 10_000

DEFAULT_SEEDS = (1,)

ID_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
ID_MAX_LEN = 100
# Names a job directory may not take: they are the run's own folders under output_dir.
RESERVED_IDS = frozenset({"reports"})

TOP_KEYS = ("model", "output_dir", "defaults", "jobs")
SETTING_KEYS = (
    "mode", "duration", "top_k_bb", "temperature", "top_k_sr", "max_minutes", "seeds",
    "artist", "album", "year", "genre",
)
DEFAULT_KEYS = SETTING_KEYS
# `track` belongs to one job: a default track number would give every job the same one.
JOB_KEYS = ("id", "title", "prompt_mode", "tags", "prompt", "lyrics", "lyrics_file",
            "track") + SETTING_KEYS
SEED_KEYS = ("from", "count")


# -- results ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Issue:
    """One error or warning, located in the manifest."""

    file: str
    line: int
    message: str
    job: str | None = None  # the job's id, or "#3" when it has no valid id
    field: str | None = None  # dotted path of the field, e.g. "seeds.count" or "tags[2]"

    def __str__(self) -> str:
        where = []
        if self.job is not None:
            where.append(f"job {self.job}" if self.job.startswith("#") else f"job '{self.job}'")
        if self.field is not None:
            where.append(f"field '{self.field}'")
        prefix = f"{self.file}:{self.line}: "
        return prefix + (", ".join(where) + ": " if where else "") + self.message


class ManifestError(Exception):
    """The manifest is not valid: exit code 2. `issues` lists every error found."""

    def __init__(self, issues: list[Issue]):
        self.issues = sorted(issues, key=lambda i: i.line)  # stable: same line keeps order
        super().__init__("\n".join(str(i) for i in issues))


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


# -- the tag catalogue -----------------------------------------------------------------------


@lru_cache(maxsize=1)
def tag_catalogue() -> dict[str, dict[str, Any]]:
    """The reference's tag catalogue: {category: {"label": str, "tags": [str]}}."""
    text = resources.files("khala_cli").joinpath("data/tags.json").read_text(encoding="utf-8")
    return json.loads(text)


@lru_cache(maxsize=1)
def known_tags() -> dict[str, str]:
    """lower-cased tag -> tag as the catalogue spells it."""
    return {t.lower(): t for cat in tag_catalogue().values() for t in cat["tags"]}


# -- YAML with line numbers ------------------------------------------------------------------


class MarkedDict(dict):
    """A mapping that remembers its own line and the line of each key (1-based)."""

    line: int = 0
    key_lines: dict[Any, int]


class MarkedList(list):
    """A sequence that remembers its own line and the line of each item (1-based)."""

    line: int = 0
    item_lines: list[int]


class _DuplicateKey(yaml.MarkedYAMLError):
    pass


class _Loader(yaml.SafeLoader):
    pass


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> MarkedDict:
    loader.flatten_mapping(node)
    out = MarkedDict()
    out.line = node.start_mark.line + 1
    out.key_lines = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            hash(key)
        except TypeError:
            raise yaml.constructor.ConstructorError(
                None, None, "a mapping key must be a plain value", key_node.start_mark
            ) from None
        if key in out:
            raise _DuplicateKey(
                None, None,
                f"duplicate key {key!r} (first on line {out.key_lines[key]})",
                key_node.start_mark,
            )
        out[key] = loader.construct_object(value_node, deep=True)
        out.key_lines[key] = key_node.start_mark.line + 1
    return out


def _construct_sequence(loader: _Loader, node: yaml.SequenceNode) -> MarkedList:
    out = MarkedList(loader.construct_object(child, deep=True) for child in node.value)
    out.line = node.start_mark.line + 1
    out.item_lines = [child.start_mark.line + 1 for child in node.value]
    return out


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_sequence)


def _line_of(d: Any, key: Any, default: int) -> int:
    if isinstance(d, MarkedDict):
        return getattr(d, "key_lines", {}).get(key, d.line or default)
    return default


# -- helpers ---------------------------------------------------------------------------------


def closest(word: str, choices: tuple[str, ...] | list[str]) -> str | None:
    found = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return found[0] if found else None


def slugify(text: str) -> str:
    """A job id from a title: ASCII lower-case letters, digits, '.', '_' and '-'."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    slug = re.sub(r"[^a-z0-9._-]+", "-", ascii_text.lower())
    slug = re.sub(r"-{2,}", "-", slug)
    slug = re.sub(r"^[^a-z0-9]+", "", slug)
    slug = slug[:64].rstrip("-._")
    return slug


def _fmt(x: float) -> str:
    return f"{x:g}"


class _Checker:
    """Collects issues while validating one manifest."""

    def __init__(self, path: Path, shown: str):
        self.path = path
        self.shown = shown  # the file name as the user gave it
        self.errors: list[Issue] = []
        self.warnings: list[Issue] = []

    def error(self, line: int, message: str, job: str | None = None, field: str | None = None):
        self.errors.append(Issue(self.shown, line, message, job, field))

    def warn(self, line: int, message: str, job: str | None = None, field: str | None = None):
        self.warnings.append(Issue(self.shown, line, message, job, field))

    def unknown_keys(self, d: MarkedDict, allowed: tuple[str, ...], job: str | None,
                     prefix: str = "", hint: str = "") -> None:
        for key in d:
            if key in allowed:
                continue
            name = str(key)
            suggestion = closest(name, allowed)
            msg = "unknown key"
            if suggestion:
                msg += f" (did you mean '{prefix}{suggestion}'?)"
            else:
                msg += f"; expected one of: {', '.join(allowed)}"
            if hint:
                msg += hint
            self.error(_line_of(d, key, d.line), msg, job, prefix + name)


# -- value checks: each returns the value or None after recording an error -------------------


def _type_name(v: Any) -> str:
    if v is None:
        return "nothing (null)"
    if isinstance(v, bool):
        return f"a boolean ({str(v).lower()})"
    if isinstance(v, (dict,)):
        return "a mapping"
    if isinstance(v, (list,)):
        return "a list"
    if isinstance(v, int):
        return f"an integer ({v})"
    if isinstance(v, float):
        return f"a number ({v:g})"
    if isinstance(v, str):
        return f"text ({v!r})" if len(v) <= 40 else "text"
    return type(v).__name__


def _int_in(ck: _Checker, v: Any, lo: int, hi: int, line: int, job: str | None, fld: str,
            what: str = "") -> int | None:
    if isinstance(v, float) and v.is_integer() and not isinstance(v, bool):
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int):
        extra = " (whole minutes)" if fld.endswith("duration") else ""
        ck.error(line, f"expected a whole number in {lo}..{hi}{extra}, got {_type_name(v)}",
                 job, fld)
        return None
    if not lo <= v <= hi:
        ck.error(line, f"{v} is out of range {lo}..{hi}{what}", job, fld)
        return None
    return v


def _float_in(ck: _Checker, v: Any, lo: float, hi: float, line: int, job: str | None,
              fld: str, what: str = "") -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        ck.error(line, f"expected a number in {_fmt(lo)}..{_fmt(hi)}, got {_type_name(v)}",
                 job, fld)
        return None
    v = float(v)
    if v != v or not lo <= v <= hi:
        ck.error(line, f"{_fmt(v)} is out of range {_fmt(lo)}..{_fmt(hi)}{what}", job, fld)
        return None
    return v


def _text(ck: _Checker, v: Any, line: int, job: str | None, fld: str,
          allow_empty: bool = True) -> str | None:
    if isinstance(v, bool) or v is None or isinstance(v, (dict, list)):
        ck.error(line, f"expected text, got {_type_name(v)}", job, fld)
        return None
    if isinstance(v, (int, float)):
        v = str(v)
    if not isinstance(v, str):
        ck.error(line, f"expected text, got {_type_name(v)}", job, fld)
        return None
    if not allow_empty and not v.strip():
        ck.error(line, "must not be empty", job, fld)
        return None
    return v


def _choice(ck: _Checker, v: Any, choices: tuple[str, ...], line: int, job: str | None,
            fld: str) -> str | None:
    if isinstance(v, str) and v in choices:
        return v
    msg = f"{_type_name(v)} is not one of: {', '.join(choices)}"
    if isinstance(v, str):
        sug = closest(v.lower(), choices)
        if sug:
            msg += f" (did you mean '{sug}'?)"
    ck.error(line, msg, job, fld)
    return None


_SEED_RANGE_RE = re.compile(r"^\s*(\d+)\s*-\s*(\d+)\s*$")
_SEEDS_FORMS = 'a list [1, 2, 3], a range "100-107", or {from: 100, count: 8}'


def _seeds(ck: _Checker, v: Any, line: int, job: str | None, fld: str,
           max_count: int) -> tuple[int, ...] | None:
    lo, hi = SEED_RANGE

    def one(s: Any, ln: int, f: str) -> int | None:
        return _int_in(ck, s, lo, hi, ln, job, f, " (seeds are non-negative integers)")

    if isinstance(v, list):
        if not v:
            ck.error(line, f"no seeds; expected {_SEEDS_FORMS}", job, fld)
            return None
        lines = getattr(v, "item_lines", [line] * len(v))
        out: list[int] = []
        seen: dict[int, int] = {}
        ok = True
        for i, s in enumerate(v):
            got = one(s, lines[i], f"{fld}[{i}]")
            if got is None:
                ok = False
                continue
            if got in seen:
                ck.error(lines[i], f"seed {got} is listed twice (also item {seen[got]})",
                         job, f"{fld}[{i}]")
                ok = False
                continue
            seen[got] = i
            out.append(got)
        return tuple(out) if ok else None
    if isinstance(v, str):
        m = _SEED_RANGE_RE.match(v)
        if not m:
            ck.error(line, f"{v!r} is not a seed range; expected {_SEEDS_FORMS}", job, fld)
            return None
        a, b = int(m.group(1)), int(m.group(2))
        if b < a:
            ck.error(line, f"range {v!r} ends before it starts; write \"{b}-{a}\"", job, fld)
            return None
        if b > hi:
            ck.error(line, f"{b} is out of range {lo}..{hi} (seeds are non-negative integers)",
                     job, fld)
            return None
        if b - a + 1 > max_count:
            ck.error(line, f"{b - a + 1} seeds is more than the limit of {max_count} renders "
                     "(raise it with --max-renders)", job, fld)
            return None
        return tuple(range(a, b + 1))
    if isinstance(v, dict):
        sub_ok = True
        for key in v:
            if key not in SEED_KEYS:
                sug = closest(str(key), SEED_KEYS)
                ck.error(_line_of(v, key, line),
                         "unknown key" + (f" (did you mean '{fld}.{sug}'?)" if sug else
                                          f"; expected {fld}.from and {fld}.count"),
                         job, f"{fld}.{key}")
                sub_ok = False
        for key in SEED_KEYS:
            if key not in v:
                ck.error(line, f"missing '{key}' (expected {{from: 100, count: 8}})", job,
                         f"{fld}.{key}")
                sub_ok = False
        if not sub_ok:
            return None
        start = one(v["from"], _line_of(v, "from", line), f"{fld}.from")
        count = _int_in(ck, v["count"], 1, max_count, _line_of(v, "count", line), job,
                        f"{fld}.count",
                        " (at most the render limit; raise it with --max-renders)")
        if start is None or count is None:
            return None
        if start + count - 1 > hi:
            ck.error(line, f"the last seed {start + count - 1} is out of range {lo}..{hi}",
                     job, fld)
            return None
        return tuple(range(start, start + count))
    hint = ""
    if isinstance(v, int) and not isinstance(v, bool):
        hint = f" (for the single seed {v} write [{v}])"
    ck.error(line, f"expected {_SEEDS_FORMS}; got {_type_name(v)}{hint}", job, fld)
    return None


def _tags(ck: _Checker, v: Any, line: int, job: str | None) -> tuple[str, ...] | None:
    if isinstance(v, str):
        items = [t.strip() for t in v.split(",")]
        lines = [line] * len(items)
        if any(not t for t in items) and any(items):
            ck.error(line, "empty tag between commas", job, "tags")
            return None
    elif isinstance(v, list):
        items = []
        lines = getattr(v, "item_lines", [line] * len(v))
        for i, t in enumerate(v):
            got = _text(ck, t, lines[i], job, f"tags[{i}]", allow_empty=False)
            if got is None:
                return None
            if "," in got:
                ck.error(lines[i], "a tag in a list must not contain a comma", job, f"tags[{i}]")
                return None
            items.append(got.strip())
    else:
        ck.error(line, f"expected a list of tags or a comma-separated string, got "
                 f"{_type_name(v)}", job, "tags")
        return None
    items = [t for t in items if t]
    if not items:
        ck.error(line, "no tags; give at least one tag, or use `prompt` instead", job, "tags")
        return None
    known = known_tags()
    for i, t in enumerate(items):
        if t.lower() not in known:
            sug = closest(t, list(known.values()))
            ck.warn(lines[i] if i < len(lines) else line,
                    f"tag {t!r} is not in the catalogue (`khala tags`)"
                    + (f"; did you mean {sug!r}?" if sug else "; it is passed to the model as is"),
                    job, "tags")
    return tuple(items)


# -- loading ---------------------------------------------------------------------------------


def _parse(ck: _Checker, text: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 1
        problem = exc.problem or str(exc)
        if exc.context and not isinstance(exc, _DuplicateKey):
            problem = f"{exc.context}, {problem}"
        ck.error(line, f"YAML syntax error: {problem}")
    except yaml.YAMLError as exc:
        ck.error(1, f"YAML error: {exc}")
    return None


def load(path: str | Path, *, max_renders: int = MAX_RENDERS,
         output_dir: str | Path | None = None, model: str | None = None) -> Manifest:
    """Read and validate a manifest. Raises ManifestError listing every error found.

    `output_dir` and `model` (command-line overrides, relative to the current directory)
    replace the manifest's.
    """
    shown = str(path)
    path = Path(path).expanduser().resolve()
    ck = _Checker(path, shown)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        ck.error(1, f"cannot read the manifest: {exc.strerror or exc}")
        raise ManifestError(ck.errors) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        ck.error(line, "the manifest is not UTF-8 text")
        raise ManifestError(ck.errors) from None

    doc = _parse(ck, text)
    if ck.errors:
        raise ManifestError(ck.errors)
    if doc is None:
        ck.error(1, "the manifest is empty; expected a mapping with `jobs:` (see the README)")
        raise ManifestError(ck.errors)
    if not isinstance(doc, dict):
        ck.error(getattr(doc, "line", 1) or 1,
                 f"expected a mapping with `jobs:` at the top level, got {_type_name(doc)}")
        raise ManifestError(ck.errors)

    ck.unknown_keys(doc, TOP_KEYS, None)

    model_ref = ""
    model_base = path.parent
    model_line = _line_of(doc, "model", 1)
    if "model" in doc:
        got = _text(ck, doc["model"], model_line, None, "model", allow_empty=False)
        model_ref = got.strip() if got else ""
    if model:
        model_ref, model_base = model, Path.cwd()
    elif "model" not in doc:
        ck.error(doc.line or 1, "missing `model:` (\"demo\" or a model directory), "
                 "or pass --model", None, "model")

    out: Path | None = None
    if output_dir is not None:
        out = Path(output_dir).expanduser().resolve()
    elif "output_dir" in doc:
        got = _text(ck, doc["output_dir"], _line_of(doc, "output_dir", 1), None, "output_dir",
                    allow_empty=False)
        if got:
            out = (path.parent / Path(got.strip()).expanduser()).resolve()
    else:
        out = (path.parent / "out" / (slugify(path.stem) or "run")).resolve()

    defaults: dict[str, Any] = {}
    defaults_lines: dict[str, int] = {}
    if "defaults" in doc:
        dline = _line_of(doc, "defaults", 1)
        d = doc["defaults"]
        if d is None:
            d = MarkedDict()
        if not isinstance(d, dict):
            ck.error(dline, f"expected a mapping of settings, got {_type_name(d)}", None,
                     "defaults")
        else:
            hint = ""
            for key in d:
                if key in ("tags", "prompt", "lyrics", "lyrics_file", "id", "title",
                           "prompt_mode"):
                    hint = "; defaults hold settings only, give prompts per job"
            ck.unknown_keys(d, DEFAULT_KEYS, None, "defaults.", hint)
            for key in DEFAULT_KEYS:
                if key in d:
                    defaults[key] = d[key]
                    defaults_lines[key] = _line_of(d, key, dline)

    # Defaults are checked once, where they are written.
    settings = _settings(ck, defaults, defaults_lines, None, "defaults.", max_renders,
                         base_ok=True)

    jobs_out: list[Job] = []
    if "jobs" not in doc:
        ck.error(doc.line or 1, "missing `jobs:` (a list of jobs to render)", None, "jobs")
    else:
        jobs = doc["jobs"]
        jline = _line_of(doc, "jobs", 1)
        if not isinstance(jobs, list):
            ck.error(jline, f"expected a list of jobs, got {_type_name(jobs)}", None, "jobs")
        elif not jobs:
            ck.error(jline, "the job list is empty", None, "jobs")
        else:
            item_lines = getattr(jobs, "item_lines", [jline] * len(jobs))
            seen: dict[str, int] = {}
            for idx, item in enumerate(jobs):
                job = _job(ck, item, idx, item_lines[idx], settings, defaults_lines, path,
                           max_renders)
                if job is None:
                    continue
                if job.id in seen:
                    ck.error(job.line, f"duplicate job id (first used on line {seen[job.id]})",
                             job.id, "id")
                    continue
                seen[job.id] = job.line
                jobs_out.append(job)

    total = sum(len(j.seeds) for j in jobs_out)
    if not ck.errors and total > max_renders:
        ck.error(_line_of(doc, "jobs", 1),
                 f"{total} renders (jobs x seeds) is more than the limit of {max_renders}; "
                 f"pass --max-renders {total} if you mean it", None, "jobs")

    if ck.errors:
        raise ManifestError(ck.errors)
    assert out is not None
    return Manifest(path=path, model=model_ref, model_base=model_base, output_dir=out,
                    jobs=jobs_out, warnings=ck.warnings, model_line=model_line)


def _settings(ck: _Checker, raw: dict[str, Any], lines: dict[str, int], job: str | None,
              prefix: str, max_renders: int, base_ok: bool = False) -> dict[str, Any]:
    """Check the settings present in `raw`; return the valid ones (invalid ones are left out)."""
    out: dict[str, Any] = {}
    for key, v in raw.items():
        line = lines.get(key, 1)
        fld = prefix + key
        if key == "mode":
            got = _choice(ck, v, MODES, line, job, fld)
        elif key == "duration":
            got = _int_in(ck, v, *DURATION_RANGE, line, job, fld,
                          " (whole minutes; use max_minutes to cut a song shorter)")
        elif key == "top_k_bb":
            got = _int_in(ck, v, *TOP_K_BB_RANGE, line, job, fld)
        elif key == "top_k_sr":
            got = _int_in(ck, v, *TOP_K_SR_RANGE, line, job, fld)
        elif key == "temperature":
            got = _float_in(ck, v, *TEMPERATURE_RANGE, line, job, fld)
        elif key == "max_minutes":
            got = _float_in(ck, v, *MAX_MINUTES_RANGE, line, job, fld, " minutes")
        elif key == "seeds":
            got = _seeds(ck, v, line, job, fld, max_renders)
        elif key in ("artist", "album", "genre"):
            got = _text(ck, v, line, job, fld)
            got = got.strip() if got is not None else None
        elif key == "year":
            got = _int_in(ck, v, *YEAR_RANGE, line, job, fld)
        else:  # pragma: no cover - keys are filtered before
            continue
        if got is not None:
            out[key] = got
    return out


def _job(ck: _Checker, item: Any, idx: int, line: int, defaults: dict[str, Any],
         defaults_lines: dict[str, int], manifest: Path, max_renders: int) -> Job | None:
    label = f"#{idx + 1}"
    if not isinstance(item, dict):
        ck.error(line, f"expected a mapping (id, tags/prompt, lyrics, ...), got "
                 f"{_type_name(item)}", label)
        return None
    d: MarkedDict = item  # type: ignore[assignment]
    line = d.line or line
    n_errors = len(ck.errors)

    # The id first, so every later message can name the job.
    job_id: str | None = None
    title: str | None = None
    if "title" in d:
        title = _text(ck, d["title"], _line_of(d, "title", line), label, "title")
        title = title.strip() if title is not None else None
    if "id" in d:
        id_line = _line_of(d, "id", line)
        raw_id = _text(ck, d["id"], id_line, label, "id", allow_empty=False)
        if raw_id is not None:
            raw_id = raw_id.strip()
            problem = _id_problem(raw_id)
            if problem:
                sug = slugify(raw_id)
                msg = f"{raw_id!r} {problem}"
                if sug and sug != raw_id and not _id_problem(sug):
                    msg += f" (try '{sug}')"
                ck.error(id_line, msg, label, "id")
            else:
                job_id = raw_id
    elif title:
        job_id = slugify(title)
        if not job_id or _id_problem(job_id):
            ck.error(_line_of(d, "title", line),
                     f"cannot make a job id from the title {title!r}; add `id:` "
                     "(lower-case letters, digits, '.', '_', '-')", label, "id")
            job_id = None
    else:
        ck.error(line, "missing `id` (or a `title` to derive it from)", label, "id")
    name = job_id or label

    ck.unknown_keys(d, JOB_KEYS, name)

    own_raw = {k: d[k] for k in SETTING_KEYS if k in d}
    own_lines = {k: _line_of(d, k, line) for k in own_raw}
    own = _settings(ck, own_raw, own_lines, name, "", max_renders)
    s = {**defaults, **own}

    mode = s.get("mode", "vocal")

    # Prompt: tags xor prompt, prompt_mode must agree.
    tags: tuple[str, ...] = ()
    prompt = ""
    has_tags, has_prompt = "tags" in d, "prompt" in d
    if has_tags and has_prompt:
        ck.error(_line_of(d, "prompt", line),
                 "give either `tags` (tags mode) or `prompt` (natural mode), not both",
                 name, "prompt")
    elif not has_tags and not has_prompt:
        ck.error(line, "missing `tags` (tags mode) or `prompt` (natural mode)", name, "tags")
    elif has_tags:
        tags = _tags(ck, d["tags"], _line_of(d, "tags", line), name) or ()
    else:
        prompt = (_text(ck, d["prompt"], _line_of(d, "prompt", line), name, "prompt",
                        allow_empty=False) or "").strip()
    implied = "natural" if has_prompt and not has_tags else "tags"
    prompt_mode = implied
    if "prompt_mode" in d:
        pm_line = _line_of(d, "prompt_mode", line)
        pm = _choice(ck, d["prompt_mode"], PROMPT_MODES, pm_line, name, "prompt_mode")
        if pm is not None and pm != implied and (has_tags != has_prompt):
            given = "tags" if has_tags else "prompt"
            ck.error(pm_line, f"prompt_mode is {pm!r} but the job gives `{given}` "
                     f"({implied} mode); {'natural mode needs `prompt`' if pm == 'natural' else 'tags mode needs `tags`'}",
                     name, "prompt_mode")

    # Lyrics: inline or from a file next to the manifest.
    lyrics_raw = ""
    lyrics_line = line
    lyrics_file: str | None = None
    if "lyrics" in d and "lyrics_file" in d:
        ck.error(_line_of(d, "lyrics_file", line), "give either `lyrics` or `lyrics_file`, "
                 "not both", name, "lyrics_file")
    elif "lyrics" in d:
        lyrics_line = _line_of(d, "lyrics", line)
        if d["lyrics"] is not None:
            lyrics_raw = _text(ck, d["lyrics"], lyrics_line, name, "lyrics") or ""
    elif "lyrics_file" in d:
        lyrics_line = _line_of(d, "lyrics_file", line)
        rel = _text(ck, d["lyrics_file"], lyrics_line, name, "lyrics_file", allow_empty=False)
        if rel is not None:
            lf = (manifest.parent / Path(rel.strip()).expanduser()).resolve()
            lyrics_file = str(lf)
            try:
                lyrics_raw = lf.read_text(encoding="utf-8")
            except FileNotFoundError:
                ck.error(lyrics_line, f"lyrics file {lf} does not exist (paths are relative "
                         f"to the manifest's folder {manifest.parent})", name, "lyrics_file")
            except UnicodeDecodeError:
                ck.error(lyrics_line, f"lyrics file {lf} is not UTF-8 text", name,
                         "lyrics_file")
            except OSError as exc:
                ck.error(lyrics_line, f"cannot read lyrics file {lf}: {exc.strerror or exc}",
                         name, "lyrics_file")
    track = None
    if "track" in d:
        track = _int_in(ck, d["track"], *TRACK_RANGE, _line_of(d, "track", line), name, "track")
    lyrics = clean_lyrics(lyrics_raw)
    if mode == "instrumental":
        if lyrics:
            ck.warn(lyrics_line, "lyrics are ignored in instrumental mode", name,
                    "lyrics_file" if lyrics_file else "lyrics")
        lyrics = ""
    elif mode == "vocal" and not lyrics and len(ck.errors) == n_errors:
        ck.warn(lyrics_line, "vocal mode with empty lyrics: the reference model is unstable "
                "without lyrics (add lyrics, or use mode: instrumental)", name, "lyrics")

    if len(ck.errors) > n_errors or job_id is None:
        return None
    return Job(
        id=job_id,
        title=title or job_id,
        line=line,
        seeds=tuple(s.get("seeds", DEFAULT_SEEDS)),
        mode=mode,
        prompt_mode=prompt_mode,
        tags=tags,
        prompt=prompt,
        lyrics=lyrics,
        duration=s.get("duration", DEFAULT_DURATION),
        top_k_bb=s.get("top_k_bb", DEFAULT_TOP_K_BB),
        top_k_sr=s.get("top_k_sr", DEFAULT_TOP_K_SR),
        temperature=float(s.get("temperature", DEFAULT_TEMPERATURE)),
        max_minutes=s.get("max_minutes"),
        artist=s.get("artist", ""),
        album=s.get("album", ""),
        lyrics_file=lyrics_file,
        track=track,
        year=s.get("year"),
        genre=s.get("genre", ""),
        index=idx,
    )


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
