"""Waiting for a condition on the real engine without asserting how long it took."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

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


async def until(probe: Callable[[], T], what: str, timeout_s: float = 10, interval_s: float = 0.01) -> T:
    """`wait_for` for tests running on an event loop: the pool under test keeps running while this waits."""
    import asyncio

    deadline = time.monotonic() + timeout_s
    last: T = probe()
    while not last:
        if time.monotonic() > deadline:
            raise AssertionError(f"not met within {timeout_s:g} s: {what} (last probe: {last!r})")
        await asyncio.sleep(interval_s)
        last = probe()
    return last
