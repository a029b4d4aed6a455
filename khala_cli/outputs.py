"""One take -> WAV + MP3 (+ codes) + JSON sidecar, each written atomically.

    <out_dir>/<stem>.wav        44.1 kHz stereo, 24-bit PCM (soundfile)
    <out_dir>/<stem>.mp3        320 kb/s with title/artist/album tags (ffmpeg)
    <out_dir>/<stem>.codes.npy  int16 [num_quantizers, frames] (unless --no-save-codes)
    <out_dir>/<stem>.json       the sidecar, written LAST: a take is done when it exists,
                                carries the render key, and the files it names exist

    <output_dir>/.khala/superseded/<job_id>/<stem>/<old render key>[-N]/
                                what a new render of a take replaced: its old sidecar, WAV,
                                MP3 and codes, moved aside, never deleted

Every file goes to a temporary name in the same directory and is renamed into place, so a
crash never leaves a half-written file under a real name. No torch here.
"""

from __future__ import annotations

import errno
import hashlib
import io
import itertools
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import ffmpeg  # ffmpeg-python
import numpy as np
import soundfile as sf

from khala_cli import __version__
from khala_cli.analysis import analyse
from khala_cli.model_numbers import FRAME_RATE, NUM_QUANTIZERS, SAMPLE_RATE
from khala_cli.plan import Render

# imageio_ffmpeg is imported in ffmpeg_exe(), only when no other ffmpeg is found, under a
# guard: its absence is then an OutputError that says so, not a failed import of this module.

MP3_BITRATE = "320k"
MP3_SAMPLE_RATE = SAMPLE_RATE
TMP_PREFIX = ".tmp-"  # temporary files: .tmp-<stem>.<suffix>.<random>
DEMO_NOTE = "demo model: untrained, renders noise (not music)"
SUPERSEDED = Path(".khala") / "superseded"  # under the output directory
TAKE_SUFFIXES = (".json", ".wav", ".mp3", ".codes.npy")  # the sidecar first: moved first
_SAFE_KEY = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}")  # a render key as a folder name

# mkstemp creates files 0600; outputs get the usual permissions (0666 less the umask).
_UMASK = os.umask(0o022)
os.umask(_UMASK)


# A full disk, a full quota or a read-only file system: no take can be written until a
# person acts, so the run stops handing out work (runner) instead of retrying.
NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})
# Bytes per audio minute: 24-bit stereo 44.1 kHz WAV, and a 320 kb/s MP3.
WAV_BYTES_PER_MINUTE = SAMPLE_RATE * 2 * 3 * 60
MP3_BYTES_PER_MINUTE = 320_000 // 8 * 60


class OutputError(Exception):
    """A take could not be written; the message says why. The render is failed.
    `no_space` when the file system refused for lack of room or write access (errno in
    NO_SPACE_ERRNOS); `path` is the file being written."""

    def __init__(self, message: str, *, path: Path | None = None, no_space: bool = False):
        super().__init__(message)
        self.path = path
        self.no_space = no_space


def bytes_per_take(minutes: float, save_codes: bool = False) -> int:
    """Disk one take needs: WAV + MP3 (+ codes: 64 x 21.5 frames/s x 2 bytes)."""
    codes = NUM_QUANTIZERS * 2 * FRAME_RATE * 60 if save_codes else 0
    return int(minutes * (WAV_BYTES_PER_MINUTE + MP3_BYTES_PER_MINUTE + codes)) + 16_384


def _os_error(path: Path, exc: OSError) -> OutputError:
    """An OSError while writing `path`, with the operating system's own words."""
    text = exc.strerror or str(exc)
    return OutputError(f"cannot write {path}: {text} (errno {exc.errno})", path=path,
                       no_space=exc.errno in NO_SPACE_ERRNOS)


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
    # The temporary name must fit the 255-byte limit too (mkstemp adds 8 characters).
    stem = final.name.encode("utf-8")[: 255 - len(TMP_PREFIX) - 10].decode("utf-8", "ignore")
    fd, name = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{stem}.", dir=final.parent)
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


def write_bytes(path: Path, data: bytes) -> dict[str, Any]:
    """Write `data` to `path` atomically; its record {bytes, sha256}. OutputError (with the
    OS's words, and no_space set when the disk is full or read-only) on failure."""
    try:
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                f.write(data)
    except OSError as exc:
        raise _os_error(path, exc) from None
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def wav_bytes(audio: np.ndarray, sample_rate: int) -> bytes:
    """24-bit PCM WAV, encoded in memory (so a disk error is the OS's, not libsndfile's)."""
    buf = io.BytesIO()
    sf.write(buf, audio, int(sample_rate), subtype="PCM_24", format="WAV")
    return buf.getvalue()


def _mp3_metadata(render: Render) -> dict[str, str]:
    tags = {"title": render.title or render.stem}
    if render.artist:
        tags["artist"] = render.artist
    if render.album:
        tags["album"] = render.album
    tags["comment"] = f"khala {__version__}; job {render.job_id}; seed {render.seed}"
    return tags


def mp3_bytes(wav: bytes, render: Render, *, demo: bool = False) -> bytes:
    """A 320 kb/s MP3 with tags, encoded by ffmpeg from WAV bytes through pipes;
    OutputError with ffmpeg's reason on failure."""
    meta = _mp3_metadata(render)
    if demo:
        meta["comment"] += f"; {DEMO_NOTE}"
    kwargs: dict[str, Any] = {
        "format": "mp3", "acodec": "libmp3lame", "audio_bitrate": MP3_BITRATE,
        "ar": MP3_SAMPLE_RATE, "id3v2_version": 3, "write_xing": 0,
    }
    for i, (k, v) in enumerate(meta.items()):
        kwargs[f"metadata:g:{i}"] = f"{k}={v}"
    exe = ffmpeg_exe()
    stream = ffmpeg.input("pipe:", format="wav").output("pipe:", **kwargs).global_args(
        "-nostdin", "-hide_banner", "-loglevel", "error")
    try:
        out, _ = stream.run(cmd=exe, input=wav, capture_stdout=True, capture_stderr=True)
    except ffmpeg.Error as exc:
        err = (exc.stderr or b"").decode("utf-8", "replace").strip()
        raise OutputError(f"MP3 encoding failed (ffmpeg {exe}): "
                          f"{err[-1500:] or 'exit status ' + str(exc)}") from None
    except OSError as exc:
        raise OutputError(f"MP3 encoding failed: cannot run ffmpeg {exe}: {exc}") from None
    if not out:
        raise OutputError(f"MP3 encoding failed: ffmpeg {exe} wrote nothing")
    return out


def codes_bytes(codes: Any) -> bytes:
    c = np.asarray(codes)
    if c.ndim != 2 or c.size == 0:
        raise OutputError(f"codes must be [num_quantizers, frames], got shape {c.shape}")
    if c.min() < 0 or c.max() > np.iinfo(np.int16).max:
        raise OutputError(f"codes out of int16 range: {int(c.min())}..{int(c.max())}")
    buf = io.BytesIO()
    np.save(buf, c.astype(np.int16), allow_pickle=False)
    return buf.getvalue()


def write_json(path: Path, data: dict[str, Any]) -> None:
    write_bytes(path, (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))


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
        "track": render.track,
        "year": render.year,
        "genre": render.genre,
        "job_index": render.job_index,
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
        "batch": dict(info.get("batch") or {}),  # size, mates, songs: who shared the timings
        "device": info.get("device"),
        "khala_version": __version__,
        "created_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "files": files,
    }
    if info.get("parent"):  # a re-roll or extension: what it keeps of which take
        data["parent"] = dict(info["parent"])
    if demo:
        data["note"] = DEMO_NOTE
    return data


def write_take(render: Render, audio: Any, sample_rate: int, *, codes: Any = None,
               info: dict[str, Any] | None = None) -> dict[str, str]:
    """Write one take's files; the sidecar last. Returns {"wav", "mp3", ["codes"], "json"}.

    Every file is encoded in memory first, then written atomically, so a disk error carries
    the OS's words. Raises OutputError (the render fails with that reason; `no_space` when
    the disk is full or read-only); files of other renders are never touched. The files of
    an earlier version of this take move aside first (`move_aside`, the sidecar first), so
    the take is never "done" while its files are being replaced, and nothing is deleted.
    """
    info = info or {}
    raw = _checked_audio(audio)
    if int(sample_rate) <= 0:
        raise OutputError(f"bad sample rate {sample_rate}")
    if render.save_codes and codes is None:
        raise OutputError("--save-codes was asked for but the engine gave no codes")
    stats = info.get("backbone") or {}
    measured = analyse(raw, int(sample_rate), q0=None if codes is None else np.asarray(codes)[0],
                       ended=stats.get("ended"), logprob_mean=stats.get("logprob_mean"))
    # The decoder has no final tanh: peaks can pass full scale. Clip rather than wrap.
    a = np.clip(raw, -1.0, 1.0)
    wav = wav_bytes(a, sample_rate)
    blobs = {"wav": wav, "mp3": mp3_bytes(wav, render, demo=bool(
        (info.get("model") or {}).get("demo", False)))}
    if render.save_codes:
        blobs["codes"] = codes_bytes(codes)
    suffix = {"wav": ".wav", "mp3": ".mp3", "codes": ".codes.npy"}
    js = render.path(".json")
    try:
        Path(render.out_dir).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _os_error(js, exc) from None
    move_aside(render)
    written, records = {}, {}
    for kind, data in blobs.items():
        path = render.path(suffix[kind])
        records[kind] = write_bytes(path, data)
        written[kind] = str(path)
    files = {k: Path(v).name for k, v in written.items()}
    side = sidecar(render, sample_rate=sample_rate, channels=a.shape[1], samples=a.shape[0],
                   info=info, files=files)
    side["file_records"] = records
    side["analysis"] = measured
    write_json(js, side)
    written["json"] = str(js)
    return written


def _aside_dir(render: Render, old: dict[str, Any] | None) -> Path:
    """A new folder for one replaced version: per stem and old render key, numbered when
    that key was replaced before (--force), made with mkdir so that two never share one."""
    key = (old or {}).get("render_key")
    name = key if isinstance(key, str) and _SAFE_KEY.fullmatch(key) else \
        "no-sidecar" if old is None else "no-key"
    parent = Path(render.out_dir).parent / SUPERSEDED / render.job_id / render.stem
    parent.mkdir(parents=True, exist_ok=True)
    for n in itertools.count(1):
        path = parent / (name if n == 1 else f"{name}-{n}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise AssertionError("unreachable")


def move_aside(render: Render) -> Path | None:
    """Move the files of this take's earlier version (sidecar, WAV, MP3, codes; the sidecar
    first) into a new folder under <output_dir>/.khala/superseded/; that folder, or None when
    there was nothing. OutputError when the move fails (nothing is deleted either way)."""
    present = [render.path(s) for s in TAKE_SUFFIXES if os.path.lexists(render.path(s))]
    if not present:
        return None
    try:
        dest = _aside_dir(render, read_sidecar(render.path(".json")))
        for path in present:
            os.replace(path, dest / path.name)
    except OSError as exc:
        raise _os_error(Path(exc.filename or render.path(".json")), exc) from None
    return dest


def superseded_usage(output_dir: str | Path) -> tuple[int, int]:
    """(versions moved aside under .khala/superseded/, the bytes their files take)."""
    root = Path(output_dir) / SUPERSEDED
    versions, size = 0, 0
    for stem in (p for job in _subdirs(root) for p in _subdirs(job)):
        for version in _subdirs(stem):
            versions += 1
            size += sum(max(0, _size(f)) for f in version.iterdir() if f.is_file())
    return versions, size


def _subdirs(path: Path) -> list[Path]:
    try:
        return [p for p in path.iterdir() if p.is_dir()]
    except OSError:
        return []


def read_sidecar(path: str | Path) -> dict[str, Any] | None:
    """A sidecar's data, or None if it is missing or not valid JSON."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_done(render: Render) -> bool:
    """The sidecar exists with this render's key, and its files exist with the sizes it
    records (a cheap check: `khala verify` compares hashes). Sidecars from before the
    records: the files exist and are not empty. Codes count where the sidecar names them:
    whether this run saves codes never makes a take undone."""
    data = read_sidecar(render.path(".json"))
    if data is None or data.get("render_key") != render.key:
        return False
    needed = {"wav": ".wav", "mp3": ".mp3"} | (
        {"codes": ".codes.npy"} if "codes" in (data.get("files") or {}) else {})
    records = data.get("file_records") or {}
    return all(_size(render.path(s)) == (records.get(k) or {}).get("bytes", _size(render.path(s)))
               and _size(render.path(s)) > 0 for k, s in needed.items())


def _size(p: Path) -> int:
    try:
        return p.stat().st_size
    except OSError:
        return -1


def temp_files(root: str | Path, stems: set[str] | None = None) -> list[Path]:
    """Temporary files left under `root` (by a process that was killed mid-write).

    With `stems`, only those of these takes (a take's stem, or the name of the file being
    written, as for the files of .khala/work): shards of one array share job folders, and
    one shard must not sweep away the files another is writing.
    """
    found = sorted(Path(root).rglob(f"{TMP_PREFIX}*"))
    if stems is None:
        return found
    return [p for p in found if _tmp_stem(p.name) in stems or _tmp_target(p.name) in stems]


def _tmp_target(name: str) -> str:
    """'.tmp-abc.q01.npy.4242' -> 'abc.q01.npy': the name of the file being written."""
    return name[len(TMP_PREFIX):].rsplit(".", 1)[0]


def _tmp_stem(name: str) -> str:
    """'.tmp-night-wind-s1.codes.npy.ab12cd' -> 'night-wind-s1'."""
    rest = name[len(TMP_PREFIX):]
    for suffix in (".codes.npy.", ".wav.", ".mp3.", ".json."):
        i = rest.rfind(suffix)
        if i > 0:
            return rest[:i]
    return rest
