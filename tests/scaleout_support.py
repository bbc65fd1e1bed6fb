"""Scale-out test helpers: a redis-server of our own, `warmpool worker` processes, and a cluster factory.

A cluster is one Redis key prefix (unique per test, so tests never see each other's streams) with an API
and workers started as separate processes, exactly as an operator would start them.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

import docker
import docker.errors
import httpx
import pytest
import redis

from pool.engine.scratch import remove_instance_dir
from tests.conftest import REPO, SCRATCH_ROOT, Engine, Service, _free_port, scratch_left

# Short enough that fault tests take seconds, long enough for a loaded 2-core machine.
FAST_FAULTS = {"WARMPOOL_HEARTBEAT_S": "0.5", "WARMPOOL_VISIBILITY_TIMEOUT_S": "2"}


def container_ids(client: docker.DockerClient, instance_id: str) -> list[str]:
    """Ids of an instance's containers, in one call: no per-container inspect that a concurrent removal
    (a worker's orphan sweep, say) could turn into NotFound."""
    found = client.api.containers(all=True, filters={"label": f"warmpool.instance={instance_id}"})
    return [c["Id"] for c in found]


def remove_quietly(client: docker.DockerClient, container_id: str) -> None:
    try:
        client.api.remove_container(container_id, force=True)
    except docker.errors.NotFound:
        pass


def wait_for(predicate: Any, timeout_s: float = 30, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"{what} not met within {timeout_s} s")


class RedisServer:
    """A throwaway redis-server on a loopback port, which a test may stop and start again (same port)."""

    def __init__(self, workdir: Path, appendonly: bool = False) -> None:
        if shutil.which("redis-server") is None:
            pytest.fail("redis-server is required (make test installs it)")
        self.appendonly = appendonly  # as scripts/ensure-redis.sh sets it up: AOF, fsync every second
        self.port = _free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.workdir = workdir
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "yes" if self.appendonly else "no", "--appendfsync", "everysec",
             "--dir", str(self.workdir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, socket_connect_timeout=1)
        try:
            wait_for(lambda: _pings(client), timeout_s=10, what=f"redis-server on port {self.port}")
        finally:
            client.close()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()  # as abrupt as a crash: nothing is saved
            self.process.wait(10)
        self.process = None


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


class WorkerProcess:
    """A `warmpool worker` process."""

    def __init__(self, process: subprocess.Popen[bytes], instance_id: str, log_path: Path, log: IO[str],
                 engine: docker.DockerClient) -> None:
        self.process = process
        self.engine = engine  # the Docker engine its containers run on
        self.instance_id = instance_id
        self.log_path = log_path
        self.log = log
        self.killed = False

    def stop(self, timeout_s: float = 90) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()
        return self.process.returncode

    def kill(self) -> None:
        """SIGKILL: no clean-up at all, as if the host died."""
        self.killed = True
        self.process.kill()
        self.process.wait()


class Cluster:
    """An API and workers on one Redis prefix; `close()` stops them and checks nothing is left behind."""

    def __init__(self, redis_url: str, tmp_path: Path, tiers_path: Path, docker_client: docker.DockerClient) -> None:
        self.redis_url = redis_url
        self.prefix = f"wptest-{secrets.token_hex(4)}"
        self.tmp_path = tmp_path
        self.docker = docker_client
        self.env = {"WARMPOOL_REDIS_URL": redis_url, "WARMPOOL_REDIS_PREFIX": self.prefix,
                    "WARMPOOL_TIERS_FILE": str(tiers_path), **FAST_FAULTS}
        self.workers: list[WorkerProcess] = []
        self.apis: list[Service] = []
        self.redis = redis.Redis.from_url(redis_url, decode_responses=True, socket_connect_timeout=2)

    def _env(self, instance_id: str, extra: dict[str, str] | None) -> dict[str, str]:
        return {**os.environ, **self.env, "WARMPOOL_INSTANCE_ID": instance_id, **(extra or {})}

    def worker(self, env: dict[str, str] | None = None, wait: bool = True, engine: Engine | None = None,
               args: tuple[str, ...] = ()) -> WorkerProcess:
        """A `warmpool worker` process, on `engine` (default: the first engine) with extra `args`."""
        instance_id = f"wk-{secrets.token_hex(4)}"
        log_path = self.tmp_path / f"{instance_id}.log"
        log = open(log_path, "w")  # noqa: SIM115 - closed with the process
        full_env = self._env(instance_id, env)
        if engine is not None and engine.host:
            full_env["DOCKER_HOST"] = engine.host
        process = subprocess.Popen([sys.executable, "-m", "warmpool", "worker", *args], env=full_env,
                                   stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        worker = WorkerProcess(process, instance_id, log_path, log, engine.client if engine else self.docker)
        self.workers.append(worker)
        if wait:
            def beating() -> bool:
                if process.poll() is not None:
                    pytest.fail(f"worker exited early:\n{log_path.read_text()}")
                return bool(self.redis.exists(f"{self.prefix}:worker:{instance_id}"))
            wait_for(beating, timeout_s=90, what=f"heartbeat of worker {instance_id}")
        return worker

    def api(self, env: dict[str, str] | None = None, ready: bool = True) -> Service:
        port = _free_port()
        instance_id = f"api-{secrets.token_hex(4)}"
        log_path = self.tmp_path / f"{instance_id}.log"
        log = open(log_path, "w")  # noqa: SIM115 - closed with the process
        process = subprocess.Popen([sys.executable, "-m", "warmpool", "serve", "--host", "127.0.0.1", "--port",
                                    str(port)], env=self._env(instance_id, env), stdout=log,
                                   stderr=subprocess.STDOUT, cwd=REPO)
        service = Service(process, f"http://127.0.0.1:{port}", instance_id, log)
        self.apis.append(service)

        def answering() -> bool:
            if process.poll() is not None:
                pytest.fail(f"API exited early:\n{log_path.read_text()}")
            try:
                response = service.client.get("/readyz")
            except httpx.TransportError:
                return False
            return response.status_code == 200 or (not ready and response.status_code == 503)
        wait_for(answering, timeout_s=60, what=f"API {instance_id}")
        return service

    def task_hash(self, task_id: str) -> dict[str, str]:
        return self.redis.hgetall(f"{self.prefix}:task:{task_id}")  # type: ignore[return-value]

    def running_tasks(self) -> dict[str, str]:
        """task id -> worker id, for every task a worker has marked running."""
        found = {}
        for key in self.redis.scan_iter(f"{self.prefix}:task:*"):
            state, worker = self.redis.hmget(key, ["state", "worker"])  # type: ignore[misc]
            if state == "running":
                found[key.rsplit(":", 1)[1]] = worker
        return found

    def close(self) -> None:
        for service in self.apis:
            service.stop()
        leftovers = []
        for worker in self.workers:
            worker.stop()
            left = container_ids(worker.engine, worker.instance_id)
            for container_id in left:
                remove_quietly(worker.engine, container_id)
            if worker.killed:
                # As the next pool to start on this host would: its scratch filesystems, by name.
                remove_instance_dir(os.path.join(SCRATCH_ROOT, worker.instance_id))
            else:
                leftovers += [(worker.instance_id, container_id[:12]) for container_id in left]
            wait_for(lambda w=worker: not scratch_left(w.instance_id), timeout_s=15,
                     what=f"no scratch left by worker {worker.instance_id}")
        try:
            keys = list(self.redis.scan_iter(f"{self.prefix}:*"))
            if keys:
                self.redis.delete(*keys)
        except redis.RedisError:
            pass  # a test's own redis-server, already gone
        self.redis.close()
        assert not leftovers, f"workers left containers behind: {leftovers}"
