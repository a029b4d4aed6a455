"""requirements.lock holds what pyproject.toml asks for, pinned, with hashes."""

from __future__ import annotations

from pathlib import Path

from lock_check import declared, disagreements, read_lock

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = (ROOT / "pyproject.toml").read_text()
LOCK = (ROOT / "requirements.lock").read_text()


def test_the_lock_agrees_with_pyproject():
    assert disagreements(PYPROJECT, LOCK) == []


def test_torch_and_torchaudio_are_an_exact_pair():
    specs = {r.name: str(r.specifier) for r in declared(PYPROJECT)}
    assert specs["torch"].startswith("==") and specs["torch"] == specs["torchaudio"]
    pins = {p.name: p.version for p in read_lock(LOCK)}
    assert pins["torch"] == pins["torchaudio"] == specs["torch"][2:]


def test_every_entry_is_pinned_with_hashes():
    pins = read_lock(LOCK)
    assert len(pins) > 100  # the whole closure, not only the direct dependencies
    assert all(p.hashes and all(h.startswith("sha256:") for h in p.hashes) for p in pins)


def _without(lock: str, name: str) -> str:
    out, skipping = [], False
    for line in lock.splitlines():
        if line.startswith(f"{name}=="):
            skipping = True
        elif skipping and not line.startswith(" "):
            skipping = False
        if not skipping:
            out.append(line)
    return "\n".join(out)


def test_a_missing_package_is_named():
    problems = disagreements(PYPROJECT, _without(LOCK, "mutagen"))
    assert len(problems) == 1 and problems[0].startswith("mutagen: required by pyproject.toml")


def test_a_version_outside_the_range_is_named():
    pin = next(p for p in read_lock(LOCK) if p.name == "torchaudio")
    problems = disagreements(PYPROJECT, LOCK.replace(f"torchaudio=={pin.version}",
                                                     "torchaudio==2.11.1"))
    assert problems == ["torchaudio: the lock pins 2.11.1, outside pyproject.toml's ==2.11.0"]


def test_a_pin_without_hashes_is_named():
    lock = "click==8.1.7\n" + _without(LOCK, "click")
    assert "click==8.1.7: no hash in the lock" in disagreements(PYPROJECT, lock)
