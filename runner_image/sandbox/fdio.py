"""Plain reads and writes on file descriptors, shared by PID 1 and the task child."""

import os
from collections.abc import Callable

from runner_image.sandbox.config import READ_CHUNK


def write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def read_pipe(fd: int, take: Callable[[bytes], bool], drain: bool) -> bool:
    """Read a chunk, or with `drain` chunks until the pipe is empty or `take(chunk)` says False. False at EOF."""
    while True:
        try:
            chunk = os.read(fd, READ_CHUNK)
        except BlockingIOError:
            return True
        if not chunk:
            return False
        if not take(chunk) or not drain:
            return True


def read_status(fd: int) -> bytes:
    """What a child wrote on a pipe so far (a few bytes; a daemon of the task may still hold the write end,
    so never wait for EOF)."""
    os.set_blocking(fd, False)
    try:
        return os.read(fd, 64)
    except BlockingIOError:
        return b""
