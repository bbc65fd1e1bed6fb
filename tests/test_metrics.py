"""/metrics (Prometheus) and max_wait_ms, on the real engine; per-app registries without one."""

from __future__ import annotations

import concurrent.futures

import pytest
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from api.app import create_app
from pool.settings import from_env
from tests.polling import wait_for

ONE = {"ram": "64MiB"}  # maps to tier "one" of the test tiers: a single container


def scrape(service) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = service.client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(response.text) for s in family.samples}


def value(samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.mark.docker
def test_metrics_change_after_a_task(serve):
    service = serve()
    before = scrape(service)
    assert value(before, "warmpool_containers", tier="two", state="idle") == 2
    assert value(before, "warmpool_warm_target", tier="two") == 2
    assert value(before, "warmpool_container_starts_total", tier="two") == 2
    assert value(before, "warmpool_docker_up") == 1
    assert service.execute("print('hi')", resources=ONE).json()["status"] == "succeeded"
    assert service.execute("import sys; sys.exit(3)", resources=ONE).json()["status"] == "failed"
    assert service.execute("x = bytearray(200 * 1024 * 1024)", resources=ONE).json()["status"] == "memory_exceeded"
    after = wait_for(lambda: (s := scrape(service)) and value(s, "warmpool_containers", tier="one", state="idle") == 1
                     and s, "tier one warm again after the memory_exceeded replacement")
    assert value(after, "warmpool_leases_total", tier="one") == value(before, "warmpool_leases_total", tier="one") + 3
    assert value(after, "warmpool_lease_wait_seconds_count", tier="one") == 3
    for status in ("succeeded", "failed", "memory_exceeded"):
        assert value(after, "warmpool_task_run_seconds_count", tier="one", status=status) == 1
    assert value(after, "warmpool_task_run_seconds_sum", tier="one", status="succeeded") > 0
    assert value(after, "warmpool_container_replacements_total", tier="one", reason="memory_exceeded") == 1
    assert value(after, "warmpool_container_starts_total", tier="one") == 2
    assert value(after, "warmpool_request_duration_seconds_count", method="POST", route="/v1/execute",
                 status="200") == 3
    assert value(after, "warmpool_capacity_ram_held_bytes") == (96 + 2 * 256) * 1024**2


@pytest.mark.docker
def test_max_wait_ms_gives_503_with_retry_after_when_the_tier_is_busy(serve):
    service = serve()
    assert service.execute("print(1)", resources=ONE, max_wait_ms=0).status_code == 200, "an idle one is there"
    wait_for(lambda: service.client.get("/v1/tiers").json()[0]["idle"] == 1, "tier one idle again")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        running = pool.submit(service.execute, "import time; time.sleep(3); print('done')", resources=ONE)
        wait_for(lambda: service.client.get("/v1/tiers").json()[0]["busy"] == 1, "tier one busy")
        response = service.execute("print(2)", resources=ONE, max_wait_ms=200)
        assert response.status_code == 503, response.text
        assert int(response.headers["retry-after"]) >= 1
        assert "within 0.2 s" in response.json()["detail"]
        waited = service.execute("print(3)", resources=ONE, max_wait_ms=20_000)
        assert running.result(timeout=30).json()["stdout"] == "done\n"
    assert waited.status_code == 200 and waited.json()["stdout"] == "3\n", "a long enough wait is served"
    samples = scrape(service)
    assert value(samples, "warmpool_lease_timeouts_total", tier="one") == 1
    assert value(samples, "warmpool_request_duration_seconds_count", method="POST", route="/v1/execute",
                 status="503") == 1


@pytest.mark.parametrize("bad", [-1, "soon", [1]])
def test_max_wait_ms_must_be_a_non_negative_number(bad):
    from api.schemas import ExecuteRequest

    with pytest.raises(ValueError, match="max_wait_ms"):
        ExecuteRequest(code="print(1)", max_wait_ms=bad)


def test_each_app_has_its_own_registry():
    """Two apps in one process: no duplicate-metric clash, and nothing lands in the global registry."""
    first, second = create_app(from_env({})), create_app(from_env({}))
    assert first.state.metrics_registry is not second.state.metrics_registry
    assert b"warmpool_request_duration_seconds" in generate_latest(first.state.metrics_registry)
    assert b"warmpool_" not in generate_latest(REGISTRY)
