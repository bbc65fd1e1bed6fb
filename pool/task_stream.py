"""A task's output as it comes, for streaming: stdout and stderr chunks in order, then how the task ended.

One `TaskStream` per streamed task, written by whoever runs the task (the pool's output callback, or the
Redis reader in scale-out mode) and read by any number of followers, each from the start. The writer never
waits for a reader: a slow reader falls behind and later reads what it missed merged into fewer chunks, a
reader that went away costs nothing, and the log is bounded by the task's output caps (the runner streams
only bytes within them, and chunks that no reader has reached yet are merged in place).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

from pool.model.errors import PoolError
from pool.model.tasks import Execution

STREAMS = ("stdout", "stderr")


@dataclass(frozen=True)
class Chunk:
    """Some of what the task wrote on one stream."""

    stream: str
    text: str


class _Run:
    """Consecutive text of one stream, kept as parts so that merging never copies what came before."""

    __slots__ = ("stream", "parts")

    def __init__(self, stream: str, text: str) -> None:
        self.stream = stream
        self.parts = [text]


class TaskStream:
    """What a task has written so far, and, once known, how it ended (its Execution, or the PoolError that
    kept it from running or finishing)."""

    def __init__(self, task_id: str) -> None:
        self.task_id = task_id
        self._runs: list[_Run] = []
        self._reached = 0  # how many runs the furthest reader has taken; runs from there on may still grow
        self._end: Execution | PoolError | None = None
        self._changed = asyncio.Event()

    @property
    def ended(self) -> bool:
        return self._end is not None

    def write(self, stream: str, text: str) -> None:
        """Append a chunk (never blocks, and never after the end)."""
        if self._end is not None or not text or stream not in STREAMS:
            return
        if self._runs and self._runs[-1].stream == stream and len(self._runs) > self._reached:
            self._runs[-1].parts.append(text)
        else:
            self._runs.append(_Run(stream, text))
        self._wake()

    def end(self, outcome: Execution | PoolError) -> None:
        if self._end is None:
            self._end = outcome
            self._wake()

    def _wake(self) -> None:
        # Every reader waits on the event of its moment: set it, and start a fresh one for the next change.
        self._changed.set()
        self._changed = asyncio.Event()

    async def follow(self, keepalive_s: float) -> AsyncIterator[Chunk | Execution | PoolError | None]:
        """Chunks from the start (what came while the reader was away, merged), then the end; None after
        `keepalive_s` without anything new, so that the caller can keep its connection alive."""
        taken = 0
        while True:
            if taken < len(self._runs):
                runs, taken = self._runs[taken:], len(self._runs)
                self._reached = max(self._reached, taken)
                for run in runs:
                    yield Chunk(run.stream, "".join(run.parts))
                continue
            if self._end is not None:
                yield self._end
                return
            changed = self._changed
            try:
                await asyncio.wait_for(changed.wait(), keepalive_s)
            except TimeoutError:
                yield None
