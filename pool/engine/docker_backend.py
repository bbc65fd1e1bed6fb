"""The Docker engine boundary: lifecycle calls through docker-py, blocking, meant to run in threads.

Every docker-py or requests exception is turned into `BackendUnavailable` (the engine does not answer)
or `SandboxError` (it answered no). Nothing here is called on the per-task path.
"""

from __future__ import annotations

import collections
import math
import socket
import threading
import time
from datetime import UTC, datetime
from typing import Any

import docker
import docker.errors
import requests.exceptions
from docker.types import DeviceRequest, LogConfig, Mount, Ulimit

from pool.engine.backend import POOL_LABEL, EngineInfo, OurContainer
from pool.model.errors import BackendUnavailable, PoolError, SandboxError

_UNREACHABLE = (requests.exceptions.ConnectionError, requests.exceptions.Timeout, ConnectionError,
                FileNotFoundError, docker.errors.DockerException)


def _wrap(exc: Exception, doing: str) -> Exception:
    if isinstance(exc, PoolError):
        return exc
    if isinstance(exc, docker.errors.APIError):
        return SandboxError(f"docker refused to {doing}: {exc.explanation or exc}")
    if isinstance(exc, _UNREACHABLE):
        return BackendUnavailable(f"docker engine unreachable while trying to {doing}: {exc}")
    return SandboxError(f"could not {doing}: {exc!r}")


class DockerBackend:
    """A docker-py API client with our error types (a `ContainerBackend`); every method blocks.

    Built without I/O: it connects on first use (in a thread, like every call), so an engine that is down
    at start is a BackendUnavailable from that first call."""

    def __init__(self, base_url: str | None = None, timeout_s: float = 30.0) -> None:
        self.api_errors: collections.Counter[str] = collections.Counter()  # failed calls by operation
        self._errors_lock = threading.Lock()  # methods run in worker threads
        self._base_url = base_url
        self._timeout_s = timeout_s
        self._api: docker.APIClient | None = None
        self._connect_lock = threading.Lock()

    @property
    def api(self) -> docker.APIClient:
        with self._connect_lock:
            if self._api is None:
                try:
                    if self._base_url:
                        self._api = docker.APIClient(base_url=self._base_url, timeout=int(self._timeout_s),
                                                     version="auto")
                    else:
                        self._api = docker.from_env(timeout=int(self._timeout_s)).api
                except Exception as exc:  # docker.from_env pings the engine to negotiate the API version
                    raise self._failed("connect", exc, "connect") from exc
            return self._api

    def close(self) -> None:
        if self._api is not None:
            self._api.close()

    def error_counts(self) -> dict[str, int]:
        """Failed engine calls since start, by operation (a copy: worker threads keep counting)."""
        with self._errors_lock:
            return dict(self.api_errors)

    def _failed(self, operation: str, exc: Exception, doing: str) -> Exception:
        """Count a failed engine call (for metrics) and wrap its exception into our error tree."""
        if isinstance(exc, PoolError):  # already ours: the connection failed (and was counted) first
            return exc
        with self._errors_lock:
            self.api_errors[operation] += 1
        return _wrap(exc, doing)

    def ping(self) -> None:
        try:
            self.api.ping()
        except Exception as exc:
            raise self._failed("ping", exc, "ping") from exc

    def info(self) -> EngineInfo:
        try:
            raw = self.api.info()
        except Exception as exc:
            raise self._failed("info", exc, "read engine info") from exc
        return EngineInfo(cpus=int(raw.get("NCPU", 1)), ram_bytes=int(raw.get("MemTotal", 0)),
                          runtimes=tuple((raw.get("Runtimes") or {}).keys()))

    def image_labels(self, image: str) -> dict[str, str] | None:
        """The image's labels, or None when the image is absent."""
        try:
            raw = self.api.inspect_image(image)  # type: ignore[no-untyped-call]  # unannotated in types-docker
        except docker.errors.ImageNotFound:
            return None
        except Exception as exc:
            raise self._failed("inspect_image", exc, f"inspect image {image}") from exc
        return dict((raw.get("Config") or {}).get("Labels") or {})

    def create(self, *, image: str, name: str, labels: dict[str, str], host_options: dict[str, Any]) -> str:
        try:
            created = self.api.create_container(
                image=image, name=name, labels=labels, host_config=self.api.create_host_config(**host_options),
                stdin_open=True, tty=False, network_disabled=True, environment={},
            )
        except Exception as exc:
            raise self._failed("create", exc, f"create container {name}") from exc
        return str(created["Id"])

    def attach(self, container_id: str) -> socket.socket:
        """Attach stdin and stdout once; returns a socket we own (docker-py's response is closed)."""
        try:
            raw = self.api.attach_socket(container_id, params={"stdin": 1, "stdout": 1, "stream": 1})
        except Exception as exc:
            raise self._failed("attach", exc, "attach") from exc
        inner = getattr(raw, "_sock", raw)
        owned: socket.socket = inner.dup()  # docker-py types its socket as Any
        owned.setblocking(False)
        raw.close()
        if isinstance(inner, socket.socket):
            inner.close()  # closing the SocketIO wrapper leaves its socket (and fd) open until collected
        return owned

    def start(self, container_id: str) -> None:
        try:
            self.api.start(container_id)
        except Exception as exc:
            raise self._failed("start", exc, "start container") from exc

    def remove(self, container_id: str) -> None:
        """Force-remove, and return once the container is gone; one that is already gone is fine."""
        try:
            self.api.remove_container(container_id, force=True, v=True)
        except docker.errors.NotFound:
            return
        except docker.errors.APIError as exc:
            if exc.status_code == 409 and "already in progress" in str(exc.explanation):
                # Another removal (a replacement's, a sweep's) has it: wait for that one, so that "removed"
                # means gone (a shutdown must not return with a container of ours still there).
                self._wait_removed(container_id)
                return
            raise self._failed("remove", exc, "remove container") from exc
        except Exception as exc:
            raise self._failed("remove", exc, "remove container") from exc

    def _wait_removed(self, container_id: str) -> None:
        try:
            self.api.wait(container_id, timeout=math.ceil(self._timeout_s), condition="removed")  # int seconds
        except docker.errors.NotFound:
            return  # gone before the wait began
        except Exception as exc:
            raise self._failed("remove", exc, "wait for a container's removal") from exc

    def list_ours(self, extra_label: str | None = None) -> list[OurContainer]:
        """Every container carrying our pool label (optionally also `key=value`), running or not."""
        filters = [POOL_LABEL] + ([extra_label] if extra_label else [])
        try:
            raw = self.api.containers(all=True, filters={"label": filters})
        except Exception as exc:
            raise self._failed("list", exc, "list containers") from exc
        return [OurContainer(c["Id"], (c.get("Names") or ["?"])[0].lstrip("/"), dict(c.get("Labels") or {}))
                for c in raw]

    def inspect(self, container_id: str) -> dict[str, Any]:
        try:
            return dict(self.api.inspect_container(container_id))
        except Exception as exc:
            raise self._failed("inspect", exc, "inspect container") from exc

    def oom_killed(self, container_id: str, wait_s: float) -> bool:
        """Whether the kernel's OOM killer ended the container, once the engine has recorded its exit
        (waiting at most `wait_s` for that; a container still running then was not OOM-killed).

        Under gVisor the engine does not always record the OOM kill (its OOM event comes through runsc's
        shim and is sometimes lost: seen here in 2 of 6 runs of a 2 GiB allocation in a 1 GiB sandbox).
        There the memory cgroup's SIGKILL is the one way a sandbox dies with exit code 137 that nobody
        asked the engine for, so such a death, with no `kill` event for it, counts as OOM."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                info = self.api.inspect_container(container_id)
            except docker.errors.NotFound:
                return False
            except Exception as exc:
                raise _wrap(exc, "inspect container") from exc
            state = info.get("State") or {}
            if not state.get("Running") or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        if state.get("Running"):
            return False
        if state.get("OOMKilled"):
            return True
        runtime = (info.get("HostConfig") or {}).get("Runtime")
        return runtime == "runsc" and state.get("ExitCode") == 137 and not self._kill_requested(info)

    def _kill_requested(self, info: dict[str, Any]) -> bool:
        """Whether anyone asked the engine to kill or stop this container since it started."""
        started = (info.get("State") or {}).get("StartedAt", "")
        try:  # "2026-11-30T05:30:01.123456789Z": whole seconds are enough (the events API takes no finer)
            since = datetime.fromisoformat(started[:19]).replace(tzinfo=UTC)
        except ValueError:
            return True  # cannot tell: do not guess OOM
        try:
            # The API counts in whole seconds: a kill in this very second needs `until` past it.
            events = self.api.events(since=since, until=int(time.time()) + 1, decode=True,
                                     filters={"container": info["Id"], "event": ["kill", "stop"]})
            return any(True for _ in events)
        except Exception as exc:
            raise _wrap(exc, "read engine events") from exc


def ulimits(nofile: int, fsize_bytes: int) -> list[Ulimit]:
    return [Ulimit(name="nofile", soft=nofile, hard=nofile),
            Ulimit(name="fsize", soft=fsize_bytes, hard=fsize_bytes),
            Ulimit(name="core", soft=0, hard=0)]


def gpu_device_requests(gpu_ids: tuple[str, ...]) -> list[DeviceRequest]:
    """Docker device requests for exactly these GPUs, by id, so two containers never share one."""
    if not gpu_ids:
        return []
    return [DeviceRequest(driver="nvidia", device_ids=list(gpu_ids), capabilities=[["gpu"]])]


def no_logging() -> LogConfig:
    return LogConfig(type="none")


def scratch_bind(source_dir: str, target: str) -> Mount:
    """A read-write bind of one host directory (a scratch filesystem's mount point), private to the container."""
    return Mount(target=target, source=source_dir, type="bind", read_only=False, propagation="rprivate")
