"""`khala bench` (implemented with the engine; torch is imported only when it runs)."""

from __future__ import annotations

import json

import click

from khala_cli.cli import cli


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
def bench(as_json: bool, device: str, threads: int | None, tiny: bool, review: bool,
          takes: int) -> None:
    """Measure the engine against naive baselines on a random mid-size model.

    Prints our backbone decode vs a naive decode, batch 8 vs batch 1, and super-res at the
    real length vs the reference's padding (ratios measured in the same run).
    """
    if review:
        _review(as_json, takes)
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
    ]
    click.echo(f"device {result['device']}, {result['threads']} threads, "
               f"{result['params'] / 1e6:.1f} M parameters")
    for name, ratio, target, detail in rows:
        mark = "ok" if ratio >= target else "below target"
        click.echo(f"  {name:<20} {ratio:6.2f}x  (target {target:.2f}x, {mark})  {detail}")


def _review(as_json: bool, takes: int) -> None:
    from khala_cli.review_bench import run

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
