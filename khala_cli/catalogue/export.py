"""`khala export`: the keepers as a catalogue a distributor, a DAW or a library takes as is.

    DEST/<artist>/<album>/<NN> <title>[ (take K)].<mp3|flac|wav>
    DEST/catalogue.csv, DEST/catalogue.json     one row per exported file

Loudness: the take's gain is set so that its integrated loudness (BS.1770-4, pyloudnorm)
meets the target; where that would put its true peak above the ceiling, ffmpeg's `alimiter`
runs at 4x the sample rate (so it limits the true peak, not the sample peak). The encoded file
is decoded and measured again; if it misses the target by more than TOLERANCE_LU or passes the
ceiling, the gain and the limit are corrected and it is encoded again. Tags are written with
mutagen. Every file is written atomically; a file at a destination khala did not write is
never overwritten without --force; files khala wrote for keepers since dropped are removed
(only while unchanged).

One DEST holds the exports of any number of output directories: each catalogue row records
the output directory it came from (`output_dir`), and an export removes or overwrites only
the files of its own. Every path read back from catalogue.json must stay inside DEST, and no
file is written through a symbolic link inside DEST. No torch here.
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
from mutagen import id3
from mutagen.flac import FLAC
from mutagen.wave import WAVE

from khala_cli import __version__
from khala_cli.analysis import loudness_lufs, true_peak_db
from khala_cli.catalogue.names import safe_component
from khala_cli.outputs import OutputError, atomic_path, ffmpeg_exe, write_bytes
from khala_cli.review.keep import read_marks
from khala_cli.review.takes import load_json, read_takes

FORMATS = ("mp3", "flac", "wav")
CATALOGUE = "catalogue.json"
TOLERANCE_LU = 0.4  # aim inside the promised 0.5 LU
MAX_PASSES = 5
CSV_COLUMNS = ("file", "format", "job_id", "seed", "title", "artist", "album", "track",
               "year", "genre", "output_dir", "source", "render_key", "lufs_before", "lufs_after",
               "true_peak_after_db", "gain_db", "limited", "bytes", "sha256")


class ExportError(Exception):
    """Bad input or a destination in the way: exit 2; `no_space`: the disk is full (74)."""

    def __init__(self, message: str, *, no_space: bool = False):
        super().__init__(message)
        self.no_space = no_space


@dataclass
class ExportOptions:
    formats: tuple[str, ...] = ("mp3",)
    loudness: float | None = -14.0  # LUFS; None keeps the audio as rendered
    true_peak: float = -1.0  # dBTP ceiling
    force: bool = False


@dataclass
class Item:
    """One file to export: a kept take in one format, its tags and where it goes."""

    take: dict[str, Any]
    sidecar: Path
    fmt: str
    rel: Path  # under DEST
    tags: dict[str, str]
    signature: str = ""


@dataclass
class Result:
    written: list[dict[str, Any]] = field(default_factory=list)
    unchanged: list[dict[str, Any]] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)


# ---- what to export --------------------------------------------------------------------

def _track_numbers(takes: list[dict[str, Any]]) -> dict[str, tuple[int, int]]:
    """job -> (track, total of its album), from every take on disk (so that keeping or
    dropping one take never renumbers another). Without `track`: manifest order
    (job_index); the total is the album's last track or its number of jobs, the larger."""
    jobs = {}
    for d in takes:
        jobs.setdefault(d["job_id"], d)
    order = sorted(jobs.values(), key=lambda d: (d.get("job_index", 10**6), d["job_id"]))
    tracks = {d["job_id"]: int(d.get("track") or (d.get("job_index", i) + 1))
              for i, d in enumerate(order)}
    out = {}
    for job, d in jobs.items():
        album = (d.get("artist") or "", d.get("album") or "")
        same = [j for j, x in jobs.items() if (x.get("artist") or "", x.get("album") or "") == album]
        out[job] = (tracks[job], max(len(same), max(tracks[j] for j in same)))
    return out


def _tags(d: dict[str, Any], title: str, track: int, total: int) -> dict[str, str]:
    tags = {"title": title, "artist": d.get("artist") or "", "album": d.get("album") or "",
            "tracknumber": str(track), "tracktotal": str(total),
            "date": str(d.get("year") or ""), "genre": d.get("genre") or "",
            "lyrics": d.get("lyrics") or "", "khala_job": d["job_id"],
            "khala_seed": str(d["seed"]), "khala_render_key": d.get("render_key", ""),
            "khala_model_fingerprint": (d.get("model") or {}).get("fingerprint", ""),
            "khala_version": __version__}
    if (d.get("model") or {}).get("demo"):
        tags["comment"] = "demo model: untrained, this is noise (not music)"
    return {k: v for k, v in tags.items() if v}


def plan(output_dir: Path, opts: ExportOptions) -> list[Item]:
    """Every file to export, in catalogue order. ExportError if there is nothing to export
    or a keeper has no readable take."""
    marks = read_marks(output_dir)
    if not marks:
        raise ExportError(f"no keepers in {output_dir}: mark takes with `khala keep "
                          f"{output_dir} JOB:SEED` (or --top N) first")
    found = {(str(t.data["job_id"]), int(t.data["seed"])): t for t in read_takes(output_dir)
             if t.data is not None}
    missing = [f"{j}:{s}" for j, s in marks if (j, s) not in found]
    if missing:
        raise ExportError(f"keepers without a rendered take in {output_dir}: "
                          f"{', '.join(missing)} (drop them with `khala keep --drop`)")
    kept = [dict(found[m].data, _sidecar=found[m].path) for m in marks]
    score = lambda d: -float((d.get("analysis") or {}).get("score") or -1e9)  # noqa: E731
    kept.sort(key=lambda d: (d["job_id"], score(d), d["seed"]))
    numbers = _track_numbers([t.data for t in found.values()])
    items, take_no, used = [], {}, set()
    for d in sorted(kept, key=lambda d: (numbers[d["job_id"]][0], d["job_id"], score(d))):
        track, total = numbers[d["job_id"]]
        take_no[d["job_id"]] = n = take_no.get(d["job_id"], 0) + 1
        title = d.get("title") or d["job_id"]
        folder = Path(safe_component(d.get("artist") or "", fallback="Unknown Artist")) / \
            safe_component(d.get("album") or "", fallback="Unknown Album")
        extra, names = _unique_names(folder, f"{track:02d} {title}",
                                     _tellers(n, d["job_id"]), opts.formats, used)
        for fmt, name in names.items():
            used.add((folder / name).as_posix().lower())
            items.append(Item(d, d["_sidecar"], fmt, folder / name,
                              _tags(d, title + extra, track, total)))
    for it in items:
        it.signature = _signature(it, opts)
    return items


def _tellers(take: int, job_id: str) -> Iterator[str]:
    """What tells a take's name apart, in the order tried: " (take N)" for a job's later
    takes, then the job id, then a count. Endless and all different, so a search ends."""
    base = f" (take {take})" if take > 1 else ""
    yield base
    yield f"{base} ({job_id})"
    for k in itertools.count(2):
        yield f"{base} ({job_id} {k})"


def _unique_names(folder: Path, text: str, tellers: Iterator[str], formats: tuple[str, ...],
                  used: set[str]) -> tuple[str, dict[str, str]]:
    """(the teller used, {format: file name}): the first teller whose names (one per format,
    compared without case) are all unused. The teller is part of each name's suffix, so a long
    title is cut before it, never the teller itself (safe_component keeps a suffix whole)."""
    for extra in tellers:
        names = {fmt: safe_component(text, suffix=f"{extra}.{fmt}") for fmt in formats}
        if not any((folder / n).as_posix().lower() in used for n in names.values()):
            return extra, names
    raise AssertionError("unreachable: the tellers never end")


def _source_sha(it: Item) -> str:
    rec = ((it.take.get("file_records") or {}).get("wav") or {}).get("sha256")
    if rec:
        return rec
    wav = it.sidecar.parent / (it.take.get("files") or {}).get("wav", "")
    return hashlib.sha256(wav.read_bytes()).hexdigest()


def _signature(it: Item, opts: ExportOptions) -> str:
    """What the file depends on: same signature, same file."""
    data = {"source": _source_sha(it), "fmt": it.fmt, "loudness": opts.loudness,
            "true_peak": opts.true_peak, "tags": it.tags, "v": 1}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:32]


# ---- audio -----------------------------------------------------------------------------

def _float_wav(audio: np.ndarray, sr: int) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, audio, sr, subtype="FLOAT", format="WAV")
    return buf.getvalue()


_CODECS = {"mp3": ["-c:a", "libmp3lame", "-b:a", "320k", "-f", "mp3"],
           "flac": ["-c:a", "flac", "-sample_fmt", "s32", "-f", "flac"],
           "wav": ["-c:a", "pcm_s24le", "-f", "wav"]}


def encode(audio: np.ndarray, sr: int, fmt: str, limit_db: float | None) -> bytes:
    """Encode with ffmpeg; limit_db: a true-peak limit (alimiter at 4x the rate). The output
    goes to a scratch file, not a pipe: FLAC and WAV headers are finished by seeking back."""
    cmd = [ffmpeg_exe(), "-nostdin", "-hide_banner", "-loglevel", "error", "-y",
           "-f", "wav", "-i", "pipe:0"]
    if limit_db is not None:
        lin = min(1.0, max(0.0625, 10 ** (limit_db / 20)))
        cmd += ["-af", f"aresample={4 * sr},alimiter=limit={lin:.6f}:attack=2:release=80"
                       f":level=0,aresample={sr}"]
    with tempfile.TemporaryDirectory(prefix="khala-export-") as tmp:
        out = Path(tmp) / f"take.{fmt}"
        cmd += ["-ar", str(sr), "-map_metadata", "-1", *_CODECS[fmt], str(out)]
        proc = subprocess.run(cmd, input=_float_wav(audio, sr), capture_output=True)
        data = out.read_bytes() if out.exists() else b""
    if proc.returncode != 0 or not data:
        err = proc.stderr.decode("utf-8", "replace").strip()[-800:]
        raise ExportError(f"ffmpeg could not encode {fmt}: {err or proc.returncode}")
    return data


def _measure(data: bytes) -> tuple[float | None, float | None]:
    audio, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    return loudness_lufs(audio, sr), true_peak_db(audio)


def loudness_matched(audio: np.ndarray, sr: int, fmt: str, opts: ExportOptions
                     ) -> tuple[bytes, dict[str, Any]]:
    """Encoded bytes at the target loudness under the ceiling, and what was done."""
    before = loudness_lufs(audio, sr)
    if opts.loudness is None or before is None:
        data = encode(np.clip(audio, -1.0, 1.0), sr, fmt, None)
        after, tp = _measure(data)
        return data, {"lufs_before": before, "lufs_after": after, "true_peak_after_db": tp,
                      "gain_db": 0.0, "limited": False}
    gain = opts.loudness - before
    margin = 0.3 if fmt == "mp3" else 0.05
    for _ in range(MAX_PASSES):
        scaled = audio * np.float32(10 ** (gain / 20))
        tp_in = true_peak_db(scaled)
        limit = opts.true_peak - margin if tp_in is not None and \
            tp_in > opts.true_peak - margin else None
        data = encode(scaled, sr, fmt, limit)
        after, tp = _measure(data)
        if after is None or tp is None:
            break
        if tp <= opts.true_peak and abs(after - opts.loudness) <= TOLERANCE_LU:
            return data, {"lufs_before": round(before, 2), "lufs_after": round(after, 2),
                          "true_peak_after_db": round(tp, 2), "gain_db": round(gain, 2),
                          "limited": limit is not None}
        if tp > opts.true_peak:
            margin += tp - opts.true_peak + 0.1
        gain += opts.loudness - after
    raise ExportError(f"cannot reach {opts.loudness} LUFS under {opts.true_peak} dBTP for "
                      f"this take in {fmt} (measured {after} LUFS, {tp} dBTP)")


# ---- tags ------------------------------------------------------------------------------

def _id3(tags: dict[str, str]):
    t = id3.ID3()
    frames = {"title": id3.TIT2, "artist": id3.TPE1, "album": id3.TALB, "date": id3.TDRC,
              "genre": id3.TCON}
    for k, frame in frames.items():
        if k in tags:
            t.add(frame(encoding=3, text=tags[k]))
    t.add(id3.TRCK(encoding=3, text=f"{tags['tracknumber']}/{tags['tracktotal']}"))
    if "lyrics" in tags:
        t.add(id3.USLT(encoding=3, lang="eng", desc="", text=tags["lyrics"]))
    if "comment" in tags:
        t.add(id3.COMM(encoding=3, lang="eng", desc="", text=tags["comment"]))
    for k, v in tags.items():
        if k.startswith("khala_"):
            t.add(id3.TXXX(encoding=3, desc=k, text=v))
    return t


def tagged(data: bytes, fmt: str, tags: dict[str, str]) -> bytes:
    """The encoded file with its tags (ID3v2.4 for MP3 and WAV, Vorbis comments for FLAC)."""
    buf = io.BytesIO(data)
    if fmt == "flac":
        f = FLAC(buf)
        for k, v in tags.items():
            f[k.upper()] = v
        buf.seek(0)
        f.save(buf)
    elif fmt == "mp3":
        _id3(tags).save(buf)
    else:
        f = WAVE(buf)
        f.add_tags()
        f.tags.update(_id3(tags))
        buf.seek(0)
        f.save(buf)
    return buf.getvalue()


# ---- the export ------------------------------------------------------------------------

def _inside(dest: Path, rel: Any, where: str) -> str:
    """A file path read from catalogue.json, if it stays inside DEST; ExportError otherwise."""
    if not isinstance(rel, str) or not rel or Path(rel).is_absolute():
        raise ExportError(f"{where} names {rel!r}, which is not a path inside {dest}; nothing "
                          "was exported (fix or remove that row)")
    root = dest.resolve()
    target = (root / rel).resolve()
    if target != root and root in target.parents:
        return rel
    raise ExportError(f"{where} names {rel!r}, which resolves outside {dest} ({target}); "
                      "nothing was exported (fix or remove that row)")


def _previous(dest: Path) -> dict[str, dict[str, Any]]:
    """The rows of DEST's catalogue.json, by file; every file checked to stay inside DEST."""
    data = load_json(dest / CATALOGUE) or {}
    rows = {}
    for n, r in enumerate(data.get("files") or [], 1):
        if isinstance(r, dict) and "file" in r:
            who = f"{r.get('job_id')}:{r.get('seed')}"
            rows[_inside(dest, r["file"], f"{dest / CATALOGUE}: row {n} ({who})")] = r
    return rows


def _link_on_the_way(dest: Path, rel: str | Path) -> Path | None:
    """The first symbolic link inside DEST on the way to DEST/rel (DEST itself may be one)."""
    path = dest
    for part in Path(rel).parts:
        path = path / part
        if path.is_symlink():
            return path
    return None


def _no_links(dest: Path, rels: list[str | Path]) -> None:
    for rel in rels:
        link = _link_on_the_way(dest, rel)
        if link is not None:
            raise ExportError(f"{link} is a symbolic link inside {dest}: an export never "
                              f"writes through one (on the way to {rel}); nothing was "
                              "exported")


def _sha_file(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def _owner(rec: dict[str, Any]) -> str | None:
    """The output directory whose export wrote a row's file (None: a catalogue from before
    khala recorded it)."""
    return rec.get("output_dir")


def _in_the_way(dest: Path, items: list[Item], prev: dict[str, dict], source: str) -> list[str]:
    """Existing destination files that this source's exports did not write (or that changed
    since), each with whose they are when khala knows."""
    bad = []
    for it in items:
        path = dest / it.rel
        if not path.exists():
            continue
        rec = prev.get(it.rel.as_posix())
        if rec is None or _sha_file(path) != rec.get("sha256"):
            bad.append(str(path))
        elif _owner(rec) != source:
            whose = _owner(rec) or "an output directory that the catalogue does not name"
            bad.append(f"{path} (exported from {whose})")
    return bad


def _unchanged(it: Item, rec: dict[str, Any] | None, dest: Path, source: str) -> bool:
    """This source exported this very file before, and it is still as written. A row without
    an owner is taken over only when the file is exactly what this export would write."""
    return bool(rec) and _owner(rec) in (source, None) and \
        rec.get("signature") == it.signature and _sha_file(dest / it.rel) == rec.get("sha256")


def _row(it: Item, output_dir: Path, done: dict[str, Any], data: bytes) -> dict[str, Any]:
    d = it.take
    return {"file": it.rel.as_posix(), "format": it.fmt, "job_id": d["job_id"],
            "seed": d["seed"], "title": it.tags.get("title"), "artist": d.get("artist") or "",
            "album": d.get("album") or "", "track": int(it.tags["tracknumber"]),
            "year": d.get("year"), "genre": d.get("genre") or "",
            "output_dir": str(output_dir.resolve()),
            "source": it.sidecar.relative_to(output_dir).as_posix(),
            "render_key": d.get("render_key"), **done, "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(), "signature": it.signature}


def export_one(it: Item, output_dir: Path, dest: Path, opts: ExportOptions) -> dict[str, Any]:
    wav = it.sidecar.parent / (it.take.get("files") or {}).get("wav", "")
    audio, sr = sf.read(str(wav), dtype="float32", always_2d=True)
    data, done = loudness_matched(audio, sr, it.fmt, opts)
    data = tagged(data, it.fmt, it.tags)
    _no_links(dest, [it.rel])  # again: a link made while the export ran
    path = dest / it.rel
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes(path, data)
    return _row(it, output_dir, done, data)


def _write_catalogue(dest: Path, rows: list[dict[str, Any]]) -> None:
    rows = sorted(rows, key=lambda r: r["file"])
    write_bytes(dest / CATALOGUE, (json.dumps({"khala_version": __version__, "files": rows},
                                              indent=2, ensure_ascii=False) + "\n").encode())
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(CSV_COLUMNS), extrasaction="ignore",
                       lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: "" if r.get(k) is None else r.get(k) for k in CSV_COLUMNS})
    with atomic_path(dest / "catalogue.csv") as tmp:
        tmp.write_text(buf.getvalue(), encoding="utf-8")


def export(output_dir: Path, dest: Path, opts: ExportOptions,
           progress: Callable[[str, int, int], None] | None = None) -> Result:
    """Export the keepers of output_dir into dest; only what changed is written. DEST may
    hold the exports of other output directories: their files are never touched."""
    source = str(output_dir.resolve())
    items = plan(output_dir, opts)
    prev = _previous(dest)
    wanted = {it.rel.as_posix() for it in items}
    todo = [it for it in items if not _unchanged(it, prev.get(it.rel.as_posix()), dest, source)]
    gone = [rel for rel, rec in prev.items() if _owner(rec) == source and rel not in wanted]
    _no_links(dest, [it.rel for it in todo] + gone + [CATALOGUE, "catalogue.csv"])
    if not opts.force:
        bad = _in_the_way(dest, todo, prev, source)
        if bad:
            raise ExportError("files that this export did not write (or that changed since) "
                              "are in the way; nothing was exported (use --force to overwrite "
                              "them):\n  " + "\n  ".join(bad))
    res = Result(unchanged=[dict(prev[it.rel.as_posix()], output_dir=source)
                            for it in items if it not in todo])
    try:
        for n, it in enumerate(todo):
            if progress:
                progress(it.rel.as_posix(), n, len(todo))
            res.written.append(export_one(it, output_dir, dest, opts))
    except OutputError as exc:
        raise ExportError(str(exc), no_space=exc.no_space) from None
    finally:
        for rel in gone:  # this source's files of takes no longer kept, while unchanged
            if _sha_file(dest / rel) == prev[rel].get("sha256"):
                (dest / rel).unlink()
                res.removed.append(rel)
        # Every file khala wrote that is still as written keeps its row: other sources', and
        # this one's that the export did not reach (it stopped).
        rows = {rel: r for rel, r in prev.items() if _sha_file(dest / rel) == r.get("sha256")}
        rows.update({r["file"]: r for r in res.unchanged + res.written})
        if rows or prev:
            try:
                _write_catalogue(dest, list(rows.values()))
            except OutputError:
                pass  # the error that stopped the export is the one to report
    return res
