#!/usr/bin/env python3
"""Build the wheel folder that `tools/gpu-check` installs on a GPU machine: the packages khala
imports that a stock PyTorch image (Python 3.12, x86-64 Linux) lacks, at the versions of
requirements.lock, as wheels, small enough to travel with the working tree (at most 64 MiB).

    tools/gpu-wheels [DIR]        # default .whl (then git-ignored here)

The list is the import closure of `import dac` and of khala's own imports (read with
sys.modules here) less what the image holds (torch, torchaudio, numpy, scipy, yaml, click,
rich, psutil, safetensors, tokenizers, pytest, einops, protobuf, tensorboard, ...).
argbind, randomname and julius publish no wheel: they are built here (pure Python).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NEEDED = ("descript-audio-codec", "descript-audiotools", "argbind", "randomname", "julius",
          "docstring-parser", "flatten-dict", "ffmpy", "importlib-resources", "soundfile",
          "cffi", "pyloudnorm", "mutagen", "ffmpeg-python", "future", "imageio-ffmpeg")
# imageio-ffmpeg 0.8.1 (the lock's) is a 66 MB wheel; 0.6.0 ships a smaller ffmpeg that
# khala's MP3 encoding needs nothing beyond.
PINNED = {"imageio-ffmpeg": "0.6.0"}
TARGET = {"python_full_version": "3.12.3", "python_version": "3.12", "sys_platform": "linux",
          "platform_machine": "x86_64", "implementation_name": "cpython",
          "platform_python_implementation": "CPython", "os_name": "posix",
          "platform_system": "Linux"}
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64")
LIMIT = 64 * 1024**2


def _marker(text: str):
    try:
        from packaging.markers import Marker
    except ImportError:  # pip always vendors it
        from pip._vendor.packaging.markers import Marker
    return Marker(text)


def lock_versions(lock: Path = ROOT / "requirements.lock") -> dict[str, str]:
    """name -> version of the lock's pins that apply to the GPU image's Python."""
    out = {}
    for line in lock.read_text().splitlines():
        m = re.match(r"([A-Za-z0-9_.-]+)==([^ ;\\]+)\s*(?:;\s*([^\\]+?))?\s*\\?$", line)
        if m and (not m.group(3) or _marker(m.group(3)).evaluate(TARGET)):
            out[m.group(1).lower()] = m.group(2)
    return out


def fetch(spec: str, dest: Path) -> None:
    """A binary wheel for the image; else a wheel built here from the sdist (pure Python)."""
    plat = [a for p in PLATFORMS for a in ("--platform", p)]
    got = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                          "--only-binary=:all:", "--python-version", "3.12",
                          "--implementation", "cp", *plat, "-d", str(dest), spec])
    if got.returncode != 0:
        subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w",
                        str(dest), spec], check=True)


def ignore(dest: Path) -> None:
    """Keep a wheel folder inside the checkout out of git (it travels as a carried path)."""
    try:
        rel = dest.resolve().relative_to(ROOT)
    except ValueError:
        return
    if subprocess.run(["git", "-C", str(ROOT), "check-ignore", "-q", str(rel)]).returncode:
        exclude = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--git-path",
                                  "info/exclude"], capture_output=True, text=True,
                                 check=True).stdout.strip()
        path = ROOT / exclude
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            f.write(f"/{rel.as_posix()}/\n")


def main(argv: list[str]) -> int:
    dest = Path(argv[0] if argv else ROOT / ".whl")
    dest.mkdir(parents=True, exist_ok=True)
    ignore(dest)
    pins = lock_versions()
    for name in NEEDED:
        fetch(f"{name}=={PINNED.get(name) or pins[name]}", dest)
    wheels = sorted(dest.glob("*.whl"))
    size = sum(w.stat().st_size for w in wheels)
    impure = [w.name for w in wheels if not w.name.endswith(("-none-any.whl", "x86_64.whl"))]
    print(f"{dest}: {len(wheels)} wheels, {size / 1024**2:.1f} MiB")
    if impure:
        print(f"not for the image's platform: {', '.join(impure)}", file=sys.stderr)
    if size > LIMIT:
        print(f"over the {LIMIT // 1024**2} MiB that travel with the working tree",
              file=sys.stderr)
    return 1 if impure or size > LIMIT else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
