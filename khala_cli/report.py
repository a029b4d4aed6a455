"""The run report: what the run did to each render it planned, and a summary.

Takes already done (skipped) are counted in the summary, never listed: a run that renders
nothing writes a short report however many takes the output directory holds. Listed: the
renders the run rendered, failed or did not finish, and the keepers it left alone because
their settings changed (`planned: "kept"`). An until-job's seeds left unrendered because
enough of its takes pass (`spare`) are counted too; its `until` row says how it stands.

    <output_dir>/reports/run-<UTC timestamp>.json | .csv    (one pair per run)
    <output_dir>/reports/latest.json | latest.csv           (a copy of the newest)

A sharded run (`--shard K/N`) names its files run-<ts>-shard-K-of-N.* and
latest-shard-K-of-N.*, so the tasks of one array never overwrite each other's reports.
No torch here.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from rich.table import Table

from khala_cli import __version__, exit_codes
from khala_cli.plan import Plan, PlannedRender

RESULT_STATUSES = ("rendered", "skipped", "failed", "cancelled", "spare")
CSV_COLUMNS = ("job_id", "seed", "status", "planned", "error", "seconds", "audio_seconds",
               "device", "attempts", "wav", "mp3", "json", "codes", "log", "key")


def utc_stamp(t: datetime) -> str:
    return t.astimezone(timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def utc_iso(t: datetime) -> str:
    return t.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _audio_seconds(json_path: Path) -> float | None:
    try:
        data = json.loads(json_path.read_text(encoding="utf-8"))
        return float(data["audio"]["seconds"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


@dataclass
class RunInfo:
    """What the report says about the run as a whole."""

    manifest: str
    output_dir: str
    model: dict[str, Any]  # name, dir, fingerprint, demo
    started_at: datetime
    finished_at: datetime
    interrupted: bool = False
    device_busy_s: dict[str, float] = field(default_factory=dict)
    shard: tuple[int, int] | None = None
    options: dict[str, Any] = field(default_factory=dict)
    excluded: int = 0
    no_space: dict[str, str] | None = None  # {path, error}: the output disk refused a write


def entry(item: PlannedRender, outcome: Any | None) -> dict[str, Any]:
    """One render's line of the report. `outcome` is a runner Outcome, or None if it never ran."""
    r = item.render
    e: dict[str, Any] = {
        "job_id": r.job_id, "seed": r.seed, "key": r.key, "planned": item.status,
        "status": "cancelled", "error": None, "seconds": None, "device": None, "attempts": 0,
        "audio_seconds": None, "files": {}, "log": None,
    }
    done_files = {"wav": str(r.path(".wav")), "mp3": str(r.path(".mp3")),
                  "json": str(r.path(".json"))}
    if r.save_codes:
        done_files["codes"] = str(r.path(".codes.npy"))
    if item.status in ("skip", "kept"):
        e.update(status="skipped", files=done_files, seconds=0.0,
                 audio_seconds=_audio_seconds(r.path(".json")))
        if item.status == "kept":
            e["reason"] = item.reason
        return e
    if item.status == "spare":
        e.update(status="spare", reason=item.reason, seconds=0.0)
        return e
    if outcome is None:
        e["error"] = "not started (the run was interrupted)"
        return e
    status = getattr(outcome, "status", "failed")
    e.update(
        status=status if status in RESULT_STATUSES else "failed",
        error=getattr(outcome, "error", None),
        seconds=round(float(getattr(outcome, "seconds", 0.0) or 0.0), 3),
        device=getattr(outcome, "device", None),
        attempts=int(getattr(outcome, "attempts", 0) or 0),
        log=getattr(outcome, "log", None),
    )
    if e["status"] == "rendered":
        files = dict(getattr(outcome, "files", None) or {}) or done_files
        e["files"] = files
        e["audio_seconds"] = _audio_seconds(Path(files.get("json", done_files["json"])))
    else:
        e["files"] = dict(getattr(outcome, "files", None) or {})
        if status not in RESULT_STATUSES and not e["error"]:
            e["error"] = f"unknown outcome status {status!r}"
    return e


def build(plan: Plan, outcomes: list[Any], run: RunInfo) -> dict[str, Any]:
    """The report as a JSON-able dict. Renders appear in plan order; skipped ones are only
    counted."""
    # Match by output files, not by render key: two jobs with equal settings share a key.
    by_file = {}
    for o in outcomes:
        by_file[o.render.path(".json")] = o  # the last outcome of a render wins
    entries = [entry(item, by_file.get(item.render.path(".json"))) for item in plan.items]
    counts = {s: 0 for s in RESULT_STATUSES}
    for e in entries:
        counts[e["status"]] += 1
    wall = max(0.0, (run.finished_at - run.started_at).total_seconds())
    rendered_s = sum(e["audio_seconds"] or 0.0 for e in entries if e["status"] == "rendered")
    all_s = sum(e["audio_seconds"] or 0.0 for e in entries
                if e["status"] in ("rendered", "skipped"))
    renders = [e for e in entries if e["planned"] not in ("skip", "spare")
               and e["status"] != "spare"]
    summary = {
        "planned": len(entries), **counts,
        "kept_not_rerendered": len(plan.kept),
        "excluded": run.excluded,
        "audio_minutes_rendered": round(rendered_s / 60.0, 3),
        "audio_minutes_total": round(all_s / 60.0, 3),
        "wall_s": round(wall, 3),
        "renders_per_hour": round(counts["rendered"] / (wall / 3600.0), 2) if wall > 0 else 0.0,
        "device_busy_s": {k: round(float(v), 3) for k, v in sorted(run.device_busy_s.items())},
        "interrupted": run.interrupted,
        "no_space": run.no_space,
        "exit_code": exit_codes.for_run(counts, run.interrupted, run.no_space is not None),
    }
    return {
        "khala_version": __version__,
        "manifest": run.manifest,
        "output_dir": run.output_dir,
        "model": run.model,
        "shard": f"{run.shard[0]}/{run.shard[1]}" if run.shard else None,
        "options": run.options,
        "started_at": utc_iso(run.started_at),
        "finished_at": utc_iso(run.finished_at),
        "summary": summary,
        "until": until_rows(plan, list(by_file.values())),
        "renders": renders,
    }


def until_rows(plan: Plan, outcomes: list[Any]) -> list[dict[str, Any]]:
    """One row per until-job of the plan: {job_id, passing, wanted, takes, max_takes, met},
    counting its takes on disk before the run and those the run rendered."""
    rows = []
    for roll in plan.rolls.values():
        new = [o for o in outcomes if o.render.job_id == roll.job_id
               and o.render.until is not None and o.status == "rendered"]
        row = roll.to_dict()
        row["passing"] += sum(bool(getattr(o, "passed", False)) for o in new)
        row["takes"] += len(new)
        row["met"] = row["passing"] >= row["wanted"]
        rows.append(row)
    return rows


def until_text(row: dict[str, Any]) -> str:
    """"1 of 2 passing after 16 takes" (after "5 of 16 takes" while seeds are left)."""
    takes = row["takes"] if row["takes"] >= row["max_takes"] else \
        f"{row['takes']} of {row['max_takes']}"
    return f"{row['passing']} of {row['wanted']} passing after {takes} takes"


def short_of_passing(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The until rows whose jobs have fewer passing takes than they want."""
    return [u for u in report.get("until") or () if not u["met"]]


def to_csv(report: dict[str, Any]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(CSV_COLUMNS), lineterminator="\n")
    w.writeheader()
    for e in report["renders"]:
        row = {k: e.get(k) for k in CSV_COLUMNS if k in e}
        files = e.get("files") or {}
        for k in ("wav", "mp3", "json", "codes"):
            row[k] = files.get(k, "")
        row = {k: ("" if v is None else v) for k, v in row.items()}
        w.writerow(row)
    return buf.getvalue()


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write(report: dict[str, Any], output_dir: str | Path, started_at: datetime,
          shard: tuple[int, int] | None = None) -> dict[str, Path]:
    """Write run-<ts>.json/.csv and latest.json/.csv under <output_dir>/reports/."""
    reports = Path(output_dir) / "reports"
    reports.mkdir(parents=True, exist_ok=True)
    suffix = f"-shard-{shard[0]}-of-{shard[1]}" if shard else ""
    base = f"run-{utc_stamp(started_at)}{suffix}"
    name, n = base, 1
    while (reports / f"{name}.json").exists() or (reports / f"{name}.csv").exists():
        n += 1
        name = f"{base}-{n}"
    report = dict(report, file=f"{name}.json")  # latest*.json say which run they copy
    text_json = json.dumps(report, indent=2, ensure_ascii=False) + "\n"
    text_csv = to_csv(report)
    paths = {
        "json": reports / f"{name}.json", "csv": reports / f"{name}.csv",
        "latest_json": reports / f"latest{suffix}.json",
        "latest_csv": reports / f"latest{suffix}.csv",
    }
    _write_atomic(paths["json"], text_json)
    _write_atomic(paths["csv"], text_csv)
    _write_atomic(paths["latest_json"], text_json)
    _write_atomic(paths["latest_csv"], text_csv)
    return paths


def _hms(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def summary_table(report: dict[str, Any]):
    """A rich Table summarising the run, for the terminal."""
    s = report["summary"]
    t = Table(title="khala render: summary", show_header=False, title_justify="left")
    t.add_column("what", style="bold")
    t.add_column("value")
    t.add_row("rendered", str(s["rendered"]))
    t.add_row("skipped (already done)", str(s["skipped"] - s.get("kept_not_rerendered", 0)))
    if s.get("kept_not_rerendered"):
        t.add_row("kept, settings changed: not re-rendered",
                  f"[yellow]{s['kept_not_rerendered']}[/yellow]")
    t.add_row("failed", f"[red]{s['failed']}[/red]" if s["failed"] else "0")
    if s.get("spare"):
        t.add_row("spare (until: enough takes pass)", str(s["spare"]))
    for u in short_of_passing(report):
        t.add_row(f"short: {u['job_id']}", f"[yellow]{until_text(u)}[/yellow]")
    if s["cancelled"]:
        t.add_row("not finished", f"[yellow]{s['cancelled']}[/yellow]")
    if s.get("excluded"):
        t.add_row("left to other shards / --only", str(s["excluded"]))
    t.add_row("audio rendered", f"{s['audio_minutes_rendered']:.2f} min")
    t.add_row("wall time", _hms(s["wall_s"]))
    t.add_row("renders per hour", f"{s['renders_per_hour']:.1f}")
    for dev, busy in s["device_busy_s"].items():
        t.add_row(f"busy {dev}", _hms(busy))
    model = report.get("model") or {}
    if model.get("demo"):
        t.add_row("model", "[yellow]demo: untrained, renders noise (not music)[/yellow]")
    elif model.get("name"):
        t.add_row("model", str(model["name"]))
    if s["interrupted"]:
        t.add_row("interrupted", "[yellow]yes[/yellow]")
    return t


def failures(report: dict[str, Any]) -> list[dict[str, Any]]:
    return [e for e in report["renders"] if e["status"] == "failed"]
