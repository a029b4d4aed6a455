"""The worker: one process per device, started by the pool as

    python -m khala_cli.runner.worker --model-dir D --output-dir O --device cpu|cuda ...

It loads the pipeline once, then asks the parent for work and runs it: per wave of batches,
the backbone (or the saved tokens of an interrupted earlier attempt), then super-resolution,
then decoding, each over the whole wave before the next stage, so that in one_shot residency
the models swap once per wave. Every take is written with `outputs.write_take`; the backbone
tokens of each render are kept in `<output_dir>/.khala/work/<key>.q01.npy` until the render is
done, so a rerun after a crash resumes after the backbone.

stdout carries protocol lines only (see protocol.py); everything else goes to stderr, which
the parent points at this worker's log file. The worker dies with its parent: the kernel
kills it when the parent dies (PR_SET_PDEATHSIG), and it exits when its stdin closes.

TEST-ONLY fault hooks (never set these in production): KHALA_TEST_FAULT is a comma-separated
list of `kind:job_id`, acting when the worker processes a batch holding that job:
    crash / crash_once        SIGKILL itself at the first progress event (mid-render)
    hang / hang_once          stop answering at the first progress event
    hang_after_backbone       stop answering once the backbone tokens are saved
    oom / oom_batch           raise CUDA out-of-memory (oom_batch: only in a batch of > 1)
    fail                      raise an ordinary error for that batch (the worker lives on)
    pause                     create <fault dir>/paused-<job>, wait for <fault dir>/resume-<job>
`*_once` faults act once per output directory (a marker file under KHALA_TEST_FAULT_DIR,
default <output_dir>/.khala/test-faults).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import queue
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from khala_cli.runner import protocol

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


# ---------------------------------------------------------------------------------------
# Test-only faults


class Faults:
    def __init__(self, spec: str, marker_dir: Path):
        self.rules: list[tuple[str, str]] = []
        for item in (s.strip() for s in spec.split(",")):
            if ":" in item:
                kind, job = item.split(":", 1)
                self.rules.append((kind.strip(), job.strip()))
        self.marker_dir = marker_dir

    def _once(self, kind: str, job: str) -> bool:
        """True the first time in this output directory."""
        self.marker_dir.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.marker_dir / f"{kind}-{job}", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return False
        os.close(fd)
        return True

    def fire(self, point: str, job_ids: set[str], batch_size: int) -> None:
        for kind, job in self.rules:
            if job not in job_ids:
                continue
            base = kind.removesuffix("_once")
            if point == "progress" and base in ("crash", "hang", "oom", "oom_batch", "fail",
                                                "pause"):
                pass
            elif point == "after_backbone" and base == "hang_after_backbone":
                pass
            else:
                continue
            if base == "oom_batch" and batch_size < 2:
                continue
            if kind.endswith("_once") and not self._once(kind, job):
                continue
            print(f"worker: TEST FAULT {kind}:{job} at {point}", file=sys.stderr, flush=True)
            if base == "crash":
                os.kill(os.getpid(), signal.SIGKILL)
            if base in ("hang", "hang_after_backbone"):
                while True:
                    time.sleep(3600)
            if base in ("oom", "oom_batch"):
                import torch

                raise torch.cuda.OutOfMemoryError("CUDA out of memory (test fault)")
            if base == "fail":
                raise RuntimeError(f"test fault for job {job}")
            if base == "pause":
                self.marker_dir.mkdir(parents=True, exist_ok=True)
                (self.marker_dir / f"paused-{job}").touch()
                while not (self.marker_dir / f"resume-{job}").exists():
                    time.sleep(0.05)
                self.rules = [(k, j) for k, j in self.rules if (k, j) != (kind, job)]


NO_FAULTS = Faults("", Path("."))


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


def save_q01(path: Path, q01) -> None:
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}.{os.getpid()}")  # outputs.temp_files finds it
    with open(tmp, "wb") as f:
        np.save(f, np.ascontiguousarray(q01, dtype=np.int64))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_q01(path: Path, codebook_size: int):
    """Saved tokens, or None when absent or unusable (an unusable file is removed)."""
    import numpy as np

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
    return q.astype(np.int64)


# ---------------------------------------------------------------------------------------
# Rendering


class Batch:
    def __init__(self, entries: list[dict]):
        from khala_cli.plan import Render

        self.renders = [Render.from_dict(e["render"]) for e in entries]
        self.ids = {r.key: e["id"] for r, e in zip(self.renders, entries, strict=True)}
        self.first = self.renders[0]
        self.q01: dict[str, Any] = {}
        self.backbone_stats: dict[str, dict] = {}  # key -> {ended, logprob_mean}
        self.resumed: set[str] = set()
        self.codes: list = []
        self.timings = {"backbone_s": 0.0, "superres_s": 0.0, "decode_s": 0.0}
        self.started = time.monotonic()
        self.failed = False
        self.bb_ids: list[int] = []
        self.sr_ids: list[int] = []

    @property
    def job_ids(self) -> set[str]:
        return {r.job_id for r in self.renders}


class Worker:
    def __init__(self, args: argparse.Namespace, chan: Channel):
        self.args = args
        self.chan = chan
        self.output_dir = Path(args.output_dir)
        spec = os.environ.get("KHALA_TEST_FAULT", "")
        marker = os.environ.get("KHALA_TEST_FAULT_DIR") or self.output_dir / ".khala" / "test-faults"
        self.faults = Faults(spec, Path(marker)) if spec else NO_FAULTS
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
                                          residency=self.args.residency)
        if self.args.residency == "keep_loaded":
            self.pipeline.load()  # now, so that "ready" means ready (and an OOM shows here)
        label = self.args.label
        if device == "cuda":
            with contextlib.suppress(Exception):
                label = f"{label} ({torch.cuda.get_device_name(0)})"
        self.device_label = label

    # -- the wave --------------------------------------------------------------------------

    def _progress(self, batch: Batch, seeds: list[int]):
        state = {"phase": None, "t": 0.0}
        job_id = batch.first.job_id

        def cb(phase: str, done: int, total: int, extra: dict | None = None) -> None:
            now = time.monotonic()
            if phase != state["phase"] or done >= total or now - state["t"] >= 0.25:
                state["phase"], state["t"] = phase, now
                tps = (extra or {}).get("tokens_per_s")
                self.chan.send({"type": "progress", "wave": self.wave, "job_id": job_id,
                                "seeds": seeds, "phase": phase, "done": int(done),
                                "total": int(total),
                                "tokens_per_s": float(tps) if tps is not None else None})
            self.faults.fire("progress", batch.job_ids, len(batch.renders))
        return cb

    def _request(self, batch: Batch, seeds: list[int]):
        from khala_cli.engine.pipeline import Request

        r = batch.first
        return Request(backbone_ids=batch.bb_ids, superres_ids=batch.sr_ids, seeds=list(seeds),
                       top_k_bb=r.top_k_bb, temperature=r.temperature, top_k_sr=r.top_k_sr,
                       max_new_tokens=r.max_new_tokens, duration=r.duration)

    def _fail(self, batch: Batch, exc: BaseException) -> None:
        traceback.print_exception(exc, file=sys.stderr)
        batch.failed = True
        error = f"{type(exc).__name__}: {exc}"
        for r in batch.renders:
            self._result(batch, r, "failed", error=error)

    def _result(self, batch: Batch, render, status: str, error: str | None = None,
                files: dict | None = None) -> None:
        print(f"worker: {render.stem}: {status}" + (f": {error}" if error else ""),
              file=sys.stderr, flush=True)
        self.chan.send({"type": "result", "wave": self.wave, "id": batch.ids[render.key],
                        "status": status, "error": error, "files": files or {},
                        "seconds": round(time.monotonic() - batch.started, 3),
                        "resumed": render.key in batch.resumed})

    def _stage(self, batches: list[Batch], fn) -> None:
        for b in batches:
            if b.failed:
                continue
            try:
                fn(b)
            except Exception as exc:  # noqa: BLE001 - reported per batch
                if is_oom(exc):
                    traceback.print_exception(exc, file=sys.stderr)
                    raise OutOfMemory(list(b.ids.values()),
                                      f"{type(exc).__name__}: {exc}") from exc
                self._fail(b, exc)

    def _backbone(self, b: Batch) -> None:
        from khala_cli.prompt import PromptSpec, prompt_ids

        r = b.first
        spec = PromptSpec(mode=r.mode, prompt_mode=r.prompt_mode, tags=tuple(r.tags),
                          prompt=r.prompt, lyrics=r.lyrics, duration=r.duration)
        b.bb_ids, b.sr_ids = prompt_ids(self.pipeline.tokenizer, spec)
        codebook = int(self.pipeline.info.codebook_size)
        for render in b.renders:
            q = load_q01(work_path(self.output_dir, render.key), codebook)
            if q is not None:
                b.q01[render.key] = q
                b.resumed.add(render.key)
                print(f"worker: {render.stem}: resuming from saved backbone tokens",
                      file=sys.stderr, flush=True)
        todo = [x for x in b.renders if x.key not in b.q01]
        if not todo:
            return
        seeds = [x.seed for x in todo]
        t = time.monotonic()
        out = self.pipeline.backbone(self._request(b, seeds), progress=self._progress(b, seeds))
        b.timings["backbone_s"] = time.monotonic() - t
        for render, row in zip(todo, out, strict=True):
            save_q01(work_path(self.output_dir, render.key), row.codes)
            b.q01[render.key] = row.codes
            b.backbone_stats[render.key] = {"ended": row.ended,
                                            "logprob_mean": row.logprob_mean}
        self.faults.fire("after_backbone", b.job_ids, len(b.renders))

    def _superres(self, b: Batch) -> None:
        seeds = [x.seed for x in b.renders]
        if b.resumed:  # the backbone made no progress call: the faults act here instead
            self.faults.fire("progress", b.job_ids, len(b.renders))
        t = time.monotonic()
        b.codes = self.pipeline.superres(self._request(b, seeds), [b.q01[x.key] for x in b.renders],
                                         progress=self._progress(b, seeds))
        b.timings["superres_s"] = time.monotonic() - t

    def _decode(self, b: Batch) -> None:
        from khala_cli import outputs

        seeds = [x.seed for x in b.renders]
        t = time.monotonic()
        audio = self.pipeline.decode(b.codes, progress=self._progress(b, seeds))
        b.timings["decode_s"] = time.monotonic() - t
        info_model = {"name": self.pipeline.info.name,
                      "fingerprint": self.pipeline.info.fingerprint,
                      "demo": bool(self.pipeline.info.demo)}
        sr = int(self.pipeline.codec_config.sample_rate)
        for render, codes, wav in zip(b.renders, b.codes, audio, strict=True):
            timings = dict(b.timings)
            if render.key in b.resumed:
                timings["backbone_s"] = 0.0
            timings = {k: round(v, 3) for k, v in timings.items()}
            timings["total_s"] = round(sum(timings.values()), 3)
            info = {"tokens": {"prompt": len(b.bb_ids),
                               "backbone": int(b.q01[render.key].shape[1]) * 2},
                    "backbone": b.backbone_stats.get(render.key, {}),
                    "timings": timings, "device": self.device_label, "model": info_model}
            try:
                files = outputs.write_take(render, wav, sr, codes=codes, info=info)
            except Exception as exc:  # noqa: BLE001 - this take failed, the others go on
                traceback.print_exception(exc, file=sys.stderr)
                self._result(b, render, "failed", error=f"{type(exc).__name__}: {exc}")
                continue
            with contextlib.suppress(OSError):
                work_path(self.output_dir, render.key).unlink()
            self._result(b, render, "rendered",
                         files={k: str(v) for k, v in (files or {}).items()})

    def run_wave(self, msg: dict) -> None:
        self.wave = msg.get("wave")
        batches = [Batch(group) for group in msg["batches"]]
        print(f"worker: wave {self.wave}: "
              + " | ".join(" ".join(r.stem for r in b.renders) for b in batches),
              file=sys.stderr, flush=True)
        try:
            self._stage(batches, self._backbone)
            self._stage(batches, self._superres)
            self._stage(batches, self._decode)
        except OutOfMemory as oom:
            self.chan.send({"type": "oom", "wave": self.wave, "ids": oom.ids,
                            "error": str(oom)})
            sys.stderr.flush()
            os._exit(6)
        self.chan.send({"type": "wave_done", "wave": self.wave})
        self.wave = None

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
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--parent-pid", type=int, default=0)
    args = ap.parse_args(argv)

    die_with_parent(args.parent_pid or None)
    # The parent handles Ctrl-C and SIGTERM for the whole run: the worker finishes its work
    # (or is killed), it is never interrupted half-way through writing a take.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    chan = Channel()
    chan.send({"type": "hello", "pid": os.getpid(), "device": args.label})
    print(f"worker pid {os.getpid()} for {args.label} ({args.residency}) starting; "
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
