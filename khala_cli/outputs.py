"""One take -> WAV + MP3 (+ codes) + JSON sidecar, each written atomically.

    <out_dir>/<stem>.wav        44.1 kHz stereo, 24-bit PCM (soundfile)
    <out_dir>/<stem>.mp3        320 kb/s with title/artist/album tags (ffmpeg)
    <out_dir>/<stem>.codes.npy  int16 [num_quantizers, frames], with --save-codes
    <out_dir>/<stem>.json       the sidecar, written LAST: a take is done when it exists,
                                carries the render key, and its audio files exist

Every file goes to a temporary name in the same directory and is renamed into place, so a
crash never leaves a half-written file under a real name. No torch here.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from khala_cli import __version__
from khala_cli.analysis import analyse
from khala_cli.plan import Render

MP3_BITRATE = "320k"
MP3_SAMPLE_RATE = 44100
TMP_PREFIX = ".tmp-"  # temporary files: .tmp-<stem>.<suffix>.<random>
DEMO_NOTE = "demo model: untrained, renders noise (not music)"

# mkstemp creates files 0600; outputs get the usual permissions (0666 less the umask).
_UMASK = os.umask(0o022)
os.umask(_UMASK)


class OutputError(Exception):
    """A take could not be written; the message says why. The render is failed."""


def ffmpeg_exe() -> str:
    """$KHALA_FFMPEG, else ffmpeg on PATH, else the binary that ships with imageio-ffmpeg."""
    env = os.environ.get("KHALA_FFMPEG")
    if env:
        return env
    found = shutil.which("ffmpeg")
    if found:
        return found
    try:
        import imageio_ffmpeg
    except ImportError:  # pragma: no cover - a declared dependency
        raise OutputError("no ffmpeg: none on PATH and imageio-ffmpeg is not installed") from None
    return imageio_ffmpeg.get_ffmpeg_exe()


def check_ffmpeg() -> str | None:
    """Why MP3s cannot be encoded here (no ffmpeg, or one without libmp3lame), or None.

    Run before rendering, so a missing encoder fails the run in a second, not every render
    after its generation."""
    try:
        exe = ffmpeg_exe()
    except OutputError as exc:
        return str(exc)
    try:
        proc = subprocess.run([exe, "-hide_banner", "-nostdin", "-encoders"],
                              capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"cannot run ffmpeg {exe}: {exc}"
    if proc.returncode != 0:
        return f"ffmpeg {exe} -encoders failed: {proc.stderr.strip()[-500:] or proc.returncode}"
    if "libmp3lame" not in proc.stdout:
        return f"ffmpeg {exe} has no libmp3lame encoder (needed for the MP3s)"
    return None


@contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary path next to `final`; rename it into place if the block succeeds."""
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{final.name}.", dir=final.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


def _checked_audio(audio: Any) -> np.ndarray:
    """float32 [samples, channels], all finite; OutputError otherwise."""
    a = np.asarray(audio, dtype=np.float32)
    if a.ndim == 1:
        a = a[:, None]
    if a.ndim != 2 or a.shape[0] == 0 or not 1 <= a.shape[1] <= 8:
        raise OutputError(f"audio must be float [samples, channels], got shape {a.shape}")
    if not np.isfinite(a).all():
        bad = int((~np.isfinite(a)).sum())
        raise OutputError(f"audio has {bad} NaN/inf samples; the take is not usable")
    return a


def write_wav(path: Path, audio: np.ndarray, sample_rate: int) -> None:
    import soundfile as sf

    with atomic_path(path) as tmp:
        sf.write(str(tmp), audio, int(sample_rate), subtype="PCM_24", format="WAV")


def _mp3_metadata(render: Render) -> dict[str, str]:
    tags = {"title": render.title or render.stem}
    if render.artist:
        tags["artist"] = render.artist
    if render.album:
        tags["album"] = render.album
    tags["comment"] = f"khala {__version__}; job {render.job_id}; seed {render.seed}"
    return tags


def write_mp3(path: Path, wav: Path, render: Render, *, demo: bool = False) -> None:
    """Encode `wav` to a 320 kb/s MP3 with tags; OutputError with ffmpeg's reason on failure."""
    import ffmpeg  # ffmpeg-python

    meta = _mp3_metadata(render)
    if demo:
        meta["comment"] += f"; {DEMO_NOTE}"
    kwargs: dict[str, Any] = {
        "format": "mp3", "acodec": "libmp3lame", "audio_bitrate": MP3_BITRATE,
        "ar": MP3_SAMPLE_RATE, "id3v2_version": 3,
    }
    for i, (k, v) in enumerate(meta.items()):
        kwargs[f"metadata:g:{i}"] = f"{k}={v}"
    exe = ffmpeg_exe()
    with atomic_path(path) as tmp:
        stream = ffmpeg.input(str(wav)).output(str(tmp), **kwargs).global_args(
            "-nostdin", "-hide_banner", "-loglevel", "error").overwrite_output()
        try:
            stream.run(cmd=exe, capture_stdout=True, capture_stderr=True)
        except ffmpeg.Error as exc:
            err = (exc.stderr or b"").decode("utf-8", "replace").strip()
            raise OutputError(f"MP3 encoding failed (ffmpeg {exe}): "
                              f"{err[-1500:] or 'exit status ' + str(exc)}") from None
        except OSError as exc:
            raise OutputError(f"MP3 encoding failed: cannot run ffmpeg {exe}: {exc}") from None
        if tmp.stat().st_size == 0:
            raise OutputError(f"MP3 encoding failed: ffmpeg {exe} wrote an empty file")


def write_codes(path: Path, codes: Any) -> None:
    c = np.asarray(codes)
    if c.ndim != 2 or c.size == 0:
        raise OutputError(f"codes must be [num_quantizers, frames], got shape {c.shape}")
    if c.min() < 0 or c.max() > np.iinfo(np.int16).max:
        raise OutputError(f"codes out of int16 range: {int(c.min())}..{int(c.max())}")
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, c.astype(np.int16), allow_pickle=False)


def write_json(path: Path, data: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def sidecar(render: Render, *, sample_rate: int, channels: int, samples: int,
            info: dict[str, Any], files: dict[str, str]) -> dict[str, Any]:
    """The JSON sidecar of one take."""
    model = dict(info.get("model") or {})
    demo = bool(model.get("demo", False))
    data: dict[str, Any] = {
        "render_key": render.key,
        "job_id": render.job_id,
        "title": render.title,
        "artist": render.artist,
        "album": render.album,
        "seed": render.seed,
        "mode": render.mode,
        "prompt_mode": render.prompt_mode,
        "tags": list(render.tags),
        "prompt": render.prompt,
        "lyrics": render.lyrics,
        "duration_min": render.duration,
        "top_k_bb": render.top_k_bb,
        "top_k_sr": render.top_k_sr,
        "temperature": render.temperature,
        "max_new_tokens": render.max_new_tokens,
        "model": {"name": model.get("name", ""), "fingerprint": model.get("fingerprint", ""),
                  "demo": demo},
        "audio": {"sample_rate": int(sample_rate), "channels": int(channels),
                  "seconds": round(samples / float(sample_rate), 3)},
        "tokens": dict(info.get("tokens") or {}),
        "timings": dict(info.get("timings") or {}),
        "device": info.get("device"),
        "khala_version": __version__,
        "created_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "files": files,
    }
    if demo:
        data["note"] = DEMO_NOTE
    return data


def write_take(render: Render, audio: Any, sample_rate: int, *, codes: Any = None,
               info: dict[str, Any] | None = None) -> dict[str, str]:
    """Write one take's files; the sidecar last. Returns {"wav", "mp3", ["codes"], "json"}.

    Raises OutputError (the render fails with that reason); files of other renders are
    never touched. An earlier sidecar of this take is removed first, so the take is never
    "done" while its audio files are being replaced.
    """
    info = info or {}
    raw = _checked_audio(audio)
    if int(sample_rate) <= 0:
        raise OutputError(f"bad sample rate {sample_rate}")
    stats = info.get("backbone") or {}
    measured = analyse(raw, int(sample_rate), q0=None if codes is None else np.asarray(codes)[0],
                       ended=stats.get("ended"), logprob_mean=stats.get("logprob_mean"))
    # The decoder has no final tanh: peaks can pass full scale. Clip rather than wrap.
    a = np.clip(raw, -1.0, 1.0)
    out_dir = Path(render.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    wav, mp3, js = render.path(".wav"), render.path(".mp3"), render.path(".json")
    js.unlink(missing_ok=True)

    written: dict[str, str] = {}
    try:
        write_wav(wav, a, sample_rate)
    except OutputError:
        raise
    except Exception as exc:  # soundfile / OS errors: name the file
        raise OutputError(f"cannot write {wav}: {exc}") from None
    written["wav"] = str(wav)
    demo = bool((info.get("model") or {}).get("demo", False))
    write_mp3(mp3, wav, render, demo=demo)
    written["mp3"] = str(mp3)
    files = {"wav": wav.name, "mp3": mp3.name}
    if render.save_codes:
        if codes is None:
            raise OutputError("--save-codes was asked for but the engine gave no codes")
        cpath = render.path(".codes.npy")
        write_codes(cpath, codes)
        written["codes"] = str(cpath)
        files["codes"] = cpath.name
    data = sidecar(render, sample_rate=sample_rate, channels=a.shape[1], samples=a.shape[0],
                   info=info, files=files)
    data["analysis"] = measured
    try:
        write_json(js, data)
    except OSError as exc:
        raise OutputError(f"cannot write {js}: {exc}") from None
    written["json"] = str(js)
    return written


def read_sidecar(path: str | Path) -> dict[str, Any] | None:
    """A sidecar's data, or None if it is missing or not valid JSON."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_done(render: Render) -> bool:
    """The sidecar exists with this render's key, and its audio files exist."""
    data = read_sidecar(render.path(".json"))
    if data is None or data.get("render_key") != render.key:
        return False
    needed = [".wav", ".mp3"] + ([".codes.npy"] if render.save_codes else [])
    return all(_nonempty(render.path(s)) for s in needed)


def _nonempty(p: Path) -> bool:
    try:
        return p.stat().st_size > 0
    except OSError:
        return False


def temp_files(root: str | Path, stems: set[str] | None = None) -> list[Path]:
    """Temporary files left under `root` (by a process that was killed mid-write).

    With `stems`, only those of these takes: shards of one array share job folders, and one
    shard must not sweep away the files another is writing.
    """
    found = sorted(Path(root).rglob(f"{TMP_PREFIX}*"))
    if stems is None:
        return found
    return [p for p in found if _tmp_stem(p.name) in stems]


def _tmp_stem(name: str) -> str:
    """'.tmp-night-wind-s1.codes.npy.ab12cd' -> 'night-wind-s1'."""
    rest = name[len(TMP_PREFIX):]
    for suffix in (".codes.npy.", ".wav.", ".mp3.", ".json."):
        i = rest.rfind(suffix)
        if i > 0:
            return rest[:i]
    return rest
