"""Server-sent events for streamed tasks (DESIGN.md 1b): `stdout` and `stderr` events as the task writes,
then one `result` event whose data is the body the plain call returns.

The response only follows the task's `TaskStream`; the task itself runs in the dispatcher's hands. So a
client that reads slowly never holds the task, its container or the runner back (it reads merged chunks
later), and one that goes away does not stop the task: its response just ends.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import Request
from fastapi.sse import KEEPALIVE_COMMENT, EventSourceResponse, format_sse_event

from pool.dispatch import Chunk, TaskStream
from pool.model.errors import PoolError
from pool.model.tasks import Execution

KEEPALIVE_S = 15.0  # a comment line this often while the task is silent, so that proxies keep the connection
# No caching, and no buffering by a proxy in front of us (nginx honours X-Accel-Buffering).
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

# Turns how the task ended into the JSON body the plain call would have answered.
BodyOf = Callable[[Execution | PoolError], Awaitable[dict[str, Any]]]


def wants_stream(request: Request) -> bool:
    """True when the Accept header asks for text/event-stream (with a q above 0)."""
    for item in request.headers.get("accept", "").split(","):
        media, *params = (part.strip().lower() for part in item.split(";"))
        if media == "text/event-stream":
            quality = next((p[2:] for p in params if p.startswith("q=")), "1")
            try:
                return float(quality) > 0
            except ValueError:
                return True
    return False


def event(name: str, data: dict[str, Any]) -> bytes:
    # ASCII escapes: a task's output may hold lone surrogates, which have no UTF-8 form.
    return format_sse_event(event=name, data_str=json.dumps(data, separators=(",", ":")))


def stream_response(stream: TaskStream, body_of: BodyOf) -> EventSourceResponse:
    """The task's output as it comes, then its result."""
    async def events() -> AsyncIterator[bytes]:
        async for item in stream.follow(KEEPALIVE_S):
            if item is None:
                yield KEEPALIVE_COMMENT
            elif isinstance(item, Chunk):
                yield event(item.stream, {"text": item.text})
            else:
                yield event("result", await body_of(item))

    return EventSourceResponse(events(), headers=HEADERS)


def result_response(body: dict[str, Any]) -> EventSourceResponse:
    """A task that has ended already: its result alone."""
    async def events() -> AsyncIterator[bytes]:
        yield event("result", body)

    return EventSourceResponse(events(), headers=HEADERS)
