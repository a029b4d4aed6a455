"""Command-line entry point. The only layer that prints for people or chooses exit codes."""

from __future__ import annotations

import click

from khala_cli import __version__, exit_codes

# The command modules are imported in _register(), not here: each one imports `cli` from this
# module to register its commands on it, so they can be imported only once `cli` exists.


class Failure(Exception):
    """A command cannot go on: `lines` go to stderr and the process exits with `code`.
    Raised anywhere below a command; `_Group` turns it into the exit."""

    def __init__(self, code: int, *lines: str):
        super().__init__("\n".join(lines))
        self.code, self.lines = code, lines


class _Group(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except Failure as failure:
            for line in failure.lines:
                click.echo(line, err=True)
            ctx.exit(failure.code)


@click.group(cls=_Group, epilog=exit_codes.help_text(),
             context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="khala")
def cli() -> None:
    """khala: render song catalogues with the Khala full-song model."""


def _register() -> None:
    # Each command lives in its own module; importing registers it on `cli`.
    from khala_cli.cli import bench, catalogue, mend, models, planning, render, review  # noqa: F401


def main() -> None:
    _register()
    cli(prog_name="khala")
