"""`AsyncClient`: the asyncio client (httpx), with the same methods as `Client`, awaited."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

import httpx
from httpx_sse import EventSource

from warmpool.client import protocol as p
from warmpool.client.errors import ConnectionFailed, NotFound
from warmpool.client.sync import DEFAULT_TIMEOUT_S, client_headers
from warmpool.client.types import ExecuteResult, SessionInfo, StreamEvent, TaskAccepted, TaskPending


class AsyncClient:
    """A warmpool server at `url`, for asyncio code; see `Client` for what each method does."""

    def __init__(self, url: str, api_key: str | None = None, *, timeout_s: float = DEFAULT_TIMEOUT_S,
                 max_retries: int = 3, max_retry_wait_s: float = 30.0,
                 transport: httpx.AsyncBaseTransport | None = None):
        self.retry = p.RetryPolicy(max_retries=max_retries, max_wait_s=max_retry_wait_s)
        self.http = httpx.AsyncClient(base_url=url.rstrip("/"), headers=client_headers(api_key),
                                      transport=transport, timeout=httpx.Timeout(timeout_s, connect=10.0))

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self.http.aclose()

    # tasks -----------------------------------------------------------------------------------------
    async def execute(self, code: str, **task: Any) -> ExecuteResult:
        result: ExecuteResult = await self._call(p.execute(p.task_body(code, **task)))
        return result

    async def submit(self, code: str, *, callback_url: str | None = None, **task: Any) -> TaskAccepted:
        accepted: TaskAccepted = await self._call(p.submit(p.task_body(code, callback_url=callback_url, **task)))
        return accepted

    async def batch(self, tasks: Sequence[Mapping[str, Any] | str]) -> list[TaskAccepted]:
        bodies = [p.task_body(t) if isinstance(t, str) else p.task_body(**t) for t in tasks]
        accepted: list[TaskAccepted] = await self._call(p.batch(bodies))
        return accepted

    async def get(self, task_id: str, wait_s: float | None = None) -> ExecuteResult | TaskPending:
        state: ExecuteResult | TaskPending = await self._call(p.get(task_id, wait_s))
        return state

    async def wait(self, task_id: str, timeout_s: float | None = None) -> ExecuteResult:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            left_s = 30.0 if deadline is None else min(30.0, deadline - time.monotonic())
            if left_s <= 0:
                raise ConnectionFailed(f"task {task_id} did not end within {timeout_s} s")
            state = await self.get(task_id, wait_s=left_s)
            if isinstance(state, ExecuteResult):
                return state

    async def stream(self, code: str, **task: Any) -> AsyncIterator[StreamEvent]:
        async for event in self._events("POST", "/v1/execute", p.task_body(code, **task)):
            yield event

    async def events(self, task_id: str) -> AsyncIterator[StreamEvent]:
        async for event in self._events("GET", f"/v1/tasks/{task_id}/events", None):
            yield event

    # sessions --------------------------------------------------------------------------------------
    @asynccontextmanager
    async def session(self, resources: Mapping[str, Any] | None = None, *, image: str | None = None,
                      idle_timeout_s: float | None = None) -> AsyncIterator[AsyncSession]:
        info: SessionInfo = await self._call(p.open_session(resources, image, idle_timeout_s))
        session = AsyncSession(self, info)
        try:
            yield session
        finally:
            await session.close()

    async def open_session(self, resources: Mapping[str, Any] | None = None, *, image: str | None = None,
                           idle_timeout_s: float | None = None) -> AsyncSession:
        """A session to close yourself (`await session.close()`), for when a `with` block does not fit."""
        return AsyncSession(self, await self._call(p.open_session(resources, image, idle_timeout_s)))

    def attach_session(self, session_id: str) -> AsyncSession:
        """A session opened earlier (by id), to use or close."""
        return AsyncSession(self, SessionInfo(id=session_id, tier="", image="", idle_timeout_s=0))

    # catalogue -------------------------------------------------------------------------------------
    async def tiers(self) -> list[dict[str, Any]]:
        listed: list[dict[str, Any]] = await self._call(p.listing("/v1/tiers"))
        return listed

    async def images(self) -> list[dict[str, Any]]:
        listed: list[dict[str, Any]] = await self._call(p.listing("/v1/images"))
        return listed

    # transport -------------------------------------------------------------------------------------
    async def _call(self, call: p.Call) -> Any:
        return call.parse(await self._send(call.method, call.path, call.json, call.params, call.headers))

    async def _send(self, method: str, path: str, body: Any, params: dict[str, Any] | None,
                    headers: dict[str, str]) -> httpx.Response:
        retries = 0
        while True:
            try:
                response = await self.http.request(method, path, json=body, params=params, headers=headers)
            except httpx.TransportError as exc:
                raise ConnectionFailed(f"{method} {path}: {exc or type(exc).__name__}") from exc
            delay_s = self.retry.delay_s(response, retries)
            if delay_s is None:
                p.check(response)
                return response
            retries += 1
            await asyncio.sleep(delay_s)

    async def _events(self, method: str, path: str, body: Any) -> AsyncIterator[StreamEvent]:
        headers = {"Accept": f"{p.SSE_TYPE}, application/json"}
        retries = 0
        while True:
            try:
                async with self.http.stream(method, path, json=body, headers=headers) as response:
                    delay_s = self.retry.delay_s(response, retries)
                    if delay_s is None:
                        if response.status_code >= 400 or not p.is_stream(response):
                            await response.aread()
                            p.check(response)
                            for event in p.events_of_result(ExecuteResult.from_json(response.json())):
                                yield event
                            return
                        async for sse in EventSource(response).aiter_sse():
                            yield p.event_of(sse.event, sse.data)
                        return
            except httpx.TransportError as exc:
                raise ConnectionFailed(f"{method} {path}: {exc or type(exc).__name__}") from exc
            retries += 1
            await asyncio.sleep(delay_s)


class AsyncSession(p.SessionBase):
    """An open session, for asyncio code; see `Session`."""

    client: AsyncClient

    async def execute(self, code: str, **task: Any) -> ExecuteResult:
        result: ExecuteResult = await self.client._call(p.execute(p.task_body(code, **task), self._path("/execute")))
        return result

    async def stream(self, code: str, **task: Any) -> AsyncIterator[StreamEvent]:
        async for event in self.client._events("POST", self._path("/execute"), p.task_body(code, **task)):
            yield event

    async def refresh(self) -> SessionInfo:
        self.info = await self.client._call(p.session_info(self.id))
        return self.info

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            await self.client._call(p.close_session(self.id))
        except NotFound:
            pass
