"""Which devices a run uses, and the batch size, residency and decode path each one gets
by default.

No torch here: the parent never initialises CUDA. GPUs are discovered with `nvidia-smi`
(when it is on PATH); each worker later sees only its own GPU through CUDA_VISIBLE_DEVICES.

    auto        every visible CUDA GPU, else one CPU worker
    cpu         one CPU worker
    cpu:N       N CPU workers (how tests and CI exercise the pool)
    0,1,3       these GPU indices (as nvidia-smi numbers them)
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from khala_cli import model_numbers as mn
from khala_cli.engine.config import DECODE_PATHS, CodecConfig

GIB = 1024**3
MAX_CPU_WORKERS = 64
MAX_BATCH = 16
RESIDENCIES = ("keep_loaded", "one_shot")
# Paths that `make gpu-check` has proven to give eager's tokens on a CUDA GPU, fastest first;
# the first becomes the CUDA default. None has run on a GPU yet, so eager stays the default.
PROVEN_ON_CUDA: tuple[str, ...] = ()


class DeviceError(Exception):
    """A --devices spec that cannot be satisfied on this machine (the CLI exits 3)."""


@dataclass(frozen=True)
class Gpu:
    index: int
    uuid: str = ""
    memory_total: int = 0  # bytes
    memory_free: int = 0  # bytes


@dataclass(frozen=True)
class Device:
    """One worker slot: a GPU, or one CPU worker."""

    name: str  # "cuda:1" (nvidia-smi index) or "cpu:0"
    kind: str  # "cuda" | "cpu"
    index: int  # GPU index, or CPU worker number
    memory_total: int = 0  # bytes (GPU only)
    memory_free: int = 0  # bytes (GPU only)
    uuid: str = ""

    @property
    def env(self) -> dict[str, str]:
        """Environment for this device's worker: it sees only its own GPU, or none."""
        if self.kind == "cuda":
            return {"CUDA_VISIBLE_DEVICES": self.uuid or str(self.index)}
        return {"CUDA_VISIBLE_DEVICES": ""}


def _mib(text: str) -> int:
    m = re.match(r"\s*(\d+)", text)
    return int(m.group(1)) * 1024 * 1024 if m else 0


def parse_nvidia_smi(text: str) -> list[Gpu]:
    """Rows of `nvidia-smi --query-gpu=index,uuid,memory.total,memory.free
    --format=csv,noheader` (uuid optional: three columns are accepted too)."""
    gpus = []
    for line in text.splitlines():
        cols = [c.strip() for c in line.split(",")]
        if not cols or not cols[0].isdigit():
            continue
        if len(cols) >= 4:
            gpus.append(Gpu(int(cols[0]), cols[1], _mib(cols[2]), _mib(cols[3])))
        elif len(cols) == 3:
            gpus.append(Gpu(int(cols[0]), "", _mib(cols[1]), _mib(cols[2])))
    return gpus


def discover_gpus() -> list[Gpu]:
    """The CUDA GPUs this process may use, without initialising CUDA.

    nvidia-smi lists every GPU in the machine; when CUDA_VISIBLE_DEVICES is set in our own
    environment (a Slurm or Kubernetes allocation), only the GPUs it names are kept.
    """
    exe = shutil.which("nvidia-smi")
    if not exe:
        return []
    try:
        out = subprocess.run(
            [exe, "--query-gpu=index,uuid,memory.total,memory.free", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30, check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return []
    if out.returncode != 0:
        return []
    gpus = parse_nvidia_smi(out.stdout)
    return _visible(gpus, os.environ.get("CUDA_VISIBLE_DEVICES"))


def _visible(gpus: list[Gpu], cvd: str | None) -> list[Gpu]:
    if cvd is None:
        return gpus
    kept = []
    for item in (s.strip() for s in cvd.split(",")):
        if not item:
            continue
        for g in gpus:
            if (item.isdigit() and int(item) == g.index) or (g.uuid and g.uuid.startswith(item)):
                if g not in kept:
                    kept.append(g)
                break
        else:
            break  # CUDA stops at the first entry it cannot resolve
    return kept


def _cpu_devices(n: int) -> list[Device]:
    return [Device(name=f"cpu:{i}", kind="cpu", index=i) for i in range(n)]


def parse_devices(spec: str | None, gpus: list[Gpu] | None = None) -> list[Device]:
    """Devices for a --devices spec. `gpus` defaults to `discover_gpus()` (only looked up when
    the spec needs it). Raises DeviceError with a message for people."""
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        found = discover_gpus() if gpus is None else gpus
        if not found:
            return _cpu_devices(1)
        return [_gpu_device(g) for g in found]
    if spec == "cpu":
        return _cpu_devices(1)
    m = re.fullmatch(r"cpu:(\d+)", spec)
    if m:
        n = int(m.group(1))
        if not 1 <= n <= MAX_CPU_WORKERS:
            raise DeviceError(
                f"--devices {spec}: the number of CPU workers must be 1..{MAX_CPU_WORKERS}")
        return _cpu_devices(n)
    if not re.fullmatch(r"\d+(\s*,\s*\d+)*", spec):
        raise DeviceError(
            f"--devices {spec!r}: expected auto, cpu, cpu:N or GPU indices such as 0,1,3")
    wanted = [int(s) for s in spec.split(",")]
    dupes = sorted({i for i in wanted if wanted.count(i) > 1})
    if dupes:
        raise DeviceError(f"--devices {spec}: GPU {dupes[0]} is named twice")
    found = discover_gpus() if gpus is None else gpus
    by_index = {g.index: g for g in found}
    if not found:
        raise DeviceError(
            f"--devices {spec}: no CUDA GPU found on this machine (nvidia-smi "
            f"{'lists none' if shutil.which('nvidia-smi') else 'is not on PATH'}); "
            "use --devices cpu to render on the CPU")
    for i in wanted:
        if i not in by_index:
            have = ", ".join(str(g.index) for g in found)
            n = len(found)
            raise DeviceError(
                f"--devices {spec}: there is no GPU {i}; this machine has {n} "
                f"GPU{'s' if n != 1 else ''} ({have})")
    return [_gpu_device(by_index[i]) for i in wanted]


def _gpu_device(g: Gpu) -> Device:
    return Device(name=f"cuda:{g.index}", kind="cuda", index=g.index,
                  memory_total=g.memory_total, memory_free=g.memory_free, uuid=g.uuid)


# ---------------------------------------------------------------------------------------
# Memory: how much a model needs, and what that means for batch size and residency.


# Defaults of a full-size model when its directory cannot be read.
_DEFAULT_WEIGHTS = {"backbone": 3_100_000_000, "superres": 3_300_000_000, "codec": 300_000_000}


@dataclass(frozen=True)
class Footprint:
    """The written memory model of a model directory, estimated without loading it.

    - weights: each stage's file size (bf16 transformers, fp32 codec);
    - KV cache: 2 (K, V) x layers x kv_heads x head_dim x dtype bytes per row per token, for
      the backbone's whole context (prompt + max new tokens, capped at max_seq_len). A batch
      may hold rows of different songs: every row is sized as its longest row (a footprint
      made for that row's tokens, `batch_needs`), and the default batch size is made for
      rows at the cap, so it holds for any mix of songs;
    - super-res activations of one row at the real length (prompt + frames): per token the
      residual, norm, q, k, v and attention output (6 x hidden) and the MLP's gate, up and
      product (3 x ffn), in the model dtype (attention scores run in query blocks). Super-res
      runs one row at a time, so one row is its working set whatever the batch;
    - the codec: one group of windows of window_frames frames, or of the song's frames when
      fewer (CodecConfig.window_group x window_activation_bytes): the decoder takes a fixed
      group of one song's windows per forward, whatever the batch and free memory.
    """

    stage_bytes: dict[str, int]  # "backbone" | "superres" | "codec" -> weight bytes
    kv_bytes_per_token: int  # backbone KV cache, per row per token
    context_tokens: int  # backbone tokens per row at the cap
    superres_row_bytes: int  # super-res activations of one row at the real length
    codec_window_bytes: int  # decoding one window

    @property
    def all_bytes(self) -> int:
        return sum(self.stage_bytes.values())

    @property
    def largest_stage(self) -> int:
        return max(self.stage_bytes.values(), default=0)

    @property
    def kv_row_bytes(self) -> int:
        return self.kv_bytes_per_token * self.context_tokens

    @property
    def row_bytes(self) -> int:
        """Memory one more batch row needs at the busiest stage."""
        return max(self.kv_row_bytes, self.superres_row_bytes)

    def stage_peaks(self, residency: str, rows: int) -> dict[str, int]:
        """Memory at each stage's busiest point for `rows` rows, without HEADROOM: its working
        set (KV cache of every row, super-res activations of one row, a codec window group)
        beside the weights resident then (keep_loaded: every stage's; one_shot: its own)."""
        work = {"backbone": rows * self.kv_row_bytes, "superres": self.superres_row_bytes,
                "codec": self.codec_window_bytes}
        return {s: (self.all_bytes if residency == "keep_loaded" else self.stage_bytes[s]) + w
                for s, w in work.items()}

    def explain(self) -> str:
        w = ", ".join(f"{k} {v / GIB:.2f}" for k, v in self.stage_bytes.items())
        return (f"weights GiB: {w}; per row: KV cache {self.kv_bytes_per_token / 1024:.0f} KiB"
                f" x {self.context_tokens} tokens = {self.kv_row_bytes / GIB:.2f} GiB, "
                f"super-res activations {self.superres_row_bytes / GIB:.2f} GiB (one row at a time); "
                f"codec window group "
                f"{self.codec_window_bytes / GIB:.2f} GiB")


def _config(model_dir: Path, name: str) -> dict:
    try:
        return json.loads((model_dir / f"{name}.json").read_text())
    except (OSError, ValueError):
        return {}


def model_footprint(model_dir: str | Path, dtype_bytes: int = 2,
                    tokens: int = mn.MAX_NEW_TOKENS) -> Footprint:
    """The memory model of a model directory for songs of up to `tokens` backbone tokens
    (default: the cap), with the transformers run in `dtype_bytes` (their files are bf16); one
    that cannot be read gives the real Khala model's figures (~3 GB per transformer in bf16,
    48 KiB of KV cache per row per token)."""
    model_dir = Path(model_dir)
    stages = dict(_DEFAULT_WEIGHTS)
    for stage in stages:
        try:
            stages[stage] = (model_dir / f"{stage}.safetensors").stat().st_size
        except OSError:
            pass
    for stage in ("backbone", "superres"):
        stages[stage] = stages[stage] * dtype_bytes // 2
    bb, sr = _config(model_dir, "backbone"), _config(model_dir, "superres")
    kv = 2 * int(bb.get("num_layers", 24)) * int(bb.get("num_kv_heads", 8)) \
        * int(bb.get("head_dim", 64)) * dtype_bytes
    context = min(int(bb.get("max_seq_len", mn.MAX_SEQ_LEN)), mn.BACKBONE_MAX_PROMPT + tokens)
    sr_len = min(int(sr.get("max_seq_len", mn.MAX_SEQ_LEN)),
                 mn.SUPERRES_MAX_PROMPT + tokens // 2)
    sr_row = sr_len * (6 * int(sr.get("hidden_size", 2048))
                       + 3 * int(sr.get("ffn_hidden_size", 5632))) * dtype_bytes
    codec_cfg = _config(model_dir, "codec")
    try:
        codec = CodecConfig(**{k: (tuple(v) if k == "rates" else v) for k, v in codec_cfg.items()})
    except TypeError:
        codec = CodecConfig()
    frames = max(1, min(codec.window_frames, tokens // 2))  # 2 tokens per frame
    window = codec.window_group(frames) * codec.window_activation_bytes(frames)
    return Footprint(stage_bytes=stages, kv_bytes_per_token=kv, context_tokens=context,
                     superres_row_bytes=sr_row, codec_window_bytes=window)


HEADROOM = 2 * GIB  # CUDA context and allocator slack


def _needs(fp: Footprint, residency: str, rows: int) -> int:
    """Peak device memory of a render of `rows` rows: the busiest stage, with what stays
    resident beside it, and the headroom."""
    return max(fp.stage_peaks(residency, rows).values()) + HEADROOM


def default_residency(device: Device, footprint: Footprint) -> str:
    """keep_loaded when all three models and one row fit, else one_shot."""
    if device.kind != "cuda" or not device.memory_total:
        return "keep_loaded"
    return ("keep_loaded" if _needs(footprint, "keep_loaded", 1) <= device.memory_total
            else "one_shot")


def default_batch_size(device: Device, footprint: Footprint, residency: str) -> int:
    """1 on a CPU; on a GPU, the most rows (up to MAX_BATCH) whose peak fits its free memory."""
    if device.kind != "cuda":
        return 1
    budget = device.memory_free or device.memory_total
    rows = 1
    while rows < MAX_BATCH and _needs(footprint, residency, rows + 1) <= budget:
        rows += 1
    return rows


def needs(footprint: Footprint, residency: str, rows: int) -> int:
    return _needs(footprint, residency, rows)


def batch_needs(model_dir: str | Path, residency: str, row_tokens: list[int],
                dtype_bytes: int = 2) -> int:
    """Peak device memory of one batch whose rows (of any songs) decode up to `row_tokens`
    backbone tokens each: every row sized as the longest."""
    fp = model_footprint(model_dir, dtype_bytes=dtype_bytes, tokens=max(row_tokens))
    return _needs(fp, residency, len(row_tokens))


def default_decode_path(kind: str) -> tuple[str, str]:
    """The decode path a device of this kind ("cuda" | "cpu") gets by default, and why."""
    if kind == "cuda" and PROVEN_ON_CUDA:
        return PROVEN_ON_CUDA[0], "the fastest path proven equal to eager on a GPU by make gpu-check"
    if kind == "cuda":
        return "eager", ("compile and CUDA graphs are not yet proven equal to eager on a GPU "
                         "(make gpu-check proves them)")
    return "eager", ("on the CPU, compile gives eager's tokens in float32 but no clear gain "
                     "over eager's threaded products (khala bench --e2e) and costs a compile "
                     "per batch size")


def check_decode_path(devices: list[Device], path: str | None) -> None:
    """Raise DeviceError for a --decode-path that one of these devices cannot run."""
    if path is not None and path not in DECODE_PATHS:
        raise DeviceError(f"--decode-path {path}: expected one of {', '.join(DECODE_PATHS)}")
    cpu = next((d.name for d in devices if d.kind != "cuda"), None)
    if path == "cuda_graphs" and cpu:
        raise DeviceError(f"--decode-path cuda_graphs needs CUDA GPUs, and {cpu} is a CPU worker")


@dataclass(frozen=True)
class DevicePlan:
    device: Device
    batch_size: int
    residency: str
    decode_path: str = "eager"


def plan_devices(spec: str | None, model_dir: str | Path, batch_size: int | None = None,
                 residency: str | None = None, gpus: list[Gpu] | None = None,
                 decode_path: str | None = None) -> list[DevicePlan]:
    """Devices with their batch size, residency and decode path: the given ones, else the
    defaults."""
    if batch_size is not None and batch_size < 1:
        raise DeviceError(f"--batch-size {batch_size}: must be at least 1")
    if residency is not None and residency not in RESIDENCIES:
        raise DeviceError(f"--residency {residency}: expected one of {', '.join(RESIDENCIES)}")
    devices = parse_devices(spec, gpus)
    check_decode_path(devices, decode_path)
    fp = model_footprint(model_dir)
    plans = []
    for d in devices:
        res = residency or default_residency(d, fp)
        bs = batch_size or default_batch_size(d, fp, res)
        plans.append(DevicePlan(d, bs, res, decode_path or default_decode_path(d.kind)[0]))
    return plans
