"""The steps of `tools/gpu-check`, in the order of what they prove, each with its commands, its
GPU estimate (gpu_estimates.py), what it needs before it, and how its output is checked and
turned into figures. The scale: the full size on a GPU, a tiny one in the dry run."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import gpu_estimates as est
import gpu_results as res

ROOT = Path(__file__).resolve().parents[1]
SKIP_CUDA = "CUDA only: this is a CPU dry run"
NO_CATALOGUE = ("cross-song batching not built yet: khala bench --e2e has no --catalogue "
                "(the batching issue)")


@dataclass(frozen=True)
class Scale:
    """What the steps render: the full size on a GPU, a tiny one in the dry run."""

    device: str
    model: float
    minutes: float
    long_minutes: float
    batches: tuple[int, ...]
    render_devices: str
    render_minutes: float  # a manifest's max_minutes is at least 0.05

    @property
    def gpu_paths(self) -> tuple[str, ...]:
        return ("eager", "cuda_graphs") if self.device == "cuda" else ("eager",)


GPU = Scale("cuda", 1.0, 1.0, 3.0, (1, 8), "0", 0.25)
DRY = Scale("cpu", 0.02, 0.01, 0.02, (1, 2), "cpu", 0.05)


@dataclass
class Ctx:
    """One run: where it writes, its budget, and the results so far."""

    out: Path
    work: Path
    dry: bool
    full: bool
    budget: float
    py: str
    env: dict[str, str]
    only: frozenset[str] | None = None  # STEPS: run these alone
    start: float = field(default_factory=time.monotonic)
    status: dict[str, str] = field(default_factory=dict)

    @property
    def scale(self) -> Scale:
        return DRY if self.dry else GPU

    @property
    def log(self) -> Path:
        return self.out / "gpu-check.log"

    @property
    def model_dir(self) -> Path:
        return self.work / "checkpoints" / f"bench-e2e-{self.scale.model:g}"

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.start)


Command = list[str]


@dataclass(frozen=True)
class Step:
    name: str
    tier: int  # the order of value; 4: only when time is left
    what: str
    commands: Callable[[Ctx], list[Command] | str]  # or the reason it is skipped
    gpu_s: float
    needs: tuple[str, ...] = ("install",)
    cuda_only: bool = False
    in_repo: bool = False  # run in the checkout (else in WORK)
    verify: Callable[[Ctx, str, int], tuple[dict, str | None]] = lambda c, t, n: ({}, None)

    def estimate(self, ctx: Ctx) -> float:
        return est.DRY_S[self.name] if ctx.dry else self.gpu_s


IMPORTS = """import json, sys, torch, torchaudio, dac
print(json.dumps({"python": sys.version.split()[0], "torch": torch.__version__,
                  "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
                  "torchaudio": torchaudio.__version__, "dac": dac.__version__}))"""


def install_commands(ctx: Ctx) -> list[Command]:
    wheels = os.environ.get("WHEELS")
    cmds = []
    if wheels:
        found = sorted(str(p) for p in Path(wheels).glob("*.whl"))
        # The folder holds the whole closure, so no resolver: descript-audiotools pins
        # protobuf<3.20, which its import never needs and the image's newer one must stay.
        cmds.append([ctx.py, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                     "--no-compile", "--upgrade", "--target", str(ctx.work / "site"), *found])
    return cmds + [[ctx.py, "-c", IMPORTS]]


def last_json(text: str) -> dict:
    for line in reversed(text.splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                return {}
    return {}


def verify_install(ctx: Ctx, text: str, _: int) -> tuple[dict, str | None]:
    figures = last_json(text)
    if not ctx.dry and not figures.get("cuda_available"):
        return figures, "torch sees no CUDA device"
    return figures, None


def verify_smi(ctx: Ctx, text: str, _: int) -> tuple[dict, str | None]:
    rows = [r.split(", ") for r in text.splitlines() if r.count(", ") == 3]
    if not rows:
        return {}, "nvidia-smi listed no GPU"
    return {"gpus": [dict(zip(("name", "memory_total", "memory_free", "driver"), r,
                              strict=True)) for r in rows]}, None


def cuda_test_files() -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")
                  if "pytest.mark.cuda" in p.read_text())


def verify_pytest(ctx: Ctx, text: str, _: int) -> tuple[dict, str | None]:
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error)", text)}
    return counts, None if counts.get("passed") else "no CUDA test ran"


MODEL = ("import sys; from khala_cli.engine.bench_e2e import model_dir; "
         "print(model_dir(float(sys.argv[1])))")


def verify_model(ctx: Ctx, text: str, _: int) -> tuple[dict, str | None]:
    size = sum(p.stat().st_size for p in ctx.model_dir.glob("*") if p.is_file())
    return {"path": str(ctx.model_dir), "gb": round(size / 1e9, 2),
            "note": "random weights, untrained: renders noise"}, None


def bench(ctx: Ctx, paths: tuple[str, ...], batches: tuple[int, ...], residency: str,
          minutes: float, *extra: str) -> list[Command]:
    return [[ctx.py, "-m", "khala_cli", "bench", "--e2e", "--device", ctx.scale.device,
             "--scale", f"{ctx.scale.model:g}", "--minutes", f"{minutes:g}",
             "--batches", ",".join(map(str, batches)), "--paths", ",".join(paths),
             "--residencies", residency, "--eager-codes", str(ctx.work / "eager-codes"),
             "--results-jsonl", str((ctx.out / res.RESULTS).resolve()), *extra]]


def e2e_step(name: str, tier: int, what: str, paths: Callable[[Scale], tuple[str, ...]],
             batches: Callable[[Scale], tuple[int, ...]], residency: str,
             minutes: Callable[[Scale], float], cuda_only: bool = False) -> Step:
    """A step of one bench process; it passes when every render it planned wrote its line."""

    def commands(ctx: Ctx) -> list[Command]:
        return bench(ctx, paths(ctx.scale), batches(ctx.scale), residency, minutes(ctx.scale))

    def verify(ctx: Ctx, text: str, before: int) -> tuple[dict, str | None]:
        runs = [r["figures"] for r in res.read(ctx.out)[0][before:]
                if r["step"] == res.RUN_STEP]
        want = len(paths(ctx.scale)) * len(batches(ctx.scale))
        figures = {"runs": len(runs), "paths": list(paths(ctx.scale)),
                   "equal_to_eager": all(r["tokens_equal_eager"] for r in runs)}
        if ctx.dry and "cuda_graphs" in paths(GPU) and "cuda_graphs" not in paths(ctx.scale):
            figures["left_out"] = f"cuda_graphs ({SKIP_CUDA})"
        return figures, None if len(runs) == want else f"{len(runs)} of {want} renders"

    gpu = est.e2e_s(paths(GPU), batches(GPU), (residency,), minutes(GPU))
    return Step(name, tier, what, commands, gpu, needs=("install", "model"),
                cuda_only=cuda_only, verify=verify)


def catalogue_commands(ctx: Ctx) -> list[Command] | str:
    helped = subprocess.run([ctx.py, "-m", "khala_cli", "bench", "--help"], cwd=ctx.work,
                            env=ctx.env, capture_output=True, text=True)
    if "--catalogue" not in helped.stdout:
        return NO_CATALOGUE
    return bench(ctx, ctx.scale.gpu_paths[-1:], ctx.scale.batches[-1:], "keep_loaded",
                 ctx.scale.minutes, "--catalogue")


def render_commands(ctx: Ctx) -> list[Command]:
    folder = ctx.work / "render"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "jobs.yaml").write_text(
        f"# gpu-check: the bench model (random weights, untrained: every take is noise)\n"
        f"model: {ctx.model_dir}\noutput_dir: {folder / 'out'}\n"
        f"defaults: {{max_minutes: {ctx.scale.render_minutes:g}, mode: instrumental, seeds: [1, 2]}}\n"
        "jobs:\n  - {id: piano, tags: [Piano, Calm]}\n")
    return [[ctx.py, "-m", "khala_cli", "render", str(folder / "jobs.yaml"), "--devices",
             ctx.scale.render_devices, "--force", "--quiet", "--grace", "0"]]


def verify_render(ctx: Ctx, text: str, _: int) -> tuple[dict, str | None]:
    wavs = sorted((ctx.work / "render" / "out").rglob("*.wav"))
    return {"takes": len(wavs)}, None if len(wavs) == 2 else f"{len(wavs)} of 2 takes written"


def verify_doctor(ctx: Ctx, text: str, _: int) -> tuple[dict, str | None]:
    found = last_json(text).get("findings", [])
    levels: dict[str, int] = {}
    for f in found:
        levels[f.get("level", "?")] = levels.get(f.get("level", "?"), 0) + 1
    decode = [f.get("message") for f in found if f.get("topic") == "decode"]
    return {"levels": levels, "decode_path": decode[0] if decode else None}, None


STEPS = (
    Step("install", 1, "install the wheels, import torch, torchaudio and dac",
         install_commands, est.GPU_FIXED_S["install"], needs=(), verify=verify_install),
    Step("nvidia_smi", 1, "the GPU", lambda ctx: [[
        "nvidia-smi", "--query-gpu=name,memory.total,memory.free,driver_version",
        "--format=csv,noheader"]], est.GPU_FIXED_S["nvidia_smi"], needs=(), cuda_only=True,
         verify=verify_smi),
    Step("cuda_tests", 1, "pytest -m cuda", lambda ctx: [[
        ctx.py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda",
        *cuda_test_files()]], est.GPU_FIXED_S["cuda_tests"], cuda_only=True, in_repo=True,
         verify=verify_pytest),
    Step("model", 2, "the bench model (random weights, untrained: renders noise)",
         lambda ctx: [[ctx.py, "-c", MODEL, f"{ctx.scale.model:g}"]],
         est.GPU_FIXED_S["model"], verify=verify_model),
    e2e_step("e2e_eager", 2, "e2e, eager, keep_loaded, B=1 and 8 (dry run: 1 and 2)", lambda s: ("eager",),
             lambda s: s.batches, "keep_loaded", lambda s: s.minutes),
    e2e_step("e2e_cuda_graphs", 2, "e2e, CUDA graphs, keep_loaded, B=1 and 8",
             lambda s: ("cuda_graphs",), lambda s: s.batches, "keep_loaded",
             lambda s: s.minutes, cuda_only=True),
    Step("catalogue", 3, "e2e, different songs in one batch", catalogue_commands,
         est.e2e_s(("cuda_graphs",), (8,), ("keep_loaded",), GPU.minutes),
         needs=("install", "model")),
    Step("render", 3, "khala render of a small manifest", render_commands,
         est.GPU_FIXED_S["render"], needs=("install", "model"), verify=verify_render),
    Step("doctor", 3, "khala doctor", lambda ctx: [[
        ctx.py, "-m", "khala_cli", "doctor", "--model", str(ctx.model_dir), "--output-dir",
        str(ctx.work), "--json"]], est.GPU_FIXED_S["doctor"], needs=("install", "model"),
         verify=verify_doctor),
    e2e_step("e2e_one_shot", 4, "e2e, one_shot, the largest batch", lambda s: s.gpu_paths,
             lambda s: s.batches[-1:], "one_shot", lambda s: s.minutes),
    e2e_step("e2e_long", 4, "e2e, longer songs at the largest batch", lambda s: s.gpu_paths,
             lambda s: s.batches[-1:], "keep_loaded", lambda s: s.long_minutes),
    e2e_step("e2e_compile", 4, "e2e, torch.compile", lambda s: ("compile",),
             lambda s: s.batches, "keep_loaded", lambda s: s.minutes),
)


