"""--devices parsing, GPU discovery through nvidia-smi, and memory-based defaults."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import pytest

from khala_cli.runner import devices
from khala_cli.runner.devices import (
    GIB,
    HEADROOM,
    Device,
    DeviceError,
    Gpu,
    default_batch_size,
    default_decode_path,
    default_residency,
    discover_gpus,
    model_footprint,
    needs,
    parse_devices,
    parse_nvidia_smi,
    plan_devices,
)

TWO = [Gpu(0, "GPU-aaaa", 80 * GIB, 79 * GIB), Gpu(1, "GPU-bbbb", 80 * GIB, 60 * GIB)]
FOUR = [Gpu(i, f"GPU-{i}", 24 * GIB, 23 * GIB) for i in range(4)]


def test_auto_without_gpus_is_one_cpu_worker():
    devs = parse_devices("auto", gpus=[])
    assert [d.name for d in devs] == ["cpu:0"]
    assert devs[0].kind == "cpu"
    assert devs[0].env == {"CUDA_VISIBLE_DEVICES": ""}


def test_auto_uses_every_gpu_and_pins_each_worker_to_one():
    devs = parse_devices(None, gpus=TWO)
    assert [d.name for d in devs] == ["cuda:0", "cuda:1"]
    # By UUID: nvidia-smi numbers GPUs in PCI order, CUDA by default does not.
    assert devs[1].env == {"CUDA_VISIBLE_DEVICES": "GPU-bbbb"}
    assert devs[1].memory_free == 60 * GIB


@pytest.mark.parametrize("spec,names", [
    ("cpu", ["cpu:0"]),
    ("CPU", ["cpu:0"]),
    ("cpu:1", ["cpu:0"]),
    ("cpu:3", ["cpu:0", "cpu:1", "cpu:2"]),
    ("0,1,3", ["cuda:0", "cuda:1", "cuda:3"]),
    ("3, 1", ["cuda:3", "cuda:1"]),
    ("2", ["cuda:2"]),
])
def test_valid_specs(spec, names):
    assert [d.name for d in parse_devices(spec, gpus=FOUR)] == names


def test_cpu_specs_never_look_for_gpus(monkeypatch, tmp_path):
    # an nvidia-smi on PATH that leaves a mark when it is run
    mark = tmp_path / "ran"
    fake = tmp_path / "nvidia-smi"
    fake.write_text(f"#!/bin/sh\n/usr/bin/touch {mark}\nexit 0\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert [d.name for d in parse_devices("cpu:2")] == ["cpu:0", "cpu:1"]
    assert [d.name for d in parse_devices("cpu")] == ["cpu:0"]
    assert not mark.exists()
    parse_devices("auto")  # the check can fail: auto does look
    assert mark.exists()


@pytest.mark.parametrize("spec,gpus,words", [
    ("9", TWO, ["no GPU 9", "2 GPUs (0, 1)"]),
    ("0,2", TWO, ["no GPU 2"]),
    ("0,0", TWO, ["named twice"]),
    ("0", [], ["no CUDA GPU", "--devices cpu"]),
    ("cpu:0", TWO, ["1..64"]),
    ("cpu:65", TWO, ["1..64"]),
    ("cpu:x", TWO, ["expected auto, cpu, cpu:N"]),
    ("gpu", TWO, ["expected auto"]),
    ("0,,1", TWO, ["expected auto"]),
    ("-1", TWO, ["expected auto"]),
])
def test_bad_specs_name_the_problem(spec, gpus, words):
    with pytest.raises(DeviceError) as err:
        parse_devices(spec, gpus=gpus)
    for w in words:
        assert w in str(err.value)


def test_parse_nvidia_smi_rows():
    text = ("0, GPU-1f2e, 81559 MiB, 80000 MiB\n"
            "1, GPU-9a9a, 24576 MiB, 1024 MiB\n"
            "No devices were found\n")
    gpus = parse_nvidia_smi(text)
    assert [g.index for g in gpus] == [0, 1]
    assert gpus[0].uuid == "GPU-1f2e"
    assert gpus[1].memory_total == 24576 * 1024 * 1024
    assert gpus[1].memory_free == 1024 * 1024 * 1024
    # the three-column form of the query (no uuid) is read too
    assert parse_nvidia_smi("3, 1000 MiB, 500 MiB")[0] == Gpu(3, "", 1000 << 20, 500 << 20)


@pytest.fixture
def fake_nvidia_smi(tmp_path, monkeypatch):
    """A real `nvidia-smi` executable on PATH that lists two GPUs."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    exe = bindir / "nvidia-smi"
    exe.write_text(
        f"#!{sys.executable}\n"
        "import sys\n"
        "assert any(a.startswith('--query-gpu=index') for a in sys.argv), sys.argv\n"
        "print('0, GPU-aaaa, 24576 MiB, 24000 MiB')\n"
        "print('1, GPU-bbbb, 81920 MiB, 81000 MiB')\n")
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return exe


def test_discovery_runs_nvidia_smi(fake_nvidia_smi):
    gpus = discover_gpus()
    assert [g.uuid for g in gpus] == ["GPU-aaaa", "GPU-bbbb"]
    assert [d.name for d in parse_devices("auto")] == ["cuda:0", "cuda:1"]
    with pytest.raises(DeviceError, match="there is no GPU 9; this machine has 2 GPUs"):
        parse_devices("9")


def test_discovery_respects_our_own_cuda_visible_devices(fake_nvidia_smi, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert [d.name for d in parse_devices("auto")] == ["cuda:1"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-aaaa")
    assert [d.name for d in parse_devices("auto")] == ["cuda:0"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert [d.name for d in parse_devices("auto")] == ["cpu:0"]


def test_no_nvidia_smi_means_no_gpus(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert discover_gpus() == []
    assert [d.name for d in parse_devices("auto")] == ["cpu:0"]


# -- defaults from memory ------------------------------------------------------------------

REAL = model_footprint("/nonexistent")  # the full-size model's figures


def _gpu(total_gib: float, free_gib: float | None = None) -> Device:
    free = total_gib if free_gib is None else free_gib
    return Device("cuda:0", "cuda", 0, int(total_gib * GIB), int(free * GIB))


def test_cpu_defaults_to_batch_one_keep_loaded():
    cpu = Device("cpu:0", "cpu", 0)
    assert default_batch_size(cpu, REAL, "keep_loaded") == 1
    assert default_residency(cpu, REAL) == "keep_loaded"


def test_small_card_gets_one_shot_big_card_keep_loaded():
    assert default_residency(_gpu(8), REAL) == "one_shot"
    assert default_residency(_gpu(80), REAL) == "keep_loaded"


def test_batch_size_grows_with_free_memory():
    small = default_batch_size(_gpu(24), REAL, "one_shot")
    big = default_batch_size(_gpu(80), REAL, "keep_loaded")
    busy = default_batch_size(_gpu(80, free_gib=12), REAL, "keep_loaded")
    assert 1 <= small < big <= 16
    assert busy < big
    assert default_batch_size(_gpu(8), REAL, "keep_loaded") == 1  # never below one


def test_the_memory_model_of_the_full_size_model_from_its_formula():
    # KV cache: K and V x 24 layers x 8 KV heads x 64 x 2 bytes, per row per token
    assert REAL.kv_bytes_per_token == 2 * 24 * 8 * 64 * 2
    # prompt + max new tokens, capped at max_seq_len
    assert REAL.context_tokens == min(25600, 4096 + 23552) and REAL.kv_row_bytes == 49152 * 25600
    # super-res at the real length: (2048 prompt + 11776 frames) x (6 x 2048 + 3 x 5632) x 2
    assert REAL.superres_row_bytes == 13824 * (6 * 2048 + 3 * 5632) * 2
    # the codec window: 1920 frames x hop 2048 x 192 channels, 8 live copies, fp32
    assert REAL.codec_window_bytes == 8 * 1920 * 2048 * 192 * 4
    assert "KV cache" in REAL.explain() and "codec window" in REAL.explain()


def test_peak_is_the_busiest_stage_plus_what_stays_resident():
    one = needs(REAL, "one_shot", 4)
    assert one == max(REAL.stage_bytes["backbone"] + 4 * REAL.kv_row_bytes,
                      REAL.stage_bytes["superres"] + REAL.superres_row_bytes,  # a row at a time
                      REAL.stage_bytes["codec"] + REAL.codec_window_bytes) + HEADROOM
    assert needs(REAL, "keep_loaded", 4) > one


def test_stage_peaks_add_rows_and_resident_weights():
    one, two = REAL.stage_peaks("keep_loaded", 1), REAL.stage_peaks("keep_loaded", 2)
    assert two["backbone"] - one["backbone"] == REAL.kv_row_bytes
    assert two["superres"] == one["superres"]  # super-res runs one row at a time
    assert two["codec"] == one["codec"] == REAL.all_bytes + REAL.codec_window_bytes
    shot = REAL.stage_peaks("one_shot", 1)
    assert shot["superres"] == REAL.stage_bytes["superres"] + REAL.superres_row_bytes
    assert needs(REAL, "one_shot", 3) == max(REAL.stage_peaks("one_shot", 3).values()) + HEADROOM


def test_footprint_for_a_song_length_and_dtype(demo_model_dir: Path):
    cap, short = model_footprint(demo_model_dir), model_footprint(demo_model_dir, tokens=100)
    assert short.context_tokens < cap.context_tokens and short.kv_row_bytes < cap.kv_row_bytes
    assert short.codec_window_bytes < cap.codec_window_bytes  # 50 frames, not a whole window
    fp32 = model_footprint(demo_model_dir, dtype_bytes=4)  # files are bf16: weights double
    assert fp32.stage_bytes["backbone"] == 2 * cap.stage_bytes["backbone"]
    assert fp32.stage_bytes["codec"] == cap.stage_bytes["codec"]  # the codec is stored fp32
    assert fp32.kv_bytes_per_token == 2 * cap.kv_bytes_per_token


def test_footprint_of_the_demo_model(demo_model_dir: Path):
    fp = model_footprint(demo_model_dir)
    assert fp.stage_bytes["backbone"] == (demo_model_dir / "backbone.safetensors").stat().st_size
    assert 0 < fp.all_bytes < 50_000_000
    assert 0 < fp.row_bytes < REAL.row_bytes


def test_plan_devices_applies_overrides_and_checks_them(demo_model_dir: Path):
    plans = plan_devices("cpu:2", demo_model_dir)
    assert [(p.device.name, p.batch_size, p.residency) for p in plans] == [
        ("cpu:0", 1, "keep_loaded"), ("cpu:1", 1, "keep_loaded")]
    plans = plan_devices("cpu", demo_model_dir, batch_size=3, residency="one_shot")
    assert (plans[0].batch_size, plans[0].residency) == (3, "one_shot")
    with pytest.raises(DeviceError, match="batch-size"):
        plan_devices("cpu", demo_model_dir, batch_size=0)
    with pytest.raises(DeviceError, match="residency"):
        plan_devices("cpu", demo_model_dir, residency="sometimes")


def test_decode_path_is_eager_until_a_gpu_proves_another(demo_model_dir: Path, monkeypatch):
    one = TWO[:1]
    assert plan_devices("auto", demo_model_dir, gpus=one)[0].decode_path == "eager"
    assert "gpu-check" in default_decode_path("cuda")[1]
    monkeypatch.setattr(devices, "PROVEN_ON_CUDA", ("cuda_graphs", "compile"))
    assert plan_devices("auto", demo_model_dir, gpus=one)[0].decode_path == "cuda_graphs"
    assert plan_devices("cpu", demo_model_dir)[0].decode_path == "eager"  # proven on CUDA only
    off = plan_devices("auto", demo_model_dir, gpus=one, decode_path="eager")  # the switch off
    assert off[0].decode_path == "eager"


def test_decode_path_overrides_are_checked_against_the_devices(demo_model_dir: Path):
    assert plan_devices("cpu:2", demo_model_dir, decode_path="compile")[1].decode_path == "compile"
    assert plan_devices("0,1", demo_model_dir, gpus=TWO, decode_path="cuda_graphs")[1].decode_path \
        == "cuda_graphs"
    with pytest.raises(DeviceError, match="cuda_graphs needs CUDA GPUs, and cpu:0 is a CPU worker"):
        plan_devices("cpu", demo_model_dir, decode_path="cuda_graphs")
    with pytest.raises(DeviceError, match="--decode-path fast: expected one of eager, compile"):
        plan_devices("cpu", demo_model_dir, decode_path="fast")


def test_a_mixed_batch_is_sized_by_its_longest_row(demo_model_dir: Path):
    from khala_cli.runner.devices import batch_needs

    rows = [1000, 23552, 300]  # three songs: the second runs to the cap
    longest = model_footprint(demo_model_dir, tokens=23552)
    assert batch_needs(demo_model_dir, "keep_loaded", rows) == needs(longest, "keep_loaded", 3)
    assert batch_needs(demo_model_dir, "keep_loaded", rows) > batch_needs(
        demo_model_dir, "keep_loaded", [1000, 300, 300])
    # the default batch size is made for rows at the cap: any mix of songs fits it
    assert model_footprint(demo_model_dir).kv_row_bytes == longest.kv_row_bytes
