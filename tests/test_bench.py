"""`khala bench` runs end to end (on a tiny config) and prints the ratios it promises."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

import khala_cli.cli.bench  # noqa: F401  (registers the command)
from khala_cli.cli import cli

KEYS = ("decode_vs_naive", "batch8_vs_batch1", "superres_vs_padded", "superres_padding_factor",
        "backbone_tokens_per_s", "naive_tokens_per_s", "batch1_tokens_per_s",
        "batch8_tokens_per_s", "superres_pass_s", "superres_padded_pass_s")


def test_bench_json_on_tiny_config():
    result = CliRunner().invoke(cli, ["bench", "--json", "--tiny", "--threads", "1"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)  # one JSON object, nothing else on stdout
    for key in KEYS:
        assert isinstance(data[key], float) and data[key] > 0, key
    assert data["superres_padded_len"] > data["superres_seq_len"]
    assert abs(data["superres_padding_factor"]
               - data["superres_padded_len"] / data["superres_seq_len"]) < 1e-9
    assert set(data["targets"]) == {"decode_vs_naive", "batch8_vs_batch1", "superres_vs_padded"}


def test_bench_human_output_names_the_ratios():
    result = CliRunner().invoke(cli, ["bench", "--tiny"])
    assert result.exit_code == 0, result.output
    for name in ("decode vs naive", "batch 8 vs 1", "super-res vs padded"):
        assert name in result.stdout


def test_bench_help_hides_tiny():
    result = CliRunner().invoke(cli, ["bench", "--help"])
    assert result.exit_code == 0 and "--json" in result.output and "--tiny" not in result.output


@pytest.mark.slow
def test_e2e_bench_renders_songs_of_the_exact_length_on_every_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the bench model is cached under ./checkpoints
    result = CliRunner().invoke(cli, ["bench", "--e2e", "--json", "--scale", "0.02",
                                      "--minutes", "0.02", "--batches", "1,2",
                                      "--paths", "eager", "--threads", "1"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["shape"]["vocab"] == [130432, 193792] and data["minutes"] == 0.02
    runs = {(r["batch"], r["residency"], r["path"]) for r in data["results"]}
    assert runs == {(b, res, "eager") for b in (1, 2) for res in ("keep_loaded", "one_shot")}
    for r in data["results"]:
        assert r["tokens_equal_eager"] is True
        assert r["backbone_s"] > 0 and r["superres_s"] > 0 and r["decode_s"] > 0
        assert set(r["peak_mem_gb"]) == set(r["model_peak_gb"]) == {"backbone", "superres", "decode"}
        assert r["songs_per_minute"] > 0
        # random weights never end a song: every row decodes the whole length
        assert r["tokens_per_s_all"] == pytest.approx(r["batch"] * r["tokens_per_s_row"],
                                                      rel=1e-3)
    # the runner's memory model of each run (its terms: test_runner_devices): one_shot holds
    # one stage's weights, keep_loaded all three
    modelled = {(r["batch"], r["residency"]): r["model_peak_gb"] for r in data["results"]}
    assert all(modelled[b, "one_shot"][s] < modelled[b, "keep_loaded"][s]
               for b in (1, 2) for s in ("backbone", "superres", "decode"))
    model = tmp_path / "checkpoints" / "bench-e2e-0.02" / "model.json"
    assert json.loads(model.read_text())["demo"] is True  # random weights: noise


def test_gpu_check_script_is_valid_shell():
    import shutil
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "tools" / "gpu-check"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    if shutil.which("shellcheck"):
        proc = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout
