"""What each gpu-check step is expected to cost, in seconds: on one H100 or H200 from the
written memory model and bandwidth figures, and on this project's 2-core CPU as measured.

No GPU has run khala yet, so the GPU figures are derived, and the summary prints each step's
seconds beside its estimate for the first GPU run to correct them. They come from:
- the memory model (khala_cli/runner/devices.py, Footprint) of the real shape, which is the
  bench model's at scale 1: ~3.1 GB of bf16 backbone weights, ~3.3 GB of super-res, ~0.3 GB
  of codec, 48 KiB of KV cache per row per token;
- HBM bandwidth: 3.35 TB/s on an H100 SXM (4.8 on an H200; the slower is used, so the
  estimates hold on both). A decode step reads the backbone's weights once whatever the
  batch size, plus each row's KV cache: ~1 ms a step, the floor CUDA graphs can reach;
- eager decoding is bound by kernel launches, not bandwidth: ~30 kernels a layer x 24 layers
  plus sampling, at an assumed ~6 us each from Python: ~4.5 ms a step;
- the rest from the sizes: super-res is one forward pass (~2 x 1.7 G params x 1300 tokens
  per row: milliseconds at bf16 rates, so its floor counts); the codec is ~360 GFLOP per
  second of audio in fp32 (3072 channels at 21.5 Hz halving through rates 8-8-8-4), about
  1 s per song-minute at an assumed 30 TFLOP/s; loading copies the weights from the page
  cache at an assumed 2 GB/s.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from khala_cli import model_numbers as mn  # noqa: E402


def _devices():
    """khala_cli/runner/devices.py alone (it imports no torch): the package's __init__ loads
    the runner, whose imports (ffmpeg-python) the image lacks until the install step."""
    spec = importlib.util.spec_from_file_location("_gpu_check_devices",
                                                  ROOT / "khala_cli" / "runner" / "devices.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


FP = _devices().model_footprint(Path("/nonexistent"))  # the real Khala model's figures
HBM_BYTES_PER_S = 3.35e12
EAGER_STEP_S = (30 * 24 + 20) * 6e-6
LOAD_BYTES_PER_S = 2e9
CODEC_S_PER_SONG_MINUTE = 1.0
SUPERRES_FLOOR_S = 0.5
PROCESS_S = 10.0  # Python, torch, dac, the CUDA context
FIRST_USE_S = {"eager": 3.0, "cuda_graphs": 5.0, "compile": 90.0}  # per batch size (warm-up)
WARMUP_MINUTES = 0.02  # khala_cli/engine/bench_e2e.py

# Steps that are no render, on the GPU machine (16 cores): pip of ~31 MiB of wheels
# measured at 2 s here, and three imports; pytest of the two files with CUDA tests (one
# compiles a decode step); the bench model at scale 1 (6.9 GB of random weights: here
# 785 MB took 8 s of CPU, ~100 MB/s); the render of a small manifest in a worker process;
# doctor (a torch probe in a child process, the model's fingerprints).
GPU_FIXED_S = {"install": 20.0, "nvidia_smi": 3.0, "cuda_tests": 90.0, "model": 75.0,
               "render": 45.0, "doctor": 15.0}

# The steps of `tools/gpu-check --dry-run` (model scale 0.02, songs of 0.01 minute, B=1 and
# 2, one torch thread each), measured on the project's 2-core machine with other work beside
# it (load 4 to 6): `FULL=1 tools/gpu-check --dry-run`, the slowest of three runs, rounded
# up. model is a fresh build (4 s when WORK holds it). compile is torch.compile's warm-up on
# the CPU (C++ code generation): 119 s cold, 65 s with inductor's cache warm; more than the
# dry run's whole budget, so a plain dry run skips it.
DRY_S = {"install": 8.0, "nvidia_smi": 0.0, "cuda_tests": 0.0, "model": 20.0,
         "e2e_eager": 15.0, "e2e_cuda_graphs": 0.0, "catalogue": 2.0, "render": 20.0,
         "doctor": 10.0, "e2e_one_shot": 10.0, "e2e_long": 10.0, "e2e_compile": 130.0}
DRY_BUDGET_S = 110.0


def step_s(path: str, rows: int, minutes: float) -> float:
    """Seconds of one backbone decode step at `rows` rows, at the song's mean context."""
    kv = rows * FP.kv_bytes_per_token * (mn.TOKENS_PER_MINUTE * minutes / 2)
    bandwidth = (FP.stage_bytes["backbone"] + kv) / HBM_BYTES_PER_S
    return max(bandwidth, EAGER_STEP_S) if path == "eager" else bandwidth


def render_s(path: str, rows: int, minutes: float) -> float:
    """One e2e render: load the three stages, decode, super-res, codec."""
    return (FP.all_bytes / LOAD_BYTES_PER_S
            + mn.TOKENS_PER_MINUTE * minutes * step_s(path, rows, minutes)
            + SUPERRES_FLOOR_S + rows * minutes * CODEC_S_PER_SONG_MINUTE)


def e2e_s(paths: tuple[str, ...], batches: tuple[int, ...], residencies: tuple[str, ...],
          minutes: float) -> float:
    """One `khala bench --e2e` process: per path and batch size a warm-up, then a render per
    residency (each render loads its weights: the bench builds a pipeline per render)."""
    total = PROCESS_S
    for path in paths:
        for rows in batches:
            total += (render_s(path, rows, WARMUP_MINUTES) + FIRST_USE_S[path]
                      + len(residencies) * render_s(path, rows, minutes))
    return round(total)
