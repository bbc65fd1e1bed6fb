"""The bookkeeping of one tier's containers: idle queue, busy set, waiters, counters (no I/O)."""

from __future__ import annotations

import asyncio
import collections
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pool.engine.container import ContainerHandle
from pool.model import cpu_quota
from pool.model.backoff import Backoff
from pool.model.errors import NoCapacity, NoTierFits, PoolError
from pool.model.lifecycle import ContainerState, RetireReason, ReusePolicy, Verdict, after_task, while_idle
from pool.model.results import Status
from pool.model.snapshots import TierCounters, TierSnapshot
from pool.model.stats import RunTimes, WaitSamples
from pool.model.tiers import Tier
from pool.model.warming import Demand, WarmingPolicy, idle_to_remove, waiters_to_start_for, warm_target

START_BACKOFF_MAX_S = 60.0


@dataclass
class TierStats:
    """Counters since start; `api/metrics.py` exposes them and `pool/engine/admin.py` reports them."""

    leases: int = 0
    lease_timeouts: int = 0
    created: int = 0
    start_failures: int = 0
    replaced: collections.Counter[str] = field(default_factory=collections.Counter)
    lease_wait_ms: WaitSamples = field(default_factory=WaitSamples)
    run_times: RunTimes = field(default_factory=RunTimes)

    def wait_percentile_ms(self, fraction: float) -> float:
        return self.lease_wait_ms.percentile_ms(fraction)


class TierPool:
    """One tier's containers. Only the manager changes it, always on the event loop."""

    def __init__(self, tier: Tier, clock: Callable[[], float] = time.monotonic, *, single_use: bool = False,
                 housekeeping_cpu_s: float = cpu_quota.TASK_HOUSEKEEPING_CPU_S) -> None:
        self.tier = tier
        self.reuse = ReusePolicy(max_uses=tier.max_uses, max_age_s=tier.max_age_s, single_use=single_use)
        self._clock = clock  # monotonic seconds; tests pass their own
        self.min_idle = tier.min_idle
        self.max_size = tier.max_size
        self.target_idle = tier.min_idle  # what the warmer aims for; min_idle unless demand says more
        self.idle: collections.deque[ContainerHandle] = collections.deque()
        self.busy: set[ContainerHandle] = set()
        self.starting = 0
        self.waiters: collections.deque[asyncio.Future[ContainerHandle]] = collections.deque()
        self.stats = TierStats()
        self.ever_warm = tier.min_idle == 0
        self.demand = Demand()
        self.drained_at_s = 0.0  # containers created before this (monotonic) are replaced when they return
        self.start_backoff = Backoff(first_s=0.5, max_s=START_BACKOFF_MAX_S)  # consecutive start failures
        self.retry_at_s = 0.0  # no start before this (monotonic) after failures
        self.last_start_error: str | None = None
        self.unfit: NoTierFits | None = None  # set when the host can never hold one of its containers
        self._leased_at_s: dict[ContainerHandle, float] = {}
        self._idle_since_s: dict[ContainerHandle, float] = {}
        self.cooldown_s = cpu_quota.reuse_cooldown_s(tier.resources.cpu, housekeeping_cpu_s)

    @property
    def total(self) -> int:
        return len(self.idle) + len(self.busy) + self.starting

    def snapshot(self, window_s: float) -> TierSnapshot:
        """The tier now: sizes, live counts, counters since start (the one builder of a tier's view)."""
        stats = self.stats
        counters = TierCounters(
            created=stats.created, replaced=tuple(sorted(stats.replaced.items())),
            leases=stats.leases, lease_timeouts=stats.lease_timeouts,
            lease_wait_p50_ms=stats.wait_percentile_ms(0.50), lease_wait_p95_ms=stats.wait_percentile_ms(0.95),
            lease_rate_per_s=self.demand.rate_per_s(self._clock(), window_s),
            typical_hold_ms=self.demand.typical_hold_s() * 1000,
            start_failures=stats.start_failures, last_start_error=self.last_start_error,
            unfit=None if self.unfit is None else self.unfit.message,
            gpus_in_use=tuple(sorted(g for h in (*self.idle, *self.busy) for g in h.gpu_ids)),
            lease_wait=stats.lease_wait_ms.histogram.snapshot(), run_times=stats.run_times.snapshot())
        return TierSnapshot(tier=self.tier, min_idle=self.min_idle, max_size=self.max_size,
                            target_idle=self.target_idle, idle=len(self.idle), busy=len(self.busy),
                            starting=self.starting, waiting=self.pending_waiters(), counters=counters)

    def pending_waiters(self) -> int:
        return sum(1 for w in self.waiters if not w.done())

    def starts_wanted(self) -> int:
        """How many containers to start now: the idle target plus the waiting leases no busy container will
        serve soon (warming.waiters_to_start_for), within max_size."""
        waiters, _ = self._waiters_to_start_for()
        need = self.target_idle + waiters - len(self.idle) - self.starting
        return max(0, min(need, self.max_size - self.total))

    def recheck_in_s(self) -> float:
        """When `starts_wanted` may say more without anything happening: a busy container counted as coming
        back soon has not (inf when nothing waits on one)."""
        return self._waiters_to_start_for()[1]

    def _waiters_to_start_for(self) -> tuple[int, float]:
        waiters = self.pending_waiters()
        if not waiters:
            return 0, math.inf  # the common case, asked on every wake-up: nothing to weigh
        now_s = self._clock()
        # Only containers that can come back count: not one its task wears out (max_uses: 1 never does).
        comeback_ages_s = [] if self.reuse.single_use else [
            now_s - leased_s for handle, leased_s in self._leased_at_s.items()
            if while_idle(self.reuse, self.state_of(handle)) is None]
        return waiters_to_start_for(waiters, comeback_ages_s, self.demand.typical_hold_s())

    def note_lease(self) -> None:
        """A lease was asked for (granted or not): counted, and fed to the demand estimate."""
        self.stats.leases += 1
        self.demand.record_lease(self._clock())

    def take_idle(self) -> ContainerHandle | None:
        """The most recently used idle container that has rested `cooldown_s` since its reset, else the one
        that rested longest: the surplus still ages out (retune removes the least recent), and a container
        whose quota its last task and reset spent is not handed the next task while another is fresh."""
        now_s = self._clock()
        chosen: ContainerHandle | None = None
        for handle in list(self.idle):  # most recent first
            if not handle.alive:
                self.idle.remove(handle)
                self._idle_since_s.pop(handle, None)
                continue
            chosen = handle
            if now_s - self._idle_since_s.get(handle, now_s) >= self.cooldown_s:
                break
        if chosen is None:
            return None
        self.idle.remove(chosen)
        self._idle_since_s.pop(chosen, None)
        self._lend(chosen)
        return chosen

    def offer(self, handle: ContainerHandle) -> None:
        """A ready container goes to the longest waiter, else to the idle queue (most recent first)."""
        self._returned(handle)
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                self._lend(handle)
                waiter.set_result(handle)
                return
        self.idle.appendleft(handle)
        self._idle_since_s[handle] = self._clock()
        if len(self.idle) >= self.min_idle:
            self.ever_warm = True

    def forget(self, handle: ContainerHandle) -> None:
        self._returned(handle)
        self._idle_since_s.pop(handle, None)
        self.busy.discard(handle)
        try:
            self.idle.remove(handle)
        except ValueError:
            pass

    def _lend(self, handle: ContainerHandle) -> None:
        self.busy.add(handle)
        self._leased_at_s[handle] = self._clock()

    def _returned(self, handle: ContainerHandle) -> None:
        self.busy.discard(handle)
        leased_at_s = self._leased_at_s.pop(handle, None)
        if leased_at_s is not None:
            self.demand.record_hold(self._clock() - leased_at_s)

    def fail_waiters(self, exc: Exception) -> None:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_exception(exc)

    # lifecycle (pool/model/lifecycle.py decides) ---------------------------------------------------
    def state_of(self, handle: ContainerHandle, *, closing: bool = False) -> ContainerState:
        return ContainerState(alive=handle.alive, uses=handle.uses, age_s=handle.age_s,
                              drained=handle.created_at < self.drained_at_s, over_max_size=self.total > self.max_size,
                              closing=closing, wear_share=handle.wear_share)

    def after_task(self, handle: ContainerHandle, *, status: Status | None, reset_clean: bool | None = None,
                   closing: bool = False) -> Verdict:
        """The fate of a leased container coming back (see `lifecycle.after_task`)."""
        return after_task(self.reuse, self.state_of(handle, closing=closing), status=status, reset_clean=reset_clean)

    def take_worn_idle(self) -> list[tuple[ContainerHandle, RetireReason]]:
        """Take out (and return, with why) the idle containers that wore out or died."""
        worn = [(h, reason) for h in self.idle if (reason := while_idle(self.reuse, self.state_of(h))) is not None]
        for handle, _ in worn:
            self.forget(handle)
        return worn

    # sizing ----------------------------------------------------------------------------------------

    def retune(self, policy: WarmingPolicy, ledger_room: int, *,
               now: bool = False) -> list[tuple[ContainerHandle, RetireReason]]:
        """Set target_idle from demand; take out (and return, with why) the idle containers to remove.

        `ledger_room` is how many more containers of this tier the host ledger could hold now.
        """
        drained = [h for h in self.idle if h.created_at < self.drained_at_s]  # a defence: none should be idle
        for handle in drained:
            self.forget(handle)
        now_s = self._clock()
        ceiling = min(self.max_size - len(self.busy), len(self.idle) + self.starting + ledger_room)
        self.target_idle = warm_target(
            policy, min_idle=self.min_idle, ceiling=ceiling, rate_per_s=self.demand.rate_per_s(now_s, policy.window_s),
            hold_s=self.demand.typical_hold_s(), quiet_for_s=self.demand.quiet_for_s(now_s))
        least_recent_first = list(reversed(self.idle))
        count = idle_to_remove(idle_for_s=[now_s - self._idle_since_s.get(h, now_s) for h in least_recent_first],
                               target=self.target_idle, total=self.total, max_size=self.max_size,
                               quiet_s=policy.quiet_s, now=now)
        doomed = least_recent_first[:count]
        for handle in doomed:
            self.forget(handle)
        return [(h, RetireReason.DRAINED) for h in drained] + [(h, RetireReason.SCALED_DOWN) for h in doomed]

    def take_all_idle(self) -> list[ContainerHandle]:
        handles = list(self.idle)
        for handle in handles:
            self.forget(handle)
        return handles

    # start failures --------------------------------------------------------------------------------
    @property
    def start_failures(self) -> int:
        """Consecutive failed starts; a successful start resets them."""
        return self.start_backoff.failures

    def start_failed(self, message: str) -> float:
        """Back off this tier's starts (exponentially); fail its waiters if nothing else can serve them."""
        self.stats.start_failures += 1
        backoff_s = self.start_backoff.next_s()
        self.retry_at_s = self._clock() + backoff_s
        self.last_start_error = message
        if self.total == 0:
            self.fail_waiters(self._cannot_start(backoff_s))
        return backoff_s

    def start_succeeded(self) -> None:
        self.start_backoff.reset()
        self.retry_at_s = 0.0
        self.last_start_error = None

    def reset_backoff(self) -> None:
        """An operator acted on the tier (drain, resize): try starting again at once."""
        self.retry_at_s = 0.0

    def refusal(self) -> PoolError | None:
        """Fail a lease at once: the host can never run the tier, or the tier has no container and cannot
        start one before its backoff ends."""
        if self.unfit is not None:
            return self.unfit
        if self.total or self.last_start_error is None:
            return None
        remaining_s = self.retry_at_s - self._clock()
        return self._cannot_start(remaining_s) if remaining_s > 0 else None

    def _cannot_start(self, retry_after_s: float) -> NoCapacity:
        return NoCapacity(f"tier {self.tier.name!r} cannot start containers: {self.last_start_error}",
                          retry_after_s=max(1.0, retry_after_s))

    def retry_after_s(self) -> float:
        """When a lease is likely to succeed: the p95 of observed lease waits, and when every container
        the tier may have is busy, at least the typical hold time (when one comes back)."""
        wait_s = self.stats.wait_percentile_ms(0.95) / 1000
        if not self.idle and self.total >= self.max_size:
            wait_s = max(wait_s, self.demand.typical_hold_s())
        return max(1.0, wait_s)
