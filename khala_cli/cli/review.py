"""`khala analyse` and `khala report`: measure the takes on disk and lay them out on one page."""

from __future__ import annotations

import contextlib
from pathlib import Path

import click

from khala_cli import exit_codes
from khala_cli.cli import Failure, cli, steps
from khala_cli.outputs import SUPERSEDED, superseded_usage
from khala_cli.review.page import write_page
from khala_cli.review.takes import NotAnOutputDir, backfill, check_output_dir, read_takes
from khala_cli.review.verify import set_aside, verify

OUTPUT_DIR_ARG = click.argument("output_dir", type=click.Path(path_type=Path))


def review_page(output_dir: Path) -> Path | None:
    """Rewrite the review page after a run; a failure is a warning, never the run's end."""
    try:
        return write_page(output_dir)
    except Exception as exc:  # noqa: BLE001 - the renders and reports are already safe
        click.echo(f"warning: could not write the review page: {type(exc).__name__}: {exc}",
                   err=True)
        return None


def _output_dir(path: Path) -> Path:
    try:
        return check_output_dir(path)
    except NotAnOutputDir as exc:
        raise Failure(exit_codes.USAGE, f"error: {exc}") from None


@cli.command("analyse")
@OUTPUT_DIR_ARG
@click.option("--force", is_flag=True, help="Measure every take again, not only those "
              "without an analysis.")
def analyse_cmd(output_dir: Path, force: bool) -> None:
    """Fill in the analysis of takes rendered before khala measured them.

    Reads each take's WAV (and its saved codes, where --save-codes kept them) and adds
    `analysis` to its sidecar. Nothing is rendered again and no render key changes. Then
    rewrites the review page.
    """
    root = _output_dir(output_dir)
    done = failed = 0
    with steps.locked(root, purpose="khala analyse"):  # a render rewrites sidecars too
        for take in read_takes(root):
            if take.data is None:
                click.echo(f"skipped {take.path}: {take.problem}", err=True)
                continue
            try:
                done += backfill(take, force=force)
            except Exception as exc:  # noqa: BLE001 - one broken take does not stop the others
                failed += 1
                click.echo(f"error: {take.path}: cannot measure: {type(exc).__name__}: {exc}",
                           err=True)
        page = review_page(root)
    click.echo(f"analysed {done} takes" + (f", {failed} could not be read" if failed else "")
               + (f"; review page {page}" if page else ""))
    if failed:
        raise click.exceptions.Exit(exit_codes.FAILED)


@cli.command("report")
@OUTPUT_DIR_ARG
def report_cmd(output_dir: Path) -> None:
    """Write OUTPUT_DIR/reports/index.html: every take, ranked, with players.

    Built from the files on disk (every sidecar, run report and shard report), so it can be
    rebuilt at any time. The page is self-contained and uses relative links: copy the whole
    output directory and it still plays. Then says how many replaced versions of takes are
    kept under OUTPUT_DIR/.khala/superseded/ and the space they take.
    """
    root = _output_dir(output_dir)
    click.echo(str(write_page(root)))
    versions, size = superseded_usage(root)
    click.echo(f"superseded: {versions} replaced take version{'s' if versions != 1 else ''}, "
               f"{size / 1e6:,.1f} MB, under {root / SUPERSEDED}")


@cli.command("verify")
@OUTPUT_DIR_ARG
@click.option("--fix", is_flag=True, help="Set the damaged takes' sidecars aside, so that the "
              "next `khala render` renders exactly those takes again.")
def verify_cmd(output_dir: Path, fix: bool) -> None:
    """Check every take's files: sizes and sha256 against its sidecar, and that each decodes.

    Names each damaged file and exits 1 when any is damaged (0 when all are whole).
    """
    root = _output_dir(output_dir)
    # --fix sets takes aside: never beside a render, which may be rewriting them.
    with steps.locked(root, purpose="khala verify --fix") if fix else contextlib.nullcontext():
        checked, damage = verify(root)
        for d in damage:
            click.echo(f"damaged: {d.file}: {d.problem}", err=True)
        if fix:
            for sidecar in sorted({d.sidecar for d in damage if d.sidecar.exists()}):
                moved = set_aside(root, sidecar)
                click.echo(f"set aside {sidecar} -> {moved}; the next render renders it "
                           "again", err=True)
    takes = len({d.sidecar for d in damage})
    click.echo(f"verified {checked} takes: " + (f"{takes} damaged ({len(damage)} files)"
                                                if damage else "all whole"))
    if damage:
        raise click.exceptions.Exit(exit_codes.FAILED)
