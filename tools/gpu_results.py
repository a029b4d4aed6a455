"""gpu-check's results file and the summary built from it alone.

`$OUT/results.jsonl` holds one JSON object a line, appended the moment it exists:
    {"step": "plan", ...}                  the run's steps and estimates, written first
    {"step": NAME, "status": "pass"|"fail"|"skip", "seconds": S, "estimate": E,
     "figures": {...}, "reason": "..."}    one per step, when it ends or is skipped
    {"step": "e2e run", "run": LABEL, "status": "pass", "seconds": S, "figures": ROW}
                                           one per e2e render, written by `khala bench --e2e
                                           --results-jsonl` as each render ends
A run killed at any point leaves every line written before; the summary says which steps
have none.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

RESULTS = "results.jsonl"
SUMMARY = "summary.txt"
RUN_STEP = "e2e run"


def append(out: Path, record: dict) -> None:
    """Add one result line, on disk before this returns."""
    with (out / RESULTS).open("a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read(out: Path) -> tuple[list[dict], int]:
    """The result lines, and how many could not be read (a line cut by a kill)."""
    records, bad = [], 0
    for line in (out / RESULTS).read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            bad += 1
            continue
        if isinstance(rec, dict) and "step" in rec:
            records.append(rec)
        else:
            bad += 1
    return records, bad


def _key(row: dict) -> tuple:
    return row["dtype"], row["minutes"], row["batch"], row["residency"]


def proven_paths(runs: list[dict]) -> tuple[list[str], list[str]]:
    """The decode paths proven on CUDA, fastest first, and why each other path is not.

    Proven: every CUDA run of the path gave eager's tokens, and each was faster than eager's
    run of the same dtype, song length, batch size and residency (backbone tokens/s per row,
    the figure the decode path changes), with at least one such twin.
    """
    cuda = [r for r in runs if r.get("device_type") == "cuda"]
    eager = {_key(r): r["tokens_per_s_row"] for r in cuda if r["path"] == "eager"}
    proven, why = [], []
    for path in sorted({r["path"] for r in cuda} - {"eager"}):
        mine = [r for r in cuda if r["path"] == path]
        unequal = [r for r in mine if r.get("tokens_equal_eager") is not True]
        twins = [(r, eager[_key(r)]) for r in mine if _key(r) in eager]
        slower = [(r, e) for r, e in twins if r["tokens_per_s_row"] <= e]
        if unequal:
            r = unequal[0]
            said = "unknown (no eager run to compare)" if r.get("tokens_equal_eager") is None \
                else "not equal to eager's"
            why.append(f"{path}: tokens {said} at B={r['batch']} {r['residency']}")
        elif not twins:
            why.append(f"{path}: no eager run of the same batch and length to compare speed")
        elif slower:
            r, e = slower[0]
            why.append(f"{path}: not faster than eager at B={r['batch']} {r['residency']} "
                       f"({r['tokens_per_s_row']:.0f} vs {e:.0f} tok/s/row)")
        else:
            gain = math.exp(sum(math.log(r["tokens_per_s_row"] / e) for r, e in twins)
                            / len(twins))
            proven.append((gain, path))
    return [p for _, p in sorted(proven, reverse=True)], why


def _figures(figures: dict, width: int = 110) -> str:
    """A step's figures on one line: key=value, nested ones as compact JSON."""
    text = " ".join(f"{k}={v if isinstance(v, (str, int, float, bool)) else json.dumps(v)}"
                    for k, v in figures.items())
    return text if len(text) <= width else text[:width - 3] + "..."


def _step_lines(steps: list[dict], plan: dict | None) -> list[str]:
    lines = [f"  {'step':<17} {'status':<6} {'seconds':>8} {'estimate':>8}  note"]
    for s in steps:
        est = "-" if s.get("estimate") is None else f"{s['estimate']:.0f}"
        note = s.get("reason") or _figures(s.get("figures") or {})
        lines.append(f"  {s['step']:<17} {s['status']:<6} {s.get('seconds') or 0:8.1f} "
                     f"{est:>8}  {note}")
    done = {s["step"] for s in steps}
    missing = [n for n, _ in plan["figures"]["steps"] if n not in done] if plan else []
    if missing:
        lines.append(f"  no result (the run stopped before them): {', '.join(missing)}")
    return lines


def _run_lines(runs: list[dict]) -> list[str]:
    if not runs:
        return ["  e2e: no render measured"]
    devices = sorted({r["device"] for r in runs})
    lines = [f"  e2e renders on {', '.join(devices)} (random weights: noise); peak GB "
             "measured/modelled of the backbone, super-res and decode stages:",
             f"  {'dtype':<8} {'min':>5} {'B':>2} {'residency':<11} {'path':<11} "
             f"{'songs/min':>9} {'tok/s/row':>9} {'warmup s':>8}  {'peak GB':<23} equal"]
    for r in runs:
        model, peak = r.get("model_peak_gb", {}), r["peak_mem_gb"]
        mem = " ".join(f"{peak.get(k, 0):.1f}/{model.get(k, 0):.1f}"
                       for k in ("backbone", "superres", "decode"))
        lines.append(f"  {r['dtype']:<8} {r['minutes']:>5g} {r['batch']:>2} "
                     f"{r['residency']:<11} {r['path']:<11} {r['songs_per_minute']:9.2f} "
                     f"{r['tokens_per_s_row']:9.1f} {r['warmup_s']:8.1f}  {mem:<23} "
                     f"{r['tokens_equal_eager']}")
    return lines


def summary(out: Path) -> tuple[str, bool]:
    """The summary text of `out`'s results file, and whether the run passed: every step it
    planned has a result and none failed."""
    records, bad = read(out)
    plan = next((r for r in records if r["step"] == "plan"), None)
    steps = [r for r in records if r["step"] not in ("plan", RUN_STEP)]
    runs = [r["figures"] for r in records if r["step"] == RUN_STEP]
    head = "gpu-check summary"
    if plan:
        f = plan["figures"]
        head += (f" ({'CPU dry run' if f['dry_run'] else 'GPU'}, budget {f['budget_s']:.0f} s"
                 f"{', FULL=1' if f['full'] else ''})")
    lines = [f"== {head}, from {out / RESULTS}"]
    lines += _step_lines(steps, plan)
    if bad:
        lines.append(f"  {bad} unreadable line(s) skipped (cut by a kill)")
    lines += _run_lines(runs)
    proven, why = proven_paths(runs)
    if not any(r.get("device_type") == "cuda" for r in runs):
        lines.append("  proven decode paths on CUDA: none (no render ran on CUDA)")
    else:
        lines.append("  proven decode paths on CUDA (tokens equal to eager's on every run, "
                     f"and faster): {', '.join(proven) or 'none'}")
        lines += [f"    {w}" for w in why]
    lines.append(f"  PROVEN_ON_CUDA = {tuple(proven)!r}  # for khala_cli/runner/devices.py"
                 + ("" if proven else " (unchanged: eager stays the CUDA default)"))
    planned = {n for n, _ in plan["figures"]["steps"]} if plan else set()
    passed = bool(plan) and planned <= {s["step"] for s in steps} \
        and not any(s["status"] == "fail" for s in steps)
    return "\n".join(lines) + "\n", passed


def write_summary(out: Path) -> str:
    """Rebuild `out`/summary.txt from the results file (atomically) and return its text."""
    text, _ = summary(out)
    tmp = out / f".{SUMMARY}.tmp"
    tmp.write_text(text)
    tmp.replace(out / SUMMARY)
    return text
