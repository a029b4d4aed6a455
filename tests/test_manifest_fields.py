"""The manifest's table of fields drives validation, `defaults`, --explain and the README."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from khala_cli.cli import _register, cli
from khala_cli.manifest import jobs as mf
from khala_cli.manifest.fields import FIELDS, JOB, SETTING, SETTING_KEYS, TOP, readme_table

_register()
ROOT = Path(__file__).resolve().parents[1]


def load(tmp_path: Path, doc: dict) -> mf.Manifest:
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return mf.load(path)


def one_job(**extra) -> dict:
    return {"model": "demo", "output_dir": "out",
            "jobs": [{"id": "a", "tags": ["Pop"], "lyrics": "x", **extra}]}


def test_readme_table_is_the_generated_one():
    readme = (ROOT / "README.md").read_text()
    assert readme_table() in readme, (
        "README's manifest table differs from khala_cli/manifest/fields.py; paste the output of "
        "python -c 'from khala_cli.manifest.fields import readme_table; print(readme_table())'")
    for name, f in FIELDS.items():
        if f.where != TOP:
            assert f"| `{name}`" in readme


def test_every_field_has_help_and_a_place():
    for f in FIELDS.values():
        assert f.help and f.where in (TOP, JOB, SETTING), f.name


# The defaults and ranges as the README and the reference state them, written out here rather
# than read from the table the code uses, so a changed default or range fails a test.
DEFAULTS = {"mode": "vocal", "duration": 3, "top_k_bb": 80, "temperature": 1.0, "top_k_sr": 10,
            "max_minutes": None, "seeds": (1,), "artist": "", "album": "", "year": None,
            "genre": "", "until": None, "gates": None}
RANGES = {"duration": (1, 10), "top_k_bb": (1, 200), "temperature": (0.6, 1.4),
          "top_k_sr": (1, 1024), "max_minutes": (0.05, 10.0), "year": (1000, 9999)}


def test_every_setting_has_a_pinned_default_and_range():
    assert set(SETTING_KEYS) == set(DEFAULTS)
    assert {n for n in SETTING_KEYS if FIELDS[n].limits} == set(RANGES)


def test_a_job_without_settings_gets_each_fields_default(tmp_path):
    job = load(tmp_path, one_job()).jobs[0]
    for name, want in DEFAULTS.items():
        assert getattr(job, name) == want, name


@pytest.mark.parametrize("name", sorted(RANGES))
def test_each_ranged_setting_is_checked_at_both_ends_in_defaults_and_jobs(tmp_path, name):
    lo, hi = RANGES[name]
    step = 1 if FIELDS[name].kind == "whole" else 0.01
    for where in ("defaults", "job"):
        for bad in (lo - step, hi + step):
            doc = one_job(**({name: bad} if where == "job" else {}))
            if where == "defaults":
                doc["defaults"] = {name: bad}
            with pytest.raises(mf.ManifestError) as exc:
                load(tmp_path, doc)
            prefix = "defaults." if where == "defaults" else ""
            assert f"field '{prefix}{name}'" in str(exc.value)
            assert f"out of range {lo:g}..{hi:g}" in str(exc.value)
        doc = one_job(**{name: hi})
        assert getattr(load(tmp_path, doc).jobs[0], name) == hi


@pytest.mark.parametrize("name", sorted(n for n, f in FIELDS.items() if f.where == JOB))
def test_job_only_fields_are_refused_in_defaults(tmp_path, name):
    doc = one_job()
    doc["defaults"] = {name: "x"}
    with pytest.raises(mf.ManifestError, match=f"field 'defaults.{name}': unknown key"):
        load(tmp_path, doc)


def test_validate_explain_prints_a_fields_rules():
    r = CliRunner().invoke(cli, ["validate", "--explain", "temperature"])
    assert r.exit_code == 0, r.output
    assert "backbone sampling temperature" in r.output
    assert "0.6..1.4" in r.output and "a job or `defaults`" in r.output
    r = CliRunner().invoke(cli, ["validate", "--explain", "defaults.seeds"])
    assert r.exit_code == 0 and "{from: 100, count: 8}" in r.output


def test_validate_explain_unknown_field_suggests_and_exits_2():
    r = CliRunner().invoke(cli, ["validate", "--explain", "temprature"])
    assert r.exit_code == 2
    assert "no such manifest field (did you mean 'temperature'?)" in r.output


def test_validate_without_manifest_or_explain_is_a_usage_error():
    r = CliRunner().invoke(cli, ["validate"])
    assert r.exit_code == 2 and "--explain" in r.output
