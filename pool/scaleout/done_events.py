"""Scale-out long polls: one pub/sub subscription per API process wakes whoever waits for a task to end.

Workers publish an async task's id on {p}:done as they store its outcome (`_FINALIZE`). Each API process
keeps one subscription (a connection blocked reading, not a poll) and sets the events of its local
waiters. A waiter registers before it reads the task's state, so an end published in between is not
missed; after the subscription is lost and made again, every waiter is woken to read the state again,
since an end published meanwhile was not heard.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator

import redis.asyncio as aioredis
import redis.exceptions

log = logging.getLogger(__name__)

READ_BLOCK_S = 30.0  # a read waits this long before it looks again (a silent peer is noticed by then)
BACKOFF_MAX_S = 2.0


class DoneEvents:
    """Local waiters by task id, woken by the {p}:done channel; `run()` is the subscription loop."""

    def __init__(self, client: aioredis.Redis, channel: str) -> None:
        self.client = client
        self.channel = channel
        self._waiters: dict[str, set[asyncio.Event]] = {}

    @contextlib.contextmanager
    def waiting(self, task_id: str) -> Iterator[asyncio.Event]:
        """An event set when the task ends (or when the subscription was lost and its ends may be missed)."""
        event = asyncio.Event()
        self._waiters.setdefault(task_id, set()).add(event)
        try:
            yield event
        finally:
            waiters = self._waiters.get(task_id)
            if waiters is not None:
                waiters.discard(event)
                if not waiters:
                    del self._waiters[task_id]

    def _wake(self, task_id: str) -> None:
        for event in self._waiters.get(task_id, ()):
            event.set()

    def _wake_all(self) -> None:
        for waiters in self._waiters.values():
            for event in waiters:
                event.set()

    async def run(self, stopped: Callable[[], bool]) -> None:
        """Subscribe and wake waiters until cancelled, or until `stopped()` (its owner's closing flag: redis-py
        may swallow a cancellation, see TaskOwner.close)."""
        backoff_s = 0.1
        while not stopped():
            pubsub = self.client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.channel)
                self._wake_all()  # ends published before (re)subscribing were not heard: look again
                backoff_s = 0.1
                while not stopped():
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=READ_BLOCK_S)
                    if message is not None and message.get("type") == "message":
                        self._wake(str(message["data"]))
            except (redis.exceptions.RedisError, OSError) as exc:
                log.info("task-end subscription lost (%s); subscribing again", exc)
                self._wake_all()
                await asyncio.sleep(backoff_s)
                backoff_s = min(BACKOFF_MAX_S, backoff_s * 2)
            finally:
                with contextlib.suppress(redis.exceptions.RedisError, OSError):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]  # redis-py leaves it unannotated
