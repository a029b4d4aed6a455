"""Shared fixtures. The demo model is built once per test session in a temporary directory,
and KHALA_DEMO_DIR points there so CLI subprocesses use the same build."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

_SESSION_DIR = Path(tempfile.mkdtemp(prefix="khala-tests-"))
os.environ.setdefault("KHALA_DEMO_DIR", str(_SESSION_DIR / "demo"))


@pytest.fixture(scope="session")
def demo_model_dir() -> Path:
    """A built demo model directory (tiny, untrained: it renders noise)."""
    from khala_cli.weights.demo import build_demo

    path = Path(os.environ["KHALA_DEMO_DIR"])
    if not (path / "model.json").exists():
        build_demo(path)
    return path
