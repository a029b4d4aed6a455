"""The runner's rules as plain unit tests: no process, no model, no clock."""

from __future__ import annotations

import pytest

from khala_cli.plan import Render
from khala_cli.runner.policy import (
    MAX_START_FAILURES,
    Device,
    Lost,
    Policy,
    State,
    timer_kill,
)


def render(job: str, seed: int) -> Render:
    return Render(job_id=job, seed=seed, key=f"{job}{seed}", out_dir=f"/o/{job}",
                  stem=f"{job}-s{seed}", tags=(job,))


def policy(jobs: dict[str, list[int]], devices: int = 1, batch: int = 1,
           residency: str = "keep_loaded", retries: int = 2) -> Policy:
    renders = [render(j, s) for j, seeds in jobs.items() for s in seeds]
    devs = [Device(i, f"cpu:{i}", residency, batch) for i in range(devices)]
    return Policy(renders, devs, retries)


def stems(wave) -> list[list[str]]:
    return [[it.render.stem for it in b] for b in wave]


def test_a_batch_holds_a_jobs_seeds_first_then_other_songs_up_to_the_batch_size():
    p = policy({"a": [1, 2, 3], "b": [1], "c": [4, 5]}, batch=2)
    dev = p.devices[0]
    assert stems(p.next_wave(dev)) == [["a-s1", "a-s2"]]
    assert stems(p.next_wave(dev)) == [["a-s3", "b-s1"]]  # a's last seed beside another song
    assert stems(p.next_wave(dev)) == [["c-s4", "c-s5"]]
    assert p.next_wave(dev) == []
    assert all(it.state is State.RUNNING and it.attempts == 1 for it in p.items)


def test_a_catalogue_packs_different_songs_into_full_batches():
    songs = {f"song{i:02d}": [1] for i in range(16)}
    p = policy(songs, batch=8)
    dev = p.devices[0]
    first, second = p.next_wave(dev), p.next_wave(dev)
    assert stems(first) == [[f"song{i:02d}-s1" for i in range(8)]]
    assert stems(second) == [[f"song{i:02d}-s1" for i in range(8, 16)]]
    assert p.next_wave(dev) == [] and all(it.batch_len == 8 for it in p.items)
    # a sweep in the middle of a catalogue keeps its seeds together, in manifest order
    mixed = policy({"x": [1], "sweep": [1, 2, 3, 4, 5], "y": [1], "z": [1]}, batch=4)
    assert stems(mixed.next_wave(mixed.devices[0])) == [["x-s1", "sweep-s1", "sweep-s2",
                                                        "sweep-s3"]]
    assert stems(mixed.next_wave(mixed.devices[0])) == [["sweep-s4", "sweep-s5", "y-s1",
                                                        "z-s1"]]
    # two devices: each takes at most a fair share of what is pending when it asks
    two = policy(songs, devices=2, batch=8)
    assert [len(b) for b in two.next_wave(two.devices[0])] == [8]
    assert [len(b) for b in two.next_wave(two.devices[1])] == [4]
    # one_shot: several batches of songs in one wave
    shot = policy(songs, batch=4, residency="one_shot")
    assert [len(b) for b in shot.next_wave(shot.devices[0])] == [4, 4, 4, 4]


def test_out_of_memory_in_a_mixed_batch_halves_it_and_every_song_renders_once():
    p = policy({f"s{i}": [1] for i in range(8)}, batch=8, retries=0)
    dev = p.devices[0]
    (batch,) = p.next_wave(dev)
    assert len(batch) == 8
    p.worker_lost(Lost(dev, batch, ready=True, reason="oom", log="l",
                       oom={"ids": [it.id for it in batch], "error": "CUDA out of memory"}))
    assert all(it.state is State.PENDING and it.batch_limit == 4 for it in p.items)
    halves = [p.next_wave(dev), p.next_wave(dev)]
    assert [stems(w) for w in halves] == [[[f"s{i}-s1" for i in range(4)]],
                                          [[f"s{i}-s1" for i in range(4, 8)]]]
    for w in halves:
        for it in w[0]:
            p.rendered(it, 1.0, {})
    assert p.next_wave(dev) == [] and not p.active()
    assert sorted(it.render.stem for it in p.take_finished()) == sorted(
        f"s{i}-s1" for i in range(8))  # each once
    assert all(it.attempts == 2 and it.failures == 0 for it in p.items)


def test_one_shot_waves_hold_several_batches_and_two_devices_share_fairly():
    p = policy({"a": [1, 2], "b": [1, 2], "c": [1]}, batch=2, residency="one_shot")
    assert stems(p.next_wave(p.devices[0])) == [["a-s1", "a-s2"], ["b-s1", "b-s2"], ["c-s1"]]
    two = policy({"a": [1], "b": [1], "c": [1], "d": [1]}, devices=2)
    two.devices[0].residency = "one_shot"
    assert len([it for b in two.next_wave(two.devices[0]) for it in b]) == 2  # its fair half


def test_a_failure_is_retried_then_fails_with_the_count():
    p = policy({"a": [1]}, retries=1)
    (it,) = p.items
    for _ in (1, 2):
        assert stems(p.next_wave(p.devices[0])) == [["a-s1"]]
        p.attempt_failed(it, "boom")
    assert it.state is State.FAILED and it.error == "boom (after 2 attempts)"
    assert p.take_finished() == [it]


def test_rendered_clears_the_error_and_is_reported_once():
    p = policy({"a": [1]})
    (it,) = p.items
    p.next_wave(p.devices[0])
    p.attempt_failed(it, "boom")
    p.next_wave(p.devices[0])
    p.rendered(it, 3.0, {"wav": "x.wav"})
    assert it.state is State.RENDERED and it.error is None and it.files == {"wav": "x.wav"}
    assert p.take_finished() == [it] and p.take_finished() == []


def test_out_of_memory_halves_the_batch_then_goes_one_shot_then_uses_retries():
    p = policy({"a": [1, 2]}, batch=2, retries=0)
    dev = p.devices[0]
    wave = p.next_wave(dev)
    ids = [it.id for it in wave[0]]
    p.worker_lost(Lost(dev, wave[0], ready=True, reason="oom", log="l",
                       oom={"ids": ids, "error": "OOM"}))
    assert all(it.state is State.PENDING and it.batch_limit == 1 for it in p.items)
    assert all(it.failures == 0 for it in p.items)  # halving uses no retry
    (batch,) = p.next_wave(dev)
    assert len(batch) == 1
    p.worker_lost(Lost(dev, batch, ready=True, reason="oom", log="l",
                       oom={"ids": [batch[0].id], "error": "OOM"}))
    assert dev.residency == "one_shot" and batch[0].state is State.PENDING
    wave = p.next_wave(dev)  # one_shot: both seeds, one batch each, in one wave
    assert stems(wave) == [["a-s1"], ["a-s2"]]
    first, second = wave[0][0], wave[1][0]
    p.worker_lost(Lost(dev, [first, second], ready=True, reason="oom", log="l",
                       oom={"ids": [first.id], "error": "OOM"}))
    assert first.state is State.FAILED and "out of memory: OOM" in first.error
    assert second.state is State.PENDING


def test_a_batch_mate_of_an_oom_is_requeued_untouched():
    p = policy({"a": [1, 2]}, batch=2)
    (batch,) = p.next_wave(p.devices[0])
    p.worker_lost(Lost(p.devices[0], batch, ready=True, reason="oom", log="l",
                       oom={"ids": [batch[0].id], "error": "OOM"}))
    assert batch[1].state is State.PENDING and batch[1].batch_limit is None


def test_out_of_memory_while_loading_goes_one_shot_then_counts_as_a_failed_start():
    p = policy({"a": [1]})
    dev = p.devices[0]
    p.worker_lost(Lost(dev, [], ready=False, reason="oom", log="l", oom={"ids": []}))
    assert dev.residency == "one_shot" and dev.start_failures == 0
    p.worker_lost(Lost(dev, [], ready=False, reason="oom", log="l", oom={"ids": []}))
    assert dev.start_failures == 1


def test_a_crash_retries_each_render_of_the_batch_alone():
    p = policy({"a": [1, 2]}, batch=2, retries=2)
    (batch,) = p.next_wave(p.devices[0])
    p.worker_lost(Lost(p.devices[0], batch, ready=True, reason="worker killed by SIGKILL",
                       log="l"))
    assert all(it.state is State.PENDING and it.batch_limit == 1 and it.failures == 1
               for it in batch)
    assert stems(p.next_wave(p.devices[0])) == [["a-s1"]]


def test_a_fatal_worker_retires_its_device_and_requeues_its_renders():
    p = policy({"a": [1]}, devices=2)
    (batch,) = p.next_wave(p.devices[0])
    p.worker_lost(Lost(p.devices[0], batch, ready=True, reason="x", log="l", fatal="broken"))
    assert p.devices[0].retired == "broken (log: l)" and batch[0].state is State.PENDING
    assert p.live_devices() == [p.devices[1]]


def test_devices_that_cannot_start_are_given_up_and_then_everything_fails():
    p = policy({"a": [1], "b": [1]})
    dev = p.devices[0]
    for _ in range(MAX_START_FAILURES):
        p.worker_lost(Lost(dev, [], ready=False, reason="exit 1", log="l"))
    assert dev.retired and "while starting" in dev.retired
    p.no_device_left()
    assert all(it.state is State.FAILED and "no device can render" in it.error
               for it in p.items)


def test_a_good_start_resets_the_failed_starts():
    p = policy({"a": [1]})
    dev = p.devices[0]
    p.start_failed(dev, "x")
    p.worker_ready(dev)
    assert dev.start_failures == 0


def test_a_full_disk_fails_at_once_stops_handing_out_and_cancels_the_rest():
    p = policy({"a": [1], "b": [1], "c": [1]}, retries=5)
    (batch,) = p.next_wave(p.devices[0])
    p.disk_refused(batch[0], "cannot write /o/a/a-s1.wav: No space left on device",
                   "/o/a/a-s1.wav", kept=True)
    a = batch[0]
    assert a.state is State.FAILED and a.attempts == 1 and "is kept" in a.error
    assert p.no_space == {"path": "/o/a/a-s1.wav",
                          "error": "cannot write /o/a/a-s1.wav: No space left on device"}
    assert not p.handing_out() and p.next_wave(p.devices[0]) == []
    p.cancel_the_rest()
    rest = [it for it in p.items if it is not a]
    assert all(it.state is State.CANCELLED and "disk is full" in it.error for it in rest)


def test_an_interrupt_cancels_what_never_finished_keeping_the_last_error():
    p = policy({"a": [1], "b": [1]})
    (batch,) = p.next_wave(p.devices[0])
    p.interrupt()
    p.attempt_failed(batch[0], "killed: grace period over")
    assert batch[0].state is State.PENDING  # not failed: the run is stopping
    p.cancel_the_rest()
    assert [(it.state, it.error) for it in p.items] == [
        (State.CANCELLED, "killed: grace period over"),
        (State.CANCELLED, "interrupted before it was rendered")]


@pytest.mark.parametrize("kw,want", [
    ({"busy": True, "last_heard": 0.0}, "stalled: no progress for 10 s"),
    ({"busy": True, "last_heard": 95.0}, None),
    ({"ready": False, "spawned": 0.0}, "stalled: not ready after 600 s"),
    ({"stop_deadline": 50.0}, "did not exit when asked to stop"),
])
def test_timers(kw, want):
    base = {"now": 100.0 if "spawned" not in kw else 700.0, "busy": False, "ready": True,
            "last_heard": 100.0, "spawned": 0.0, "stop_deadline": None,
            "stall_timeout": 10.0}
    assert timer_kill(**(base | kw)) == want
