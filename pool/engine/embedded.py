"""Embedded mode: the API process owns the pool; async tasks live in memory (`pool/engine/async_tasks.py`).

Streamed tasks, async tasks followed through their events, and sessions run here too (see
`pool/task_stream.py` and `pool/engine/sessions.py`)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

from pool.background import TaskOwner
from pool.engine.admin import PoolAdmin
from pool.engine.async_tasks import AsyncTasks
from pool.engine.backend import ContainerBackend
from pool.engine.manager import PoolManager
from pool.engine.scratch import ScratchStore
from pool.engine.sessions import SessionManager
from pool.model.errors import BackendUnavailable, PoolError, SandboxError
from pool.model.images import describe
from pool.model.results import TaskSpec
from pool.model.sessions import SessionFigures, SessionInfo
from pool.model.snapshots import AdminView, Drained, PoolsSnapshot, Resized, TierSnapshot
from pool.model.tasks import DueCallback, Execution, Submission, TaskView
from pool.settings import Settings
from pool.task_stream import TaskStream

log = logging.getLogger(__name__)


class EmbeddedDispatcher:
    """A `Dispatcher` over this process's own `PoolManager`."""

    def __init__(self, settings: Settings, backend: ContainerBackend, scratch: ScratchStore | None = None) -> None:
        self.settings = settings
        self.pool = PoolManager(settings, backend, scratch)
        self.admin = PoolAdmin(self.pool)
        self._background = TaskOwner("async tasks")
        self.async_tasks = AsyncTasks(settings, self.pool, self._background)
        self.sessions = SessionManager(self.pool, settings, worker=settings.instance_id)

    async def start(self) -> None:
        await self.pool.start()
        await self.sessions.start()

    async def close(self) -> None:
        self.async_tasks.stop_starting()
        await self._background.close()
        await self.sessions.close()
        await self.pool.close()

    async def execute(self, tier_name: str, spec: TaskSpec, wait_s: float) -> Execution:
        return await self.pool.execute(tier_name, spec, wait_s)

    async def submit(self, tier_name: str, spec: TaskSpec, owner: str, callback_url: str = "") -> None:
        await self.submit_many([Submission(tier_name, spec, callback_url)], owner)

    async def submit_many(self, submissions: Sequence[Submission], owner: str) -> None:
        # While the engine is known to be away, refuse (503, Retry-After) as a synchronous request is, and
        # as scale-out mode refuses while no worker serves the tier, rather than accept tasks that could
        # only wait for it.
        if not self.pool.docker_ok:
            raise BackendUnavailable("the Docker engine is not answering; retry shortly")
        self.async_tasks.submit_many(submissions, owner)

    async def task(self, task_id: str, owner: str, wait_s: float = 0.0) -> TaskView | None:
        return await self.async_tasks.view(task_id, owner, wait_s)

    async def due_callbacks(self, limit: int, wait_s: float) -> list[DueCallback]:
        return await self.async_tasks.due_callbacks(limit, wait_s)

    async def callback_finished(self, due: DueCallback, delivered: bool) -> None:
        self.async_tasks.callback_finished(due, delivered)

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
        return await self.async_tasks.follow(task_id, owner)

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
