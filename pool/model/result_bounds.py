"""The bound on async tasks held in memory (pure bookkeeping; embedded mode; Redis mirrors it in Lua).

An async task is held from its submission until its result expires (result TTL) or is evicted, and
counts, against its key and in total, as one task and as bytes:

- while pending (queued or running): its code, stdin and files plus the most its output can take
  (`pending_bytes`: twice the output limit, stdout and stderr; the output files cap as base64 when it asks
  for `outputs`; and a fixed overhead). Figures, which come without asking, are counted when it finishes;
- once finished: what its result really holds (`result_bytes`: stdout, stderr, message, files, overhead).

The rule:

- per key, tasks: a submission that would take the key past `max_tasks_per_key` tasks (pending or kept)
  is refused: Overloaded, 429 with Retry-After (when the key's oldest kept result expires; else
  `pending_retry_s`, the longest a pending task may take);
- per key, bytes: room is made by evicting the key's own oldest finished results while it would pass
  `max_result_bytes_per_key`; if its pending tasks alone would pass it, the submission is refused (429);
- in total: room is made by evicting the oldest finished results of any key while the total would pass
  `max_results` or `max_result_bytes`; if pending tasks alone would pass it, refused (429).

A result that finishes bigger than its reservation (it can be, by the text's in-memory width) evicts the
oldest others past the total. An evicted task's GET answers 404 saying it was evicted.
"""

from __future__ import annotations

import math
import sys
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from pool.model.errors import Overloaded
from pool.model.results import TaskResult, TaskSpec

# What a held task costs beyond its text: its record, ids, timings, the dict entries that index it.
RECORD_OVERHEAD_BYTES = 2048


def pending_bytes(spec: TaskSpec) -> int:
    """What a queued or running task may come to hold: its inputs now, and at most its output later.

    Characters, not in-memory width, so that one task of the largest allowed code and stdin always fits
    the bounds (`largest_task_bytes`); a result is then counted at its real width when it finishes."""
    files = sum(len(f.path) + len(f.content) for f in spec.files)
    outputs = base64_size(spec.max_output_files_bytes) if spec.outputs else 0
    return len(spec.code) + len(spec.stdin) + files + 2 * spec.output_limit_bytes + outputs + RECORD_OVERHEAD_BYTES


def base64_size(size_bytes: int) -> int:
    return -(-size_bytes // 3) * 4


def largest_task_bytes(max_code_bytes: int, max_stdin_bytes: int, output_limit_bytes: int, max_files_bytes: int = 0,
                       max_output_files_bytes: int = 0) -> int:
    """The most `pending_bytes` can be when code, stdin, files and output are capped so."""
    return (max_code_bytes + max_stdin_bytes + max_files_bytes + 2 * output_limit_bytes
            + base64_size(max_output_files_bytes) + RECORD_OVERHEAD_BYTES)


def result_bytes(result: TaskResult | None) -> int:
    """What a finished task's result holds in memory."""
    if result is None:
        return RECORD_OVERHEAD_BYTES
    files = sum(sys.getsizeof(f.path) + (sys.getsizeof(f.content) if f.content is not None else 0)
                for f in result.files)
    return (sys.getsizeof(result.stdout) + sys.getsizeof(result.stderr) + sys.getsizeof(result.message) + files
            + RECORD_OVERHEAD_BYTES)


@dataclass(frozen=True)
class Bounds:
    max_tasks_per_key: int
    max_result_bytes_per_key: int
    max_results: int
    max_result_bytes: int


def refusal(scope: str, tasks: int, size_bytes: int, bounds: Bounds, retry_after_s: float) -> Overloaded:
    """The 429 for a submission the bound refuses: `scope` is "key" (the key's task count), "key-bytes"
    (the key's pending tasks fill its bytes) or "total" (pending tasks fill the server's bound)."""
    if scope == "key":
        message = (f"this key already holds {tasks} async tasks (pending, or finished and kept; the bound is "
                   f"{bounds.max_tasks_per_key} tasks); retry when its oldest result has expired")
    elif scope == "key-bytes":
        message = (f"this key's pending async tasks already hold {size_bytes} bytes (inputs, and room for their "
                   f"output; the bound is {bounds.max_result_bytes_per_key} bytes); retry when some have finished")
    else:
        message = (f"{tasks} async tasks are held ({size_bytes} bytes), pending ones filling the bound of "
                   f"{bounds.max_results} tasks and {bounds.max_result_bytes} bytes; retry later")
    return Overloaded(message, retry_after_s=retry_after_s)


@dataclass
class _Held:
    owner: str
    size_bytes: int
    expires_at: float = math.inf  # set when finished


@dataclass
class _Usage:
    tasks: int = 0
    size_bytes: int = 0
    pending_tasks: int = 0  # of which pending (their bytes are reservations; they cannot be evicted)
    pending_bytes: int = 0


class ResultBook:
    """Who holds what: per key and in total, pending and finished, with the oldest finished first."""

    def __init__(self, bounds: Bounds) -> None:
        self.bounds = bounds
        self._held: dict[str, _Held] = {}
        self._finished: OrderedDict[str, None] = OrderedDict()  # finish order = expiry order (one TTL)
        self._finished_of: dict[str, OrderedDict[str, None]] = {}  # the same, per owner
        self._by_owner: dict[str, _Usage] = {}
        self.total = _Usage()

    def usage(self, owner: str) -> _Usage:
        return self._by_owner.get(owner, _Usage())

    def admit_many(self, tasks: Sequence[tuple[str, int]], owner: str, now: float,
                   pending_retry_s: float) -> list[str]:
        """Hold new pending tasks (id, bytes) of one owner, all or none (Overloaded); returns evicted ids."""
        self._check_room(owner, len(tasks), sum(size for _, size in tasks), now, pending_retry_s)
        evicted: list[str] = []
        for task_id, size_bytes in tasks:
            evicted += self.admit(task_id, owner, size_bytes, now, pending_retry_s)
        return evicted

    def _check_room(self, owner: str, count: int, size_bytes: int, now: float, pending_retry_s: float) -> None:
        """Raise Overloaded unless `count` more pending tasks of `size_bytes` in all fit (maybe by evicting)."""
        mine = self.usage(owner)
        if mine.tasks + count > self.bounds.max_tasks_per_key:
            raise refusal("key", mine.tasks, mine.size_bytes, self.bounds,
                          self._oldest_expiry_of(owner, now, pending_retry_s))
        # Refused before anything is evicted: only finished results can make room, so when pending tasks
        # alone would pass a bound, evicting would lose results and still refuse.
        if mine.pending_bytes + size_bytes > self.bounds.max_result_bytes_per_key:
            raise refusal("key-bytes", mine.tasks, mine.pending_bytes, self.bounds, pending_retry_s)
        total = self.total
        if total.pending_tasks + count > self.bounds.max_results or \
                total.pending_bytes + size_bytes > self.bounds.max_result_bytes:
            raise refusal("total", total.pending_tasks, total.pending_bytes, self.bounds, pending_retry_s)

    def admit(self, task_id: str, owner: str, size_bytes: int, now: float, pending_retry_s: float) -> list[str]:
        """Hold a new pending task, or raise Overloaded; returns the ids evicted to make room for it."""
        self._check_room(owner, 1, size_bytes, now, pending_retry_s)
        mine, total = self.usage(owner), self.total
        evicted = []
        while mine.size_bytes + size_bytes > self.bounds.max_result_bytes_per_key:
            evicted.append(self._evict(next(iter(self._finished_of[owner]))))
        while total.tasks + 1 > self.bounds.max_results or total.size_bytes + size_bytes > self.bounds.max_result_bytes:
            evicted.append(self._evict(next(iter(self._finished))))
        self._held[task_id] = _Held(owner=owner, size_bytes=size_bytes)
        self._add(owner, 1, size_bytes, pending=True)
        return evicted

    def finish(self, task_id: str, size_bytes: int, expires_at: float) -> list[str]:
        """A held task finished with a result of `size_bytes`; returns ids evicted for its excess."""
        held = self._held.get(task_id)
        if held is None:
            return []
        self._add(held.owner, -1, -held.size_bytes, pending=True)
        self._add(held.owner, 1, size_bytes, pending=False)
        held.size_bytes, held.expires_at = size_bytes, expires_at
        self._finished[task_id] = None
        self._finished_of.setdefault(held.owner, OrderedDict())[task_id] = None
        evicted = []
        while self.total.size_bytes > self.bounds.max_result_bytes and next(iter(self._finished)) != task_id:
            evicted.append(self._evict(next(iter(self._finished))))
        return evicted

    def expire(self, now: float) -> list[str]:
        """Release every finished result whose time is up; returns their ids."""
        gone = []
        while self._finished:
            task_id = next(iter(self._finished))
            if self._held[task_id].expires_at > now:
                break
            gone.append(task_id)
            self.release(task_id)
        return gone

    def release(self, task_id: str) -> None:
        held = self._held.pop(task_id, None)
        if held is None:
            return
        self._finished.pop(task_id, None)
        mine = self._finished_of.get(held.owner)
        if mine is not None:
            mine.pop(task_id, None)
            if not mine:
                del self._finished_of[held.owner]
        self._add(held.owner, -1, -held.size_bytes, pending=held.expires_at == math.inf)

    def _evict(self, task_id: str) -> str:
        self.release(task_id)
        return task_id

    def _add(self, owner: str, tasks: int, size_bytes: int, *, pending: bool) -> None:
        mine = self._by_owner.setdefault(owner, _Usage())
        for usage in (mine, self.total):
            usage.tasks += tasks
            usage.size_bytes += size_bytes
            if pending:
                usage.pending_tasks += tasks
                usage.pending_bytes += size_bytes
        if mine.tasks == 0:
            del self._by_owner[owner]

    def _oldest_expiry_of(self, owner: str, now: float, otherwise_s: float) -> float:
        mine = self._finished_of.get(owner)
        if not mine:
            return otherwise_s
        return max(1.0, self._held[next(iter(mine))].expires_at - now)
