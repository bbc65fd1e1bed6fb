"""The go pipe: how PID 1 hands a task (or a session's call) to the child waiting for it, and nothing
else ever does. A length (8 bytes), then the message, marshalled; for a task, each file's bytes follow.

PID 1 compiles the code itself when it is small (`precompile`); the child reads the message (`receive`)."""

import marshal
import os
import struct
from types import CodeType
from typing import Any

# Compiling in the forked child costs ~2 ms of page faults (the compiler writes all over pages shared
# with PID 1), several times the rest of a small task; so PID 1 compiles code up to this size itself.
# Compiling runs nothing; larger code still compiles in the child, under the task's deadline and limits.
PARENT_COMPILE_MAX_CHARS = 64 << 10
LENGTH = struct.Struct(">Q")


def encode(message: tuple[Any, ...]) -> bytes:
    """A go message, length first: a task's (code, code object or None, stdin bytes, timeout_s, fsize_limit,
    nofile_limit, nproc_limit, outputs, files_limit, [(file path, size)]), a session's (None, fsize_limit,
    nofile_limit, nproc_limit), or a session call's (nonce, code, code object or None, stdin bytes,
    filename, outputs, files_limit, [(file path, size)]); the files' bytes follow a task's or a call's."""
    body = marshal.dumps(message)
    return LENGTH.pack(len(body)) + body


def precompile(code: str, filename: str = "<task>") -> CodeType | None:
    """The task's code object, or None to let the child compile it (large code, or code that does not
    compile: the child then raises the error and reports it exactly as the interpreter would)."""
    if len(code) > PARENT_COMPILE_MAX_CHARS:
        return None
    try:
        return compile(code, filename, "exec")
    except BaseException:
        return None


def read_exactly(fd: int, size: int) -> bytes:
    """`size` bytes from the go pipe (in the child). EOF first means PID 1 gave up on us: leave quietly."""
    chunks = bytearray()
    while len(chunks) < size:
        chunk = os.read(fd, min(size - len(chunks), 1 << 20))
        if not chunk:
            os._exit(0)
        chunks += chunk
    return bytes(chunks)


def receive(fd: int) -> tuple[Any, ...]:
    """The next go message (in the child); a task's files follow it, read by taskfiles.write_files."""
    (size,) = LENGTH.unpack(read_exactly(fd, LENGTH.size))
    message: tuple[Any, ...] = marshal.loads(read_exactly(fd, size))
    return message
