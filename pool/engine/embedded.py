"""Embedded mode: the API process owns the pool; async tasks live in memory (`pool/engine/async_tasks.py`)."""

from __future__ import annotations

from collections.abc import Sequence

from pool.background import TaskOwner
from pool.engine.admin import PoolAdmin
from pool.engine.async_tasks import AsyncTasks
from pool.engine.backend import ContainerBackend
from pool.engine.manager import PoolManager
from pool.model.results import TaskSpec
from pool.model.snapshots import AdminView, Drained, PoolsSnapshot, Resized, TierSnapshot
from pool.model.tasks import DueCallback, Execution, Submission, TaskView
from pool.settings import Settings


class EmbeddedDispatcher:
    """A `Dispatcher` over this process's own `PoolManager`."""

    def __init__(self, settings: Settings, backend: ContainerBackend) -> None:
        self.settings = settings
        self.pool = PoolManager(settings, backend)
        self.admin = PoolAdmin(self.pool)
        self._background = TaskOwner("async tasks")
        self.async_tasks = AsyncTasks(settings, self.pool, self._background)

    async def start(self) -> None:
        await self.pool.start()

    async def close(self) -> None:
        self.async_tasks.stop_starting()
        await self._background.close()
        await self.pool.close()

    async def execute(self, tier_name: str, spec: TaskSpec, wait_s: float) -> Execution:
        return await self.pool.execute(tier_name, spec, wait_s)

    async def submit(self, tier_name: str, spec: TaskSpec, owner: str, callback_url: str = "") -> None:
        self.async_tasks.submit_many([Submission(tier_name, spec, callback_url)], owner)

    async def submit_many(self, submissions: Sequence[Submission], owner: str) -> None:
        self.async_tasks.submit_many(submissions, owner)

    async def task(self, task_id: str, owner: str, wait_s: float = 0.0) -> TaskView | None:
        return await self.async_tasks.view(task_id, owner, wait_s)

    async def due_callbacks(self, limit: int, wait_s: float) -> list[DueCallback]:
        return await self.async_tasks.due_callbacks(limit, wait_s)

    async def callback_finished(self, due: DueCallback, delivered: bool) -> None:
        self.async_tasks.callback_finished(due, delivered)

    async def tiers(self) -> tuple[TierSnapshot, ...]:
        return self.pool.snapshot().tiers

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
