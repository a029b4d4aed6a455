"""Turn a manifest's `model:` value into a ready model directory. No torch in this process."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
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


# The two downloads of the Khala weights, recognised by their files.
MEGATRON = "megatron"  # the official one: Megatron torch_dist + a Lightning decoder checkpoint
KHALA_MAC = "khala-mac"  # the Khala-mac fork's: the same weights already as safetensors
MIXED = "mixed"  # both in one folder: refused, the user says which one is meant
# The Megatron download's checkpoint folders per stage (the first name is the published one).
TRANSFORMER_DIRS = {
    "backbone": ("backbone",),
    "superres": ("superresolution", "superres", "super_resolution"),
}
KHALA_MAC_FILES = (
    "khala_backbone.safetensors", "khala_superres.safetensors", "decoder_weights.pt",
    "backbone_megatron_args.json", "superres_megatron_args.json", "decoder_config.yaml",
)
# Where the six files may sit below SRC: SRC itself, or a Khala(-mac) checkout's folders.
KHALA_MAC_FOLDERS = (".", "checkpoints", "_cuda_artifacts")
LAYOUT_WORDS = {
    MEGATRON: "a raw Khala download (Megatron checkpoints)",
    KHALA_MAC: "the Khala-mac download (pre-converted safetensors)",
    MIXED: "a folder holding both the Megatron download and the Khala-mac files",
}


@dataclass(frozen=True)
class Download:
    """A download not converted yet: its layout and the folder(s) holding its files."""

    layout: str  # MEGATRON | KHALA_MAC | MIXED
    megatron: Path | None  # the folder holding backbone/, superresolution/, dac_rvq_*.ckpt
    khala_mac: Path | None  # the folder holding the six Khala-mac files
    khala_mac_found: tuple[str, ...] = ()  # which of the six are there


def _megatron_folder(path: Path) -> Path | None:
    for folder in (path, path / "checkpoints"):
        dirs = (n for names in TRANSFORMER_DIRS.values() for n in names)
        if any((folder / n).is_dir() for n in dirs) or any(folder.glob("dac_rvq_*.ckpt")):
            return folder
    return None


def find_download(path: Path) -> Download | None:
    """Which download `path` holds (None: neither)."""
    path = Path(path)
    mac, found = None, ()
    for sub in KHALA_MAC_FOLDERS:
        folder = path / sub if sub != "." else path
        found = tuple(n for n in KHALA_MAC_FILES if (folder / n).is_file())
        if found:
            mac = folder
            break
    megatron = _megatron_folder(path)
    if megatron is None and mac is None:
        return None
    layout = MIXED if megatron and mac else MEGATRON if megatron else KHALA_MAC
    return Download(layout, megatron, mac, found)


def mixed_message(path: Path, found: Download) -> str:
    """Why a folder holding both downloads is refused, and what to do."""
    return (
        f"{path} holds both downloads of the Khala weights: Megatron checkpoints in "
        f"{found.megatron} and Khala-mac files ({', '.join(found.khala_mac_found)}) in "
        f"{found.khala_mac}. khala does not guess which one you mean: move one of them into a "
        f"folder of its own and convert that folder."
    )


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
    found = None if (path / MODEL_JSON).exists() else find_download(path)
    if found and found.layout == MIXED:
        raise ModelError(mixed_message(path, found))
    if found:
        what = LAYOUT_WORDS[found.layout]
        dst = default_destination(path)
        if not (dst / MODEL_JSON).exists():
            if not convert:
                raise ModelError(
                    f"{path} is {what} and needs converting once:\n  khala convert {path} {dst}\n"
                    f"then point `model:` at {dst} (or run render with --convert)."
                )
            if announce:
                announce(f"converting the download {path} once into {dst} "
                         "(reads every model tensor) ...")
            convert_download(path, dst)
        path = dst
    return path, read_info(path)
