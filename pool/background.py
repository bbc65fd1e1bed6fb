"""An owner for background tasks: whoever creates a `TaskOwner` cancels and awaits everything it spawned."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

log = logging.getLogger(__name__)


class TaskOwner:
    """Keeps a strong reference to each task it spawns, logs their failures, and ends them in `close()`."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.closing = False
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
        """Cancel every task still running and wait until each has ended (shielded clean-ups included).

        `closing` turns True first: a loop that checks it ends at its next turn even when a library swallowed
        its cancellation (redis-py does when the cancel lands while a blocking command's connection is being
        made; see redis/redis-py#2028), which would otherwise leave this waiting forever."""
        self.closing = True
        while self._tasks:  # a cancelled task may spawn another on its way out
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("%s: background task failed", self.what, exc_info=task.exception())
