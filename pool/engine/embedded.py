"""Embedded mode: the API process owns the pool; async tasks are kept in memory for the result TTL,
within the bounds of pool/result_bounds.py (per key: 429; in total: the oldest finished results go).

Streamed tasks, async tasks followed through their events, and sessions run here too (see
`pool/task_stream.py` and `pool/engine/sessions.py`)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from pool.background import TaskOwner
from pool.engine.admin import PoolAdmin
from pool.engine.backend import ContainerBackend
from pool.engine.manager import PoolManager
from pool.engine.sessions import SessionManager
from pool.model.errors import Overloaded, PoolError, ResultEvicted, SandboxError
from pool.model.images import describe
from pool.model.result_bounds import ResultBook, pending_bytes, result_bytes
from pool.model.results import TaskSpec
from pool.model.sessions import SessionFigures, SessionInfo
from pool.model.snapshots import AdminView, Drained, PoolsSnapshot, Resized, TierSnapshot
from pool.model.tasks import Execution, TaskState, TaskView
from pool.settings import Settings
from pool.task_stream import TaskStream

log = logging.getLogger(__name__)

SWEEP_EVERY_S = 1.0


@dataclass
class _Record:
    owner: str
    tier_name: str
    submitted_at: float  # monotonic
    state: TaskState = TaskState.QUEUED
    execution: Execution | None = None
    error: PoolError | None = None
    total_ms: float = 0.0
    expires_at: float = field(default=float("inf"))  # monotonic; set when done
    stream: TaskStream | None = None  # its output for followers, until it is done


class EmbeddedDispatcher:
    """A `Dispatcher` over this process's own `PoolManager`."""

    def __init__(self, settings: Settings, backend: ContainerBackend) -> None:
        self.settings = settings
        self.pool = PoolManager(settings, backend)
        self.admin = PoolAdmin(self.pool)
        self._records: dict[str, _Record] = {}
        self._book = ResultBook(settings.result_bounds())
        # Evicted ids (and their owners), so that a GET says why the result is gone; as many as results.
        self._evicted: OrderedDict[str, str] = OrderedDict()
        self._swept_at = 0.0
        # Async tasks of a tier run at most max_size at a time; the rest wait here, in submission order,
        # rather than failing their lease after lease_timeout_s.
        self._slots = {tier.name: asyncio.Semaphore(tier.max_size) for tier in settings.tiers}
        self._background = TaskOwner("async tasks")
        self.sessions = SessionManager(self.pool, settings, worker=settings.instance_id)

    async def start(self) -> None:
        await self.pool.start()
        await self.sessions.start()

    async def close(self) -> None:
        await self._background.close()
        await self.sessions.close()
        await self.pool.close()

    async def execute(self, tier_name: str, spec: TaskSpec, wait_s: float) -> Execution:
        return await self.pool.execute(tier_name, spec, wait_s)

    async def submit(self, tier_name: str, spec: TaskSpec, owner: str) -> None:
        self._sweep()
        pending = sum(1 for r in self._records.values() if r.tier_name == tier_name and r.state != TaskState.DONE)
        if pending >= self.settings.max_queued:
            raise Overloaded(f"tier {tier_name!r} already has {pending} tasks waiting or running "
                            f"(the bound is {self.settings.max_queued})")
        now = time.monotonic()
        self._evict(self._book.admit(spec.task_id, owner, pending_bytes(spec), now,
                                     pending_retry_s=self.settings.max_timeout_s))
        record = _Record(owner=owner, tier_name=tier_name, submitted_at=now, stream=TaskStream(spec.task_id))
        self._records[spec.task_id] = record
        self._background.spawn(self._run(record, tier_name, spec))

    async def _run(self, record: _Record, tier_name: str, spec: TaskSpec) -> None:
        async def started() -> bool:
            record.state = TaskState.RUNNING
            return True

        assert record.stream is not None
        try:
            async with self._slots[tier_name]:
                record.execution = await self.pool.execute(tier_name, spec, start_gate=started,
                                                           on_output=record.stream.write)
        except PoolError as exc:
            record.error = exc
        except Exception as exc:  # a bug, not the task's doing: answer it rather than leave it "running"
            log.exception("async task %s failed inside the pool", spec.task_id)
            record.error = SandboxError(f"internal error: {exc!r}")
        record.state = TaskState.DONE
        record.total_ms = (time.monotonic() - record.submitted_at) * 1000
        record.expires_at = time.monotonic() + self.settings.result_ttl_s
        size = result_bytes(record.execution.result if record.execution else None)
        self._evict(self._book.finish(spec.task_id, size, record.expires_at))
        # Done first, then the stream's end: its followers then read the task's final body.
        record.stream.end(record.execution or record.error or SandboxError("no outcome"))
        record.stream = None  # its followers hold it as long as they need it

    def _evict(self, task_ids: list[str]) -> None:
        for task_id in task_ids:
            record = self._records.pop(task_id, None)
            if record is not None:
                self._evicted[task_id] = record.owner
        while len(self._evicted) > self.settings.max_results:
            self._evicted.popitem(last=False)

    async def task(self, task_id: str, owner: str) -> TaskView | None:
        self._sweep()
        record = self._records.get(task_id)
        if record is None and self._evicted.get(task_id) == owner:
            raise ResultEvicted(f"the result of task {task_id} was evicted before its time: the server keeps at "
                                f"most {self.settings.max_results} results and {self.settings.max_result_bytes} "
                                "bytes of them, oldest out first")
        if record is None or record.owner != owner or record.expires_at <= time.monotonic():
            return None
        return TaskView(task_id=task_id, state=record.state, tier=self.pool.tiers[record.tier_name],
                        execution=record.execution, error=record.error, total_ms=record.total_ms)

    def _sweep(self) -> None:
        now = time.monotonic()
        if now - self._swept_at < SWEEP_EVERY_S:
            return
        self._swept_at = now
        for task_id in self._book.expire(now):
            self._records.pop(task_id, None)

    async def tiers(self) -> tuple[TierSnapshot, ...]:
        return self.pool.snapshot().tiers

    async def images(self) -> list[dict[str, Any]]:
        return [describe(spec, self.pool.image_labels.get(spec.name)) for spec in self.settings.served_images()]

    async def readiness(self) -> dict[str, bool]:
        return {"docker": self.pool.docker_ok, "image": self.pool.image_ok, "pools_warm": self.pool.warm}

    async def figures(self) -> PoolsSnapshot:
        return self.pool.snapshot()

    async def pools(self) -> AdminView:
        return self.admin.view()

    async def resize(self, tier_name: str, min_idle: int | None, max_size: int | None) -> Resized:
        return await self.admin.resize(tier_name, min_idle, max_size)

    async def drain(self, tier_name: str) -> Drained:
        return self.admin.drain(tier_name)

    # streaming -------------------------------------------------------------------------------------
    async def execute_stream(self, tier_name: str, spec: TaskSpec, wait_s: float) -> TaskStream:
        started: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        stream = TaskStream(spec.task_id)

        async def gate() -> bool:
            if started.done():  # the request stopped waiting (its client went away): withdraw the task
                return False
            started.set_result(None)
            return True

        async def run() -> None:
            try:
                stream.end(await self.pool.execute(tier_name, spec, wait_s, start_gate=gate, on_output=stream.write))
            except Exception as exc:
                error = exc if isinstance(exc, PoolError) else SandboxError(f"internal error: {exc!r}")
                if not isinstance(exc, PoolError):
                    log.exception("streamed task %s failed inside the pool", spec.task_id)
                if not started.done():
                    started.set_exception(error)
                stream.end(error)

        self._background.spawn(run())
        try:
            await asyncio.shield(started)
        except asyncio.CancelledError:
            started.cancel()
            raise
        return stream

    async def task_events(self, task_id: str, owner: str) -> TaskStream | TaskView | None:
        record = self._records.get(task_id)
        if record is not None and record.owner == owner and record.stream is not None:
            return record.stream
        return await self.task(task_id, owner)

    # sessions --------------------------------------------------------------------------------------
    async def open_session(self, tier_name: str, owner: str, image: str, idle_timeout_s: float,
                           wait_s: float) -> SessionInfo:
        return await self.sessions.open(tier_name, owner, image, idle_timeout_s, wait_s)

    async def session(self, session_id: str, owner: str) -> SessionInfo:
        return self.sessions.get(session_id, owner)

    async def session_execute(self, session_id: str, owner: str, spec: TaskSpec) -> Execution:
        return await self.sessions.execute(session_id, owner, spec)

    async def session_stream(self, session_id: str, owner: str, spec: TaskSpec) -> TaskStream:
        stream = TaskStream(spec.task_id)
        call = self.sessions.start_call(session_id, owner, spec, on_output=stream.write)

        def ended(task: asyncio.Task[Execution]) -> None:
            if task.cancelled():
                stream.end(SandboxError("the call was cancelled (the service is stopping)"))
            elif isinstance(error := task.exception(), PoolError):
                stream.end(error)
            elif error is not None:
                stream.end(SandboxError(f"internal error: {error!r}"))
            else:
                stream.end(task.result())

        call.add_done_callback(ended)
        return stream

    async def delete_session(self, session_id: str, owner: str) -> None:
        self.sessions.delete(session_id, owner)

    async def all_sessions(self) -> tuple[SessionInfo, ...]:
        return self.sessions.sessions()

    async def session_figures(self) -> SessionFigures:
        open_by_tier = {tier.name: 0 for tier in self.settings.tiers}
        for info in self.sessions.sessions():
            open_by_tier[info.tier.name] += 1
        return SessionFigures(open_by_tier=tuple(open_by_tier.items()),
                              ended_by_reason=tuple(sorted(self.sessions.ended_counts.items())))
