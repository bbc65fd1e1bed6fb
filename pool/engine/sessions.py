"""Sessions on this process's pool (the embedded API's, or a scale-out worker's): a container held for one
key across calls.

A session holds a leased container (busy in its tier, so it counts against max_size and the host ledger)
whose runner keeps one interpreter for it (runner_image/PROTOCOL.md, Sessions). Its calls run one at a
time (SessionBusy otherwise), and each runs to its end even if whoever asked has gone: a call cut short
would leave the interpreter in a state nobody knows. A session ends when its owner deletes it, when it
stays idle past its idle timeout, when its tier is drained (an idle one at once, a busy one once its call
ends), when a call ends it (memory exceeded, an interrupted call that would not stop, an interpreter that
exited, a container lost), or at shutdown. Its container then goes through the runner's verified reset
before the pool lends it to anyone else, or is replaced. An ended session is remembered with its reason
for ENDED_MEMORY_S, so that its owner's later calls get a 404 that says why.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import time
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from pool.background import TaskOwner
from pool.engine.channel import ChannelClosed
from pool.engine.container import ContainerHandle, OutputSink
from pool.engine.manager import PoolManager, StartGate
from pool.engine.session_calls import close_session, open_session, run_call
from pool.model import sessions as ended_because
from pool.model.errors import SandboxError, SessionBusy, SessionGone, TaskWithdrawn, TooManySessions
from pool.model.lifecycle import RetireReason
from pool.model.results import Status, TaskResult, TaskSpec
from pool.model.sessions import SessionInfo
from pool.model.tasks import Execution
from pool.model.tiers import Tier
from pool.settings import Settings

log = logging.getLogger(__name__)

ENDED_MEMORY_S = 3600.0
ENDED_MEMORY_MAX = 10_000
REAP_EVERY_S = 0.25
HOOKS_WAIT_S = 5.0

# Told (session id, owner, reason) when a session ends; scale-out workers record it in Redis.
EndHook = Callable[[str, str, str], Coroutine[Any, Any, None]]


@dataclass
class _Session:
    session_id: str
    owner: str
    tier: Tier
    image: str
    idle_timeout_s: float
    handle: ContainerHandle
    created_unix: float
    last_used_s: float  # monotonic: when its last call ended (or it opened)
    calls: int = 0
    call: asyncio.Task[Execution] | None = None
    ended: str | None = None  # set once it has ended (a running call may still be finishing)


class SessionManager:
    """Opens, runs and ends the sessions held on one PoolManager."""

    def __init__(self, pool: PoolManager, settings: Settings, worker: str, on_end: EndHook | None = None) -> None:
        self.pool = pool
        self.settings = settings
        self.worker = worker
        self.on_end = on_end
        self._live: dict[str, _Session] = {}
        self._ended: collections.OrderedDict[str, tuple[str, str, float]] = collections.OrderedDict()
        self._opening: collections.Counter[str] = collections.Counter()  # per owner: opens not yet done
        self.ended_counts: collections.Counter[str] = collections.Counter()  # by reason, since start
        self._background = TaskOwner("sessions")
        self._hooks = TaskOwner("session end hooks")

    async def start(self) -> None:
        self._background.spawn(self._reap_loop())

    async def close(self, reason: str = ended_because.SHUTDOWN) -> None:
        """End every session. Their containers are left to the pool, which removes them all as it closes."""
        for session in list(self._live.values()):
            self._end(session, reason, container_done=True)
        await self._hooks.wait(HOOKS_WAIT_S)  # let the ends be recorded (scale-out: in Redis) before we go
        await self._hooks.close()
        await self._background.close()

    # the owner's side ------------------------------------------------------------------------------
    async def open(self, tier_name: str, owner: str, image: str, idle_timeout_s: float, wait_s: float,
                   session_id: str | None = None, start_gate: StartGate | None = None,
                   per_key_bound: bool = True) -> SessionInfo:
        """Lease a container of the tier and start a session's interpreter on it. `start_gate`, as for a task
        (pool/engine/manager.py), may withdraw it once the container is leased (TaskWithdrawn). Scale-out
        workers pass `per_key_bound=False`: the API keeps that bound for the whole cluster, in Redis."""
        held = sum(1 for s in self._live.values() if s.owner == owner) + self._opening[owner]
        if per_key_bound and held >= self.settings.max_sessions_per_key:
            raise TooManySessions(f"this key holds {held} sessions, the most it may (WARMPOOL_MAX_SESSIONS_PER_KEY="
                                  f"{self.settings.max_sessions_per_key}); delete one first", retry_after_s=1.0)
        self._opening[owner] += 1
        try:
            handle = await self.pool.lease_session(tier_name, wait_s)
        finally:
            self._opening[owner] -= 1
            if not self._opening[owner]:
                del self._opening[owner]
        if start_gate is not None:
            try:
                go = await start_gate()
            except BaseException:
                self.pool.give_back(handle)
                raise
            if not go:
                self.pool.give_back(handle)
                raise TaskWithdrawn(f"session {session_id} was withdrawn before it opened")
        try:
            failure, frame_id = await open_session(handle, fsize_limit_bytes=handle.tier.resources.storage_bytes,
                                                   nofile_limit=self.settings.nofile_limit)
        except BaseException as exc:
            self.pool.retire(handle, RetireReason.SANDBOX_ERROR if isinstance(exc, SandboxError)
                             else RetireReason.CANCELLED)
            raise
        if failure:
            self.pool.release(handle, frame_id, Status.FAILED)  # the runner resets it: reused if clean
            raise SandboxError(f"the session could not start: {failure}")
        session = _Session(session_id=session_id or uuid.uuid4().hex, owner=owner, tier=handle.tier, image=image,
                           idle_timeout_s=idle_timeout_s, handle=handle, created_unix=time.time(),
                           last_used_s=time.monotonic())
        self._live[session.session_id] = session
        return self._info(session)

    def get(self, session_id: str, owner: str) -> SessionInfo:
        return self._info(self._find(session_id, owner))

    def start_call(self, session_id: str, owner: str, spec: TaskSpec,
                   on_output: OutputSink | None = None) -> asyncio.Task[Execution]:
        """Start a call of the session (SessionGone, SessionBusy at once). It runs to its end whoever waits
        for it: await the task shielded."""
        session = self._find(session_id, owner)
        if session.call is not None:
            raise SessionBusy(f"session {session_id!r} is running a call; calls run one at a time")
        session.call = self._background.spawn(self._call(session, spec, on_output))
        return session.call

    async def execute(self, session_id: str, owner: str, spec: TaskSpec) -> Execution:
        return await asyncio.shield(self.start_call(session_id, owner, spec))

    def delete(self, session_id: str, owner: str) -> None:
        """End the session now (a running call first finishes; its container is reset after it)."""
        self._end(self._find(session_id, owner), ended_because.DELETED)

    def sessions(self) -> tuple[SessionInfo, ...]:
        return tuple(self._info(s) for s in self._live.values())

    def held_in(self, tier_name: str) -> int:
        """Containers of the tier that live sessions hold."""
        return sum(1 for s in self._live.values() if s.tier.name == tier_name)

    # inside ----------------------------------------------------------------------------------------
    def _find(self, session_id: str, owner: str) -> _Session:
        session = self._live.get(session_id)
        if session is not None and session.owner == owner:
            return session
        ended = self._ended.get(session_id)
        if ended is not None and ended[0] == owner:
            raise SessionGone(session_id, ended[1])
        raise SessionGone(session_id)  # unknown, or another key's: the same answer, so nothing leaks

    def _info(self, session: _Session) -> SessionInfo:
        busy = session.call is not None
        return SessionInfo(session_id=session.session_id, owner=session.owner, tier=session.tier,
                           image=session.image, idle_timeout_s=session.idle_timeout_s, busy=busy,
                           created_unix=session.created_unix,
                           idle_s=0.0 if busy else time.monotonic() - session.last_used_s, calls=session.calls,
                           worker=self.worker, container=session.handle.name)

    async def _call(self, session: _Session, spec: TaskSpec, on_output: OutputSink | None) -> Execution:
        handle = session.handle
        try:
            result = await run_call(handle, spec, on_output)
            result = await self.pool.explain(handle, result)
        except BaseException:  # cancelled (shutdown) mid-call: nobody knows the interpreter's state
            session.call = None
            self.pool.retire(handle, RetireReason.CANCELLED)
            self._end(session, ended_because.SHUTDOWN, container_done=True)
            raise
        session.call = None
        session.calls += 1
        session.last_used_s = time.monotonic()
        self.pool.note_run(handle, result)
        ending = self._ending_of(result)
        if result.session_ended is not None:
            self.pool.release(handle, spec.task_id, result.status)  # the runner is resetting it
        elif ending is not None:
            self.pool.retire(handle, RetireReason.SANDBOX_ERROR)  # the container broke (or died of memory)
        if ending is not None:
            result = dataclasses.replace(result, session_ended=ending, message="; ".join(filter(None, [
                result.message, f"the session has ended ({ending}); its later calls get 404"])))
            self._end(session, ending, container_done=True)
        elif session.ended is not None:  # deleted or drained while this call ran
            self._settle(session)
        return Execution(result=result, tier=session.tier, queue_ms=0.0, container_name=handle.name,
                         worker=self.worker)

    @staticmethod
    def _ending_of(result: TaskResult) -> str | None:
        if result.session_ended is not None:
            return result.session_ended
        if result.status == Status.MEMORY_EXCEEDED:  # gVisor: the whole sandbox is what the OOM killer ends
            return ended_because.MEMORY_EXCEEDED
        if result.status == Status.SANDBOX_ERROR:
            return ended_because.SANDBOX_ERROR
        return None

    def _end(self, session: _Session, reason: str, *, container_done: bool = False) -> None:
        """Mark the session ended (its owner now gets 404 with `reason`); unless `container_done`, have its
        container reset (after a running call ends) or replaced."""
        if session.ended is not None:
            return
        session.ended = reason
        self._live.pop(session.session_id, None)
        self._ended[session.session_id] = (session.owner, reason, time.monotonic() + ENDED_MEMORY_S)
        while len(self._ended) > ENDED_MEMORY_MAX:
            self._ended.popitem(last=False)
        self.ended_counts[reason] += 1
        log.info("session %s ended: %s", session.session_id, reason)
        if not container_done and session.call is None:
            self._settle(session)
        if self.on_end is not None:
            self._hooks.spawn(self.on_end(session.session_id, session.owner, reason))

    def _settle(self, session: _Session) -> None:
        """The ended session's container: reset by the runner (and reused if clean), or replaced."""
        handle = session.handle
        if not handle.alive:
            self.pool.retire(handle, RetireReason.RUNNER_LOST)
            return
        try:
            self.pool.release(handle, close_session(handle))
        except ChannelClosed:
            self.pool.retire(handle, RetireReason.RUNNER_LOST)

    async def _reap_loop(self) -> None:
        while True:
            await asyncio.sleep(REAP_EVERY_S)
            self._reap()

    def _reap(self) -> None:
        now = time.monotonic()
        for session in list(self._live.values()):
            if session.call is not None:
                continue
            pool = self.pool.pools[session.tier.name]
            if not session.handle.alive:
                self._end(session, ended_because.SANDBOX_ERROR)
            elif session.handle.created_at < pool.drained_at_s:
                self._end(session, ended_because.DRAINED)
            elif now - session.last_used_s >= session.idle_timeout_s:
                self._end(session, ended_because.IDLE_TIMEOUT)
        while self._ended and next(iter(self._ended.values()))[2] <= now:
            self._ended.popitem(last=False)
