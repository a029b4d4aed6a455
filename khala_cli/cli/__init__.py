"""Command-line entry point. The only layer that prints for people or chooses exit codes."""

from __future__ import annotations

import click

from khala_cli import __version__

# The command modules are imported in _register(), not here: each one imports `cli` from this
# module to register its commands on it, so they can be imported only once `cli` exists.

EXIT_HELP = """\b
Exit codes:
  0    every render done (or already done)
  1    some renders failed
  2    usage or manifest error (nothing rendered, nothing written)
  3    model or environment error found before rendering
  74   the output disk is full, over quota or read-only (rendered takes are kept)
  75   another run holds the output directory's lock
  130  interrupted (Ctrl-C / SIGTERM); the report is still written
"""


@click.group(epilog=EXIT_HELP, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="khala")
def cli() -> None:
    """khala: render song catalogues with the Khala full-song model."""


def _register() -> None:
    # Each command lives in its own module; importing registers it on `cli`.
    from khala_cli.cli import bench, catalogue, models, render, review  # noqa: F401


def main() -> None:
    _register()
    cli(prog_name="khala")
