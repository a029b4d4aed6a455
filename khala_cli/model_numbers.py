"""The Khala model's numbers, in one torch-free place: every layer takes them from here
(and the names of the analysis flags, which the manifest checks).

Token rates, caps and the controls' ranges and defaults are the reference system's (see
../shared/REFERENCE.md); the minutes estimates are ours, written once.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

SAMPLE_RATE = 44100
HOP = 2048  # samples per codec frame
FRAME_RATE = SAMPLE_RATE / HOP  # codec frames per second (21.53)
NUM_QUANTIZERS = 64
CODEBOOK_SIZE = 1024

TOKENS_PER_MINUTE = 2584  # backbone tokens per minute of audio (21.5 frames/s x 2 x 60)
MAX_NEW_TOKENS = 23552  # the reference's backbone cap (~9.1 minutes)
MAX_SEQ_LEN = 25600  # positions of the trained transformers
BACKBONE_MAX_PROMPT = 4096  # prompt caps: longer prompts keep their last ids
SUPERRES_MAX_PROMPT = 2048

MODES = ("vocal", "instrumental")
PROMPT_MODES = ("tags", "natural")
DURATION_RANGE = (1, 10)  # whole minutes: selects the model's duration token
TOP_K_BB_RANGE = (1, 200)
TOP_K_SR_RANGE = (1, 1024)
TEMPERATURE_RANGE = (0.6, 1.4)
MAX_MINUTES_RANGE = (0.05, 10.0)
SEED_RANGE = (0, 2**32 - 1)

# The names of the flags a take's analysis raises (analysis.py decides when); a manifest's
# `gates` name them, and the manifest sits below the analysis.
ANALYSIS_FLAGS = ("silent", "clipping", "looping", "cut_at_cap", "too_quiet", "too_loud")
SCORE_RANGE = (-1000.0, 0.0)  # a take's score is at most 0; a `gates.min_score` lies here

DEFAULT_DURATION = 3
DEFAULT_TOP_K_BB = 80
DEFAULT_TOP_K_SR = 10
DEFAULT_TEMPERATURE = 1.0


def max_new_tokens(max_minutes: float | None) -> int:
    """Backbone token cap for a length cap in minutes (even: one q0,q1 pair per frame)."""
    if max_minutes is None:
        return MAX_NEW_TOKENS
    tokens = int(round(max_minutes * TOKENS_PER_MINUTE))
    tokens -= tokens % 2
    return max(2, min(MAX_NEW_TOKENS, tokens))


def est_minutes(duration: int, max_new: int) -> float:
    """Rough audio length of one take: its duration token, cut by its token cap."""
    return min(float(duration), max_new / TOKENS_PER_MINUTE)


def expected_tokens(duration: int, max_new: int) -> int:
    """Backbone tokens a progress bar expects: the reference's estimate
    (duration + 0.8 minutes), capped."""
    return max(1, min(int(TOKENS_PER_MINUTE * (duration + 0.8)), int(max_new)))


@dataclass(frozen=True, kw_only=True)
class Controls:
    """The sampling controls of one render, declared once: the planner's Render and the
    engine's Request are both Controls, and `controls_of` copies them between layers."""

    duration: int = DEFAULT_DURATION  # minutes: the duration token (and progress estimate)
    top_k_bb: int = DEFAULT_TOP_K_BB
    temperature: float = DEFAULT_TEMPERATURE
    top_k_sr: int = DEFAULT_TOP_K_SR
    max_new_tokens: int = MAX_NEW_TOKENS  # the backbone cap, from max_minutes


_CAST = {"int": int, "float": float}


def controls_of(obj: Any) -> dict[str, Any]:
    """The Controls fields of any object that has them (a Job, a Render), cast to their
    declared types: a render key must not depend on whether 1 or 1.0 was written."""
    return {f.name: _CAST[f.type](getattr(obj, f.name)) for f in fields(Controls)}
