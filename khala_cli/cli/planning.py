"""`khala validate`, `plan` and `tags`: what a manifest asks for, without rendering."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
from rich.table import Table

from khala_cli import exit_codes
from khala_cli.cli import Failure, cli, steps
from khala_cli.cli.display import out_console
from khala_cli.manifest.checks import closest, tag_catalogue
from khala_cli.manifest.fields import FIELDS, explain
from khala_cli.manifest.jobs import MAX_RENDERS
from khala_cli.plan import STATUSES, TO_RUN, Plan

MAX_RENDERS_OPTION = click.option(
    "--max-renders", type=click.IntRange(min=1), default=MAX_RENDERS, show_default=True,
    help="Refuse manifests with more renders (jobs x seeds) than this.")
MODEL_OPTION = click.option("--model", "model", metavar="DIR", help="Model directory (or "
                            "'demo') instead of the manifest's `model:`.")


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' if n != 1 else ''}"


@cli.command()
@click.argument("manifest", required=False,
                type=click.Path(exists=True, dir_okay=False, path_type=Path))
@MODEL_OPTION
@MAX_RENDERS_OPTION
@click.option("--explain", "field", metavar="FIELD", help="Print what a manifest field means, "
              "its type, range and default, and where it may sit; no MANIFEST needed.")
def validate(manifest: Path | None, model: str | None, max_renders: int,
             field: str | None) -> None:
    """Check MANIFEST without rendering: syntax, keys, ranges, seeds, ids, lyrics files, model.

    Exit 0 when valid, 2 with every error (file:line, job, field) when not, 3 when the model
    directory is not usable. Writes nothing.
    """
    if field is not None:
        click.echo(_explain(field))
        return
    if manifest is None:
        raise Failure(exit_codes.USAGE, "error: give a MANIFEST to check, or --explain FIELD")
    m = steps.load_manifest(manifest, max_renders=max_renders, model=model)
    model_dir, info = steps.model(m, build_demo=False)
    steps.ffmpeg()
    minutes = sum(j.est_minutes * len(j.seeds) for j in m.jobs)
    click.echo(f"ok: {manifest}: {_plural(len(m.jobs), 'job')}, "
               f"{_plural(m.render_count, 'render')}"
               + (" at most (until-jobs stop once enough takes pass)"
                  if any(j.until for j in m.jobs) else "")
               + f", ~{minutes:.1f} audio minutes; "
               f"output {m.output_dir}")
    if m.model == "demo":
        click.echo(steps.DEMO_LINE + ("" if info else " It is built on first use."))
    else:
        click.echo(f"model: {info.name} ({model_dir})")
    if m.warnings:
        click.echo(f"{_plural(len(m.warnings), 'warning')} (above)")


def _explain(field: str) -> str:
    name = field.strip().removeprefix("defaults.")
    if name not in FIELDS:
        sug = closest(name, list(FIELDS))
        raise Failure(exit_codes.USAGE, f"error: --explain {field}: no such manifest field"
                      + (f" (did you mean '{sug}'?)" if sug else "")
                      + f"; the fields are: {', '.join(FIELDS)}")
    return explain(name)


@cli.command("plan")
@steps.MANIFEST_ARG
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@MODEL_OPTION
@click.option("--output-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Output directory instead of the manifest's `output_dir:`.")
@click.option("--force", is_flag=True, help="Plan to re-render renders that are done.")
@click.option("--only", multiple=True, metavar="JOB_ID", help="Only these jobs (repeatable, "
              "or comma-separated).")
@click.option("--shard", metavar="K/N|auto", help="Only the renders of shard K of N (K from 0; "
              "auto: from a Slurm array or a Kubernetes Indexed Job).")
@click.option("--save-codes/--no-save-codes", default=None, help="Plan as `render` would "
              "with this option (default: the manifest's `save_codes`, true unless it says "
              "false).")
@MAX_RENDERS_OPTION
def plan_cmd(manifest: Path, as_json: bool, model: str | None, output_dir: Path | None,
             force: bool, only: tuple[str, ...], shard: str | None, save_codes: bool | None,
             max_renders: int) -> None:
    """Show what `khala render MANIFEST` would do: each render's status (todo: new;
    rerender: its outputs are from other settings, or --force; skip: already done; kept: a
    keeper whose settings or model changed, not re-rendered without --force; spare: an
    until-job's seed not needed, enough of its takes pass), what each until-job will do, and
    the audio minutes to render. Writes nothing to the output directory."""
    m = steps.load_manifest(manifest, max_renders=max_renders, output_dir=output_dir,
                            model=model, quiet=as_json)
    shard_t = steps.shard(shard)
    only_t = steps.only(m, only)
    model_dir, info = steps.model(m)
    p = steps.plan(m, info, force=force, only=only_t, shard=shard_t, save_codes=save_codes,
                   model_dir=model_dir)
    if as_json:
        click.echo(json.dumps({
            "manifest": str(m.path), "output_dir": str(m.output_dir),
            "model": steps.model_dict(model_dir, info, m.model),
            "shard": f"{shard_t[0]}/{shard_t[1]}" if shard_t else None,
            "summary": _summary(p), "warnings": [str(w) for w in m.warnings],
            "until": [r.to_dict() for r in p.rolls.values()],
            "waiting": [{"job_id": j, "parent": t} for j, t in p.waiting],
            "renders": [it.to_dict() for it in p.items],
        }, indent=2, ensure_ascii=False))
        return
    out = out_console()
    if info.demo:
        out.print(f"[yellow]{steps.DEMO_LINE}[/yellow]")
    out.print(_plan_table(p, f"plan: {manifest} -> {m.output_dir}"))
    counts = p.counts()
    out.print(f"{len(p.items)} renders: {counts['todo']} todo, {counts['rerender']} rerender, "
              f"{counts['skip']} skip (done), {counts['kept']} kept (not re-rendered); "
              f"~{p.minutes():.1f} audio minutes to render"
              + (" (at most: until-jobs stop once enough takes pass)" if p.rolls else "")
              + (f"; {p.excluded} left to other shards / --only" if p.excluded else ""))
    for line in _roll_lines(p):
        out.print(line, markup=False, highlight=False)
    note = steps.kept_note(p, m.output_dir)
    if note:
        out.print(note, markup=False, highlight=False)
    if p.waiting:
        out.print(steps.waiting_note(p.waiting, "render them once it is rendered, in the same "
                                     "run"), markup=False, highlight=False)


def _summary(p: Plan) -> dict[str, Any]:
    return {**p.counts(), "renders": len(p.items), "excluded": p.excluded,
            "audio_minutes_to_render": round(p.minutes(), 3),
            "audio_minutes_done": round(p.minutes(("skip",)), 3)}


def _roll_lines(p: Plan) -> list[str]:
    """What each until-job will do."""
    lines = []
    for roll in p.rolls.values():
        head = (f"until {roll.job_id}: {roll.passing} of {roll.wanted} wanted takes pass, of "
                f"{roll.done} done")
        seeds = [it.render.seed for it in p.items
                 if it.render.job_id == roll.job_id and it.status in TO_RUN]
        if roll.met:
            lines.append(f"{head}: met; its other seeds are spare (not rendered)")
        elif seeds:
            lines.append(f"{head}: renders seeds {_seeds_text(seeds)} in the job's order, a batch "
                         f"at a time, until {roll.wanted - roll.passing} more pass "
                         f"({roll.max_takes} takes at most)")
        else:
            lines.append(f"{head}: no seed left to render (max_takes {roll.max_takes})")
    return lines


def _plan_table(p: Plan, title: str) -> Table:
    t = Table(title=title, title_justify="left")
    cols = ("job", "seeds", "todo", "rerender", "skip", "kept") + (("spare",) if p.rolls else ())
    for col in (*cols, "~minutes"):
        t.add_column(col, justify="left" if col in ("job", "seeds") else "right")
    per_job: dict[str, dict[str, Any]] = {}
    for it in p.items:
        row = per_job.setdefault(it.render.job_id, {"seeds": [], "min": 0.0,
                                                    **dict.fromkeys(STATUSES, 0)})
        row["seeds"].append(it.render.seed)
        row[it.status] += 1
        if it.status in TO_RUN:
            row["min"] += it.est_minutes
    for job_id, row in per_job.items():
        t.add_row(job_id, _seeds_text(row["seeds"]), *(str(row[c]) for c in cols[2:]),
                  f"{row['min']:.1f}")
    return t


def _seeds_text(seeds: list[int]) -> str:
    seeds = sorted(seeds)
    if len(seeds) > 2 and seeds == list(range(seeds[0], seeds[-1] + 1)):
        return f"{seeds[0]}-{seeds[-1]}"
    text = ",".join(str(s) for s in seeds[:8])
    return text + (f",... ({len(seeds)})" if len(seeds) > 8 else "")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print the catalogue as JSON.")
def tags(as_json: bool) -> None:
    """The tag catalogue, by category (the tags the reference front end offers). A job's
    `tags:` may use others; they are passed to the model as written."""
    cat = tag_catalogue()
    if as_json:
        click.echo(json.dumps(cat, indent=2, ensure_ascii=False))
        return
    for key, c in cat.items():
        click.echo(f"{c.get('label', key)} [{key}] ({len(c['tags'])})")
        click.echo("  " + ", ".join(c["tags"]))
        click.echo()
