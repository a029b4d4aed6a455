"""Turn a manifest's `model:` value into a ready model directory. No torch in this process."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from khala_cli.engine.config import ModelInfo

PROJECT_ROOT = Path(__file__).resolve().parents[2]
MODEL_JSON = "model.json"


class ModelError(Exception):
    """The model (or the environment it needs) is not usable: exit code 3."""


def demo_dir() -> Path:
    """Where the demo model lives: $KHALA_DEMO_DIR, else checkpoints/demo in the project."""
    env = os.environ.get("KHALA_DEMO_DIR")
    return Path(env) if env else PROJECT_ROOT / "checkpoints" / "demo"


def read_info(model_dir: Path) -> ModelInfo:
    path = model_dir / MODEL_JSON
    try:
        return ModelInfo.from_json(path)
    except FileNotFoundError:
        raise ModelError(f"{model_dir}: not a khala model directory (no {MODEL_JSON})") from None
    except ValueError as exc:
        raise ModelError(f"{path}: {exc}") from None


def is_raw_download(path: Path) -> bool:
    """A Khala download as published (Megatron torch_dist checkpoints), not yet converted."""
    return (path / "backbone" / "latest_checkpointed_iteration.txt").exists() or (
        path / "checkpoints" / "backbone" / "latest_checkpointed_iteration.txt"
    ).exists()


def ensure_demo(path: Path | None = None) -> Path:
    """Build the demo model on first use, in a child process (the parent never imports torch)."""
    path = path or demo_dir()
    if (path / MODEL_JSON).exists():
        return path
    return _build_in_child(["khala_cli.weights.demo", str(path)], path,
                           f"could not build the demo model in {path}")


def _build_in_child(module_args: list[str], dst: Path, failure: str) -> Path:
    """Run `python -m <module_args>`, which must leave a model directory at dst."""
    proc = subprocess.run([sys.executable, "-m", *module_args],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0 or not (dst / MODEL_JSON).exists():
        raise ModelError(f"{failure}:\n{proc.stderr.strip()[-2000:]}")
    return dst


def default_destination(src: str | Path) -> Path:
    """Where `khala convert SRC` writes without DST: a sibling `<SRC>-khala` directory."""
    src = Path(src).expanduser().resolve()
    return src.parent / f"{src.name}-khala"


def convert_download(src: Path, dst: Path) -> Path:
    """Run `khala convert SRC DST` in a child process (torch stays out of this one)."""
    return _build_in_child(["khala_cli.weights.convert", str(src), str(dst)], dst,
                           f"converting {src} failed")


def resolve_model(ref: str, base: Path, *, convert: bool = False,
                  announce: Callable[[str], None] | None = None) -> tuple[Path, ModelInfo]:
    """("demo" | a directory relative to `base`) -> (model directory, its model.json).

    A raw download is converted (once, next to it) when `convert` is set; otherwise the error
    gives the exact command. A download converted before is found at the default destination.
    `announce` hears a line before a (long) conversion starts.
    """
    if ref == "demo":
        path = ensure_demo()
        return path, read_info(path)
    path = (base / ref).expanduser().resolve()
    if not path.exists():
        raise ModelError(f"model directory {path} does not exist")
    if not (path / MODEL_JSON).exists() and is_raw_download(path):
        dst = default_destination(path)
        if not (dst / MODEL_JSON).exists():
            if not convert:
                raise ModelError(
                    f"{path} is a raw Khala download (Megatron checkpoints) and needs "
                    f"converting once:\n  khala convert {path} {dst}\n"
                    f"then point `model:` at {dst} (or run render with --convert)."
                )
            if announce:
                announce(f"converting the download {path} once into {dst} "
                         "(reads every model tensor) ...")
            convert_download(path, dst)
        path = dst
    return path, read_info(path)
