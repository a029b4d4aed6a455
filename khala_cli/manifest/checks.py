"""The manifest's issues and its value checks: each check returns the value, or None after
recording an error that names the file, the line, the job and the field."""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from khala_cli.manifest.yaml_lines import MarkedDict, item_lines, line_of
from khala_cli.model_numbers import SEED_RANGE


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


@dataclass
class Checker:
    """Collects the issues of one manifest."""

    path: Path
    shown: str  # the file name as the user gave it
    max_renders: int
    errors: list[Issue] = field(default_factory=list)
    warnings: list[Issue] = field(default_factory=list)

    def at(self, line: int, job: str | None = None, fld: str | None = None) -> At:
        return At(self, line, job, fld)

    def fail(self) -> ManifestError:
        return ManifestError(self.errors)


@dataclass(frozen=True)
class At:
    """Where a value sits: its line, its job and its field, which every message names."""

    ck: Checker
    line: int
    job: str | None = None
    field: str | None = None

    def error(self, message: str) -> None:
        self.ck.errors.append(Issue(self.ck.shown, self.line, message, self.job, self.field))

    def warn(self, message: str) -> None:
        self.ck.warnings.append(Issue(self.ck.shown, self.line, message, self.job, self.field))

    def sub(self, suffix: str, line: int | None = None) -> At:
        """A part of this value: `suffix` is appended to the field ("[2]", ".count")."""
        return At(self.ck, self.line if line is None else line, self.job,
                  (self.field or "") + suffix)

    def key(self, d: Any, name: str, prefix: str = "") -> At:
        """The field `prefix + name` of mapping `d`, at its own line."""
        return At(self.ck, line_of(d, name, self.line), self.job, prefix + name)


# -- words -----------------------------------------------------------------------------------


def closest(word: str, choices: tuple[str, ...] | list[str]) -> str | None:
    found = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return found[0] if found else None


def type_name(v: Any) -> str:
    """What a YAML value is, in words, for 'expected ..., got ...' messages."""
    if v is None:
        return "nothing (null)"
    if isinstance(v, bool):
        return f"a boolean ({str(v).lower()})"
    if isinstance(v, dict):
        return "a mapping"
    if isinstance(v, list):
        return "a list"
    if isinstance(v, int):
        return f"an integer ({v})"
    if isinstance(v, float):
        return f"a number ({v:g})"
    if isinstance(v, str):
        return f"text ({v!r})" if len(v) <= 40 else "text"
    return type(v).__name__


def unknown_keys(at: At, d: MarkedDict, allowed: tuple[str, ...], prefix: str = "",
                 hint: str = "") -> None:
    """An error for every key of `d` not in `allowed`, suggesting the closest one."""
    for key in d:
        if key in allowed:
            continue
        suggestion = closest(str(key), allowed)
        msg = "unknown key"
        if suggestion:
            msg += f" (did you mean '{prefix}{suggestion}'?)"
        else:
            msg += f"; expected one of: {', '.join(allowed)}"
        at.key(d, str(key), prefix).error(msg + hint)


# -- plain values ----------------------------------------------------------------------------


def whole(at: At, v: Any, lo: int, hi: int, note: str = "", type_note: str = "") -> int | None:
    """A whole number in lo..hi (2.0 counts as 2)."""
    if isinstance(v, float) and v.is_integer() and not isinstance(v, bool):
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int):
        at.error(f"expected a whole number in {lo}..{hi}{type_note}, got {type_name(v)}")
        return None
    if not lo <= v <= hi:
        at.error(f"{v} is out of range {lo}..{hi}{note}")
        return None
    return v


def number(at: At, v: Any, lo: float, hi: float, note: str = "") -> float | None:
    """A number in lo..hi."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        at.error(f"expected a number in {lo:g}..{hi:g}, got {type_name(v)}")
        return None
    v = float(v)
    if v != v or not lo <= v <= hi:
        at.error(f"{v:g} is out of range {lo:g}..{hi:g}{note}")
        return None
    return v


def text(at: At, v: Any, allow_empty: bool = True) -> str | None:
    """Text; a number is taken as written (YAML reads `title: 1999` as an integer)."""
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        v = str(v)
    if not isinstance(v, str):
        at.error(f"expected text, got {type_name(v)}")
        return None
    if not allow_empty and not v.strip():
        at.error("must not be empty")
        return None
    return v


def boolean(at: At, v: Any) -> bool | None:
    """true or false (YAML's own booleans; no "yes" strings)."""
    if isinstance(v, bool):
        return v
    at.error(f"expected true or false, got {type_name(v)}")
    return None


def choice(at: At, v: Any, choices: tuple[str, ...]) -> str | None:
    if isinstance(v, str) and v in choices:
        return v
    msg = f"{type_name(v)} is not one of: {', '.join(choices)}"
    if isinstance(v, str):
        sug = closest(v.lower(), choices)
        if sug:
            msg += f" (did you mean '{sug}'?)"
    at.error(msg)
    return None


# -- seeds -----------------------------------------------------------------------------------

SEED_KEYS = ("from", "count")
SEEDS_FORMS = 'a list [1, 2, 3], a range "100-107", or {from: 100, count: 8}'
_SEED_RANGE_RE = re.compile(r"^\s*(\d+)\s*-\s*(\d+)\s*$")
_SEED_NOTE = " (seeds are non-negative integers)"


def seeds(at: At, v: Any) -> tuple[int, ...] | None:
    """One take per seed: a list, a "100-107" range, or {from, count}."""
    if isinstance(v, list):
        return _seed_list(at, v)
    if isinstance(v, str):
        return _seed_range(at, v)
    if isinstance(v, dict):
        return _seed_count(at, v)
    hint = ""
    if isinstance(v, int) and not isinstance(v, bool):
        hint = f" (for the single seed {v} write [{v}])"
    at.error(f"expected {SEEDS_FORMS}; got {type_name(v)}{hint}")
    return None


def _seed_list(at: At, v: list) -> tuple[int, ...] | None:
    if not v:
        at.error(f"no seeds; expected {SEEDS_FORMS}")
        return None
    out: list[int] = []
    seen: dict[int, int] = {}
    ok = True
    for i, (s, line) in enumerate(zip(v, item_lines(v, at.line), strict=True)):
        item = at.sub(f"[{i}]", line)
        got = whole(item, s, *SEED_RANGE, _SEED_NOTE)
        if got is not None and got in seen:
            item.error(f"seed {got} is listed twice (also item {seen[got]})")
            got = None
        if got is None:
            ok = False
            continue
        seen[got] = i
        out.append(got)
    return tuple(out) if ok else None


def _seed_range(at: At, v: str) -> tuple[int, ...] | None:
    lo, hi = SEED_RANGE
    m = _SEED_RANGE_RE.match(v)
    if not m:
        at.error(f"{v!r} is not a seed range; expected {SEEDS_FORMS}")
        return None
    a, b = int(m.group(1)), int(m.group(2))
    if b < a:
        at.error(f"range {v!r} ends before it starts; write \"{b}-{a}\"")
    elif b > hi:
        at.error(f"{b} is out of range {lo}..{hi}{_SEED_NOTE}")
    elif b - a + 1 > at.ck.max_renders:
        at.error(f"{b - a + 1} seeds is more than the limit of {at.ck.max_renders} renders "
                 "(raise it with --max-renders)")
    else:
        return tuple(range(a, b + 1))
    return None


def sub_keys(at: At, v: dict, allowed: tuple[str, ...], required: tuple[str, ...],
             example: str) -> bool:
    """The keys of a mapping value: an error for each unknown key (suggesting the closest)
    and each missing required one; True when there is none."""
    ok = True
    for key in v:
        if key not in allowed:
            sug = closest(str(key), allowed)
            expected = " and ".join(f"{at.field}.{k}" for k in allowed)
            at.sub(f".{key}", line_of(v, key, at.line)).error(
                "unknown key" + (f" (did you mean '{at.field}.{sug}'?)" if sug else
                                 f"; expected {expected}"))
            ok = False
    for key in required:
        if key not in v:
            at.sub(f".{key}").error(f"missing '{key}' (expected {example})")
            ok = False
    return ok


def _seed_count(at: At, v: dict) -> tuple[int, ...] | None:
    if not sub_keys(at, v, SEED_KEYS, SEED_KEYS, "{from: 100, count: 8}"):
        return None
    start = whole(at.sub(".from", line_of(v, "from", at.line)), v["from"], *SEED_RANGE,
                  _SEED_NOTE)
    count = whole(at.sub(".count", line_of(v, "count", at.line)), v["count"], 1,
                  at.ck.max_renders, " (at most the render limit; raise it with --max-renders)")
    if start is None or count is None:
        return None
    if start + count - 1 > SEED_RANGE[1]:
        at.error(f"the last seed {start + count - 1} is out of range "
                 f"{SEED_RANGE[0]}..{SEED_RANGE[1]}")
        return None
    return tuple(range(start, start + count))


# -- until and gates -------------------------------------------------------------------------

UNTIL_KEYS = ("passing", "max_takes")
UNTIL_FORM = "{passing: 2, max_takes: 16}"
GATE_KEYS = ("flags", "min_score")
GATES_FORM = "{flags: [silent, clipping, looping], min_score: -20}"


def _mapping(at: At, v: Any, form: str) -> bool:
    if isinstance(v, dict):
        return True
    at.error(f"expected a mapping {form}, got {type_name(v)}")
    return False


def until(at: At, v: Any) -> dict[str, int] | None:
    """{passing: K, max_takes: M}: roll seeds until K takes pass the gates, M at most."""
    if not _mapping(at, v, UNTIL_FORM) or not sub_keys(at, v, UNTIL_KEYS, UNTIL_KEYS,
                                                         UNTIL_FORM):
        return None
    limit = at.ck.max_renders
    note = {"passing": "", "max_takes": " (at most the render limit; raise it with "
                                        "--max-renders)"}
    got = {k: whole(at.sub(f".{k}", line_of(v, k, at.line)), v[k], 1, limit, note[k])
           for k in UNTIL_KEYS}
    if None in got.values():
        return None
    if got["passing"] > got["max_takes"]:
        at.sub(".passing", line_of(v, "passing", at.line)).error(
            f"passing {got['passing']} is more than max_takes {got['max_takes']}: at most "
            f"{got['max_takes']} takes can pass")
        return None
    return got


def gates(at: At, v: Any, flags: tuple[str, ...], score_range: tuple[float, float]
          ) -> dict[str, Any] | None:
    """{flags: [...], min_score: X}: the flags that fail a take (absent: every flag), and
    the least score a passing take has (absent: none)."""
    if not _mapping(at, v, GATES_FORM) or not sub_keys(at, v, GATE_KEYS, (), GATES_FORM):
        return None
    out: dict[str, Any] = {"flags": None, "min_score": None}
    ok = True
    if "min_score" in v:
        out["min_score"] = number(at.sub(".min_score", line_of(v, "min_score", at.line)),
                                  v["min_score"], *score_range,
                                  " (a take's score is at most 0; flagged takes score at or "
                                  "below -100)")
        ok = out["min_score"] is not None
    if "flags" in v:
        out["flags"] = _gate_flags(at.sub(".flags", line_of(v, "flags", at.line)), v["flags"],
                                   flags)
        ok = ok and out["flags"] is not None
    return out if ok else None


def _gate_flags(at: At, v: Any, flags: tuple[str, ...]) -> tuple[str, ...] | None:
    if not isinstance(v, list):
        at.error(f"expected a list of flags ({', '.join(flags)}), got {type_name(v)}")
        return None
    out = []
    for i, (f, line) in enumerate(zip(v, item_lines(v, at.line), strict=True)):
        got = choice(at.sub(f"[{i}]", line), f, flags)
        if got is None:
            return None
        out.append(got)
    return tuple(dict.fromkeys(out))


# -- tags ------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def tag_catalogue() -> dict[str, dict[str, Any]]:
    """The reference's tag catalogue: {category: {"label": str, "tags": [str]}}."""
    data = resources.files("khala_cli").joinpath("data/tags.json").read_text(encoding="utf-8")
    return json.loads(data)


@lru_cache(maxsize=1)
def known_tags() -> dict[str, str]:
    """lower-cased tag -> tag as the catalogue spells it."""
    return {t.lower(): t for cat in tag_catalogue().values() for t in cat["tags"]}


def tags(at: At, v: Any) -> tuple[str, ...] | None:
    """A list of tags or a comma-separated string; unknown tags are warned about."""
    if isinstance(v, str):
        items = [t.strip() for t in v.split(",")]
        lines = [at.line] * len(items)
        if any(not t for t in items) and any(items):
            at.error("empty tag between commas")
            return None
    elif isinstance(v, list):
        lines = item_lines(v, at.line)
        items = _tag_list(at, v, lines)
        if items is None:
            return None
    else:
        at.error(f"expected a list of tags or a comma-separated string, got {type_name(v)}")
        return None
    kept = [(t, line) for t, line in zip(items, lines, strict=True) if t]
    if not kept:
        at.error("no tags; give at least one tag, or use `prompt` instead")
        return None
    known = known_tags()
    for t, line in kept:
        if t.lower() not in known:
            sug = closest(t, list(known.values()))
            at.sub("", line).warn(
                f"tag {t!r} is not in the catalogue (`khala tags`)"
                + (f"; did you mean {sug!r}?" if sug else "; it is passed to the model as is"))
    return tuple(t for t, _ in kept)


def _tag_list(at: At, v: list, lines: list[int]) -> list[str] | None:
    items = []
    for i, t in enumerate(v):
        item = at.sub(f"[{i}]", lines[i])
        got = text(item, t, allow_empty=False)
        if got is None:
            return None
        if "," in got:
            item.error("a tag in a list must not contain a comma")
            return None
        items.append(got.strip())
    return items


# -- takes and times (re-rolls and extensions) -----------------------------------------------

_TIME_RE = re.compile(r"^\s*(?:(\d+):)?(\d+(?:\.\d*)?|\.\d+)\s*$")
_TAKE_RE = re.compile(r"^\s*([^:\s]+)\s*:\s*(\d+)\s*$")


def parse_time(v: Any) -> float:
    """Seconds from a number or text: `70`, `70.5`, `1:10`, `1:10.5`. ValueError says why."""
    if isinstance(v, bool) or v is None:
        raise ValueError(f"expected a time (seconds or m:ss), got {type_name(v)}")
    if isinstance(v, (int, float)):
        return float(v)
    m = _TIME_RE.match(str(v))
    if not m or (m.group(1) is not None and float(m.group(2)) >= 60):
        raise ValueError(f"{v!r} is not a time: write seconds (70, 70.5) or m:ss (1:10)")
    return 60.0 * int(m.group(1) or 0) + float(m.group(2))


def parse_take(v: Any) -> tuple[str, int]:
    """(job, seed) from `JOB:SEED`. ValueError says why."""
    m = _TAKE_RE.match(v) if isinstance(v, str) else None
    if not m:
        raise ValueError(f"expected a take as JOB:SEED (e.g. anthem:7), got {type_name(v)}")
    return m.group(1), int(m.group(2))


def clock(seconds: float) -> str:
    """m:ss.s for messages and labels (1:10, 1:10.4)."""
    m, s = divmod(round(float(seconds), 1), 60)
    text = f"{s:04.1f}".removesuffix(".0")
    return f"{int(m)}:{text if '.' in text else text.zfill(2)}"
