"""`khala bench` runs end to end (on a tiny config) and prints the ratios it promises."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

import khala_cli.cli.bench  # noqa: F401  (registers the command)
from khala_cli.cli import cli

KEYS = ("decode_vs_naive", "batch8_vs_batch1", "superres_vs_padded", "superres_padding_factor",
        "backbone_tokens_per_s", "naive_tokens_per_s", "batch1_tokens_per_s",
        "batch8_tokens_per_s", "superres_pass_s", "superres_padded_pass_s",
        "catalogue_b8_vs_b1", "catalogue_mixed_vs_sweep", "catalogue_settings_cost",
        "reroll_vs_full", "reroll_backbone_vs_full")


def test_bench_json_on_tiny_config():
    result = CliRunner().invoke(cli, ["bench", "--json", "--tiny", "--threads", "1"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)  # one JSON object, nothing else on stdout
    for key in KEYS:
        assert isinstance(data[key], float) and data[key] > 0, key
    assert data["superres_padded_len"] > data["superres_seq_len"]
    assert abs(data["superres_padding_factor"]
               - data["superres_padded_len"] / data["superres_seq_len"]) < 1e-9
    assert set(data["targets"]) == {"decode_vs_naive", "batch8_vs_batch1", "superres_vs_padded",
                                    "catalogue_b8_vs_b1"}
    # the catalogue case: 8 songs in one batch decode the tokens they decode one at a time
    assert data["catalogue_songs"] == 8 and data["catalogue_tokens_equal"] is True
    assert set(data["catalogue_songs_per_minute"]) == {"1", "8"}
    # the re-roll case: from the middle of the song, with its seed, the parent comes back
    assert data["reroll_equal_parent"] is True
    assert data["reroll_steps_saved"] == data["reroll_kept_tokens"] == data["reroll_tokens"] // 2


def test_bench_human_output_names_the_ratios():
    result = CliRunner().invoke(cli, ["bench", "--tiny"])
    assert result.exit_code == 0, result.output
    for name in ("decode vs naive", "batch 8 vs 1", "super-res vs padded", "catalogue 8 vs 1",
                 "songs/min", "tokens equal", "re-roll vs full", "backbone steps saved 12 of 24",
                 "super-res and decode still cover the whole song"):
        assert name in result.stdout


def test_bench_reroll_case_times_a_full_render_against_a_reroll_from_the_middle():
    from khala_cli.engine import bench

    log: list[str] = []
    with bench._random_pipeline(bench.TINY, "cpu") as pipe:
        r = bench._reroll(pipe, bench.TINY, log.append)
    assert r["reroll_tokens"] == bench.TINY.decode_tokens  # random weights run to the cap
    assert r["reroll_kept_tokens"] == r["reroll_steps_saved"] == bench.TINY.decode_tokens // 2
    assert r["reroll_replay_chunks"] == 1 and r["reroll_equal_parent"] is True
    assert r["reroll_vs_full"] > 0 and r["reroll_backbone_vs_full"] > 0
    assert set(r["reroll_stage_s"]) == {"full", "reroll"}
    for stages in r["reroll_stage_s"].values():  # both cover the whole song past the backbone
        assert set(stages) == {"backbone_s", "superres_s", "decode_s"}
        assert stages["superres_s"] > 0 and stages["decode_s"] > 0
    assert "re-rolled from frame 6" in log[-1]


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
    # the catalogue case: 8 different songs in one batch decode what they decode alone
    (cat,) = data["catalogue"]
    assert cat["songs"] == 8 and cat["tokens_equal"] is True and cat["ratio"] > 0
    assert len(set(cat["prompt_tokens"])) == 8 and set(cat["songs_per_minute"]) == {"1", "8"}
    # the first keep_loaded run of each batch size is eager's reference; one_shot is compared
    # with it, so its equality says something
    refs = {(r["batch"], r["residency"]) for r in data["results"] if r["eager_reference"]}
    assert refs == {(1, "keep_loaded"), (2, "keep_loaded")}
    for r in data["results"]:
        assert r["tokens_equal_eager"] is True
        assert r["backbone_s"] > 0 and r["superres_s"] > 0 and r["decode_s"] > 0
        assert set(r["peak_mem_gb"]) == set(r["model_peak_gb"]) == {"backbone", "superres", "decode"}
        assert r["songs_per_minute"] > 0
        # random weights never end a song: every row decodes the whole length, 2584 tokens a
        # minute, and the aggregate rate counts every row's tokens
        assert r["backbone_tokens"] == [round(2584 * 0.02)] * r["batch"]
        assert r["tokens_per_s_all"] == pytest.approx(r["batch"] * r["tokens_per_s_row"],
                                                      rel=1e-3)
    # the runner's memory model of each run (its terms: test_runner_devices): one_shot holds
    # one stage's weights, keep_loaded all three
    modelled = {(r["batch"], r["residency"]): r["model_peak_gb"] for r in data["results"]}
    assert all(modelled[b, "one_shot"][s] < modelled[b, "keep_loaded"][s]
               for b in (1, 2) for s in ("backbone", "superres", "decode"))
    model = tmp_path / "checkpoints" / "bench-e2e-0.02" / "model.json"
    assert json.loads(model.read_text())["demo"] is True  # random weights: noise


@pytest.mark.slow
def test_e2e_bench_appends_each_run_and_checks_later_runs_against_saved_eager_tokens(
        tmp_path, monkeypatch):
    import numpy as np

    monkeypatch.chdir(tmp_path)
    lines, eager = tmp_path / "runs.jsonl", tmp_path / "eager"
    common = ["bench", "--e2e", "--json", "--scale", "0.02", "--minutes", "0.01", "--threads",
              "1", "--paths", "eager", "--eager-codes", str(eager), "--results-jsonl", str(lines)]

    def bench(*args: str) -> list[dict]:
        result = CliRunner().invoke(cli, [*common, *args])
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)["results"]

    runs = bench("--batches", "1,2", "--residencies", "keep_loaded")
    written = [json.loads(line) for line in lines.read_text().splitlines()]
    assert [w["figures"] for w in written] == runs  # one line per run, the run's figures
    assert [(w["step"], w["status"], w["run"]) for w in written] == [
        ("e2e run", "pass", f"float32 B={b} keep_loaded eager 0.01 min") for b in (1, 2)]
    assert sorted(p.name for p in eager.iterdir()) == [
        f"eager-float32-B{b}-0.01min-scale0.02.npy" for b in (1, 2)]
    # a later process compares with the saved tokens: one_shot renders keep_loaded's ...
    (later,) = bench("--batches", "1", "--residencies", "one_shot")
    assert later["tokens_equal_eager"] is True
    # ... and sees a reference that differs in one token
    ref = eager / "eager-float32-B1-0.01min-scale0.02.npy"
    codes = np.load(ref)
    codes[0, 0, 0] = (codes[0, 0, 0] + 1) % 1024
    np.save(ref, codes)
    (changed,) = bench("--batches", "1", "--residencies", "one_shot")
    assert changed["tokens_equal_eager"] is False
    assert len(lines.read_text().splitlines()) == 4


def test_e2e_bench_refuses_an_unknown_residency():
    result = CliRunner().invoke(cli, ["bench", "--e2e", "--residencies", "keep_loaded,twice"])
    assert result.exit_code == 2 and "'twice': use keep_loaded or one_shot" in result.output


def test_gpu_check_script_is_valid_shell():
    import shutil
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "tools" / "gpu-check"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    if shutil.which("shellcheck"):
        proc = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout
