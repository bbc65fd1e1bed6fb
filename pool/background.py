"""An owner for background tasks: whoever creates a `TaskOwner` cancels and awaits everything it spawned."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

log = logging.getLogger(__name__)

RECANCEL_AFTER_S = 0.2


class TaskOwner:
    """Keeps a strong reference to each task it spawns, logs their failures, and ends them in `close()`."""

    def __init__(self, what: str) -> None:
        self.what = what
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def __len__(self) -> int:
        return len(self._tasks)

    async def wait(self, timeout_s: float) -> bool:
        """Let the running tasks finish on their own for at most `timeout_s`; True when none is left."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout_s)
        return not self._tasks

    async def close(self) -> None:
        """Cancel every task still running and wait until each has ended.

        A task still running after `RECANCEL_AFTER_S` is cancelled again: a library may swallow one
        cancellation and carry on (redis-py does when it lands while a blocking command's connection is
        being made; see redis/redis-py#2028), which would leave this waiting forever."""
        while self._tasks:  # a cancelled task may spawn another on its way out
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            await asyncio.wait(tasks, timeout=RECANCEL_AFTER_S)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("%s: background task failed", self.what, exc_info=task.exception())
