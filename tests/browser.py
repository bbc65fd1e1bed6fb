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

from tests.polling import wait_for

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


def css(driver, selector: str) -> list:
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, selector)


def text_of(driver, selector: str) -> str | None:
    """The element's text, read in one step in the page: the dashboard redraws its figures every poll, so
    an element found first and read afterwards may already be gone."""
    return driver.execute_script("const e = document.querySelector(arguments[0]); return e && e.textContent;",
                                 selector)


def chart_points(driver, selector: str) -> list[str]:
    """The `x,y` points of a chart's polyline (empty when it is not drawn)."""
    script = "const e = document.querySelector(arguments[0]); return e && e.getAttribute('points');"
    points = driver.execute_script(script, selector)
    return (points or "").split()


def click(driver, selector: str) -> None:
    css(driver, selector)[0].click()


def set_input(driver, tier: str, name: str, value: int) -> None:
    field = css(driver, f'[data-tier="{tier}"] input[name="{name}"]')[0]
    field.clear()
    field.send_keys(str(value))


def open_with_key(driver, base_url: str, key: str) -> None:
    """Open the dashboard, check that it asks for the key and shows nothing else, and give it `key`."""
    driver.get(f"{base_url}/admin")
    wait_for(lambda: css(driver, "#admin-key") and css(driver, "#admin-key")[0].is_displayed(), "key prompt")
    assert not css(driver, "#board")[0].is_displayed() and not css(driver, "[data-tier]"), "no data before the key"
    css(driver, "#admin-key")[0].send_keys(key)
    click(driver, "#key-submit")


def keep_screenshot(driver, tmp_path: Path, name: str, copy_to_env: str | None = None) -> Path:
    """A screenshot under the test's tmp dir, also copied where the environment variable `copy_to_env`
    says when it is set (how docs/dashboard.png is made)."""
    path = tmp_path / name
    assert driver.save_screenshot(str(path)), "chromium took no screenshot"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    print(f"dashboard screenshot: {path}")
    if copy_to_env and (target := os.environ.get(copy_to_env)):
        shutil.copyfile(path, target)
    return path
