"""Worker processes per device, the queue, retries, timeouts, signals, the run lock.

The parent side (this package minus worker.py) never imports torch."""

from khala_cli.runner.pool import Outcome, RunOptions, RunResult, run_renders

__all__ = ["Outcome", "RunOptions", "RunResult", "run_renders"]
