"""A real headless Chromium for page tests (Debian's chromium + chromium-driver, selenium).

Without them the page tests skip, saying how to install them; with KHALA_REQUIRE_BROWSER=1
(set by .ci/run) they fail instead, so CI can never pass by skipping them.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
INSTALL = "apt-get install chromium chromium-driver (Debian), then pip install selenium"


def missing() -> str | None:
    """Why no browser can run here, or None."""
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.path.exists(path):
            return f"{path} not found"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed"
    return None


def require() -> None:
    why = missing()
    if why is None:
        return
    if os.environ.get("KHALA_REQUIRE_BROWSER") == "1":
        pytest.fail(f"browser tests are required here but {why} (install: {INSTALL})")
    pytest.skip(f"browser tests need Chromium: {why}; to run them: {INSTALL}")


@contextmanager
def chromium(width: int = 1400, height: int = 1000):
    """A headless Chromium that reaches no network, with console logging on."""
    require()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="khala-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run", "--autoplay-policy=no-user-gesture-required",
                f"--user-data-dir={profile}", f"--window-size={width},{height}"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def console_errors(driver) -> list[dict]:
    return [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
