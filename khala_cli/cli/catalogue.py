"""`khala keep` and `khala export`: from the takes a person chose to a catalogue."""

from __future__ import annotations

import sys
from pathlib import Path

import click
from rich.progress import Progress

from khala_cli import exit_codes
from khala_cli.catalogue.export import ExportError, ExportOptions, export
from khala_cli.cli import Failure, cli, steps
from khala_cli.cli.review import OUTPUT_DIR_ARG, _output_dir, review_page
from khala_cli.review.keep import KeepError, apply, parse_take


def _takes(values: tuple[str, ...]) -> list[tuple[str, int]]:
    out, bad = [], []
    for v in (x for value in values for x in value.split(",") if x.strip()):
        try:
            out.append(parse_take(v))
        except KeepError as exc:
            bad.append(str(exc))
    if bad:
        raise Failure(exit_codes.USAGE, "error: " + "\n  ".join(bad))
    return out


@cli.command("keep")
@OUTPUT_DIR_ARG
@click.argument("takes", nargs=-1)
@click.option("--drop", multiple=True, metavar="JOB:SEED", help="Unmark these takes.")
@click.option("--top", type=click.IntRange(min=1), default=None, metavar="N",
              help="Keep the N best-scored unflagged takes of every job (or of --only jobs).")
@click.option("--only", multiple=True, metavar="JOB_ID", help="With --top: only these jobs.")
def keep_cmd(output_dir: Path, takes: tuple[str, ...], drop: tuple[str, ...], top: int | None,
             only: tuple[str, ...]) -> None:
    """Mark takes (JOB:SEED ...) of OUTPUT_DIR as keepers, for `khala export`.

    The marks live in OUTPUT_DIR/keepers.json. An unknown job or seed, or a take that failed
    or was never rendered, exits 2 and changes nothing.
    """
    root = _output_dir(output_dir)
    only_set = {j for v in only for j in v.split(",") if j.strip()} or None
    # Never beside a render: it could be re-rendering the very take being kept.
    with steps.locked(root, purpose="khala keep"):
        try:
            marks, dropped = apply(root, _takes(takes), _takes(drop), top=top, only=only_set)
        except KeepError as exc:
            raise Failure(exit_codes.USAGE, f"error: {exc}") from None
        review_page(root)
    click.echo(f"{len(marks)} keepers in {root / 'keepers.json'}"
               + (f" ({len(dropped)} dropped)" if dropped else ""))
    for j, s in marks:
        click.echo(f"  {j}:{s}")


def _progress(enabled: bool):
    if not enabled:
        return None, None
    bar = Progress(transient=True)
    task = bar.add_task("exporting", total=None)

    def step(name: str, n: int, total: int) -> None:
        bar.update(task, total=total, completed=n, description=f"exporting {name}")
    return bar, step


@cli.command("export")
@OUTPUT_DIR_ARG
@click.argument("dest", type=click.Path(file_okay=False, path_type=Path))
@click.option("--format", "formats", multiple=True, type=click.Choice(["mp3", "flac", "wav"]),
              help="mp3 (320 kb/s, the default), flac or wav (24-bit); repeat for several.")
@click.option("--loudness", default="-14", show_default=True, metavar="LUFS|off",
              help="Integrated loudness target, or `off` to keep the audio as rendered.")
@click.option("--true-peak", type=click.FloatRange(-9.0, 0.0), default=-1.0, show_default=True,
              help="True-peak ceiling in dBTP.")
@click.option("--force", is_flag=True, help="Overwrite files in DEST that khala did not write.")
def export_cmd(output_dir: Path, dest: Path, formats: tuple[str, ...], loudness: str,
               true_peak: float, force: bool) -> None:
    """Copy the keepers of OUTPUT_DIR into DEST as a catalogue.

    DEST/<artist>/<album>/<NN> <title>.<ext>, loudness-matched and fully tagged, plus
    DEST/catalogue.csv and catalogue.json. Safe to repeat: only what changed is written.
    """
    root = _output_dir(output_dir)
    try:
        target = None if loudness.strip().lower() == "off" else float(loudness)
    except ValueError:
        raise Failure(exit_codes.USAGE,
                      f"error: --loudness {loudness!r}: give LUFS (e.g. -14) or off") from None
    if target is not None and not -40.0 <= target <= -5.0:
        raise Failure(exit_codes.USAGE, f"error: --loudness {target:g} is out of range -40..-5 LUFS")
    opts = ExportOptions(formats=tuple(dict.fromkeys(formats or ("mp3",))), loudness=target,
                         true_peak=true_peak, force=force)
    tty = sys.stderr.isatty()
    bar, step = _progress(tty)

    def plain(name: str, n: int, total: int) -> None:
        click.echo(f"[{n + 1}/{total}] {name}", err=True)
    try:
        if bar:
            bar.start()
        try:
            res = export(root, dest, opts, progress=step or plain)
        finally:
            if bar:
                bar.stop()
    except ExportError as exc:
        raise Failure(exit_codes.NO_SPACE if exc.no_space else exit_codes.USAGE,
                      f"error: {exc}") from None
    click.echo(f"exported {len(res.written)} files, {len(res.unchanged)} unchanged, "
               f"{len(res.removed)} removed (no longer kept); catalogue {dest / 'catalogue.csv'}")
