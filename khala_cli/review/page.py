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
from khala_cli.review.takes import TakeFile, check_output_dir, latest_reports, parent_of, read_takes

PAGE = "index.html"


@dataclass
class JobView:
    """One job's section: its takes (best first; each re-roll or extend of a take here sits
    under it, in `_children`), its failed renders, and its `until` goal when it fell short."""

    job_id: str
    takes: list[dict[str, Any]] = field(default_factory=list)
    failed: list[dict[str, Any]] = field(default_factory=list)
    short: dict[str, Any] | None = None

    @property
    def first(self) -> dict[str, Any]:
        return self.takes[0] if self.takes else {}

    @property
    def title(self) -> str:
        return self.first.get("title") or self.job_id

    def shown(self) -> list[tuple[dict[str, Any], int]]:
        """Every take of the section in page order, with its depth (0: a take of the job)."""
        out: list[tuple[dict[str, Any], int]] = []

        def walk(t: dict[str, Any], depth: int) -> None:
            out.append((t, depth))
            for c in t.get("_children") or []:
                walk(c, depth + 1)
        for t in self.takes:
            walk(t, 0)
        return out


def sort_key(take: dict[str, Any]) -> tuple:
    """Best first: by score, then takes without an analysis, by seed."""
    score = (take.get("analysis") or {}).get("score")
    return (score is None, -(score or 0.0), take.get("seed", 0))


def child_key(take: dict[str, Any]) -> tuple:
    """A take's children: by where they cut, then best first."""
    p = parent_of(take)
    return (p.cut_s if p else 0.0, *sort_key(take))


def _tid(take: dict[str, Any]) -> tuple[str, Any]:
    return str(take["job_id"]), take.get("seed")


def _orphan(take: dict[str, Any], by_take: dict[tuple, dict[str, Any]]) -> str | None:
    """Why a child cannot sit under its parent here, or None when it can."""
    p = parent_of(take)
    parent = by_take.get(p.take) if p else None
    if parent is None:
        return "the parent take is not in this folder"
    if p.render_key and parent.get("render_key") != p.render_key:
        return "the parent take was rendered again since"
    seen = {_tid(take)}
    while parent is not None:  # a hand-edited record could loop
        if _tid(parent) in seen:
            return "its parent records loop"
        seen.add(_tid(parent))
        up = parent_of(parent)
        parent = by_take.get(up.take) if up else None
    return None


def nest(takes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Put every re-roll and extend under its parent take (`_children`, by cut then best
    first); the takes left on top: takes of their own, and children whose parent is not
    here (`_orphan` says why)."""
    by_take = {_tid(t): t for t in takes}
    for t in takes:
        t["_children"] = []
    top = []
    for t in takes:
        p = parent_of(t)
        why = _orphan(t, by_take) if p else None
        if p is None or why:
            if why:
                t["_orphan"] = why
            top.append(t)
        else:
            by_take[p.take]["_children"].append(t)
    for t in takes:
        t["_children"].sort(key=child_key)
    return top


def shortfalls(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The `until` rows of the latest reports that fell short (met false), by job; a later
    report's row replaces an earlier one's. Reports without `until` add nothing."""
    last: dict[str, dict[str, Any]] = {}
    for run in runs:
        rows = run.get("until")
        for row in rows if isinstance(rows, list) else []:
            if isinstance(row, dict) and row.get("job_id") is not None:
                last[str(row["job_id"])] = row
    return {job: row for job, row in sorted(last.items()) if row.get("met") is False}


def gather(output_dir: Path) -> tuple[list[JobView], list[TakeFile], list[dict[str, Any]]]:
    """(jobs with their takes sorted, unreadable sidecars, the latest report of each shard,
    oldest first). Failed renders come from those reports: a failure that a later run of
    the same shard rendered, or tried again, is not shown."""
    jobs: dict[str, JobView] = {}
    unreadable, takes = [], []
    for t in read_takes(output_dir):
        if t.data is None:
            unreadable.append(t)
        else:
            takes.append(dict(t.data, _dir=t.path.parent.name))
    on_disk = {_tid(t) for t in takes}
    for t in nest(takes):
        jobs.setdefault(str(t["job_id"]), JobView(str(t["job_id"]))).takes.append(t)
    runs = latest_reports(output_dir)
    last: dict[tuple, dict[str, Any]] = {}
    for run in runs:
        for e in run.get("renders") or []:
            if e.get("status") in ("rendered", "failed"):
                last[(str(e.get("job_id")), e.get("seed"))] = dict(e, _run=_report_name(run))
    for (job, seed), e in sorted(last.items(), key=lambda kv: (kv[0][0], str(kv[0][1]))):
        if e["status"] == "failed" and (job, seed) not in on_disk:
            jobs.setdefault(job, JobView(job)).failed.append(e)
    for job, row in shortfalls(runs).items():
        if job in jobs:
            jobs[job].short = row
    for j in jobs.values():
        j.takes.sort(key=sort_key)
    return sorted(jobs.values(), key=lambda j: j.job_id), unreadable, runs


def _report_name(run: dict[str, Any]) -> str:
    return str(run.get("file") or run.get("started_at") or "")


def summary(jobs: list[JobView], latest: list[dict[str, Any]], output_dir: Path
            ) -> dict[str, Any]:
    """What the top of the page says: takes on disk, failures, the latest run of each shard,
    and the versions moved aside."""
    takes = [t for j in jobs for t, _ in j.shown()]
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


def lineage(t: dict[str, Any]) -> str:
    """What a re-roll or extend continues: "re-roll of seed 7 at 1:10" under its parent;
    with the parent's job and why, when the parent is not here. "" for a take of its own."""
    p = parent_of(t)
    if p is None:
        return ""
    of = f"seed {p.seed}" if "_orphan" not in t else f"{p.job_id} seed {p.seed}"
    what = "extended from" if p.kind == "extend" else "re-roll of"
    why = f"; {t['_orphan']}" if "_orphan" in t else ""
    return f"{what} {of} at {_hms(p.cut_s)}{why}"


def _cut(t: dict[str, Any]) -> str:
    """The cut as a fraction of the take's length (its waveform marks it), or ""."""
    p = parent_of(t)
    seconds = (t.get("audio") or {}).get("seconds") or 0
    return f"{min(max(p.cut_s / seconds, 0.0), 1.0):.6f}" if p and seconds > 0 else ""


def take_html(rank: int, t: dict[str, Any], kept: bool = False, depth: int = 0) -> str:
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
    cls = "take" + (" flagged" if flags else "") + (" child" if depth else "") + (
        " orphan" if "_orphan" in t else "")
    p, label = parent_of(t), lineage(t)
    parent = (f' data-parent="{_e(f"{p.job_id}:{p.seed}")}" style="--depth: {depth}"'
              if p else "")
    label_html = (f'<span class="lineage" title="{_e(tid)}, cut at {p.cut_s:.3f} s">'
                  f'{_e(label)} <span class="id">{_e(t.get("job_id"))}</span></span>'
                  if p else "")
    return (
        f'<li class="{cls}" data-score="{_e(a.get("score"))}" data-seed="{_e(t.get("seed"))}" '
        f'data-take="{_e(tid)}" data-kept="{int(kept)}"{parent}>'
        f'<label class="keep" title="keep this take"><input type="checkbox" class="keep-box"'
        f'{" checked" if kept else ""}> keep</label>'
        f'<span class="rank">{"↳" if depth else rank}</span>'
        f'<span class="seed">seed {_e(t.get("seed"))}</span>'
        f'<canvas class="wave" width="240" height="36" data-peaks="{_e(a.get("peaks", ""))}" '
        f'data-cut="{_cut(t)}"></canvas>{player}'
        f'<span class="facts">{_hms((t.get("audio") or {}).get("seconds", 0))} · '
        f'{_num(a.get("lufs"), ".1f", " LUFS")} · {_num(a.get("true_peak_db"), ".1f", " dBTP")}'
        f' · score {_num(a.get("score"), ".3f")}</span>'
        f'<span class="flags">{badges}{demo}</span>'
        f'<span class="meta">{_num(timings.get("total_s"), ".1f", " s")}{_shared(t)} on '
        f'{_e(t.get("device"))} · {links}</span>{label_html}</li>'
    )


def _shared(t: dict) -> str:
    """" in a batch of 8 (3 songs)" when the render time was shared by batch-mates."""
    b = t.get("batch") or {}
    size, songs = b.get("size") or 1, b.get("songs") or 1
    if size <= 1:
        return ""
    return f" in a batch of {_e(size)}" + (f" ({_e(songs)} songs)" if songs > 1 else "")


def short_text(row: dict[str, Any]) -> str:
    """ "1 of 2 passing after 16 takes (max_takes 16)": an `until` goal that was not met."""
    return (f"{row.get('passing', '?')} of {row.get('wanted', '?')} passing after "
            f"{row.get('takes', '?')} takes (max_takes {row.get('max_takes', '?')})")


def job_html(j: JobView, kept: set[tuple[str, int]] = frozenset()) -> str:
    f = j.first
    what = (f"tags: {', '.join(f.get('tags') or [])}" if f.get("prompt_mode") == "tags"
            else f"prompt: {f.get('prompt') or ''}")
    settings = (f"{f.get('mode', '')} · {f.get('duration_min', '')} min · top_k "
                f"{f.get('top_k_bb', '')}/{f.get('top_k_sr', '')} · temperature "
                f"{f.get('temperature', '')} · model {(f.get('model') or {}).get('name', '')}")
    lyrics = (f'<details><summary>lyrics</summary><pre>{_e(f.get("lyrics"))}</pre></details>'
              if f.get("lyrics") else "")
    shown = j.shown()
    ranks = iter(range(1, len(shown) + 1))
    takes = "".join(take_html(0 if depth else next(ranks), t, _tid(t) in kept, depth)
                    for t, depth in shown)
    failed = "".join(
        f'<li>seed {_e(e.get("seed"))}: {_e(e.get("error") or "failed")} '
        f'<span class="meta">({_e(e.get("_run"))}; log {_e(e.get("log"))})</span></li>'
        for e in j.failed)
    short = (f'<p class="short">short of its goal: {_e(short_text(j.short))}</p>'
             if j.short else "")
    return (
        f'<section class="job" id="job-{_e(j.job_id)}" data-search="{_e(_search(j))}">'
        f'<h2>{_e(j.title)} <span class="id">{_e(j.job_id)}</span></h2>'
        f'<p class="what">{_e(what)}</p><p class="settings">{_e(settings)}</p>{lyrics}{short}'
        f'<ol class="takes">{takes}</ol>'
        + (f'<h3>failed renders</h3><ul class="failed">{failed}</ul>' if failed else "")
        + "</section>"
    )


def _search(j: JobView) -> str:
    """What the search matches in a section: its job, its title and its children's jobs."""
    ids = dict.fromkeys([j.job_id, j.title] + [str(t["job_id"]) for t, _ in j.shown()])
    return " ".join(ids).lower()


def jobs_table(jobs: list[JobView]) -> str:
    rows = []
    for j in jobs:
        shown = [t for t, _ in j.shown()]
        flagged = sum(1 for t in shown if (t.get("analysis") or {}).get("flags"))
        best = max(((t.get("analysis") or {}).get("score") for t in shown
                    if (t.get("analysis") or {}).get("score") is not None), default=None)
        rows.append(
            f'<tr data-search="{_e(_search(j))}">'
            f'<td><a href="#job-{_e(j.job_id)}">{_e(j.title)}</a></td><td>{_e(j.job_id)}</td>'
            f'<td>{len(shown)}</td><td>{flagged}</td><td>{len(j.failed)}</td>'
            f'<td>{_num(best, ".2f")}</td></tr>')
    return ('<table class="jobs"><thead><tr><th>title</th><th>id</th><th>takes</th>'
            '<th>flagged</th><th>failed</th><th>best score</th></tr></thead><tbody>'
            + "".join(rows) + "</tbody></table>")


def shortfalls_html(jobs: list[JobView], runs: list[dict[str, Any]]) -> str:
    """The jobs that fell short of their `until` goal in the latest runs, each linked to the
    section that holds its takes."""
    where = {}
    for j in jobs:
        for t, _ in j.shown():
            where.setdefault(str(t["job_id"]), j.job_id)
        where.setdefault(j.job_id, j.job_id)
    items = []
    for job, row in shortfalls(runs).items():
        name = (f'<a href="#job-{_e(where[job])}">{_e(job)}</a>' if job in where
                else _e(job))
        items.append(f'<li data-job="{_e(job)}">{name}: {_e(short_text(row))}</li>')
    return (f'<section class="shortfalls"><h2>short of their goal (until)</h2><ul>'
            f'{"".join(items)}</ul></section>') if items else ""


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
        f"{demo}{summary_html(s, runs)}{shortfalls_html(jobs, runs)}</header>"
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

