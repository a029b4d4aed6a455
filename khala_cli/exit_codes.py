"""khala's exit codes and the rule that picks a run's: the one place every command takes
them from (the CLI, the run report, `khala --help`)."""

from __future__ import annotations

OK = 0
FAILED = 1  # some renders failed (or never ran); also: analyse/verify found damage
USAGE = 2  # usage or manifest error: nothing rendered, nothing written
MODEL = 3  # model or environment error found before rendering
NO_SPACE = 74  # the output disk is full, over quota or read-only (EX_IOERR)
LOCKED = 75  # another run holds the output directory's lock (EX_TEMPFAIL)
INTERRUPTED = 130  # Ctrl-C / SIGTERM / SIGHUP (128 + SIGINT)

MEANINGS = {
    OK: "every render done (or already done)",
    FAILED: "some renders failed",
    USAGE: "usage or manifest error (nothing rendered, nothing written)",
    MODEL: "model or environment error found before rendering",
    NO_SPACE: "the output disk is full, over quota or read-only (rendered takes are kept)",
    LOCKED: "another run holds the output directory's lock",
    INTERRUPTED: "interrupted (Ctrl-C / SIGTERM); the report is still written",
}


def for_run(counts: dict[str, int], interrupted: bool, no_space: bool = False) -> int:
    """A render run's code: interrupted first, then a full disk, then any render not done."""
    if interrupted:
        return INTERRUPTED
    if no_space:
        return NO_SPACE
    if counts.get("failed", 0) or counts.get("cancelled", 0):
        return FAILED
    return OK


def help_text() -> str:
    """The exit-code table of `khala --help` (\\b keeps click from rewrapping it)."""
    rows = [f"  {code:<4} {text}" for code, text in MEANINGS.items()]
    return "\b\nExit codes:\n" + "\n".join(rows) + "\n"
