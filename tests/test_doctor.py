"""`khala doctor`: findings and exit codes on good and broken setups."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from megatron_fixtures import write_raw_download

from khala_cli import outputs
from khala_cli.weights import doctor
from khala_cli.weights.convert import convert
from khala_cli.weights.doctor import ERROR, OK, WARNING, DevicePlan, Finding

GIB = 1024**3
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("dl")
    write_raw_download(root)
    dst = tmp_path_factory.mktemp("models") / "tiny"
    convert(root, dst)
    return dst, root


def _cli():
    from khala_cli.cli import _register, cli

    _register()
    return cli


def _doctor(*args):
    return CliRunner().invoke(_cli(), ["doctor", *args])


def test_good_model_dir_exits_0(model_dir, tmp_path):
    dst, _ = model_dir
    result = _doctor("--model", str(dst), "--output-dir", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    assert "fingerprints match" in result.output and "rendering can work" in result.output
    # every topic has its own finding (the temp path names "model" too: ask the JSON)
    data = json.loads(_doctor("--model", str(dst), "--output-dir", str(tmp_path / "out"),
                              "--json").output)
    assert {"python", "torch", "ffmpeg", "model", "decode", "disk"} <= {f["topic"] for f in data["findings"]}
    [decode] = [f for f in data["findings"] if f["topic"] == "decode"]
    assert decode["message"].startswith("cpu: eager by default (on the CPU")
    assert decode["message"].endswith("--decode-path overrides it")


def test_json_output(model_dir, tmp_path):
    dst, _ = model_dir
    result = _doctor("--model", str(dst), "--output-dir", str(tmp_path), "--json")
    data = json.loads(result.output)
    assert result.exit_code == 0 and data["ok"] is True
    assert {f["level"] for f in data["findings"]} <= {OK, WARNING}
    assert any(f["topic"] == "model" and "fingerprints match" in f["message"] for f in data["findings"])


def test_corrupt_file_exits_3(model_dir, tmp_path):
    dst, _ = model_dir
    broken = tmp_path / "broken"
    shutil.copytree(dst, broken)
    p = broken / "superres.safetensors"
    data = bytearray(p.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit of one weight
    p.write_bytes(bytes(data))
    result = _doctor("--model", str(broken), "--output-dir", str(tmp_path))
    assert result.exit_code == 3, result.output
    assert "superres.safetensors" in result.output and "sha256" in result.output
    assert "rendering cannot work" in result.output


def test_missing_file_exits_3(model_dir, tmp_path):
    dst, _ = model_dir
    broken = tmp_path / "broken"
    shutil.copytree(dst, broken)
    (broken / "codec.safetensors").unlink()
    result = _doctor("--model", str(broken), "--output-dir", str(tmp_path), "--json")
    assert result.exit_code == 3
    errors = [f for f in json.loads(result.output)["findings"] if f["level"] == ERROR]
    assert any("codec.safetensors" in f["message"] and f["fix"] for f in errors)


def test_raw_download_exits_3_with_convert_command(model_dir, tmp_path):
    _, raw = model_dir
    result = _doctor("--model", str(raw / "checkpoints"), "--output-dir", str(tmp_path))
    # checkpoints/ itself is what resolve.py recognises as a raw download (backbone/ inside)
    assert result.exit_code == 3
    assert "khala convert" in result.output


def test_not_a_model_exits_3(tmp_path):
    (tmp_path / "empty").mkdir()
    result = _doctor("--model", str(tmp_path / "empty"), "--output-dir", str(tmp_path))
    assert result.exit_code == 3 and "model.json" in result.output
    result = _doctor("--model", str(tmp_path / "nowhere"), "--output-dir", str(tmp_path))
    assert result.exit_code == 3 and "does not exist" in result.output


def test_doctor_never_imports_torch_in_its_own_process(tmp_path):
    code = (
        "import sys, atexit\n"
        "atexit.register(lambda: print('TORCH_IMPORTED=' + str('torch' in sys.modules), file=sys.stderr))\n"
        "sys.argv = ['khala', 'doctor', '--json', '--output-dir', sys.argv[1]]\n"
        "from khala_cli.cli import main\n"
        "main()\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                          text=True, cwd=ROOT, timeout=300)
    assert "TORCH_IMPORTED=False" in proc.stderr, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["findings"]


# ---- the checks, on fabricated probes --------------------------------------------------------


def _planner(total, free, model):
    weights, row, headroom = 30 * GIB, 1 * GIB, 2 * GIB
    keep = total >= weights + row + headroom
    return DevicePlan(residency="keep_loaded" if keep else "one_shot",
                      batch_size=4 if keep else 2,
                      need_bytes=(weights if keep else 3 * GIB) + row + headroom,
                      one_shot_bytes=3 * GIB + row + headroom)


def _probe(*gpus):
    return {"torch": "2.11.0", "torch_cuda": "13.0", "cuda_available": bool(gpus),
            "devices": [{"index": i, "name": "GPU", "total": t, "free": f, "capability": "9.0"}
                        for i, (t, f) in enumerate(gpus)],
            "model": {"problems": [], "info": {"name": "m", "fingerprint": "ab" * 32, "demo": False},
                      "sizes": {"backbone": 3 * GIB, "superres": 3 * GIB, "codec": GIB}}}


def test_device_lines(tmp_path):
    probe = _probe((80 * GIB, 79 * GIB), (24 * GIB, 23 * GIB), (80 * GIB, 7 * GIB), (8 * GIB, 5 * GIB))
    lines = doctor.check_devices(probe, tmp_path, _planner, None)
    assert [f.level for f in lines] == [OK, OK, WARNING, ERROR]
    assert "keep_loaded" in lines[0].message and "batch size 4" in lines[0].message
    assert "one_shot" in lines[1].message
    assert "only one_shot" in lines[2].message and lines[2].fix
    assert "cannot hold" in lines[3].message and "--devices" in lines[3].fix


def test_cpu_line_checks_ram(tmp_path):
    probe = _probe()
    [line] = doctor.check_devices(probe, tmp_path, _planner, (16 * GIB, 4 * GIB))
    assert line.level == WARNING and "float32" in line.message
    [line] = doctor.check_devices(probe, tmp_path, _planner, (64 * GIB, 60 * GIB))
    assert line.level == OK


def test_decode_line_names_the_device_kind_and_the_reason(tmp_path):
    def choose(kind):
        return {"cuda": ("cuda_graphs", "proven"), "cpu": ("eager", "not proven")}[kind]

    gpu = doctor.check_decode(_probe((80 * GIB, 79 * GIB)), choose)
    assert (gpu.level, gpu.topic) == (OK, "decode")
    assert gpu.message.startswith("cuda: cuda_graphs by default (proven);")
    assert doctor.check_decode(_probe(), choose).message.startswith("cpu: eager by default (not proven);")


def test_torch_lines():
    assert doctor.check_torch({"probe_error": "timed out"}, 0)[0].level == ERROR
    assert doctor.check_torch({"torch_error": "ImportError: libcuda"}, 0)[0].level == ERROR
    cpu_build = {"torch": "2.11.0+cpu", "torch_cuda": None, "devices": []}
    lines = doctor.check_torch(cpu_build, gpus_seen=2)
    assert lines[-1].level == ERROR and "CPU-only" in lines[-1].message
    assert doctor.check_torch(cpu_build, gpus_seen=0)[-1].level == WARNING
    assert doctor.check_torch(_probe((1, 1)), gpus_seen=1)[-1].level == OK


def test_ffmpeg_lines(tmp_path):
    def missing():
        raise RuntimeError("no ffmpeg: none on PATH and imageio-ffmpeg is not installed")

    assert doctor.check_ffmpeg(missing).level == ERROR
    fake = tmp_path / "ffmpeg"
    fake.write_text("#!/bin/sh\nexit 1\n")
    fake.chmod(0o755)
    line = doctor.check_ffmpeg(lambda: str(fake))
    assert line.level == ERROR and line.fix


@pytest.mark.parametrize("takes,level", [(1000, OK), (doctor.DISK_WARN_TAKES - 1, WARNING),
                                         (0, ERROR)])
def test_disk_lines(tmp_path, monkeypatch, takes, level):
    take = outputs.bytes_per_take(3)

    class Usage:
        total, used, free = 100 * GIB, 0, takes * take + take // 2

    seen = []
    monkeypatch.setattr(doctor.shutil, "disk_usage", lambda p: seen.append(p) or Usage)
    line = doctor.check_disk(tmp_path / "not" / "yet", take)
    assert line.level == level, line
    assert seen == [tmp_path]  # a folder not made yet: its nearest existing parent is measured
    assert str(tmp_path / "not" / "yet") in line.message and f"about {takes} " in line.message


def test_exit_code():
    assert doctor.exit_code([Finding(OK, "a", ""), Finding(WARNING, "b", "")]) == 0
    assert doctor.exit_code([Finding(OK, "a", ""), Finding(ERROR, "b", "")]) == 3
