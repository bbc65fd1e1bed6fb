"""Async tasks in embedded mode (no Redis): submit, poll, expire, bound, and who may read them."""

from __future__ import annotations

import uuid

import pytest

from tests.polling import wait_for

pytestmark = pytest.mark.docker

SMALL = {"ram": "64MiB"}


def test_embedded_async_tasks_submit_poll_bound_and_expire(serve):
    svc = serve(env={"WARMPOOL_RESULT_TTL_S": "2", "WARMPOOL_MAX_QUEUED": "2", "WARMPOOL_API_KEYS": "alice,bob"})
    alice, bob = ({"Authorization": f"Bearer {k}"} for k in ("alice", "bob"))
    # Each prints when it started and ended (the host's clock: containers share the kernel's).
    slow = {"code": "import time\nstarted = time.time()\ntime.sleep(1)\nprint('background', started, time.time())",
            "resources": SMALL}

    accepted = [svc.client.post("/v1/tasks", json=slow, headers=alice) for _ in range(2)]
    assert [a.status_code for a in accepted] == [202, 202]
    full = svc.client.post("/v1/tasks", json=slow, headers=alice)
    assert full.status_code == 429 and int(full.headers["retry-after"]) >= 1
    links = [a.json()["link"] for a in accepted]
    assert [a.headers["location"] for a in accepted] == links
    states = {svc.client.get(link, headers=alice).json()["status"] for link in links}
    assert states <= {"queued", "running"} and "queued" in states, "tier 'one' runs one task at a time"
    assert svc.client.get(links[0], headers=bob).status_code == 404

    def finished(link):
        body = svc.client.get(link, headers=alice).json()
        return body if body["status"] not in ("queued", "running") else None

    results = [wait_for(lambda link=link: finished(link), what="the task to end") for link in links]
    assert [(r["status"], r["stdout"].split()[0], r["worker"]) for r in results] == [
        ("succeeded", "background", svc.instance_id)] * 2
    first, second = sorted((float(start), float(end)) for _, start, end in (r["stdout"].split() for r in results))
    assert second[0] >= first[1], "tier 'one' has one container: the second task started after the first ended"
    assert svc.client.post("/v1/tasks", json=slow, headers=alice).status_code == 202, "room again"
    wait_for(lambda: svc.client.get(links[0], headers=alice).status_code == 404, timeout_s=10,
             what="the result to expire")
    assert svc.client.get(f"/v1/tasks/{uuid.uuid4().hex}", headers=alice).status_code == 404


def test_async_task_failure_is_a_result(serve):
    svc = serve()
    accepted = svc.client.post("/v1/tasks", json={"code": "raise SystemExit(4)"}).json()
    body = wait_for(lambda: (b := svc.client.get(accepted["link"]).json())["status"] not in ("queued", "running")
                    and b, what="the task to end")
    assert body["status"] == "failed" and body["exit_code"] == 4
    bad = svc.client.post("/v1/tasks", json={"code": "print(1)", "resources": {"ram": "lots"}})
    assert bad.status_code == 422 and "ram" in bad.text
