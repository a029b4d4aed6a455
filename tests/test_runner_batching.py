"""Batches of different songs through the real pool: worker subprocesses on the CPU and the
demo model (untrained: it renders noise). Faults come from the workers' test-only
failpoints; kills are real."""

from __future__ import annotations

import json

import numpy as np
import psutil
import pytest
from processes import assert_gone, wait_for
from test_runner_pool import (
    Events,
    Script,
    _Faults,
    by_stem,
    load_renders,
    no_leftovers,
    write_manifest,
)

from khala_cli import outputs
from khala_cli.runner import RunOptions, run_renders
from khala_cli.runner.events import Progress, WorkerChanged
from khala_cli.runner.worker import work_path

pytestmark = pytest.mark.slow

SONGS = {"a": [1], "b": [1], "c": [1]}  # three songs (different tags), one take each


@pytest.fixture
def faults(tmp_path) -> _Faults:
    return _Faults(tmp_path / "faults")


def test_three_songs_share_a_batch_and_each_take_is_its_lone_take(tmp_path, demo_model_dir):
    path = write_manifest(tmp_path, demo_model_dir, SONGS)
    renders, out, model = load_renders(path, save_codes=True)
    ev = Events()
    result = run_renders(renders, RunOptions(str(model), str(out), devices="cpu",
                                             batch_size=3), ev)
    assert all(o.status == "rendered" and o.attempts == 1 for o in result.outcomes)
    (busy,) = ev.of(WorkerChanged, state="busy")
    assert busy.batches == (3,) and busy.renders == ("a-s1", "b-s1", "c-s1")
    backbone = [e for e in ev.of(Progress) if e.phase == "backbone"]
    assert backbone and all(e.takes() == [("a", 1), ("b", 1), ("c", 1)] for e in backbone)
    superres = {tuple(e.takes()) for e in ev.of(Progress) if e.phase == "superres"}
    assert superres == {(("a", 1),), (("b", 1),), (("c", 1),)}  # one song at a time
    for r in renders:
        side = json.loads(r.path(".json").read_text())
        assert side["batch"] == {"size": 3, "mates": 2, "songs": 3}
    # b alone (a batch of one) renders the same codes and the same WAV bytes
    alone = write_manifest(tmp_path, demo_model_dir, SONGS, name="alone.yaml", out="alone")
    solo, out2, _ = load_renders(alone, save_codes=True)
    solo = [r for r in solo if r.job_id == "b"]
    res2 = run_renders(solo, RunOptions(str(model), str(out2), devices="cpu"))
    assert res2.outcomes[0].status == "rendered"
    assert json.loads(solo[0].path(".json").read_text())["batch"]["size"] == 1
    for suffix in (".codes.npy", ".wav"):
        assert (out / "b" / f"b-s1{suffix}").read_bytes() == (out2 / "b" / f"b-s1{suffix}").read_bytes()
    assert not np.array_equal(np.load(out / "a" / "a-s1.codes.npy"),
                              np.load(out / "b" / "b-s1.codes.npy"))
    no_leftovers(out)


def test_a_song_that_fails_does_not_fail_its_batch_mates(tmp_path, demo_model_dir, faults):
    faults("fail:b")
    path = write_manifest(tmp_path, demo_model_dir, SONGS)
    renders, out, model = load_renders(path)
    ev = Events()
    result = run_renders(renders, RunOptions(str(model), str(out), **faults.opts, devices="cpu",
                                             batch_size=3, retries=0), ev)
    o = by_stem(result)
    assert o["a-s1"].status == o["c-s1"].status == "rendered"
    assert o["a-s1"].attempts == o["c-s1"].attempts == 1
    assert o["b-s1"].status == "failed" and "test fault for job b" in o["b-s1"].error
    assert [e.batches for e in ev.of(WorkerChanged, state="busy")] == [(3,)]
    assert_gone(ev.worker_pids())


def test_out_of_memory_in_a_mixed_batch_halves_it_and_every_song_renders_once(
        tmp_path, demo_model_dir, faults):
    faults("oom_batch:b")  # out of memory whenever b is in a batch of more than one take
    path = write_manifest(tmp_path, demo_model_dir, {"a": [1], "b": [1], "c": [1], "d": [1]})
    renders, out, model = load_renders(path)
    ev = Events()
    result = run_renders(renders, RunOptions(str(model), str(out), **faults.opts, devices="cpu",
                                             batch_size=4, retries=0), ev)
    assert all(o.status == "rendered" for o in result.outcomes)
    assert sorted(o.render.stem for o in ev.results()) == ["a-s1", "b-s1", "c-s1", "d-s1"]
    busy = [e.renders for e in ev.of(WorkerChanged, state="busy")]
    # halved, then b's half halved again; the queue keeps manifest order
    assert busy == [("a-s1", "b-s1", "c-s1", "d-s1"), ("a-s1", "b-s1"), ("a-s1",), ("b-s1",),
                    ("c-s1", "d-s1")]
    assert len(ev.of(WorkerChanged, state="oom")) == 2
    assert_gone(ev.worker_pids())


def test_killed_in_a_mixed_batch_then_rerun_keeps_every_saved_row(tmp_path, demo_model_dir):
    path = write_manifest(tmp_path, demo_model_dir, SONGS)
    renders, out, _ = load_renders(path, save_codes=True)
    keys = {r.job_id: r.key for r in renders}
    # Run 1 decodes a, b and c together, saves a's and b's rows, and stops for good after
    # b's (test fault): killed there, with c's row never saved.
    run1 = Script(tmp_path, path, {"devices": "cpu", "batch_size": 3,
                                   "test_faults": "hang_after_backbone:b",
                                   "test_fault_dir": str(tmp_path / "faults")}, {})
    wait_for(work_path(out, keys["b"]).exists, "b's saved backbone tokens")
    workers = psutil.Process(run1.proc.pid).children(recursive=True)
    run1.proc.kill()
    run1.proc.wait(timeout=60)
    assert_gone([w.pid for w in workers])
    assert work_path(out, keys["a"]).exists() and not work_path(out, keys["c"]).exists()
    tampered = {}
    for job in ("a", "b"):  # still valid codes: the rerun shows it used them
        q = work_path(out, keys[job])
        tampered[job] = (np.load(q) + 1) % 1024
        np.save(q, tampered[job])

    run2 = Script(tmp_path, path, {"devices": "cpu", "batch_size": 3}, {})
    assert run2.finish() == 0
    results = {e["stem"]: e for e in run2.of("result")}
    assert set(results) == {"a-s1", "b-s1", "c-s1"}
    assert all(e["status"] == "rendered" and e["attempts"] == 1 for e in results.values())
    assert results["a-s1"]["resumed"] and results["b-s1"]["resumed"]
    assert not results["c-s1"]["resumed"]  # only c's backbone row was decoded again
    for job in ("a", "b"):
        assert np.array_equal(np.load(out / job / f"{job}-s1.codes.npy")[:2], tampered[job])
    assert all(outputs.is_done(r) for r in renders)
    no_leftovers(out)
