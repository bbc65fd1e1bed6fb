"""Embedded mode's async tasks: kept in memory for the result TTL, run fairly per key, waited on, called back.

- Holding: within the bounds of pool/model/result_bounds.py (per key: 429; in total: the oldest
  finished results go, and a GET of an evicted one says so).

- Running: each tier runs at most its max_size async tasks at once; the rest wait in a `FairQueue`, so
  owners (API keys) take turns and one key's 100-task batch does not hold back another key's task.
- Waiting: each task has an event set when it ends, so a long poll (`wait_s`) sleeps until then.
- Callbacks: a task that ended with a callback URL is due at once; the API's relay takes due ones
  (`due_callbacks`) and reports each attempt (`callback_finished`), which schedules the retries.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from pool.background import TaskOwner
from pool.engine.manager import PoolManager
from pool.model.callback_rules import next_delay_s
from pool.model.errors import BackendUnavailable, NoCapacity, Overloaded, PoolError, ResultEvicted, SandboxError
from pool.model.fair_queue import FairQueue
from pool.model.result_bounds import ResultBook, pending_bytes, result_bytes
from pool.model.results import TaskSpec
from pool.model.tasks import DueCallback, Execution, Submission, TaskState, TaskView
from pool.settings import Settings
from pool.task_stream import TaskStream

log = logging.getLogger(__name__)

SWEEP_EVERY_S = 1.0
# A task that could not start (the engine away, no container in time) is tried again this often, for up to
# the longest a task may run after its submission: its code was never sent, so running it later keeps it
# at most once, as a task waiting in scale-out mode's backlog waits for a worker.
START_RETRY_S = 1.0


@dataclass
class _Record:
    owner: str
    tier_name: str
    submitted_at: float  # monotonic
    callback_url: str = ""
    state: TaskState = TaskState.QUEUED
    execution: Execution | None = None
    error: PoolError | None = None
    total_ms: float = 0.0
    expires_at: float = field(default=float("inf"))  # monotonic; set when done
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    stream: TaskStream | None = None  # its output for followers (GET /v1/tasks/{id}/events), until it is done


@dataclass(order=True)
class _Due:
    due_at: float  # monotonic
    seq: int
    task_id: str = field(compare=False)
    url: str = field(compare=False)
    view: TaskView = field(compare=False)
    attempt: int = field(compare=False)
    ended_at: float = field(compare=False)  # monotonic


class AsyncTasks:
    """The async tasks of one embedded dispatcher; their runs are spawned on the dispatcher's `TaskOwner`."""

    def __init__(self, settings: Settings, pool: PoolManager, background: TaskOwner) -> None:
        self.settings = settings
        self.pool = pool
        self._background = background
        self._records: dict[str, _Record] = {}
        self._book = ResultBook(settings.result_bounds())
        # Evicted ids (and their owners), so that a GET says why the result is gone; as many as results.
        self._evicted: OrderedDict[str, str] = OrderedDict()
        self._swept_at = 0.0
        self._waiting = {tier.name: FairQueue[tuple[_Record, TaskSpec]]() for tier in settings.tiers}
        self._running = dict.fromkeys(self._waiting, 0)
        self._callbacks: list[_Due] = []
        self._callbacks_changed = asyncio.Event()
        self._attempts: dict[tuple[str, int], _Due] = {}  # attempts handed out, until reported
        self._seq = itertools.count()
        self._closing = False

    def stop_starting(self) -> None:
        """At shutdown: start no more tasks (those running are cancelled by the dispatcher's owner)."""
        self._closing = True

    # submitting and running ----------------------------------------------------------------------
    def submit_many(self, submissions: Sequence[Submission], owner: str) -> None:
        """Queue them all, or none when a tier's bound would be passed (Overloaded)."""
        self._sweep()
        adding: dict[str, int] = {}
        for submission in submissions:
            adding[submission.tier_name] = adding.get(submission.tier_name, 0) + 1
        for tier_name, count in adding.items():
            pending = sum(1 for r in self._records.values() if r.tier_name == tier_name and r.state != TaskState.DONE)
            if pending + count > self.settings.max_queued:
                raise Overloaded(f"tier {tier_name!r} already has {pending} tasks waiting or running; {count} more "
                                 f"would pass the bound of {self.settings.max_queued}")
        now = time.monotonic()
        self._evict(self._book.admit_many([(s.spec.task_id, pending_bytes(s.spec)) for s in submissions], owner,
                                          now, pending_retry_s=self.settings.max_timeout_s))
        for submission in submissions:
            record = _Record(owner=owner, tier_name=submission.tier_name, submitted_at=now,
                             callback_url=submission.callback_url, stream=TaskStream(submission.spec.task_id))
            self._records[submission.spec.task_id] = record
            self._waiting[submission.tier_name].push(owner, (record, submission.spec))
        for tier_name in adding:
            self._start_waiting(tier_name)

    def _start_waiting(self, tier_name: str) -> None:
        waiting = self._waiting[tier_name]
        while not self._closing and waiting and self._running[tier_name] < self.pool.pools[tier_name].max_size:
            item = waiting.pop()
            assert item is not None
            self._running[tier_name] += 1
            self._background.spawn(self._run(tier_name, *item))

    async def _run(self, tier_name: str, record: _Record, spec: TaskSpec) -> None:
        async def started() -> bool:
            record.state = TaskState.RUNNING
            return True

        assert record.stream is not None
        try:
            record.execution = await self._execute_once_started(tier_name, record, spec, started)
        except PoolError as exc:
            record.error = exc
        except asyncio.CancelledError:
            record.error = SandboxError("the server shut down before the task ended")
            raise
        except Exception as exc:  # a bug, not the task's doing: answer it rather than leave it "running"
            log.exception("async task %s failed inside the pool", spec.task_id)
            record.error = SandboxError(f"internal error: {exc!r}")
        finally:
            self._running[tier_name] -= 1
            self._end(spec.task_id, record)
            self._start_waiting(tier_name)

    async def _execute_once_started(self, tier_name: str, record: _Record, spec: TaskSpec,
                                    started: Callable[[], Awaitable[bool]]) -> Execution:
        """Run it; while it cannot start (BackendUnavailable, NoCapacity before its start gate opened), wait
        and try again until settings.max_timeout_s after its submission."""
        assert record.stream is not None
        while True:
            try:
                return await self.pool.execute(tier_name, spec, start_gate=started, on_output=record.stream.write)
            except (BackendUnavailable, NoCapacity):
                if record.state == TaskState.RUNNING or self._closing or \
                        time.monotonic() - record.submitted_at + START_RETRY_S > self.settings.max_timeout_s:
                    raise
            await asyncio.sleep(START_RETRY_S)

    def _end(self, task_id: str, record: _Record) -> None:
        record.state = TaskState.DONE
        now = time.monotonic()
        record.total_ms = (now - record.submitted_at) * 1000
        record.expires_at = now + self.settings.result_ttl_s
        size = result_bytes(record.execution.result if record.execution else None)
        self._evict(self._book.finish(task_id, size, record.expires_at))
        record.ended.set()
        if record.stream is not None:  # done first, then the stream's end: its followers read the final body
            record.stream.end(record.execution or record.error or SandboxError("no outcome"))
            record.stream = None  # its followers hold it as long as they need it
        if record.callback_url:
            view = self._view(task_id, record)
            self._schedule(_Due(now, next(self._seq), task_id, record.callback_url, view, 1, now))

    def _evict(self, task_ids: list[str]) -> None:
        for task_id in task_ids:
            record = self._records.pop(task_id, None)
            if record is not None:
                self._evicted[task_id] = record.owner
        while len(self._evicted) > self.settings.max_results:
            self._evicted.popitem(last=False)

    # reading -------------------------------------------------------------------------------------
    async def view(self, task_id: str, owner: str, wait_s: float = 0.0) -> TaskView | None:
        """The task as its owner may see it; with `wait_s`, once it has ended or after that long."""
        self._sweep()
        record = self._records.get(task_id)
        if record is None and self._evicted.get(task_id) == owner:
            raise ResultEvicted(f"the result of task {task_id} was evicted before its time: the server keeps at "
                                f"most {self.settings.max_results} results and {self.settings.max_result_bytes} "
                                "bytes of them, oldest out first")
        if record is None or record.owner != owner or record.expires_at <= time.monotonic():
            return None
        if wait_s > 0 and record.state != TaskState.DONE:
            try:
                await asyncio.wait_for(record.ended.wait(), wait_s)
            except TimeoutError:
                pass
        return self._view(task_id, record)

    async def follow(self, task_id: str, owner: str) -> TaskStream | TaskView | None:
        """A running task's output stream for its owner, or (once it ended) its view."""
        record = self._records.get(task_id)
        if record is not None and record.owner == owner and record.stream is not None:
            return record.stream
        return await self.view(task_id, owner)

    def _view(self, task_id: str, record: _Record) -> TaskView:
        return TaskView(task_id=task_id, state=record.state, tier=self.pool.tiers[record.tier_name],
                        execution=record.execution, error=record.error, total_ms=record.total_ms)

    def _sweep(self) -> None:
        now = time.monotonic()
        if now - self._swept_at < SWEEP_EVERY_S:
            return
        self._swept_at = now
        for task_id in self._book.expire(now):
            self._records.pop(task_id, None)

    def pending(self, tier_name: str) -> int:
        """Tasks of the tier waiting for their turn (not yet running)."""
        return len(self._waiting[tier_name])

    # callbacks -----------------------------------------------------------------------------------
    def _schedule(self, due: _Due) -> None:
        heapq.heappush(self._callbacks, due)
        self._callbacks_changed.set()

    async def due_callbacks(self, limit: int, wait_s: float) -> list[DueCallback]:
        """Up to `limit` callbacks whose attempt is due, waiting at most `wait_s` for the first."""
        deadline = time.monotonic() + wait_s
        while True:
            now = time.monotonic()
            taken: list[DueCallback] = []
            while self._callbacks and self._callbacks[0].due_at <= now and len(taken) < limit:
                due = heapq.heappop(self._callbacks)
                taken.append(DueCallback(task_id=due.task_id, url=due.url, view=due.view, attempt=due.attempt,
                                         age_s=now - due.ended_at))
                self._attempts[due.task_id, due.attempt] = due
            if taken or now >= deadline or limit <= 0:
                return taken
            next_at = min(deadline, self._callbacks[0].due_at if self._callbacks else deadline)
            self._callbacks_changed.clear()
            try:
                await asyncio.wait_for(self._callbacks_changed.wait(), max(0.0, next_at - now))
            except TimeoutError:
                pass

    def callback_finished(self, due: DueCallback, delivered: bool) -> None:
        """Record an attempt's outcome: done when delivered, else retried with backoff within the window."""
        entry = self._attempts.pop((due.task_id, due.attempt), None)
        if entry is None or delivered:
            return
        now = time.monotonic()
        delay_s = next_delay_s(due.attempt, now - entry.ended_at, self.settings.callback_retry_s)
        if delay_s is None:
            log.warning("callback of task %s to %s given up after %d attempt(s)", due.task_id, due.url, due.attempt)
            return
        self._schedule(_Due(now + delay_s, next(self._seq), due.task_id, due.url, due.view, due.attempt + 1,
                            entry.ended_at))
