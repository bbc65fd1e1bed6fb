"""A container backend for pool-logic tests, with no engine: each container is an in-process runner double
that speaks the runner's frame protocol (runner_image/PROTOCOL.md) over one end of a socket pair; the pool
holds the other end exactly as it holds a Docker attach socket. Threads stand in for the processes.

What a task does is read from directives in its code, one per line (anything else just succeeds, and
`print('text')` prints text)::

    # fake: sleep=0.2     answer after 0.2 s
    # fake: exit=3        exit code 3 (status failed)
    # fake: status=memory_exceeded   the runner reports that status
    # fake: dirty         the reset after the task is not clean
    # fake: die           the container dies under the task (the attach stream ends)
    # fake: oom           the same, and the engine says the OOM killer did it
    # fake: silent        the runner never answers

The test drives the engine around it: `down` makes every call fail as an unreachable engine does,
`refuse_starts` makes `start` refuse like an engine without the runtime or driver a tier needs, and
`kill` ends a container from outside.
"""

from __future__ import annotations

import itertools
import json
import re
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from pool.engine.backend import POOL_LABEL, EngineInfo, OurContainer
from pool.model.errors import BackendUnavailable, SandboxError
from pool.model.protocol import encode_frame

GIB = 1024 ** 3
_LENGTH = struct.Struct(">I")
_DOCKER_HEADER = struct.Struct(">BxxxI")
_DIRECTIVE = re.compile(r"#\s*fake:\s*(\w+)(?:=(\S+))?")
_PRINT = re.compile(r"""print\((['"])(.*?)\1\)""")


class FakeRunner(threading.Thread):
    """The runner of one fake container: reads frames from the pool, answers them as the real one would."""

    def __init__(self, container: FakeContainer) -> None:
        super().__init__(name=f"fake-runner-{container.name}", daemon=True)
        self.container = container
        assert container.runner_sock is not None
        self.sock = container.runner_sock

    def run(self) -> None:
        buffer = b""
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    return
                buffer += data
                while len(buffer) >= _LENGTH.size:
                    (size,) = _LENGTH.unpack_from(buffer)
                    if len(buffer) < _LENGTH.size + size:
                        break
                    frame = json.loads(buffer[_LENGTH.size:_LENGTH.size + size])
                    buffer = buffer[_LENGTH.size + size:]
                    if not self.answer(frame):
                        return
        except OSError:
            return  # the pool (or the test) closed the socket: the container is gone
        finally:
            self.sock.close()

    def send(self, message: dict[str, Any]) -> None:
        frame = encode_frame(message)
        self.sock.sendall(_DOCKER_HEADER.pack(1, len(frame)) + frame)  # Docker multiplexes stdout

    def answer(self, frame: dict[str, Any]) -> bool:
        """Answer one frame; False when the runner stops (the container died)."""
        if frame.get("op") == "ping":
            self.send({"op": "pong", "id": frame["id"], "clean": True, "detail": "", "python": "fake"})
            return True
        if frame.get("op") != "run":
            self.send({"op": "error", "id": frame.get("id"), "detail": f"unknown op {frame.get('op')!r}"})
            return True
        code = str(frame["code"])
        self.container.codes.append(code)
        directives = dict(_DIRECTIVE.findall(code))
        if "sleep" in directives:
            time.sleep(float(directives["sleep"]))
        if "oom" in directives:
            self.container.oom_killed = True
        if "die" in directives or "oom" in directives:
            self.container.exited = True
            return False
        if "silent" in directives:
            self.container.silent.wait()
            return False
        printed = _PRINT.search(code)
        exit_code = int(directives.get("exit", "0"))
        status = directives.get("status") or ("succeeded" if exit_code == 0 else "failed")
        self.send({"op": "result", "id": frame["id"], "status": status, "exit_code": exit_code, "signal": None,
                   "stdout": printed.group(2) + "\n" if printed else "", "stderr": "",
                   "stdout_truncated": False, "stderr_truncated": False, "run_ms": 0.1,
                   "usage": {"cpu_s": 0.0, "max_rss_bytes": 0}})
        clean = "dirty" not in directives
        self.send({"op": "reset", "id": frame["id"], "clean": clean, "detail": "" if clean else "left a file"})
        return True


@dataclass
class FakeContainer:
    container_id: str
    name: str
    labels: dict[str, str]
    host_options: dict[str, Any]
    runner_sock: socket.socket | None = None
    runner: FakeRunner | None = None
    started: bool = False
    exited: bool = False
    oom_killed: bool = False
    codes: list[str] = field(default_factory=list)  # the code of every task it ran
    silent: threading.Event = field(default_factory=threading.Event)


class FakeBackend:
    """A `ContainerBackend` of in-process runner doubles; every method is safe to call from any thread."""

    def __init__(self, *, cpus: int = 2, ram_bytes: int = 24 * GIB, runtimes: tuple[str, ...] = ("runc", "runsc"),
                 image_present: bool = True) -> None:
        self.engine = EngineInfo(cpus=cpus, ram_bytes=ram_bytes, runtimes=runtimes)
        self.image_present = image_present
        self.down = False  # every call fails as when the engine does not answer
        self.refuse_starts: str | None = None  # start() refuses with this message
        self.containers: dict[str, FakeContainer] = {}
        self.removed: list[str] = []  # names, in order
        self.errors: dict[str, int] = {}
        self.calls: dict[str, int] = {}  # every call made, by operation
        self.runners: list[FakeRunner] = []
        self._serial = itertools.count(1)
        self._lock = threading.Lock()

    # ContainerBackend ------------------------------------------------------------------------------
    def ping(self) -> None:
        self._answering("ping")

    def info(self) -> EngineInfo:
        self._answering("info")
        return self.engine

    def image_labels(self, image: str) -> dict[str, str] | None:
        self._answering("inspect_image")
        return {} if self.image_present else None

    def create(self, *, image: str, name: str, labels: dict[str, str], host_options: dict[str, Any]) -> str:
        self._answering("create")
        with self._lock:
            container_id = f"fake{next(self._serial):04d}"
            self.containers[container_id] = FakeContainer(container_id, name, dict(labels), dict(host_options))
        return container_id

    def attach(self, container_id: str) -> socket.socket:
        self._answering("attach")
        container = self._get(container_id, "attach")
        pool_end, runner_end = socket.socketpair()
        pool_end.setblocking(False)
        container.runner_sock = runner_end
        return pool_end

    def start(self, container_id: str) -> None:
        self._answering("start")
        if self.refuse_starts is not None:
            self._count("start")
            raise SandboxError(f"docker refused to start container: {self.refuse_starts}")
        container = self._get(container_id, "start")
        container.started = True
        container.runner = FakeRunner(container)
        self.runners.append(container.runner)
        container.runner.start()

    def remove(self, container_id: str) -> None:
        self._answering("remove")
        with self._lock:
            container = self.containers.pop(container_id, None)
        if container is None:
            return
        self.removed.append(container.name)
        self._end(container)

    def list_ours(self, extra_label: str | None = None) -> list[OurContainer]:
        self._answering("list")
        key, _, value = (extra_label or "").partition("=")
        with self._lock:
            return [OurContainer(c.container_id, c.name, dict(c.labels)) for c in self.containers.values()
                    if POOL_LABEL in c.labels and (not key or c.labels.get(key) == value)]

    def oom_killed(self, container_id: str, wait_s: float) -> bool:
        self._answering("inspect")
        container = self.containers.get(container_id)
        return container is not None and container.oom_killed

    def error_counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self.errors)

    def close(self) -> None:
        pass

    # for tests -------------------------------------------------------------------------------------
    def kill(self, container_id: str) -> None:
        """The container stops from outside (docker kill): its runner's stream ends."""
        container = self._get(container_id, "kill")
        container.exited = True
        self._end(container)

    def running(self) -> list[FakeContainer]:
        with self._lock:
            return [c for c in self.containers.values() if c.started and not c.exited]

    def by_tier(self, tier_name: str) -> list[FakeContainer]:
        with self._lock:
            return [c for c in self.containers.values() if c.labels.get("warmpool.tier") == tier_name]

    def add_stray(self, labels: dict[str, str]) -> str:
        """A container some other (perhaps dead) pool left behind."""
        with self._lock:
            container_id = f"stray{next(self._serial):04d}"
            self.containers[container_id] = FakeContainer(container_id, container_id, dict(labels), {})
        return container_id

    def join(self, timeout_s: float = 5.0) -> list[str]:
        """Wait for every runner thread to end (the pool removed their containers); the names of any left."""
        for runner in self.runners:
            runner.join(timeout_s)
        return [r.container.name for r in self.runners if r.is_alive()]

    # ----------------------------------------------------------------------------------------------
    def _answering(self, operation: str) -> None:
        with self._lock:
            self.calls[operation] = self.calls.get(operation, 0) + 1
        if self.down:
            self._count(operation)
            raise BackendUnavailable(f"docker engine unreachable while trying to {operation}: fake outage")

    def _count(self, operation: str) -> None:
        with self._lock:
            self.errors[operation] = self.errors.get(operation, 0) + 1

    def _get(self, container_id: str, doing: str) -> FakeContainer:
        container = self.containers.get(container_id)
        if container is None:
            raise SandboxError(f"docker refused to {doing}: no such container {container_id}")
        return container

    @staticmethod
    def _end(container: FakeContainer) -> None:
        container.silent.set()
        if container.runner_sock is None:
            return
        if container.runner is None:  # never started: nothing else will close its end
            container.runner_sock.close()
            return
        try:
            container.runner_sock.shutdown(socket.SHUT_RDWR)  # the runner thread sees the end and closes it
        except OSError:
            pass
