"""Leases on the real engine, as the README states them: a wait bounded by WARMPOOL_LEASE_TIMEOUT_S (a 503
with Retry-After past it), `max_wait_ms` capped by it, the Retry-After a busy tier answers, and containers
retired by their tier's `max_uses` and `max_age_s`."""

from __future__ import annotations

import concurrent.futures
import math

import pytest

from tests.conftest import ADMIN_KEY, TEST_TIERS, idle_again, tier_view
from tests.polling import wait_for

pytestmark = pytest.mark.docker

ONE = {"ram": "64MiB"}
HOSTNAME = "import socket; print(socket.gethostname())"


def test_a_lease_waits_at_most_the_lease_timeout_and_max_wait_ms_is_capped_by_it(serve):
    """Tier "one" has one container. Two tasks that hold it 2 s each make its typical hold time at least
    2 s; then, while a third holds it, three requests wait for it: one naming no wait, one asking for a
    minute and one for 0.3 s. Each is a 503 after its own wait (the minute cut to the 2 s lease timeout),
    with the Retry-After the README gives: the tier's p95 lease wait, and at least its typical hold time
    since every container it may hold is busy, in whole seconds, at least 1."""
    service = serve(env={"WARMPOOL_ADMIN_KEY": ADMIN_KEY, "WARMPOOL_LEASE_TIMEOUT_S": "2"})
    hold = "import time; time.sleep(2); print('held')"
    assert [service.execute(hold, resources=ONE).json()["stdout"] for _ in range(2)] == ["held\n"] * 2
    idle_again(service, "one")
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        blocker = pool.submit(service.execute, "import time; time.sleep(6); print('blocker')", resources=ONE,
                              timeout_s=20)
        wait_for(lambda: tier_view(service, "one")["busy"] == 1, "the blocker to hold the container")
        waits = [pool.submit(service.execute, "print('never')", resources=ONE, **fields)
                 for fields in ({}, {"max_wait_ms": 60_000}, {"max_wait_ms": 300})]
        refused = [future.result(timeout=60) for future in waits]
        view = tier_view(service, "one")  # no lease has ended since: the figures the answers were made from
        assert blocker.result(timeout=60).json()["stdout"] == "blocker\n"
    assert [r.status_code for r in refused] == [503, 503, 503], [r.text for r in refused]
    assert [r.json()["detail"] for r in refused] == [
        "no 'one' container became free within 2 s", "no 'one' container became free within 2 s",
        "no 'one' container became free within 0.3 s"]
    assert view["lease_timeouts"] == 3 and view["typical_hold_ms"] >= 2000, view
    expected = max(1, math.ceil(max(view["lease_wait_ms"]["p95"], view["typical_hold_ms"]) / 1000))
    assert [int(r.headers["retry-after"]) for r in refused] == [expected] * 3, view
    assert expected >= 2, "at least the typical hold time"


def test_containers_retire_at_their_tiers_max_uses_and_max_age(serve, docker_client):
    """"uses" serves two tasks per container; "aged" keeps a container at most 2 s, idle or not."""
    tiers = {"tiers": [{"name": "uses", "cpu": 0.5, "ram": "96MiB", "storage": "32MiB", "min_idle": 1,
                        "max_size": 1, "max_uses": 2},
                       {"name": "aged", "cpu": 0.5, "ram": "128MiB", "storage": "32MiB", "min_idle": 1,
                        "max_size": 1, "max_age_s": 2}, TEST_TIERS["tiers"][1]]}
    service = serve(tiers=tiers, env={"WARMPOOL_ADMIN_KEY": ADMIN_KEY})
    uses = [service.execute(HOSTNAME, resources={"ram": "64MiB"}).json() for _ in range(5)]
    assert {b["tier"] for b in uses} == {"uses"}
    hosts = [b["stdout"] for b in uses]
    assert hosts[0] == hosts[1] != hosts[2] == hosts[3] != hosts[4], hosts
    assert len(set(hosts)) == 3
    assert tier_view(service, "uses")["replaced"] == {"use_limit": 2}

    first = service.execute(HOSTNAME, resources={"ram": "100MiB"}).json()
    assert first["tier"] == "aged"
    aged = first["stdout"].strip()
    retired = tier_view(service, "aged")["replaced"].get("age_limit", 0)
    wait_for(lambda: tier_view(service, "aged")["replaced"].get("age_limit", 0) > retired,
             "the aged container retired while idle")
    labels = [f"warmpool.instance={service.instance_id}", "warmpool.tier=aged"]
    wait_for(lambda: all(not c["Id"].startswith(aged) for c in
                         docker_client.api.containers(all=True, filters={"label": labels})),
             "the aged container removed")
    later = service.execute(HOSTNAME, resources={"ram": "100MiB"}).json()
    assert later["status"] == "succeeded" and later["stdout"].strip() != aged
    assert set(tier_view(service, "aged")["replaced"]) == {"age_limit"}
