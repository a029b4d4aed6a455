"""`khala bench` runs end to end (on a tiny config) and prints the ratios it promises."""

from __future__ import annotations

import json

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
