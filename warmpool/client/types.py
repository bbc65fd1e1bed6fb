"""Typed answers of the warmpool API (frozen dataclasses); each keeps the raw JSON in `raw` as well."""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

END_STATUSES = ("succeeded", "failed", "timed_out", "memory_exceeded", "output_limit_exceeded", "sandbox_error")


@dataclass(frozen=True)
class OutputFile:
    """A file the task left that matched `outputs` (or a figure): `content` is None past the server's cap."""

    path: str
    size_bytes: int
    content: bytes | None

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> OutputFile:
        raw = body.get("content")
        if raw is None:
            content = None
        elif body.get("encoding", "base64") == "base64":
            content = base64.b64decode(raw)
        else:
            content = str(raw).encode()
        return cls(path=str(body["path"]), size_bytes=int(body.get("size_bytes", len(content or b""))),
                   content=content)

    def save(self, directory: str | Path) -> Path:
        """Write it under `directory` at its relative path; a path that would leave it is refused."""
        relative = PurePosixPath(self.path)
        if relative.is_absolute() or ".." in relative.parts or not relative.parts:
            raise ValueError(f"refusing to write {self.path!r} outside {directory}")
        if self.content is None:
            raise ValueError(f"{self.path}: its content was not returned (past the server's cap)")
        target = Path(directory, *relative.parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(self.content)
        return target


@dataclass(frozen=True)
class ExecuteResult:
    """A task's result, as `POST /v1/execute` (and a finished async task) answers it."""

    id: str
    status: str
    exit_code: int | None
    stdout: str
    stderr: str
    tier: str = ""
    image: str = ""
    message: str = ""
    worker: str = ""
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    files: tuple[OutputFile, ...] = ()
    files_truncated: bool = False
    resources: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def ok(self) -> bool:
        return self.status == "succeeded"

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> ExecuteResult:
        return cls(id=str(body.get("id", "")), status=str(body["status"]), exit_code=body.get("exit_code"),
                   stdout=str(body.get("stdout", "")), stderr=str(body.get("stderr", "")),
                   tier=str(body.get("tier", "")), image=str(body.get("image", "")),
                   message=str(body.get("message", "")), worker=str(body.get("worker", "")),
                   stdout_truncated=bool(body.get("stdout_truncated")),
                   stderr_truncated=bool(body.get("stderr_truncated")),
                   files=tuple(OutputFile.from_json(f) for f in body.get("files") or ()),
                   files_truncated=bool(body.get("files_truncated")), resources=dict(body.get("resources") or {}),
                   timings=dict(body.get("timings") or {}), raw=body)


@dataclass(frozen=True)
class TaskPending:
    """An async task not ended yet: `queued` or `running`."""

    id: str
    status: str


@dataclass(frozen=True)
class TaskAccepted:
    """An async task the server queued; `link` is where its state and result are."""

    id: str
    status: str
    link: str

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> TaskAccepted:
        return cls(id=str(body["id"]), status=str(body["status"]), link=str(body["link"]))


def task_state(body: dict[str, Any]) -> ExecuteResult | TaskPending:
    """`GET /v1/tasks/{id}`: the result once the task ended, else its pending state."""
    if body.get("status") in END_STATUSES:
        return ExecuteResult.from_json(body)
    return TaskPending(id=str(body["id"]), status=str(body["status"]))


@dataclass(frozen=True)
class StreamEvent:
    """One event of a streamed task: `stdout` or `stderr` (with `text`), then `result` (with `result`)."""

    kind: str
    text: str = ""
    result: ExecuteResult | None = None


@dataclass(frozen=True)
class SessionInfo:
    """A session as `POST /v1/sessions` and `GET /v1/sessions/{id}` describe it."""

    id: str
    tier: str
    image: str
    idle_timeout_s: float
    resources: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> SessionInfo:
        return cls(id=str(body["id"]), tier=str(body.get("tier", "")), image=str(body.get("image", "")),
                   idle_timeout_s=float(body.get("idle_timeout_s") or 0), resources=dict(body.get("resources") or {}),
                   raw=body)
