"""Scale-out mode end to end: an API and workers as separate processes, a real Redis, the real engine."""

from __future__ import annotations

import base64
import concurrent.futures
import socket
import threading
import time
import uuid

import pytest

from pool.dispatch import owner_of
from pool.model.results import TaskSpec
from pool.scaleout.task_codec import StreamEntry
from tests.polling import wait_for
from tests.scaleout_support import container_ids

pytestmark = [pytest.mark.redis, pytest.mark.docker]

SMALL = {"ram": "64MiB"}  # tier "one": one container per worker
MEDIUM = {"ram": "200MiB"}  # tier "two": up to four per worker


def poll_task(service, task_id: str, timeout_s: float = 60, **kwargs) -> dict:
    def finished():
        body = service.client.get(f"/v1/tasks/{task_id}", **kwargs).json()
        return body if body["status"] not in ("queued", "running") else None
    return wait_for(finished, timeout_s=timeout_s, what=f"task {task_id} to finish")


def test_one_api_two_workers_share_the_tasks_and_the_engine(cluster, docker_client):
    c = cluster()
    first = c.worker()
    first_containers = set(container_ids(docker_client, first.instance_id))
    second = c.worker()
    # The second worker's start-up orphan clean-up left the live first worker's containers alone.
    assert first_containers <= set(container_ids(docker_client, first.instance_id))
    api = c.api()
    assert container_ids(docker_client, api.instance_id) == [], "the API holds no containers in scale-out mode"

    tiers = api.client.get("/v1/tiers").json()
    assert [(t["name"], t["workers"]) for t in tiers] == [("one", 2), ("two", 2)]
    assert tiers[1]["max_size"] == 8 and tiers[1]["idle"] >= 2

    # Eight tasks that overlap, on a tier each worker runs at most four of at once: both must take some.
    code = "import socket, time\ntime.sleep(1.5)\nprint(socket.gethostname())"
    with concurrent.futures.ThreadPoolExecutor(8) as executor:
        bodies = list(executor.map(lambda _: api.execute(code, resources=MEDIUM).json(), range(8)))
    assert all(b["status"] == "succeeded" for b in bodies), bodies
    assert {b["worker"] for b in bodies} == {first.instance_id, second.instance_id}
    # Each task ran in a container of the worker that says it ran it.
    owner_by_host = {container_id[:12]: worker.instance_id for worker in (first, second)
                     for container_id in container_ids(docker_client, worker.instance_id)}
    assert all(owner_by_host[b["stdout"].strip()] == b["worker"] for b in bodies)
    assert all(b["tier"] == "two" and b["timings"]["run_ms"] >= 1500 for b in bodies)


def test_async_task_submit_poll_then_expire(cluster):
    c = cluster()
    c.worker()
    api = c.api(env={"WARMPOOL_RESULT_TTL_S": "2", "WARMPOOL_API_KEYS": "alice,bob"})
    alice, bob = ({"Authorization": f"Bearer {k}"} for k in ("alice", "bob"))

    accepted = api.client.post("/v1/tasks", headers=alice,
                               json={"code": "import time; time.sleep(1); print('later')", "resources": SMALL})
    assert accepted.status_code == 202, accepted.text
    body = accepted.json()
    assert body["status"] == "queued" and body["link"] == f"/v1/tasks/{body['id']}"
    assert accepted.headers["location"] == body["link"]
    assert api.client.get(body["link"], headers=alice).json()["status"] in ("queued", "running")
    assert api.client.get(body["link"], headers=bob).status_code == 404, "another key cannot read it"
    assert api.client.get(body["link"]).status_code == 401

    result = poll_task(api, body["id"], headers=alice)
    assert result["status"] == "succeeded" and result["stdout"] == "later\n" and result["tier"] == "one"
    assert result["worker"] == c.workers[0].instance_id
    assert api.client.get(body["link"], headers=alice).json() == result, "reading it again gives the same result"
    wait_for(lambda: api.client.get(body["link"], headers=alice).status_code == 404, timeout_s=10,
             what="the result to expire")
    assert api.client.get(f"/v1/tasks/{uuid.uuid4().hex}", headers=alice).status_code == 404
    assert api.client.get("/v1/tasks/not-an-id", headers=alice).status_code == 404


def test_stream_bound_gives_429_and_an_unserved_tier_503(cluster):
    c = cluster()
    c.worker(env={"WARMPOOL_WORKER_TIERS": "one"})
    api = c.api(env={"WARMPOOL_MAX_QUEUED": "3"})

    slow = {"code": "import time; time.sleep(4); print('slow')", "resources": SMALL}
    ids = []
    for _ in range(3):
        response = api.client.post("/v1/tasks", json=slow)
        assert response.status_code == 202, response.text
        ids.append(response.json()["id"])
    full = api.client.post("/v1/tasks", json=slow)
    assert full.status_code == 429 and int(full.headers["retry-after"]) >= 1
    assert api.execute("print(1)", resources=SMALL).status_code == 429, "the bound covers synchronous tasks too"
    states = [api.client.get(f"/v1/tasks/{i}").json()["status"] for i in ids]
    assert states.count("queued") >= 2 and set(states) <= {"queued", "running"}, states

    unserved = api.execute("print(1)", resources=MEDIUM)
    assert unserved.status_code == 503 and int(unserved.headers["retry-after"]) >= 1
    assert "no live worker serves tier 'two'" in unserved.json()["detail"]
    def tiers_once_counted():
        tiers = {t["name"]: t for t in api.client.get("/v1/tiers").json()}
        return tiers if tiers["one"]["queued"] == 3 else None
    tiers = wait_for(tiers_once_counted, what="/v1/tiers to count the queue")
    assert tiers["one"]["workers"] == 1 and tiers["two"]["workers"] == 0

    results = [poll_task(api, i) for i in ids]
    assert [r["stdout"] for r in results] == ["slow\n"] * 3
    assert api.client.post("/v1/tasks", json=slow).status_code == 202, "room again once they ended"


def test_a_synchronous_task_no_worker_starts_in_time_is_withdrawn(cluster):
    """Never hangs: past its deadline the request answers 503, and its task is withdrawn, never to run."""
    c = cluster()
    c.worker(env={"WARMPOOL_WORKER_TIERS": "one"})
    api = c.api(env={"WARMPOOL_LEASE_TIMEOUT_S": "1"})
    blocker = api.client.post("/v1/tasks", json={"code": "import time; time.sleep(6); print('blocker')",
                                                 "resources": SMALL, "timeout_s": 20}).json()
    wait_for(c.running_tasks, what="the blocker to start")
    late = api.execute("print('late')", resources=SMALL, timeout_s=1)
    assert late.status_code == 503 and "no 'one' container was free" in late.json()["detail"], late.text
    assert int(late.headers["retry-after"]) >= 1
    hurried = api.execute("print('hurried')", resources=SMALL, max_wait_ms=0)
    assert hurried.status_code == 503, "max_wait_ms bounds the wait for a worker to start the task"
    assert c.redis.xlen(f"{c.prefix}:stream:one") == 1, "the withdrawn task left the queue"
    assert poll_task(api, blocker["id"])["stdout"] == "blocker\n"
    withdrawn = [c.task_hash(k.rsplit(":", 1)[1]) for k in c.redis.scan_iter(f"{c.prefix}:task:*")]
    assert sorted(h["state"] for h in withdrawn) == ["abandoned", "abandoned", "done"]


def test_sigkill_of_a_worker_mid_task_answers_worker_lost(cluster, docker_client):
    c = cluster()
    workers = [c.worker(), c.worker()]
    api = c.api()
    with concurrent.futures.ThreadPoolExecutor(1) as executor:
        pending = executor.submit(api.execute, "import time; time.sleep(60)", resources=SMALL, timeout_s=30)
        running = wait_for(c.running_tasks, timeout_s=30, what="the task to start")
        ((task_id, owner),) = running.items()
        (victim,) = [w for w in workers if w.instance_id == owner]
        (survivor,) = [w for w in workers if w is not victim]
        assert container_ids(docker_client, victim.instance_id)
        victim.kill()
        started = time.monotonic()
        response = pending.result(timeout=60)
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "sandbox_error" and body["message"].startswith("worker lost"), body
    assert body["worker"] == victim.instance_id and body["id"] == task_id
    assert time.monotonic() - started < 30, "answered after the visibility timeout, not the task's deadline"
    assert c.task_hash(task_id)["state"] == "done"
    assert c.redis.xlen(f"{c.prefix}:stream:one") == 0

    after = api.execute("print('after')", resources=SMALL).json()
    assert after["stdout"] == "after\n" and after["worker"] == survivor.instance_id
    # The survivor removed what the dead worker left on the shared engine, and only that.
    wait_for(lambda: not container_ids(docker_client, victim.instance_id), timeout_s=30,
             what="the dead worker's containers to be removed")
    assert container_ids(docker_client, survivor.instance_id)


def test_claimed_tasks_run_only_if_they_never_started(cluster):
    """A dead worker's entries: a task it never started is run; one it started is answered, not rerun."""
    c = cluster()
    stream = f"{c.prefix}:stream:one"
    c.redis.xgroup_create(stream, "workers", id="0", mkstream=True)

    def inject(code: str, **record: str) -> str:
        task_id = uuid.uuid4().hex
        fields = StreamEntry(spec=TaskSpec(task_id=task_id, code=code, timeout_s=5), reply_to="",
                             submitted_unix=time.time(), result_ttl_ms=60_000, lease_wait_s=5.0).to_fields()
        entry = c.redis.xadd(stream, fields)
        c.redis.hset(f"{c.prefix}:task:{task_id}", mapping={
            "kind": "async", "tier": "one", "owner": owner_of("anonymous"), "entry": entry, **record})
        # A worker that has since died ("ghost", no heartbeat) reads it: the entry is pending on it.
        assert c.redis.xreadgroup("workers", "ghost", {stream: ">"}, count=1)[0][1][0][0] == entry
        return task_id

    never_started = inject("print('ran once')", state="queued")
    started = inject("print('ran twice')", state="running", worker="ghost")
    answered = inject("print('ran twice')", state="done", outcome="kept")
    c.worker()
    api = c.api()

    first = poll_task(api, never_started)
    assert first["status"] == "succeeded" and first["stdout"] == "ran once\n"
    second = poll_task(api, started)
    assert second["status"] == "sandbox_error" and second["stdout"] == ""
    assert second["message"].startswith("worker lost: worker 'ghost'")
    wait_for(lambda: c.redis.xlen(stream) == 0, what="every claimed entry to be dropped")
    assert c.task_hash(answered)["outcome"] == "kept", "an answered task is never answered again"


def test_redis_restart_gives_503_then_recovers(redis_server, cluster):
    server = redis_server()
    c = cluster(redis_url_=server.url)
    c.worker()
    api = c.api()
    assert api.execute("print('before')").json()["stdout"] == "before\n"

    with concurrent.futures.ThreadPoolExecutor(1) as executor:
        in_flight = executor.submit(api.execute, "import time; time.sleep(3)")
        wait_for(c.running_tasks, what="the in-flight task to start")
        server.stop()
        during = api.execute("print('during')")
        assert during.status_code == 503 and int(during.headers["retry-after"]) >= 1, during.text
        assert api.client.post("/v1/tasks", json={"code": "print(1)"}).status_code == 503
        assert api.client.get(f"/v1/tasks/{uuid.uuid4().hex}").status_code == 503
        assert api.client.get("/readyz").status_code == 503
        server.start()  # empty: the in-flight task's record is gone with the old Redis
        lost = in_flight.result(timeout=60)
    assert lost.status_code == 503, lost.text

    wait_for(lambda: api.execute("print('after')").status_code == 200, timeout_s=60, what="recovery")
    assert api.execute("print('after')").json()["stdout"] == "after\n"
    accepted = api.client.post("/v1/tasks", json={"code": "print('async after')"}).json()
    assert poll_task(api, accepted["id"])["stdout"] == "async after\n"


def test_sigterm_lets_a_worker_finish_its_task_then_leave(cluster, docker_client):
    c = cluster()
    worker = c.worker()
    api = c.api()
    with concurrent.futures.ThreadPoolExecutor(1) as executor:
        pending = executor.submit(api.execute, "import time; time.sleep(2); print('finished')", resources=SMALL)
        wait_for(c.running_tasks, what="the task to start")
        assert worker.stop() == 0
        body = pending.result(timeout=60).json()
    assert body["status"] == "succeeded" and body["stdout"] == "finished\n"
    assert container_ids(docker_client, worker.instance_id) == []
    wait_for(lambda: api.execute("print(1)", resources=SMALL).status_code == 503, timeout_s=10,
             what="the API to see that no worker is left")


def test_readyz_is_503_while_no_worker_is_alive(cluster):
    c = cluster()
    api = c.api(ready=False)
    alone = api.client.get("/readyz")
    assert alone.status_code == 503 and alone.json()["checks"] == {"redis": True, "workers": False}, alone.text
    stopped = c.worker()
    wait_for(lambda: api.client.get("/readyz").status_code == 200, "the API to see the worker")
    stopped.stop()  # SIGTERM: it leaves the membership
    wait_for(lambda: api.client.get("/readyz").status_code == 503, "the API to see no worker left")
    killed = c.worker()
    wait_for(lambda: api.client.get("/readyz").status_code == 200, "the API to see the new worker")
    killed.kill()  # no goodbye: its heartbeats stop
    wait_for(lambda: api.client.get("/readyz").status_code == 503, "the API to see the dead worker gone")
    assert api.client.get("/readyz").json()["checks"] == {"redis": True, "workers": False}


class RedisMonitor:
    """Every command a redis-server runs (MONITOR shows those of scripts too), read on a thread of its own."""

    def __init__(self, port: int) -> None:
        self.lines: list[str] = []
        self._sock = socket.create_connection(("127.0.0.1", port))
        self._sock.sendall(b"MONITOR\r\n")
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        pending = b""
        while data := self._sock.recv(1 << 16):
            pending += data
            *complete, pending = pending.split(b"\r\n")
            self.lines += [line.decode(errors="replace") for line in complete]

    def close(self) -> list[str]:
        self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        self._thread.join(timeout=10)
        return self.lines


def test_two_api_replicas_each_get_their_own_replies_once(redis_server, cluster):
    """Two API processes, even given one instance id, on one Redis: every synchronous task's reply is pushed
    once, to the reply list of the API that took it, and read from there (nothing is left)."""
    server = redis_server()
    c = cluster(redis_url_=server.url)
    c.worker()
    twins = [c.api(env={"WARMPOOL_INSTANCE_ID": "api-twin"}) for _ in range(2)]
    monitor = RedisMonitor(server.port)
    tokens = [uuid.uuid4().hex for _ in range(12)]

    def run(i: int) -> dict:
        body = twins[i % 2].execute(f"import time\ntime.sleep(0.3)\nprint('{tokens[i]}')", resources=MEDIUM)
        assert body.status_code == 200, body.text
        return body.json()

    try:
        with concurrent.futures.ThreadPoolExecutor(12) as executor:
            bodies = list(executor.map(run, range(12)))
    finally:
        lines = monitor.close()
    assert [b["stdout"] for b in bodies] == [f"{t}\n" for t in tokens], "each request got its own task's result"
    pushes = [line for line in lines if '"rpush"' in line.lower() and f'"{c.prefix}:reply:' in line]
    reply_keys: dict[int, set[str]] = {0: set(), 1: set()}
    for i, body in enumerate(bodies):
        (push,) = [line for line in pushes if body["id"] in line]  # exactly one reply per task
        reply_keys[i % 2].add(push.split('"')[3])  # ... "RPUSH" "<key>" "<reply>"
    assert len(pushes) == 12, pushes
    assert all(len(keys) == 1 for keys in reply_keys.values()) and reply_keys[0] != reply_keys[1], reply_keys
    assert all(c.redis.llen(key) == 0 for keys in reply_keys.values() for key in keys), "every reply was read"


def test_files_outputs_and_images_work_the_same_through_redis(cluster):
    """Files go to the worker with the task, outputs come back with its result (sync and async), and
    GET /v1/images says what the workers' engines hold."""
    c = cluster()
    worker = c.worker()
    api = c.api()
    code = "import os\nos.makedirs('out')\nopen('out/r.txt', 'w').write(open('in/data.txt').read().upper())"
    request = {"files": [{"path": "in/data.txt", "content": "from the api"}], "outputs": ["out/*.txt"]}
    body = api.execute(code, **request).json()
    assert (body["status"], body["image"], body["worker"]) == ("succeeded", "python", worker.instance_id), body
    assert [(f["path"], f["size_bytes"], base64.b64decode(f["content"])) for f in body["files"]] == \
        [("out/r.txt", 12, b"FROM THE API")]
    accepted = api.client.post("/v1/tasks", json={"code": code, **request}).json()
    done = poll_task(api, accepted["id"])
    assert (done["status"], done["files"], done["files_truncated"]) == ("succeeded", body["files"], False)
    images = wait_for(lambda: (found := api.client.get("/v1/images").json()) and found[0]["python_version"] != "3.11"
                      and found, what="a worker's image labels")
    assert [(i["name"], i["packages"], i["preloaded"]) for i in images] == [("python", {}, [])]
    assert images[0]["python_version"].startswith("3.11.")
