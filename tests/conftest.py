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


@pytest.fixture
def threads(request):
    """torch's CPU threads for one test (parametrize it indirectly), restored after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.fixture
def small_fs(tmp_path):
    """Mount small tmpfs file systems (root only; the test skips elsewhere, or fails with
    KHALA_REQUIRE_SMALL_FS=1, as .ci/run sets, so the full-disk tests never vanish):
    `small_fs(mib, at=None) -> Path` (at: mount there instead of a new folder),
    `small_fs.read_only(path)` remounts one read-only."""
    import subprocess

    mounted: list[Path] = []

    def mount(mib: int, at: Path | None = None) -> Path:
        path = at or tmp_path / f"fs{len(mounted)}"
        path.mkdir(parents=True, exist_ok=at is not None)
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={mib}m", "tmpfs",
                               str(path)], capture_output=True, text=True)
        if proc.returncode != 0:
            why = f"cannot mount a tmpfs here: {proc.stderr.strip()}"
            if os.environ.get("KHALA_REQUIRE_SMALL_FS") == "1":
                pytest.fail(f"{why} (KHALA_REQUIRE_SMALL_FS=1: the full-disk tests must run)")
            pytest.skip(why)
        mounted.append(path)
        return path

    def read_only(path: Path) -> None:
        subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)

    mount.read_only = read_only
    yield mount
    for path in reversed(mounted):
        subprocess.run(["umount", "-l", str(path)], capture_output=True)
