"""The owner of background tasks ends them all, even one that swallows a cancellation."""

from __future__ import annotations

import asyncio

import pytest

from pool.background import TaskOwner

pytestmark = pytest.mark.anyio


async def test_close_ends_a_task_that_swallows_one_cancellation():
    swallowed = []

    async def stubborn() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            swallowed.append(True)  # what a library bug looks like: carry on as if nothing happened
        await asyncio.sleep(3600)

    owner = TaskOwner("test")
    task = owner.spawn(stubborn())
    await asyncio.sleep(0)
    await asyncio.wait_for(owner.close(), timeout=10)
    assert swallowed == [True] and task.cancelled() and len(owner) == 0


async def test_wait_lets_tasks_finish_and_close_cancels_the_rest():
    owner = TaskOwner("test")
    quick = owner.spawn(asyncio.sleep(0))
    slow = owner.spawn(asyncio.sleep(3600))
    assert await owner.wait(0.05) is False, "the slow one is still running"
    assert quick.done() and not slow.done()
    await owner.close()
    assert slow.cancelled() and len(owner) == 0
