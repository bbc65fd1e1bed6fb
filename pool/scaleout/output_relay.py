"""Streamed output across Redis: a worker writes a task's chunks to a stream of its own, `{p}:out:{task id}`,
and the API that follows the task reads them into the task's `TaskStream`.

Entries are `{"k": kind, "t": text}`, kind one of `start` (the worker sends the code now), `stdout`,
`stderr`, `end` (nothing more will come). The stream is capped (MAXLEN ~, far above what capped and
coalesced output needs) and expires: while the task may run, after the result TTL; once ended, after
OUT_LINGER_MS, enough for a late follower to read the tail. On the worker the relay never makes the task
wait: `write` only queues, and one flusher sends what gathered since its last round trip as one pipeline
(consecutive chunks of a stream merged), so a chatty task costs few round trips. If Redis fails, chunks
are dropped (the result still carries all the output) and the follower ends with the task's answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import cast

import redis.asyncio as aioredis

from pool.model.errors import BackendUnavailable, PoolError, SandboxError
from pool.model.tasks import Execution
from pool.scaleout.redis_io import redis_errors
from pool.task_stream import TaskStream

log = logging.getLogger(__name__)

OUT_MAX_ENTRIES = 10_000
OUT_LINGER_MS = 30_000
CLOSE_WAIT_S = 5.0  # how long a finished task waits for its last chunks to reach Redis
FOLLOW_BLOCK_S = 1.0  # a follower's XREAD block; between blocks it looks at whether the task has ended
START, END = "start", "end"


class OutputRelay:
    """One task's output on its way from a worker to Redis."""

    def __init__(self, client: aioredis.Redis, key: str, ttl_ms: int) -> None:
        self.client = client
        self.key = key
        self.ttl_ms = ttl_ms
        self._pending: list[list[str]] = []  # [kind, text] in order; same-stream neighbours merged
        self._wake = asyncio.Event()
        self._closing = False
        self._failed = False
        self._flusher = asyncio.get_running_loop().create_task(self._flush_loop())

    def start(self) -> None:
        self._queue(START, "")

    def write(self, stream: str, text: str) -> None:
        if self._pending and self._pending[-1][0] == stream:
            self._pending[-1][1] += text
            return
        self._queue(stream, text)

    async def close(self) -> None:
        """Send what is left and the end marker (waiting at most CLOSE_WAIT_S), then stop."""
        self._queue(END, "")
        self._closing = True
        try:
            await asyncio.wait_for(asyncio.shield(self._flusher), CLOSE_WAIT_S)
        except TimeoutError:
            log.warning("output of %s: Redis too slow, its last chunks are dropped", self.key)
        finally:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher

    def _queue(self, kind: str, text: str) -> None:
        self._pending.append([kind, text])
        self._wake.set()

    async def _flush_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            batch, self._pending = self._pending, []
            if batch and not self._failed:
                await self._send(batch)
            if self._closing and not self._pending:
                return

    async def _send(self, batch: list[list[str]]) -> None:
        ended = batch[-1][0] == END
        try:
            with redis_errors("relay a task's output"):
                async with self.client.pipeline(transaction=False) as pipe:
                    for kind, text in batch:
                        pipe.xadd(self.key, {"k": kind, "t": text}, maxlen=OUT_MAX_ENTRIES, approximate=True)
                    pipe.pexpire(self.key, OUT_LINGER_MS if ended else self.ttl_ms)
                    await pipe.execute()
        except BackendUnavailable as exc:
            self._failed = True  # the rest would fail too; the result still carries all the output
            log.warning("output of %s is not streamed: %s", self.key, exc)


async def read_output(client: aioredis.Redis, key: str, last_id: str,
                      block_s: float | None) -> tuple[str, list[tuple[str, str]]]:
    """Entries after `last_id` (waiting up to `block_s` for one; None: not at all): (new last id, [(kind, text)])."""
    with redis_errors("read a task's output"):
        reply = await client.xread({key: last_id}, count=1000,
                                   block=None if block_s is None else int(block_s * 1000))
    entries: list[tuple[str, str]] = []
    for _key, rows in cast(list[tuple[str, list[tuple[str, dict[str, str]]]]], reply or []):
        for entry_id, fields in rows:
            last_id = entry_id
            entries.append((fields.get("k", ""), fields.get("t", "")))
    return last_id, entries


async def follow(client: aioredis.Redis, key: str, stream: TaskStream, answer: asyncio.Task[Execution],
                 started: asyncio.Future[None] | None = None) -> None:
    """Feed `stream` from the task's output in Redis until its end marker has been read and its answer is
    known (`answer`: the task's Execution, or the PoolError that kept it from running or finishing), then
    end the stream with that answer. `started` resolves at the worker's start marker (or takes the answer's
    error if the task never started). Without an end marker (Redis lost it), the answer ends it anyway.
    """
    last_id, seen_end = "0-0", False
    while not seen_end:
        try:
            last_id, entries = await read_output(client, key, last_id, None if answer.done() else FOLLOW_BLOCK_S)
        except BackendUnavailable:
            entries = []
            await asyncio.sleep(0.2)
        for kind, text in entries:
            if kind == START:
                if started is not None and not started.done():
                    started.set_result(None)
            elif kind == END:
                seen_end = True
            else:
                stream.write(kind, text)
        if answer.done() and not entries:
            break
    try:
        outcome: Execution | PoolError = await asyncio.shield(answer)
    except PoolError as exc:
        outcome = exc
    except Exception as exc:  # noqa: BLE001 - a bug: still end the stream with an answer
        log.exception("following %s failed", key)
        outcome = SandboxError(f"internal error: {exc!r}")
    if started is not None and not started.done():
        if isinstance(outcome, PoolError):
            started.set_exception(outcome)
        else:
            started.set_result(None)
    stream.end(outcome)
