"""A broken codec stack (torch / torchaudio / descript-audio-codec) is named before any worker
starts: by `khala doctor` and by `khala render`, never as a traceback. The broken environments
are real: a package placed ahead of the installed one on PYTHONPATH, with its own metadata."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from khala_cli.weights import stack

ROOT = Path(__file__).resolve().parents[1]
KHALA = str(Path(sys.executable).with_name("khala"))
TORCH = stack.versions()["torch"]
RELEASE = TORCH.split("+")[0]
LOAD_ERROR = ("Could not load this library: libtorchaudio.so (undefined symbol: "
              "torch_exception_get_what_without_backtrace)")


def _broken_torchaudio(root: Path, version: str) -> Path:
    """A torchaudio `version` that fails to load as a mismatched build does."""
    pkg = root / "torchaudio"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(f"raise OSError({LOAD_ERROR!r})\n")
    meta = root / f"torchaudio-{version}.dist-info"
    meta.mkdir()
    (meta / "METADATA").write_text(f"Metadata-Version: 2.1\nName: torchaudio\nVersion: {version}\n")
    return root


def _run(args: list[str], path: Path, tmp: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(path), XDG_CACHE_HOME=str(tmp / "cache"))
    return subprocess.run([KHALA, *args], capture_output=True, text=True, env=env, timeout=300,
                          cwd=ROOT)


def test_a_mismatched_pair_is_named_with_both_versions():
    problem = stack.version_problem({"torch": "2.11.0", "torchaudio": "2.11.1",
                                     "descript-audio-codec": "1.0.0"})
    assert problem.package == "torchaudio"
    assert "torchaudio 2.11.1 does not match torch 2.11.0" in problem.message
    assert "torchaudio==2.11.0" in problem.fix


def test_a_local_build_tag_is_the_same_release():
    assert stack.version_problem({"torch": "2.11.0+cu130", "torchaudio": "2.11.0+cu130",
                                  "descript-audio-codec": "1.0.0"}) is None
    assert stack.version_problem({"torch": "2.11.0+cu130", "torchaudio": "2.11.0",
                                  "descript-audio-codec": "1.0.0"}) is None


def test_a_missing_codec_is_named():
    problem = stack.version_problem({"torch": "2.11.0", "torchaudio": "2.11.0",
                                     "descript-audio-codec": None})
    assert problem.package == "descript-audio-codec" and "not installed" in problem.message


def test_this_environment_imports_and_is_remembered(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert stack.check() is None
    marks = list((tmp_path / "khala").glob("stack-ok-*"))
    assert len(marks) == 1
    assert stack.check() is None  # from the mark: no child


@pytest.mark.slow
def test_doctor_names_a_mismatched_torchaudio(tmp_path):
    path = _broken_torchaudio(tmp_path / "site", "2.11.1")
    proc = _run(["doctor"], path, tmp_path)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert f"torchaudio 2.11.1 does not match torch {TORCH}" in proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr


@pytest.mark.slow
def test_doctor_names_a_torchaudio_that_fails_to_import(tmp_path):
    path = _broken_torchaudio(tmp_path / "site", RELEASE)
    proc = _run(["doctor"], path, tmp_path)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert f"torchaudio {RELEASE} fails to import" in proc.stdout
    assert "undefined symbol" in proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("version", ["2.11.1", RELEASE])
def test_render_stops_before_any_worker(tmp_path, version):
    path = _broken_torchaudio(tmp_path / "site", version)
    out = tmp_path / "out"
    proc = _run(["render", "jobs/demo.yaml", "--output-dir", str(out)], path, tmp_path)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "error: torchaudio" in proc.stderr and "fix: install the locked set" in proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not out.exists()  # nothing written, no worker started
