"""Abuse limits at the HTTP edge: the request body cap (pure ASGI, before any parsing) and per-key rate.

The body cap is a middleware rather than a check in a route because by the time a route runs, FastAPI has
read and parsed the whole body: a 10 MB flood would cost its memory and its JSON parse first.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from fastapi import Depends, HTTPException, Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.auth import require_api_key
from pool.settings import Settings

# After refusing a body that announced itself too large, read and drop at most this much of it, so that an
# ordinary client still reads our 413 instead of a connection reset mid-upload; past it we just close.
DRAIN_CAP_BYTES = 16 * 1024 * 1024


class BodySizeLimit:
    """413 for a request body over `max_body_bytes`: at once on its Content-Length, else while reading it.

    A body that passes is buffered (at most the cap) and replayed to the app, so the app never sees a
    partial body and never starts work on one that will turn out too large."""

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_body_bytes:
            await _too_large(send, self.max_body_bytes)
            await _drain(receive, DRAIN_CAP_BYTES)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away mid-body: nobody to answer
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                await _too_large(send, self.max_body_bytes)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body: bytes | None = b"".join(chunks)

        async def replay() -> Message:
            nonlocal body
            if body is not None:
                message, body = {"type": "http.request", "body": body, "more_body": False}, None
                return message
            return await receive()  # after the body: only http.disconnect is left to wait for

        await self.app(scope, replay, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # the server rejects a malformed length itself
    return None


async def _too_large(send: Send, max_body_bytes: int) -> None:
    body = json.dumps({"detail": f"request body exceeds the {max_body_bytes} byte limit"}).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


async def _drain(receive: Receive, cap_bytes: int) -> None:
    read = 0
    while read <= cap_bytes:
        message = await receive()
        if message["type"] != "http.request":
            return
        read += len(message.get("body", b""))
        if not message.get("more_body", False):
            return


@dataclass
class _Bucket:
    tokens: float
    updated_s: float


class RateLimiter:
    """Token buckets per API key: `rate_per_s` submissions a second on average, `burst` at once.

    Buckets are keyed by a digest of the key (the keys themselves are not kept twice), and only keys that
    passed authentication reach here, so the table is as small as the configured key list. `take` runs on
    the event loop only (require_task_quota is async, so FastAPI never sends it to its thread pool) and
    awaits nothing: no two calls interleave, and the buckets need no lock."""

    def __init__(self, rate_per_s: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate_per_s = rate_per_s
        self.burst = float(burst or max(1, math.ceil(2 * rate_per_s)))
        self._clock = clock
        self._buckets: dict[bytes, _Bucket] = {}

    @property
    def enabled(self) -> bool:
        return self.rate_per_s > 0

    def take(self, key: str) -> float:
        """Spend one token of `key`'s bucket: 0.0 when allowed, else the seconds until one is available."""
        if not self.enabled:
            return 0.0
        now = self._clock()
        digest = hashlib.sha256(key.encode()).digest()
        bucket = self._buckets.setdefault(digest, _Bucket(tokens=self.burst, updated_s=now))
        bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.updated_s) * self.rate_per_s)
        bucket.updated_s = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return 0.0
        return (1.0 - bucket.tokens) / self.rate_per_s


async def require_task_quota(request: Request, key: str = Depends(require_api_key)) -> str:
    """An authenticated caller with a submission left in its rate; else 429 with Retry-After. Async though it
    awaits nothing: a plain `def` dependency would cost a hop to the thread pool per task request, and put
    the buckets in the hands of several threads."""
    limiter: RateLimiter = request.app.state.rate_limiter
    wait_s = limiter.take(key)
    if wait_s > 0:
        raise HTTPException(status_code=429, detail=f"rate limit of {limiter.rate_per_s:g} tasks/s for this key "
                                                    f"exceeded; retry in {wait_s:.2f} s",
                            headers={"Retry-After": str(max(1, math.ceil(wait_s)))})
    return key


def limiter_from(settings: Settings) -> RateLimiter:
    return RateLimiter(settings.rate_limit_per_s, settings.rate_limit_burst)
