"""Does requirements.lock agree with pyproject.toml? Read with `packaging`, not by eye."""

from __future__ import annotations

import sys
from dataclasses import dataclass

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - the lock carries tomli for 3.10
    import tomli as tomllib


@dataclass(frozen=True)
class Pin:
    """One `name==version ; marker` entry of the lock, with its hashes."""

    name: str
    version: str
    marker: str
    hashes: tuple[str, ...]


def read_lock(text: str) -> list[Pin]:
    """The entries of a pip requirements file as `uv pip compile --generate-hashes` writes it."""
    pins = []
    for entry in _logical_lines(text):
        parts = entry.split()
        hashes = tuple(p.split("=", 1)[1] for p in parts if p.startswith("--hash="))
        spec = " ".join(p for p in parts if not p.startswith("--"))
        req = Requirement(spec)
        versions = [s.version for s in req.specifier if s.operator == "=="]
        if len(versions) != 1 or len(req.specifier) != 1:
            raise ValueError(f"lock entry is not one exact pin: {spec!r}")
        pins.append(Pin(canonicalize_name(req.name), versions[0], str(req.marker or ""), hashes))
    return pins


def _logical_lines(text: str) -> list[str]:
    out, cur = [], ""
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].rstrip()
        if line.endswith("\\"):
            cur += line[:-1] + " "
            continue
        cur += line
        if cur.strip():
            out.append(cur.strip())
        cur = ""
    return out


def declared(pyproject_text: str, extras: tuple[str, ...] = ("dev",)) -> list[Requirement]:
    """The project's dependencies plus the named extras."""
    project = tomllib.loads(pyproject_text)["project"]
    reqs = list(project["dependencies"])
    for extra in extras:
        reqs += project["optional-dependencies"][extra]
    return [Requirement(r) for r in reqs]


def disagreements(pyproject_text: str, lock_text: str) -> list[str]:
    """Every way the lock fails the project's requirements, each naming the package."""
    pins = read_lock(lock_text)
    by_name: dict[str, list[Pin]] = {}
    for pin in pins:
        by_name.setdefault(pin.name, []).append(pin)
    problems = [f"{p.name}=={p.version}: no hash in the lock" for p in pins if not p.hashes]
    for req in declared(pyproject_text):
        name = canonicalize_name(req.name)
        if name not in by_name:
            problems.append(f"{req.name}: required by pyproject.toml ({req}) but not in the lock")
            continue
        for pin in by_name[name]:
            if not req.specifier.contains(pin.version, prereleases=True):
                where = f" (where {pin.marker})" if pin.marker else ""
                problems.append(f"{req.name}: the lock pins {pin.version}{where}, "
                                f"outside pyproject.toml's {req.specifier}")
    return problems
