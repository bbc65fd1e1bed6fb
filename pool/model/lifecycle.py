"""What happens to a container after a task, and why (pure: the one place that decides).

A container that ran a task is retired at once when the outcome can leave damage no reset vouches for
(memory exhausted, the sandbox broken); otherwise the runner's verified reset is awaited, and a clean
container is reused unless the pool's policy or the tier's state says it must go. One that never received
code (its task was withdrawn) needs no reset. An idle container is retired when it wears out or dies.
Every removal carries a `RetireReason`: the admin view's `replaced` keys and /metrics' `reason` label.
"""

from __future__ import annotations

import enum
import math
import random
from dataclasses import dataclass

from pool.model.results import Status


class RetireReason(enum.StrEnum):
    """Why the pool removed a container."""

    MEMORY_EXCEEDED = "memory_exceeded"  # its task ran out of memory: the OOM killer may have hit anything
    SANDBOX_ERROR = "sandbox_error"  # its runner broke, died or did not answer in time
    UNCLEAN_RESET = "unclean_reset"  # the reset could not verify a clean container
    RUNNER_LOST = "runner_lost"  # its runner's stream ended (killed from outside, the engine gone)
    CANCELLED = "cancelled"  # its task was cancelled mid-run: what it left is unknown
    COLD_MODE = "cold_mode"  # cold mode uses each container once
    USE_LIMIT = "use_limit"  # it ran the tier's max_uses tasks
    AGE_LIMIT = "age_limit"  # it reached the tier's max_age_s
    DRAINED = "drained"  # an operator drained the tier after it was created
    SCALED_DOWN = "scaled_down"  # the tier holds more than it should (max_size lowered, demand gone)
    SHUTDOWN = "shutdown"  # the pool is closing


class Fate(enum.StrEnum):
    REUSE = "reuse"  # back to the longest waiter, or the idle queue
    RESET = "reset"  # await the runner's verified reset, then decide again
    RETIRE = "retire"


@dataclass(frozen=True)
class Verdict:
    fate: Fate
    reason: RetireReason | None = None  # set when the fate is RETIRE

    @classmethod
    def retire(cls, reason: RetireReason) -> Verdict:
        return cls(Fate.RETIRE, reason)


REUSE = Verdict(Fate.REUSE)
RESET = Verdict(Fate.RESET)


@dataclass(frozen=True)
class ReusePolicy:
    """How long a container may serve: the tier's limits, and whether the pool's mode reuses at all."""

    max_uses: int
    max_age_s: float
    single_use: bool = False  # cold mode: a container per task


# Each container serves its own share of the tier's max_uses and max_age_s, drawn at start from
# [1 - WEAR_SPREAD, 1]. Containers started together and leased in turn (the pool spreads one client's tasks
# over the idle ones) would otherwise reach max_uses together, and all of a tier's first containers reach
# max_age_s in the same second: each replacement costs the host ~0.2-0.3 s of cpu, better spread than
# bunched. The limits stay maxima: a container never serves more than they say.
WEAR_SPREAD = 0.25


def draw_wear_share(rng: random.Random | None = None) -> float:
    return (rng or random).uniform(1 - WEAR_SPREAD, 1.0)


@dataclass(frozen=True)
class ContainerState:
    """What the pool knows of a container when it decides."""

    alive: bool  # its runner's stream is open
    uses: int  # tasks it was sent
    age_s: float
    drained: bool = False  # created before the tier's last drain
    over_max_size: bool = False  # the tier holds more containers than its max_size
    closing: bool = False  # the pool is shutting down
    wear_share: float = 1.0  # the share of the tier's max_uses and max_age_s this container serves


# Outcomes whose damage the reset cannot vouch for: retire without waiting for it.
_UNRESETTABLE = {Status.MEMORY_EXCEEDED: RetireReason.MEMORY_EXCEEDED, Status.SANDBOX_ERROR: RetireReason.SANDBOX_ERROR}


def after_task(policy: ReusePolicy, state: ContainerState, *, status: Status | None,
               reset_clean: bool | None = None) -> Verdict:
    """The fate of a leased container coming back.

    `status` is its task's outcome, None when no code was sent (nothing to reset); `reset_clean` the
    runner's reset verdict once awaited, None before.
    """
    if status is not None:
        if status in _UNRESETTABLE:
            return Verdict.retire(_UNRESETTABLE[status])
        if reset_clean is None:
            return RESET
        if not reset_clean:
            return Verdict.retire(RetireReason.UNCLEAN_RESET)
    if policy.single_use:
        return Verdict.retire(RetireReason.COLD_MODE)
    reason = _worn(policy, state) or _unwanted(state)
    if reason is None and not state.alive:
        reason = RetireReason.RUNNER_LOST
    if reason is None and state.closing:
        reason = RetireReason.SHUTDOWN
    return REUSE if reason is None else Verdict.retire(reason)


def while_idle(policy: ReusePolicy, state: ContainerState) -> RetireReason | None:
    """Why an idle container must go now (worn out, or dead), else None."""
    return _worn(policy, state) or (None if state.alive else RetireReason.RUNNER_LOST)


def _worn(policy: ReusePolicy, state: ContainerState) -> RetireReason | None:
    if state.uses >= max(1, math.ceil(policy.max_uses * state.wear_share)):
        return RetireReason.USE_LIMIT
    if state.age_s >= policy.max_age_s * state.wear_share:
        return RetireReason.AGE_LIMIT
    return None


def _unwanted(state: ContainerState) -> RetireReason | None:
    if state.drained:
        return RetireReason.DRAINED
    if state.over_max_size:
        return RetireReason.SCALED_DOWN
    return None
