"""`khala bench --review`: what the take analysis costs, and how a page of many takes loads.

- analysis: seconds of `analysis.analyse` per minute of stereo 44.1 kHz audio (with a q0
  stream of the matching length), the median of a few runs on a 3-minute take.
- page: N synthetic takes (sidecars only, in jobs of 8 seeds) -> the page's build time and
  size; then, where Chromium and selenium are installed, the time a headless Chromium takes
  from navigation to the load event, and to the first waveforms drawn.
No torch here.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from khala_cli.analysis import FRAME_RATE, analyse
from khala_cli.review.page import write_page

# selenium is imported where the page's load time is measured: it is an optional (dev)
# dependency, and without it the bench skips that measurement.

SR = 44100


def bench_analysis(minutes: float = 3.0, runs: int = 3) -> dict[str, float]:
    rng = np.random.default_rng(0)
    n = int(SR * 60 * minutes)
    audio = (0.1 * rng.standard_normal((n, 2))).astype(np.float32)
    q0 = rng.integers(0, 1024, int(FRAME_RATE * 60 * minutes))
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        analyse(audio, SR, q0=q0, ended="end_of_song", logprob_mean=-2.0)
        times.append(time.perf_counter() - t)
    per_min = statistics.median(times) / minutes
    return {"analysis_s_per_audio_minute": round(per_min, 4),
            "analysis_realtime_factor": round(60.0 / per_min, 1)}


def _synthetic_takes(root: Path, count: int) -> None:
    rng = np.random.default_rng(1)
    peaks = "".join(rng.choice(list("0123456789abcdefghijklmnop"), 120))
    for i in range(count):
        job, seed = f"job-{i // 8:05d}", i % 8
        d = root / job
        d.mkdir(exist_ok=True)
        flags = ["cut_at_cap"] if seed == 7 else []
        side = {"render_key": f"{i:08x}", "job_id": job, "seed": seed, "title": f"Song {i // 8}",
                "tags": ["Pop", "Piano"], "prompt_mode": "tags", "lyrics": "[verse]\nla la",
                "mode": "vocal", "duration_min": 3, "top_k_bb": 80, "top_k_sr": 10,
                "temperature": 1.0, "model": {"name": "bench", "demo": False},
                "audio": {"seconds": 180.0}, "timings": {"total_s": 60.0}, "device": "cuda:0",
                "files": {"wav": f"{job}-s{seed}.wav", "mp3": f"{job}-s{seed}.mp3"},
                "analysis": {"lufs": -14.0, "true_peak_db": -1.0, "flags": flags,
                             "score": float(-rng.random() * 3 - 100 * len(flags)),
                             "peaks": peaks}}
        (d / f"{job}-s{seed}.json").write_text(json.dumps(side))


def _browser_load_s(page: Path) -> dict[str, float] | None:
    """Navigation to the load event and to the first waveforms, in headless Chromium."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        return None
    if not Path("/usr/bin/chromedriver").exists():
        return None
    opts = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
                "--disable-background-networking", "--disable-component-update",
                "--disable-sync", f"--user-data-dir={tempfile.mkdtemp()}"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
    try:
        t = time.perf_counter()
        driver.get(page.as_uri())  # returns after the load event
        loaded = time.perf_counter() - t
        nav = driver.execute_script(
            "const n = performance.getEntriesByType('navigation')[0];"
            "return [n.domContentLoadedEventEnd, n.loadEventEnd];")
        return {"page_dom_ready_s": round(nav[0] / 1000, 3),
                "page_load_event_s": round(nav[1] / 1000, 3),
                "page_wall_s": round(loaded, 3)}
    finally:
        driver.quit()


def bench_page(count: int = 10_000) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="khala-page-bench-") as tmp:
        root = Path(tmp)
        _synthetic_takes(root, count)
        t = time.perf_counter()
        page = write_page(root)
        out: dict[str, Any] = {"takes": count,
                               "page_build_s": round(time.perf_counter() - t, 3),
                               "page_mb": round(page.stat().st_size / 1e6, 2)}
        out.update(_browser_load_s(page) or {"page_load_event_s": None})
    return out


def run(takes: int = 10_000) -> dict[str, Any]:
    return {**bench_analysis(), **bench_page(takes)}
