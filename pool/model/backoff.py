"""Exponential backoff (pure): how long to wait after each consecutive failure."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Backoff:
    """`first_s` after the first failure, twice as long after each further one, never more than `max_s`;
    `reset()` after a success."""

    first_s: float = 0.1
    max_s: float = 2.0
    failures: int = 0  # consecutive, since the last reset

    def next_s(self) -> float:
        """Count a failure; the wait before the next try."""
        delay_s = min(self.max_s, self.first_s * 2.0 ** min(self.failures, 64))  # a long outage must not overflow
        self.failures += 1
        return delay_s

    def reset(self) -> None:
        self.failures = 0

    @property
    def failing(self) -> bool:
        return self.failures > 0
