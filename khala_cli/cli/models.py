"""`khala convert` and `khala doctor` (implemented with the weights layer).

Importing this module imports neither torch nor megatron: the weights layer imports them only
inside the functions that convert (`convert` is a one-off, torch-using command, like `bench`);
`doctor` probes torch and CUDA in a child process, so a broken CUDA install is reported rather
than crashing it.
"""

from __future__ import annotations

from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape

from khala_cli import exit_codes
from khala_cli.cli import Failure, cli
from khala_cli.outputs import bytes_per_take, ffmpeg_exe
from khala_cli.runner import devices as dv
from khala_cli.runner.devices import discover_gpus
from khala_cli.weights import doctor
from khala_cli.weights.convert import CONVERT_ERRORS, RichProgress, convert
from khala_cli.weights.doctor import DevicePlan
from khala_cli.weights.resolve import KHALA_MAC


@cli.command("convert")
@click.argument("src", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("dst", required=False, type=click.Path(path_type=Path))
@click.option("--iteration", metavar="N|backbone=N,superres=M",
              help="Megatron checkpoint iteration to convert (default: the latest of each, "
                   "from latest_checkpointed_iteration.txt).")
@click.option("--tokenizer", type=click.Path(exists=True, path_type=Path),
              help="tokenizer.json, or the folder holding it (default: SRC/models/Tokenizer/, "
                   "or a Khala checkout's models/Tokenizer/ beside SRC).")
@click.option("--name", help="Model name recorded in model.json (default: DST's name).")
@click.option("--trust-checkpoint", is_flag=True,
              help="Unpickle the checkpoints without khala's allow-list. Only for files you "
                   "trust: a pickle can run code.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def convert_cmd(src: Path, dst: Path | None, iteration: str | None, tokenizer: Path | None,
                name: str | None, trust_checkpoint: bool, quiet: bool) -> None:
    """Convert the Khala download at SRC into a model directory DST (default: SRC-khala).

    SRC is either download. The official one holds checkpoints/backbone/ and
    checkpoints/superresolution/ (Megatron torch_dist), checkpoints/dac_rvq_*.ckpt
    (Lightning) and models/Tokenizer/tokenizer.json; it needs megatron-core
    (pip install 'khala-cli[convert]'), and only the model weights are read, never the
    optimizer state. The Khala-mac one holds khala_backbone.safetensors,
    khala_superres.safetensors, decoder_weights.pt, backbone_megatron_args.json,
    superres_megatron_args.json and decoder_config.yaml, and no tokenizer (pass --tokenizer
    when it is not beside it). DST appears only when complete.
    """
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
        raise Failure(exit_codes.MODEL, f"error: {exc}", "nothing was written.") from None
    info = report.info
    its = ("Khala-mac download" if report.layout == KHALA_MAC
           else ", ".join(f"{k} iter {v}" for k, v in report.iterations.items()))
    click.echo(f"converted {report.model_dir} ({its}) in {report.seconds:.0f} s")
    click.echo(f"fingerprint {info.fingerprint}")
    click.echo(f"use it with `model: {report.model_dir}` in a manifest, "
               f"or check it with `khala doctor --model {report.model_dir}`")


def _planner():
    """The runner's own memory defaults, so doctor and render agree on what a GPU holds."""
    def plan(total: int, free: int, model: Path) -> DevicePlan:
        fp = dv.model_footprint(model)
        dev = dv.Device(name="cuda:0", kind="cuda", index=0, memory_total=total, memory_free=free)
        residency = dv.default_residency(dev, fp)
        return DevicePlan(
            residency=residency,
            batch_size=dv.default_batch_size(dev, fp, residency),
            need_bytes=dv.needs(fp, residency, 1),
            one_shot_bytes=dv.needs(fp, "one_shot", 1),
            why=fp.explain(),
        )

    return plan


@cli.command("doctor")
@click.option("--model", "model", type=click.Path(path_type=Path),
              help="A model directory to check (completeness, fingerprints, tensor shapes).")
@click.option("--output-dir", type=click.Path(path_type=Path), default=Path("."), show_default=True,
              help="Where takes will be written (free space, write access).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of lines.")
def doctor_cmd(model: Path | None, output_dir: Path, as_json: bool) -> None:
    """Check that this machine can render: Python, torch, CUDA devices and their free memory,
    ffmpeg, the model directory, the residency and batch size each device can hold, the decode
    path renders get, disk space.

    Each line is ok, warning or error with what to do. Exits 0 when rendering can work, 3 when
    an error stands in the way. Torch and CUDA are probed in a child process.
    """
    findings = doctor.diagnose(
        model, output_dir, find_ffmpeg=ffmpeg_exe, gpus_seen=len(discover_gpus()),
        planner=_planner(), decode=dv.default_decode_path, take_bytes=bytes_per_take(3),
    )
    code = doctor.exit_code(findings)
    if as_json:
        click.echo(doctor.as_json(findings))
        raise click.exceptions.Exit(code)
    out = Console(highlight=False, soft_wrap=True)
    style = {doctor.OK: "green", doctor.WARNING: "yellow", doctor.ERROR: "bold red"}
    width = max(len(f.topic) for f in findings)
    for f in findings:
        out.print(f"[{style[f.level]}]{f.level:<7}[/] {f.topic:<{width}}  {escape(f.message)}")
        if f.fix and f.level != doctor.OK:
            out.print(f"{'':<8} {'':<{width}}  [dim]-> {escape(f.fix)}[/]")
    errors = sum(f.level == doctor.ERROR for f in findings)
    warnings = sum(f.level == doctor.WARNING for f in findings)
    if errors:
        out.print(f"[bold red]{errors} error(s)[/]: rendering cannot work until they are fixed.")
    else:
        out.print(f"[green]rendering can work[/] ({warnings} warning(s)).")
    raise click.exceptions.Exit(code)
