"""What a task is and what it gave (frozen dataclasses, no I/O)."""

from __future__ import annotations

import base64
import enum
from dataclasses import dataclass, field, replace
from typing import Any

DEFAULT_OUTPUT_FILES_BYTES = 16 * 1024 * 1024


class Status(enum.StrEnum):
    """How a task ended; every one of them is a result, never an HTTP error."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    MEMORY_EXCEEDED = "memory_exceeded"
    OUTPUT_LIMIT_EXCEEDED = "output_limit_exceeded"
    SANDBOX_ERROR = "sandbox_error"


@dataclass(frozen=True)
class InputFile:
    """A file the task finds in its working directory when its code starts (`path` relative to it)."""

    path: str
    content: bytes


@dataclass(frozen=True)
class OutputFile:
    """A file the task left that its `outputs` matched (or a figure): content base64, None past the cap."""

    path: str
    size_bytes: int
    content: str | None

    def as_dict(self) -> dict[str, Any]:
        return {"path": self.path, "size_bytes": self.size_bytes, "encoding": "base64", "content": self.content}


@dataclass(frozen=True)
class TaskSpec:
    """One snippet to run, with the limits the runner enforces."""

    task_id: str
    code: str
    stdin: str = ""
    timeout_s: float = 10.0
    output_limit_bytes: int = 1024 * 1024
    files: tuple[InputFile, ...] = ()
    outputs: tuple[str, ...] = ()  # globs relative to the working directory
    max_output_files_bytes: int = DEFAULT_OUTPUT_FILES_BYTES

    def run_frame(self, fsize_limit_bytes: int, nofile_limit: int, nproc_limit: int = 0) -> dict[str, Any]:
        return {"op": "run", "id": self.task_id, "code": self.code, "stdin": self.stdin, "timeout_s": self.timeout_s,
                "output_limit_bytes": self.output_limit_bytes, "fsize_limit_bytes": fsize_limit_bytes,
                "nofile_limit": nofile_limit, "nproc_limit": nproc_limit, **self.files_fields()}

    def files_fields(self) -> dict[str, Any]:
        """`max_output_files_bytes`, and `files` (content base64) and `outputs` when there are any: the fields
        a `run` or `session_run` frame (and a session call sent through Redis) carries them in."""
        fields: dict[str, Any] = {"max_output_files_bytes": self.max_output_files_bytes}
        if self.files:
            fields["files"] = [{"path": f.path, "content": base64.b64encode(f.content).decode("ascii")}
                               for f in self.files]
        if self.outputs:
            fields["outputs"] = list(self.outputs)
        return fields

    def with_files_fields(self, fields: dict[str, Any]) -> TaskSpec:
        """This spec with the files, outputs and budget that `files_fields` wrote into `fields`;
        ValueError, KeyError or TypeError when they are malformed."""
        outputs = fields.get("outputs") or []
        if not isinstance(outputs, list) or not all(isinstance(p, str) for p in outputs):
            raise TypeError("outputs must be a list of strings")
        limit = fields.get("max_output_files_bytes", DEFAULT_OUTPUT_FILES_BYTES)
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
            raise ValueError("max_output_files_bytes must be a whole number, not negative")
        return replace(self, files=input_files(fields.get("files") or []), outputs=tuple(outputs),
                       max_output_files_bytes=limit)


def input_files(entries: Any) -> tuple[InputFile, ...]:
    """`files` as `files_fields` wrote them; ValueError (binascii.Error), KeyError or TypeError if malformed."""
    return tuple(InputFile(path=str(f["path"]), content=base64.b64decode(f["content"], validate=True))
                 for f in entries)


@dataclass(frozen=True)
class Usage:
    cpu_s: float = 0.0
    max_rss_bytes: int = 0


@dataclass(frozen=True)
class TaskResult:
    """The outcome of one task as the runner (or the host, for sandbox errors) reported it."""

    task_id: str
    status: Status
    exit_code: int | None = None
    signal: int | None = None
    stdout: str = ""
    stderr: str = ""
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    run_ms: float = 0.0
    usage: Usage = field(default_factory=Usage)
    message: str = ""
    files: tuple[OutputFile, ...] = ()
    files_truncated: bool = False
    session_ended: str | None = None  # a session call only: why the call ended its session, else None

    @classmethod
    def from_frame(cls, frame: dict[str, Any]) -> TaskResult:
        usage = frame.get("usage") or {}
        return cls(
            task_id=str(frame.get("id", "")),
            status=Status(frame["status"]),
            exit_code=frame.get("exit_code"),
            signal=frame.get("signal"),
            stdout=str(frame.get("stdout", "")),
            stderr=str(frame.get("stderr", "")),
            stdout_truncated=bool(frame.get("stdout_truncated", False)),
            stderr_truncated=bool(frame.get("stderr_truncated", False)),
            run_ms=float(frame.get("run_ms", 0.0)),
            usage=Usage(cpu_s=float(usage.get("cpu_s", 0.0)), max_rss_bytes=int(usage.get("max_rss_bytes", 0))),
            files=output_files(frame.get("files") or ()),
            files_truncated=bool(frame.get("files_truncated", False)),
            session_ended=None if frame.get("session_ended") is None else str(frame["session_ended"]),
        )

    @classmethod
    def sandbox_error(cls, task_id: str, message: str) -> TaskResult:
        return cls(task_id=task_id, status=Status.SANDBOX_ERROR, message=message)


def output_files(entries: Any) -> tuple[OutputFile, ...]:
    """Output file entries (a result frame's, or a stored result's) as OutputFiles."""
    return tuple(OutputFile(path=str(e["path"]), size_bytes=int(e["size_bytes"]),
                            content=None if e.get("content") is None else str(e["content"])) for e in entries)
