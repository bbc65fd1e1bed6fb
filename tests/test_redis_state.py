"""The task state machine's Lua scripts against a real Redis: atomic, idempotent, answered once."""

from __future__ import annotations

import asyncio
import secrets
import uuid

import pytest

from pool.model.errors import NoCapacity, Overloaded
from pool.model.resources import Resources
from pool.model.results import Status, TaskResult, TaskSpec, Usage
from pool.model.tasks import Execution
from pool.model.tiers import Tier
from pool.scaleout.redis_io import GROUP, Keys, Scripts, connect
from pool.scaleout.task_codec import MalformedEntry, Outcome, StreamEntry, worker_lost

TIER = Tier("one", Resources(cpu=0.5, gpu=0, ram_bytes=96 << 20, storage_bytes=32 << 20))


def test_outcomes_round_trip_through_json():
    result = TaskResult(task_id="t", status=Status.FAILED, exit_code=3, stdout="o", stderr="e", run_ms=1.5,
                        usage=Usage(cpu_s=0.25, max_rss_bytes=1 << 20))
    ran = Outcome(task_id="t", worker="w1", tier=TIER, queue_ms=2.0, total_ms=9.0,
                  execution=Execution(result=result, tier=TIER, queue_ms=2.0, container_name="c", worker="w1"))
    assert Outcome.from_json(ran.to_json()) == ran
    not_run = Outcome.from_json(Outcome(task_id="t", worker="w1", tier=TIER,
                                        error=NoCapacity("busy", retry_after_s=3.0)).to_json())
    assert isinstance(not_run.error, NoCapacity) and not_run.error.retry_after_s == 3.0
    with pytest.raises(NoCapacity):
        not_run.raise_or_execution()
    lost = worker_lost("t", "w2", TIER, "w1", 0.0, 5.0)
    assert lost.execution is not None and lost.execution.result.status == Status.SANDBOX_ERROR


ENTRY = StreamEntry(spec=TaskSpec(task_id="t1", code="print(1)", stdin="in", timeout_s=2.5, output_limit_bytes=1024),
                    reply_to="warmpool:reply:api", submitted_unix=1700000000.25, result_ttl_ms=600_000,
                    lease_wait_s=0.0, max_result_bytes=4096)


def test_stream_entries_round_trip_through_their_fields():
    fields = ENTRY.to_fields()
    assert all(isinstance(v, str) for v in fields.values())
    assert StreamEntry.from_fields(fields) == ENTRY


@pytest.mark.parametrize(("field", "raw", "words"), [
    ("id", None, "no 'id'"), ("id", "", "'id' is empty"), ("code", None, "no 'code'"),
    ("timeout_s", "soon", "timeout_s='soon' is not a number"), ("timeout_s", "0", "above 0"),
    ("timeout_s", "nan", "finite"), ("timeout_s", "-1", "above 0"),
    ("output_limit_bytes", "1.5", "whole"), ("submitted_unix", "inf", "finite"),
    ("submitted_unix", None, "no 'submitted_unix'"), ("result_ttl_ms", "", "not a number"),
    ("lease_wait_s", "-0.5", "at least 0"), ("lease_wait_s", None, "no 'lease_wait_s'"),
    ("max_result_bytes", "lots", "not a number"), ("max_result_bytes", None, "no 'max_result_bytes'"),
])
def test_a_bad_stream_entry_is_malformed_naming_the_field(field, raw, words):
    fields = ENTRY.to_fields()
    if raw is None:
        del fields[field]
    else:
        fields[field] = raw
    with pytest.raises(MalformedEntry, match=words):
        StreamEntry.from_fields(fields)


@pytest.mark.redis
def test_task_state_machine(redis_url):
    asyncio.run(_state_machine(redis_url))


async def _state_machine(url: str) -> None:
    client = connect(url)
    keys = Keys(f"wptest-{secrets.token_hex(4)}")
    scripts = Scripts(client, keys.prefix)
    stream, reply = keys.stream("one"), keys.reply("api")
    try:
        await client.xgroup_create(stream, GROUP, id="0", mkstream=True)

        async def submit(task_id: str, kind: str = "sync") -> object:
            return await scripts.submit(stream, keys.task(task_id), keys.backlog_len("one"), max_len=2,
                                        pending_ttl_ms=60_000, entry={"id": task_id},
                                        record={"state": "queued", "kind": kind})

        a, b, c = (uuid.uuid4().hex for _ in range(3))
        entry_a = await submit(a)
        assert entry_a is not None and await submit(a) == entry_a, "a retried submit adds nothing"
        assert await submit(b, kind="async") is not None
        assert await submit(c) is None, "the stream is at its bound"
        assert await client.xlen(stream) == 2

        assert await scripts.mark_running(keys.task(a), "w1", 1.0) == "run"
        assert await scripts.mark_running(keys.task(a), "w1", 1.0) == "run", "idempotent for the same worker"
        assert await scripts.mark_running(keys.task(a), "w2", 1.0) == "running", "never started twice"

        async def finalize(task_id: str, entry: str, outcome: str, reply_to: str = reply) -> str:
            return await scripts.finalize(keys.task(task_id), stream, reply_to, entry, outcome, ttl_ms=60_000,
                                          reply_ttl_ms=60_000, sync_ttl_ms=60_000)

        assert await finalize(a, entry_a, '{"first":1}') == "stored"
        assert await finalize(a, entry_a, '{"second":1}') == "done", "the first outcome wins"
        assert await client.lrange(reply, 0, -1) == ['{"first":1}'], "delivered once"
        assert await client.xlen(stream) == 1 and await client.hget(keys.task(a), "outcome") is None

        entry_b = await client.hget(keys.task(b), "entry")
        assert await scripts.abandon(keys.task(b), stream, 60_000) == "abandoned"
        assert await client.xlen(stream) == 0, "a withdrawn task leaves the queue at once"
        assert await scripts.mark_running(keys.task(b), "w1", 1.0) == "abandoned", "and never runs"
        assert await finalize(b, entry_b, "{}", reply_to="") == "abandoned"
        assert await scripts.abandon(keys.task(a), stream, 60_000) == "done", "an answered task stays answered"
        assert await scripts.mark_running(keys.task(uuid.uuid4().hex), "w1", 1.0) == "gone"
    finally:
        found = [k async for k in client.scan_iter(f"{keys.prefix}:*")]
        if found:
            await client.delete(*found)
        await client.aclose()


@pytest.mark.redis
def test_the_backlog_feeds_the_stream_in_turns_up_to_its_target(redis_url):
    asyncio.run(_backlog_turns(redis_url))


async def _backlog_turns(url: str) -> None:
    from pool.model.result_bounds import Bounds
    from pool.model.results import TaskSpec
    from pool.model.tasks import Submission
    from pool.scaleout.backlog import Backlog

    client = connect(url)
    keys = Keys(f"wptest-{secrets.token_hex(4)}")
    backlog, stream = Backlog(client, keys), keys.stream("one")
    bounds = Bounds(max_tasks_per_key=100, max_result_bytes_per_key=1 << 30, max_results=100, max_result_bytes=1 << 30)

    async def enqueue(owner: str, names: list[str], target: int) -> None:
        items = [(Submission("one", TaskSpec(task_id=n, code="pass")), {"id": n}, {"state": "queued", "kind": "async",
                                                                                     "owner": owner}) for n in names]
        assert await backlog.enqueue(items, owner, max_len=8, ttl_ms=60_000, bounds=bounds,
                                     feed_targets={"one": target}) is None

    async def stream_ids() -> list[str]:
        return [fields["id"] for _, fields in await client.xrange(stream)]

    try:
        await client.xgroup_create(stream, GROUP, id="0", mkstream=True)
        await enqueue("alice", ["a1", "a2", "a3", "a4"], target=1)
        assert await stream_ids() == ["a1"], "fed only up to the target"
        await enqueue("bob", ["b1"], target=1)
        assert await stream_ids() == ["a1"], "one entry still waits unread"
        await client.xreadgroup(GROUP, "w1", {stream: ">"}, count=1)  # a worker took a1: none unread now
        assert await backlog.feed("one", 3) == 3
        assert await stream_ids() == ["a1", "a2", "b1", "a3"], "turns: alice, then bob, then alice again"
        assert await client.get(keys.backlog_len("one")) == "1"
        with pytest.raises(Overloaded):  # 4 on the stream and 1 in the backlog: 4 more pass the bound of 8
            await enqueue("carol", ["c1", "c2", "c3", "c4"], target=0)
        assert await client.exists(keys.task("c1")) == 0, "a refused batch leaves nothing behind"
        await enqueue("alice", ["a1"], target=0)  # a retried call adds nothing twice
        assert await client.get(keys.backlog_len("one")) == "1"
    finally:
        leftovers = [k async for k in client.scan_iter(f"{keys.prefix}:*")]
        if leftovers:
            await client.delete(*leftovers)
        await client.aclose()
