"""`khala bench` (implemented with the engine; torch is imported only when it runs)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import click

from khala_cli import model_numbers as mn
from khala_cli.cli import cli
from khala_cli.review.bench import run
from khala_cli.runner import devices as dv

# torch and the engine are imported inside the functions that run the engine benchmarks:
# importing this module (every `khala` command, `--help` included) must never load torch.


@cli.command("bench")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (and nothing else on stdout).")
@click.option("--device", default="cpu", show_default=True, help="Torch device to measure on.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="CPU threads for torch (default: torch's choice, one per core).")
@click.option("--tiny", is_flag=True, hidden=True, help="A tiny config, for tests.")
@click.option("--review", is_flag=True, help="Instead: the take analysis per audio minute, and "
              "the review page of --takes synthetic takes (build, size, load in Chromium).")
@click.option("--takes", type=click.IntRange(min=1), default=10_000, show_default=True,
              help="Takes on the page, with --review.")
@click.option("--e2e", is_flag=True, help="Instead: complete songs through the render path on "
              "a model of the real shape with random weights (B=1 and 8, both residencies, "
              "every decode path).")
@click.option("--scale", type=click.FloatRange(0.01, 1.0), default=None,
              help="With --e2e: shrink the model (default 1 on CUDA, 0.125 on the CPU).")
@click.option("--minutes", type=click.FloatRange(0.01, 9.0), default=None,
              help="With --e2e: song length (default 3 on CUDA, 0.25 on the CPU).")
@click.option("--dtype", default=None, help="With --e2e: float32, bfloat16, or both "
              "(float32,bfloat16) to compare in one run (default bf16 on CUDA, fp32 on CPU).")
@click.option("--batches", default="1,8", show_default=True, help="With --e2e: batch sizes.")
@click.option("--paths", default=None, help="With --e2e: decode paths to run, e.g. eager,compile "
              "(default: every path the device has).")
@click.option("--residencies", default="keep_loaded,one_shot", show_default=True,
              help="With --e2e: residencies to run.")
@click.option("--eager-codes", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="With --e2e: a folder where eager runs keep their tokens, the reference of "
              "later runs of the other paths (which then need no eager run).")
@click.option("--results-jsonl", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="With --e2e: append each run's result to this file, one JSON line, the "
              "moment the run ends.")
def bench(as_json: bool, device: str, threads: int | None, tiny: bool, review: bool,
          takes: int, e2e: bool, scale: float | None, minutes: float | None,
          dtype: str | None, batches: str, paths: str | None, residencies: str,
          eager_codes: Path | None, results_jsonl: Path | None) -> None:
    """Measure the engine against naive baselines on a random mid-size model.

    Prints our backbone decode vs a naive decode, batch 8 vs batch 1, super-res at the
    real length vs the reference's padding, a catalogue in one batch vs one song at a time,
    and a re-roll from the middle of a song vs its full render (ratios measured in the same
    run).
    """
    if review:
        _review(as_json, takes)
        return
    if e2e:
        _e2e(as_json, device, threads, scale, minutes, dtype, batches, paths,
             E2eFiles(_names(residencies, "--residencies", dv.RESIDENCIES), eager_codes,
                      results_jsonl))
        return
    from khala_cli.engine.bench import MID, TINY, run_bench

    def log(msg: str) -> None:
        click.echo(msg, err=True)

    result = run_bench(TINY if tiny else MID, device=device, threads=threads,
                       log=None if as_json else log)
    if as_json:
        click.echo(json.dumps(result, sort_keys=True))
        return
    t = result["targets"]
    rows = [
        ("decode vs naive", result["decode_vs_naive"], t["decode_vs_naive"],
         f"{result['backbone_tokens_per_s']:.1f} vs {result['naive_tokens_per_s']:.1f} tokens/s"),
        (f"batch {result['batch']} vs 1", result["batch8_vs_batch1"], t["batch8_vs_batch1"],
         f"{result['batch8_tokens_per_s']:.1f} vs {result['batch1_tokens_per_s']:.1f} tokens/s"),
        ("super-res vs padded", result["superres_vs_padded"], t["superres_vs_padded"],
         f"{result['superres_pass_s'] * 1e3:.0f} vs {result['superres_padded_pass_s'] * 1e3:.0f} "
         f"ms/pass, S {result['superres_seq_len']} vs {result['superres_padded_len']}"),
        (f"catalogue {result['batch']} vs 1", result["catalogue_b8_vs_b1"],
         t["catalogue_b8_vs_b1"], _catalogue_detail(result)),
    ]
    click.echo(f"device {result['device']}, {result['threads']} threads, "
               f"{result['params'] / 1e6:.1f} M parameters")
    for name, ratio, target, detail in rows:
        mark = "ok" if ratio >= target else "below target"
        click.echo(f"  {name:<20} {ratio:6.2f}x  (target {target:.2f}x, {mark})  {detail}")
    click.echo(f"  {'re-roll vs full':<20} {result['reroll_vs_full']:6.2f}x  {_reroll_detail(result)}")


def _reroll_detail(result: dict) -> str:
    saved, total = result["reroll_steps_saved"], result["reroll_tokens"]
    return (f"wall time of a full render over a re-roll from its middle; backbone steps saved "
            f"{saved} of {total} ({saved / total:.0%}, replayed in chunks: "
            f"{result['reroll_replay_chunks']}), backbone "
            f"{result['reroll_backbone_vs_full']:.2f}x; super-res and decode still cover the "
            f"whole song; the parent's take came back "
            f"{'exactly' if result['reroll_equal_parent'] else 'DIFFERENT'}")


def _catalogue_detail(result: dict) -> str:
    spm = result["catalogue_songs_per_minute"]
    b = str(result["batch"])
    return (f"{spm[b]:.1f} vs {spm['1']:.1f} songs/min over {result['catalogue_songs']} songs, "
            f"tokens {'equal' if result['catalogue_tokens_equal'] else 'DIFFER'}; "
            f"different prompts {result['catalogue_mixed_vs_sweep']:.2f}x a sweep's tokens/s, "
            f"per-row settings cost {result['catalogue_settings_cost']:.2f}x")


def _review(as_json: bool, takes: int) -> None:
    result = run(takes)
    if as_json:
        click.echo(json.dumps(result, sort_keys=True))
        return
    click.echo(f"analysis: {result['analysis_s_per_audio_minute']:.3f} s per audio minute "
               f"({result['analysis_realtime_factor']:.0f}x real time)")
    load = result.get("page_load_event_s")
    click.echo(f"review page of {result['takes']} takes: built in {result['page_build_s']:.2f} s, "
               f"{result['page_mb']:.1f} MB; "
               + (f"Chromium: DOM ready {result['page_dom_ready_s']:.2f} s, load event "
                  f"{load:.2f} s" if load is not None else "load time not measured (no Chromium)"))


@dataclass(frozen=True)
class E2eFiles:
    """The e2e options that say which residencies run and where their results go."""

    residencies: tuple[str, ...]
    eager_codes: Path | None = None
    results_jsonl: Path | None = None


def _names(text: str, option: str, allowed: tuple[str, ...]) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    bad = [n for n in names if n not in allowed]
    if bad or not names:
        raise click.BadParameter(f"{(bad or [text])[0]!r}: use {' or '.join(allowed)}",
                                 param_hint=option)
    return names


def append_result(path: Path, row: dict) -> None:
    """One run's result as one JSON line, on disk before the next run starts: a bench killed
    later keeps it."""
    label = (f"{row['dtype']} B={row['batch']} {row['residency']} {row['path']} "
             f"{row['minutes']:g} min")
    line = json.dumps({"step": "e2e run", "run": label, "status": "pass",
                       "seconds": row["wall_s"], "figures": row}, sort_keys=True)
    with path.open("a") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())


def _e2e(as_json: bool, device: str, threads: int | None, scale: float | None,
         minutes: float | None, dtype: str | None, batches: str, paths: str | None,
         files: E2eFiles) -> None:
    import torch

    from khala_cli.engine.bench_e2e import model_dir, run_e2e

    if threads:
        torch.set_num_threads(threads)
    cuda = device.startswith("cuda")
    scale = scale if scale is not None else (1.0 if cuda else 0.125)
    minutes = minutes if minutes is not None else (3.0 if cuda else 0.25)
    sizes = tuple(int(b) for b in batches.split(",") if b.strip())

    mdir = model_dir(scale)  # built here on first use, before the runs

    def log(row: dict) -> None:
        row["model_peak_gb"] = modelled_peaks(mdir, row, minutes)
        if files.results_jsonl:
            append_result(files.results_jsonl, row)
        if as_json:
            return
        mem = " ".join(f"{k} {v:.2f}/{row['model_peak_gb'].get(k, 0):.2f}"
                       for k, v in row["peak_mem_gb"].items())
        click.echo(f"  {row['dtype']:<8} B={row['batch']} {row['residency']:<11} {row['path']:<11} "
                   f"backbone {row['backbone_s']:7.2f} s  super-res {row['superres_s']:6.2f} s  "
                   f"decode {row['decode_s']:6.2f} s  load {row['load_s']:5.2f} s | "
                   f"{row['tokens_per_s_row']:7.1f} tok/s/row {row['tokens_per_s_all']:8.1f} "
                   f"in all | peak GB measured/modelled {mem} | {row['songs_per_minute']:.2f} songs/min | "
                   f"tokens equal eager: {row['tokens_equal_eager']}")

    if not as_json:
        click.echo(f"e2e bench on {device}: scale {scale:g}, {minutes:g}-minute songs "
                   f"(random weights: noise), batches {sizes}")
    only = tuple(p.strip() for p in paths.split(",")) if paths else None
    dtypes = tuple(d.strip() for d in dtype.split(",")) if dtype else (None,)
    bad = [d for d in dtypes if d not in (None, "float32", "bfloat16")]
    if bad:
        raise click.BadParameter(f"{bad[0]!r}: use float32, bfloat16 or both", param_hint="--dtype")
    result = run_e2e(device=device, scale=scale, minutes=minutes, dtypes=dtypes, batches=sizes,
                     residencies=files.residencies, only_paths=only,
                     eager_dir=files.eager_codes, log=log)
    if as_json:
        click.echo(json.dumps(result, sort_keys=True))
        return
    for cat in result["catalogue"]:
        spm = cat["songs_per_minute"]
        click.echo(f"  catalogue {cat['dtype']}: {cat['songs']} songs of {cat['minutes']:g} min, "
                   f"one seed each: {spm[str(cat['songs'])]:.2f} songs/min in one batch vs "
                   f"{spm['1']:.2f} one at a time = {cat['ratio']:.2f}x | tokens equal: "
                   f"{cat['tokens_equal']}")


def modelled_peaks(mdir: Path, row: dict, minutes: float) -> dict[str, float]:
    """The runner's memory model (runner/devices.py) of one e2e run, per stage in GB, beside
    the measured peaks: CUDA allocations (the model's HEADROOM left out), or on the CPU the
    process's resident set (which also holds Python and torch)."""
    fp = dv.model_footprint(mdir, dtype_bytes=4 if row["dtype"] == "float32" else 2,
                            tokens=round(mn.TOKENS_PER_MINUTE * minutes))
    peaks = fp.stage_peaks(row["residency"], row["batch"])
    return {stage: round(peaks[of] / 1e9, 2) for stage, of in
            (("backbone", "backbone"), ("superres", "superres"), ("decode", "codec"))}
