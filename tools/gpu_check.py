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
given a limit a little above BUDGET_S (a step stopped at the budget takes up to 10 s to end):
450 s leaves a 15-minute window room for its start and one rerun with STEPS.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import gpu_estimates as est
import gpu_results as res
from gpu_steps import ROOT, SKIP_CUDA, STEPS, Command, Ctx, Step


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
