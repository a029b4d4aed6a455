"""What a listener should know about one take, measured from its own audio and tokens.

No model and no network: loudness (ITU-R BS.1770-4 through pyloudnorm), true peak (4x
oversampled), clipping, silence, how the backbone ended, how much its q0 codes repeat, and
the model's own confidence (the mean log-probability of its tokens). `flags` name what is
wrong; `score` sorts the takes of a job, every flagged take below every unflagged one.
No torch here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from khala_cli.model_numbers import ANALYSIS_FLAGS as FLAGS  # the flags' names live below
from khala_cli.model_numbers import FRAME_RATE  # noqa: F401 - used by the review bench

# pyloudnorm and scipy are imported inside the functions that measure: together they take
# about 0.6 s to import, and the parent loads this module (through outputs) for every
# command, `--help`, `validate` and `plan` included, which must answer fast.

SILENCE_WINDOW_S = 0.1
REPETITION_WINDOW = 8  # q0 frames (0.37 s) per compared stretch
PEAKS = 120  # waveform points kept for the review page
# Full scale as a 24-bit WAV stores it (8388607 / 8388608), so a take measured again from its
# WAV counts the samples that were clipped when it was written.
FULL_SCALE = 1.0 - 2.0**-23
_PEAK_CHARS = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ-_"  # 64 levels


@dataclass(frozen=True)
class Thresholds:
    """The one home of every flag's threshold (the README's table mirrors this)."""

    silence_dbfs: float = -60.0  # a 100 ms window quieter than this is silence
    silent_fraction: float = 0.5  # flag `silent` at or above this share of silent windows
    clip_fraction: float = 0.001  # flag `clipping` above 0.1 % of samples at full scale
    looping: float = 0.5  # flag `looping` at or above this repetition
    too_quiet_lufs: float = -30.0  # flag `too_quiet` below
    too_loud_lufs: float = -7.0  # flag `too_loud` above
    too_loud_true_peak_db: float = 1.0  # ... or a true peak above +1 dBTP


THRESHOLDS = Thresholds()
FLAG_PENALTY = 100.0
UNKNOWN_LOGPROB = -10.0  # below any real mean log-probability of a top-k draw (>= -ln 1024)
LOGPROB_FLOOR = -50.0


def loudness_lufs(audio: np.ndarray, sample_rate: int) -> float | None:
    """Integrated loudness (BS.1770-4, gated) of float [samples, channels]; None when the
    take is shorter than one 400 ms block or entirely below the absolute gate."""
    import pyloudnorm

    if audio.shape[0] < int(0.4 * sample_rate) + 1:
        return None
    value = pyloudnorm.Meter(int(sample_rate)).integrated_loudness(audio.astype(np.float64))
    return float(value) if math.isfinite(value) else None


def true_peak_db(audio: np.ndarray) -> float | None:
    """True peak in dBTP: the largest magnitude after 4x polyphase oversampling."""
    from scipy.signal import resample_poly

    if audio.size == 0:
        return None
    # fp32 is exact enough for a peak in dB (to ~1e-6 dB) and 3x faster than fp64 here.
    up = np.stack([resample_poly(audio[:, c].astype(np.float32), 4, 1)
                   for c in range(audio.shape[1])], axis=1)
    peak = max(float(np.max(np.abs(up))), float(np.max(np.abs(audio))))
    return 20.0 * math.log10(peak) if peak > 0 else None


def silence(audio: np.ndarray, sample_rate: int, floor_dbfs: float) -> tuple[float, float, float]:
    """(share of 100 ms windows below floor_dbfs, leading seconds, trailing seconds)."""
    win = max(1, int(round(SILENCE_WINDOW_S * sample_rate)))
    n = audio.shape[0] // win
    if n == 0:
        return 1.0, audio.shape[0] / sample_rate, audio.shape[0] / sample_rate
    frames = audio[: n * win].reshape(n, -1).astype(np.float64)
    rms = np.sqrt(np.mean(frames * frames, axis=1))
    quiet = rms < 10.0 ** (floor_dbfs / 20.0)
    loud = np.flatnonzero(~quiet)
    if loud.size == 0:
        total = audio.shape[0] / sample_rate
        return 1.0, total, total
    lead = loud[0] * win / sample_rate
    trail = (audio.shape[0] - (loud[-1] + 1) * win) / sample_rate
    return float(quiet.mean()), round(lead, 3), round(trail, 3)


def repetition(q0: np.ndarray | None, window: int = REPETITION_WINDOW) -> float | None:
    """Share of the q0 stream's `window`-frame stretches that already occurred, exactly,
    earlier in the stream (a looping backbone repeats itself; music rarely repeats 8
    frames of codes to the token). None without codes or with fewer than 2 windows."""
    if q0 is None:
        return None
    q = np.asarray(q0, dtype=np.int64).ravel()
    n = q.size - window + 1
    if n < 2:
        return None
    grams = np.lib.stride_tricks.sliding_window_view(q, window)
    _, first = np.unique(grams, axis=0, return_index=True)
    return round(1.0 - first.size / n, 4)


def peaks(audio: np.ndarray, points: int = PEAKS) -> str:
    """The waveform as `points` characters, each the peak of one stretch on a 64-level
    scale from -48 dBFS to full scale (the review page draws it)."""
    mono = np.abs(audio).max(axis=1) if audio.ndim == 2 else np.abs(audio)
    if mono.size == 0:
        return ""
    edges = np.linspace(0, mono.size, min(points, mono.size) + 1).astype(int)
    top = np.maximum.reduceat(mono, edges[:-1])
    db = 20.0 * np.log10(np.maximum(top, 1e-6))
    levels = np.clip(np.round((db + 48.0) / 48.0 * 63), 0, 63).astype(int)
    return "".join(_PEAK_CHARS[v] for v in levels)


def flags_of(m: dict[str, Any], t: Thresholds = THRESHOLDS) -> list[str]:
    """The flags that the measurements `m` raise, in FLAGS order."""
    lufs, tp = m.get("lufs"), m.get("true_peak_db")
    raised = {
        "silent": m.get("silence_fraction", 0.0) >= t.silent_fraction or lufs is None,
        "clipping": m.get("clip_fraction", 0.0) > t.clip_fraction,
        "looping": (m.get("repetition") or 0.0) >= t.looping,
        "cut_at_cap": m.get("ended") == "token_cap",
        "too_quiet": lufs is not None and lufs < t.too_quiet_lufs,
        "too_loud": (lufs is not None and lufs > t.too_loud_lufs)
        or (tp is not None and tp > t.too_loud_true_peak_db),
    }
    return [f for f in FLAGS if raised[f]]


def score_of(m: dict[str, Any], flags: list[str]) -> float:
    """confidence - repetition - silence_fraction - 100 x flags, where confidence is the
    mean log-probability clamped to [-50, 0] (-10 when unknown). Unflagged scores lie in
    [-52, 0], flagged ones at or below -100."""
    lp = m.get("logprob_mean")
    conf = UNKNOWN_LOGPROB if lp is None else min(0.0, max(LOGPROB_FLOOR, float(lp)))
    s = conf - (m.get("repetition") or 0.0) - m.get("silence_fraction", 0.0)
    return round(s - FLAG_PENALTY * len(flags), 4)


def analyse(audio: np.ndarray, sample_rate: int, *, q0: np.ndarray | None = None,
            ended: str | None = None, logprob_mean: float | None = None) -> dict[str, Any]:
    """The sidecar's `analysis` of float audio [samples, channels] (before clipping)."""
    a = np.asarray(audio, dtype=np.float32)
    if a.ndim == 1:
        a = a[:, None]
    sil, lead, trail = silence(a, sample_rate, THRESHOLDS.silence_dbfs)
    lufs = loudness_lufs(a, sample_rate)
    tp = true_peak_db(a)
    m: dict[str, Any] = {
        "lufs": None if lufs is None else round(lufs, 2),
        "true_peak_db": None if tp is None else round(tp, 2),
        "clip_fraction": round(float(np.mean(np.abs(a) >= FULL_SCALE)), 6) if a.size else 0.0,
        "silence_fraction": round(sil, 4),
        "leading_silence_s": lead,
        "trailing_silence_s": trail,
        "ended": ended,
        "repetition": repetition(q0),
        "logprob_mean": None if logprob_mean is None else round(float(logprob_mean), 4),
    }
    m["flags"] = flags_of(m)
    m["score"] = score_of(m, m["flags"])
    m["peaks"] = peaks(a)
    return m


def passes(analysis: Mapping[str, Any] | None, gates: Mapping[str, Any] | None = None
           ) -> tuple[bool, list[str]]:
    """Whether a take passes the gates, and why not. `gates` {flags, min_score} (an until
    render's `until` holds both): `flags` None fails a take on any flag, a list on those
    only; `min_score` None sets no minimum. A take without analysis does not pass."""
    if not analysis:
        return False, ["not measured"]
    gates = gates or {}
    failing = FLAGS if gates.get("flags") is None else tuple(gates["flags"])
    reasons = [f"flag {f}" for f in analysis.get("flags") or () if f in failing]
    least, score = gates.get("min_score"), analysis.get("score")
    if least is not None and (score is None or float(score) < float(least)):
        reasons.append(f"score {score} below {least:g}")
    return not reasons, reasons


def thresholds() -> dict[str, float]:
    return asdict(THRESHOLDS)
