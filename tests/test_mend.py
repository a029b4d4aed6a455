"""Re-rolls and extensions end to end: the manifest's `reroll:` / `extend:` jobs and the
`khala reroll` / `khala extend` commands, on the demo model with real worker processes. The
parent's audio is read back from its WAV; the kept samples must be its samples bit for bit."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from processes import wait_for

from khala_cli import mend, splice
from khala_cli.manifest import jobs as mf
from khala_cli.manifest.checks import clock
from khala_cli.runner.worker import work_path

CUT_S = 2.0
HOP = 2048  # the demo codec's samples per frame

MANIFEST = """\
model: {model}
output_dir: out
defaults: {{mode: instrumental, duration: 1, max_minutes: 0.1, seeds: [7]}}
jobs:
  - id: anthem
    tags: [Piano]
  - reroll: {{take: "anthem:7", from: "0:02"}}
    seeds: [7, 8]
  - id: anthem-long
    extend: {{take: "anthem:7", to: 8}}
"""


def khala(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "khala_cli", *args], capture_output=True,
                          text=True, cwd=cwd, env={**os.environ}, timeout=900)


def take(out: Path, job: str, seed: int) -> tuple[dict, np.ndarray, np.ndarray]:
    """(sidecar, codes, samples as int32) of one take."""
    side = json.loads((out / job / f"{job}-s{seed}.json").read_text())
    codes = np.load(out / job / f"{job}-s{seed}.codes.npy")
    pcm, _ = sf.read(out / job / f"{job}-s{seed}.wav", dtype="int32")
    return side, codes, pcm


@pytest.fixture(scope="module")
def rendered(tmp_path_factory, demo_model_dir):
    """One `khala render` of a parent, two re-rolls of it (its own seed and another) and an
    extension, all planned from one manifest: the children wait for the parent."""
    root = tmp_path_factory.mktemp("mend")
    (root / "jobs.yaml").write_text(MANIFEST.format(model=demo_model_dir))
    proc = khala(root, "render", "jobs.yaml", "--devices", "cpu", "-q")
    assert proc.returncode == 0, proc.stderr
    return root, proc


CHILD = mf.child_id("reroll", "anthem", 7, CUT_S)


def test_manifest_children_wait_for_their_parent_and_render_in_the_same_run(rendered):
    root, proc = rendered
    out = root / "out"
    assert CHILD == "anthem-s7-from-0m2s"
    for job, seed in ((CHILD, 7), (CHILD, 8), ("anthem-long", 7)):
        assert (out / job / f"{job}-s{seed}.json").is_file(), proc.stderr
    assert "4 rendered" in proc.stdout  # the parent, then its three children


def test_self_reroll_gives_the_parent_back(rendered):
    out = rendered[0] / "out"
    parent, p_codes, p_pcm = take(out, "anthem", 7)
    side, codes, pcm = take(out, CHILD, 7)
    assert np.array_equal(codes, p_codes)  # tokens and all 64 layers
    assert side["analysis"]["ended"] == parent["analysis"]["ended"]
    assert side["analysis"]["logprob_mean"] == parent["analysis"]["logprob_mean"]
    cut = side["parent"]["kept_frames"] * HOP
    fade = splice.fade_samples(cut, HOP)
    assert np.array_equal(pcm[: cut - fade], p_pcm[: cut - fade])
    assert np.array_equal(pcm[cut:], p_pcm[cut:])  # the same codes decode the same
    # inside the crossfade both sides decode the same codes: at most a rounding apart
    assert np.abs((pcm[cut - fade : cut] >> 8) - (p_pcm[cut - fade : cut] >> 8)).max() <= 1


def test_reroll_with_another_seed_keeps_the_start_and_changes_the_rest(rendered):
    out = rendered[0] / "out"
    parent, p_codes, p_pcm = take(out, "anthem", 7)
    side, codes, pcm = take(out, CHILD, 8)
    rec = side["parent"]
    assert {k: rec[k] for k in ("job_id", "seed", "render_key", "kind")} == {
        "job_id": "anthem", "seed": 7, "render_key": parent["render_key"], "kind": "reroll"}
    k = rec["kept_frames"]
    assert k == round(CUT_S * 44100 / HOP) and rec["cut_s"] == round(k * HOP / 44100, 3)
    assert rec["crossfade_s"] == round(splice.FADE_FRAMES * HOP / 44100, 4)
    assert np.array_equal(codes[:, :k], p_codes[:, :k])
    assert not np.array_equal(codes[:, k:], p_codes[:, k:])
    cut = k * HOP
    fade = splice.fade_samples(cut, HOP)
    assert np.array_equal(pcm[: cut - fade], p_pcm[: cut - fade])  # bit for bit
    assert not np.array_equal(pcm[cut:], p_pcm[cut : len(pcm)])


def test_extend_keeps_the_whole_parent_and_runs_to_the_new_length(rendered):
    out = rendered[0] / "out"
    parent, p_codes, p_pcm = take(out, "anthem", 7)
    side, codes, pcm = take(out, "anthem-long", 7)
    assert side["parent"]["kind"] == "extend"
    assert codes.shape[1] == round(8 * 44100 / HOP) > p_codes.shape[1]
    assert np.array_equal(codes[:, : p_codes.shape[1]], p_codes)
    cut = p_codes.shape[1] * HOP
    assert np.array_equal(pcm[: cut - splice.fade_samples(cut, HOP)],
                          p_pcm[: cut - splice.fade_samples(cut, HOP)])
    assert side["analysis"]["ended"] == "token_cap"


def test_the_same_reroll_from_the_command_line_renders_nothing(rendered):
    root = rendered[0]
    proc = khala(root, "reroll", "out", "anthem:7", "--from", "2", "--seeds", "7-8", "-q")
    assert proc.returncode == 0, proc.stderr
    assert "0 rendered, 2 skipped" in proc.stdout


@pytest.mark.parametrize("args, words", [
    (("anthem:9", "--from", "1", "--seeds", "1"), ["anthem:9", "no take", "seeds 7"]),
    (("nojob:7", "--from", "1", "--seeds", "1"), ["nojob:7", "no job 'nojob'"]),
    (("anthem:7", "--from", "x", "--seeds", "1"), ["--from 'x'", "not a time"]),
    (("anthem:7", "--from", "0", "--seeds", "1"), ["anthem:7", "keeps nothing"]),
    (("anthem:7", "--from", "0:06", "--seeds", "1"), ["anthem:7", "past the take's end"]),
    (("anthem:7", "--from", "1", "--seeds", "a-b"), ["--seeds 'a-b'"]),
    (("anthem", "--from", "1", "--seeds", "1"), ["'anthem'", "JOB:SEED"]),
    (("anthem:7", "--from", "1", "--seeds", "1", "--until-passing", "5", "--max-takes", "3"),
     ["anthem:7", "--until-passing", "passing 5 is more than max_takes 3"]),
    (("anthem:7", "--from", "1", "--seeds", "1", "--until-passing", "1", "--max-takes", "0"),
     ["anthem:7", "--max-takes"]),
    (("anthem:7", "--from", "1", "--seeds", "1", "--min-score", "-5"),
     ["--min-score needs --until-passing"]),
])
def test_bad_rerolls_exit_2_naming_the_take_and_the_value(rendered, args, words):
    root = rendered[0]
    before = sorted(p for p in (root / "out").rglob("*") if ".khala" not in p.parts)
    proc = khala(root, "reroll", "out", *args)
    assert proc.returncode == 2, proc.stderr
    for w in words:
        assert w in proc.stderr
    assert sorted(p for p in (root / "out").rglob("*") if ".khala" not in p.parts) == before


def test_extend_past_the_model_length_names_the_longest_time(rendered, demo_model_dir):
    root = rendered[0]
    cfg = json.loads((demo_model_dir / "backbone.json").read_text())
    prompt = take(root / "out", "anthem", 7)[0]["tokens"]["prompt"]
    longest = (cfg["max_seq_len"] - prompt) // 2 * HOP / 44100
    proc = khala(root, "extend", "out", "anthem:7", "--to", str(int(longest) + 60))
    assert proc.returncode == 2, proc.stderr
    assert "past the model's length" in proc.stderr
    assert f"the longest is {clock(math.floor(longest * 10) / 10)}" in proc.stderr


def test_a_take_without_codes_cannot_be_rerolled(rendered):
    root = rendered[0]
    out = root / "out"
    side = json.loads((out / "anthem" / "anthem-s7.json").read_text())
    data = {**side, "files": {k: v for k, v in side["files"].items() if k != "codes"}}
    bare = out / "bare"
    bare.mkdir(exist_ok=True)
    for suffix in (".wav", ".mp3"):
        (bare / f"bare-s7{suffix}").write_bytes((out / "anthem" / f"anthem-s7{suffix}").read_bytes())
    data["files"] = {k: v.replace("anthem", "bare") for k, v in data["files"].items()}
    (bare / "bare-s7.json").write_text(json.dumps(data))
    try:
        proc = khala(root, "reroll", "out", "bare:7", "--from", "1", "--seeds", "1")
        assert proc.returncode == 2
        assert "bare:7" in proc.stderr and "has no codes" in proc.stderr
        assert "--save-codes" in proc.stderr
    finally:
        for p in bare.iterdir():
            p.unlink()
        bare.rmdir()


def test_a_take_of_another_model_cannot_be_rerolled(rendered, tmp_path):
    from khala_cli.engine.random_model import build_random_model

    other = build_random_model(tmp_path / "other", name="other", source="test", demo=False,
                               sizes={"num_layers": 1})
    proc = khala(rendered[0], "reroll", "out", "anthem:7", "--from", "1", "--seeds", "1",
                 "--model", str(other))
    assert proc.returncode == 2, proc.stderr
    assert "anthem:7 was rendered by another model" in proc.stderr


def test_a_kill_during_a_reroll_resumes_after_the_backbone(rendered):
    root = rendered[0]
    out = root / "out"
    job = mf.child_id("reroll", "anthem", 7, 3.0)
    args = ("reroll", "out", "anthem:7", "--from", "3", "--seeds", "21", "--devices", "cpu")
    run1 = subprocess.Popen([sys.executable, "-m", "khala_cli", *args, "--test-faults",
                             f"hang_after_backbone:{job}", "--test-fault-dir",
                             str(root / "faults")], cwd=root, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        saved = lambda: sorted((out / ".khala" / "work").glob("*.q01.npy"))  # noqa: E731
        wait_for(lambda: bool(saved()), "the re-roll's saved backbone tokens")
    finally:
        run1.kill()
        run1.wait(timeout=60)
    (q,) = saved()
    rows = np.load(q)
    tampered = rows.copy()
    k = round(3.0 * 44100 / HOP)
    tampered[:, k:] = (rows[:, k:] + 1) % 1024  # the new part only: still valid codes
    np.save(q, tampered)
    proc = khala(root, *args, "-q")
    assert proc.returncode == 0, proc.stderr
    _, codes, _ = take(out, job, 21)
    assert np.array_equal(codes[:2], tampered)  # built on the saved tokens: no new backbone
    assert not work_path(out, q.name.split(".")[0]).exists()


def test_manifest_reroll_errors_name_the_file_job_and_field(tmp_path):
    bad = """\
model: demo
jobs:
  - id: a
    tags: [Piano]
  - id: b
    reroll: {take: "a:1", from: "1:75"}
  - id: c
    reroll: {take: "a", from: 3}
    tags: [Jazz]
  - id: d
    reroll: {take: "a:1", from: 1}
    extend: {take: "a:1", to: 9}
  - id: e
    extend: {take: "a:1"}
"""
    (tmp_path / "m.yaml").write_text(bad)
    with pytest.raises(mf.ManifestError) as err:
        mf.load(tmp_path / "m.yaml")
    text = str(err.value)
    assert "m.yaml:6: job 'b', field 'reroll.from': '1:75' is not a time" in text
    assert "job 'c', field 'reroll.take': expected a take as JOB:SEED" in text
    assert "job 'c', field 'tags': a re-roll keeps its parent take's prompt" in text
    assert "job 'd', field 'extend': give either `reroll` or `extend`" in text
    assert "job 'e', field 'extend.to': missing `extend.to`" in text


def test_manifest_reroll_job_gets_its_id_from_the_take_and_time(tmp_path):
    (tmp_path / "m.yaml").write_text('model: demo\njobs:\n  - tags: [x]\n    id: a\n'
                                     '  - reroll: {take: "a:1", from: "1:10.5"}\n')
    m = mf.load(tmp_path / "m.yaml")
    child = m.jobs[1]
    assert child.id == "a-s1-from-1m10.5s"
    assert child.parent == mf.ParentSpec("reroll", "a", 1, 70.5, child.parent.line)


def test_cut_snaps_to_a_whole_frame(rendered):
    parent = mend.read_parent(rendered[0] / "out", "anthem", 7)
    spec = mf.ParentSpec("reroll", "anthem", 7, 2.02)
    c = mend.cut(parent, spec, fingerprint=parent.data["model"]["fingerprint"],
                 max_seq_len=10_000)
    assert c.kept_frames == round(2.02 * 44100 / HOP) and c.to_frames is None


def test_rerolls_are_kept_and_exported_as_takes_of_their_own(rendered, tmp_path):
    root = rendered[0]
    takes = ["anthem:7", f"{CHILD}:7", f"{CHILD}:8", "anthem-long:7"]
    proc = khala(root, "keep", "out", *takes)
    assert proc.returncode == 0, proc.stderr
    dest = tmp_path / "catalogue"
    proc = khala(root, "export", "out", str(dest), "--format", "wav", "--loudness", "off")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads((dest / "catalogue.json").read_text())["files"]
    files = [r["file"] for r in rows]
    assert len(rows) == 4 and len(set(files)) == 4
    assert {(r["job_id"], r["seed"]) for r in rows} == {
        (t.rsplit(":", 1)[0], int(t.rsplit(":", 1)[1])) for t in takes}


def test_plan_names_the_children_that_wait_for_their_parent(tmp_path, demo_model_dir):
    (tmp_path / "jobs.yaml").write_text(MANIFEST.format(model=demo_model_dir))
    proc = khala(tmp_path, "plan", "jobs.yaml")
    assert proc.returncode == 0, proc.stderr
    assert (f"waiting for their parent take: {CHILD} (of anthem:7), anthem-long (of "
            "anthem:7)") in " ".join(proc.stdout.split())
    proc = khala(tmp_path, "plan", "jobs.yaml", "--json")
    assert json.loads(proc.stdout)["waiting"] == [
        {"job_id": CHILD, "parent": "anthem:7"}, {"job_id": "anthem-long", "parent": "anthem:7"}]
    assert not (tmp_path / "out").exists()


def test_a_manifest_reroll_of_a_take_that_is_nowhere_names_the_file_job_and_field(
        tmp_path, demo_model_dir):
    (tmp_path / "jobs.yaml").write_text(
        f"model: {demo_model_dir}\njobs:\n  - id: x\n    reroll: {{take: \"ghost:3\", from: 1}}\n")
    proc = khala(tmp_path, "render", "jobs.yaml")
    assert proc.returncode == 2
    assert "jobs.yaml:4: job 'x', field 'reroll.take': ghost:3: no take in" in proc.stderr
    assert not (tmp_path / "out" / "x").exists()
