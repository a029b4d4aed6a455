"""Which devices a run uses, and the batch size and residency each one gets by default.

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

GIB = 1024**3
MAX_CPU_WORKERS = 64
MAX_BATCH = 16
RESIDENCIES = ("keep_loaded", "one_shot")


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


@dataclass(frozen=True)
class Footprint:
    """What a model directory needs in device memory, estimated without loading it."""

    stage_bytes: dict[str, int]  # "backbone" | "superres" | "codec" -> weight bytes
    row_bytes: int  # extra memory for each batch row (KV cache, activations)

    @property
    def all_bytes(self) -> int:
        return sum(self.stage_bytes.values())

    @property
    def largest_stage(self) -> int:
        return max(self.stage_bytes.values(), default=0)


def _transformer_row_bytes(cfg: dict, dtype_bytes: int) -> int:
    layers = int(cfg.get("num_layers", 24))
    kv_heads = int(cfg.get("num_kv_heads", 8))
    head_dim = int(cfg.get("head_dim", 64))
    seq = int(cfg.get("max_seq_len", 25600))
    hidden = int(cfg.get("hidden_size", 2048))
    ffn = int(cfg.get("ffn_hidden_size", 5632))
    kv_cache = 2 * layers * kv_heads * head_dim * seq * dtype_bytes
    activations = seq * (4 * hidden + 2 * ffn) * dtype_bytes
    return kv_cache + activations


def model_footprint(model_dir: str | Path, dtype_bytes: int = 2) -> Footprint:
    """Weights from the files' sizes; per-row memory from the transformer configs.

    A directory that cannot be read gives the real Khala model's figures (~3 GB per
    transformer in bf16, ~1.3 GB of KV cache per row at full context)."""
    model_dir = Path(model_dir)
    stages = {"backbone": 3_100_000_000, "superres": 3_300_000_000, "codec": 300_000_000}
    row = 0
    for stage in stages:
        f = model_dir / f"{stage}.safetensors"
        try:
            stages[stage] = f.stat().st_size
        except OSError:
            pass
    for stage in ("backbone", "superres"):
        try:
            cfg = json.loads((model_dir / f"{stage}.json").read_text())
        except (OSError, ValueError):
            cfg = {}
        row = max(row, _transformer_row_bytes(cfg, dtype_bytes))
    return Footprint(stage_bytes=stages, row_bytes=row)


HEADROOM = 2 * GIB  # CUDA context, allocator slack, the codec's windows


def default_residency(device: Device, footprint: Footprint) -> str:
    """keep_loaded when all three models and one row fit, else one_shot."""
    if device.kind != "cuda" or not device.memory_total:
        return "keep_loaded"
    need = footprint.all_bytes + footprint.row_bytes + HEADROOM
    return "keep_loaded" if need <= device.memory_total else "one_shot"


def default_batch_size(device: Device, footprint: Footprint, residency: str) -> int:
    """1 on a CPU; on a GPU, as many rows as its free memory holds after the weights."""
    if device.kind != "cuda":
        return 1
    budget = device.memory_free or device.memory_total
    resident = footprint.all_bytes if residency == "keep_loaded" else footprint.largest_stage
    spare = budget - resident - HEADROOM
    if footprint.row_bytes <= 0:
        return 1
    return max(1, min(MAX_BATCH, int(spare // int(footprint.row_bytes * 1.25))))


@dataclass(frozen=True)
class DevicePlan:
    device: Device
    batch_size: int
    residency: str


def plan_devices(spec: str | None, model_dir: str | Path, batch_size: int | None = None,
                 residency: str | None = None, gpus: list[Gpu] | None = None,
                 ) -> list[DevicePlan]:
    """Devices with their batch size and residency: the given ones, else the defaults."""
    if batch_size is not None and batch_size < 1:
        raise DeviceError(f"--batch-size {batch_size}: must be at least 1")
    if residency is not None and residency not in RESIDENCIES:
        raise DeviceError(f"--residency {residency}: expected one of {', '.join(RESIDENCIES)}")
    devices = parse_devices(spec, gpus)
    fp = model_footprint(model_dir)
    plans = []
    for d in devices:
        res = residency or default_residency(d, fp)
        bs = batch_size or default_batch_size(d, fp, res)
        plans.append(DevicePlan(d, bs, res))
    return plans
