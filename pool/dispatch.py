"""What the API runs tasks through: the in-process pool (embedded mode) or Redis and workers (scale-out).

The HTTP layer talks to one `Dispatcher` and never asks which kind it has. Both kinds answer `execute`
synchronously, keep async tasks (`submit`, then `task`) for the configured TTL, and describe their tiers
and readiness. A task's own failure is data (`Execution.result`); a pool error that kept it from running
(no capacity, a backend down) is raised by `execute` and kept in `TaskView.error` for async tasks.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any, Protocol

from pool.model.results import TaskSpec
from pool.model.sessions import SessionFigures, SessionInfo
from pool.model.snapshots import AdminView, Drained, PoolsSnapshot, Resized, TierSnapshot
from pool.model.tasks import DueCallback, Execution, Submission, TaskView
from pool.settings import Settings
from pool.task_stream import Chunk, TaskStream

__all__ = ["Chunk", "Dispatcher", "TaskStream", "create_dispatcher", "owner_of"]


class Dispatcher(Protocol):
    """Runs tasks somewhere and keeps async ones; the API's only way to the pools.

    Everything it returns is a value (frozen dataclasses), never a live pool object."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def execute(self, tier_name: str, spec: TaskSpec, wait_s: float) -> Execution:
        """Run the task, waiting at most `wait_s` for it to start; raises NoCapacity/BackendUnavailable when
        it could not run."""
        ...

    async def submit(self, tier_name: str, spec: TaskSpec, owner: str, callback_url: str = "") -> None:
        """Queue the task to run in the background; raises Overloaded past the bound."""
        ...

    async def submit_many(self, submissions: Sequence[Submission], owner: str) -> None:
        """Queue every task or none (Overloaded past a tier's bound). Async tasks of a tier are shared
        fairly between owners: each owner with tasks waiting gets a turn in round-robin order."""
        ...

    async def task(self, task_id: str, owner: str, wait_s: float = 0.0) -> TaskView | None:
        """The task if `owner` submitted it and its result has not expired, else None; with `wait_s`, answered
        when it ends or after that long, whichever comes first (without polling)."""
        ...

    async def due_callbacks(self, limit: int, wait_s: float) -> list[DueCallback]:
        """Up to `limit` callback attempts that are due, claimed for this process (no other sends them
        meanwhile); waits at most `wait_s` for one."""
        ...

    async def callback_finished(self, due: DueCallback, delivered: bool) -> None:
        """The outcome of a claimed attempt: forgotten when delivered, else retried later or given up."""
        ...

    async def tiers(self) -> tuple[TierSnapshot, ...]:
        """Each tier with its live container counts (summed over the cluster in scale-out mode)."""
        ...

    async def images(self) -> list[dict[str, Any]]:
        """The images the tiers serve, as GET /v1/images lists them (from their labels)."""
        ...

    async def readiness(self) -> dict[str, bool]:
        """Named checks; the service is ready when every one is True."""
        ...

    async def figures(self) -> PoolsSnapshot | None:
        """What /metrics exports about the pools; None when this process holds none."""
        ...

    # admin: NotSupported where the pools cannot be reached; UnknownTier for a name no tier has
    async def pools(self) -> AdminView:
        """Every tier's sizes, counts and counters, the ledger, the warming policy, and persistence."""
        ...

    async def resize(self, tier_name: str, min_idle: int | None, max_size: int | None) -> Resized:
        """Change a tier's sizes live (InvalidRequest, CapacityError when they do not fit)."""
        ...

    async def drain(self, tier_name: str) -> Drained:
        """Replace the tier's idle containers now and its busy ones when their task ends."""
        ...


    # streaming: a TaskStream is handed back once the task has started (errors before that are raised)
    async def execute_stream(self, tier_name: str, spec: TaskSpec, wait_s: float) -> TaskStream:
        """Start the task as `execute` would, and return its output as it comes, then its end."""
        ...

    async def task_events(self, task_id: str, owner: str) -> TaskStream | TaskView | None:
        """An async task of `owner`'s: its stream while it may still write, else its view (None: unknown)."""
        ...

    # sessions: SessionGone for an unknown, ended or another key's session; SessionBusy during a call
    async def open_session(self, tier_name: str, owner: str, image: str, idle_timeout_s: float,
                           wait_s: float) -> SessionInfo:
        """Lease a container of the tier for a session of `owner`'s (TooManySessions past the key's bound)."""
        ...

    async def session(self, session_id: str, owner: str) -> SessionInfo: ...

    async def session_execute(self, session_id: str, owner: str, spec: TaskSpec) -> Execution:
        """Run a call in the session; it runs to its end even if the caller goes away."""
        ...

    async def session_stream(self, session_id: str, owner: str, spec: TaskSpec) -> TaskStream: ...

    async def delete_session(self, session_id: str, owner: str) -> None: ...

    async def all_sessions(self) -> tuple[SessionInfo, ...]:
        """Every live session (the admin view)."""
        ...

    async def session_figures(self) -> SessionFigures: ...


def owner_of(api_key: str) -> str:
    """A digest naming who submitted a task, so that only the same key can read it back."""
    return hashlib.sha256(api_key.encode()).hexdigest()[:24]


def create_dispatcher(settings: Settings) -> Dispatcher:
    """Scale-out mode when WARMPOOL_REDIS_URL is set, else the embedded pool."""
    if settings.redis_url:
        from pool.scaleout.redis_dispatch import RedisDispatcher

        return RedisDispatcher(settings)
    from pool.engine.docker_backend import DockerBackend
    from pool.engine.embedded import EmbeddedDispatcher
    from pool.engine.scratch import scratch_store

    return EmbeddedDispatcher(settings, DockerBackend(settings.docker_host), scratch_store(settings))
