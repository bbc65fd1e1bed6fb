"""What survives what, in scale-out mode (README, "Durability"): queued tasks across a Redis crash with and
without AOF, and a synchronous task whose API process dies while it waits."""

from __future__ import annotations

import concurrent.futures
import time

import httpx
import pytest

from tests.scaleout_support import wait_for
from tests.test_scaleout import SMALL, poll_task

pytestmark = [pytest.mark.redis, pytest.mark.docker]

FSYNC_S = 1.5  # appendfsync everysec: what was written this long before a crash is on disk


def submit(api, code: str, **fields) -> str:
    response = api.client.post("/v1/tasks", json={"code": code, "resources": SMALL, **fields})
    assert response.status_code == 202, response.text
    return response.json()["id"]


@pytest.mark.parametrize("aof", [True, False], ids=["aof", "no-persistence"])
def test_queued_tasks_across_a_redis_crash(redis_server, cluster, aof: bool):
    """Tier "one" has one container: a running task and three queued behind it when Redis is SIGKILLed."""
    server = redis_server(appendonly=aof)
    c = cluster(redis_url_=server.url)
    c.worker(env={"WARMPOOL_WORKER_TIERS": "one"})
    api = c.api()
    running = submit(api, "import time; time.sleep(3); print('running')")
    wait_for(c.running_tasks, what="the first task to start")
    queued = [submit(api, f"print({i})") for i in range(3)]
    assert {api.client.get(f"/v1/tasks/{i}").json()["status"] for i in queued} == {"queued"}
    time.sleep(FSYNC_S)
    server.stop()  # SIGKILL: a crash, nothing flushed on the way out
    server.start()

    if aof:
        # Everything is back: the queue, the consumer group, the running task's record. The running task
        # finished while Redis was away and its worker stored the result once Redis answered again.
        assert poll_task(api, running)["stdout"] == "running\n"
        assert [poll_task(api, i)["stdout"] for i in queued] == ["0\n", "1\n", "2\n"]
    else:
        # Redis came back empty: every task it held is forgotten (404), the running one's result is dropped,
        # and the cluster serves new tasks again.
        wait_for(lambda: api.client.get(f"/v1/tasks/{running}").status_code == 404, what="Redis to be back")
        assert [api.client.get(f"/v1/tasks/{i}").status_code for i in queued] == [404] * 3
        wait_for(lambda: api.execute("print('after')", resources=SMALL).status_code == 200, timeout_s=60,
                 what="the cluster to serve again")
        time.sleep(4)  # the running task's worker has stored nothing meanwhile: its record is gone
        assert api.client.get(f"/v1/tasks/{running}").status_code == 404


def test_a_task_whose_api_dies_while_it_waits_still_runs_once(cluster):
    """The synchronous task runs (once) and its result goes to the dead API's reply list, which expires
    unread; a task still queued runs too; an async task does not depend on the API that took it."""
    c = cluster()
    c.worker(env={"WARMPOOL_WORKER_TIERS": "one"})
    doomed, other = c.api(), c.api()
    stream = f"{c.prefix}:stream:one"
    with concurrent.futures.ThreadPoolExecutor(2) as executor:
        first = executor.submit(doomed.execute, "import time; time.sleep(3); print('first')", resources=SMALL)
        wait_for(c.running_tasks, what="the first task to run")
        second = executor.submit(doomed.execute, "print('second')", resources=SMALL)
        wait_for(lambda: c.redis.xlen(stream) == 2, what="the second task to be queued")
        later = submit(doomed, "print('async')")
        doomed.process.kill()  # the first task runs, the second and the async one wait behind it
        for pending in (first, second):
            with pytest.raises(httpx.TransportError):
                pending.result(timeout=30)

    assert poll_task(other, later)["stdout"] == "async\n", "another API reads the async task's result"
    wait_for(lambda: c.redis.xlen(f"{c.prefix}:stream:one") == 0, what="both synchronous tasks to be answered")
    (reply_key,) = c.redis.keys(f"{c.prefix}:reply:{doomed.instance_id}-*")
    outcomes = c.redis.lrange(reply_key, 0, -1)
    assert len(outcomes) == 2 and all('"status":"succeeded"' in o for o in outcomes), outcomes
    assert '"stdout":"first\\n"' in outcomes[0] and '"stdout":"second\\n"' in outcomes[1]
    assert 0 < c.redis.pttl(reply_key) <= 300_000, "the unread replies expire"
