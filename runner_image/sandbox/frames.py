"""The frame channel to the host (PID 1 only): 4-byte big-endian length, then one JSON object.

The channel's write end is set once by start-up (`open_channel`), after it has moved the channel off fds
0 and 1 so that nothing printed by accident can corrupt it."""

import json
import struct
import sys
from typing import Any, BinaryIO

from runner_image.sandbox.fdio import write_all

MAX_FRAME_BYTES = 64 << 20

_out_fd = -1  # the frame channel's write end, set by open_channel()


class ProtocolError(Exception):
    """A frame the runner cannot act on; answered with an `error` frame."""


def open_channel(out_fd: int) -> None:
    global _out_fd
    _out_fd = out_fd


def read_frame(reader: BinaryIO) -> dict[str, Any] | None:
    """The next request as a dict, or None at EOF."""
    header = reader.read(4)
    if len(header) < 4:
        return None
    (size,) = struct.unpack(">I", header)
    if size > MAX_FRAME_BYTES:  # no frame boundary left to trust: say so and stop
        send({"op": "error", "id": None, "detail": f"frame of {size} bytes exceeds {MAX_FRAME_BYTES}"})
        sys.exit(1)
    body = reader.read(size)
    if len(body) < size:
        return None
    try:
        msg = json.loads(body)
    except ValueError as exc:  # invalid UTF-8 too
        raise ProtocolError(f"bad JSON: {exc}") from None
    if not isinstance(msg, dict):
        raise ProtocolError("a frame must hold a JSON object")
    return msg


def send(frame: dict[str, Any]) -> None:
    """Write one frame. A result's files (their content base64 bytes, up to the output files cap) are
    spliced in piece by piece rather than copied into one string, so that PID 1, whose memory counts
    against the container's, holds their encoded bytes once."""
    files: list[dict[str, Any]] | None = frame.pop("files", None)
    pieces = [json.dumps(frame).encode()]  # ASCII-only, hence always valid UTF-8
    if files is not None:
        pieces = [pieces[0][:-1], b', "files": [']
        for index, entry in enumerate(files):
            content: bytes | None = entry.pop("content")
            pieces.append((b", " if index else b"") + json.dumps(entry).encode()[:-1] + b', "content": ')
            pieces += [b'"', content, b'"}'] if content is not None else [b"null}"]  # base64 needs no escapes
        pieces.append(b"]}")
    write_all(_out_fd, struct.pack(">I", sum(map(len, pieces))))
    for piece in pieces:
        write_all(_out_fd, piece)
