"""The per-container channel to the runner: an asyncio protocol over the attached Docker socket.

This is the whole per-task path: a frame written to the socket, frames read back. No Docker API call.
"""

from __future__ import annotations

import asyncio
import collections
import socket
from collections.abc import Callable
from typing import Any, cast

from pool.model.protocol import FrameDecoder, ProtocolError, encode_frame


class ChannelClosed(Exception):
    """The attach stream ended: the container or the runner died, or we closed it."""


class RunnerChannel(asyncio.Protocol):
    """Queues the runner's frames in arrival order; wakes the one waiter."""

    def __init__(self, on_lost: Callable[[str], None]) -> None:
        self._decoder = FrameDecoder()
        self._frames: collections.deque[dict[str, Any]] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._transport: asyncio.Transport | None = None
        self._on_lost = on_lost
        self.lost_reason: str | None = None

    @classmethod
    async def open(cls, sock: socket.socket, on_lost: Callable[[str], None]) -> RunnerChannel:
        loop = asyncio.get_running_loop()
        _, protocol = await loop.create_connection(lambda: cls(on_lost), sock=sock)
        return protocol

    # asyncio.Protocol callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses

    def data_received(self, data: bytes) -> None:
        try:
            self._frames.extend(self._decoder.feed(data))
        except ProtocolError as exc:
            self._lose(f"protocol error: {exc}")
            return
        if self._frames:
            self._wake()

    def eof_received(self) -> bool:
        self._lose("the attach stream ended (container stopped or runner exited)")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._lose(f"the attach stream broke: {exc}" if exc else "the attach stream closed")

    # our side
    @property
    def alive(self) -> bool:
        return self.lost_reason is None

    def send(self, message: dict[str, Any]) -> None:
        if self._transport is None or not self.alive:
            raise ChannelClosed(self.lost_reason or "not connected")
        self._transport.write(encode_frame(message))

    async def receive(self, timeout_s: float) -> dict[str, Any]:
        """The next frame; ChannelClosed when the stream is gone, TimeoutError past the timeout."""
        if not self._frames and self.alive:
            async with asyncio.timeout(timeout_s):
                while not self._frames and self.alive:  # a large frame arrives in many pieces
                    self._waiter = asyncio.get_running_loop().create_future()
                    try:
                        await self._waiter
                    finally:
                        self._waiter = None
        if self._frames:
            return self._frames.popleft()
        raise ChannelClosed(self.lost_reason or "closed")

    def close(self) -> None:
        if self._transport is not None:
            self._transport.abort()
        self._lose("closed by the pool")

    def _lose(self, reason: str) -> None:
        if self.lost_reason is not None:
            return
        self.lost_reason = reason
        if self._transport is not None:
            self._transport.abort()
        self._wake()
        self._on_lost(reason)

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
