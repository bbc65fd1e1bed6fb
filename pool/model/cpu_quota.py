"""A tier's cpu share as a CFS quota and period (pure: no I/O).

Docker's `--cpus` fixes the period at 100 ms. The quota is a share of time either way, but the period is
how long a sandbox that spent its quota waits before it runs again: up to 50 ms on a 0.5-cpu tier at
100 ms. The runner's own reset and pre-fork after each task count against the same quota, so that stall
landed on the next task (issue 15: p99 44 ms against p50 3 ms). A shorter period keeps the share exact
over every period (never more cpu than the tier asked for) and bounds the stall to period x (1 - cpu).
"""

from __future__ import annotations

import math

# The kernel's bounds of cpu.cfs_period_us and the smallest cpu.cfs_quota_us it takes (Docker checks the same).
MIN_PERIOD_US = 1_000
MAX_PERIOD_US = 1_000_000
MIN_QUOTA_US = 1_000
# Measured in benchmarks/breakdown.py (see benchmarks/RESULTS.md, "Where the time goes").
DEFAULT_PERIOD_US = 100_000


def cfs_quota(cpu: float, period_us: int) -> tuple[int, int]:
    """(period_us, quota_us) for a share of `cpu` cpus: the period asked for, lengthened only where the
    quota would fall below the kernel's 1 ms minimum (a tier of under 0.1 cpu at a 10 ms period)."""
    if not MIN_PERIOD_US <= period_us <= MAX_PERIOD_US:
        raise ValueError(f"period_us must be between {MIN_PERIOD_US} and {MAX_PERIOD_US}, got {period_us}")
    if cpu <= 0:
        raise ValueError(f"cpu must be positive, got {cpu}")
    period_us = min(MAX_PERIOD_US, max(period_us, math.ceil(MIN_QUOTA_US / cpu)))
    return period_us, max(MIN_QUOTA_US, round(cpu * period_us))


# What a short task costs its sandbox in cpu, most of it the runner's own work after the answer (the reset,
# the exits of the child and the intermediate, the fork of the next child): 3-6 ms for print('hello') on
# the python image (benchmarks/breakdown.py, "sandbox cgroups"; perf_sandbox.py), ~14 ms on datascience.
# WARMPOOL_REUSE_COOLDOWN_CPU_MS sets it; 0 turns the cooldown off (always the most recent container).
TASK_HOUSEKEEPING_CPU_S = 0.005


def reuse_cooldown_s(cpu: float, housekeeping_cpu_s: float = TASK_HOUSEKEEPING_CPU_S) -> float:
    """How long a container of a `cpu`-cpu tier should rest after a task before it is leased again when
    another idle one has rested longer: the wall time its quota takes to pay for a short task's cpu.

    Always taking the most recently used container (which lets the surplus ones age out) made one client
    ping-pong between two containers of the 0.5-cpu tier, each then using more than its quota within a
    period and stalled for the rest of it (issue 15: 15-21 of 40-50 periods throttled, p99 44 ms)."""
    return housekeeping_cpu_s / cpu if cpu > 0 else 0.0
