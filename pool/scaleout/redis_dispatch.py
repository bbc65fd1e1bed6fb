"""Scale-out mode, API side: tasks go on a Redis stream per tier; workers run them; results come back.

The API holds no containers. A synchronous task is added with `reply_to` naming this process's reply
list; one background reader pops that list (BLPOP) and wakes the waiting request by task id, so each
outcome reaches its waiter once, and outcomes pushed while the reader was reconnecting are still there.
A waiter that runs out of time withdraws its task if no worker has started it yet (it then never runs)
and answers 503. Async tasks wait in per-owner backlogs fed to the streams in turns
(`pool/scaleout/backlog.py`), are read back from their hash, and are waited for through one pub/sub
subscription (`pool/scaleout/done_events.py`); their callbacks are claimed from Redis
(`pool/scaleout/callback_store.py`). Every Redis failure is BackendUnavailable
(503); a full stream is Overloaded (429); a tier no live worker serves is NoCapacity (503).

Streamed tasks' output comes back through Redis too (pool/scaleout/output_relay.py); sessions are in
pool/scaleout/session_client.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import Sequence
from typing import Any, TypeVar, cast

from pool.background import TaskOwner
from pool.model.backoff import Backoff
from pool.model.errors import BackendUnavailable, NoCapacity, Overloaded, ResultEvicted, SandboxError
from pool.model.images import describe
from pool.model.result_bounds import refusal
from pool.model.results import TaskSpec
from pool.model.sessions import SessionFigures, SessionInfo
from pool.model.snapshots import AdminView, Drained, Resized, TierSnapshot
from pool.model.tasks import RESULT_GRACE_S, DueCallback, Execution, Submission, TaskState, TaskView
from pool.scaleout.backlog import Backlog
from pool.scaleout.callback_store import BLOCK_MAX_S, CallbackStore
from pool.scaleout.cluster_admin import ClusterAdmin
from pool.scaleout.cluster_config import ConfigStore
from pool.scaleout.done_events import READ_BLOCK_S, DoneEvents
from pool.scaleout.membership import BEATS_TO_DEATH, ClusterView, parse_beat
from pool.scaleout.output_relay import FOLLOW_BLOCK_S, follow
from pool.scaleout.redis_io import Keys, Refusal, Scripts, connect, redis_errors
from pool.scaleout.session_client import RedisSessions
from pool.scaleout.task_codec import MalformedEntry, Outcome, SessionOpen, StreamEntry
from pool.settings import Settings
from pool.task_stream import TaskStream

log = logging.getLogger(__name__)

REPLY_BLOCK_S = 1.0
REPLY_BATCH = 256
START_SLACK_S = 1.0  # beyond the lease wait, for a worker to read the task and mark it running
REPLY_SLACK_S = 2.0  # beyond timeout + grace: the hops and the worker's own bookkeeping
ABANDONED_TTL_MS = 60_000
MAX_BACKOFF_S = 2.0
LONG_POLL_S = 30.0  # one wait for an async task's end (the route's cap on wait_s)
T = TypeVar("T")


def pending_ttl_ms(settings: Settings) -> int:
    """How long a task that never ran is kept: long enough to outlast any sane queue."""
    return int((3600 + settings.max_timeout_s + settings.result_ttl_s) * 1000)


def _refused(refused: Refusal, settings: Settings) -> Overloaded:
    """The results bound's refusal, as the same 429 embedded mode gives."""
    retry_s = refused.retry_after_ms / 1000 if refused.retry_after_ms >= 0 else settings.max_timeout_s
    return refusal(refused.scope, refused.tasks, refused.size_bytes, settings.result_bounds(), max(1.0, retry_s))


class RedisDispatcher:
    """A `Dispatcher` that sends tasks to workers through Redis."""

    def __init__(self, settings: Settings) -> None:
        assert settings.redis_url
        self.settings = settings
        self.tiers_by_name = {t.name: t for t in settings.tiers}
        self.keys = Keys(settings.redis_prefix)
        # Unique per process even if two APIs were (wrongly) given one instance id: a reply list with two
        # readers would hand replies to the wrong process.
        self.reply_key = self.keys.reply(f"{settings.instance_id}-{secrets.token_hex(4)}")
        self.redis = connect(settings.redis_url)
        self.blocking = connect(settings.redis_url, blocking_s=REPLY_BLOCK_S)
        self.scripts = Scripts(self.redis, settings.redis_prefix)
        self.backlog = Backlog(self.redis, self.keys)
        self.subscriber = connect(settings.redis_url, blocking_s=READ_BLOCK_S)
        self.done_events = DoneEvents(self.subscriber, self.keys.done)
        self.callback_blocking = connect(settings.redis_url, blocking_s=BLOCK_MAX_S)
        # A claim outlasts one attempt with room to spare: a lapsed claim means its process is gone.
        self.callbacks = CallbackStore(self.redis, self.callback_blocking, self.keys,
                                       lease_s=2 * settings.callback_attempt_timeout_s + 5,
                                       retry_window_s=settings.callback_retry_s)
        self.cluster = ClusterView()
        self.admin = ClusterAdmin(settings, ConfigStore(self.redis, settings.redis_prefix), self.cluster,
                                  refresh=self._refresh_or_fail)
        self._waiters: dict[str, asyncio.Future[Outcome]] = {}
        # Replies that are not a task's outcome (session opens, calls, closes): the parsed JSON, by id.
        self.raw_waiters: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._background = TaskOwner("redis dispatcher")
        # Streamed output is read with blocking XREADs, one per follower, on clients of their own.
        self.follow_redis = connect(settings.redis_url, blocking_s=FOLLOW_BLOCK_S)
        self.sessions = RedisSessions(self)
        self._followed: dict[str, TaskStream] = {}  # async tasks being followed: one reader each, however many clients

    async def start(self) -> None:
        await self._refresh_cluster()
        self._background.spawn(self._reply_loop())
        self._background.spawn(self._cluster_loop())
        self._background.spawn(self.done_events.run(lambda: self._background.closing))

    async def close(self) -> None:
        await self._background.close()
        for waiter in self._waiters.values():
            if not waiter.done():
                waiter.set_exception(BackendUnavailable("the API is shutting down"))
        for raw_waiter in self.raw_waiters.values():
            if not raw_waiter.done():
                raw_waiter.set_exception(BackendUnavailable("the API is shutting down"))
        for client in (self.redis, self.blocking, self.follow_redis, self.subscriber, self.callback_blocking):
            await client.aclose()

    # tasks -----------------------------------------------------------------------------------------
    async def execute(self, tier_name: str, spec: TaskSpec, wait_s: float) -> Execution:
        self._require_worker(tier_name)
        waiter: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self._waiters[spec.task_id] = waiter
        try:
            await self._submit(tier_name, spec, kind="sync", owner="", reply_to=self.reply_key, lease_wait_s=wait_s)
            outcome = await self._wait(tier_name, spec, waiter, wait_s)
        except asyncio.CancelledError:
            # The client went away: withdraw the task if it has not started, so it does not run for no one.
            self._background.spawn(self._abandon_quietly(tier_name, spec.task_id))
            raise
        finally:
            self._waiters.pop(spec.task_id, None)
        return outcome.raise_or_execution()

    async def submit(self, tier_name: str, spec: TaskSpec, owner: str, callback_url: str = "") -> None:
        await self.submit_many([Submission(tier_name, spec, callback_url)], owner)

    async def submit_many(self, submissions: Sequence[Submission], owner: str) -> None:
        tier_names = sorted({s.tier_name for s in submissions})
        for tier_name in tier_names:
            self._require_worker(tier_name)
        items = []
        for submission in submissions:
            # Streamed to Redis (bounded, short-lived) so that GET /v1/tasks/{id}/events can follow it.
            entry, record = self._entry(submission.tier_name, submission.spec, kind="async", owner=owner,
                                        reply_to="", lease_wait_s=self.settings.lease_timeout_s, held=True,
                                        stream=True)
            if submission.callback_url:
                record["callback_url"] = submission.callback_url
            items.append((submission, entry, record))
        # At submission the stream is fed up to what the tier's workers could start at once.
        targets = {name: sum(int(w.tiers[name].get("max_size", 0)) for w in self.cluster.serving(name))
                   for name in tier_names}
        with redis_errors("queue the tasks"):
            refused = await self.backlog.enqueue(items, owner, max_len=self.settings.max_queued,
                                                 ttl_ms=pending_ttl_ms(self.settings),
                                                 bounds=self.settings.result_bounds(), feed_targets=targets)
        if refused is not None:
            raise _refused(refused, self.settings)

    def _entry(self, tier_name: str, spec: TaskSpec, *, kind: str, owner: str, reply_to: str,
               lease_wait_s: float, held: bool, stream: bool = False,
               session: SessionOpen | None = None) -> tuple[dict[str, str], dict[str, str]]:
        """The stream entry a worker reads, and the task's hash."""
        now = time.time()
        # The API's result TTL, results bound and the request's container wait travel with the task: the
        # worker applies them.
        entry = StreamEntry(spec=spec, reply_to=reply_to, submitted_unix=now,
                            result_ttl_ms=int(self.settings.result_ttl_s * 1000), lease_wait_s=lease_wait_s,
                            max_result_bytes=self.settings.max_result_bytes if held else 0, stream=stream,
                            session=session)
        record = {"state": "queued", "kind": kind, "tier": tier_name, "owner": owner, "submitted_unix": repr(now)}
        return entry.to_fields(), record

    async def _submit(self, tier_name: str, spec: TaskSpec, *, kind: str, owner: str, reply_to: str,
                      lease_wait_s: float, stream: bool = False, session: SessionOpen | None = None) -> None:
        """A synchronous task (or a session's opening), straight onto the stream; not held against the results
        bound: its result goes to its waiter."""
        entry, record = self._entry(tier_name, spec, kind=kind, owner=owner, reply_to=reply_to,
                                    lease_wait_s=lease_wait_s, held=False, stream=stream, session=session)
        with redis_errors("queue the task"):
            added = await self.scripts.submit(self.keys.stream(tier_name), self.keys.task(spec.task_id),
                                              self.keys.backlog_len(tier_name),
                                              max_len=self.settings.max_queued,
                                              pending_ttl_ms=pending_ttl_ms(self.settings),
                                              entry=entry, record=record)
        if added is None:
            raise Overloaded(f"tier {tier_name!r} already has {self.settings.max_queued} tasks waiting or "
                            "running; retry later", retry_after_s=max(1.0, spec.timeout_s / 2))

    async def _wait(self, tier_name: str, spec: TaskSpec, waiter: asyncio.Future[T], lease_wait_s: float) -> T:
        """Wait for the reply; if none came once the task should have started, look at it once.

        Not started by then (still queued): it is withdrawn, so it never runs, and the answer is 503, as for
        an embedded lease that timed out. Started: it gets its full run time. Answered: the reply is near.
        """
        start_by_s = lease_wait_s + START_SLACK_S
        done, _ = await asyncio.wait({waiter}, timeout=start_by_s)
        if done:
            return waiter.result()
        state = await self._abandon(tier_name, spec.task_id)
        extra_s = {"running": spec.timeout_s + RESULT_GRACE_S + REPLY_SLACK_S, "done": REPLY_SLACK_S}.get(state)
        if extra_s is not None:
            done, _ = await asyncio.wait({waiter}, timeout=extra_s)
            if done:
                return waiter.result()
        if state == "abandoned":
            raise NoCapacity(f"no {tier_name!r} container was free within {lease_wait_s:g} s on any worker",
                             retry_after_s=max(1.0, lease_wait_s))
        raise NoCapacity(f"no answer from the worker (task state: {state})", retry_after_s=2.0)

    async def _abandon(self, tier_name: str, task_id: str) -> str:
        with redis_errors("withdraw the task"):
            return await self.scripts.abandon(self.keys.task(task_id), self.keys.stream(tier_name),
                                              ABANDONED_TTL_MS)

    async def _abandon_quietly(self, tier_name: str, task_id: str) -> None:
        try:
            await self._abandon(tier_name, task_id)
        except BackendUnavailable as exc:
            log.info("could not withdraw task %s: %s", task_id, exc)

    async def task(self, task_id: str, owner: str, wait_s: float = 0.0) -> TaskView | None:
        view = await self._read_task(task_id, owner)
        if view is None or view.state == TaskState.DONE or wait_s <= 0:
            return view
        deadline = time.monotonic() + wait_s
        with self.done_events.waiting(task_id) as ended:
            while True:
                # Read after registering: an end published before we registered would not wake us.
                view = await self._read_task(task_id, owner)
                left_s = deadline - time.monotonic()
                if view is None or view.state == TaskState.DONE or left_s <= 0:
                    return view
                ended.clear()
                try:
                    await asyncio.wait_for(ended.wait(), left_s)
                except TimeoutError:
                    pass

    async def _read_task(self, task_id: str, owner: str | None) -> TaskView | None:
        """The async task's view; None when unknown, expired, or (unless `owner` is None) another owner's."""
        with redis_errors("read the task"):
            record = cast(dict[str, str], await self.redis.hgetall(self.keys.task(task_id)))
        if not record or record.get("kind") != "async" or (owner is not None and record.get("owner") != owner):
            return None
        if record.get("state") == "evicted":
            raise ResultEvicted(f"the result of task {task_id} was evicted before its time: the cluster keeps at "
                                f"most {self.settings.max_results} results and {self.settings.max_result_bytes} "
                                "bytes of them, oldest out first")
        tier = self.tiers_by_name.get(record.get("tier", ""))
        if tier is None:
            return None
        state = record.get("state")
        if state != "done":
            running = state == "running"
            return TaskView(task_id=task_id, state=TaskState.RUNNING if running else TaskState.QUEUED, tier=tier)
        try:
            outcome = Outcome.from_json(record["outcome"])
        except (KeyError, MalformedEntry) as exc:
            log.error("task %s has a bad outcome: %s", task_id, exc)
            return None
        return TaskView(task_id=task_id, state=TaskState.DONE, tier=outcome.tier, execution=outcome.execution,
                        error=outcome.error, total_ms=outcome.total_ms)

    # callbacks -------------------------------------------------------------------------------------
    async def due_callbacks(self, limit: int, wait_s: float) -> list[DueCallback]:
        due = []
        for task_id, url, attempt, age_s in await self.callbacks.claim(limit, wait_s):
            view = await self._read_task(task_id, None)
            if view is None or view.state != TaskState.DONE:  # expired (or unreadable) meanwhile: nothing to send
                log.warning("callback of task %s dropped: its result is gone", task_id)
                continue
            due.append(DueCallback(task_id=task_id, url=url, view=view, attempt=attempt, age_s=age_s))
        return due

    async def callback_finished(self, due: DueCallback, delivered: bool) -> None:
        await self.callbacks.finish(due, delivered)

    # replies ---------------------------------------------------------------------------------------
    async def _reply_loop(self) -> None:
        backoff = Backoff(max_s=MAX_BACKOFF_S)
        lost_contact = False
        while not self._background.closing:  # also ends a loop whose cancellation redis-py swallowed
            try:
                with redis_errors("read replies"):
                    popped = cast(list[str] | None, await self.blocking.blpop([self.reply_key], timeout=REPLY_BLOCK_S))
                    if popped:
                        self._deliver(popped[1])  # first, before draining: it is on someone's critical path
                        for raw in cast(list[str] | None, await self.redis.lpop(self.reply_key, REPLY_BATCH)) or []:
                            self._deliver(raw)
                    if lost_contact:
                        await self._fail_lost_waiters()
                        lost_contact = False
                        log.info("reading replies from Redis again")
            except BackendUnavailable as exc:
                if not lost_contact:
                    log.warning("%s", exc)
                lost_contact = True
                await asyncio.sleep(backoff.next_s())
                continue
            backoff.reset()

    def _deliver(self, raw: str) -> None:
        try:
            body = json.loads(raw)
            raw_waiter = self.raw_waiters.get(str(body.get("id")))
            if raw_waiter is not None:
                if not raw_waiter.done():
                    raw_waiter.set_result(body)
                return
            outcome = Outcome.from_body(body)
        except (MalformedEntry, ValueError, AttributeError) as exc:
            log.error("dropping a malformed reply: %s", exc)
            return
        waiter = self._waiters.get(outcome.task_id)
        if waiter is not None and not waiter.done():
            waiter.set_result(outcome)

    async def _fail_lost_waiters(self) -> None:
        """After an outage: a waiting task whose hash is gone was lost with Redis's memory; answer 503 now."""
        waiting = [(task_id, w) for task_id, w in self._waiters.items() if not w.done()]
        if not waiting:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for task_id, _ in waiting:
                pipe.exists(self.keys.task(task_id))
            exists = await pipe.execute()
        for (task_id, waiter), found in zip(waiting, exists, strict=True):
            if not found and not waiter.done():
                waiter.set_exception(BackendUnavailable(f"Redis lost task {task_id} (was it restarted?); retry"))

    # cluster ---------------------------------------------------------------------------------------
    def _require_worker(self, tier_name: str) -> None:
        if not self.cluster.redis_ok:
            raise BackendUnavailable("Redis does not answer; retry shortly")
        if not self.cluster.serving(tier_name):
            raise NoCapacity(f"no live worker serves tier {tier_name!r}; retry when one has started",
                             retry_after_s=self.settings.heartbeat_s * BEATS_TO_DEATH)

    async def _cluster_loop(self) -> None:
        while not self._background.closing:  # also ends a loop whose cancellation redis-py swallowed
            await asyncio.sleep(min(self.settings.heartbeat_s, 1.0))
            await self._refresh_cluster()

    async def _refresh_or_fail(self) -> None:
        """Re-read the heartbeats now (admin wants them fresh); BackendUnavailable when Redis is down."""
        await self._refresh_cluster()
        if not self.cluster.redis_ok:
            raise BackendUnavailable("Redis does not answer; retry shortly")

    async def _refresh_cluster(self) -> None:
        try:
            with redis_errors("read worker heartbeats"):
                ids = sorted(cast(set[str], await self.redis.smembers(self.keys.workers)))
                async with self.redis.pipeline(transaction=False) as pipe:
                    for worker_id in ids:
                        pipe.get(self.keys.worker(worker_id))
                    for tier_name in self.tiers_by_name:
                        pipe.xlen(self.keys.stream(tier_name))
                    for tier_name in self.tiers_by_name:
                        pipe.get(self.keys.backlog_len(tier_name))
                    replies = await pipe.execute()
                gone = [w for w, raw in zip(ids, replies, strict=False) if raw is None]
                if gone:
                    await self.redis.srem(self.keys.workers, *gone)
        except BackendUnavailable as exc:
            if self.cluster.redis_ok:
                log.warning("%s", exc)
            self.cluster.redis_ok = False
            return
        if not self.cluster.redis_ok:
            log.info("Redis answers")
        beats = [parse_beat(raw) for raw in replies[:len(ids)] if raw is not None]
        self.cluster.workers = {b.worker_id: b for b in beats if b is not None}
        streams = replies[len(ids):len(ids) + len(self.tiers_by_name)]
        backlogs = replies[len(ids) + len(self.tiers_by_name):]
        self.cluster.queued = {name: int(on_stream) + int(waiting or 0)
                               for name, on_stream, waiting in zip(self.tiers_by_name, streams, backlogs, strict=True)}
        self.cluster.redis_ok = True
        self.cluster.check_tiers(self.settings.tiers)

    async def tiers(self) -> tuple[TierSnapshot, ...]:
        return self.cluster.tier_snapshots(self.settings.tiers)

    async def images(self) -> list[dict[str, Any]]:
        # Workers report what their engines hold; before any has, the catalogue's own entry is the answer.
        return [describe(spec, self.cluster.image_labels(spec.name)) for spec in self.settings.served_images()]

    async def readiness(self) -> dict[str, bool]:
        try:
            with redis_errors("ping"):
                await self.redis.ping()
        except BackendUnavailable:
            self.cluster.redis_ok = False
        return {"redis": self.cluster.redis_ok, "workers": bool(self.cluster.workers)}

    async def figures(self) -> None:
        return None  # this process holds no pool; each worker's own figures are its own

    # admin: the pools live on the workers; pool/scaleout/cluster_admin.py sizes them through Redis
    async def pools(self) -> AdminView:
        return await self.admin.view()

    async def resize(self, tier_name: str, min_idle: int | None, max_size: int | None) -> Resized:
        return await self.admin.resize(tier_name, min_idle, max_size)

    async def drain(self, tier_name: str) -> Drained:
        return await self.admin.drain(tier_name)

    # streaming -------------------------------------------------------------------------------------
    async def execute_stream(self, tier_name: str, spec: TaskSpec, wait_s: float) -> TaskStream:
        self._require_worker(tier_name)
        waiter: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self._waiters[spec.task_id] = waiter
        try:
            await self._submit(tier_name, spec, kind="sync", owner="", reply_to=self.reply_key, lease_wait_s=wait_s,
                               stream=True)
        except BaseException:
            self._waiters.pop(spec.task_id, None)
            raise

        async def answer() -> Execution:
            try:
                return (await self._wait(tier_name, spec, waiter, wait_s)).raise_or_execution()
            finally:
                self._waiters.pop(spec.task_id, None)

        stream, started = TaskStream(spec.task_id), asyncio.get_running_loop().create_future()
        answering = self._background.spawn(answer())
        self._background.spawn(self._follow(spec.task_id, stream, answering, started))
        try:
            await asyncio.shield(started)
        except asyncio.CancelledError:  # the client went away before the task started: withdraw it
            started.cancel()
            self._background.spawn(self._abandon_quietly(tier_name, spec.task_id))
            raise
        return stream

    async def _follow(self, task_id: str, stream: TaskStream, answer: asyncio.Task[Execution],
                      started: asyncio.Future[None] | None = None, keep_output: bool = False) -> None:
        key = self.keys.output(task_id)
        await follow(self.follow_redis, key, stream, answer, started)
        if not keep_output:  # a synchronous task's output has one reader, and it is done
            try:
                with redis_errors("drop a task's output"):
                    await self.redis.delete(key)
            except BackendUnavailable:
                pass  # it expires anyway

    async def task_events(self, task_id: str, owner: str) -> TaskStream | TaskView | None:
        view = await self.task(task_id, owner)
        if view is None or view.state == TaskState.DONE:
            return view
        if (shared := self._followed.get(task_id)) is not None:
            return shared

        async def answer() -> Execution:
            """The task's answer, from its hash once it is done (its output's end marker may be lost); waits by
            long polls (woken by the task's end), not by polling."""
            while True:
                current = await self.task(task_id, owner, wait_s=LONG_POLL_S)
                if current is None:
                    raise SandboxError(f"task {task_id} is gone (expired, or Redis lost it)")
                if current.state == TaskState.DONE:
                    if current.execution is None:
                        raise current.error or SandboxError("the task ended without a result")
                    return current.execution

        stream = self._followed[task_id] = TaskStream(task_id)

        async def follow_then_forget() -> None:
            try:
                await self._follow(task_id, stream, self._background.spawn(answer()), keep_output=True)
            finally:
                self._followed.pop(task_id, None)

        self._background.spawn(follow_then_forget())
        return stream

    # sessions (pool/scaleout/session_client.py) ----------------------------------------------------
    async def open_session(self, tier_name: str, owner: str, image: str, idle_timeout_s: float,
                           wait_s: float) -> SessionInfo:
        self._require_worker(tier_name)
        return await self.sessions.open(tier_name, owner, image, idle_timeout_s, wait_s)

    async def session(self, session_id: str, owner: str) -> SessionInfo:
        return await self.sessions.get(session_id, owner)

    async def session_execute(self, session_id: str, owner: str, spec: TaskSpec) -> Execution:
        return await self.sessions.execute(session_id, owner, spec)

    async def session_stream(self, session_id: str, owner: str, spec: TaskSpec) -> TaskStream:
        return await self.sessions.stream(session_id, owner, spec)

    async def delete_session(self, session_id: str, owner: str) -> None:
        await self.sessions.delete(session_id, owner)

    async def all_sessions(self) -> tuple[SessionInfo, ...]:
        return await self.sessions.all()

    async def session_figures(self) -> SessionFigures:
        return await self.sessions.figures()
