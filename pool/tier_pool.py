"""The bookkeeping of one tier's containers: idle queue, busy set, waiters, counters (no I/O)."""

from __future__ import annotations

import asyncio
import collections
from dataclasses import dataclass, field

from pool.container import ContainerHandle
from pool.tiers import Tier


@dataclass
class TierStats:
    leases: int = 0
    created: int = 0
    replaced: collections.Counter[str] = field(default_factory=collections.Counter)
    lease_wait_ms: collections.deque[float] = field(default_factory=lambda: collections.deque(maxlen=2048))

    def wait_percentile_ms(self, fraction: float) -> float:
        if not self.lease_wait_ms:
            return 0.0
        ordered = sorted(self.lease_wait_ms)
        return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


class TierPool:
    """One tier's containers. Only the manager changes it, always on the event loop."""

    def __init__(self, tier: Tier) -> None:
        self.tier = tier
        self.min_idle = tier.min_idle
        self.max_size = tier.max_size
        self.target_idle = tier.min_idle  # what the warmer aims for; min_idle unless demand says more
        self.idle: collections.deque[ContainerHandle] = collections.deque()
        self.busy: set[ContainerHandle] = set()
        self.starting = 0
        self.waiters: collections.deque[asyncio.Future[ContainerHandle]] = collections.deque()
        self.stats = TierStats()
        self.ever_warm = tier.min_idle == 0

    @property
    def total(self) -> int:
        return len(self.idle) + len(self.busy) + self.starting

    def pending_waiters(self) -> int:
        return sum(1 for w in self.waiters if not w.done())

    def starts_wanted(self) -> int:
        """How many containers to start now: the idle target plus waiting leases, within max_size."""
        need = self.target_idle + self.pending_waiters() - len(self.idle) - self.starting
        return max(0, min(need, self.max_size - self.total))

    def take_idle(self) -> ContainerHandle | None:
        while self.idle:
            handle = self.idle.popleft()
            if handle.alive:
                self.busy.add(handle)
                return handle
        return None

    def offer(self, handle: ContainerHandle) -> None:
        """A ready container goes to the longest waiter, else to the idle queue (most recent first)."""
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                self.busy.add(handle)
                waiter.set_result(handle)
                return
        self.idle.appendleft(handle)
        if len(self.idle) >= self.min_idle:
            self.ever_warm = True

    def forget(self, handle: ContainerHandle) -> None:
        self.busy.discard(handle)
        try:
            self.idle.remove(handle)
        except ValueError:
            pass

    def fail_waiters(self, exc: Exception) -> None:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_exception(exc)
