"""Sessions as values (no I/O): what one shows, and why one ends."""

from __future__ import annotations

from dataclasses import dataclass

from pool.model.tiers import Tier

# The runner waits up to 10 s for a session's interpreter to say it is ready; the host a little longer.
OPEN_TIMEOUT_S = 15.0
# The runner gives an interrupted call a second to stop before it ends the session (runner_image/PROTOCOL.md).
INTERRUPT_GRACE_S = 1.0

# Why a session ended, as its later calls' 404 says it. The runner ends a session in a call for the first
# four (runner_image/PROTOCOL.md); the pool for the others.
TIMED_OUT = "timed out"  # a call did not stop within a second of its interrupt
OUTPUT_LIMIT = "output limit exceeded"  # likewise, interrupted past its output cap
MEMORY_EXCEEDED = "memory exceeded"
INTERPRETER_EXITED = "interpreter exited"
IDLE_TIMEOUT = "idle timeout"
DELETED = "deleted"
DRAINED = "drained"
SANDBOX_ERROR = "sandbox error"  # its container or runner broke
WORKER_LOST = "worker lost"  # scale-out: the worker holding it stopped beating
WORKER_STOPPED = "worker stopped"  # scale-out: the worker holding it shut down
SHUTDOWN = "shutdown"


@dataclass(frozen=True)
class SessionInfo:
    """One live session, as its owner (and the admin view) sees it."""

    session_id: str
    owner: str
    tier: Tier
    image: str
    idle_timeout_s: float
    busy: bool  # a call is running
    created_unix: float
    idle_s: float  # since its last call ended (0 while busy)
    calls: int
    worker: str  # the pool instance holding its container
    container: str

    @property
    def expires_in_s(self) -> float | None:
        """Seconds until the idle timeout closes it (None while a call runs)."""
        return None if self.busy else max(0.0, self.idle_timeout_s - self.idle_s)


@dataclass(frozen=True)
class SessionFigures:
    """What /metrics exports about sessions: open ones per tier, ended ones by reason since start."""

    open_by_tier: tuple[tuple[str, int], ...] = ()
    ended_by_reason: tuple[tuple[str, int], ...] = ()
