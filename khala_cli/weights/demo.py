"""The demo model: a tiny, UNTRAINED Khala model. It renders noise, never music.

It exists so that everything (prompt, backbone, super-res, codec, outputs, runner, CLI) can
run end to end on a laptop CPU and in tests without the real weights. It is the engine's
random model at its tiny sizes (engine/random_model.py), well under 25 MB, built from a fixed
seed: every build writes the same bytes (same fingerprint).

    python -m khala_cli.weights.demo DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

from khala_cli.engine.random_model import build_random_model

DEMO_NAME = "demo (untrained, renders noise)"
DEMO_SOURCE = (
    "khala_cli.weights.demo: random weights from a fixed seed; untrained, it renders noise, "
    "never music"
)


def build_demo(path: str | Path) -> Path:
    """Build the demo model directory at `path` (untrained: it renders noise, never music),
    atomically; a model already there (another process won a race) is left as it is."""
    return build_random_model(path, name=DEMO_NAME, source=DEMO_SOURCE, demo=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m khala_cli.weights.demo DIR", file=sys.stderr)
        return 2
    path = build_demo(argv[0])
    print(f"{path}: {DEMO_NAME} - a tiny untrained model; it renders noise, never music")
    return 0


if __name__ == "__main__":
    sys.exit(main())
