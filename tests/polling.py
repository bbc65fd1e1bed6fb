"""Waiting for a condition without asserting how long it took: the one polling helper of the suite.

`wait_for` polls from plain (threaded) tests, `until` from tests running on an event loop (its probe may be
a coroutine function, e.g. an in-process HTTP call). Both return the probe's first truthy value and fail
naming `what` (and the last value seen) at the deadline.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar, cast

T = TypeVar("T")


def wait_for(probe: Callable[[], T], what: str, timeout_s: float = 30, interval_s: float = 0.2) -> T:
    """Call `probe` until it returns something truthy, and return that; fail naming `what` at the deadline."""
    deadline = time.monotonic() + timeout_s
    last: T = probe()
    while not last:
        if time.monotonic() > deadline:
            raise AssertionError(f"not met within {timeout_s:g} s: {what} (last probe: {last!r})")
        time.sleep(interval_s)
        last = probe()
    return last


async def until(probe: Callable[[], T | Awaitable[T]], what: str, timeout_s: float = 10,
                interval_s: float = 0.01) -> T:
    """`wait_for` for tests running on an event loop: the pool under test keeps running while this waits."""

    async def look() -> T:
        value = probe()
        return await value if inspect.isawaitable(value) else cast(T, value)

    deadline = time.monotonic() + timeout_s
    last = await look()
    while not last:
        if time.monotonic() > deadline:
            raise AssertionError(f"not met within {timeout_s:g} s: {what} (last probe: {last!r})")
        await asyncio.sleep(interval_s)
        last = await look()
    return last
