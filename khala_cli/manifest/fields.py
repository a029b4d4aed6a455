"""The manifest's fields, as one table: type, range or choices, default, where each may sit,
and a line of help. Validation, defaults, the keys `defaults` may hold, `khala validate
--explain` and the README's manifest table all read it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from khala_cli import model_numbers as mn
from khala_cli.manifest import checks as chk

TOP = "top"  # the manifest's top level
JOB = "job"  # one job only
SETTING = "setting"  # a job, or `defaults` for every job

WHERE_TEXT = {TOP: "the top level", JOB: "a job", SETTING: "a job or `defaults`"}
KIND_TEXT = {"whole": "a whole number", "number": "a number", "text": "text",
             "choice": "one of the choices", "seeds": "seeds (a list, a range or from/count)",
             "tags": "a list of tags, or text with commas", "mapping": "a mapping",
             "list": "a list", "bool": "true or false",
             "until": "a mapping {passing: K, max_takes: M}",
             "gates": "a mapping {flags: [...], min_score: X}"}
MD_BAR = " \\| "  # a "|" inside a Markdown table cell
PROMPT_HINT = "; defaults hold settings only, give prompts per job"


@dataclass(frozen=True)
class Field:
    """One manifest key."""

    name: str
    where: str  # TOP, JOB or SETTING
    kind: str  # whole | number | text | choice | seeds | tags | mapping | list | bool | until
    # | gates
    help: str
    default: Any = None  # the value a job gets when the key is absent
    limits: tuple[float, float] | None = None  # whole/number: inclusive range
    choices: tuple[str, ...] = ()
    note: str = ""  # appended to an out-of-range message
    type_note: str = ""  # appended to a wrong-type message's range
    rule: str = ""  # the README's range/default column, where the limits do not say it all
    defaults_hint: str = ""  # appended when the key is written under `defaults`
    strip: bool = False  # text: surrounding spaces dropped
    required: bool = False  # text: must not be empty

    def range_text(self, bar: str = " | ") -> str:
        """The rule in words: range or choices, then the default."""
        parts = []
        if self.limits is not None:
            parts.append(f"{self.limits[0]:g}..{self.limits[1]:g}")
        if self.choices:
            parts.append(bar.join(f"`{c}`" for c in self.choices))
        if self.rule:
            parts.append(self.rule)
        elif self.default not in (None, ""):
            parts.append(f"default `{self.default}`" if isinstance(self.default, str)
                         else f"default {self.default:g}")
        return "; ".join(parts)

    def check(self, at: chk.At, v: Any) -> Any:
        """The value, checked against this field's type and range; None after an error."""
        return CHECKS[self.kind](self, at, v)


def _text(f: Field, at: chk.At, v: Any) -> str | None:
    got = chk.text(at, v, allow_empty=not f.required)
    return got.strip() if got is not None and f.strip else got


CHECKS: dict[str, Callable[[Field, chk.At, Any], Any]] = {
    "whole": lambda f, at, v: chk.whole(at, v, *f.limits, f.note, f.type_note),
    "number": lambda f, at, v: chk.number(at, v, *f.limits, f.note),
    "text": _text,
    "choice": lambda f, at, v: chk.choice(at, v, f.choices),
    "seeds": lambda f, at, v: chk.seeds(at, v),
    "tags": lambda f, at, v: chk.tags(at, v),
    "bool": lambda f, at, v: chk.boolean(at, v),
    "until": lambda f, at, v: chk.until(at, v),
    "gates": lambda f, at, v: chk.gates(at, v, mn.ANALYSIS_FLAGS, mn.SCORE_RANGE),
}

_LYRICS_RULE = "one or the other"
_SETTINGS = (
    Field("mode", SETTING, "choice", "`vocal` sings the lyrics; `instrumental` ignores them "
          "(with a warning)", "vocal", choices=mn.MODES),
    Field("duration", SETTING, "whole", "whole minutes: selects the model's duration token",
          mn.DEFAULT_DURATION, mn.DURATION_RANGE, type_note=" (whole minutes)",
          note=" (whole minutes; use max_minutes to cut a song shorter)"),
    Field("top_k_bb", SETTING, "whole", "backbone top-k sampling", mn.DEFAULT_TOP_K_BB,
          mn.TOP_K_BB_RANGE),
    Field("temperature", SETTING, "number", "backbone sampling temperature",
          mn.DEFAULT_TEMPERATURE, mn.TEMPERATURE_RANGE),
    Field("top_k_sr", SETTING, "whole", "super-resolution top-k", mn.DEFAULT_TOP_K_SR,
          mn.TOP_K_SR_RANGE),
    Field("max_minutes", SETTING, "number", "hard cap on the generated length "
          f"({mn.TOKENS_PER_MINUTE} backbone tokens per minute)", None, mn.MAX_MINUTES_RANGE,
          note=" minutes", rule=f"default the reference's cap of {mn.MAX_NEW_TOKENS} tokens "
          f"(~{mn.MAX_NEW_TOKENS / mn.TOKENS_PER_MINUTE:.1f} min)"),
    Field("seeds", SETTING, "seeds", "one take per seed: `[1, 2, 3]`, `\"100-107\"` or "
          "`{from: 100, count: 8}`", (1,),
          rule=f"integers {mn.SEED_RANGE[0]}..{mn.SEED_RANGE[1]}, default `[1]`"),
    Field("until", SETTING, "until", "roll seeds until K takes pass the `gates`: the job's "
          "seeds, then counting up from its last, a batch at a time, M takes at most",
          None,
          rule="`{passing: K, max_takes: M}`, 1 <= K <= M; optional"),
    Field("gates", SETTING, "gates", "what an `until` take must pass: `flags` that fail it, "
          "`min_score` it must reach", None,
          rule=f"flags among {', '.join(f'`{x}`' for x in mn.ANALYSIS_FLAGS)} (default: "
          f"any flag fails); min_score {mn.SCORE_RANGE[0]:g}..{mn.SCORE_RANGE[1]:g} "
          "(default: none)"),
    Field("artist", SETTING, "text", "MP3 tag; the export's folders and tags", "", strip=True,
          rule="optional"),
    Field("album", SETTING, "text", "MP3 tag; the export's folders and tags", "", strip=True,
          rule="optional"),
    Field("year", SETTING, "whole", "tag of the exported catalogue", None, (1000, 9999),
          rule="optional"),
    Field("genre", SETTING, "text", "tag of the exported catalogue", "", strip=True,
          rule="optional"),
)
_JOB_ONLY = (
    Field("id", JOB, "text", "folder and file names of the job's takes", None, strip=True,
          required=True, rule="`[a-z0-9][a-z0-9._-]*`, unique, at most 100 characters, not `reports`; "
          "default: made from `title`", defaults_hint=PROMPT_HINT),
    Field("title", JOB, "text", "MP3 title tag and the report's name for the job", None,
          rule="default: the id", defaults_hint=PROMPT_HINT, strip=True),
    Field("prompt_mode", JOB, "choice", "optional; must agree with `tags`/`prompt`", None,
          choices=mn.PROMPT_MODES, defaults_hint=PROMPT_HINT),
    Field("tags", JOB, "tags", "tags mode: a list or a comma-separated string (`khala tags` "
          "lists the catalogue; other tags are passed on as written, with a warning "
          "suggesting the closest known tag)", (), rule="give `tags` or `prompt`, not both",
          defaults_hint=PROMPT_HINT),
    Field("prompt", JOB, "text", "natural mode: a description of the song", "",
          rule="give `tags` or `prompt`, not both", defaults_hint=PROMPT_HINT, strip=True,
          required=True),
    Field("lyrics", JOB, "text", "the lyrics, inline; cleaned as the reference does "
          "(full-width and look-alike characters -> ASCII)", "", rule=_LYRICS_RULE,
          defaults_hint=PROMPT_HINT),
    Field("lyrics_file", JOB, "text", "the lyrics from a UTF-8 file, relative to the "
          "manifest's folder", None, rule=_LYRICS_RULE, defaults_hint=PROMPT_HINT,
          required=True, strip=True),
    Field("reroll", JOB, "mapping", "a re-roll of one take: `{take: JOB:SEED, from: TIME}` keeps "
          "the take's first TIME (seconds or m:ss) and renders the rest again at each of the "
          "job's seeds; the prompt and settings are the take's", None,
          rule="the take must be rendered, with codes; no prompt or sampling keys beside it",
          defaults_hint=PROMPT_HINT),
    Field("extend", JOB, "mapping", "an extension of one take: `{take: JOB:SEED, to: TIME}` keeps "
          "the whole take and continues it to TIME at each of the job's seeds", None,
          rule="as `reroll`; TIME past the take's end, within the model's length",
          defaults_hint=PROMPT_HINT),
    Field("track", JOB, "whole", "track number in the exported catalogue (per job: a default "
          "would give every job the same one)", None, (1, 999),
          rule="default: the job's place in the manifest"),
)
_TOP = (
    Field("model", TOP, "text", "`demo` (the embedded untrained model: noise, not music) or a "
          "model directory, relative to the manifest", None,
          rule="required unless --model is given", strip=True, required=True),
    Field("output_dir", TOP, "text", "where the takes go, relative to the manifest", None,
          rule="default out/<manifest name>", required=True, strip=True),
    Field("save_codes", TOP, "bool", "keep each take's RVQ codes (`<stem>.codes.npy`, int16) "
          "beside its audio, so it can be decoded again; `false` opts out (as does "
          "`render --no-save-codes`)", True, rule="default true"),
    Field("defaults", TOP, "mapping", "settings every job gets unless it sets its own", None,
          rule="the fields marked *"),
    Field("jobs", TOP, "list", "the jobs to render, in order", None, rule="required"),
)

FIELDS: dict[str, Field] = {f.name: f for f in _TOP + _JOB_ONLY + _SETTINGS}

TOP_KEYS = tuple(f.name for f in _TOP)
SETTING_KEYS = tuple(f.name for f in _SETTINGS)
JOB_KEYS = tuple(f.name for f in _JOB_ONLY) + SETTING_KEYS


def check_settings(at: chk.At, raw: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """The valid settings of mapping `raw` (a job or `defaults`); invalid ones are left out."""
    out = {}
    for key in SETTING_KEYS:
        if key in raw:
            got = FIELDS[key].check(at.key(raw, key, prefix), raw[key])
            if got is not None:
                out[key] = got
    return out


def explain(name: str) -> str:
    """`khala validate --explain NAME`: the field's help, rule and where it may sit."""
    f = FIELDS[name]
    where = WHERE_TEXT[f.where]
    lines = [f"{f.name}: {f.help}", f"  type: {KIND_TEXT[f.kind]}", f"  allowed in: {where}"]
    if f.range_text():
        lines.append(f"  range / default: {f.range_text()}")
    return "\n".join(lines)


def readme_table() -> str:
    """The README's table of job fields (settings marked *), generated from FIELDS."""
    rows = ["| key | meaning | range / default |", "|---|---|---|"]
    for f in _JOB_ONLY + _SETTINGS:
        star = "*" if f.where == SETTING else ""
        rule = f.range_text(bar=MD_BAR)
        rows.append(f"| `{f.name}`{star} | {f.help} | {rule} |")
    return "\n".join(rows)
