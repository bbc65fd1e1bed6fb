"""What a task became: its execution (wherever it ran), and an async task as its submitter sees it (no I/O)."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from pool.model.errors import PoolError
from pool.model.results import TaskResult, TaskSpec
from pool.model.tiers import Tier

# The runner enforces the task's deadline itself; the host waits this much longer before it calls the
# container broken (a runner that cannot answer in time is replaced, and the task is a sandbox_error).
# Scale-out waiters and a stopping worker allow for it too.
RESULT_GRACE_S = 5.0


@dataclass(frozen=True)
class Execution:
    """A task's result with where and how long it waited and ran."""

    result: TaskResult
    tier: Tier
    queue_ms: float
    container_name: str
    worker: str = ""  # the pool instance that ran it (a worker's id in scale-out mode)


class TaskState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"


@dataclass(frozen=True)
class TaskView:
    """An async task as its submitter may see it."""

    task_id: str
    state: TaskState
    tier: Tier
    execution: Execution | None = None
    error: PoolError | None = None  # why it could not run (it did not)
    total_ms: float = 0.0  # from submission to result


@dataclass(frozen=True)
class Submission:
    """One async task to queue: its tier, what to run, and where to POST its result when it ends ("": nowhere)."""

    tier_name: str
    spec: TaskSpec
    callback_url: str = ""


@dataclass(frozen=True)
class DueCallback:
    """A finished task whose result is due at its callback URL; `attempt` counts from 1."""

    task_id: str
    url: str
    view: TaskView
    attempt: int
    age_s: float  # since the task ended (when the first attempt fell due)
