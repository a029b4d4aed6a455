#!/usr/bin/env python3
"""`tools/gpu-check`: accept or reject a machine with an NVIDIA GPU inside a short window.

Steps run in the order of what they prove, each after printing its estimate; one that would
not fit in what is left of BUDGET_S (default 420: 7 minutes on one H100 or H200, from a
stock PyTorch image, the install included) is skipped, saying so, and one that runs past what
is left is stopped there. Every result is appended to $OUT/results.jsonl the moment it exists
(the e2e bench appends each render's), and $OUT/summary.txt is rebuilt from that file after
each step, so a run killed at any point keeps every figure measured until then.

    1. install      the wheels of $WHEELS (into $WORK/site), import torch, torchaudio, dac
       nvidia_smi   the GPU, its memory and driver
       cuda_tests   pytest -m cuda
    2. model        the e2e bench model at full size (random weights: it renders noise)
       e2e_eager, e2e_cuda_graphs
                    khala bench --e2e: 1-minute songs, B=1 and B=8, keep_loaded: songs/min,
                    backbone tokens/s/row, peak memory against the memory model, tokens
                    equal to eager's
    3. catalogue    different songs in one batch (skipped until the bench offers it)
       render       khala render of a small manifest on that model (--devices 0)
       doctor       khala doctor on that model
    4. e2e_one_shot, e2e_long (3-minute songs), e2e_compile: only when time is left, or FULL=1

    tools/gpu-check                  # on the GPU machine (make gpu-check)
    tools/gpu-check --dry-run        # every step on the CPU at a tiny scale (CI runs it)
    tools/gpu-check --plan           # the steps and their estimates, nothing run
    tools/gpu-check --summary OUT    # the summary again, from OUT/results.jsonl alone

Environment: BUDGET_S (420; 110 with --dry-run), FULL=1 (run every step, no budget), STEPS
(a comma list: run these alone, e.g. to finish in a second window what the first left), OUT
(gpu-check-out), WORK (/tmp/khala-gpu-check: the bench model, eager's tokens, the render,
the installed wheels), WHEELS (a folder of wheels to install first), PYTHON (python3:
the interpreter of every step).

The carry, built here once (~31 MiB: it travels with the working tree):
    tools/gpu-wheels                 # writes .whl/ and git-ignores it
and the one command line on the GPU machine, with .whl carried:
    WHEELS=.whl BUDGET_S=420 tools/gpu-check
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
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


# ---- the steps ----------------------------------------------------------------------------

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
    import re

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


# ---- running them -------------------------------------------------------------------------

class Stopped(Exception):
    """A signal asked the run to stop (the step in flight is stopped with it)."""


def _stop(signum: int, _frame) -> None:
    raise Stopped(signal.Signals(signum).name)


def kill_group(proc: subprocess.Popen) -> None:
    """Stop a step's process group: SIGTERM, then SIGKILL if it lingers."""
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(wait)
            return
        except (ProcessLookupError, subprocess.TimeoutExpired):
            continue


def call(ctx: Ctx, argv: Command, cwd: Path, timeout: float | None) -> int | None:
    """Run one command of a step into the log, in its own process group; None if it was
    stopped at `timeout`."""
    with ctx.log.open("a") as log:
        log.write(f"$ {shlex.join(argv)}\n")
        log.flush()
        try:
            proc = subprocess.Popen(argv, cwd=cwd, env=ctx.env, stdout=log,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    preexec_fn=os.setpgrp)
        except OSError as e:  # nvidia-smi not on PATH, say
            log.write(f"{e}\n")
            return 127
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            kill_group(proc)
            return None
        except BaseException:
            kill_group(proc)
            raise


def plan_step(ctx: Ctx, step: Step, estimate: float) -> list[Command] | str:
    """The step's commands, or why it is skipped: not chosen, an earlier step it needs did
    not pass, CUDA only in a dry run, not offered yet, or more than the budget has left."""
    if ctx.only is not None and step.name not in ctx.only:
        return "not in STEPS"
    missing = [n for n in step.needs if ctx.status.get(n) not in ("pass", None)
               and (ctx.only is None or n in ctx.only)]
    if missing:
        return f"needs {missing[0]}, which did not pass"
    if step.cuda_only and ctx.dry:
        return SKIP_CUDA
    cmds = step.commands(ctx)
    left = ctx.left()
    if isinstance(cmds, list) and not ctx.full and estimate > left:
        return f"needs ~{estimate:.0f} s, {max(left, 0):.0f} s left of BUDGET_S={ctx.budget:g}"
    return cmds


def record(ctx: Ctx, step: Step, status: str, seconds: float, estimate: float,
           figures: dict | None = None, reason: str | None = None) -> None:
    ctx.status[step.name] = status
    rec = {"step": step.name, "tier": step.tier, "status": status,
           "seconds": round(seconds, 1), "estimate": estimate, "figures": figures or {}}
    if reason:
        rec["reason"] = reason
    res.append(ctx.out, rec)
    res.write_summary(ctx.out)
    print(f"   {status}{f': {reason}' if reason else ''} ({seconds:.0f} s)", flush=True)


def run_step(ctx: Ctx, step: Step) -> None:
    estimate = step.estimate(ctx)
    print(f"== {step.name}: {step.what} (estimate ~{estimate:.0f} s, "
          f"{max(ctx.left(), 0):.0f} s left)", flush=True)
    t0 = time.monotonic()
    cmds = plan_step(ctx, step, estimate)
    if isinstance(cmds, str):
        record(ctx, step, "skip", time.monotonic() - t0, estimate, reason=cmds)
        return
    before = len(res.read(ctx.out)[0])
    offset = ctx.log.stat().st_size if ctx.log.exists() else 0
    try:
        for argv in cmds:
            rc = call(ctx, argv, ROOT if step.in_repo else ctx.work,
                      None if ctx.full else max(ctx.left(), 1.0))
            if rc != 0:
                break
    except Stopped as why:
        record(ctx, step, "fail", time.monotonic() - t0, estimate,
               reason=f"stopped by {why} mid-way")
        raise
    seconds = time.monotonic() - t0
    text = ctx.log.read_text(errors="replace")[offset:]
    for line in text.strip().splitlines()[-3:]:
        print(f"   | {line[:160]}")
    if rc is None:
        record(ctx, step, "fail", seconds, estimate,
               reason=f"stopped when the budget ran out (estimate ~{estimate:.0f} s)")
        return
    figures, problem = step.verify(ctx, text, before)
    if rc != 0:
        problem = f"exit code {rc} (log: {ctx.log})"
    record(ctx, step, "fail" if problem else "pass", seconds, estimate, figures, problem)


def fresh(out: Path) -> None:
    """Start a new results file and log; a previous run's move aside."""
    out.mkdir(parents=True, exist_ok=True)
    for name in (res.RESULTS, "gpu-check.log"):
        if (out / name).exists():
            (out / name).replace(out / f"{name}.prev")


def context(dry: bool) -> Ctx:
    work = Path(os.environ.get("WORK") or "/tmp/khala-gpu-check").resolve()
    work.mkdir(parents=True, exist_ok=True)
    path = [str(ROOT), os.environ.get("PYTHONPATH", "")]
    if os.environ.get("WHEELS"):
        path.insert(0, str(work / "site"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in path if p),
           "PYTHONUNBUFFERED": "1"}
    if dry:  # torch's threads thrash on 2 shared cores: e2e_eager took 73 s, 16 s on one
        env.setdefault("OMP_NUM_THREADS", "1")
    budget = float(os.environ.get("BUDGET_S") or (est.DRY_BUDGET_S if dry else 420))
    only = os.environ.get("STEPS")
    names = {s.name for s in STEPS}
    unknown = sorted(set(only.split(",")) - names) if only else []
    if unknown:
        raise SystemExit(f"STEPS: no step {unknown[0]!r} (steps: {', '.join(names)})")
    return Ctx(out=Path(os.environ.get("OUT") or "gpu-check-out").resolve(), work=work,
               dry=dry, full=os.environ.get("FULL") == "1", budget=budget,
               py=sys.executable, env=env,
               only=frozenset(only.split(",")) if only else None)


def print_plan(ctx: Ctx) -> None:
    total = 0.0
    for step in STEPS:
        total += step.estimate(ctx)
        print(f"  {step.tier}  {step.name:<16} ~{step.estimate(ctx):5.0f} s  (total "
              f"{total:5.0f})  {step.what}")
    print(f"  budget {ctx.budget:g} s{', FULL=1: every step runs' if ctx.full else ''}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="tools/gpu-check", description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="every step on the CPU, tiny")
    ap.add_argument("--plan", action="store_true", help="print the steps, run nothing")
    ap.add_argument("--summary", metavar="OUT", type=Path, help="rebuild OUT's summary")
    args = ap.parse_args(argv)
    if args.summary:
        if not (args.summary / res.RESULTS).exists():
            print(f"{args.summary / res.RESULTS}: no such file", file=sys.stderr)
            return 2
        text, passed = res.summary(args.summary)
        print(text, end="")
        return 0 if passed else 1
    ctx = context(args.dry_run)
    if args.plan:
        print_plan(ctx)
        return 0
    fresh(ctx.out)
    print(f"gpu-check: {'CPU dry run' if ctx.dry else 'GPU'}, budget {ctx.budget:g} s"
          f"{' (FULL=1: no limit)' if ctx.full else ''}; results {ctx.out / res.RESULTS}, "
          f"log {ctx.log}, work {ctx.work}", flush=True)
    res.append(ctx.out, {"step": "plan", "status": "pass", "seconds": 0.0,
                         "estimate": sum(s.estimate(ctx) for s in STEPS),
                         "figures": {"dry_run": ctx.dry, "full": ctx.full,
                                     "budget_s": ctx.budget, "steps": [
                                         [s.name, s.estimate(ctx)] for s in STEPS]}})
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, _stop)
    code = 0
    try:
        for step in STEPS:
            run_step(ctx, step)
    except Stopped as why:
        print(f"gpu-check stopped by {why}", file=sys.stderr)
        code = 128 + getattr(signal, str(why)).value
    text, passed = res.summary(ctx.out)
    res.write_summary(ctx.out)
    print()
    print(text, end="")
    return code or (0 if passed else 1)


if __name__ == "__main__":
    sys.exit(main())
