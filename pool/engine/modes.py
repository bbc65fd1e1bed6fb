"""How a lease gets its container: warm mode (the service) or cold mode (a baseline for benchmarks).

The manager holds one of these and never asks which: the mode decides how a lease is served, how many
containers the replenisher keeps starting, when the pool counts as warm, and whether a container is
used more than once (the lifecycle policy's `single_use`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Protocol

from pool.engine.container import ContainerHandle
from pool.engine.tier_pool import TierPool
from pool.model.errors import BackendUnavailable, NoCapacity, Overloaded

COLD_ROOM_POLL_S = 0.01


class Mode(Protocol):
    single_use: bool  # retire every container after its one lease

    async def lease(self, pool: TierPool, wait_s: float) -> ContainerHandle:
        """A container of the tier for one task, within `wait_s`; NoCapacity (or a subclass) otherwise."""
        ...

    def starts_wanted(self, pool: TierPool) -> int:
        """How many containers the replenisher should start for the tier now."""
        ...

    def ready(self, pools: Iterable[TierPool]) -> bool:
        """Whether the pool is warm enough to serve (the engine being up is checked by the manager)."""
        ...


class WarmMode:
    """Idle, verified-clean containers are kept per tier; a lease takes one or waits (bounded) for one."""

    single_use = False

    def __init__(self, max_waiting: int, engine_up: Callable[[], bool], wake: Callable[[], None]) -> None:
        self.max_waiting = max_waiting
        self._engine_up = engine_up
        self._wake = wake  # a waiting lease wants the replenisher to look now

    async def lease(self, pool: TierPool, wait_s: float) -> ContainerHandle:
        started = time.perf_counter()
        handle = pool.take_idle()
        if handle is not None:
            pool.stats.lease_wait_ms.append((time.perf_counter() - started) * 1000)
            return handle
        if not self._engine_up():
            raise BackendUnavailable("the Docker engine is not answering; retry shortly")
        if (refusal := pool.refusal()) is not None:
            raise refusal
        tier_name = pool.tier.name
        if pool.pending_waiters() >= self.max_waiting:
            raise Overloaded(f"{self.max_waiting} requests already wait for a {tier_name!r} container",
                             retry_after_s=max(1.0, pool.stats.wait_percentile_ms(0.5) / 1000))
        waiter: asyncio.Future[ContainerHandle] = asyncio.get_running_loop().create_future()
        pool.waiters.append(waiter)
        self._wake()
        try:
            async with asyncio.timeout(wait_s):
                handle = await waiter
        except TimeoutError:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                handle = waiter.result()  # granted just as the time ran out: take it
            else:
                waiter.cancel()
                pool.stats.lease_timeouts += 1
                raise NoCapacity(f"no {tier_name!r} container became free within {wait_s:g} s",
                                 retry_after_s=pool.retry_after_s()) from None
        finally:
            if not waiter.done():
                waiter.cancel()
        pool.stats.lease_wait_ms.append((time.perf_counter() - started) * 1000)
        return handle

    def starts_wanted(self, pool: TierPool) -> int:
        return pool.starts_wanted()

    def ready(self, pools: Iterable[TierPool]) -> bool:
        return all(p.ever_warm for p in pools)


class ColdMode:
    """For comparison only: a fresh container per task, started on the request path, never reused."""

    single_use = True

    def __init__(self, start: Callable[[TierPool], Awaitable[ContainerHandle]]) -> None:
        self._start = start  # starts one container of the tier and hands it over leased

    async def lease(self, pool: TierPool, wait_s: float) -> ContainerHandle:
        deadline = time.monotonic() + wait_s
        while pool.total >= pool.max_size:
            if time.monotonic() > deadline:
                raise NoCapacity(f"tier {pool.tier.name!r} is at max_size", retry_after_s=1.0)
            await asyncio.sleep(COLD_ROOM_POLL_S)
        return await self._start(pool)

    def starts_wanted(self, pool: TierPool) -> int:
        return 0  # nothing is kept warm

    def ready(self, pools: Iterable[TierPool]) -> bool:
        return True  # nothing to wait for: ready as soon as the engine is
