"""`Client`: the blocking client (httpx). `warmpool.client.aio.AsyncClient` is the same API for asyncio."""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import httpx
from httpx_sse import EventSource

from warmpool.client import protocol as p
from warmpool.client.errors import ConnectionFailed, NotFound
from warmpool.client.types import ExecuteResult, SessionInfo, StreamEvent, TaskAccepted, TaskPending

DEFAULT_URL = "http://127.0.0.1:8000"  # `warmpool run` and `warmpool mcp` when WARMPOOL_URL is unset
DEFAULT_TIMEOUT_S = 120.0  # past the longest task a server allows by default (60 s) plus queueing


def client_headers(api_key: str | None) -> dict[str, str]:
    headers = {"User-Agent": "warmpool-client/1"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return headers


class Client:
    """A warmpool server at `url` (e.g. http://127.0.0.1:8000), with `api_key` as its bearer token.

    Every call raises a `WarmpoolError` subclass for an HTTP error; 429 and 503 are retried first
    (`max_retries` times, after the server's Retry-After). Use it as a context manager, or `close()` it."""

    def __init__(self, url: str, api_key: str | None = None, *, timeout_s: float = DEFAULT_TIMEOUT_S,
                 max_retries: int = 3, max_retry_wait_s: float = 30.0, transport: httpx.BaseTransport | None = None):
        self.retry = p.RetryPolicy(max_retries=max_retries, max_wait_s=max_retry_wait_s)
        self.http = httpx.Client(base_url=url.rstrip("/"), headers=client_headers(api_key), transport=transport,
                                 timeout=httpx.Timeout(timeout_s, connect=10.0))

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    # tasks -----------------------------------------------------------------------------------------
    def execute(self, code: str, **task: Any) -> ExecuteResult:
        """Run `code` and wait for its result (see `protocol.task_body` for the task's fields)."""
        result: ExecuteResult = self._call(p.execute(p.task_body(code, **task)))
        return result

    def submit(self, code: str, *, callback_url: str | None = None, **task: Any) -> TaskAccepted:
        """Queue `code` to run in the background; `get(id, wait_s=...)` or the callback gives its result."""
        accepted: TaskAccepted = self._call(p.submit(p.task_body(code, callback_url=callback_url, **task)))
        return accepted

    def batch(self, tasks: Sequence[Mapping[str, Any] | str]) -> list[TaskAccepted]:
        """Queue several tasks at once (all or none); each is code, or a dict of `task_body`'s arguments."""
        bodies = [p.task_body(t) if isinstance(t, str) else p.task_body(**t) for t in tasks]
        accepted: list[TaskAccepted] = self._call(p.batch(bodies))
        return accepted

    def get(self, task_id: str, wait_s: float | None = None) -> ExecuteResult | TaskPending:
        """An async task's result, or its pending state; `wait_s` (up to 30) waits for the end that long."""
        state: ExecuteResult | TaskPending = self._call(p.get(task_id, wait_s))
        return state

    def wait(self, task_id: str, timeout_s: float | None = None) -> ExecuteResult:
        """Long-poll until the task ends (or `timeout_s` passes: ConnectionFailed)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            left_s = 30.0 if deadline is None else min(30.0, deadline - time.monotonic())
            if left_s <= 0:
                raise ConnectionFailed(f"task {task_id} did not end within {timeout_s} s")
            state = self.get(task_id, wait_s=left_s)
            if isinstance(state, ExecuteResult):
                return state

    def stream(self, code: str, **task: Any) -> Iterator[StreamEvent]:
        """Run `code`, yielding its stdout and stderr as they arrive, then its result (a server that does
        not stream answers the whole result: its output comes as events all at once)."""
        yield from self._events("POST", "/v1/execute", p.task_body(code, **task))

    def events(self, task_id: str) -> Iterator[StreamEvent]:
        """An async task's output as it arrives, then its result (GET /v1/tasks/{id}/events)."""
        yield from self._events("GET", f"/v1/tasks/{task_id}/events", None)

    # sessions --------------------------------------------------------------------------------------
    @contextmanager
    def session(self, resources: Mapping[str, Any] | None = None, *, image: str | None = None,
                idle_timeout_s: float | None = None) -> Iterator[Session]:
        """A session (one container kept for you): its `execute` keeps variables, imports and files."""
        info: SessionInfo = self._call(p.open_session(resources, image, idle_timeout_s))
        session = Session(self, info)
        try:
            yield session
        finally:
            session.close()

    # catalogue -------------------------------------------------------------------------------------
    def tiers(self) -> list[dict[str, Any]]:
        listed: list[dict[str, Any]] = self._call(p.listing("/v1/tiers"))
        return listed

    def images(self) -> list[dict[str, Any]]:
        listed: list[dict[str, Any]] = self._call(p.listing("/v1/images"))
        return listed

    # transport -------------------------------------------------------------------------------------
    def _call(self, call: p.Call) -> Any:
        response = self._send(call.method, call.path, call.json, call.params, call.headers)
        return call.parse(response)

    def _send(self, method: str, path: str, body: Any, params: dict[str, Any] | None,
              headers: dict[str, str]) -> httpx.Response:
        retries = 0
        while True:
            try:
                response = self.http.request(method, path, json=body, params=params, headers=headers)
            except httpx.TransportError as exc:
                raise ConnectionFailed(f"{method} {path}: {exc or type(exc).__name__}") from exc
            delay_s = self.retry.delay_s(response, retries)
            if delay_s is None:
                p.check(response)
                return response
            retries += 1
            time.sleep(delay_s)

    def _events(self, method: str, path: str, body: Any) -> Iterator[StreamEvent]:
        headers = {"Accept": f"{p.SSE_TYPE}, application/json"}
        retries = 0
        while True:
            try:
                with self.http.stream(method, path, json=body, headers=headers) as response:
                    delay_s = self.retry.delay_s(response, retries)
                    if delay_s is None:
                        if response.status_code >= 400 or not p.is_stream(response):
                            response.read()
                            p.check(response)
                            yield from p.events_of_result(ExecuteResult.from_json(response.json()))
                            return
                        for sse in EventSource(response).iter_sse():
                            yield p.event_of(sse.event, sse.data)
                        return
            except httpx.TransportError as exc:
                raise ConnectionFailed(f"{method} {path}: {exc or type(exc).__name__}") from exc
            retries += 1
            time.sleep(delay_s)


class Session(p.SessionBase):
    """An open session; `execute` and `stream` run code in its container, which keeps state between calls."""

    client: Client

    def execute(self, code: str, **task: Any) -> ExecuteResult:
        result: ExecuteResult = self.client._call(p.execute(p.task_body(code, **task), self._path("/execute")))
        return result

    def stream(self, code: str, **task: Any) -> Iterator[StreamEvent]:
        yield from self.client._events("POST", self._path("/execute"), p.task_body(code, **task))

    def refresh(self) -> SessionInfo:
        self.info = self.client._call(p.session_info(self.id))
        return self.info

    def close(self) -> None:
        """End the session (its container is reset or replaced); closing an ended session is fine."""
        if self.closed:
            return
        self.closed = True
        try:
            self.client._call(p.close_session(self.id))
        except NotFound:
            pass

