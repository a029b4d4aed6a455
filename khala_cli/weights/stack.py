"""The codec stack (torch, torchaudio, descript-audio-codec): installed, matching, importable.

torchaudio must be the very release of torch it was built with, and its releases declare a bare
`torch` requirement, so pip installs a mismatched pair without complaint (torchaudio 2.11.1
beside torch 2.11.0 fails to load `libtorchaudio.so`). descript-audio-codec imports torchaudio,
so such a pair breaks every render at import. This module finds that before any worker starts:
the versions from the installed metadata (no import), then the imports themselves in a child
process, so the caller never imports torch. A child's success is remembered per environment
(the modules' files and versions), so a render pays the imports once, not on every run.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

# module -> distribution, in import order: each needs the ones before it.
STACK = {"torch": "torch", "torchaudio": "torchaudio", "dac": "descript-audio-codec"}
IMPORT_TIMEOUT = 180.0
TESTED = "2.11.0"  # the torch/torchaudio release pinned in pyproject.toml and the lock


def reinstall(release: str = TESTED) -> str:
    """The fix: the locked set again, or a matching pair."""
    return ("install the locked set again: `make clean && make demo` in a checkout "
            f"(requirements.lock), or `pip install torch=={release} torchaudio=={release}`")


@dataclass(frozen=True)
class StackProblem:
    """What is wrong with the stack: the package to blame, the message, the fix."""

    package: str
    message: str
    fix: str


def versions() -> dict[str, str | None]:
    """Installed version of each distribution of the stack (None: not installed)."""
    out: dict[str, str | None] = {}
    for dist in STACK.values():
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


def _release(version: str) -> str:
    return version.split("+", 1)[0]  # 2.11.0+cu128 and 2.11.0 are one release


def version_problem(found: dict[str, str | None]) -> StackProblem | None:
    """A missing distribution, or a torchaudio that is not torch's own release."""
    for dist, version in found.items():
        if version is None:
            return StackProblem(dist, f"{dist} is not installed", reinstall())
    torch, audio = found["torch"] or "", found["torchaudio"] or ""
    if _release(torch) != _release(audio):
        return StackProblem(
            "torchaudio", f"torchaudio {audio} does not match torch {torch}: torchaudio must be "
            f"the release built for that torch, or it fails to load", reinstall(_release(torch)))
    return None


def import_problem(result: dict, found: dict[str, str | None]) -> StackProblem | None:
    """The child's import result (`import_all`) as a problem naming the module that failed."""
    if result.get("ok"):
        return None
    dist = STACK.get(result.get("module", "torch"), "torch")
    pair = f"torch {found.get('torch')}, torchaudio {found.get('torchaudio')}"
    return StackProblem(dist, f"{dist} {found.get(dist)} fails to import ({pair}): "
                              f"{result.get('error', 'unknown error')}", reinstall())


def import_all() -> dict:
    """Runs in the child: import the stack in order; which module failed, and why."""
    for module in STACK:
        try:
            __import__(module)
        except Exception as exc:  # noqa: BLE001 - any failure of the import is the finding
            text = " ".join(f"{type(exc).__name__}: {exc}".split())
            return {"ok": False, "module": module, "error": text[:600]}
    return {"ok": True}


def check(timeout: float = IMPORT_TIMEOUT, remember: bool = True) -> StackProblem | None:
    """The stack's first problem, or None; imports in a child unless this environment's
    success is remembered."""
    found = versions()
    problem = version_problem(found)
    if problem is not None:
        return problem
    mark = _mark_path(found) if remember else None
    if mark is not None and mark.exists():
        return None
    result = run_child(timeout)
    problem = import_problem(result, found)
    if problem is None and mark is not None:
        _remember(mark)
    return problem


def run_child(timeout: float = IMPORT_TIMEOUT) -> dict:
    """`import_all` in a child process of this interpreter."""
    cmd = [sys.executable, "-c", "import json; from khala_cli.weights import stack; "
           "print(json.dumps(stack.import_all()))"]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"ok": False, "module": "torch", "error": f"importing took over {timeout:.0f} s"}
    lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
    if lines:
        return json.loads(lines[-1])
    tail = " ".join((proc.stderr or "").split())[-600:]
    return {"ok": False, "module": "torch", "error": f"exit code {proc.returncode}: {tail}"}


def _mark_path(found: dict[str, str | None]) -> Path | None:
    """Where a success is remembered: keyed on the interpreter and each module's files."""
    parts = [sys.executable, sys.version]
    for module, dist in STACK.items():
        spec = importlib.util.find_spec(module)
        origin = spec.origin if spec is not None and spec.origin else ""
        try:
            stamp = os.stat(origin).st_mtime_ns if origin else 0
        except OSError:
            stamp = 0
        parts += [module, origin, str(stamp), found.get(dist) or ""]
    key = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:24]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "khala" / f"stack-ok-{key}"


def _remember(mark: Path) -> None:
    try:
        mark.parent.mkdir(parents=True, exist_ok=True)
        mark.touch()
    except OSError:
        pass  # an unwritable cache only costs the child import next time
