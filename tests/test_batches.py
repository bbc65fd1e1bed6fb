"""Batches, long polls and fair sharing between keys, against a real server (embedded) and a cluster (Redis)."""

from __future__ import annotations

import re

import pytest

from tests.polling import wait_for

pytestmark = pytest.mark.docker

KEYS = {"WARMPOOL_API_KEYS": "alice,bob"}
ALICE, BOB = ({"Authorization": f"Bearer {k}"} for k in ("alice", "bob"))
# One tier of two containers: enough to run tasks concurrently, few enough that a batch has to queue.
FAIR_TIERS = {"tiers": [{"name": "pair", "cpu": 0.5, "ram": "96MiB", "storage": "32MiB", "min_idle": 2,
                         "max_size": 2}]}


def leases(service) -> float:
    text = service.client.get("/metrics").text
    return sum(float(m) for m in re.findall(r'^warmpool_leases_total\{[^}]*\} (\S+)$', text, re.MULTILINE))


def result(service, link: str, headers: dict[str, str] | None = None) -> dict:
    """The task's result, by long polls (each answers when the task ends, or after 30 s pending)."""
    def ended():
        body = service.client.get(link, params={"wait_s": 30}, headers=headers, timeout=40).json()
        return body if body["status"] not in ("queued", "running") else None
    return wait_for(ended, what=f"{link} to end", timeout_s=120, interval_s=0)


def test_a_batch_is_checked_whole_and_its_ids_come_back_in_order(serve):
    svc = serve(env={"WARMPOOL_MAX_BATCH": "5"})
    before = leases(svc)
    good = {"code": "print(1)", "resources": {"ram": "64MiB"}}

    def batch(*tasks):
        return svc.client.post("/v1/tasks/batch", json={"tasks": list(tasks)})

    bad_ram = batch(good, good, {"code": "print(1)", "resources": {"ram": "lots"}})
    assert bad_ram.status_code == 422 and bad_ram.json()["detail"][0]["loc"] == ["body", "tasks", 2, "resources", "ram"]
    bad_timeout = batch(good, {"code": "print(1)", "timeout_s": 10_000})
    assert bad_timeout.status_code == 422
    assert bad_timeout.json()["detail"][0]["loc"] == ["body", "tasks", 1, "timeout_s"]
    no_tier = batch(good, good, good, {"code": "print(1)", "resources": {"gpu": 1}})
    assert no_tier.status_code == 422 and no_tier.json()["detail"][0]["loc"] == ["body", "tasks", 3, "resources", "gpu"]
    too_big = batch({"code": "#" * (2 << 20)})
    assert too_big.status_code == 413 and too_big.json()["detail"].startswith("tasks[0].code:"), too_big.text
    unknown_field = batch(good, {"code": "print(1)", "colour": "red"})
    assert unknown_field.status_code == 422 and unknown_field.json()["detail"][0]["loc"] == ["body", "tasks", 1,
                                                                                            "colour"]
    too_many = batch(*[good] * 6)
    assert too_many.status_code == 422 and too_many.json()["detail"][0]["loc"] == ["body", "tasks"]
    assert "at most 5" in too_many.text
    assert batch().status_code == 422
    assert leases(svc) == before, "nothing of a refused batch ran"

    accepted = batch(*[{"code": f"print({i} * 7)", "resources": {"ram": "64MiB" if i % 2 else "200MiB"}}
                       for i in range(5)])
    assert accepted.status_code == 202, accepted.text
    items = accepted.json()["tasks"]
    assert [(t["status"], t["link"]) for t in items] == [("queued", f"/v1/tasks/{t['id']}") for t in items]
    assert len({t["id"] for t in items}) == 5
    bodies = [result(svc, t["link"]) for t in items]
    assert [(b["id"], b["status"], b["stdout"]) for b in bodies] == [
        (t["id"], "succeeded", f"{i * 7}\n") for i, t in enumerate(items)]
    assert [b["tier"] for b in bodies] == ["two", "one", "two", "one", "two"]


def test_long_poll_answers_when_the_task_ends_or_after_wait_s(serve):
    svc = serve()
    quick = svc.client.post("/v1/tasks", json={"code": "import time; time.sleep(1.5); print('done')"}).json()
    # Answered by the task's end, not by the 30 s bound (the test's own timeout would end it first otherwise).
    body = svc.client.get(quick["link"], params={"wait_s": 30}, timeout=25).json()
    assert (body["status"], body["stdout"]) == ("succeeded", "done\n")
    assert svc.client.get(quick["link"], params={"wait_s": 30}, timeout=5).json() == body, "an ended task: at once"

    slow = svc.client.post("/v1/tasks", json={"code": "import time; time.sleep(8)"}).json()
    assert svc.client.get(slow["link"], params={"wait_s": 0.5}).json()["status"] in ("queued", "running")
    for bad in ("31", "-1", "nan", "soon"):
        refused = svc.client.get(slow["link"], params={"wait_s": bad})
        assert refused.status_code == 422 and refused.json()["detail"][0]["loc"] == ["query", "wait_s"], bad


def fair_share_run(api, what: str) -> None:
    """Alice's 100-task batch, then Bob's tasks one after another: each of Bob's ends long before hers do."""
    batch = api.client.post("/v1/tasks/batch", headers=ALICE, json={"tasks": [
        {"code": f"import time; time.sleep(0.3); print({i})"} for i in range(100)]})
    assert batch.status_code == 202, batch.text
    alice = [t["link"] for t in batch.json()["tasks"]]

    def alice_pending() -> int:
        return sum(api.client.get(link, headers=ALICE).json()["status"] in ("queued", "running") for link in alice)

    for i in range(3):
        bob = api.client.post("/v1/tasks", headers=BOB, json={"code": f"print('bob {i}')"}).json()
        assert result(api, bob["link"], BOB)["stdout"] == f"bob {i}\n"
        # Without turns Bob would wait for all 100 of hers; with them he waits about one of hers per container.
        assert alice_pending() >= 50, f"{what}: Bob's task {i} waited for most of Alice's batch"
    synchronous = api.client.post("/v1/execute", headers=BOB, json={"code": "print('bob now')"}, timeout=30)
    assert synchronous.status_code == 200 and synchronous.json()["stdout"] == "bob now\n"
    assert alice_pending() >= 40, f"{what}: Bob's synchronous task waited for most of Alice's batch"
    bodies = [result(api, link, ALICE) for link in alice]
    assert [b["stdout"] for b in bodies] == [f"{i}\n" for i in range(100)]


def test_a_large_batch_does_not_starve_another_key_embedded(serve):
    fair_share_run(serve(tiers=FAIR_TIERS, env=KEYS), "embedded")


@pytest.mark.redis
def test_a_large_batch_does_not_starve_another_key_scaleout(cluster):
    c = cluster(tiers=FAIR_TIERS)
    c.worker()
    fair_share_run(c.api(env=KEYS), "scale-out")


@pytest.mark.redis
def test_batch_and_long_poll_in_scaleout_mode(cluster):
    c = cluster()
    c.worker()
    api = c.api(env={"WARMPOOL_MAX_BATCH": "4", **KEYS})
    refused = api.client.post("/v1/tasks/batch", headers=ALICE, json={"tasks": [
        {"code": "print(1)"}, {"code": "print(1)", "resources": {"cpu": "-1"}}]})
    assert refused.status_code == 422 and refused.json()["detail"][0]["loc"] == ["body", "tasks", 1, "resources", "cpu"]
    assert not list(c.redis.scan_iter(f"{c.prefix}:task:*")), "nothing of a refused batch was queued"

    accepted = api.client.post("/v1/tasks/batch", headers=ALICE, json={"tasks": [
        {"code": f"import time; time.sleep(1); print({i})", "resources": {"ram": "200MiB"}} for i in range(4)]})
    assert accepted.status_code == 202, accepted.text
    links = [t["link"] for t in accepted.json()["tasks"]]
    assert api.client.get(links[0], headers=BOB).status_code == 404, "another key's task"
    first = api.client.get(links[0], headers=ALICE, params={"wait_s": 30}, timeout=25).json()
    assert (first["status"], first["stdout"]) == ("succeeded", "0\n"), "answered when it ended"
    assert [result(api, link, ALICE)["stdout"] for link in links] == [f"{i}\n" for i in range(4)]
    slow = api.client.post("/v1/tasks", headers=ALICE, json={"code": "import time; time.sleep(8)"}).json()
    assert api.client.get(slow["link"], headers=ALICE, params={"wait_s": 0.5}).json()["status"] in ("queued",
                                                                                                    "running")


@pytest.mark.redis
def test_a_long_poll_blocks_instead_of_polling_redis(cluster, redis_server):
    """While a long poll waits, the API reads the task's hash a bounded number of times, not in a loop."""
    server = redis_server()
    c = cluster(redis_url_=server.url)
    c.worker()
    api = c.api()
    task = api.client.post("/v1/tasks", json={"code": "import time; time.sleep(4); print('late')"}).json()

    def reads() -> int:
        stats = c.redis.info("commandstats")
        return int(stats.get("cmdstat_hgetall", {}).get("calls", 0))

    before = reads()
    body = api.client.get(task["link"], params={"wait_s": 30}, timeout=25).json()
    assert body["stdout"] == "late\n"
    assert reads() - before <= 4, "the long poll read the task's state over and over"
