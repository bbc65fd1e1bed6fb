"""Demand-driven warming: how many idle containers each tier should keep (pure: no I/O, no clock).

A tier's warm target follows its demand. By Little's law, leases arriving at `rate` and each holding a
container for `hold` seconds keep ``rate * hold`` containers busy on average, and in one hold time about
that many new leases arrive; keeping that many idle (plus a burst margin of a few standard deviations of
Poisson arrivals) lets the next hold time's arrivals all find a warm container while the busy ones come
back. The target never drops below the operator's `min_idle` nor rises above what `max_size` and the
host ledger allow. After `quiet_s` without a lease the target is `min_idle` again, and idle containers
beyond the target are removed once they have sat unused for `quiet_s` (least recently used first), so a
burst warms the tier and a quiet tier idles down, without churning containers under steady load.

The manager feeds `Demand` with clock readings and applies the numbers; everything here is arithmetic.
"""

from __future__ import annotations

import collections
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

MAX_ARRIVALS_KEPT = 100_000  # bounds memory at very high rates; the rate then reads as at least this


@dataclass(frozen=True)
class WarmingPolicy:
    """How warm targets follow demand; `enabled=False` keeps every target at min_idle."""

    enabled: bool = True
    window_s: float = 60.0
    quiet_s: float = 120.0
    burst_sigmas: float = 2.0


class Demand:
    """One tier's recent lease arrivals and hold times, fed with monotonic clock readings (seconds)."""

    def __init__(self, holds_kept: int = 64) -> None:
        self.arrivals_s: collections.deque[float] = collections.deque(maxlen=MAX_ARRIVALS_KEPT)
        self.holds_s: collections.deque[float] = collections.deque(maxlen=holds_kept)
        self.last_lease_s: float | None = None

    def record_lease(self, now_s: float) -> None:
        self.arrivals_s.append(now_s)
        self.last_lease_s = now_s

    def record_hold(self, hold_s: float) -> None:
        self.holds_s.append(hold_s)

    def rate_per_s(self, now_s: float, window_s: float) -> float:
        """Leases per second over the last `window_s` (older arrivals are dropped)."""
        while self.arrivals_s and self.arrivals_s[0] < now_s - window_s:
            self.arrivals_s.popleft()
        return len(self.arrivals_s) / window_s

    def typical_hold_s(self) -> float:
        """The median of recent hold times (lease to return); 0 before any container came back."""
        return statistics.median(self.holds_s) if self.holds_s else 0.0

    def quiet_for_s(self, now_s: float) -> float:
        return math.inf if self.last_lease_s is None else now_s - self.last_lease_s


def demand_idle(rate_per_s: float, hold_s: float, burst_sigmas: float) -> int:
    """Idle containers that demand calls for: rate x hold, plus `burst_sigmas` Poisson deviations."""
    expected = rate_per_s * hold_s
    if expected <= 0:
        return 0
    return math.ceil(expected + burst_sigmas * math.sqrt(expected) - 1e-9)


def warm_target(policy: WarmingPolicy, *, min_idle: int, ceiling: int, rate_per_s: float, hold_s: float,
                quiet_for_s: float) -> int:
    """The tier's idle target: demand's, clamped to [min_idle, ceiling]; min_idle when quiet or disabled.

    `ceiling` is the most idle containers the tier could hold now (max_size less the busy ones, and no
    more than the ledger has room for); it never pushes the target below min_idle.
    """
    if not policy.enabled or quiet_for_s >= policy.quiet_s:
        return min_idle
    return max(min_idle, min(ceiling, demand_idle(rate_per_s, hold_s, policy.burst_sigmas)))


def idle_to_remove(*, idle_for_s: Sequence[float], target: int, total: int, max_size: int, quiet_s: float,
                   now: bool = False) -> int:
    """How many idle containers to remove, taken from the front of `idle_for_s` (least recently used first).

    Always enough to bring the tier back within max_size; beyond that, idle containers above the target
    that have sat unused for `quiet_s` (or all of them above it when `now`, after an operator's resize).
    """
    over_max = max(0, total - max_size)
    above_target = max(0, len(idle_for_s) - target)
    if now:
        stale_above = above_target
    else:
        stale_above = sum(1 for age_s in idle_for_s[:above_target] if age_s >= quiet_s)
    return min(len(idle_for_s), max(over_max, stale_above))


# A waiting lease is served by whichever comes first: a busy container coming back, or a new one. A new
# one costs ~0.2-0.3 s of the host's cpu (and dockerd's) and takes as long to come up, so it is started only
# for the waiters that busy containers will not serve soon: those leased less than SOON_HOLDS typical hold
# times ago (at most SOON_MAX_S) count as coming back. Without this, a hiccup of a few ms at 150 hello
# tasks/s (7 leases waiting for 4 ms tasks) started 6-9 containers at once on 2 cpus, which slowed every
# task, which made more leases wait: a 3-5 s stall (benchmarks/RESULTS.md, open loop).
SOON_HOLDS = 4.0
SOON_MAX_S = 0.2


def waiters_to_start_for(waiters: int, busy_lease_ages_s: Sequence[float], typical_hold_s: float) -> tuple[int, float]:
    """(waiters a new container should be started for, seconds until that should be asked again): the
    waiters beyond the busy containers that are likely back within the soon window. The second figure is
    when the youngest of those leaves the window (inf when none was counted)."""
    if waiters <= 0 or typical_hold_s <= 0:
        return max(0, waiters), math.inf
    window_s = min(SOON_HOLDS * typical_hold_s, SOON_MAX_S)
    soon = sorted(window_s - age for age in busy_lease_ages_s if age < window_s)
    if not soon:
        return waiters, math.inf
    return max(0, waiters - len(soon)), soon[0]
