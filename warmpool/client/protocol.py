"""What the sync and async clients share (no I/O): request bodies, calls, answers, retries, stream events.

Each API operation is a `Call`: method, path, body or query, and how to read a success. The clients only
send calls (with retries) and hand back what `parse` made of the answer.
"""

from __future__ import annotations

import base64
import email.utils
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from warmpool.client.errors import error_for
from warmpool.client.types import ExecuteResult, SessionInfo, StreamEvent, TaskAccepted, task_state

SSE_TYPE = "text/event-stream"
FileSpec = Mapping[str, str | bytes] | Sequence[Mapping[str, Any]]


@dataclass(frozen=True)
class Call:
    method: str
    path: str
    parse: Callable[[httpx.Response], Any]
    json: Any = None
    params: dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)


def task_body(code: str, *, resources: Mapping[str, Any] | None = None, cpu: Any = None, gpu: Any = None,
              ram: Any = None, storage: Any = None, image: str | None = None, timeout_s: float | None = None,
              stdin: str | None = None, files: FileSpec | None = None, outputs: Sequence[str] | None = None,
              **extra: Any) -> dict[str, Any]:
    """A task request: fields left None are left out, so the server's defaults apply.

    `resources` and the cpu/gpu/ram/storage shortcuts merge (the shortcuts win). `files` maps a path in
    the task's working directory to its content (bytes go base64), or is the API's list of entries.
    `extra` carries other request fields as they are (e.g. callback_url, max_wait_ms)."""
    body: dict[str, Any] = {"code": code}
    merged = {**(resources or {}), **{k: v for k, v in (("cpu", cpu), ("gpu", gpu), ("ram", ram),
                                                         ("storage", storage)) if v is not None}}
    if merged:
        body["resources"] = merged
    for name, value in (("image", image), ("timeout_s", timeout_s), ("stdin", stdin)):
        if value is not None:
            body[name] = value
    if files is not None:
        body["files"] = file_entries(files)
    if outputs is not None:
        body["outputs"] = list(outputs)
    body.update({k: v for k, v in extra.items() if v is not None})
    return body


def file_entries(files: FileSpec) -> list[dict[str, Any]]:
    if not isinstance(files, Mapping):
        return [dict(entry) for entry in files]
    entries = []
    for path, content in files.items():
        if isinstance(content, bytes):
            entries.append({"path": path, "content": base64.b64encode(content).decode(), "encoding": "base64"})
        else:
            entries.append({"path": path, "content": content})
    return entries


def _json(response: httpx.Response) -> Any:
    return response.json()


def execute(body: dict[str, Any], path: str = "/v1/execute") -> Call:
    return Call("POST", path, lambda r: ExecuteResult.from_json(r.json()), json=body)


def submit(body: dict[str, Any]) -> Call:
    return Call("POST", "/v1/tasks", lambda r: TaskAccepted.from_json(r.json()), json=body)


def batch(bodies: Sequence[dict[str, Any]]) -> Call:
    return Call("POST", "/v1/tasks/batch", lambda r: [TaskAccepted.from_json(t) for t in r.json()["tasks"]],
                json={"tasks": list(bodies)})


def get(task_id: str, wait_s: float | None) -> Call:
    params = {"wait_s": wait_s} if wait_s else None
    return Call("GET", f"/v1/tasks/{task_id}", lambda r: task_state(r.json()), params=params)


def listing(path: str) -> Call:
    return Call("GET", path, _json)


def open_session(resources: Mapping[str, Any] | None, image: str | None, idle_timeout_s: float | None) -> Call:
    body = {k: v for k, v in (("resources", dict(resources) if resources else None), ("image", image),
                              ("idle_timeout_s", idle_timeout_s)) if v is not None}
    return Call("POST", "/v1/sessions", lambda r: SessionInfo.from_json(r.json()), json=body)


def session_info(session_id: str) -> Call:
    return Call("GET", f"/v1/sessions/{session_id}", lambda r: SessionInfo.from_json(r.json()))


def close_session(session_id: str) -> Call:
    return Call("DELETE", f"/v1/sessions/{session_id}", lambda r: None)


class SessionBase:
    """What a session handle is, sync or async: its client, what the server said of it, and its routes."""

    def __init__(self, client: Any, info: SessionInfo) -> None:
        self.client = client
        self.info = info
        self.closed = False

    @property
    def id(self) -> str:
        return self.info.id

    def _path(self, suffix: str) -> str:
        return f"/v1/sessions/{self.id}{suffix}"


def check(response: httpx.Response) -> None:
    """Raise the WarmpoolError for a non-success answer (its body must have been read)."""
    if response.status_code < 400:
        return
    try:
        detail = response.json().get("detail")
    except (ValueError, AttributeError):
        detail = response.text
    raise error_for(response.status_code, detail, retry_after_s(response))


def retry_after_s(response: httpx.Response) -> float | None:
    """Retry-After as seconds (it may be a number of seconds or an HTTP date); None when absent or garbled."""
    raw = response.headers.get("retry-after")
    if raw is None:
        return None
    try:
        return max(0.0, float(raw))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


@dataclass(frozen=True)
class RetryPolicy:
    """429 and 503 are retried `max_retries` times, after Retry-After (capped) or a doubling backoff."""

    max_retries: int = 3
    max_wait_s: float = 30.0
    backoff_s: float = 0.5

    def delay_s(self, response: httpx.Response, retries_done: int) -> float | None:
        """How long to wait before retrying this answer, or None to give it back to the caller."""
        if response.status_code not in (429, 503) or retries_done >= self.max_retries:
            return None
        asked = retry_after_s(response)
        return min(self.max_wait_s, asked if asked is not None else self.backoff_s * 2 ** retries_done)


def events_of_result(result: ExecuteResult) -> list[StreamEvent]:
    """A server that does not stream answered the whole result: its output as events, then the result."""
    events = [StreamEvent(kind, text) for kind, text in (("stdout", result.stdout), ("stderr", result.stderr)) if text]
    return [*events, StreamEvent("result", result=result)]


def event_of(name: str, data: str) -> StreamEvent:
    """One server-sent event: stdout/stderr carry {"text"}, result carries the result body."""
    try:
        body = json.loads(data) if data else {}
    except ValueError:
        return StreamEvent(name or "message", text=data)
    if name == "result":
        return StreamEvent("result", result=ExecuteResult.from_json(body))
    return StreamEvent(name or "message", text=str(body.get("text", "")) if isinstance(body, dict) else data)


def is_stream(response: httpx.Response) -> bool:
    content_type: str = response.headers.get("content-type", "")
    return content_type.partition(";")[0].strip() == SSE_TYPE
