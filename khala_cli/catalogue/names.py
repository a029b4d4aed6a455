"""File and folder names that are safe on Linux, macOS and Windows at once.

One path component at a time: no separators or other characters Windows forbids
(<>:"/\\|?* and control characters), no "." or "..", no reserved device names (CON, PRN,
AUX, NUL, COM1-9, LPT1-9, with or without an extension), no trailing dots or spaces, and at
most 255 bytes of UTF-8 (the common file-system limit), cut on a character boundary. Emoji
and CJK are kept. No torch here.
"""

from __future__ import annotations

import re
import unicodedata

MAX_BYTES = 255
_FORBIDDEN = re.compile(r'[<>:"/\\|?*\x00-\x1f\x7f]')
_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)),
             *(f"LPT{i}" for i in range(1, 10))}


def _cut(text: str, max_bytes: int) -> str:
    data = text.encode("utf-8")[:max_bytes]
    return data.decode("utf-8", errors="ignore")


def safe_component(name: str, *, suffix: str = "", fallback: str = "untitled") -> str:
    """`name` made safe as one path component, with `suffix` (e.g. " (take 2).mp3") kept
    whole at its end within the byte limit."""
    text = unicodedata.normalize("NFC", name)
    text = _FORBIDDEN.sub("_", text)
    text = re.sub(r"\s+", " ", text).strip()
    room = MAX_BYTES - len(suffix.encode("utf-8"))
    text = _cut(text, max(1, room)).rstrip(". ")
    if not text or set(text) <= {"."}:
        text = fallback
    if text.split(".")[0].strip().upper() in _RESERVED:
        text = "_" + text
    out = text + suffix
    return out.rstrip(". ") if not suffix else out
