"""Operating a cluster: two workers on two Docker engines ("another host" is another engine), the admin API
across them, a worker started later, a worker's /metrics and /healthz, and a drain on SIGTERM."""

from __future__ import annotations

import concurrent.futures
import signal

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import _free_port
from tests.scaleout_support import container_ids, wait_for
from tests.test_scaleout import poll_task

pytestmark = [pytest.mark.redis, pytest.mark.docker]

ADMIN_KEY = "cluster-admin"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
MEDIUM = {"ram": "200MiB"}  # tier "two": min_idle 2, max_size 4 per worker
# Warming off: each worker keeps exactly min_idle idle (no demand-driven extra), so counts can be checked.
STEADY = {"WARMPOOL_WARMING": "off"}
SMALL_HOST = {**STEADY, "WARMPOOL_HOST_RAM": "1200MiB"}  # holds tier two's max_size 4 (and one "one"), not 5


def tier_containers(engine, worker, tier: str = "two") -> set[str]:
    found = engine.api.containers(all=True, filters={"label": [f"warmpool.instance={worker.instance_id}",
                                                                f"warmpool.tier={tier}"]})
    return {c["Id"] for c in found}


def rows(api, tier: str = "two") -> dict[str, dict]:
    body = api.client.get("/v1/admin/pools", headers=ADMIN).json()
    (found,) = [t for t in body["tiers"] if t["name"] == tier]
    return {row["worker"]: row for row in found["workers"]}


def warm(api, workers, idle: int) -> dict[str, dict]:
    """Wait until each worker holds `idle` idle containers of tier two and nothing is starting."""
    last: dict[str, tuple] = {}

    def settled():
        seen = rows(api)
        last.update({w.instance_id: (seen.get(w.instance_id, {}).get("idle"), seen.get(w.instance_id, {}).get(
            "starting"), len(tier_containers(w.engine, w))) for w in workers})
        ok = all(last[w.instance_id] == (idle, 0, idle) for w in workers)
        return seen if ok else None
    try:
        return wait_for(settled, timeout_s=60, what=f"{idle} idle containers of tier two on every worker")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; (idle, starting, containers) per worker: {last}") from None


def test_tasks_resizes_and_drains_reach_workers_on_two_engines(cluster, docker_client, docker2):
    c = cluster()
    a = c.worker(env=STEADY)
    b = c.worker(engine=docker2, env=SMALL_HOST)
    api = c.api(env={"WARMPOOL_ADMIN_KEY": ADMIN_KEY})
    assert {w.engine for w in (a, b)} == {docker_client, docker2.client}

    # The view: a row per worker, naming its engine, and totals that add them up.
    seen = warm(api, (a, b), idle=2)
    assert seen[b.instance_id]["engine"] == docker2.host and seen[a.instance_id]["engine"] != docker2.host
    pools = api.client.get("/v1/admin/pools", headers=ADMIN).json()
    two = next(t for t in pools["tiers"] if t["name"] == "two")
    assert (two["min_idle"], two["max_size"], two["idle"]) == (4, 8, 4)
    assert pools["persisted"] is True and "Redis" in pools["note"]

    # A resize reaches both engines, and the answer says what each worker applied.
    resized = api.client.patch("/v1/admin/pools/two", json={"min_idle": 3}, headers=ADMIN)
    assert resized.status_code == 200, resized.text
    body = resized.json()
    assert {(w["worker"], w["status"], w["min_idle"]) for w in body["workers"]} == {
        (a.instance_id, "applied", 3), (b.instance_id, "applied", 3)}
    assert (body["min_idle"], body["max_size"]) == (6, 8)
    warm(api, (a, b), idle=3)

    # Too big for the small host: 409 naming that worker and the dimension, and nothing changed anywhere.
    refused = api.client.patch("/v1/admin/pools/two", json={"max_size": 5}, headers=ADMIN)
    assert refused.status_code == 409, refused.text
    assert b.instance_id in refused.json()["detail"] and "memory" in refused.json()["detail"]
    assert {row["max_size"] for row in rows(api).values()} == {4}
    assert "max_size" not in c.redis.hgetall(f"{c.prefix}:sizes:two")

    # A drain replaces every idle container of the tier on both engines.
    before = {w.instance_id: tier_containers(w.engine, w) for w in (a, b)}
    drained = api.client.post("/v1/admin/pools/two/drain", headers=ADMIN).json()
    assert drained["idle_replaced"] == 6 and {w["status"] for w in drained["workers"]} == {"applied"}
    assert sorted(w["idle_replaced"] for w in drained["workers"]) == [3, 3]
    # The drain answers once the removals are under way; the rows come with the next heartbeats.
    wait_for(lambda: all(before[w.instance_id].isdisjoint(tier_containers(w.engine, w)) for w in (a, b)),
             what="the drained containers to be gone from both engines")
    warm(api, (a, b), idle=3)

    # Tasks: both workers take some, each in a container of its own engine.
    code = "import socket, time\ntime.sleep(1.5)\nprint(socket.gethostname())"
    with concurrent.futures.ThreadPoolExecutor(8) as executor:
        bodies = list(executor.map(lambda _: api.execute(code, resources=MEDIUM).json(), range(8)))
    assert all(b_["status"] == "succeeded" for b_ in bodies), bodies
    by_worker = {w.instance_id: w for w in (a, b)}
    assert set(by_worker) == {body["worker"] for body in bodies}
    for body in bodies:
        engine = by_worker[body["worker"]].engine
        assert body["stdout"].strip() in {cid[:12] for cid in container_ids(engine, body["worker"])}

    # A worker started later applies the stored sizes.
    later = c.worker(engine=docker2, env=STEADY)
    warm(api, (later,), idle=3)
    tiers = {t["name"]: t for t in api.client.get("/v1/tiers").json()}
    assert (tiers["two"]["workers"], tiers["two"]["min_idle"]) == (3, 9)
    # One on a host too small for them keeps its tiers file's sizes and says why.
    tiny = c.worker(env={**STEADY, "WARMPOOL_HOST_RAM": "700MiB"})
    row = wait_for(lambda: rows(api).get(tiny.instance_id), what="the small worker's row")
    assert row["min_idle"] == 2 and "memory" in row["sizes_refused"], row


def metric(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    raise AssertionError(f"no sample {name} {labels}")


def test_sigterm_drains_a_worker_that_serves_metrics_and_health(cluster, docker2):
    c = cluster()
    port = _free_port()
    worker = c.worker(engine=docker2, env={"WARMPOOL_WORKER_GRACE_S": "3"}, args=("--metrics-port", str(port)))
    api = c.api(env={"WARMPOOL_ADMIN_KEY": ADMIN_KEY})
    local = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10)
    health = local.get("/healthz").json()
    assert (health["worker"], health["engine"], health["state"]) == (worker.instance_id, docker2.host, "serving")
    wait_for(lambda: metric(local.get("/metrics").text, "warmpool_containers", worker=worker.instance_id,
                            tier="two", state="idle") == 2, what="the worker's metrics to show its warm pool")
    assert metric(local.get("/metrics").text, "warmpool_min_idle", worker=worker.instance_id, tier="one") == 1

    short = api.client.post("/v1/tasks", json={"code": "import time; time.sleep(2); print('short')",
                                               "resources": MEDIUM})
    long = api.client.post("/v1/tasks", json={"code": "import time; time.sleep(50)", "resources": MEDIUM,
                                              "timeout_s": 55})
    assert short.status_code == long.status_code == 202, (short.text, long.text)
    wait_for(lambda: len(c.running_tasks()) == 2, what="both tasks to start")
    assert metric(local.get("/metrics").text, "warmpool_leases_total", worker=worker.instance_id, tier="two") == 2

    worker.process.send_signal(signal.SIGTERM)
    wait_for(lambda: local.get("/healthz").json()["state"] == "draining", what="the worker to say it drains")
    wait_for(lambda: rows(api).get(worker.instance_id, {}).get("state") == "draining",
             what="the admin view to show the drain")
    wait_for(lambda: next(t for t in api.client.get("/v1/tiers").json() if t["name"] == "two")["workers"] == 0,
             what="the API to count the draining worker out (it takes no task)")
    assert worker.process.wait(60) == 0

    assert poll_task(api, short.json()["id"])["stdout"] == "short\n", "a task ending within the grace period ends"
    stopped = poll_task(api, long.json()["id"])
    assert stopped["status"] == "sandbox_error" and stopped["message"].startswith("worker stopped"), stopped
    assert container_ids(docker2.client, worker.instance_id) == []
    assert not c.redis.exists(f"{c.prefix}:worker:{worker.instance_id}")
    assert worker.instance_id not in c.redis.smembers(f"{c.prefix}:workers")
    with pytest.raises(httpx.TransportError):
        local.get("/healthz")
    local.close()
