"""The soak's mixed load: a few clients, each sending one request at a time, of every kind, from several
keys, until told to stop. Every request (and its answer, or the lack of one) goes into the ledger."""

from __future__ import annotations

import asyncio
import json
import random
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from benchmarks.soak.ledger import RESULT_STATUSES, AsyncTask, Record

# Longer than any answer may take (a task's 10 s default timeout, a lease wait, a worker taken over): a
# request still unanswered past it is a hang, and the ledger counts it so.
CLIENT_TIMEOUT_S = 90.0
ASYNC_DEADLINE_S = 120.0  # an async task still pending this long after its submission is left to the end


def _code(kind: str, nonce: str) -> tuple[str, dict[str, Any], str]:
    """(code, extra request fields, tier) of a task of that kind; it prints its nonce when it succeeds."""
    if kind == "hello":
        return f"print({nonce!r})", {}, "nano"
    if kind == "compute":
        return f"print(sum(i * i for i in range(300_000)), {nonce!r})", {}, "nano"
    if kind == "large_output":
        return f"import sys; sys.stdout.write('x' * 300_000); print({nonce!r})", \
            {"resources": {"ram": "512MiB"}}, "small"
    if kind == "output_flood":
        return "import sys\nfor _ in range(64): sys.stdout.write('y' * 65536)", {}, "nano"
    if kind == "timeout":
        return "import time; time.sleep(30)", {"timeout_s": 1}, "nano"
    if kind == "memory_bomb":
        return "s = 'x' * (400 * 1024 * 1024)", {}, "nano"
    if kind == "stream":
        return f"import time\nprint('a', flush=True)\ntime.sleep(0.2)\nprint({nonce!r}, flush=True)", {}, "nano"
    raise ValueError(kind)


SYNC_KINDS = ("hello", "compute", "large_output", "output_flood", "timeout", "memory_bomb")
WEIGHTS = {"hello": 30, "compute": 10, "large_output": 6, "output_flood": 3, "timeout": 4, "memory_bomb": 3,
           "stream": 8, "session": 6, "async": 12}


@dataclass
class Load:
    """The clients of one soak phase (mode), recording into `records` and `tasks`."""

    url: str
    mode: str
    keys: tuple[str, ...]
    clock: Callable[[], float]
    callback_url: str | None
    records: list[Record] = field(default_factory=list)
    tasks: list[AsyncTask] = field(default_factory=list)
    stopping: asyncio.Event = field(default_factory=asyncio.Event)

    def _record(self, kind: str, key: str, tier: str, nonce: str = "") -> Record:
        record = Record(kind=kind, mode=self.mode, key=key, tier=tier, started_s=self.clock(), nonce=nonce)
        self.records.append(record)
        return record

    def finish(self, record: Record, response: httpx.Response | None, error: str = "",
                body: Any = None) -> None:
        record.ended_s = self.clock()
        if response is None:
            record.error = error
            return
        record.status_code = response.status_code
        record.retry_after = response.headers.get("retry-after")
        if body is not None:
            record.body = body
            return
        try:
            record.body = response.json() if response.content else None
        except json.JSONDecodeError:
            record.body = response.text[:200]

    async def send(self, client: httpx.AsyncClient, record: Record, method: str, path: str,
                   **kwargs: Any) -> httpx.Response | None:
        try:
            response = await client.request(method, path, headers=self._auth(record.key), **kwargs)
        except httpx.HTTPError as exc:
            self.finish(record, None, error=f"{type(exc).__name__}: {exc}")
            return None
        self.finish(record, response)
        return response

    @staticmethod
    def _auth(key: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {key}"}

    async def run(self, clients: int, seed: int) -> None:
        limits = httpx.Limits(max_connections=clients * 2, max_keepalive_connections=clients * 2)
        async with httpx.AsyncClient(base_url=self.url, timeout=CLIENT_TIMEOUT_S, limits=limits) as client:
            async with asyncio.TaskGroup() as group:
                for i in range(clients):
                    group.create_task(self._client(client, random.Random(seed + i)))

    async def _client(self, client: httpx.AsyncClient, rng: random.Random) -> None:
        kinds = list(WEIGHTS)
        weights = [WEIGHTS[k] for k in kinds]
        while not self.stopping.is_set():
            kind = rng.choices(kinds, weights)[0]
            key = rng.choice(self.keys)
            before = len(self.records)
            if kind == "session":
                await self.session(client, key)
            elif kind == "stream":
                await self.stream(client, key)
            elif kind == "async":
                await self.async_task(client, key, rng)
            else:
                await self.sync(client, kind, key)
            await self._back_off(self.records[before:])

    async def _back_off(self, sent: list[Record]) -> None:
        """After a 429 or 503, wait as its Retry-After says (at most 2 s), as a well-behaved client does."""
        refused = [r for r in sent if r.status_code in (429, 503)]
        if refused:
            try:
                wait_s = float(refused[-1].retry_after or 1)
            except ValueError:
                wait_s = 1.0
            await asyncio.sleep(min(2.0, max(0.1, wait_s)))

    async def sync(self, client: httpx.AsyncClient, kind: str, key: str) -> None:
        nonce = secrets.token_hex(6)
        code, extra, tier = _code(kind, nonce)
        record = self._record(kind, key, tier, nonce if kind in ("hello", "compute", "large_output") else "")
        await self.send(client, record, "POST", "/v1/execute", json={"code": code, **extra})

    async def session(self, client: httpx.AsyncClient, key: str) -> None:
        nonce = secrets.token_hex(6)
        opened = self._record("session_open", key, "nano")
        response = await self.send(client, opened, "POST", "/v1/sessions",
                                   json={"resources": {"ram": "128MiB"}, "idle_timeout_s": 60})
        if response is None or response.status_code != 201:
            return
        session_id = response.json()["id"]
        first = self._record("session", key, "nano")
        await self.send(client, first, "POST", f"/v1/sessions/{session_id}/execute",
                        json={"code": f"x = {nonce!r}"})
        second = self._record("session", key, "nano", nonce)
        await self.send(client, second, "POST", f"/v1/sessions/{session_id}/execute", json={"code": "print(x)"})
        if isinstance(second.body, dict) and second.body.get("status") == "sandbox_error":
            second.nonce = ""  # the session broke (a fault): its state may be gone with it
        closed = self._record("session_close", key, "nano")
        await self.send(client, closed, "DELETE", f"/v1/sessions/{session_id}")

    async def stream(self, client: httpx.AsyncClient, key: str) -> None:
        nonce = secrets.token_hex(6)
        code, extra, tier = _code("stream", nonce)
        record = self._record("stream", key, tier, nonce)
        headers = {**self._auth(key), "Accept": "text/event-stream"}
        try:
            async with client.stream("POST", "/v1/execute", json={"code": code, **extra},
                                     headers=headers) as response:
                if response.status_code != 200:
                    await response.aread()
                    self.finish(record, response)
                    return
                result = await _read_result_event(response)
                self.finish(record, response, body=result if result is not None else "no result event")
        except httpx.HTTPError as exc:
            self.finish(record, None, error=f"{type(exc).__name__}: {exc}")

    async def async_task(self, client: httpx.AsyncClient, key: str, rng: random.Random) -> None:
        nonce = secrets.token_hex(6)
        record = self._record("async_submit", key, "nano")
        body: dict[str, Any] = {"code": f"import time; time.sleep(0.3); print({nonce!r})"}
        wants_callback = self.callback_url is not None and rng.random() < 0.5
        if wants_callback:
            body["callback_url"] = self.callback_url
        response = await self.send(client, record, "POST", "/v1/tasks", json=body)
        if response is None or response.status_code != 202:
            return
        task = AsyncTask(task_id=response.json()["id"], mode=self.mode, key=key, tier="nano", nonce=nonce,
                         submitted_s=record.started_s, callback_wanted=wants_callback)
        record.task_id = task.task_id
        self.tasks.append(task)
        await self.follow(client, task, deadline_s=time.monotonic() + ASYNC_DEADLINE_S)
        others = [k for k in self.keys if k != key]
        probe = await client.get(f"/v1/tasks/{task.task_id}", headers=self._auth(rng.choice(others)))
        task.other_key_status = probe.status_code

    async def follow(self, client: httpx.AsyncClient, task: AsyncTask, deadline_s: float) -> None:
        """Long polls until the task ends (or the deadline); the last answer is its final body."""
        while time.monotonic() < deadline_s:
            record = self._record("async_poll", task.key, task.tier)
            response = await self.send(client, record, "GET", f"/v1/tasks/{task.task_id}",
                                       params={"wait_s": 10})
            if response is None:
                await asyncio.sleep(1)
                continue
            if response.status_code == 200:
                task.final = response.json()
                if task.final.get("status") in RESULT_STATUSES:
                    # The poll's answer is the task's result: judged as one (its nonce included).
                    record.kind, record.nonce = "async", task.nonce
                    return
            else:
                task.final = {"status": f"http {response.status_code}"}
                if response.status_code not in (429, 503):
                    return
                await asyncio.sleep(1)


async def _read_result_event(response: httpx.Response) -> Any:
    event = ""
    async for line in response.aiter_lines():
        if line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:") and event == "result":
            return json.loads(line[5:].strip())
    return None
