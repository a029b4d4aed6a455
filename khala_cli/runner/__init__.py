"""Worker processes per device, the queue, retries, timeouts, signals, the run lock.

The parent side (this package minus worker.py) never imports torch."""

from khala_cli.runner.events import Event, Outcome
from khala_cli.runner.pool import RunOptions, RunResult, run_renders

__all__ = ["Event", "Outcome", "RunOptions", "RunResult", "run_renders"]
