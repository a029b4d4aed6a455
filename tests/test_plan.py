"""Planning: render keys, statuses (todo/skip/rerender) against real outputs, --force, --only,
--shard, and `khala plan`."""

from __future__ import annotations

import json
import textwrap
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from khala_cli import outputs
from khala_cli import plan as pl
from khala_cli.cli import _register, cli
from khala_cli.engine.config import ModelInfo
from khala_cli.manifest import jobs as mf

_register()

MANIFEST = """\
model: {model}
output_dir: out
jobs:
  - id: night-wind
    title: Night Wind
    tags: [J-Pop, Female Vocals]
    lyrics: hello
    seeds: [1, 2]
    max_minutes: 0.1
  - id: lofi
    mode: instrumental
    prompt: a lofi beat
    seeds: "10-13"
    duration: 2
"""


def write_model_json(path: Path, fingerprint: str = "a" * 64, demo: bool = False) -> Path:
    """A model directory as far as planning needs it: its model.json."""
    path.mkdir(parents=True, exist_ok=True)
    info = ModelInfo(name="test-model", demo=demo, fingerprint=fingerprint,
                     files={"backbone.safetensors": "0" * 64})
    (path / "model.json").write_text(json.dumps(info.to_dict()))
    return path


@pytest.fixture
def project(tmp_path):
    write_model_json(tmp_path / "model")
    path = tmp_path / "jobs.yaml"
    path.write_text(MANIFEST.format(model="model"))
    return path


def renders_for(path: Path, fingerprint: str = "a" * 64, **kw) -> list[pl.Render]:
    return pl.build_renders(mf.load(path), fingerprint, **kw)


def fake_take(r: pl.Render) -> None:
    """Write a real (short) take for a render, as a worker would."""
    t = np.arange(4410) / 44100
    audio = np.stack([np.sin(2 * np.pi * 220 * t)] * 2, axis=1).astype(np.float32) * 0.3
    outputs.write_take(r, audio, 44100, info={"model": {"name": "m", "fingerprint": "a",
                                                        "demo": False}})


def test_renders_and_paths(project):
    rs = renders_for(project)
    assert [(r.job_id, r.seed) for r in rs] == [("night-wind", 1), ("night-wind", 2),
                                                ("lofi", 10), ("lofi", 11), ("lofi", 12),
                                                ("lofi", 13)]
    out = (project.parent / "out").resolve()
    r = rs[0]
    assert r.path(".wav") == out / "night-wind" / "night-wind-s1.wav"
    assert r.stem == "night-wind-s1" and r.max_new_tokens == 258 and r.title == "Night Wind"
    assert rs[2].max_new_tokens == 23552 and rs[2].lyrics == "" and rs[2].prompt_mode == "natural"
    assert len({r.key for r in rs}) == 6
    assert pl.Render.from_dict(json.loads(json.dumps(r.to_dict()))) == r


def test_render_key_changes_with_every_audio_setting(project):
    job = mf.load(project).job("night-wind")
    base = pl.render_key(pl.audio_settings(job, 1), "fp")
    assert base == pl.render_key(pl.audio_settings(job, 1), "fp")  # stable
    changes = [
        replace(job, mode="instrumental"), replace(job, tags=("J-Pop",)),
        replace(job, prompt_mode="natural", tags=(), prompt="x"), replace(job, lyrics="bye"),
        replace(job, duration=4), replace(job, top_k_bb=81), replace(job, top_k_sr=11),
        replace(job, temperature=1.01), replace(job, max_minutes=0.2),
    ]
    keys = {pl.render_key(pl.audio_settings(j, 1), "fp") for j in changes}
    keys.add(pl.render_key(pl.audio_settings(job, 2), "fp"))  # seed
    keys.add(pl.render_key(pl.audio_settings(job, 1), "other-model"))  # model
    assert base not in keys and len(keys) == len(changes) + 2
    # Titles, artist and album are MP3 tags, not audio: same key.
    same = replace(job, title="Other", artist="x", album="y")
    assert pl.render_key(pl.audio_settings(same, 1), "fp") == base
    # 1 and 1.0 are the same temperature.
    assert pl.render_key(pl.audio_settings(replace(job, temperature=1), 1), "fp") == \
        pl.render_key(pl.audio_settings(replace(job, temperature=1.0), 1), "fp")


def test_skip_resume_force_and_rerender(project):
    rs = renders_for(project)
    p = pl.make_plan(rs, is_done=outputs.is_done)
    assert p.counts() == {"todo": 6, "skip": 0, "rerender": 0, "kept": 0, "spare": 0}
    assert [x.reason for x in p.items] == ["new"] * 6

    fake_take(rs[0])
    fake_take(rs[3])
    p = pl.make_plan(rs, is_done=outputs.is_done)
    assert [x.status for x in p.items] == ["skip", "todo", "todo", "skip", "todo", "todo"]
    assert [r.key for r in p.to_run] == [rs[i].key for i in (1, 2, 4, 5)]
    assert p.minutes(("skip",)) == pytest.approx(258 / 2584 + 2.0)

    forced = pl.make_plan(rs, is_done=outputs.is_done, force=True)
    assert [x.status for x in forced.items] == ["rerender", "todo", "todo", "rerender", "todo",
                                                "todo"]
    assert forced.items[0].reason == "--force" and len(forced.to_run) == 6

    # A changed setting: the same files now belong to other settings -> rerender.
    project.write_text(MANIFEST.format(model="model").replace("lyrics: hello", "lyrics: bye"))
    changed = renders_for(project)
    p = pl.make_plan(changed, is_done=outputs.is_done)
    assert p.items[0].status == "rerender" and p.items[0].reason == "settings or model changed"
    assert p.items[3].status == "skip"  # the lofi job did not change
    # A new model fingerprint re-renders everything that was done.
    p = pl.make_plan(renders_for(project, fingerprint="b" * 64), is_done=outputs.is_done)
    assert [x.status for x in p.items if x.render.job_id == "lofi"][1] == "rerender"

    # Audio deleted behind our back -> rerender.
    rs[3].path(".wav").unlink()
    p = pl.make_plan(rs, is_done=outputs.is_done)
    assert p.items[3].status == "rerender" and p.items[3].reason == "output files missing"


def test_keepers_are_not_rerendered_for_a_changed_setting(project):
    rs = renders_for(project)
    for r in rs[:2]:
        fake_take(r)
    kept = [("night-wind", 1)]
    project.write_text(MANIFEST.format(model="model").replace("lyrics: hello", "lyrics: bye"))
    changed = renders_for(project)
    p = pl.make_plan(changed, is_done=outputs.is_done, kept=kept)
    assert [(x.render.seed, x.status) for x in p.items[:2]] == [(1, "kept"), (2, "rerender")]
    assert p.items[0].reason.startswith("kept: not re-rendered")
    assert [x.render.seed for x in p.kept] == [1] and rs[0].key not in {r.key for r in p.to_run}
    assert p.counts()["kept"] == 1 and p.minutes() == pytest.approx(p.minutes(("todo",)) +
                                                                   258 / 2584)
    forced = pl.make_plan(changed, is_done=outputs.is_done, kept=kept, force=True)
    assert forced.items[0].status == "rerender" and "moves aside" in forced.items[0].reason
    # unchanged keepers are simply done; keepers whose files went missing render again
    assert pl.make_plan(rs, is_done=outputs.is_done, kept=kept).items[0].status == "skip"
    rs[0].path(".wav").unlink()
    assert pl.make_plan(rs, is_done=outputs.is_done, kept=kept).items[0].status == "rerender"


def test_saving_codes_by_default_renders_nothing_again(project):
    """Takes rendered without codes stay done now that codes are saved by default: the
    render key does not hold save_codes, and a take needs only the codes its sidecar names."""
    without = renders_for(project, save_codes=False)
    for r in without:
        fake_take(r)
    with_codes = renders_for(project, save_codes=True)
    assert [r.key for r in with_codes] == [r.key for r in without]
    assert pl.make_plan(with_codes, is_done=outputs.is_done).counts()["skip"] == 6
    res = CliRunner().invoke(cli, ["plan", str(project), "--json"])
    assert res.exit_code == 0, res.output
    assert {x["status"] for x in json.loads(res.output)["renders"]} == {"skip"}
    assert mf.load(project).save_codes is True  # the default
    project.write_text("save_codes: false\n" + project.read_text())
    assert mf.load(project).save_codes is False
    project.write_text(project.read_text().replace("save_codes: false", "save_codes: 'no'"))
    with pytest.raises(mf.ManifestError, match="save_codes.*expected true or false"):
        mf.load(project)


def test_only_filters_jobs(project):
    rs = renders_for(project)
    p = pl.make_plan(rs, is_done=outputs.is_done, only=("lofi",))
    assert {x.render.job_id for x in p.items} == {"lofi"} and p.excluded == 2


def test_shards_partition_the_renders(tmp_path):
    write_model_json(tmp_path / "model")
    path = tmp_path / "jobs.yaml"
    path.write_text(textwrap.dedent("""\
        model: model
        jobs:
          - id: sweep
            tags: [Pop]
            lyrics: x
            seeds: {from: 0, count: 200}
    """))
    rs = renders_for(path)
    n = 7
    parts = [pl.make_plan(rs, is_done=outputs.is_done, shard=(k, n)) for k in range(n)]
    keys = [x.render.key for part in parts for x in part.items]
    assert sorted(keys) == sorted(r.key for r in rs)  # every render exactly once
    sizes = [len(part.items) for part in parts]
    assert min(sizes) > 10  # spread out, not all in one shard
    assert all(part.excluded == 200 - len(part.items) for part in parts)
    # Stable: the same assignment on every call (and every machine: it is a hash of the key).
    again = pl.make_plan(list(reversed(rs)), is_done=outputs.is_done, shard=(3, n))
    assert {x.render.key for x in again.items} == {x.render.key for x in parts[3].items}


@pytest.mark.parametrize("spec,ok", [("0/1", (0, 1)), ("3/16", (3, 16)), (" 15 / 16 ", (15, 16)),
                                     ("16/16", None), ("1/0", None), ("a/b", None), ("3", None),
                                     ("-1/4", None)])
def test_parse_shard(spec, ok):
    if ok:
        assert pl.parse_shard(spec) == ok
    else:
        with pytest.raises(ValueError, match="--shard"):
            pl.parse_shard(spec)


def test_plan_command_json(project, monkeypatch):
    monkeypatch.chdir(project.parent)
    rs = renders_for(project)
    fake_take(rs[1])
    result = CliRunner().invoke(cli, ["plan", str(project), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["summary"]["todo"] == 5 and data["summary"]["skip"] == 1
    assert data["summary"]["renders"] == 6
    assert data["model"]["fingerprint"] == "a" * 64 and data["model"]["demo"] is False
    statuses = {(r["job_id"], r["seed"]): r["status"] for r in data["renders"]}
    assert statuses[("night-wind", 2)] == "skip" and statuses[("lofi", 10)] == "todo"
    assert data["renders"][0]["key"] == rs[0].key
    assert data["summary"]["audio_minutes_to_render"] == pytest.approx(258 / 2584 + 8.0, abs=1e-3)

    forced = CliRunner().invoke(cli, ["plan", str(project), "--json", "--force", "--only",
                                      "night-wind"])
    data = json.loads(forced.stdout)
    assert [r["status"] for r in data["renders"]] == ["todo", "rerender"]
    assert data["summary"]["excluded"] == 4


def test_plan_command_table_writes_nothing(project):
    result = CliRunner().invoke(cli, ["plan", str(project)])
    assert result.exit_code == 0, result.output
    assert "night-wind" in result.output and "10-13" in result.output
    assert "6 renders: 6 todo, 0 rerender, 0 skip" in result.output
    assert not (project.parent / "out").exists()


def test_plan_command_errors(project):
    r = CliRunner().invoke(cli, ["plan", str(project), "--only", "lofy"])
    assert r.exit_code == 2 and "did you mean 'lofi'" in r.output
    r = CliRunner().invoke(cli, ["plan", str(project), "--shard", "4/4"])
    assert r.exit_code == 2 and "K must be in 0..3" in r.output
    r = CliRunner().invoke(cli, ["plan", str(project), "--model", str(project.parent / "nope")])
    assert r.exit_code == 3 and "does not exist" in r.output
    assert not (project.parent / "out").exists()


SLURM = {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "2", "SLURM_ARRAY_TASK_COUNT": "8"}


@pytest.mark.parametrize("spec,env,ok", [
    ("auto", SLURM, (3, 8)),
    ("auto/8", SLURM, (3, 8)),
    ("auto", {"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "4"}, (0, 4)),
    ("auto/6", {"JOB_COMPLETION_INDEX": "5"}, (5, 6)),
    ("auto", {"JOB_COMPLETION_INDEX": "2", "KHALA_SHARD_COUNT": "3"}, (2, 3)),
])
def test_shard_auto_reads_the_engine_that_started_the_task(spec, env, ok):
    assert pl.parse_shard(spec, env) == ok


@pytest.mark.parametrize("spec,env,msg", [
    ("auto", {}, "no task index found"),
    ("auto/9", SLURM, "says 8 tasks, not 9"),
    ("auto", {"JOB_COMPLETION_INDEX": "2"}, "no task count"),
    ("auto", {"JOB_COMPLETION_INDEX": "7", "KHALA_SHARD_COUNT": "4"}, "K must be in 0..3"),
    ("auto", {"SLURM_ARRAY_TASK_ID": "x", "SLURM_ARRAY_TASK_COUNT": "2"}, "not a whole number"),
    ("auto/x", SLURM, "expected auto or auto/N"),
])
def test_shard_auto_refuses_missing_or_inconsistent_variables(spec, env, msg):
    with pytest.raises(ValueError, match=msg):
        pl.parse_shard(spec, env)


def test_shard_auto_through_the_cli_exits_2_without_an_engine(project, monkeypatch):
    for k in ("SLURM_ARRAY_TASK_ID", "JOB_COMPLETION_INDEX"):
        monkeypatch.delenv(k, raising=False)
    r = CliRunner().invoke(cli, ["plan", str(project), "--shard", "auto"])
    assert r.exit_code == 2 and "no task index found" in r.output


def test_the_shipped_cluster_examples_run_what_khala_reads(project, monkeypatch):
    """The Slurm script and the Kubernetes Job use --shard auto with variables khala reads;
    the Slurm task's command plans its own shard."""
    import shlex
    import shutil
    import subprocess

    import yaml

    root = Path(__file__).resolve().parents[1]
    sbatch = (root / "deploy" / "slurm" / "render.sbatch").read_text()
    line = next(x for x in sbatch.splitlines() if x.startswith("exec khala render"))
    words = shlex.split(line)[2:]
    assert words[words.index("--shard") + 1] == "auto"
    if shutil.which("shellcheck"):
        assert subprocess.run(["shellcheck", str(root / "deploy/slurm/render.sbatch")]
                              ).returncode == 0
    job = yaml.safe_load((root / "deploy" / "kubernetes" / "render-job.yaml").read_text())
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    (container,) = spec["template"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert int(env[pl.SHARD_COUNT_ENV]) == spec["completions"]
    assert container["command"][container["command"].index("--shard") + 1] == "auto"
    # what one pod and one Slurm task would plan
    shards = set()
    for index in range(spec["completions"]):
        k8s = {"JOB_COMPLETION_INDEX": str(index), **env}
        shards.add(pl.parse_shard("auto", k8s))
    assert shards == {(k, 8) for k in range(8)}
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    auto = CliRunner().invoke(cli, ["plan", str(project), "--shard", "auto", "--json"])
    explicit = CliRunner().invoke(cli, ["plan", str(project), "--shard", "1/2", "--json"])
    assert auto.exit_code == 0, auto.output
    whole = CliRunner().invoke(cli, ["plan", str(project), "--json"])
    assert auto.output == explicit.output != whole.output
