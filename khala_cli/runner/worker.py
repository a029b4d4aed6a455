"""The worker: one process per device, started by the pool as

    python -m khala_cli.runner.worker --model-dir D --output-dir O --device cpu|cuda ...

It loads the pipeline once, then asks the parent for work and renders each wave through the
engine's own entry point, `Pipeline.render` (every stage over the whole wave before the next,
so that in one_shot residency the models swap once per wave), then writes every take with
`outputs.write_take`. The sidecar's timings are the engine's; loading is `load_s`, apart.

Nothing rendered is thrown away:
- the backbone rows of each render are kept in `<output_dir>/.khala/work/<key>.q01.npy`
  (+ `.q01.json`: how it ended, its log-probability) until the take is written, so a rerun
  after a crash resumes after the backbone;
- a take whose write fails is kept whole in `.khala/work/<stem>.<key>.take.npz`; the next
  attempt (or the next run, once space is freed) writes it without rendering it again. A
  full disk, a full quota or a read-only file system is reported as `no_space`: the parent
  then stops handing out work.

stdout carries protocol lines only (see protocol.py); everything else goes to stderr, which
the parent points at this worker's log file. The worker dies with its parent: the kernel
kills it when the parent dies (PR_SET_PDEATHSIG), and it exits when its stdin closes.
Test-only failpoints come only from `--test-faults` (see faults.py).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import io
import json
import os
import queue
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

from khala_cli import model_numbers as mn
from khala_cli import outputs, splice
from khala_cli.engine.config import DECODE_PATHS, decode_options
from khala_cli.plan import Render
from khala_cli.prompt import PromptSpec, prompt_ids
from khala_cli.runner import protocol
from khala_cli.runner.faults import Faults

# torch and the engine are imported inside the functions that need them (Worker.load first),
# after main() has set up the protocol channel: a torch or engine that fails to import is then
# reported to the parent (fatal, or oom), and nothing printed while importing them reaches the
# protocol stream.

# ---------------------------------------------------------------------------------------
# Process plumbing


class Channel:
    """Protocol lines on the original stdout; fd 1 itself is pointed at stderr so that stray
    prints (ours or a library's) land in the log instead of corrupting the protocol."""

    def __init__(self) -> None:
        self._out = os.fdopen(os.dup(1), "wb", buffering=0)
        os.dup2(2, 1)
        sys.stdout = sys.stderr
        self._lock = threading.Lock()
        self.inbox: queue.Queue[dict] = queue.Queue()
        self.stopping = False
        threading.Thread(target=self._read, name="stdin", daemon=True).start()

    def send(self, msg: dict[str, Any]) -> None:
        data = protocol.encode(msg)
        with self._lock:
            try:
                self._out.write(data)
            except (BrokenPipeError, OSError):
                os._exit(4)  # the parent is gone

    def _read(self) -> None:
        for line in sys.stdin.buffer:
            try:
                msg = protocol.decode(line, protocol.TO_WORKER)
            except protocol.ProtocolError as exc:
                print(f"worker: ignoring a bad line from the parent: {exc}", file=sys.stderr)
                continue
            if msg["type"] == "stop":
                self.stopping = True
            self.inbox.put(msg)
        # stdin closed. After a stop that is the normal end; otherwise the parent is gone or
        # gave up on us: stop at once, whatever we are doing.
        if not self.stopping:
            print("worker: the parent closed the pipe; exiting", file=sys.stderr, flush=True)
            os._exit(5)
        self.inbox.put({"type": "stop"})


def die_with_parent(parent_pid: int | None) -> None:
    """Ask the kernel to SIGKILL us when the parent dies (Linux), then check it is alive."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    if parent_pid and os.getppid() != parent_pid:
        os._exit(5)  # the parent died before the line above took effect


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    with contextlib.suppress(Exception):
        import torch

        if isinstance(exc, torch.cuda.OutOfMemoryError):
            return True
    text = str(exc).lower()
    return "out of memory" in text and isinstance(exc, RuntimeError)


class OutOfMemory(Exception):
    def __init__(self, ids: list[int], error: str):
        super().__init__(error)
        self.ids = ids


# ---------------------------------------------------------------------------------------
# Saved backbone tokens


def work_path(output_dir: Path, key: str) -> Path:
    return output_dir / ".khala" / "work" / f"{key}.q01.npy"


def q01_stats_path(path: Path) -> Path:
    return path.with_name(path.name.removesuffix(".npy") + ".json")


def save_q01(path: Path, row) -> None:
    """Keep a BackboneRow: its codes (.q01.npy) and how it ended (.q01.json, written first;
    the .npy is what counts as saved). OutputError (no_space set for a full or read-only
    .khala/work) when it cannot be written; nothing half-written is left."""
    stats = q01_stats_path(path)
    tmp = path.with_name(f".tmp-{path.name}.{os.getpid()}")  # outputs.temp_files finds it
    tmp_stats = stats.with_name(f".tmp-{stats.name}.{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp_stats.write_text(json.dumps({"ended": row.ended, "logprob_mean": row.logprob_mean}))
        os.replace(tmp_stats, stats)
        with open(tmp, "wb") as f:
            np.save(f, np.ascontiguousarray(row.codes, dtype=np.int64))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        for p in (tmp, tmp_stats):
            with contextlib.suppress(OSError):
                p.unlink()
        raise outputs._os_error(path, exc) from exc


def load_q01(path: Path, codebook_size: int):
    """(codes, ended, logprob_mean) of saved backbone tokens, or None when absent or
    unusable (an unusable file is removed). Tokens saved before their stats: unknown."""
    if not path.exists():
        return None
    try:
        q = np.load(path, allow_pickle=False)
        ok = (q.ndim == 2 and q.shape[0] == 2 and q.shape[1] > 0
              and np.issubdtype(q.dtype, np.integer)
              and int(q.min()) >= 0 and int(q.max()) < codebook_size)
    except Exception as exc:  # noqa: BLE001 - any damage means "start over"
        ok = False
        print(f"worker: cannot read {path}: {exc}", file=sys.stderr)
    if not ok:
        print(f"worker: ignoring unusable saved tokens {path}", file=sys.stderr)
        with contextlib.suppress(OSError):
            path.unlink()
        return None
    try:
        stats = json.loads(q01_stats_path(path).read_text())
    except (OSError, ValueError):
        stats = {}
    return q.astype(np.int64), stats.get("ended"), stats.get("logprob_mean")


# ---------------------------------------------------------------------------------------
# Takes kept after a failed write


def kept_path(output_dir: Path, render) -> Path:
    return output_dir / ".khala" / "work" / f"{render.stem}.{render.key[:16]}.take.npz"


def keep_take(path: Path, take, info: dict) -> bool:
    """Keep a rendered take whose write failed; False if even that cannot be written."""
    buf = io.BytesIO()
    np.savez(buf, audio=np.asarray(take.audio, dtype=np.float32),
             codes=np.asarray(take.codes, dtype=np.int16),
             info=np.frombuffer(json.dumps(info).encode(), dtype=np.uint8))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        outputs.write_bytes(path, buf.getvalue())
        return True
    except (OSError, outputs.OutputError) as exc:
        print(f"worker: cannot keep the take in {path}: {exc}", file=sys.stderr, flush=True)
        return False


def load_kept(path: Path):
    """(audio, codes, info) of a kept take, or None (an unusable file is removed)."""
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            return (z["audio"], z["codes"].astype(np.int64),
                    json.loads(z["info"].tobytes().decode()))
    except Exception as exc:  # noqa: BLE001 - any damage means "render again"
        print(f"worker: ignoring unusable kept take {path}: {exc}", file=sys.stderr)
        with contextlib.suppress(OSError):
            path.unlink()
        return None


# ---------------------------------------------------------------------------------------
# Rendering


class Batch:
    def __init__(self, entries: list[dict]):
        self.renders = [Render.from_dict(e["render"]) for e in entries]
        self.ids = {r.key: e["id"] for r, e in zip(self.renders, entries, strict=True)}
        self.first = self.renders[0]
        self.started = time.monotonic()
        self.resumed: set[str] = set()

    @property
    def job_ids(self) -> set[str]:
        return {r.job_id for r in self.renders}

    def songs(self) -> list[Song]:
        """The batch's renders by song (renders that differ only by seed), in order: one
        engine request each."""
        by: dict[tuple, list] = {}
        for r in self.renders:
            by.setdefault(r.batch_group, []).append(r)
        return [Song(self, rs) for rs in by.values()]


class Song:
    """The renders of one song in a batch: one engine Request."""

    def __init__(self, batch: Batch, renders: list):
        self.batch, self.renders = batch, renders
        self.first = renders[0]
        self.prompt_tokens = 0


class Worker:
    def __init__(self, args: argparse.Namespace, chan: Channel):
        self.args = args
        self.chan = chan
        self.output_dir = Path(args.output_dir)
        marker = args.test_fault_dir or self.output_dir / ".khala" / "test-faults"
        self.faults = Faults(args.test_faults or "", Path(marker))
        self.pipeline = None
        self.wave = None

    # -- set-up ----------------------------------------------------------------------------

    def load(self) -> None:
        import torch

        from khala_cli.engine.pipeline import Pipeline

        if self.args.threads:
            torch.set_num_threads(self.args.threads)
        device = "cuda" if self.args.device == "cuda" else "cpu"
        self.pipeline = Pipeline.from_dir(self.args.model_dir, device=device,
                                          residency=self.args.residency,
                                          backbone_options=decode_options(self.args.decode_path))
        if self.args.residency == "keep_loaded":
            self.pipeline.load()  # now, so that "ready" means ready (and an OOM shows here)
        label = self.args.label
        if device == "cuda":
            with contextlib.suppress(Exception):
                label = f"{label} ({torch.cuda.get_device_name(0)})"
        self.device_label = label

    # -- reporting -------------------------------------------------------------------------

    def _result(self, batch: Batch, render, status: str, error: str | None = None,
                files: dict | None = None, **extra: Any) -> None:
        print(f"worker: {render.stem}: {status}" + (f": {error}" if error else ""),
              file=sys.stderr, flush=True)
        self.chan.send({"type": "result", "wave": self.wave, "id": batch.ids[render.key],
                        "status": status, "error": error, "files": files or {},
                        "seconds": round(time.monotonic() - batch.started, 3),
                        "resumed": render.key in batch.resumed, **extra})

    def _fail(self, song: Song, exc: BaseException) -> None:
        batch = song.batch
        if is_oom(exc):  # the whole batch: the parent halves it
            traceback.print_exception(exc, file=sys.stderr)
            raise OutOfMemory(list(batch.ids.values()), f"{type(exc).__name__}: {exc}") from exc
        traceback.print_exception(exc, file=sys.stderr)
        if isinstance(exc, outputs.OutputError) and exc.no_space:
            # .khala/work is full or read-only (saving the backbone tokens): like a full
            # output disk, the parent stops handing out work.
            for r in song.renders:
                self._result(batch, r, "failed", error=str(exc), kept=False, no_space=True,
                             path=str(exc.path or self.output_dir))
            return
        for r in song.renders:  # the engine fails a song for its own sake only
            self._result(batch, r, "failed", error=f"{type(exc).__name__}: {exc}")

    def _progress(self, songs: list[Song]):
        """Progress of the songs an engine call works on ("requests" or "request" in the
        extras; all of them while decoding or loading), naming every take."""
        state = {"phase": None, "t": 0.0}

        def cb(phase: str, done: int, total: int, extra: dict | None = None) -> None:
            extra = extra or {}
            at = extra.get("requests", [extra["request"]] if "request" in extra else None)
            group = songs if at is None else [songs[i] for i in at]
            renders = [r for song in group for r in song.renders]
            now = time.monotonic()
            if phase != state["phase"] or done >= total or now - state["t"] >= 0.25:
                state["phase"], state["t"] = phase, now
                tps = extra.get("tokens_per_s")
                self.chan.send({"type": "progress", "wave": self.wave,
                                "job_id": renders[0].job_id, "seeds": [r.seed for r in renders],
                                "jobs": [r.job_id for r in renders],
                                "phase": phase, "done": int(done), "total": int(total),
                                "tokens_per_s": float(tps) if tps is not None else None})
            self.faults.fire("progress", {r.job_id for r in renders}, len(renders))
        return cb

    # -- the wave --------------------------------------------------------------------------

    def _request(self, song: Song):
        from khala_cli.engine.backbone import BackboneRow
        from khala_cli.engine.pipeline import Request

        r, batch = song.first, song.batch
        spec = PromptSpec(mode=r.mode, prompt_mode=r.prompt_mode, tags=tuple(r.tags),
                          prompt=r.prompt, lyrics=r.lyrics, duration=r.duration)
        bb_ids, sr_ids = prompt_ids(self.pipeline.tokenizer, spec)
        song.prompt_tokens = len(bb_ids)
        resume = {}
        for render in song.renders:
            saved = load_q01(work_path(self.output_dir, render.key),
                             int(self.pipeline.info.codebook_size))
            if saved is not None:
                resume[render.seed] = BackboneRow(*saved)
                batch.resumed.add(render.key)
                print(f"worker: {render.stem}: resuming from saved backbone tokens",
                      file=sys.stderr, flush=True)
        return Request(backbone_ids=bb_ids, superres_ids=sr_ids,
                       seeds=[x.seed for x in song.renders], resume=resume,
                       **mn.controls_of(r), **self._continued(r))

    def _request_or_fail(self, song: Song):
        """The song's Request; None when it cannot be made (a re-roll whose parent changed
        or is unreadable), after failing the song's renders for that reason alone."""
        try:
            return self._request(song)
        except (OSError, ValueError) as exc:
            self._fail(song, exc)
            return None

    def _continued(self, render) -> dict[str, Any]:
        """A re-roll's or extension's Request fields: its parent's kept codes, and whether
        it may end (an extension runs to its length). The parent must be the version this
        render was planned against."""
        p = render.parent
        if p is None:
            return {}
        now = outputs.read_sidecar(p["sidecar"]) or {}
        if now.get("render_key") != p["render_key"]:
            raise ValueError(f"the parent take {p['job_id']}:{p['seed']} changed since this "
                             "run planned it (its render key differs); plan the re-roll again")
        codes = np.load(p["codes"], allow_pickle=False).astype(np.int64)
        if codes.shape[-1] < p["kept_frames"]:
            raise ValueError(f"the parent take's codes {p['codes']} hold {codes.shape[-1]} "
                             f"frames, fewer than the {p['kept_frames']} kept")
        return {"kept": codes[:, : p["kept_frames"]], "allow_end": p["kind"] != "extend"}

    def _joined(self, render, audio: np.ndarray, info: dict) -> np.ndarray:
        """A re-roll's or extension's audio: the parent's samples up to the cut, crossfaded
        into the new take (splice.py); its sidecar's `parent` record goes into info."""
        p = render.parent
        if p is None:
            return audio
        hop = int(self.pipeline.codec_config.hop_length)
        cut = int(p["kept_frames"]) * hop
        info["parent"] = {"job_id": p["job_id"], "seed": p["seed"],
                          "render_key": p["render_key"], "kind": p["kind"],
                          "cut_s": p["cut_s"], "kept_frames": p["kept_frames"],
                          "crossfade_s": round(splice.fade_samples(cut, hop)
                                               / int(self.pipeline.codec_config.sample_rate), 4)}
        return splice.splice(p["wav"], audio, cut, hop)

    def _save_rows(self, song: Song, rows) -> None:
        for render, row in zip(song.renders, rows, strict=True):
            if render.key not in song.batch.resumed:
                save_q01(work_path(self.output_dir, render.key), row)
        self.faults.fire("after_backbone", {r.job_id for r in song.renders}, len(song.renders))

    def _write(self, batch: Batch, render, audio, codes, info: dict, take=None) -> None:
        """Write one take; on failure keep it (if it is not kept already) for the next try."""
        try:
            self.faults.fire("write", {render.job_id}, 1)
            files = outputs.write_take(render, audio, int(self.pipeline.codec_config.sample_rate),
                                       codes=codes, info=info)
        except (OSError, outputs.OutputError) as exc:
            err = exc if isinstance(exc, outputs.OutputError) else \
                outputs._os_error(render.path(".mp3"), exc)
            traceback.print_exception(exc, file=sys.stderr)
            kept = take is None or keep_take(kept_path(self.output_dir, render), take, info)
            self._result(batch, render, "failed", error=str(err), kept=kept,
                         no_space=bool(err.no_space), path=str(err.path or render.out_dir))
            return
        for p in (work_path(self.output_dir, render.key), kept_path(self.output_dir, render),
                  q01_stats_path(work_path(self.output_dir, render.key))):
            with contextlib.suppress(OSError):
                p.unlink()
        measured = (outputs.read_sidecar(files["json"]) or {}).get("analysis") or {}
        self._result(batch, render, "rendered", files={k: str(v) for k, v in files.items()},
                     analysis={k: measured.get(k) for k in ("flags", "score")})

    def _write_kept(self, batch: Batch) -> list:
        """Write the takes kept from an earlier failed write; the renders still to render."""
        todo = []
        for render in batch.renders:
            kept = load_kept(kept_path(self.output_dir, render))
            if kept is None:
                todo.append(render)
                continue
            print(f"worker: {render.stem}: writing the take kept from an earlier failed write "
                  "(no rendering)", file=sys.stderr, flush=True)
            audio, codes, info = kept
            self._write(batch, render, audio, codes, info)
        return todo

    def _info(self, take, prompt_tokens: int) -> dict:
        timings = {k: round(float(v), 3) for k, v in take.timings.items()}
        return {"tokens": {"prompt": prompt_tokens, "backbone": int(take.backbone_tokens)},
                "backbone": {"ended": take.ended, "logprob_mean": take.logprob_mean},
                "timings": timings, "device": self.device_label,
                "batch": {"size": take.batch_size, "mates": take.batch_size - 1,
                          "songs": take.batch_songs},
                "model": {"name": self.pipeline.info.name,
                          "fingerprint": self.pipeline.info.fingerprint,
                          "demo": bool(self.pipeline.info.demo)}}

    def run_wave(self, msg: dict) -> None:
        self.wave = msg.get("wave")
        batches = [Batch(group) for group in msg["batches"]]
        print(f"worker: wave {self.wave}: "
              + " | ".join(" ".join(r.stem for r in b.renders) for b in batches),
              file=sys.stderr, flush=True)
        try:
            self._render_wave(batches)
        except OutOfMemory as oom:
            self.chan.send({"type": "oom", "wave": self.wave, "ids": oom.ids,
                            "error": str(oom)})
            sys.stderr.flush()
            os._exit(6)
        self.chan.send({"type": "wave_done", "wave": self.wave})
        self.wave = None

    def _render_wave(self, batches: list[Batch]) -> None:
        live = []
        for b in batches:
            b.renders = self._write_kept(b)
            if b.renders:
                live.append(b)
        if not live:
            return
        songs, groups, requests = [], [], []  # per batch its songs: one engine batch
        for b in live:
            mine = [(s, r) for s in b.songs() if (r := self._request_or_fail(s)) is not None]
            if mine:
                groups.append(list(range(len(songs), len(songs) + len(mine))))
                songs += [s for s, _ in mine]
                requests += [r for _, r in mine]
        if not songs:
            return
        takes = self.pipeline.render(
            requests, progress=self._progress(songs), batches=groups,
            on_backbone=lambda i, rows: self._save_rows(songs[i], rows),
            on_error=lambda i, exc: self._fail(songs[i], exc))
        for song, per_song in zip(songs, takes, strict=True):
            for render, take in zip(song.renders, per_song, strict=False):
                info = self._info(take, song.prompt_tokens)
                try:
                    take.audio = self._joined(render, take.audio, info)
                except splice.SpliceError as exc:
                    self._result(song.batch, render, "failed", error=str(exc))
                    continue
                self._write(song.batch, render, take.audio, take.codes, info, take=take)

    def serve(self) -> None:
        while True:
            self.chan.send({"type": "want"})
            msg = self.chan.inbox.get()
            if msg["type"] == "stop":
                return
            if msg["type"] == "work":
                self.run_wave(msg)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m khala_cli.runner.worker")
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--output-dir", required=True)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--label", default="cpu")
    ap.add_argument("--residency", choices=("keep_loaded", "one_shot"), default="keep_loaded")
    ap.add_argument("--decode-path", choices=DECODE_PATHS, default="eager")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--parent-pid", type=int, default=0)
    ap.add_argument("--test-faults", default="", help=argparse.SUPPRESS)
    ap.add_argument("--test-fault-dir", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    # The parent handles Ctrl-C, SIGTERM and SIGHUP for the whole run: the worker finishes
    # its work (or the parent kills it with SIGKILL), it is never interrupted half-way through
    # writing a take. Slurm and systemd send SIGTERM to every process of the job, workers
    # included: ignoring it here is what gives running renders the parent's grace period.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    die_with_parent(args.parent_pid or None)
    chan = Channel()
    chan.send({"type": "hello", "pid": os.getpid(), "device": args.label})
    print(f"worker pid {os.getpid()} for {args.label} ({args.residency}, {args.decode_path} "
          f"decode) starting; "
          f"model {args.model_dir}", file=sys.stderr, flush=True)
    worker = Worker(args, chan)
    t = time.monotonic()
    try:
        worker.load()
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        traceback.print_exception(exc, file=sys.stderr)
        if is_oom(exc):
            chan.send({"type": "oom", "wave": None, "ids": [], "error": f"loading: {exc}"})
        else:
            chan.send({"type": "fatal", "error": f"{type(exc).__name__}: {exc}"})
        sys.stderr.flush()
        return 3
    print(f"worker: ready after {time.monotonic() - t:.1f} s on {worker.device_label}",
          file=sys.stderr, flush=True)
    chan.send({"type": "ready", "device": worker.device_label, "residency": args.residency})
    worker.serve()
    print("worker: stopping", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    code = main()
    sys.stderr.flush()
    os._exit(code)  # do not wait for the stdin thread
