"""The callback relay: takes due callbacks from the dispatcher, renders and sends each, reports the outcome.

The dispatcher keeps what is due and when (in memory in embedded mode, in Redis in scale-out mode, where
every API process runs a relay and a claim in Redis makes exactly one of them send each attempt). The
relay keeps at most `callback_concurrency` attempts in flight, each bounded in time by the sender.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import Any

from api.callback_http import CallbackSender
from pool.background import TaskOwner
from pool.dispatch import Dispatcher
from pool.model.callback_rules import CallbackPolicy
from pool.model.errors import BackendUnavailable
from pool.model.tasks import DueCallback, TaskView
from pool.settings import Settings

log = logging.getLogger(__name__)

WAIT_S = 5.0  # the longest one wait for due callbacks blocks (a blocking pop or an event, not a poll)
BACKOFF_MAX_S = 5.0

Render = Callable[[TaskView], dict[str, Any]]


class CallbackRelay:
    """Owns the loop that takes due callbacks and the attempts it starts; `close()` ends them all."""

    def __init__(self, dispatcher: Dispatcher, settings: Settings, render: Render,
                 sender: CallbackSender | None = None) -> None:
        self.dispatcher = dispatcher
        self.render = render
        self.concurrency = settings.callback_concurrency
        self.sender = sender or CallbackSender(CallbackPolicy.parse(settings.callback_allow),
                                               settings.callback_secret, settings.callback_attempt_timeout_s)
        self.record_window_s = settings.callback_attempt_timeout_s + 5  # see _record
        self._owner = TaskOwner("callback relay")
        self._in_flight = 0
        self._slot_freed = asyncio.Event()

    async def start(self) -> None:
        self._owner.spawn(self._loop())

    async def close(self) -> None:
        await self._owner.close()
        await self.sender.aclose()

    async def _loop(self) -> None:
        backoff_s = 0.1
        while not self._owner.closing:  # also ends a loop whose cancellation redis-py swallowed
            free = self.concurrency - self._in_flight
            if free <= 0:
                self._slot_freed.clear()
                await self._slot_freed.wait()
                continue
            try:
                due = await self.dispatcher.due_callbacks(free, WAIT_S)
            except BackendUnavailable as exc:
                log.warning("callbacks: %s", exc)
                await asyncio.sleep(backoff_s)
                backoff_s = min(BACKOFF_MAX_S, backoff_s * 2)
                continue
            backoff_s = 0.1
            for item in due:
                self._in_flight += 1
                self._owner.spawn(self._attempt(item))

    async def _attempt(self, due: DueCallback) -> None:
        try:
            body = json.dumps(self.render(due.view), separators=(",", ":")).encode()
            delivered = await self.sender.send(due.url, body, due.task_id, due.attempt)
            await self._record(due, delivered)
        finally:
            self._in_flight -= 1
            self._slot_freed.set()

    async def _record(self, due: DueCallback, delivered: bool) -> None:
        """Report the attempt, retrying while Redis is away (a restart) for as long as the claim holds.

        Found by the chaos soak: an attempt delivered while Redis restarted was not recorded, its claim
        lapsed, and the receiver got the callback a second time. The claim's lease (pool/scaleout/
        redis_dispatch.py) is twice the attempt timeout plus 5 s, so even an attempt that took its whole
        timeout leaves this long to report it; past it, another attempt follows (and is numbered so)."""
        deadline_s = asyncio.get_running_loop().time() + self.record_window_s
        backoff_s = 0.1
        while True:
            try:
                await self.dispatcher.callback_finished(due, delivered)
                return
            except BackendUnavailable as exc:
                if self._owner.closing or asyncio.get_running_loop().time() + backoff_s > deadline_s:
                    log.warning("callback of task %s: could not record attempt %d: %s", due.task_id, due.attempt,
                                exc)
                    return
            await asyncio.sleep(backoff_s)
            backoff_s = min(1.0, backoff_s * 2)
