"""The review page, opened from file:// in a real headless Chromium.

One output directory comes from a real `khala render` of the demo model (noise); another
holds takes written by the real writer from signals with known properties, so that scores,
flags and order are known.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote

import browser
import numpy as np
import pytest

from khala_cli import outputs
from khala_cli.plan import Render
from khala_cli.review.page import write_page

SR = 44100
pytestmark = pytest.mark.slow


def _audio(kind: str, seconds: float = 2.0) -> np.ndarray:
    t = np.arange(int(SR * seconds)) / SR
    x = 0.3 * np.sin(2 * np.pi * 330 * t)
    if kind == "clipped":
        x = 1.5 * np.sign(x)
    return np.repeat(x[:, None], 2, axis=1).astype(np.float32)


# job, seed, audio, ended, logprob_mean
SYNTHETIC = [
    ("alpha", 1, "clean", "end_of_song", -3.0),
    ("alpha", 2, "clean", "end_of_song", -1.5),
    ("alpha", 3, "clipped", "end_of_song", -0.5),  # best confidence, but it clips
    ("alpha", 4, "clean", "token_cap", -1.0),  # cut at the cap
    ("beta", 7, "clean", "end_of_song", -2.0),
]


def _write(root: Path, job: str, seed: int, kind: str, ended: str, logprob: float) -> None:
    r = Render(job_id=job, seed=seed, key=f"k{seed}", out_dir=str(root / job),
               stem=f"{job}-s{seed}", title=job.title(), tags=("Pop",))
    info = {"backbone": {"ended": ended, "logprob_mean": logprob}, "device": "cpu:0",
            "timings": {"total_s": 12.0}, "model": {"name": "test", "demo": False}}
    outputs.write_take(r, _audio(kind), SR, info=info)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    for row in SYNTHETIC:
        _write(root, *row)
    (root / "beta" / "beta-s9.json").write_text("{ not json")
    reports = root / "reports"
    reports.mkdir()
    failed = {"job_id": "beta", "seed": 8, "status": "failed", "error": "RuntimeError: boom",
              "log": ".khala/logs/w0.log"}
    report = json.dumps({"started_at": "2026-01-01T00:00:00Z", "file":
                         "run-20260101T000000Z.json", "summary": {"rendered": 5, "failed": 1},
                         "renders": [failed]})
    for name in ("run-20260101T000000Z.json", "latest.json"):  # as a run writes them
        (reports / name).write_text(report)
    write_page(root)
    return root


@pytest.fixture(scope="module")
def rendered(tmp_path_factory, demo_model_dir) -> tuple[Path, str]:
    root = tmp_path_factory.mktemp("rendered")
    manifest = root / "jobs.yaml"
    manifest.write_text(
        "model: demo\noutput_dir: out\ndefaults: {max_minutes: 0.05}\njobs:\n"
        "  - {id: one, title: One, tags: [Pop], lyrics: '[verse]\\nla la', seeds: [1, 2]}\n"
        "  - {id: two, mode: instrumental, prompt_mode: natural, prompt: calm piano,"
        " seeds: [5]}\n")
    proc = subprocess.run([sys.executable, "-m", "khala_cli", "render", str(manifest),
                           "--devices", "cpu", "--quiet"], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    return root / "out", proc.stdout


def _open(driver, page: Path) -> None:
    driver.get(page.as_uri())
    driver.set_script_timeout(60)


LOAD_ALL = """
const done = arguments[arguments.length - 1];
const audios = Array.from(document.querySelectorAll('audio'));
const out = new Array(audios.length);
let left = audios.length;
if (!left) done(out);
audios.forEach((a, i) => {
  const finish = (r) => { if (out[i] === undefined) { out[i] = r; if (--left === 0) done(out); } };
  a.addEventListener('loadedmetadata', () => finish({ok: true, duration: a.duration,
                                                     src: a.currentSrc}));
  a.addEventListener('error', () => finish({ok: false, src: a.currentSrc,
                                           code: a.error && a.error.code}));
  a.preload = 'metadata';
  a.load();
});
"""


def test_render_prints_the_page_and_every_player_loads(rendered, tmp_path):
    out, stdout = rendered
    page = out / "reports" / "index.html"
    assert f"review page {page}" in stdout
    text = page.read_text()
    assert "noise" in text and "demo model" in text  # demo takes say what they are
    assert "http://" not in text and "https://" not in text  # nothing from a CDN
    assert text.count('preload="none"') == 3
    with browser.chromium() as d:
        _open(d, page)
        results = d.execute_async_script(LOAD_ALL)
        assert len(results) == 3 and all(r["ok"] for r in results), results
        assert all(r["duration"] > 1.0 for r in results)
        assert browser.console_errors(d) == []
        d.save_screenshot(str(tmp_path / "review-demo.png"))
        if os.environ.get("KHALA_SCREENSHOT_DIR"):
            shutil.copy(tmp_path / "review-demo.png", os.environ["KHALA_SCREENSHOT_DIR"])


def test_page_survives_being_copied_elsewhere(rendered, tmp_path):
    out, _ = rendered
    # copy, then copy the copy and delete the first one: links that point back to where
    # the page was made (absolute paths) then have nothing to load
    first, copy = tmp_path / "first", tmp_path / "copied"
    shutil.copytree(out, first)
    shutil.copytree(first, copy)
    shutil.rmtree(first)
    with browser.chromium() as d:
        _open(d, copy / "reports" / "index.html")
        results = d.execute_async_script(LOAD_ALL)
    assert len(results) == len(list(copy.glob("*/*.mp3"))) == 3, results
    assert all(r["ok"] for r in results), results
    inside = copy.resolve().as_uri() + "/"
    assert all(unquote(r["src"]).startswith(unquote(inside)) for r in results), results


def _take_rows(d, job: str) -> list[tuple[int, float, bool]]:
    from selenium.webdriver.common.by import By

    rows = d.find_elements(By.CSS_SELECTOR, f"#job-{job} li.take")
    return [(int(r.get_attribute("data-seed")), float(r.get_attribute("data-score")),
             "flagged" in r.get_attribute("class")) for r in rows]


def test_takes_follow_the_scores_and_the_flag_filter_hides_flagged(synthetic):
    from selenium.webdriver.common.by import By

    with browser.chromium() as d:
        _open(d, synthetic / "reports" / "index.html")
        rows = _take_rows(d, "alpha")
        # unflagged by confidence (seed 2 before seed 1), then the flagged ones
        assert [s for s, _, _ in rows][:2] == [2, 1]
        assert {s for s, _, f in rows if f} == {3, 4}
        scores = [sc for _, sc, _ in rows]
        assert scores == sorted(scores, reverse=True)
        assert all(d.find_element(By.CSS_SELECTOR, f'li[data-seed="{s}"]').is_displayed()
                   for s in (1, 2, 3, 4))
        d.find_element(By.ID, "hide-flagged").click()
        shown = {s: d.find_element(By.CSS_SELECTOR, f'#job-alpha li[data-seed="{s}"]')
                 .is_displayed() for s in (1, 2, 3, 4)}
        assert shown == {1: True, 2: True, 3: False, 4: False}
        assert "3 takes shown" in d.find_element(By.ID, "shown").text
        assert browser.console_errors(d) == []


def test_search_the_failed_renders_and_an_unreadable_sidecar(synthetic):
    from selenium.webdriver.common.by import By

    with browser.chromium() as d:
        _open(d, synthetic / "reports" / "index.html")
        beta = d.find_element(By.ID, "job-beta")
        assert "RuntimeError: boom" in beta.text  # the failed render, with its error
        assert "beta-s9.json" in d.find_element(By.CSS_SELECTOR, ".unreadable").text
        d.find_element(By.ID, "search").send_keys("beta")
        assert beta.is_displayed()
        assert not d.find_element(By.ID, "job-alpha").is_displayed()


def test_flagged_takes_carry_their_flags_in_the_page(synthetic):
    text = (synthetic / "reports" / "index.html").read_text()
    data = json.loads((synthetic / "alpha" / "alpha-s3.json").read_text())
    assert "clipping" in data["analysis"]["flags"]
    assert '<span class="flag">clipping</span>' in text
    assert '<span class="flag">cut_at_cap</span>' in text


def test_keep_toggles_survive_a_reload_and_give_the_exact_command(synthetic):
    from selenium.webdriver.common.by import By

    from khala_cli.review.keep import keep_command, write_marks

    write_marks(synthetic, [("alpha", 1)])
    write_page(synthetic)
    page = synthetic / "reports" / "index.html"
    with browser.chromium() as d:
        _open(d, page)
        d.execute_script("localStorage.clear()")
        d.refresh()
        box = lambda take: d.find_element(  # noqa: E731
            By.CSS_SELECTOR, f'li[data-take="{take}"] input.keep-box')
        assert box("alpha:1").is_selected() and not box("alpha:2").is_selected()
        assert not d.find_element(By.ID, "keep-bar").is_displayed()  # nothing changed yet
        box("alpha:2").click()
        box("beta:7").click()
        box("alpha:1").click()
        want = keep_command(str(synthetic), [("alpha", 2), ("beta", 7)], [("alpha", 1)])
        assert d.find_element(By.ID, "keep-cmd").text == want
        d.refresh()  # the marks survive a reload
        assert d.find_element(By.ID, "keep-cmd").text == want
        assert box("alpha:2").is_selected() and not box("alpha:1").is_selected()
        d.find_element(By.ID, "copy-keep").click()
        assert d.find_element(By.ID, "copied").text == "copied"
        assert browser.console_errors(d) == []
    # the command the page shows is the one the CLI takes
    from click.testing import CliRunner

    from khala_cli.cli import _register, cli
    _register()
    args = want.split()[2:]
    res = CliRunner().invoke(cli, ["keep", *args])
    assert res.exit_code == 0, res.output
    from khala_cli.review.keep import read_marks
    assert read_marks(synthetic) == [("alpha", 2), ("beta", 7)]


def test_the_copied_keep_command_quotes_ids_taken_from_sidecars(tmp_path):
    """Ids come from sidecars on disk, which anyone may have edited: the page quotes them (and
    the folder) exactly as keep.keep_command does, and a shell reads back only those words."""
    from selenium.webdriver.common.by import By

    from khala_cli.review.keep import keep_command

    root = tmp_path / "it's out"
    _write(root, "gamma", 1, "clean", "end_of_song", -1.0)
    side = root / "gamma" / "gamma-s1.json"
    weird = "gamma; touch pwned $(touch pwned2) `touch pwned3` 'q' \"d\""
    side.write_text(json.dumps(dict(json.loads(side.read_text()), job_id=weird)))
    page = write_page(root)
    with browser.chromium() as d:
        _open(d, page)
        d.execute_script("localStorage.clear()")
        d.refresh()
        d.find_element(By.CSS_SELECTOR, "li.take input.keep-box").click()
        shown = d.find_element(By.ID, "keep-cmd").get_attribute("textContent")
        assert browser.console_errors(d) == []
    assert shown == keep_command(str(root), [(weird, 1)], [])
    proc = subprocess.run(["bash", "-c", 'printf "%s\\0" ' + shown], cwd=tmp_path,
                          capture_output=True, check=True)
    assert proc.stdout.split(b"\0")[:-1] == [w.encode() for w in (
        "khala", "keep", str(root), f"{weird}:1")]
    assert not any((tmp_path / f).exists() for f in ("pwned", "pwned2", "pwned3"))
