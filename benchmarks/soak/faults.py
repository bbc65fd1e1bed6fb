"""The fault injector: one fault at a time, at random bounded intervals, every kind in turn (shuffled), each
bounded in time and size. Containers are chosen only among those labelled with one of this soak's own
instance ids, on the soak's own engine."""

from __future__ import annotations

import asyncio
import json
import os
import random
import secrets
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx

from benchmarks.soak.balloon import GIB
from benchmarks.soak.ledger import Fault, Record
from benchmarks.soak.load import CLIENT_TIMEOUT_S, Load
from benchmarks.soak.stack import Engine, Stack

EMBEDDED_KINDS = ("kill_container", "kill_busy", "pause_container", "rm_busy", "dockerd_restart",
                  "malformed_burst", "memory_balloon")
SCALEOUT_KINDS = (*EMBEDDED_KINDS, "worker_sigkill", "worker_sigstop", "redis_restart")
ALL_TIERS = ("nano", "small")
BALLOON_TARGET_BYTES = 3 * GIB
BALLOON_FLOOR_BYTES = 4 * GIB  # never leave the machine less than this available
BALLOON_HOLD_S = 12.0


@dataclass
class Injector:
    engine: Engine
    stack: Stack
    load: Load
    clock: Callable[[], float]
    rng: random.Random
    gap_s: tuple[float, float] = (6.0, 14.0)
    faults: list[Fault] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # faults that could not be fired (none to pick, ...)
    engine_restarts_s: list[tuple[float, float]] = field(default_factory=list)  # (stopped, answering again)

    async def run(self, kinds: tuple[str, ...]) -> None:
        turn: list[str] = []
        while not self.load.stopping.is_set():
            try:
                await asyncio.wait_for(self.load.stopping.wait(), self.rng.uniform(*self.gap_s))
                return
            except TimeoutError:
                pass
            if not turn:
                turn = list(kinds)
                self.rng.shuffle(turn)
            kind = turn.pop()
            try:
                await getattr(self, kind)()
            except Exception as exc:  # noqa: BLE001 - a fault that failed to fire is reported, not fatal
                self.errors.append(f"{self.load.mode} {kind}: {type(exc).__name__}: {exc}")

    def _fired(self, kind: str, tiers: tuple[str, ...] = ALL_TIERS, detail: str = "") -> None:
        self.faults.append(Fault(kind, self.load.mode, self.clock(), tiers, detail))

    async def _docker(self, *args: str) -> str:
        return await asyncio.to_thread(self.engine.docker, *args)

    async def _hit_one(self, kind: str, command: str) -> tuple[str, str]:
        """`docker <command>` on a random running container of this soak's own; (its id, its tier)."""
        out = await self._docker("ps", "--filter", "label=warmpool.pool", "--format",
                                 '{{.ID}} {{.Label "warmpool.instance"}} {{.Label "warmpool.tier"}}')
        rows = [line.split() for line in out.splitlines() if line.strip()]
        ours = [(row[0], row[2]) for row in rows if len(row) == 3 and row[1] in self.stack.instance_ids]
        if not ours:
            raise RuntimeError(f"no container to {command}")
        container, tier = self.rng.choice(ours)
        await self._docker(command, container)
        self._fired(kind, (tier,), container)
        return container, tier

    async def kill_container(self) -> None:
        await self._hit_one("kill_container", "kill")

    async def pause_container(self) -> None:
        container, _ = await self._hit_one("pause_container", "pause")
        await asyncio.sleep(self.rng.uniform(2, 6))
        try:
            await self._docker("unpause", container)
        except RuntimeError:
            pass  # replaced meanwhile

    async def kill_busy(self) -> None:
        await self._busy("kill_busy", "kill")

    async def rm_busy(self) -> None:
        await self._busy("rm_busy", "rm", "-f")

    async def _busy(self, kind: str, *command: str) -> None:
        """A task of our own that prints its container's hostname (its id) and sleeps: once the hostname
        arrives, the container is certainly busy, and the command hits it. The task is in the ledger."""
        nonce = secrets.token_hex(6)
        code = f"import socket, time\nprint(socket.gethostname(), flush=True)\ntime.sleep(5)\nprint({nonce!r})"
        key = self.rng.choice(self.load.keys)
        record = Record(kind="busy_probe", mode=self.load.mode, key=key, tier="nano", started_s=self.clock(),
                        nonce=nonce)
        self.load.records.append(record)
        headers = {"Authorization": f"Bearer {key}", "Accept": "text/event-stream"}
        fired = False
        async with httpx.AsyncClient(base_url=self.stack.url, timeout=CLIENT_TIMEOUT_S) as client:
            try:
                async with client.stream("POST", "/v1/execute", json={"code": code}, headers=headers) as response:
                    if response.status_code != 200:
                        await response.aread()
                        self.load.finish(record, response)
                        raise RuntimeError(f"the busy probe was refused: {response.status_code}")
                    event, result = "", None
                    async for line in response.aiter_lines():
                        if line.startswith("event:"):
                            event = line[6:].strip()
                        elif line.startswith("data:"):
                            data = json.loads(line[5:].strip())
                            if event == "stdout" and not fired:
                                fired = True
                                container = data["text"].split()[0]
                                await self._docker(*command, container)
                                self._fired(kind, ("nano",), container)
                            elif event == "result":
                                result = data
                    self.load.finish(record, response, body=result if result is not None else "no result event")
            except httpx.HTTPError as exc:
                self.load.finish(record, None, error=f"{type(exc).__name__}: {exc}")

    async def dockerd_restart(self) -> None:
        fired_s = self.clock()
        self._fired("dockerd_restart")
        await asyncio.to_thread(self.engine.stop)  # dockerd stops its containers first (their stop timeout)
        stopped_s = self.clock()
        await asyncio.sleep(1)
        await asyncio.to_thread(self.engine.start)
        self.engine_restarts_s.append((stopped_s - fired_s, self.clock() - fired_s))

    async def worker_sigkill(self) -> None:
        name = self.rng.choice(sorted(self.stack.workers))
        self._fired("worker_sigkill", detail=self.stack.workers[name])
        self.stack.procs.stop(name, signal.SIGKILL)
        del self.stack.workers[name]
        await asyncio.sleep(2)  # a supervisor's restart delay
        self.stack.start_worker()

    async def worker_sigstop(self) -> None:
        name = self.rng.choice(sorted(self.stack.workers))
        pid = self.stack.worker_pid(name)
        if pid is None:
            raise RuntimeError(f"{name} is not running")
        self._fired("worker_sigstop", detail=self.stack.workers[name])

        os.killpg(pid, signal.SIGSTOP)
        await asyncio.sleep(self.rng.uniform(2, 8))
        os.killpg(pid, signal.SIGCONT)

    async def redis_restart(self) -> None:
        assert self.stack.redis is not None
        self._fired("redis_restart")
        await asyncio.to_thread(self.stack.redis.restart)

    async def memory_balloon(self) -> None:
        self._fired("memory_balloon")
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "benchmarks.soak.balloon", str(BALLOON_TARGET_BYTES), str(BALLOON_HOLD_S),
            str(BALLOON_FLOOR_BYTES), stdout=asyncio.subprocess.DEVNULL)
        await proc.wait()

    async def malformed_burst(self) -> None:
        self._fired("malformed_burst", tiers=())
        key = self.rng.choice(self.load.keys)
        auth = {"Authorization": f"Bearer {key}"}
        json_headers = {**auth, "content-type": "application/json"}
        bad: list[tuple[str, str, dict[str, str], bytes]] = [
            ("POST", "/v1/execute", json_headers, b"{not json"),
            ("POST", "/v1/execute", json_headers, b'{"code": 42}'),
            ("POST", "/v1/execute", json_headers, b'{"code": ""}'),
            ("POST", "/v1/execute", json_headers, b'{"code": "print(1)", "task_type": "mine_bitcoin"}'),
            ("POST", "/v1/execute", json_headers, b'{"code": "1", "resources": {"ram": "-5GB"}}'),
            ("POST", "/v1/execute", json_headers, b'{"code": "1", "resources": {"cpu": "NaN"}}'),
            ("POST", "/v1/execute", json_headers, b'{"code": "1", "resources": {"ram": "9TiB"}}'),
            ("POST", "/v1/execute", json_headers, b'{"code": "1", "image": "no-such-image"}'),
            ("POST", "/v1/execute", json_headers, b'{"code": "1", "files": [{"path": "../x", "content": ""}]}'),
            ("POST", "/v1/execute", json_headers, b'{"code": "1", "timeout_s": -1}'),
            ("POST", "/v1/execute", json_headers,
             json.dumps({"code": "#" * (2 * 1024 * 1024)}).encode()),  # past the 1 MiB code cap
            ("POST", "/v1/execute", {**json_headers, "X-Pad": "p" * 20000}, b'{"code": "1"}'),  # 431
            ("POST", "/v1/execute", {"Authorization": "Bearer wrong", "content-type": "application/json"},
             b'{"code": "1"}'),
            ("POST", "/v1/tasks", json_headers, b'{"code": "1", "callback_url": "http://169.254.169.254/"}'),
            ("POST", "/v1/tasks/batch", json_headers, json.dumps({"tasks": [{"code": "1"}] * 101}).encode()),
            ("GET", f"/v1/tasks/{secrets.token_hex(16)}", auth, b""),
            ("POST", "/v1/sessions/nope/execute", json_headers, b'{"code": "1"}'),
        ]
        async with httpx.AsyncClient(base_url=self.stack.url, timeout=CLIENT_TIMEOUT_S) as client:
            for method, path, headers, body in bad:
                record = Record(kind="malformed", mode=self.load.mode, key=key, tier="", started_s=self.clock(),
                                expect_refusal=True)
                self.load.records.append(record)
                try:
                    response = await client.request(method, path, headers=headers, content=body or None)
                except httpx.HTTPError as exc:
                    self.load.finish(record, None, error=f"{type(exc).__name__}: {exc}")
                    continue
                self.load.finish(record, response)
