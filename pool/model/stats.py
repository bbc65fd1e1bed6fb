"""Plain accumulators the pool keeps about itself (pure: no I/O, no Prometheus).

The pool counts; `api/metrics.py` translates these into Prometheus families at scrape time, so the
engine has no metrics library in its hot path and several pools in one process never share state.
"""

from __future__ import annotations

import bisect
import collections
from dataclasses import dataclass, field

from pool.model.snapshots import HistogramSnapshot

# Upper bounds in seconds, Prometheus-style (an implicit +Inf bucket follows the last one).
LEASE_WAIT_BOUNDS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
RUN_TIME_BOUNDS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclass
class Histogram:
    """Cumulative-since-start observation counts per bucket, with their sum (seconds)."""

    bounds_s: tuple[float, ...]
    counts: list[int] = field(default_factory=list)  # one per bound, plus the +Inf bucket; not cumulative
    sum_s: float = 0.0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.bounds_s) + 1)

    def observe(self, value_s: float) -> None:
        self.counts[bisect.bisect_left(self.bounds_s, value_s)] += 1
        self.sum_s += value_s

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[str, int]]:
        """``[(le, count), ..., ("+Inf", total)]`` as Prometheus exposes buckets."""
        out, running = [], 0
        for bound, n in zip((*(f"{b:g}" for b in self.bounds_s), "+Inf"), self.counts, strict=True):
            running += n
            out.append((bound, running))
        return out

    def snapshot(self) -> HistogramSnapshot:
        return HistogramSnapshot(buckets=tuple(self.cumulative()), sum_s=self.sum_s)


class WaitSamples:
    """Lease waits: a recent window for percentiles plus a cumulative histogram; `append` feeds both."""

    def __init__(self, window: int = 2048) -> None:
        self.recent_ms: collections.deque[float] = collections.deque(maxlen=window)
        self.histogram = Histogram(LEASE_WAIT_BOUNDS_S)

    def append(self, wait_ms: float) -> None:
        self.recent_ms.append(wait_ms)
        self.histogram.observe(wait_ms / 1000)

    def __len__(self) -> int:
        return len(self.recent_ms)

    def percentile_ms(self, fraction: float) -> float:
        """The `fraction` quantile of the recent window (nearest rank); 0 when nothing was observed."""
        if not self.recent_ms:
            return 0.0
        ordered = sorted(self.recent_ms)
        return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


@dataclass
class RunTimes:
    """Task run time histograms keyed by the task's status."""

    by_status: dict[str, Histogram] = field(default_factory=dict)

    def observe(self, status: str, run_s: float) -> None:
        histogram = self.by_status.get(status)
        if histogram is None:
            histogram = self.by_status[status] = Histogram(RUN_TIME_BOUNDS_S)
        histogram.observe(run_s)

    def snapshot(self) -> tuple[tuple[str, HistogramSnapshot], ...]:
        return tuple((status, h.snapshot()) for status, h in sorted(self.by_status.items()))
