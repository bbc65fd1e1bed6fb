"""Sessions in scale-out mode, API side: opened through the tier's stream, then driven on the worker that
holds the container.

Open: the key's slot is reserved in Redis first (the per-key bound holds across API processes), then a
`session=open` entry goes on the tier's stream like a task; the worker that takes it leases a container,
starts the session (pool/scaleout/session_worker.py), records it in `{p}:session:{id}` and answers on
this process's reply list. Calls and closes go to that worker's own list, `{p}:calls:{worker}`; their
answers come back on the reply list. A waiting call watches the worker's heartbeat: when the worker
stops beating, the session is marked ended ("worker lost") and the call answers 404 saying so, so that
nothing waits for a worker that is gone. Streamed calls read their output as streamed tasks do.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any, Protocol, TypeVar

from pool.background import TaskOwner
from pool.model import sessions as ended_because
from pool.model.errors import BackendUnavailable, NoCapacity, SandboxError, SessionGone, TooManySessions
from pool.model.results import TaskSpec
from pool.model.sessions import INTERRUPT_GRACE_S, OPEN_TIMEOUT_S, SessionFigures, SessionInfo
from pool.model.tasks import RESULT_GRACE_S, Execution
from pool.model.tiers import Tier
from pool.scaleout.membership import ClusterView
from pool.scaleout.redis_io import Keys, redis_errors
from pool.scaleout.session_store import SessionStore
from pool.scaleout.task_codec import MalformedEntry, Outcome, SessionOpen, error_from
from pool.settings import Settings
from pool.task_stream import TaskStream

T = TypeVar("T")


class Dispatching(Protocol):
    """What sessions use of the scale-out dispatcher (pool/scaleout/redis_dispatch.py): its Redis, its
    reply list and waiters, its view of the workers, how it queues a task, waits for and follows one."""

    settings: Settings
    keys: Keys
    redis: Any
    reply_key: str
    raw_waiters: dict[str, asyncio.Future[dict[str, Any]]]
    cluster: ClusterView
    tiers_by_name: dict[str, Tier]
    _background: TaskOwner

    async def _submit(self, tier_name: str, spec: TaskSpec, *, kind: str, owner: str, reply_to: str,
                      lease_wait_s: float, stream: bool = False, session: SessionOpen | None = None) -> None: ...

    async def _wait(self, tier_name: str, spec: TaskSpec, waiter: asyncio.Future[T], lease_wait_s: float) -> T: ...

    async def _abandon_quietly(self, tier_name: str, task_id: str) -> None: ...

    async def _follow(self, task_id: str, stream: TaskStream, answer: asyncio.Task[Execution],
                      started: asyncio.Future[None] | None = None, keep_output: bool = False) -> None: ...

CALLS_TTL_MS = 300_000  # a worker's calls list outlives the worker by this much
CALL_SLACK_S = 5.0  # beyond a call's timeout, interrupt grace and result grace: hops and bookkeeping
CLOSE_WAIT_S = 10.0
WORKER_CHECK_S = 0.5  # how often a waiting call looks at whether its worker still beats


class RedisSessions:
    """The Dispatcher's session methods in scale-out mode."""

    def __init__(self, dispatcher: Dispatching) -> None:
        self.d = dispatcher
        self.keys = dispatcher.keys
        self.redis = dispatcher.redis
        self.store = SessionStore(dispatcher.redis, dispatcher.keys)

    async def open(self, tier_name: str, owner: str, image: str, idle_timeout_s: float,
                   wait_s: float) -> SessionInfo:
        session_id = uuid.uuid4().hex
        limit = self.d.settings.max_sessions_per_key
        opening_ttl_ms = int((wait_s + OPEN_TIMEOUT_S + 60) * 1000)
        if not await self.store.reserve(session_id, owner, tier_name, limit, opening_ttl_ms):
            raise TooManySessions(f"this key holds {limit} sessions, the most it may (WARMPOOL_MAX_SESSIONS_PER_KEY"
                                  f"={limit}); delete one first", retry_after_s=1.0)
        spec = TaskSpec(task_id=session_id, code="", timeout_s=OPEN_TIMEOUT_S)
        waiter: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.d.raw_waiters[session_id] = waiter
        try:
            await self.d._submit(tier_name, spec, kind="sync", owner=owner, reply_to=self.d.reply_key,
                                 lease_wait_s=wait_s, session=SessionOpen(owner, image, idle_timeout_s))
            body = await self.d._wait(tier_name, spec, waiter, wait_s)
            if "session" not in body:
                raise self._error_of(body)
        except BaseException:
            # Not opened (no container in time, refused, or the client went away: withdraw it then).
            self.d._background.spawn(self._give_up(tier_name, session_id, owner))
            raise
        finally:
            self.d.raw_waiters.pop(session_id, None)
        return self._info(session_id, await self.store.read(session_id))

    async def _give_up(self, tier_name: str, session_id: str, owner: str) -> None:
        await self.d._abandon_quietly(tier_name, session_id)
        try:
            await self.store.release(session_id, owner)  # unless it opened after all: then it idles out
        except BackendUnavailable:
            pass  # the reservation expires

    async def get(self, session_id: str, owner: str) -> SessionInfo:
        return self._info(session_id, await self._live(session_id, owner))

    async def execute(self, session_id: str, owner: str, spec: TaskSpec) -> Execution:
        return await self._call(session_id, owner, await self._live(session_id, owner), spec, stream=False)

    async def stream(self, session_id: str, owner: str, spec: TaskSpec) -> TaskStream:
        record = await self._live(session_id, owner)
        stream, started = TaskStream(spec.task_id), asyncio.get_running_loop().create_future()
        answer = self.d._background.spawn(self._call(session_id, owner, record, spec, stream=True))
        self.d._background.spawn(self.d._follow(spec.task_id, stream, answer, started))
        await asyncio.shield(started)  # a call that could not start (busy, ended) is a plain HTTP error
        return stream

    async def delete(self, session_id: str, owner: str) -> None:
        record = await self._live(session_id, owner)
        body = await self._ask(session_id, owner, record["worker"], {"op": "close"}, CLOSE_WAIT_S)
        if "error" in body:
            raise self._error_of(body)
        await self._mark_ended(session_id, owner, ended_because.DELETED)  # so that a GET right after says so

    async def all(self) -> tuple[SessionInfo, ...]:
        records = await self.store.read_all()
        return tuple(self._info(session_id, record) for session_id, record in records.items()
                     if record.get("state") == "open" and record.get("worker") in self.d.cluster.workers)

    async def figures(self) -> SessionFigures:
        open_by_tier = {tier.name: 0 for tier in self.d.settings.tiers}
        for info in await self.all():
            open_by_tier[info.tier.name] = open_by_tier.get(info.tier.name, 0) + 1
        ended = await self.store.ended_counts()
        return SessionFigures(open_by_tier=tuple(open_by_tier.items()), ended_by_reason=tuple(sorted(ended.items())))

    # inside ----------------------------------------------------------------------------------------
    async def _live(self, session_id: str, owner: str) -> dict[str, str]:
        """The session's hash if it is open and `owner`'s; SessionGone (with why, when known) otherwise."""
        record = await self.store.read(session_id)
        if record.get("owner") != owner or record.get("state") not in ("open", "ended"):
            raise SessionGone(session_id)
        if record["state"] == "ended":
            raise SessionGone(session_id, record.get("reason") or None)
        if record.get("worker") not in self.d.cluster.workers:
            await self._mark_ended(session_id, owner, ended_because.WORKER_LOST)
            raise SessionGone(session_id, ended_because.WORKER_LOST)
        return record

    def _info(self, session_id: str, record: dict[str, str]) -> SessionInfo:
        tier = self.d.tiers_by_name[record["tier"]]
        busy = record.get("busy") == "1"
        return SessionInfo(session_id=session_id, owner=record["owner"], tier=tier, image=record.get("image", ""),
                           idle_timeout_s=float(record["idle_timeout_s"]), busy=busy,
                           created_unix=float(record["created_unix"]),
                           idle_s=0.0 if busy else max(0.0, time.time() - float(record["last_used_unix"])),
                           calls=int(record.get("calls", 0)), worker=record.get("worker", ""),
                           container=record.get("container", ""))

    async def _call(self, session_id: str, owner: str, record: dict[str, str], spec: TaskSpec,
                    stream: bool) -> Execution:
        command = {"op": "call", "id": spec.task_id, "code": spec.code, "stdin": spec.stdin,
                   "timeout_s": spec.timeout_s, "output_limit_bytes": spec.output_limit_bytes, "stream": stream,
                   **spec.files_fields()}
        wait_s = spec.timeout_s + INTERRUPT_GRACE_S + RESULT_GRACE_S + CALL_SLACK_S
        body = await self._ask(session_id, owner, record["worker"], command, wait_s)
        if "error" in body and "tier" not in body:
            raise self._error_of(body)
        try:
            return Outcome.from_body(body).raise_or_execution()
        except MalformedEntry as exc:
            raise SandboxError(f"the worker sent a malformed answer: {exc}") from exc

    async def _ask(self, session_id: str, owner: str, worker: str, command: dict[str, Any],
                   wait_s: float) -> dict[str, Any]:
        """Send a command to the worker holding the session and wait for its answer, as long as the worker
        beats: when it stops, the session has ended ("worker lost")."""
        request_id = str(command.get("id") or uuid.uuid4().hex)
        waiter: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.d.raw_waiters[request_id] = waiter
        try:
            payload = json.dumps({**command, "id": request_id, "session": session_id, "owner": owner,
                                  "reply_to": self.d.reply_key, "sent_unix": time.time()})
            with redis_errors("send a session call"):
                async with self.redis.pipeline(transaction=False) as pipe:
                    pipe.rpush(self.keys.calls(worker), payload)
                    pipe.pexpire(self.keys.calls(worker), CALLS_TTL_MS)
                    await pipe.execute()
            deadline = time.monotonic() + wait_s
            while True:
                done, _ = await asyncio.wait({waiter}, timeout=WORKER_CHECK_S)
                if done:
                    return waiter.result()
                if worker not in self.d.cluster.workers:
                    await self._mark_ended(session_id, owner, ended_because.WORKER_LOST)
                    raise SessionGone(session_id, ended_because.WORKER_LOST)
                if time.monotonic() > deadline:
                    raise NoCapacity(f"no answer from worker {worker!r} holding session {session_id!r}",
                                     retry_after_s=2.0)
        finally:
            self.d.raw_waiters.pop(request_id, None)

    @staticmethod
    def _error_of(body: dict[str, Any]) -> Exception:
        if "error" in body:
            return error_from(body["error"])
        return SandboxError(str((body.get("result") or {}).get("message") or "the worker could not open the session"))

    async def _mark_ended(self, session_id: str, owner: str, reason: str) -> None:
        try:
            await self.store.end(session_id, owner, reason)
        except BackendUnavailable:
            pass  # the next reader finds it the same way
