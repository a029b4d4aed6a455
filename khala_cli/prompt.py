"""Lyrics cleaning and the exact prompt text the Khala models were trained on.

Pure Python: no torch, so the parent process can use it too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from khala_cli.model_numbers import (  # noqa: F401 - MODES, PROMPT_MODES re-exported
    BACKBONE_MAX_PROMPT,
    MODES,
    PROMPT_MODES,
    SUPERRES_MAX_PROMPT,
)

BOS = "<|begin_of_text|>"
END_OF_TEXT = "<|end_of_text|>"
NO_USE = "<|finetune_right_pad_id|>"
EOM = "<|eom_id|>"
BOL = "<|start_header_id|>"
END_OF_LINE = "<|end_header_id|>"
EOT = "<|eot_id|>"
BOA = "<|python_tag|>"


def duration_token(minutes: int) -> str:
    """The special token that tells the model the requested length in whole minutes."""
    return f"<|reserved_special_token_{int(minutes)}|>"


# Characters the trained model never saw, mapped to the ASCII it did see. Multi-character
# sequences are replaced before single characters (a doubled em dash is one dash).
_SEQUENCES = {
    "\u2014\u2014": "-",
    "\u00e2\u0080\u0099": "'",  # UTF-8 right quote decoded as Latin-1
}
# Full-width ASCII (U+FF01..U+FF5E), except the braces and bar, which the reference keeps.
_FULLWIDTH_ASCII = {chr(0xFF01 + i): chr(0x21 + i) for i in range(0x5E)}
_CHARS = {
    **{k: v for k, v in _FULLWIDTH_ASCII.items() if k not in "\uff5b\uff5c\uff5d"},
    # CJK punctuation and brackets
    "\u3002": ".", "\u3001": ",", "\u300c": '"', "\u300d": '"', "\u300e": "'", "\u300f": "'",
    "\u300a": "<", "\u300b": ">", "\u3010": "[", "\u3011": "]", "\u3016": "[", "\u3017": "]",
    "\u3008": "<", "\u3009": ">", "\u30fb": " ", "\ufe4f": "_", "\ufe63": "-", "\u060c": ",",
    "\uff40": "'", "\u2236": ":",
    # quotes, dashes, ellipsis and look-alike marks
    "\u201c": '"', "\u201d": '"', "\u2018": "'", "\u2019": "'", "\u2032": "'", "\u02bc": "'",
    "\u00b4": "'", "^": "'", "\u00a8": '"', "\u2026": "...", "\u2013": "-", "\u2014": "-",
    "\u2015": "-", "|": "-", "\u00b7": ".", "\u00d7": "x", "\u00f7": "/",
    # Cyrillic and Greek letters that look like Latin ones
    "\u0435": "e", "\u0430": "a", "\u043e": "o", "\u0440": "p", "\u0441": "c", "\u0443": "y",
    "\u0445": "x", "\u0391": "A", "\u0392": "B", "\u0395": "E", "\u0397": "H", "\u0399": "I",
    "\u039a": "K", "\u039c": "M", "\u039d": "N", "\u039f": "O", "\u03a1": "P", "\u03a4": "T",
    "\u03a5": "Y", "\u03a7": "X", "\u0396": "Z",
    # invisible and unusual spaces
    "\u200b": "", "\ufeff": "", "\u202a": "", "\u202c": "", "\u180e": "", "\ue3ac": "",
    "\u2605": "", "\u00a0": " ", "\u3000": " ", "\u2005": " ", "\u2006": " ", "\u2028": " ",
}
_TRANSLATION = str.maketrans(_CHARS)


def clean_lyrics(text: str) -> str:
    """Map full-width, CJK and look-alike characters to ASCII and strip, as the reference does."""
    for seq, repl in _SEQUENCES.items():
        text = text.replace(seq, repl)
    return text.translate(_TRANSLATION).strip()


@dataclass(frozen=True)
class PromptSpec:
    """What the prompt text is made of: one request's musical controls."""

    mode: str = "vocal"  # vocal | instrumental
    prompt_mode: str = "tags"  # tags | natural
    tags: tuple[str, ...] = ()
    prompt: str = ""  # natural-language description (natural mode)
    lyrics: str = ""  # already cleaned
    duration: int = 3  # whole minutes, selects the duration token

    @property
    def tags_text(self) -> str:
        return ", ".join(t.strip() for t in self.tags if t.strip())


def _compose(metadata: str, spec: PromptSpec) -> str:
    dur = duration_token(spec.duration)
    if spec.mode == "instrumental":
        return f"{BOS}{metadata}{EOM}Instrumental{EOM}{dur}{EOT}{BOA}"
    lyrics = spec.lyrics.strip().replace("\n", END_OF_LINE)
    return f"{BOS}{metadata}{EOM}{EOM}{BOL}{END_OF_LINE}{lyrics}{EOM}{dur}{EOT}{BOA}"


def backbone_text(spec: PromptSpec) -> str:
    """Prompt text for the backbone: the description (natural) or the tags as metadata."""
    metadata = spec.prompt.strip() if spec.prompt_mode == "natural" else spec.tags_text
    return _compose(metadata, spec)


def superres_text(spec: PromptSpec) -> str:
    """Prompt text for super-resolution: as the backbone's, minus a natural description."""
    metadata = "" if spec.prompt_mode == "natural" else spec.tags_text
    return _compose(metadata, spec)


class Tokenizer(Protocol):
    def encode(self, text: str, add_special_tokens: bool = ...): ...


def encode(tokenizer: Tokenizer, text: str, max_len: int) -> list[int]:
    """Token ids of `text` with no added specials, capped at max_len keeping the last id."""
    ids = list(tokenizer.encode(text, add_special_tokens=False).ids)
    if len(ids) > max_len:
        ids = ids[: max_len - 1] + [ids[-1]]
    return ids


def prompt_ids(tokenizer: Tokenizer, spec: PromptSpec) -> tuple[list[int], list[int]]:
    """(backbone ids, super-res ids) for one request."""
    bb = encode(tokenizer, backbone_text(spec), BACKBONE_MAX_PROMPT)
    sr = encode(tokenizer, superres_text(spec), SUPERRES_MAX_PROMPT)
    return bb, sr
