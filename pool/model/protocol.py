"""Byte-level framing (pure): runner frames, and Docker's multiplexed attach stream.

Runner frames are a 4-byte big-endian length and that many bytes of UTF-8 JSON. Docker multiplexes a
non-tty container's output as 8-byte headers (stream type, 3 zero bytes, 4-byte big-endian size) each
followed by its payload; only stream 1 (stdout) carries frames.
"""

from __future__ import annotations

import json
import struct
from typing import Any

MAX_FRAME_BYTES = 64 * 1024 * 1024
_LENGTH = struct.Struct(">I")
_DOCKER_HEADER = struct.Struct(">BxxxI")
STDOUT_STREAM = 1


class ProtocolError(Exception):
    """The byte stream broke the framing rules; the container must be replaced."""


def encode_frame(message: dict[str, Any]) -> bytes:
    text = json.dumps(message, separators=(",", ":"), ensure_ascii=False)
    try:
        payload = text.encode()
    except UnicodeEncodeError:
        # A lone surrogate (JSON lets a client send \udc80 in stdin) has no UTF-8 form: ASCII escapes
        # carry it, and the runner decides what it becomes. Rare, so the common path stays the fast one.
        payload = json.dumps(message, separators=(",", ":"), ensure_ascii=True).encode()
    return _LENGTH.pack(len(payload)) + payload


class FrameDecoder:
    """Turns Docker attach bytes into runner messages, however the bytes are split."""

    def __init__(self, max_frame_bytes: int = MAX_FRAME_BYTES) -> None:
        self._raw = bytearray()      # Docker's multiplexed bytes not yet demuxed
        self._stdout = bytearray()   # the runner's stdout, not yet a whole frame
        self._max_frame_bytes = max_frame_bytes

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        self._raw += data
        self._demux()
        return self._frames()

    def _demux(self) -> None:
        raw = self._raw
        offset = 0
        while len(raw) - offset >= _DOCKER_HEADER.size:
            stream, size = _DOCKER_HEADER.unpack_from(raw, offset)
            if stream not in (0, 1, 2):
                raise ProtocolError(f"unknown docker stream type {stream}")
            end = offset + _DOCKER_HEADER.size + size
            if len(raw) < end:
                break
            if stream == STDOUT_STREAM:
                self._stdout += raw[offset + _DOCKER_HEADER.size:end]
            offset = end
        del raw[:offset]

    def _frames(self) -> list[dict[str, Any]]:
        frames: list[dict[str, Any]] = []
        buf = self._stdout
        offset = 0
        while len(buf) - offset >= _LENGTH.size:
            (size,) = _LENGTH.unpack_from(buf, offset)
            if size > self._max_frame_bytes:
                raise ProtocolError(f"frame of {size} bytes exceeds the {self._max_frame_bytes} byte cap")
            end = offset + _LENGTH.size + size
            if len(buf) < end:
                break
            try:
                message = json.loads(bytes(buf[offset + _LENGTH.size:end]))
            except ValueError as exc:
                raise ProtocolError(f"runner sent a frame that is not JSON: {exc}") from None
            if not isinstance(message, dict):
                raise ProtocolError("runner sent a frame that is not a JSON object")
            frames.append(message)
            offset = end
        del buf[:offset]
        return frames
