"""A real headless browser for the dashboard tests: Debian's chromium, driven through its chromedriver.

`scripts/ensure-chromium.sh` (run by `make test`) installs both. Selenium is pointed at both binaries, so
its Selenium Manager never runs (it would try to download a browser or a driver, and nothing outside the
machine can be fetched); a fresh profile per browser, and no background traffic of chromium's own.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1360,1000")


def start_chromium(profile_dir: Path):
    """A WebDriver session on a new headless chromium with its own empty profile (the caller quits it)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not (shutil.which(path) or os.path.exists(path))]
    if missing:
        pytest.fail(f"{missing} not installed: run scripts/ensure-chromium.sh (make test does)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile_dir}")
    service = Service(executable_path=CHROMEDRIVER, log_output=str(profile_dir.parent / "chromedriver.log"))
    return webdriver.Chrome(options=options, service=service)
