"""The review page for mended takes (issue 22): a re-roll or an extend sits under its parent
take with the cut marked on its waveform, and jobs that fell short of their `until` goal are
listed. The grouping is checked in Python; the page in a real headless Chromium, on takes
of a real `khala render` of the demo model (noise).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import browser
import numpy as np
import pytest
import soundfile as sf

from khala_cli import outputs
from khala_cli.model_numbers import FRAME_RATE
from khala_cli.plan import Render
from khala_cli.review.keep import keep_command
from khala_cli.review.page import JobView, _hms, lineage, nest, shortfalls

# ---- the grouping, in Python -------------------------------------------------------------


def _take(job: str, seed: int, score: float, parent: tuple | None = None, key: str = "",
          kind: str = "reroll") -> dict:
    t = {"job_id": job, "seed": seed, "render_key": key or f"{job}-{seed}",
         "analysis": {"score": score}, "audio": {"seconds": 4.0}}
    if parent:
        pjob, pseed, cut = parent[:3]
        t["parent"] = {"job_id": pjob, "seed": pseed, "kind": kind, "cut_s": cut,
                       "render_key": parent[3] if len(parent) > 3 else f"{pjob}-{pseed}"}
    return t


def _order(job: JobView) -> list[tuple[str, int, int]]:
    return [(t["job_id"], t["seed"], depth) for t, depth in job.shown()]


def test_children_sit_under_their_parent_by_cut_then_best_first():
    takes = [
        _take("a", 1, -2.0), _take("a", 2, -1.0),
        _take("a-s1-from-0m02s", 5, -3.0, ("a", 1, 2.0)),
        _take("a-s1-from-0m01s", 3, -4.0, ("a", 1, 1.0)),
        _take("a-s1-from-0m01s", 4, -0.5, ("a", 1, 1.0)),  # same cut, better: first
        _take("a-s1-to-0m06s", 1, -9.0, ("a", 1, 4.0), kind="extend"),
        _take("x-from-a3", 1, -1.0, ("a-s1-from-0m01s", 3, 1.5)),  # a re-roll of a re-roll
    ]
    top = nest(takes)
    assert [(t["job_id"], t["seed"]) for t in top] == [("a", 1), ("a", 2)]
    j = JobView("a", sorted(top, key=lambda t: -t["analysis"]["score"]))
    assert _order(j) == [
        ("a", 2, 0), ("a", 1, 0),
        ("a-s1-from-0m01s", 4, 1), ("a-s1-from-0m01s", 3, 1), ("x-from-a3", 1, 2),
        ("a-s1-from-0m02s", 5, 1), ("a-s1-to-0m06s", 1, 1)]
    labels = {(t["job_id"], t["seed"]): lineage(t) for t, _ in j.shown()}
    assert labels[("a", 1)] == ""
    assert labels[("a-s1-from-0m02s", 5)] == "re-roll of seed 1 at 0:02"
    assert labels[("a-s1-to-0m06s", 1)] == "extended from seed 1 at 0:04"


def test_children_whose_parent_is_not_here_stay_on_top_and_say_why():
    takes = [
        _take("a", 1, -1.0),
        _take("gone-s4-from-1m10s", 2, -1.0, ("gone", 4, 70.015)),
        _take("a-s1-old", 3, -1.0, ("a", 1, 1.0, "an-earlier-key")),  # parent rendered again
        _take("loop-a", 1, -1.0, ("loop-b", 1, 1.0)),
        _take("loop-b", 1, -1.0, ("loop-a", 1, 1.0)),
        dict(_take("bad", 1, -1.0), parent={"job_id": "a"}),  # no seed, no cut: a take of its own
    ]
    top = nest(takes)
    assert len(top) == len(takes) and not top[0]["_children"]
    why = {t["job_id"]: t.get("_orphan") for t in top}
    assert why["gone-s4-from-1m10s"] == "the parent take is not in this folder"
    assert why["a-s1-old"] == "the parent take was rendered again since"
    assert why["loop-a"] == why["loop-b"] == "its parent records loop"
    assert why["a"] is None and why["bad"] is None
    assert lineage(top[1]) == ("re-roll of gone seed 4 at 1:10; the parent take is not in "
                               "this folder")


def test_shortfalls_take_the_latest_row_and_tolerate_reports_without_until():
    runs = [{"summary": {}, "until": [{"job_id": "a", "passing": 0, "wanted": 2, "met": False},
                                      {"job_id": "b", "passing": 0, "wanted": 1, "met": False}]},
            {"summary": {}},  # a report from before `until`
            {"summary": {}, "until": "not a list"},
            {"summary": {}, "until": [{"job_id": "b", "passing": 1, "wanted": 1, "met": True},
                                      "junk", {"passing": 1}]}]
    assert list(shortfalls(runs)) == ["a"]
    assert shortfalls([{"summary": {}}]) == {}


# ---- the page, in Chromium ------------------------------------------------------------------

slow = pytest.mark.slow


def child_take_standing_in_for_reroll(out: Path, parent: tuple[str, int], child_job: str,
                                      seed: int, *, kind: str, tail: tuple[str, int],
                                      cut_s: float = 0.0, record: dict | None = None) -> dict:
    """A re-roll (cut at cut_s) or extend (cut at the parent's end) take made by hand until
    `khala reroll` / `khala extend` land (swap this for the real command then): the parent's
    audio up to the cut (snapped to a frame), then another real take's audio, written by the
    real take writer as `<child_job>/<child_job>-s<seed>.*`, with MEND.md's `parent` record
    in its sidecar (`record` overrides its fields). Returns the sidecar."""
    pjob, pseed = parent
    side = json.loads((out / pjob / f"{pjob}-s{pseed}.json").read_text())
    head, sr = sf.read(str(out / pjob / side["files"]["wav"]), dtype="float32")
    rest, _ = sf.read(str(out / tail[0] / f"{tail[0]}-s{tail[1]}.wav"), dtype="float32")
    cut = len(head) if kind == "extend" else round(round(cut_s * FRAME_RATE) / FRAME_RATE * sr)
    audio = np.concatenate([head[:cut], rest if kind == "extend" else rest[cut:]])
    r = Render(job_id=child_job, seed=seed, key=f"{side['render_key'][:12]}{seed:012d}",
               out_dir=str(out / child_job), stem=f"{child_job}-s{seed}",
               title=side["title"], tags=tuple(side["tags"]))
    outputs.write_take(r, audio, sr, info={"model": side["model"], "device": "cpu",
                                           "backbone": {"ended": "end_of_song"}})
    path = out / child_job / f"{child_job}-s{seed}.json"
    data = json.loads(path.read_text())
    data["parent"] = dict({"job_id": pjob, "seed": pseed, "render_key": side["render_key"],
                           "kind": kind, "cut_s": round(cut / sr, 3),
                           "kept_frames": round(cut / sr * FRAME_RATE), "crossfade_s": 0.046},
                          **(record or {}))
    outputs.write_json(path, data)
    return data


@pytest.fixture(scope="module")
def mended(tmp_path_factory, demo_model_dir) -> Path:
    root = tmp_path_factory.mktemp("mended")
    manifest = root / "jobs.yaml"
    manifest.write_text(
        "model: demo\noutput_dir: out\ndefaults: {max_minutes: 0.05}\njobs:\n"
        "  - {id: song, title: Song, tags: [Pop], seeds: [1, 2]}\n")
    _khala("render", manifest, "--devices", "cpu", "--quiet")
    out = root / "out"
    page = (out / "reports" / "index.html").read_text()
    assert 'class="shortfalls"' not in page  # a report without `until` adds nothing
    for seed in (11, 12):
        child_take_standing_in_for_reroll(out, ("song", 1), "song-s1-from-0m01s", seed,
                                          kind="reroll", cut_s=1.0, tail=("song", 2))
    child_take_standing_in_for_reroll(out, ("song", 1), "song-s1-to-0m06s", 1,
                                      kind="extend", tail=("song", 2))
    # its parent was never in this folder (song:2 only lends it audio)
    child_take_standing_in_for_reroll(out, ("song", 2), "gone-s4-from-0m01s", 1,
                                      kind="reroll", cut_s=1.0, tail=("song", 1),
                                      record={"job_id": "gone", "seed": 4})
    latest = out / "reports" / "latest.json"
    report = json.loads(latest.read_text())
    report["until"] = [
        {"job_id": "song", "passing": 1, "wanted": 2, "takes": 16, "max_takes": 16,
         "met": False},
        {"job_id": "song-s1-from-0m01s", "passing": 1, "wanted": 3, "takes": 2,
         "max_takes": 2, "met": False},
        {"job_id": "other", "passing": 2, "wanted": 2, "takes": 5, "max_takes": 8,
         "met": True}]
    outputs.write_json(latest, report)
    _khala("report", out)
    return out


def _khala(*args) -> None:
    """A real `khala` command in a subprocess; it must succeed."""
    proc = subprocess.run([sys.executable, "-m", "khala_cli", *map(str, args)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _open(d, out: Path):
    d.get((out / "reports" / "index.html").as_uri())
    d.execute_script("localStorage.clear()")
    d.refresh()


def _row(d, take: str):
    from selenium.webdriver.common.by import By

    return d.find_element(By.CSS_SELECTOR, f'li.take[data-take="{take}"]')


@slow
def test_children_sit_under_their_parent_with_their_labels(mended):
    from selenium.webdriver.common.by import By

    with browser.chromium() as d:
        _open(d, mended)
        song = d.find_element(By.ID, "job-song")
        order = [li.get_attribute("data-take")
                 for li in song.find_elements(By.CSS_SELECTOR, "li.take")]
        at = order.index("song:1")
        children = {"song-s1-from-0m01s:11", "song-s1-from-0m01s:12", "song-s1-to-0m06s:1"}
        assert set(order[at + 1:at + 4]) == children, order  # right after their parent
        assert order[at + 3] == "song-s1-to-0m06s:1"  # the extend cuts last
        parent = _row(d, "song:1")
        for take in children:
            li = _row(d, take)
            assert li.get_attribute("data-parent") == "song:1"
            assert li.location["y"] > parent.location["y"]
            # indented: its waveform starts right of the parent's
            wave = li.find_element(By.CSS_SELECTOR, "canvas.wave")
            assert wave.location["x"] >= parent.find_element(
                By.CSS_SELECTOR, "canvas.wave").location["x"] + 30
        label = lambda take: _row(d, take).find_element(  # noqa: E731
            By.CSS_SELECTOR, ".lineage").text
        assert label("song-s1-from-0m01s:11").startswith("re-roll of seed 1 at 0:01")
        cut = json.loads((mended / "song-s1-to-0m06s" / "song-s1-to-0m06s-s1.json")
                         .read_text())["parent"]["cut_s"]
        assert label("song-s1-to-0m06s:1").startswith(f"extended from seed 1 at {_hms(cut)}")
        # the child job has no section of its own: its takes are under the parent
        assert not d.find_elements(By.ID, "job-song-s1-from-0m01s")
        assert browser.console_errors(d) == []


@slow
def test_a_child_whose_parent_is_missing_shows_under_its_own_job(mended):
    from selenium.webdriver.common.by import By

    with browser.chromium() as d:
        _open(d, mended)
        own = d.find_element(By.ID, "job-gone-s4-from-0m01s")
        li = own.find_element(By.CSS_SELECTOR, 'li.take[data-take="gone-s4-from-0m01s:1"]')
        assert "orphan" in li.get_attribute("class")
        assert li.find_element(By.CSS_SELECTOR, ".lineage").text.startswith(
            "re-roll of gone seed 4 at 0:01; the parent take is not in this folder")
        assert not d.find_elements(By.CSS_SELECTOR, '#job-song li[data-take^="gone-"]')


WAVE_CUT = """
const c = arguments[0];
const px = c.getContext('2d').getImageData(0, 0, c.width, 1).data;  // the top row
const cols = [];
for (let x = 0; x < c.width; x++) if (px[4 * x + 3] > 0) cols.push(x);
return {cols: cols, width: c.width, css: c.getBoundingClientRect().width};
"""


@slow
def test_the_cut_is_marked_where_it_falls_on_the_waveform(mended):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    with browser.chromium() as d:
        _open(d, mended)
        for take, stem in (("song-s1-from-0m01s:11", "song-s1-from-0m01s/song-s1-from-0m01s-s11"),
                           ("song-s1-to-0m06s:1", "song-s1-to-0m06s/song-s1-to-0m06s-s1")):
            side = json.loads((mended / f"{stem}.json").read_text())
            wave = _row(d, take).find_element(By.CSS_SELECTOR, "canvas.wave")
            d.execute_script("arguments[0].scrollIntoView({block: 'center'})", wave)
            got = WebDriverWait(d, 10).until(
                lambda _, w=wave: (r := d.execute_script(WAVE_CUT, w))["cols"] and r)
            assert got["css"] == got["width"]  # canvas pixels are page pixels
            want = side["parent"]["cut_s"] / side["audio"]["seconds"] * got["width"]
            centre = (got["cols"][0] + got["cols"][-1] + 1) / 2
            assert abs(centre - want) <= 1.5, (take, got, want)
            assert len(got["cols"]) <= 3  # one thin line, not the waveform
        plain = _row(d, "song:2").find_element(By.CSS_SELECTOR, "canvas.wave")
        d.execute_script("arguments[0].scrollIntoView({block: 'center'})", plain)
        assert d.execute_script(WAVE_CUT, plain)["cols"] == []  # no cut on a take of its own


@slow
def test_jobs_short_of_their_goal_are_listed(mended):
    from selenium.webdriver.common.by import By

    with browser.chromium() as d:
        _open(d, mended)
        rows = d.find_elements(By.CSS_SELECTOR, ".shortfalls li")
        assert [r.text for r in rows] == [
            "song: 1 of 2 passing after 16 takes (max_takes 16)",
            "song-s1-from-0m01s: 1 of 3 passing after 2 takes (max_takes 2)"]
        # the re-roll job's link leads to the section that holds its takes
        link = rows[1].find_element(By.TAG_NAME, "a").get_attribute("href")
        assert link.endswith("#job-song")
        assert "1 of 2 passing after 16 takes" in d.find_element(By.CSS_SELECTOR,
                                                                 "#job-song .short").text


@slow
def test_children_are_kept_as_takes_of_their_own_job(mended):
    from selenium.webdriver.common.by import By

    with browser.chromium() as d:
        _open(d, mended)
        for take in ("song-s1-from-0m01s:12", "gone-s4-from-0m01s:1"):
            _row(d, take).find_element(By.CSS_SELECTOR, "input.keep-box").click()
        shown = d.find_element(By.ID, "keep-cmd").text
        assert browser.console_errors(d) == []
    # in page order: the job with the missing parent comes first (jobs go by id)
    assert shown == keep_command(str(mended), [("gone-s4-from-0m01s", 1),
                                               ("song-s1-from-0m01s", 12)], [])
    _khala(*shown.split()[1:])  # the command the page shows, as the CLI takes it
    from khala_cli.review.keep import read_marks
    assert read_marks(mended) == [("gone-s4-from-0m01s", 1), ("song-s1-from-0m01s", 12)]
