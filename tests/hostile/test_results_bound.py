"""Async results are bounded per key (429) and in total (oldest finished evicted), in embedded and in
scale-out mode (issue 9, finding 7: 100 tasks printing 2 MB each used to grow the server by 170 MiB)."""

from __future__ import annotations

import json
import secrets
import uuid

import anyio
import httpx
import pytest
import redis

from pool.model.errors import Overloaded
from pool.model.result_bounds import RECORD_OVERHEAD_BYTES, Bounds, ResultBook, pending_bytes
from pool.model.results import TaskSpec
from pool.model.tasks import Submission
from pool.scaleout.backlog import Backlog
from pool.scaleout.redis_io import GROUP, Keys, Refusal, Scripts, connect
from tests.hostile.conftest import server_rss_bytes
from tests.polling import wait_for

MIB = 1024 ** 2
# Small caps on code, stdin and files keep a pending task's reservation (inputs plus twice the output limit)
# near 2 MiB, so that a 16 MiB bound holds several at once.
BOUND_ENV = {"WARMPOOL_MAX_CODE_BYTES": "64KiB", "WARMPOOL_MAX_STDIN_BYTES": "64KiB",
             "WARMPOOL_MAX_FILES_BYTES": "64KiB", "WARMPOOL_MAX_OUTPUT_FILES_BYTES": "64KiB",
             "WARMPOOL_OUTPUT_LIMIT_BYTES": "1MiB", "WARMPOOL_MAX_RESULT_BYTES": "16MiB",
             "WARMPOOL_MAX_RESULT_BYTES_PER_KEY": "16MiB", "WARMPOOL_MAX_QUEUED": "1000"}
MEGABYTE_TASK = {"code": "print('x' * 1_000_000)", "resources": {"ram": "64MiB"}}


def test_the_book_refuses_per_key_and_evicts_the_oldest_in_total():
    book = ResultBook(Bounds(max_tasks_per_key=3, max_result_bytes_per_key=1000, max_results=4,
                             max_result_bytes=1100))
    assert book.admit("a1", "alice", 100, now=0, pending_retry_s=60) == []
    assert book.admit("a2", "alice", 100, now=0, pending_retry_s=60) == []
    assert book.admit("a3", "alice", 100, now=0, pending_retry_s=60) == []
    with pytest.raises(Overloaded) as info:  # a fourth task for alice: per-key count
        book.admit("a4", "alice", 100, now=0, pending_retry_s=60)
    assert info.value.retry_after_s == 60  # nothing of hers finished yet: the pending bound
    assert book.finish("a1", 50, expires_at=100) == []
    with pytest.raises(Overloaded) as info:
        book.admit("a4", "alice", 100, now=10, pending_retry_s=60)
    assert info.value.retry_after_s == 90  # when her oldest finished result expires
    with pytest.raises(Overloaded, match="this key's pending async tasks already hold"):  # per-key bytes
        book.admit("b1", "bob", 1001, now=0, pending_retry_s=60)
    assert book.admit("b1", "bob", 900, now=0, pending_retry_s=60) == ["a1"]  # total bytes: a1 goes
    assert book.total.size_bytes == 1100 and book.usage("alice").tasks == 2
    with pytest.raises(Overloaded, match="this key's pending async tasks"):  # bob's 900 pending + 600 pass his 1000
        book.admit("b2", "bob", 600, now=0, pending_retry_s=60)
    with pytest.raises(Overloaded, match="1100 bytes.*pending ones filling the bound"):  # only pending tasks left
        book.admit("c1", "carol", 100, now=0, pending_retry_s=60)  # within carol's own bound, past the total
    assert book.finish("a2", 10, expires_at=200) == []
    assert book.finish("b1", 1400, expires_at=300) == ["a2"]  # finished bigger than reserved: oldest out
    assert book.expire(now=299) == [] and book.expire(now=300) == ["b1"]
    assert book.usage("bob").tasks == 0 and book.total.tasks == 1  # a3, still pending


@pytest.mark.redis
def test_the_redis_scripts_hold_the_same_bound(redis_url):
    anyio.run(_redis_bound, redis_url)


async def _redis_bound(url: str) -> None:
    client = connect(url)
    keys = Keys(f"wptest-{secrets.token_hex(4)}")
    scripts = Scripts(client, keys.prefix)
    backlog = Backlog(client, keys)
    stream = keys.stream("one")
    bounds = Bounds(max_tasks_per_key=3, max_result_bytes_per_key=10_000, max_results=4, max_result_bytes=12_000)
    try:
        await client.xgroup_create(stream, GROUP, id="0", mkstream=True)

        async def submit(task_id: str, owner: str, size: int) -> object:
            """Async tasks are held as they enter the backlog; fed to the stream at once here (target 100)."""
            spec = TaskSpec(task_id=task_id, code="x" * (size - RECORD_OVERHEAD_BYTES), output_limit_bytes=0)
            assert pending_bytes(spec) == size
            refused = await backlog.enqueue(
                [(Submission("one", spec), {"id": task_id}, {"state": "queued", "kind": "async", "owner": owner})],
                owner, max_len=100, ttl_ms=60_000, bounds=bounds, feed_targets={"one": 100})
            return refused or await client.hget(keys.task(task_id), "entry")

        async def finish(task_id: str, output: str) -> str:
            entry = await client.hget(keys.task(task_id), "entry")
            return await scripts.finalize(keys.task(task_id), stream, "", entry, json.dumps({"out": output}),
                                          ttl_ms=60_000, reply_ttl_ms=1000, sync_ttl_ms=1000, task_id=task_id,
                                          max_held_bytes=bounds.max_result_bytes)

        a = [uuid.uuid4().hex for _ in range(4)]
        for task_id in a[:3]:
            assert isinstance(await submit(task_id, "alice", 3000), str)
        refused = await submit(a[3], "alice", 2100)
        assert isinstance(refused, Refusal) and (refused.scope, refused.tasks) == ("key", 3)
        assert refused.retry_after_ms == -1  # nothing of hers finished yet
        assert await finish(a[0], "y" * 3000) == "stored"
        refused = await submit(a[3], "alice", 2100)
        assert isinstance(refused, Refusal) and 0 < refused.retry_after_ms <= 60_000
        assert await client.hget(f"{keys.prefix}:held-totals", "tasks") == "3"
        b = uuid.uuid4().hex
        assert isinstance(await submit(b, "bob", 5000), str)  # 3000+3000+3000+5000 passes 12000: a[0] goes
        assert await client.hgetall(keys.task(a[0])) == {"state": "evicted", "kind": "async", "owner": "alice"}
        assert await client.hget(f"{keys.prefix}:held-bytes", "alice") == "6000"
        assert await finish(a[1], "z" * 9000) == "stored"  # bigger than reserved: a[1] is the oldest done,
        assert await client.hget(keys.task(a[1]), "state") == "done"  # but never evicts itself
        size = len(json.dumps({"out": "z" * 9000})) + RECORD_OVERHEAD_BYTES
        assert await client.hget(f"{keys.prefix}:held-bytes", "alice") == str(3000 + size)
        assert int(await client.hget(f"{keys.prefix}:held-totals", "bytes")) == 3000 + size + 5000
    finally:
        leftovers = [k async for k in client.scan_iter(f"{keys.prefix}:*")]
        if leftovers:
            await client.delete(*leftovers)
        await client.aclose()


def _submit_all(client: httpx.Client, count: int, headers: dict[str, str] | None = None) -> list[str]:
    """Submit `count` megabyte tasks, each retried while it is refused with 429 (its Retry-After is when room
    comes back, but a pending task's room comes back sooner: it is asked again at the polling interval)."""

    def accepted() -> str | None:
        response = client.post("/v1/tasks", json=MEGABYTE_TASK, headers=headers or {})
        if response.status_code == 429:
            assert int(response.headers["retry-after"]) >= 1 and "bound" in response.json()["detail"]
            return None
        assert response.status_code == 202, response.text
        return str(response.json()["link"])

    return [wait_for(accepted, f"room for task {i + 1} of {count}", timeout_s=240) for i in range(count)]


def _finished(client: httpx.Client, link: str, headers: dict[str, str] | None = None) -> httpx.Response | None:
    response = client.get(link, headers=headers or {})
    if response.status_code == 200 and response.json()["status"] in ("queued", "running"):
        return None
    return response


def _three_tasks_per_key(client: httpx.Client) -> None:
    """With WARMPOOL_MAX_TASKS_PER_KEY=3 and keys alice and bob: alice's fourth task is a 429, bob's first is not."""
    alice, bob = {"authorization": "Bearer alice"}, {"authorization": "Bearer bob"}
    slow = {"code": "import time; time.sleep(1)", "resources": {"ram": "64MiB"}}
    assert [client.post("/v1/tasks", json=slow, headers=alice).status_code for _ in range(3)] == [202] * 3
    refused = client.post("/v1/tasks", json=slow, headers=alice)
    assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1, refused.text
    assert "3 tasks" in refused.json()["detail"]
    assert client.post("/v1/tasks", json=slow, headers=bob).status_code == 202  # bob has his own bound


@pytest.mark.docker
def test_embedded_results_stay_within_the_bound(serve):
    svc = serve(env={**BOUND_ENV, "WARMPOOL_API_KEYS": "alice,bob"})
    alice = {"authorization": "Bearer alice"}
    for _ in range(3):  # warm the paths (and allocator) the measured run takes
        link = _submit_all(svc.client, 1, alice)[0]
        wait_for(lambda link=link: _finished(svc.client, link, alice), what="a warm-up task")
    before = server_rss_bytes(svc)
    links = _submit_all(svc.client, 100, alice)
    last = wait_for(lambda: _finished(svc.client, links[-1], alice), timeout_s=120, what="the last task")
    grown = server_rss_bytes(svc) - before
    assert last.status_code == 200 and last.json()["stdout"] == "x" * 1_000_000 + "\n"
    assert grown < 16 * MIB + 24 * MIB, f"the server grew by {grown / MIB:.0f} MiB holding 100 MB of results"
    first = svc.client.get(links[0], headers=alice)
    assert first.status_code == 404 and "evicted" in first.json()["detail"]
    # Another key is bound on its own, and sees none of alice's tasks.
    assert svc.client.get(links[-1], headers={"authorization": "Bearer bob"}).status_code == 404


@pytest.mark.docker
def test_embedded_tasks_per_key_are_bounded(serve):
    svc = serve(env={"WARMPOOL_MAX_TASKS_PER_KEY": "3", "WARMPOOL_API_KEYS": "alice,bob"})
    _three_tasks_per_key(svc.client)


@pytest.mark.docker
@pytest.mark.redis
def test_scaleout_results_stay_within_the_bound(cluster, redis_url):
    made = cluster()
    made.worker(env={"WARMPOOL_OUTPUT_LIMIT_BYTES": "1MiB"})
    api = made.api(env=BOUND_ENV)
    links = _submit_all(api.client, 40)
    last = wait_for(lambda: _finished(api.client, links[-1]), timeout_s=120, what="the last task")
    assert last.status_code == 200 and last.json()["stdout"] == "x" * 1_000_000 + "\n"
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        held = sum(client.hstrlen(made.prefix + ":task:" + link.rsplit("/", 1)[1], "outcome") for link in links)
        totals = client.hgetall(f"{made.prefix}:held-totals")
    finally:
        client.close()
    assert held <= 16 * MIB, f"Redis holds {held / MIB:.1f} MiB of results, past the 16 MiB bound"
    assert int(totals["bytes"]) <= 16 * MIB and int(totals["tasks"]) < 40
    first = api.client.get(links[0])
    assert first.status_code == 404 and "evicted" in first.json()["detail"]


@pytest.mark.docker
@pytest.mark.redis
def test_scaleout_tasks_per_key_are_bounded(cluster):
    made = cluster()
    made.worker()
    api = made.api(env={"WARMPOOL_MAX_TASKS_PER_KEY": "3", "WARMPOOL_API_KEYS": "alice,bob"})
    _three_tasks_per_key(api.client)
