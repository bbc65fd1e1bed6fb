"""Sessions in scale-out mode, worker side: this worker's SessionManager, fed from Redis.

A `session=open` entry of a tier's stream (the TaskHandler hands it here) opens a session on this
worker's pool and records it (pool/scaleout/session_store.py); the API then sends the session's calls and
its close to this worker's own list, `{p}:calls:{worker}`, which one loop pops. Each call runs on the
SessionManager, its output relayed like a streamed task's when the API asked, and its answer goes back on
the API's reply list. Every end of a session (deleted, idle, a call that ended it, a drain, this worker
stopping) is recorded in Redis, so that the owner's later calls get a 404 that says why.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, cast

import redis.asyncio as aioredis

from pool.background import TaskOwner
from pool.engine.manager import PoolManager
from pool.engine.sessions import SessionManager
from pool.model import sessions as ended_because
from pool.model.errors import BackendUnavailable, PoolError, TaskWithdrawn
from pool.model.results import TaskSpec
from pool.scaleout.output_relay import OutputRelay
from pool.scaleout.redis_io import Keys, Scripts, redis_errors
from pool.scaleout.session_store import SessionStore
from pool.scaleout.task_codec import Outcome, StreamEntry, error_json
from pool.settings import Settings

# Stores an entry's answer once and wakes its waiter: (tier, entry id, entry, task id, payload).
Finalize = Callable[[str, str, StreamEntry, str, str], Awaitable[None]]

log = logging.getLogger(__name__)

CALLS_BLOCK_S = 2.0
REPLY_TTL_MS = 300_000


class WorkerSessions:
    """The sessions one worker holds."""

    def __init__(self, worker_id: str, settings: Settings, pool: PoolManager, keys: Keys, client: aioredis.Redis,
                 blocking: aioredis.Redis, scripts: Scripts, on_freed: Callable[[], None] = lambda: None) -> None:
        self.worker_id = worker_id
        self.settings = settings
        self.keys = keys
        self.redis = client
        self.blocking = blocking
        self.scripts = scripts
        self.store = SessionStore(client, keys)
        self.manager = SessionManager(pool, settings, worker_id, on_end=self._ended)
        self._calls = TaskOwner("session calls")
        self.on_freed = on_freed  # told when a session ends: its container may serve tasks again

    async def start(self) -> None:
        await self.manager.start()

    async def close(self) -> None:
        """End every session this worker holds ("worker stopped"), recording it; calls in hand are cut."""
        await self.manager.close(ended_because.WORKER_STOPPED)
        await self._calls.close()

    def held_in(self, tier_name: str) -> int:
        return self.manager.held_in(tier_name)

    # opening ---------------------------------------------------------------------------------------
    async def open(self, tier_name: str, entry_id: str, entry: StreamEntry, finalize: Finalize) -> None:
        """Open the session an entry asks for and answer the API (once, as for a task)."""
        assert entry.session is not None
        session_id, asked = entry.spec.task_id, entry.session

        async def mark_running() -> bool:
            with redis_errors("mark the session opening"):
                return await self.scripts.mark_running(self.keys.task(session_id), self.worker_id, time.time()) == "run"

        body: dict[str, Any] = {"id": session_id, "worker": self.worker_id}
        try:
            info = await self.manager.open(tier_name, asked.owner, asked.image, asked.idle_timeout_s,
                                           min(self.settings.lease_timeout_s, entry.lease_wait_s),
                                           session_id=session_id, start_gate=mark_running, per_key_bound=False)
        except TaskWithdrawn:
            with redis_errors("drop a withdrawn session"):
                await self.scripts.forget(self.keys.task(session_id), self.keys.stream(tier_name), entry_id)
            return
        except PoolError as exc:
            body["error"] = error_json(exc)
        else:
            try:
                await self.store.record_open(info)
                body["session"] = True
            except BackendUnavailable as exc:
                self.manager.delete(session_id, asked.owner)  # nobody could reach it
                body["error"] = error_json(exc)
        await finalize(tier_name, entry_id, entry, session_id, json.dumps(body))

    # calls -----------------------------------------------------------------------------------------
    async def calls_loop(self) -> None:
        """Pop this worker's session commands and run each in a task of its own."""
        key, backoff_s = self.keys.calls(self.worker_id), 0.1
        while True:
            try:
                with redis_errors("read session calls"):
                    popped = cast(list[str] | None, await self.blocking.blpop([key], timeout=CALLS_BLOCK_S))
            except BackendUnavailable as exc:
                log.debug("%s", exc)
                await asyncio.sleep(backoff_s)
                backoff_s = min(2.0, backoff_s * 2)
                continue
            backoff_s = 0.1
            if popped:
                self._calls.spawn(self._handle(popped[1]))

    async def _handle(self, raw: str) -> None:
        try:
            command = json.loads(raw)
            request_id, reply_to = str(command["id"]), str(command["reply_to"])
            session_id, owner = str(command["session"]), str(command["owner"])
        except (ValueError, KeyError, TypeError) as exc:
            log.error("dropping a malformed session command: %s", exc)
            return
        try:
            if command.get("op") == "close":
                self.manager.delete(session_id, owner)
                payload = json.dumps({"id": request_id, "closed": True})
            else:
                payload = await self._call(session_id, owner, command)
        except PoolError as exc:
            payload = json.dumps({"id": request_id, "worker": self.worker_id, "error": error_json(exc)})
        except (ValueError, KeyError, TypeError) as exc:
            payload = json.dumps({"id": request_id, "worker": self.worker_id,
                                  "error": {"kind": "sandbox_error", "message": f"bad session call: {exc!r}"}})
        await self._reply(reply_to, payload)

    async def _call(self, session_id: str, owner: str, command: dict[str, Any]) -> str:
        started_unix = time.time()
        spec = TaskSpec(task_id=str(command["id"]), code=str(command["code"]), stdin=str(command.get("stdin", "")),
                        timeout_s=float(command["timeout_s"]), output_limit_bytes=int(command["output_limit_bytes"])
                        ).with_files_fields(command)
        relay = OutputRelay(self.redis, self.keys.output(spec.task_id), int(self.settings.result_ttl_s * 1000)) \
            if command.get("stream") else None
        try:
            call = self.manager.start_call(session_id, owner, spec, on_output=relay.write if relay else None)
            if relay is not None:
                relay.start()
            info = self.manager.get(session_id, owner)
            await self._quietly(self.store.record_call(session_id, busy=True, idle_timeout_s=info.idle_timeout_s))
            execution = await asyncio.shield(call)
        finally:
            if relay is not None:
                await relay.close()
        await self._quietly(self.store.record_call(session_id, busy=False, idle_timeout_s=info.idle_timeout_s,
                                                   calls=info.calls + 1))
        total_ms = (time.time() - float(command.get("sent_unix") or started_unix)) * 1000
        return Outcome(task_id=spec.task_id, worker=self.worker_id, tier=execution.tier, execution=execution,
                       total_ms=total_ms).to_json()

    async def _reply(self, reply_to: str, payload: str) -> None:
        try:
            with redis_errors("answer a session call"):
                async with self.redis.pipeline(transaction=False) as pipe:
                    pipe.rpush(reply_to, payload)
                    pipe.pexpire(reply_to, REPLY_TTL_MS)
                    await pipe.execute()
        except BackendUnavailable as exc:
            log.warning("a session call's answer is lost: %s", exc)  # the API's wait ends with a 503

    async def _ended(self, session_id: str, owner: str, reason: str) -> None:
        self.on_freed()
        await self._quietly(self.store.end(session_id, owner, reason))

    @staticmethod
    async def _quietly(step: Awaitable[Any]) -> None:
        try:
            await step
        except BackendUnavailable as exc:
            log.warning("session state not recorded: %s", exc)

