"""The review page for mended takes (issue 22): a re-roll or an extend sits under its parent
take with the cut marked on its waveform, and jobs that fell short of their `until` goal are
listed. The grouping is checked in Python; the page in a real headless Chromium, on takes
of a real `khala render` of the demo model (noise) and their children from real `khala reroll`
and `khala extend` runs.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import browser
import pytest

from khala_cli.manifest.jobs import child_id
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


# the children, named by `khala reroll` / `khala extend` from the take and the time
REROLL = child_id("reroll", "song", 1, 1.0)
EXTEND = child_id("extend", "song", 1, 8.0)
GONE = child_id("reroll", "gone", 4, 1.0)  # its parent moved out of the folder by hand
AGAIN = child_id("reroll", "again", 3, 1.0)  # its parent rendered again with other settings
ROLL = "song-roll"  # a re-roll of song:2 rolled until a take passes; none does

MANIFEST = """\
model: demo
output_dir: out
defaults: {{max_minutes: 0.1}}
jobs:
  - {{id: song, title: Song, tags: [Pop], seeds: [1, 2]}}
  - {{id: gone, title: Gone, tags: [Rock], seeds: [4]}}
  - {{id: again, title: Again, tags: [Jazz], seeds: [3]{again}}}
"""


def _key(out: Path, job: str, seed: int) -> str:
    return json.loads((out / job / f"{job}-s{seed}.json").read_text())["render_key"]


@pytest.fixture(scope="module")
def mended(tmp_path_factory, demo_model_dir) -> Path:
    """A real `khala render` of the demo model (noise), then real `khala reroll` and
    `khala extend` children of its takes; one parent rendered again with another top-k,
    one moved out of the folder, as a user might."""
    root = tmp_path_factory.mktemp("mended")
    manifest = root / "jobs.yaml"
    manifest.write_text(MANIFEST.format(again=""))
    _khala("render", manifest, "--devices", "cpu", "--quiet")
    out = root / "out"
    page = (out / "reports" / "index.html").read_text()
    assert 'class="shortfalls"' not in page  # a report without `until` adds nothing
    _khala("reroll", out, "song:1", "--from", "1", "--seeds", "11,12", "--devices", "cpu", "-q")
    _khala("extend", out, "song:1", "--to", "8", "--devices", "cpu", "-q")
    _khala("reroll", out, "gone:4", "--from", "1", "--seeds", "1", "--devices", "cpu", "-q")
    _khala("reroll", out, "again:3", "--from", "1", "--seeds", "1", "--devices", "cpu", "-q")
    old = _key(out, "again", 3)
    manifest.write_text(MANIFEST.format(again=", top_k_bb: 7"))
    _khala("render", manifest, "--devices", "cpu", "--quiet")
    assert _key(out, "again", 3) != old == json.loads(
        (out / AGAIN / f"{AGAIN}-s1.json").read_text())["parent"]["render_key"]
    (out / "gone").rename(root / "gone-moved-aside")
    # the last run rolls a re-roll of song:2 until one take passes a gate no demo take
    # passes: its report's `until` row falls short
    _khala("reroll", out, "song:2", "--from", "1", "--seeds", "13", "--job", ROLL,
           "--until-passing", "1", "--max-takes", "2", "--min-score", "-1", "--devices", "cpu",
           "-q")
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
        children = {f"{REROLL}:11", f"{REROLL}:12", f"{EXTEND}:1"}
        assert set(order[at + 1:at + 4]) == children, order  # right after their parent
        assert order[at + 3] == f"{EXTEND}:1"  # the extend cuts last
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
        assert label(f"{REROLL}:11").startswith("re-roll of seed 1 at 0:01")
        cut = json.loads((mended / EXTEND / f"{EXTEND}-s1.json")
                         .read_text())["parent"]["cut_s"]
        assert label(f"{EXTEND}:1").startswith(f"extended from seed 1 at {_hms(cut)}")
        # the child job has no section of its own: its takes are under the parent
        assert not d.find_elements(By.ID, f"job-{REROLL}")
        assert browser.console_errors(d) == []


@slow
@pytest.mark.parametrize("child, parent, why", [
    (GONE, "gone:4", "re-roll of gone seed 4 at 0:01; the parent take is not in this folder"),
    (AGAIN, "again:3", "re-roll of again seed 3 at 0:01; the parent take was rendered again "
                       "since")])
def test_a_child_whose_parent_is_not_here_shows_under_its_own_job(mended, child, parent, why):
    from selenium.webdriver.common.by import By

    with browser.chromium() as d:
        _open(d, mended)
        own = d.find_element(By.ID, f"job-{child}")
        li = own.find_element(By.CSS_SELECTOR, f'li.take[data-take="{child}:1"]')
        assert "orphan" in li.get_attribute("class")
        assert li.get_attribute("data-parent") == parent
        assert li.find_element(By.CSS_SELECTOR, ".lineage").text.startswith(why)
        assert len(d.find_elements(By.CSS_SELECTOR, f'li.take[data-take="{child}:1"]')) == 1
        # the parent rendered again is on the page, without the child under it
        assert bool(d.find_elements(By.CSS_SELECTOR, f'li.take[data-take="{parent}"]')) == (
            child == AGAIN)
        assert [e.get_attribute("data-take") for e in d.find_elements(
            By.CSS_SELECTOR, f'li.take[data-parent="{parent}"]')] == [f"{child}:1"]


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
        for take, stem in ((f"{REROLL}:11", f"{REROLL}/{REROLL}-s11"),
                           (f"{EXTEND}:1", f"{EXTEND}/{EXTEND}-s1")):
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
        assert [r.text for r in rows] == [f"{ROLL}: 0 of 1 passing after 2 takes (max_takes 2)"]
        # the re-roll job's link leads to the section that holds its takes: its parent's
        link = rows[0].find_element(By.TAG_NAME, "a").get_attribute("href")
        assert link.endswith("#job-song")
        assert _row(d, f"{ROLL}:13").is_displayed() and _row(d, f"{ROLL}:14").is_displayed()


@slow
def test_children_are_kept_as_takes_of_their_own_job(mended):
    from selenium.webdriver.common.by import By

    with browser.chromium() as d:
        _open(d, mended)
        for take in (f"{REROLL}:12", f"{GONE}:1"):
            _row(d, take).find_element(By.CSS_SELECTOR, "input.keep-box").click()
        shown = d.find_element(By.ID, "keep-cmd").text
        assert browser.console_errors(d) == []
    # in page order: the job with the missing parent comes first (jobs go by id)
    assert shown == keep_command(str(mended), [(GONE, 1), (REROLL, 12)], [])
    _khala(*shown.split()[1:])  # the command the page shows, as the CLI takes it
    from khala_cli.review.keep import read_marks
    assert read_marks(mended) == [(GONE, 1), (REROLL, 12)]
