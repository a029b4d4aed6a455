"""The audio of a re-roll or extension: its parent's samples, bit for bit, up to just before
the cut, then a short linear crossfade into the newly decoded audio.

The codec decoder is not causal: the new take's samples just before the cut depend on the
new frames after it, so they differ a little from the parent's. The whole new take is
decoded (every window sees the kept frames as context), and the join moves from the parent's
samples to the new ones over the `FADE_FRAMES` frames that end at the cut. Both sides there
decode the same kept codes, so they are close and a linear (equal-gain) fade is the right
one. The parent's WAV is 24-bit PCM; read as float32 and written again as 24-bit PCM, its
samples come back bit for bit.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf

FADE_FRAMES = 1  # codec frames of crossfade, ending at the cut (2048 samples, 46 ms at 44.1 kHz)


class SpliceError(ValueError):
    """The parent's audio cannot be joined to the new take (it changed or is unreadable)."""


def fade_samples(cut: int, hop: int) -> int:
    """The crossfade's length in samples for a cut at sample `cut`."""
    return max(0, min(cut, FADE_FRAMES * hop))


def splice(parent_wav: str | Path, new: np.ndarray, cut: int, hop: int) -> np.ndarray:
    """new [samples, channels] float32 with samples [0, cut - fade) taken from the parent's
    WAV and [cut - fade, cut) faded from the parent's into the new ones; the rest is new."""
    try:
        kept, _ = sf.read(str(parent_wav), frames=cut, dtype="float32", always_2d=True)
    except (OSError, RuntimeError) as exc:
        raise SpliceError(f"cannot read the parent take's audio {parent_wav}: {exc}") from None
    new = np.asarray(new, dtype=np.float32)
    if kept.shape[0] < cut or kept.shape[1] != new.shape[1] or new.shape[0] < cut:
        raise SpliceError(f"the parent take's audio {parent_wav} has {kept.shape[0]} samples x "
                          f"{kept.shape[1]} channels; the cut needs {cut} x {new.shape[1]}")
    fade = fade_samples(cut, hop)
    start = cut - fade
    out = new.copy()
    out[:start] = kept[:start]
    w = ((np.arange(fade, dtype=np.float32) + 0.5) / max(fade, 1))[:, None]
    out[start:cut] = kept[start:cut] * (1.0 - w) + new[start:cut] * w
    return out
