"""The run report: statuses, summary figures, JSON/CSV files, latest copies, exit codes."""

from __future__ import annotations

import csv
import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest

from khala_cli import exit_codes, outputs
from khala_cli import plan as pl
from khala_cli import report as rp
from khala_cli.runner import Outcome

T0 = datetime(2025, 3, 1, 22, 0, 0, tzinfo=timezone.utc)


def make_render(tmp_path: Path, job: str, seed: int) -> pl.Render:
    return pl.Render(job_id=job, seed=seed, key=f"{job}-{seed}-key", out_dir=str(tmp_path / job),
                     stem=f"{job}-s{seed}", title=job)


def take(r: pl.Render, seconds: float) -> dict[str, str]:
    audio = np.zeros((int(44100 * seconds), 2), np.float32)
    return outputs.write_take(r, audio, 44100, info={"model": {"demo": False}})


@pytest.fixture
def scenario(tmp_path):
    """Four renders: one done before the run (skip), one rendered, one failed, one cancelled."""
    rs = [make_render(tmp_path, "a", s) for s in (1, 2)] + \
         [make_render(tmp_path, "b", s) for s in (1, 2)]
    take(rs[0], 3.0)
    plan = pl.make_plan(rs, is_done=outputs.is_done)
    assert [i.status for i in plan.items] == ["skip", "todo", "todo", "todo"]
    files = take(rs[1], 9.0)
    outcomes = [
        Outcome(render=rs[1], status="rendered", seconds=120.0, device="cpu:0", attempts=1,
                files=files),
        Outcome(render=rs[2], status="failed", error="worker died (SIGKILL)", seconds=5.0,
                device="cpu:1", attempts=3, log=str(tmp_path / "w.log")),
        Outcome(render=rs[3], status="cancelled", error="interrupted before it was rendered"),
    ]
    return tmp_path, rs, plan, outcomes


def run_info(tmp_path: Path, **kw) -> rp.RunInfo:
    base = dict(manifest=str(tmp_path / "jobs.yaml"), output_dir=str(tmp_path),
                model={"name": "m", "fingerprint": "f", "demo": False}, started_at=T0,
                finished_at=T0 + timedelta(minutes=30), device_busy_s={"cpu:0": 125.0,
                                                                     "cpu:1": 5.0})
    base.update(kw)
    return rp.RunInfo(**base)


def test_build_report(scenario):
    tmp_path, rs, plan, outcomes = scenario
    rep = rp.build(plan, outcomes, run_info(tmp_path))
    statuses = [(e["job_id"], e["seed"], e["status"]) for e in rep["renders"]]
    # the take already done is counted, not listed
    assert statuses == [("a", 2, "rendered"), ("b", 1, "failed"), ("b", 2, "cancelled")]
    s = rep["summary"]
    assert (s["planned"], s["rendered"], s["skipped"], s["failed"], s["cancelled"]) == \
        (4, 1, 1, 1, 1)
    assert s["audio_minutes_rendered"] == pytest.approx(0.15)
    assert s["audio_minutes_total"] == pytest.approx(0.2)
    assert s["wall_s"] == 1800.0
    assert s["renders_per_hour"] == 2.0
    assert s["device_busy_s"] == {"cpu:0": 125.0, "cpu:1": 5.0}
    assert s["exit_code"] == 1
    failed = rep["renders"][1]
    assert failed["error"] == "worker died (SIGKILL)" and failed["attempts"] == 3
    assert failed["device"] == "cpu:1" and failed["log"].endswith("w.log")
    done = rep["renders"][0]
    assert done["files"]["wav"] == str(rs[1].path(".wav")) and done["seconds"] == 120.0
    assert done["audio_seconds"] == 9.0 and done["device"] == "cpu:0"
    assert rep["started_at"] == "2025-03-01T22:00:00Z"
    json.dumps(rep)  # JSON-able


def test_renders_never_started_are_cancelled(scenario):
    tmp_path, _, plan, outcomes = scenario
    rep = rp.build(plan, outcomes[:1], run_info(tmp_path, interrupted=True))
    assert [e["status"] for e in rep["renders"]] == ["rendered", "cancelled", "cancelled"]
    assert "interrupted" in rep["renders"][1]["error"]
    assert rep["summary"]["exit_code"] == 130


def test_jobs_with_equal_settings_keep_their_own_outcomes(tmp_path):
    """Two jobs with the same settings and seed share a render key, not a report line."""
    a, b = (pl.Render(job_id=j, seed=1, key="same-key", out_dir=str(tmp_path / j),
                      stem=f"{j}-s1") for j in ("a", "b"))
    plan = pl.make_plan([a, b], is_done=outputs.is_done)
    outcomes = [Outcome(render=a, status="rendered", seconds=1.0, files=take(a, 1.0)),
                Outcome(render=b, status="failed", error="boom")]
    rep = rp.build(plan, outcomes, run_info(tmp_path))
    assert [(e["job_id"], e["status"]) for e in rep["renders"]] == [("a", "rendered"),
                                                                    ("b", "failed")]


@pytest.mark.parametrize("counts,interrupted,code", [
    ({"rendered": 3, "skipped": 2}, False, 0), ({"skipped": 2}, False, 0),
    ({"rendered": 3, "failed": 1}, False, 1), ({"rendered": 1, "cancelled": 2}, False, 1),
    ({"rendered": 3}, True, 130), ({"failed": 3}, True, 130),
])
def test_exit_codes(counts, interrupted, code):
    assert exit_codes.for_run(counts, interrupted) == code


def test_write_json_csv_and_latest(scenario):
    tmp_path, _, plan, outcomes = scenario
    rep = rp.build(plan, outcomes, run_info(tmp_path))
    paths = rp.write(rep, tmp_path, T0)
    assert paths["json"] == tmp_path / "reports" / "run-20250301T220000Z.json"
    assert paths["csv"].name == "run-20250301T220000Z.csv"
    assert json.loads(paths["json"].read_text()) == dict(rep, file=paths["json"].name)
    assert paths["latest_json"].read_text() == paths["json"].read_text()
    assert paths["latest_csv"].read_text() == paths["csv"].read_text()
    rows = list(csv.DictReader(paths["csv"].open()))
    assert [r["status"] for r in rows] == ["rendered", "failed", "cancelled"]
    assert rows[1]["error"] == "worker died (SIGKILL)" and rows[1]["attempts"] == "3"
    assert rows[0]["wav"].endswith("a-s2.wav") and rows[0]["audio_seconds"] == "9.0"
    assert list(rows[0]) == list(rp.CSV_COLUMNS)

    # A second run in the same second gets its own file; latest points at it.
    rep2 = rp.build(plan, [], run_info(tmp_path, interrupted=True))
    paths2 = rp.write(rep2, tmp_path, T0)
    assert paths2["json"].name == "run-20250301T220000Z-2.json"
    assert json.loads(paths2["latest_json"].read_text())["summary"]["interrupted"] is True
    assert json.loads(paths["json"].read_text()) == dict(rep, file=paths["json"].name)  # untouched
    assert not list((tmp_path / "reports").glob(".tmp-*"))


def test_sharded_reports_do_not_collide(scenario):
    tmp_path, _, plan, outcomes = scenario
    rep = rp.build(plan, outcomes, run_info(tmp_path, shard=(3, 16)))
    assert rep["shard"] == "3/16"
    p3 = rp.write(rep, tmp_path, T0, shard=(3, 16))
    p4 = rp.write(rep, tmp_path, T0, shard=(4, 16))
    assert p3["json"].name == "run-20250301T220000Z-shard-3-of-16.json"
    assert p3["latest_json"].name == "latest-shard-3-of-16.json"
    assert p4["latest_csv"].name == "latest-shard-4-of-16.csv"


def test_summary_table_mentions_failures_and_demo(scenario):
    from rich.console import Console

    tmp_path, _, plan, outcomes = scenario
    rep = rp.build(plan, outcomes, run_info(tmp_path, model={"name": "demo", "demo": True}))
    console = Console(record=True, width=120)
    console.print(rp.summary_table(rep))
    text = console.export_text()
    assert "failed" in text and "renders per hour" in text and "busy cpu:0" in text
    assert "untrained" in text and "noise" in text
    assert [e["seed"] for e in rp.failures(rep)] == [1]
