"""`khala convert` and `khala doctor` (implemented with the weights layer).

Importing this module imports neither torch nor megatron: `convert` loads the weights layer
when it runs (it is a one-off, torch-using command, like `bench`); `doctor` probes torch and
CUDA in a child process, so a broken CUDA install is reported rather than crashing it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from khala_cli.cli import cli

EXIT_OK, EXIT_MODEL = 0, 3


@cli.command("convert")
@click.argument("src", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("dst", required=False, type=click.Path(path_type=Path))
@click.option("--iteration", metavar="N|backbone=N,superres=M",
              help="Checkpoint iteration to convert (default: the latest of each, from "
                   "latest_checkpointed_iteration.txt).")
@click.option("--tokenizer", type=click.Path(exists=True, path_type=Path),
              help="tokenizer.json, or the folder holding it (default: SRC/models/Tokenizer/).")
@click.option("--name", help="Model name recorded in model.json (default: DST's name).")
@click.option("--trust-checkpoint", is_flag=True,
              help="Unpickle the checkpoints without khala's allow-list. Only for files you "
                   "trust: a pickle can run code.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def convert_cmd(src: Path, dst: Path | None, iteration: str | None, tokenizer: Path | None,
                name: str | None, trust_checkpoint: bool, quiet: bool) -> None:
    """Convert the Khala download at SRC into a model directory DST (default: SRC-khala).

    SRC holds checkpoints/backbone/ and checkpoints/superresolution/ (Megatron torch_dist),
    checkpoints/dac_rvq_*.ckpt (Lightning) and models/Tokenizer/tokenizer.json. Only the
    model weights are read (never the optimizer state); DST appears only when complete.
    Needs megatron-core (pip install 'khala-cli[convert]').
    """
    from rich.console import Console

    from khala_cli.weights.convert import CONVERT_ERRORS, RichProgress, convert

    err = Console(stderr=True, highlight=False, soft_wrap=True)
    try:
        if quiet:
            report = convert(src, dst, iteration=iteration, trust=trust_checkpoint,
                             tokenizer=tokenizer, name=name)
        else:
            with RichProgress(console=err) as bars:
                report = convert(src, dst, iteration=iteration, trust=trust_checkpoint,
                                 tokenizer=tokenizer, name=name, progress=bars)
    except CONVERT_ERRORS as exc:
        click.echo(f"error: {exc}", err=True)
        click.echo("nothing was written.", err=True)
        sys.exit(EXIT_MODEL)
    info = report.info
    its = ", ".join(f"{k} iter {v}" for k, v in report.iterations.items())
    click.echo(f"converted {report.model_dir} ({its}) in {report.seconds:.0f} s")
    click.echo(f"fingerprint {info.fingerprint}")
    click.echo(f"use it with `model: {report.model_dir}` in a manifest, "
               f"or check it with `khala doctor --model {report.model_dir}`")
