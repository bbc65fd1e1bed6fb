"""The owner of background tasks ends them all: a loop that swallowed its cancellation ends at its next
turn, and a shielded clean-up runs to its end."""

from __future__ import annotations

import asyncio
import time

import anyio
import pytest

from pool.background import TaskOwner

pytestmark = pytest.mark.anyio


async def test_a_loop_that_swallows_its_cancellation_ends_once_its_owner_closes():
    owner = TaskOwner("test")
    swallowed = []

    async def loop() -> None:
        while not owner.closing:
            try:
                await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                swallowed.append(True)  # what a library bug looks like: carry on as if nothing happened

    owner.spawn(loop())
    await asyncio.sleep(0.02)
    await asyncio.wait_for(owner.close(), timeout=10)
    assert swallowed == [True] and len(owner) == 0


async def test_close_lets_a_shielded_clean_up_finish():
    owner = TaskOwner("test")
    cleaned = []

    async def task() -> None:
        try:
            await asyncio.sleep(3600)
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(time.sleep, 0.3)  # e.g. removing a container
            cleaned.append(True)

    owner.spawn(task())
    await asyncio.sleep(0.01)
    await owner.close()
    assert cleaned == [True]


async def test_wait_lets_tasks_finish_and_close_cancels_the_rest():
    owner = TaskOwner("test")
    quick = owner.spawn(asyncio.sleep(0))
    slow = owner.spawn(asyncio.sleep(3600))
    assert await owner.wait(0.05) is False, "the slow one is still running"
    assert quick.done() and not slow.done()
    await owner.close()
    assert slow.cancelled() and len(owner) == 0
