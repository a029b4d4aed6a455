"""The review page: every take of an output directory on one self-contained HTML file.

    <output_dir>/reports/index.html

Built from what is on disk (every sidecar, and the latest report of each shard, never every
report ever written), so shards that finish at different times all appear. No server, no
CDN: the CSS and JS are inlined and every link is relative, so the folder can be copied
anywhere and the page still plays.
Players use preload="none" and waveforms are drawn only when they scroll into view, so a
page of 10,000 takes opens in seconds. No torch here.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import quote

from khala_cli import __version__
from khala_cli.outputs import atomic_path, superseded_usage
from khala_cli.review.keep import read_marks
from khala_cli.review.takes import TakeFile, check_output_dir, latest_reports, read_takes

PAGE = "index.html"


@dataclass
class JobView:
    """One job's takes (best first), its failed renders and what it asked for."""

    job_id: str
    takes: list[dict[str, Any]] = field(default_factory=list)
    failed: list[dict[str, Any]] = field(default_factory=list)

    @property
    def first(self) -> dict[str, Any]:
        return self.takes[0] if self.takes else {}

    @property
    def title(self) -> str:
        return self.first.get("title") or self.job_id


def sort_key(take: dict[str, Any]) -> tuple:
    """Best first: by score, then takes without an analysis, by seed."""
    score = (take.get("analysis") or {}).get("score")
    return (score is None, -(score or 0.0), take.get("seed", 0))


def gather(output_dir: Path) -> tuple[list[JobView], list[TakeFile], list[dict[str, Any]]]:
    """(jobs with their takes sorted, unreadable sidecars, the latest report of each shard,
    oldest first). Failed renders come from those reports: a failure that a later run of
    the same shard rendered, or tried again, is not shown."""
    jobs: dict[str, JobView] = {}
    unreadable = []
    on_disk = set()
    for t in read_takes(output_dir):
        if t.data is None:
            unreadable.append(t)
            continue
        d = dict(t.data, _dir=t.path.parent.name)
        jobs.setdefault(str(d["job_id"]), JobView(str(d["job_id"]))).takes.append(d)
        on_disk.add((str(d["job_id"]), d.get("seed")))
    runs = latest_reports(output_dir)
    last: dict[tuple, dict[str, Any]] = {}
    for run in runs:
        for e in run.get("renders") or []:
            if e.get("status") in ("rendered", "failed"):
                last[(str(e.get("job_id")), e.get("seed"))] = dict(e, _run=_report_name(run))
    for (job, seed), e in sorted(last.items(), key=lambda kv: (kv[0][0], str(kv[0][1]))):
        if e["status"] == "failed" and (job, seed) not in on_disk:
            jobs.setdefault(job, JobView(job)).failed.append(e)
    for j in jobs.values():
        j.takes.sort(key=sort_key)
    return sorted(jobs.values(), key=lambda j: j.job_id), unreadable, runs


def _report_name(run: dict[str, Any]) -> str:
    return str(run.get("file") or run.get("started_at") or "")


def summary(jobs: list[JobView], latest: list[dict[str, Any]], output_dir: Path
            ) -> dict[str, Any]:
    """What the top of the page says: takes on disk, failures, the latest run of each shard,
    and the versions moved aside."""
    takes = [t for j in jobs for t in j.takes]
    superseded, superseded_bytes = superseded_usage(output_dir)
    busy: dict[str, float] = {}
    for r in latest:
        for dev, s in (r["summary"].get("device_busy_s") or {}).items():
            busy[dev] = busy.get(dev, 0.0) + float(s)
    rendered = sum(int(r["summary"].get("rendered", 0)) for r in latest)
    wall = max((float(r["summary"].get("wall_s") or 0.0) for r in latest), default=0.0)
    return {
        "takes": len(takes),
        "flagged": sum(1 for t in takes if (t.get("analysis") or {}).get("flags")),
        "failed": sum(len(j.failed) for j in jobs),
        "audio_minutes": round(sum((t.get("audio") or {}).get("seconds", 0.0)
                                   for t in takes) / 60.0, 2),
        "last_run_rendered": rendered,
        "renders_per_hour": round(rendered / (wall / 3600.0), 1) if wall > 0 else None,
        "device_busy_s": busy,
        "demo": any((t.get("model") or {}).get("demo") for t in takes),
        "superseded": superseded, "superseded_bytes": superseded_bytes,
        "run_reports": len(list((output_dir / "reports").glob("run-*.json"))),
    }


# ---- HTML ------------------------------------------------------------------------------

def _e(x: Any) -> str:
    return html.escape("" if x is None else str(x), quote=True)


def _href(take: dict[str, Any], kind: str) -> str | None:
    name = (take.get("files") or {}).get(kind)
    return f"../{quote(take['_dir'])}/{quote(name)}" if name else None


def _num(x: Any, fmt: str, unit: str = "") -> str:
    return "–" if x is None else f"{format(x, fmt)}{unit}"


def _hms(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def take_html(rank: int, t: dict[str, Any], kept: bool = False) -> str:
    a = t.get("analysis") or {}
    tid = f"{t.get('job_id')}:{t.get('seed')}"
    flags = a.get("flags") or []
    mp3 = _href(t, "mp3")
    player = (f'<audio controls preload="none" src="{mp3}"></audio>' if mp3
              else '<span class="missing">no MP3</span>')
    badges = "".join(f'<span class="flag">{_e(f)}</span>' for f in flags)
    if not a:
        badges = '<span class="flag unknown">not analysed</span>'
    timings = t.get("timings") or {}
    links = " ".join(f'<a href="{h}">{k}</a>' for k, h in
                     (("wav", _href(t, "wav")), ("mp3", mp3)) if h)
    demo = '<span class="demo">noise (demo model)</span>' if (t.get("model") or {}).get("demo") else ""
    cls = "take flagged" if flags else "take"
    return (
        f'<li class="{cls}" data-score="{_e(a.get("score"))}" data-seed="{_e(t.get("seed"))}" '
        f'data-take="{_e(tid)}" data-kept="{int(kept)}">'
        f'<label class="keep" title="keep this take"><input type="checkbox" class="keep-box"'
        f'{" checked" if kept else ""}> keep</label>'
        f'<span class="rank">{rank}</span>'
        f'<span class="seed">seed {_e(t.get("seed"))}</span>'
        f'<canvas class="wave" width="240" height="36" data-peaks="{_e(a.get("peaks", ""))}">'
        f'</canvas>{player}'
        f'<span class="facts">{_hms((t.get("audio") or {}).get("seconds", 0))} · '
        f'{_num(a.get("lufs"), ".1f", " LUFS")} · {_num(a.get("true_peak_db"), ".1f", " dBTP")}'
        f' · score {_num(a.get("score"), ".3f")}</span>'
        f'<span class="flags">{badges}{demo}</span>'
        f'<span class="meta">{_num(timings.get("total_s"), ".1f", " s")}{_shared(t)} on '
        f'{_e(t.get("device"))} · {links}</span></li>'
    )


def _shared(t: dict) -> str:
    """" in a batch of 8 (3 songs)" when the render time was shared by batch-mates."""
    b = t.get("batch") or {}
    size, songs = b.get("size") or 1, b.get("songs") or 1
    if size <= 1:
        return ""
    return f" in a batch of {_e(size)}" + (f" ({_e(songs)} songs)" if songs > 1 else "")


def job_html(j: JobView, kept: set[tuple[str, int]] = frozenset()) -> str:
    f = j.first
    what = (f"tags: {', '.join(f.get('tags') or [])}" if f.get("prompt_mode") == "tags"
            else f"prompt: {f.get('prompt') or ''}")
    settings = (f"{f.get('mode', '')} · {f.get('duration_min', '')} min · top_k "
                f"{f.get('top_k_bb', '')}/{f.get('top_k_sr', '')} · temperature "
                f"{f.get('temperature', '')} · model {(f.get('model') or {}).get('name', '')}")
    lyrics = (f'<details><summary>lyrics</summary><pre>{_e(f.get("lyrics"))}</pre></details>'
              if f.get("lyrics") else "")
    takes = "".join(take_html(i + 1, t, (j.job_id, t.get("seed")) in kept)
                    for i, t in enumerate(j.takes))
    failed = "".join(
        f'<li>seed {_e(e.get("seed"))}: {_e(e.get("error") or "failed")} '
        f'<span class="meta">({_e(e.get("_run"))}; log {_e(e.get("log"))})</span></li>'
        for e in j.failed)
    search = f"{j.job_id} {j.title}".lower()
    return (
        f'<section class="job" id="job-{_e(j.job_id)}" data-search="{_e(search)}">'
        f'<h2>{_e(j.title)} <span class="id">{_e(j.job_id)}</span></h2>'
        f'<p class="what">{_e(what)}</p><p class="settings">{_e(settings)}</p>{lyrics}'
        f'<ol class="takes">{takes}</ol>'
        + (f'<h3>failed renders</h3><ul class="failed">{failed}</ul>' if failed else "")
        + "</section>"
    )


def jobs_table(jobs: list[JobView]) -> str:
    rows = []
    for j in jobs:
        flagged = sum(1 for t in j.takes if (t.get("analysis") or {}).get("flags"))
        best = (j.first.get("analysis") or {}).get("score")
        rows.append(
            f'<tr data-search="{_e((j.job_id + " " + j.title).lower())}">'
            f'<td><a href="#job-{_e(j.job_id)}">{_e(j.title)}</a></td><td>{_e(j.job_id)}</td>'
            f'<td>{len(j.takes)}</td><td>{flagged}</td><td>{len(j.failed)}</td>'
            f'<td>{_num(best, ".2f")}</td></tr>')
    return ('<table class="jobs"><thead><tr><th>title</th><th>id</th><th>takes</th>'
            '<th>flagged</th><th>failed</th><th>best score</th></tr></thead><tbody>'
            + "".join(rows) + "</tbody></table>")


def summary_html(s: dict[str, Any], runs: list[dict[str, Any]]) -> str:
    busy = ", ".join(f"{_e(d)} {_hms(v)}" for d, v in sorted(s["device_busy_s"].items())) or "–"
    rate = "–" if s["renders_per_hour"] is None else f"{s['renders_per_hour']:.1f}"
    cells = [("takes on disk", s["takes"]), ("flagged", s["flagged"]),
             ("failed", s["failed"]), ("audio", f"{s['audio_minutes']:.1f} min"),
             ("rendered in the last run", s["last_run_rendered"]),
             ("renders per hour (last run)", rate), ("device busy (last run)", busy),
             ("superseded (moved aside)", f"{s['superseded']} takes, "
              f"{s['superseded_bytes'] / 1e6:.1f} MB")]
    dl = "".join(f"<div><dt>{_e(k)}</dt><dd>{v if k == 'device busy (last run)' else _e(v)}"
                 "</dd></div>" for k, v in cells)
    run_rows = "".join(
        f"<tr><td>{_e(r.get('started_at'))}</td><td>{_e(r.get('shard') or '')}</td>"
        f"<td>{_e(r['summary'].get('rendered'))}</td><td>{_e(r['summary'].get('failed'))}</td>"
        f"<td>{_e(r['summary'].get('audio_minutes_rendered'))}</td>"
        f"<td>{_e(r['summary'].get('renders_per_hour'))}</td><td>{_e(_report_name(r))}</td>"
        "</tr>" for r in reversed(runs))
    n = s["run_reports"]
    runs_html = (f'<details><summary>the latest run of each shard ({n} run report'
                 f'{"s" if n != 1 else ""} in reports/)</summary><table class="runs"><thead><tr>'
                 "<th>started</th><th>shard</th><th>rendered</th><th>failed</th>"
                 "<th>audio min</th><th>renders/h</th><th>report</th></tr></thead><tbody>"
                 f"{run_rows}</tbody></table></details>") if runs else ""
    return f'<dl class="summary">{dl}</dl>{runs_html}'


def _asset(name: str) -> str:
    return resources.files("khala_cli").joinpath("data", name).read_text(encoding="utf-8")


def page_html(output_dir: Path) -> str:
    jobs, unreadable, runs = gather(output_dir)
    s = summary(jobs, runs, output_dir)
    demo = ('<p class="banner">Takes marked "noise" come from the demo model, which is tiny '
            "and untrained: they are noise, not music.</p>") if s["demo"] else ""
    bad = "".join(f"<li>{_e(t.path.relative_to(output_dir))}: {_e(t.problem)}</li>"
                  for t in unreadable)
    bad_html = f'<section class="unreadable"><h2>unreadable sidecars</h2><ul>{bad}</ul></section>' \
        if bad else ""
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    kept = set(read_marks(output_dir))
    keep_bar = (f'<div id="keep-bar" data-dir="{_e(output_dir)}">'
                f'<span id="kept-count">{len(kept)} kept</span>'
                '<code id="keep-cmd"></code><button id="copy-keep" type="button">copy</button>'
                '<span id="copied"></span></div>')
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>khala review: {_e(output_dir.name)}</title><style>{_asset('review.css')}</style>"
        f'</head><body><header><h1>khala review <span class="id">{_e(output_dir.name)}</span>'
        f'</h1><p class="meta">built {stamp} by khala {__version__} from the files on disk</p>'
        f"{demo}{summary_html(s, runs)}</header>"
        '<div class="controls"><input id="search" type="search" placeholder="search titles '
        'and ids" autocomplete="off"><label><input id="hide-flagged" type="checkbox"> hide '
        'flagged takes</label><span id="shown"></span></div>'
        f"{keep_bar}<main>"
        f"{jobs_table(jobs)}{bad_html}{''.join(job_html(j, kept) for j in jobs)}</main>"
        f"<script>{_asset('review.js')}</script></body></html>\n"
    )


def write_page(output_dir: str | Path) -> Path:
    """Write <output_dir>/reports/index.html atomically; NotAnOutputDir for other folders."""
    root = check_output_dir(output_dir)
    path = root / "reports" / PAGE
    path.parent.mkdir(parents=True, exist_ok=True)
    text = page_html(root)
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path

