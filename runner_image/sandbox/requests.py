"""A request frame's fields, checked (PID 1): the wrong type or a missing field is a ProtocolError that
names it, and nothing runs."""

import binascii
import math
from typing import Any, NamedTuple

from runner_image.sandbox import taskfiles
from runner_image.sandbox.config import DEFAULT_OUTPUT_FILES_BYTES
from runner_image.sandbox.frames import ProtocolError


class Task(NamedTuple):
    id: str
    code: str
    stdin: str
    timeout_s: float
    output_limit: int
    fsize_limit: int
    nofile_limit: int
    nproc_limit: int
    stream: bool = False
    files: list[tuple[bytes, bytes]] = []
    outputs: list[str] = []
    files_limit: int = DEFAULT_OUTPUT_FILES_BYTES


def field(msg: dict[str, Any], name: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
    """A request field of the given type (never a bool where a number is wanted), else ProtocolError."""
    value = msg.get(name, default)
    if kind is bool:
        if not isinstance(value, bool):
            raise ProtocolError(f"{msg.get('op')}: {name} is not a boolean")
    elif not isinstance(value, kind) or isinstance(value, bool):
        raise ProtocolError(f"{msg.get('op')}: {name} is missing or not a {getattr(kind, '__name__', 'number')}")
    return value


def parse_timeout(msg: dict[str, Any]) -> float:
    timeout_s = float(field(msg, "timeout_s", (int, float)))
    if not 0 < timeout_s < math.inf:
        raise ProtocolError(f"{msg.get('op')}: timeout_s must be positive and finite")
    return timeout_s


def parse_limits(msg: dict[str, Any], names: tuple[str, ...]) -> list[int]:
    limits: list[int] = [field(msg, name, int) for name in names]
    limits.append(field(msg, "nproc_limit", int, 0))  # optional: 0 leaves RLIMIT_NPROC alone
    if min(limits) < 0:
        raise ProtocolError(f"{msg.get('op')}: limits must not be negative")
    return limits


def parse_task(msg: dict[str, Any], msg_id: str) -> Task:
    timeout_s = parse_timeout(msg)
    output_limit, fsize_limit, nofile_limit, nproc_limit = parse_limits(
        msg, ("output_limit_bytes", "fsize_limit_bytes", "nofile_limit"))
    files, outputs, files_limit = parse_file_fields(msg)
    return Task(msg_id, field(msg, "code", str), field(msg, "stdin", str, ""), timeout_s, output_limit, fsize_limit,
                nofile_limit, nproc_limit, stream=field(msg, "stream", bool, False),
                files=files, outputs=outputs, files_limit=files_limit)


def parse_file_fields(msg: dict[str, Any]) -> tuple[list[tuple[bytes, bytes]], list[str], int]:
    """A `run` or `session_run` frame's (files, outputs, max_output_files_bytes), checked."""
    op = msg.get("op")
    files_limit: int = field(msg, "max_output_files_bytes", int, DEFAULT_OUTPUT_FILES_BYTES)
    if files_limit < 0:
        raise ProtocolError(f"{op}: max_output_files_bytes must not be negative")
    outputs: list[Any] = field(msg, "outputs", list, [])
    if not all(isinstance(pattern, str) for pattern in outputs):
        raise ProtocolError(f"{op}: outputs must be a list of strings")
    return parse_files(field(msg, "files", list, []), op), outputs, files_limit


def parse_files(entries: list[Any], op: object = "run") -> list[tuple[bytes, bytes]]:
    """The request's files as [(path bytes, content bytes)]: each `content` (base64) is decoded and dropped
    from the frame as it goes, so that PID 1 holds one copy of the files and the frame's text, not two."""
    files = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str) \
                or not isinstance(entry.get("content"), str):
            raise ProtocolError(f"{op}: files[{index}] must hold a string path and base64 content")
        try:
            path = taskfiles.checked_path(entry["path"])
            files.append((path, binascii.a2b_base64(entry.pop("content"), strict_mode=True)))
        except (ValueError, binascii.Error) as exc:
            raise ProtocolError(f"{op}: files[{index}]: {exc}") from None
    return files
