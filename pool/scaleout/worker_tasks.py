"""One task in a worker's hands: inspect a claimed entry, run the task on the pool, store its outcome once.

What happens to a claimed entry, and why a started task is never run twice, is told in `pool/scaleout/worker.py`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable
from typing import cast

import redis.asyncio as aioredis

from pool.engine.manager import PoolManager
from pool.model.backoff import Backoff
from pool.model.errors import BackendUnavailable, PoolError, TaskWithdrawn
from pool.model.tasks import Execution
from pool.scaleout.output_relay import OutputRelay
from pool.scaleout.redis_io import GROUP, Keys, Scripts, redis_errors
from pool.scaleout.session_worker import WorkerSessions
from pool.scaleout.task_codec import MalformedEntry, Outcome, StreamEntry, worker_lost, worker_stopped
from pool.settings import Settings

log = logging.getLogger(__name__)

FINALIZE_RETRY_S = 30.0
REPLY_TTL_MS = 300_000  # an API's reply list outlives it by this much
SYNC_DONE_TTL_MS = 60_000  # an answered synchronous task's (outcome-less) hash


@dataclasses.dataclass
class TaskHandler:
    """What a worker needs to take one entry from its stream to an answer."""

    worker_id: str
    settings: Settings
    pool: PoolManager
    keys: Keys
    redis: aioredis.Redis
    scripts: Scripts
    on_peer_lost: Callable[[], None]  # a peer died mid-task: sweep the containers it left
    sessions: WorkerSessions | None = None  # opens the sessions entries ask for (pool/scaleout/session_worker.py)

    async def handle(self, tier_name: str, entry_id: str, fields: dict[str, str], *, claimed: bool) -> None:
        """Run the entry's task (or answer it, for a claimed one that had started) and store the outcome."""
        stream = self.keys.stream(tier_name)
        try:
            try:
                entry = StreamEntry.from_fields(fields)
            except MalformedEntry as exc:
                log.error("dropping entry %s of %s: %s", entry_id, stream, exc)
                with redis_errors("drop a malformed entry"):
                    await self.scripts.forget(self.keys.task(fields.get("id", "")), stream, entry_id)
                return
            if claimed and not await self._claimed_needs_run(tier_name, entry_id, entry):
                return
            if entry.session is not None and self.sessions is not None:
                await self.sessions.open(tier_name, entry_id, entry, self.finalize_payload)
                return
            await self._run(tier_name, entry_id, entry)
        except BackendUnavailable as exc:
            # Redis failed us, not Docker: the entry stays pending and is claimed again once Redis is back.
            log.warning("task entry %s left pending: %s", entry_id, exc)

    async def _claimed_needs_run(self, tier_name: str, entry_id: str, entry: StreamEntry) -> bool:
        task_id = entry.spec.task_id
        stream, task_key = self.keys.stream(tier_name), self.keys.task(task_id)
        with redis_errors("inspect a claimed task"):
            state, owner = cast(list[str | None], await self.redis.hmget(task_key, ["state", "worker"]))
            if state == "queued":
                return True
            if state != "running":
                await self.scripts.forget(task_key, stream, entry_id)
                return False
            if owner and owner != self.worker_id and await self.redis.exists(self.keys.worker(owner)):
                # Its worker still beats (slow to re-claim, or dead with a beat not expired yet): hand the
                # entry back as idle as it was, so that it is looked at again at the next claim round
                # rather than a whole visibility timeout later. A live owner re-claims it (idle 0) itself.
                await self.redis.xclaim(stream, GROUP, owner, 0, [entry_id], justid=True,
                                        idle=int(self.settings.visibility_timeout_s * 1000))
                return False
        total_ms = max(0.0, time.time() - entry.submitted_unix) * 1000
        log.warning("task %s was running on lost worker %s: answering sandbox_error", task_id, owner)
        await self._finalize(tier_name, entry_id, entry, worker_lost(
            task_id, self.worker_id, self.pool.tiers[tier_name], owner or "?", 0.0, total_ms))
        self.on_peer_lost()
        return False

    async def answer_stopped(self, tier_name: str, entry_id: str, fields: dict[str, str]) -> None:
        """After a drain's grace period: a task this worker started is answered `worker stopped`; one it had
        not started is left pending, for another worker to claim and run."""
        try:
            entry = StreamEntry.from_fields(fields)
        except MalformedEntry:
            return
        with redis_errors("look at a stopped task"):
            state, owner = cast(list[str | None], await self.redis.hmget(self.keys.task(entry.spec.task_id),
                                                                         ["state", "worker"]))
        if state != "running" or owner != self.worker_id:
            return
        total_ms = max(0.0, time.time() - entry.submitted_unix) * 1000
        log.warning("task %s was still running at the end of the grace period: answering sandbox_error",
                    entry.spec.task_id)
        await self._finalize(tier_name, entry_id, entry, worker_stopped(
            entry.spec.task_id, self.worker_id, self.pool.tiers[tier_name], 0.0, total_ms))

    async def _run(self, tier_name: str, entry_id: str, entry: StreamEntry) -> None:
        spec = entry.spec
        stream, task_key = self.keys.stream(tier_name), self.keys.task(spec.task_id)
        verdict = ""
        started_unix = 0.0

        async def mark_running() -> bool:
            nonlocal verdict, started_unix
            started_unix = time.time()
            try:
                with redis_errors("mark the task running"):
                    verdict = await self.scripts.mark_running(task_key, self.worker_id, started_unix)
            except BackendUnavailable:
                verdict = "redis_down"
                raise
            return verdict == "run"

        # A streamed task's output goes to Redis as it comes (pool/scaleout/output_relay.py); its start marker
        # tells the waiting API that the task runs, so that errors before that stay plain HTTP errors.
        relay = OutputRelay(self.redis, self.keys.output(spec.task_id), entry.result_ttl_ms) if entry.stream else None

        async def gate() -> bool:
            go = await mark_running()
            if go and relay is not None:
                relay.start()
            return go

        execution: Execution | None = None
        error: PoolError | None = None
        try:
            wait_s = min(self.settings.lease_timeout_s, entry.lease_wait_s)  # the request's max_wait_ms, 0 included
            execution = await self.pool.execute(tier_name, spec, wait_s=wait_s, start_gate=gate,
                                                on_output=relay.write if relay is not None else None)
        except TaskWithdrawn:
            if verdict != "running":  # "running": another worker holds it now; not ours to acknowledge
                with redis_errors("drop a withdrawn task"):
                    await self.scripts.forget(task_key, stream, entry_id)
            return
        except PoolError as exc:
            if verdict == "redis_down":
                raise
            error = exc  # no container in time, or our engine is down: the task did not run
        finally:
            if relay is not None:
                await relay.close()  # its end marker goes out before the outcome does
        now = time.time()
        queue_ms = max(0.0, (started_unix or now) - entry.submitted_unix) * 1000
        if execution is not None:
            execution = dataclasses.replace(execution, queue_ms=queue_ms)
        outcome = Outcome(task_id=spec.task_id, worker=self.worker_id, tier=self.pool.tiers[tier_name],
                          execution=execution, error=error, queue_ms=queue_ms,
                          total_ms=max(0.0, now - entry.submitted_unix) * 1000)
        await self._finalize(tier_name, entry_id, entry, outcome)

    async def _finalize(self, tier_name: str, entry_id: str, entry: StreamEntry, outcome: Outcome) -> None:
        await self.finalize_payload(tier_name, entry_id, entry, outcome.task_id, outcome.to_json())

    async def finalize_payload(self, tier_name: str, entry_id: str, entry: StreamEntry, task_id: str,
                               payload: str) -> None:
        """Store the answer and wake the waiter; retried while Redis is away (the entry stays ours)."""
        deadline = time.monotonic() + FINALIZE_RETRY_S
        backoff = Backoff()
        while True:
            try:
                with redis_errors("store the result"):
                    stored = await self.scripts.finalize(
                        self.keys.task(task_id), self.keys.stream(tier_name), entry.reply_to,
                        entry_id, payload, ttl_ms=entry.result_ttl_ms,
                        reply_ttl_ms=REPLY_TTL_MS, sync_ttl_ms=SYNC_DONE_TTL_MS, task_id=task_id,
                        max_held_bytes=entry.max_result_bytes)
                if stored != "stored":
                    log.info("task %s was already %s: its outcome from %s is dropped", task_id, stored,
                             self.worker_id)
                return
            except BackendUnavailable as exc:
                if time.monotonic() > deadline:
                    log.error("the outcome of task %s is lost: %s", task_id, exc)
                    raise
                await asyncio.sleep(backoff.next_s())
