"""The admin API on the real engine: see the pools, resize them live, drain them, keep sizes in a file."""

from __future__ import annotations

import concurrent.futures
import json

import pytest

from tests.conftest import TEST_TIERS
from tests.polling import wait_for

pytestmark = pytest.mark.docker

ADMIN_KEY = "admin-test-key"
AUTH = {"authorization": f"Bearer {ADMIN_KEY}"}


@pytest.fixture
def service(serve):
    return serve(env={"WARMPOOL_ADMIN_KEY": ADMIN_KEY})


def ids_of(docker_client, service, tier: str) -> set[str]:
    """Ids of the service's containers of a tier, as `docker ps -a --filter label=...` lists them."""
    labels = [f"warmpool.instance={service.instance_id}", f"warmpool.tier={tier}"]
    return {c["Id"] for c in docker_client.api.containers(all=True, filters={"label": labels})}


def pools(service) -> dict[str, dict]:
    response = service.client.get("/v1/admin/pools", headers=AUTH)
    assert response.status_code == 200, response.text
    return {t["name"]: t for t in response.json()["tiers"]}


def patch(service, tier: str, **sizes):
    return service.client.patch(f"/v1/admin/pools/{tier}", json=sizes, headers=AUTH)


def test_admin_routes_need_the_admin_key(service):
    for method, path in (("GET", "/v1/admin/pools"), ("PATCH", "/v1/admin/pools/two"),
                         ("POST", "/v1/admin/pools/two/drain")):
        assert service.client.request(method, path, json={"min_idle": 1}).status_code == 401
        wrong = {"authorization": "Bearer not-the-key"}
        assert service.client.request(method, path, json={"min_idle": 1}, headers=wrong).status_code == 403
    assert pools(service)["two"]["min_idle"] == 2, "nothing changed"


def test_pools_view_has_sizes_counts_counters_and_capacity(service):
    assert service.execute("print(1)", resources={"ram": "64MiB"}).json()["tier"] == "one"
    body = service.client.get("/v1/admin/pools", headers=AUTH).json()
    assert body["persisted"] is False and "until the service stops" in body["note"]
    one = wait_for(lambda: (t := pools(service)["one"])["idle"] == 1 and t, "tier one idle again")
    assert (one["min_idle"], one["max_size"], one["target_idle"]) == (1, 1, 1)
    assert (one["busy"], one["starting"], one["leases"], one["created"]) == (0, 0, 1, 1)
    assert set(one["lease_wait_ms"]) == {"p50", "p95"} and one["replaced"] == {}
    capacity = body["capacity"]
    assert capacity["cpu_held"] == 0.5 + 2 * 1 and capacity["ram_held_bytes"] == (96 + 2 * 256) * 1024**2
    assert capacity["gpu_ids"] == [] and capacity["cpu_budget"] == capacity["cpus"] * capacity["cpu_overcommit"]


def test_resize_up_and_down_live(service, docker_client):
    assert len(ids_of(docker_client, service, "two")) == 2
    response = patch(service, "two", min_idle=4)
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["min_idle"], body["max_size"]) == (4, 4) and body["persisted"] is False
    wait_for(lambda: len(ids_of(docker_client, service, "two")) == 4, "two grows to 4 containers")
    wait_for(lambda: pools(service)["two"]["idle"] == 4, "all four warm")

    before = ids_of(docker_client, service, "two")
    response = patch(service, "two", min_idle=1, max_size=1)
    assert response.status_code == 200, response.text
    wait_for(lambda: len(ids_of(docker_client, service, "two")) == 1, "two shrinks to 1 container")
    assert ids_of(docker_client, service, "two") < before, "the one left is one of the old ones"
    assert pools(service)["two"]["replaced"] == {"scaled_down": 3}
    assert service.execute("print('still')", resources={"ram": "200MiB"}).json()["stdout"] == "still\n"
    assert len(ids_of(docker_client, service, "one")) == 1, "the other tier is untouched"


def test_lowering_max_size_retires_busy_containers_when_they_finish(serve, docker_client):
    """Both containers of "two" are busy when max_size drops to 1: the first to finish its task is removed
    then and there, never offered again, so the lease that waits meanwhile gets the second one."""
    full = {"tiers": [TEST_TIERS["tiers"][0], {**TEST_TIERS["tiers"][1], "min_idle": 2, "max_size": 2}]}
    service = serve(tiers=full, env={"WARMPOOL_ADMIN_KEY": ADMIN_KEY, "WARMPOOL_LEASE_TIMEOUT_S": "30"})
    host = "import socket, time\ntime.sleep({})\nprint(socket.gethostname())"
    medium = {"ram": "200MiB"}
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        shorter = pool.submit(service.execute, host.format(3), resources=medium, timeout_s=30)
        longer = pool.submit(service.execute, host.format(8), resources=medium, timeout_s=30)
        wait_for(lambda: pools(service)["two"]["busy"] == 2, "both two containers busy")
        assert patch(service, "two", min_idle=0, max_size=1).status_code == 200
        waiting = pool.submit(service.execute, host.format(0), resources=medium)
        wait_for(lambda: pools(service)["two"]["waiting"] == 1, "a third lease waiting for a two container")
        assert not shorter.done(), "the first task ended before the third lease waited: the test proves nothing"
        first, second, third = (f.result(timeout=60).json() for f in (shorter, longer, waiting))
    assert [b.get("status") for b in (first, second, third)] == ["succeeded"] * 3, (first, second, third)
    assert third["stdout"] == second["stdout"] != first["stdout"], "the waiter got the container that stayed"
    wait_for(lambda: {i[:12] for i in ids_of(docker_client, service, "two")} == {second["stdout"].strip()},
             "only the second container left in two")
    assert pools(service)["two"]["replaced"] == {"scaled_down": 1}


@pytest.mark.parametrize(("sizes", "words"), [
    ({"max_size": 500}, "memory"),
    ({"min_idle": 200, "max_size": 200}, "memory"),
])
def test_resize_past_capacity_is_409_and_changes_nothing(service, sizes, words):
    response = patch(service, "two", **sizes)
    assert response.status_code == 409, response.text
    assert words in response.json()["detail"] and "tier 'two'" in response.json()["detail"]
    two = pools(service)["two"]
    assert (two["min_idle"], two["max_size"]) == (2, 4)


@pytest.mark.parametrize(("tier", "sizes", "status"), [
    ("two", {}, 422),
    ("two", {"min_idle": 5}, 422),  # above max_size 4
    ("two", {"min_idle": -1}, 422),
    ("two", {"max_size": 0}, 422),
    ("two", {"min_idle": "many"}, 422),
    ("two", {"colour": "red"}, 422),
    ("nope", {"min_idle": 1}, 404),
])
def test_bad_resizes_are_4xx(service, tier, sizes, status):
    assert patch(service, tier, **sizes).status_code == status


def test_drain_replaces_every_idle_container(service, docker_client):
    before = ids_of(docker_client, service, "two")
    response = service.client.post("/v1/admin/pools/two/drain", headers=AUTH)
    assert response.status_code == 200, response.text
    assert response.json()["idle_replaced"] == 2
    wait_for(lambda: (ids := ids_of(docker_client, service, "two")).isdisjoint(before) and len(ids) == 2,
             "every old container gone and two fresh ones in their place")
    wait_for(lambda: pools(service)["two"]["idle"] == 2, "the fresh ones warm")
    assert pools(service)["two"]["replaced"] == {"drained": 2}
    assert service.execute("print('fresh')", resources={"ram": "200MiB"}).json()["stdout"] == "fresh\n"


def test_drain_replaces_a_busy_container_when_its_task_ends(service, docker_client):
    (old,) = ids_of(docker_client, service, "one")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        running = pool.submit(service.execute, "import time; time.sleep(2); print('done')",
                              resources={"ram": "64MiB"})
        wait_for(lambda: pools(service)["one"]["busy"] == 1, "tier one busy")
        body = service.client.post("/v1/admin/pools/one/drain", headers=AUTH).json()
        assert body["idle_replaced"] == 0 and body["busy_replaced_when_done"] == 1
        assert running.result(timeout=30).json()["stdout"] == "done\n"
    new = wait_for(lambda: (ids := ids_of(docker_client, service, "one")) and old not in ids and ids,
                   "tier one's container replaced")
    assert len(new) == 1


def test_sizes_kept_in_a_file_survive_a_restart(serve, tmp_path):
    sizes_file = tmp_path / "pool-sizes.json"
    env = {"WARMPOOL_ADMIN_KEY": ADMIN_KEY, "WARMPOOL_POOL_SIZES_FILE": str(sizes_file)}
    first = serve(env=env)
    body = patch(first, "two", min_idle=3, max_size=5).json()
    assert body["persisted"] is True and str(sizes_file) in body["note"]
    assert json.loads(sizes_file.read_text()) == {"tiers": {"two": {"min_idle": 3, "max_size": 5}}}
    first.stop()
    second = serve(env=env)
    two = pools(second)["two"]
    assert (two["min_idle"], two["max_size"]) == (3, 5)
    assert two["idle"] == 3, "ready means warm to the kept min_idle"


def test_admin_routes_are_off_without_an_admin_key(serve):
    service = serve()
    response = service.client.get("/v1/admin/pools", headers=AUTH)
    assert response.status_code == 403 and "WARMPOOL_ADMIN_KEY" in response.json()["detail"]
