"""The operator dashboard (GET /admin) in a real headless chromium against a real `warmpool serve`.

Each test opens the page as an operator would: it asks for the admin key, then shows the tiers with live
numbers; a resize and a drain made by clicking change the real pool (checked through the admin API and
`docker ps` by the service's instance label); a wrong key and a refused resize show their errors.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Iterator

import pytest

from tests.browser import chart_points, click, css, keep_screenshot, set_input, start_chromium, text_of
from tests.browser import open_with_key as browser_open_with_key
from tests.polling import wait_for

pytestmark = [pytest.mark.docker, pytest.mark.slow]

ADMIN_KEY = "dashboard-test-key"
AUTH = {"authorization": f"Bearer {ADMIN_KEY}"}


@pytest.fixture
def service(serve):
    return serve(env={"WARMPOOL_ADMIN_KEY": ADMIN_KEY})


@pytest.fixture
def browser(tmp_path) -> Iterator[object]:
    driver = start_chromium(tmp_path / "chromium-profile")
    yield driver
    driver.quit()


def tier_field(driver, tier: str, field: str) -> str | None:
    return text_of(driver, f'[data-tier="{tier}"] [data-field="{field}"]')


def open_with_key(driver, service, key: str = ADMIN_KEY) -> None:
    browser_open_with_key(driver, service.base_url, key)


def pools(service) -> dict[str, dict]:
    response = service.client.get("/v1/admin/pools", headers=AUTH)
    assert response.status_code == 200, response.text
    return {t["name"]: t for t in response.json()["tiers"]}


def ids_of(docker_client, service, tier: str) -> set[str]:
    labels = [f"warmpool.instance={service.instance_id}", f"warmpool.tier={tier}"]
    return {c["Id"] for c in docker_client.api.containers(filters={"label": labels})}


def test_page_asks_for_the_key_then_shows_live_tiers(service, browser, tmp_path):
    open_with_key(browser, service)
    wait_for(lambda: tier_field(browser, "one", "idle") == "1" and tier_field(browser, "two", "idle") == "2",
             "both tiers shown with their idle containers")
    assert tier_field(browser, "two", "leases") == "0"
    assert len(css(browser, '[data-tier="two"] polyline[data-series="idle"]')) == 1, "the chart draws idle"

    # Live: tasks on `two` appear as leases, a lease rate and a p95 without reloading the page.
    for n in range(3):
        assert service.execute(f"print({n})", resources={"ram": "200MiB"}).json()["tier"] == "two"
    wait_for(lambda: tier_field(browser, "two", "leases") == "3", "three leases shown")
    assert float(tier_field(browser, "two", "lease_rate_per_s").split()[0]) > 0
    assert tier_field(browser, "two", "lease_wait_p95").endswith(" ms")
    assert tier_field(browser, "two", "replaced") == "none"
    points = chart_points(browser, '[data-tier="two"] polyline[data-series="idle"]')
    assert len(points) >= 3, "the chart keeps the samples it polled"
    # The key lives in the tab's sessionStorage, not in a cookie or the URL.
    assert browser.execute_script("return sessionStorage.getItem('warmpool.adminKey')") == ADMIN_KEY
    assert browser.get_cookies() == [] and "dashboard-test-key" not in browser.current_url

    # A burst of four 3 s tasks: `two` is busy, then warm again (the chart shows the burst).
    with concurrent.futures.ThreadPoolExecutor(4) as burst:
        answers = list(burst.map(lambda _: service.execute("import time; time.sleep(3)", resources={"ram": "200MiB"}),
                                 range(4)))
    assert all(a.json()["status"] == "succeeded" for a in answers), [a.text for a in answers]
    wait_for(lambda: tier_field(browser, "two", "leases") == "7", "seven leases shown")
    wait_for(lambda: tier_field(browser, "two", "busy") == "0", "the burst over, on the page too")
    # A session holds a `two` container: the page counts it (from GET /v1/admin/sessions).
    assert tier_field(browser, "two", "sessions") == "0 (0 busy)"
    opened = service.client.post("/v1/sessions", json={"resources": {"ram": "200MiB"}})
    assert opened.status_code in (200, 201), opened.text
    wait_for(lambda: tier_field(browser, "two", "sessions") == "1 (0 busy)", "the session shown")
    keep_screenshot(browser, tmp_path, "dashboard-live.png", "WARMPOOL_DASHBOARD_SCREENSHOT")


def test_resize_through_the_page_changes_the_pool(service, browser, docker_client, tmp_path):
    open_with_key(browser, service)
    wait_for(lambda: tier_field(browser, "two", "idle") == "2", "tier two shown")

    # Refused first: far more than the host holds is a 409 shown with its reason, and nothing changes.
    set_input(browser, "two", "max_size", 100_000)
    click(browser, '[data-tier="two"] button.resize')
    message = wait_for(lambda: "refused" in (m := text_of(browser, '[data-tier="two"] .message') or "") and m,
                       "the refusal shown")
    assert "409" in message and "memory" in message, message
    assert "error" in browser.execute_script("return document.querySelector('[data-tier=\"two\"] .message').className")
    assert (pools(service)["two"]["min_idle"], pools(service)["two"]["max_size"]) == (2, 4)

    set_input(browser, "two", "max_size", 4)
    set_input(browser, "two", "min_idle", 3)
    click(browser, '[data-tier="two"] button.resize')
    wait_for(lambda: "resized: min_idle 3, max_size 4" in (text_of(browser, '[data-tier="two"] .message') or ""),
             "the resize acknowledged")
    assert (pools(service)["two"]["min_idle"], pools(service)["two"]["max_size"]) == (3, 4)
    wait_for(lambda: len(ids_of(docker_client, service, "two")) == 3, "docker ps shows three `two` containers")
    wait_for(lambda: tier_field(browser, "two", "idle") == "3", "the page shows three idle")
    keep_screenshot(browser, tmp_path, "dashboard-resized.png")


def test_drain_through_the_page_replaces_idle_containers(service, browser, docker_client):
    open_with_key(browser, service)
    wait_for(lambda: tier_field(browser, "two", "idle") == "2", "tier two shown")
    before = ids_of(docker_client, service, "two")
    assert len(before) == 2
    click(browser, '[data-tier="two"] button.drain')
    wait_for(lambda: "drained: 2 idle replaced now" in (text_of(browser, '[data-tier="two"] .message') or ""),
             "the drain acknowledged")
    wait_for(lambda: len(after := ids_of(docker_client, service, "two")) == 2 and not after & before,
             "two fresh `two` containers, none of the old ones")
    assert pools(service)["two"]["replaced"] == {"drained": 2}
    wait_for(lambda: tier_field(browser, "two", "replaced") == "drained 2", "the page shows the replacements")


def test_a_wrong_key_shows_an_error_and_no_data(service, browser):
    open_with_key(browser, service, key="not-the-key")
    banner = wait_for(lambda: (b := css(browser, "#banner")) and b[0].is_displayed() and b[0].text, "an error shown")
    assert "403" in banner and "invalid admin key" in banner, banner
    assert css(browser, "#admin-key")[0].is_displayed(), "asked for the key again"
    assert not css(browser, "[data-tier]") and not css(browser, "#board")[0].is_displayed()
    assert browser.execute_script("return sessionStorage.getItem('warmpool.adminKey')") is None
