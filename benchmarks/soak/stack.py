"""What the soak runs and owns: a Docker engine of its own, a redis-server, the API and the workers.

The engine every other test on this machine uses is never touched: the soak starts a dockerd of its own
(scripts/ensure-docker2.sh with its own socket, data root, exec root and pid file; the runner image is
loaded into it with docker save | docker load), so that it may restart that engine as a fault.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]
ENGINE_SCRIPT = REPO / "scripts" / "ensure-docker2.sh"
STOP_TIMEOUT_S = 45.0

# Two small tiers keep the soak's load modest on a shared 2-core machine.
TIERS = {"tiers": [
    {"name": "nano", "cpu": 0.5, "ram": "128MiB", "storage": "128MiB", "min_idle": 2, "max_size": 5,
     "pids_limit": 64},
    {"name": "small", "cpu": 1, "ram": "512MiB", "storage": "256MiB", "min_idle": 1, "max_size": 3},
]}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class Engine:
    """The soak's own dockerd (see scripts/ensure-docker2.sh for what it shares with nobody)."""

    name: str = "wpsoak"

    @property
    def sock(self) -> str:
        return f"/run/{self.name}-docker.sock"

    @property
    def host(self) -> str:
        return f"unix://{self.sock}"

    def env(self) -> dict[str, str]:
        return {"WARMPOOL_DOCKER2_SOCK": self.sock, "WARMPOOL_DOCKER2_ROOT": f"/var/lib/{self.name}-docker",
                "WARMPOOL_DOCKER2_EXEC_ROOT": f"/run/{self.name}-docker",
                "WARMPOOL_DOCKER2_PIDFILE": f"/run/{self.name}-docker.pid",
                "WARMPOOL_DOCKER2_LOG": f"/var/log/{self.name}-docker.log"}

    def _script(self, action: str, timeout_s: float = 300) -> None:
        proc = subprocess.run(["bash", str(ENGINE_SCRIPT), action], env={**os.environ, **self.env()},
                              capture_output=True, text=True, timeout=timeout_s)
        if proc.returncode != 0:
            raise RuntimeError(f"ensure-docker2.sh {action} failed: {proc.stderr[-2000:]}")

    def start(self) -> None:
        self._script("start")

    def stop(self) -> None:
        self._script("stop", timeout_s=90)

    def docker(self, *args: str, timeout_s: float = 60) -> str:
        proc = subprocess.run(["docker", "-H", self.host, *args], capture_output=True, text=True,
                              timeout=timeout_s)
        if proc.returncode != 0:
            raise RuntimeError(f"docker {' '.join(args)}: {proc.stderr.strip()[-500:]}")
        return proc.stdout


class Processes:
    """Every process the soak starts, each with its log; stopped in reverse order."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.started: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        with open(self.logdir / f"{name}.log", "ab") as log:
            process = subprocess.Popen(args, cwd=REPO, env={**os.environ, **env}, stdout=log,
                                       stderr=subprocess.STDOUT, start_new_session=True)
        self.started[name] = process
        return process

    def stop(self, name: str, sig: int = signal.SIGTERM) -> int | None:
        process = self.started.pop(name, None)
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(sig)
            try:
                process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        return process.returncode

    def stop_all(self) -> None:
        for name in reversed(list(self.started)):
            self.stop(name)


@dataclass
class Redis:
    """A redis-server of the soak's own, with AOF as scripts/ensure-redis.sh sets it up."""

    procs: Processes
    port: int
    workdir: Path

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.procs.start("redis", ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                   "--appendonly", "yes", "--appendfsync", "everysec",
                                   "--dir", str(self.workdir)], {})
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if subprocess.run(["redis-cli", "-p", str(self.port), "ping"], capture_output=True,
                              text=True).stdout.strip() == "PONG":
                return
            time.sleep(0.1)
        raise RuntimeError(f"redis-server on {self.port} did not answer")

    def stop(self) -> None:
        self.procs.stop("redis")  # SIGTERM: Redis writes its AOF out and exits

    def restart(self) -> None:
        self.stop()
        self.start()


@dataclass
class Stack:
    """The API (and in scale-out mode the workers) of one soak phase, all on the soak's engine."""

    procs: Processes
    engine: Engine
    run_id: str
    workdir: Path
    api_keys: tuple[str, ...]
    admin_key: str
    callback_secret: str
    redis: Redis | None = None
    port: int = 0
    instance_ids: list[str] = field(default_factory=list)  # every id this stack's processes had
    workers: dict[str, str] = field(default_factory=dict)  # process name -> instance id
    _worker_serial: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def scratch_dir(self) -> Path:
        return Path(f"/var/lib/{self.engine.name}-scratch")

    @property
    def tmp_dir(self) -> Path:
        return self.workdir / "tmp"

    def env(self, instance_id: str) -> dict[str, str]:
        self.workdir.mkdir(parents=True, exist_ok=True)
        tiers = self.workdir / "tiers.json"
        tiers.write_text(json.dumps(TIERS))
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        env = {"DOCKER_HOST": self.engine.host, "WARMPOOL_TIERS_FILE": str(tiers),
               "WARMPOOL_INSTANCE_ID": instance_id, "WARMPOOL_API_KEYS": ",".join(self.api_keys),
               "WARMPOOL_ADMIN_KEY": self.admin_key, "WARMPOOL_CALLBACK_ALLOW": "127.0.0.1",
               "WARMPOOL_CALLBACK_SECRET": self.callback_secret, "WARMPOOL_WARMING": "off",
               "WARMPOOL_SCRATCH_DIR": str(self.scratch_dir), "TMPDIR": str(self.tmp_dir),
               "WARMPOOL_RESULT_TTL_S": "900"}
        if self.redis is not None:
            env.update(WARMPOOL_REDIS_URL=self.redis.url, WARMPOOL_REDIS_PREFIX=f"soak{self.run_id}")
        return env

    def start_api(self) -> None:
        self.port = free_port()
        instance_id = f"soak{self.run_id}-api"
        self.instance_ids.append(instance_id)
        self.procs.start("api", [sys.executable, "-m", "warmpool", "serve", "--host", "127.0.0.1", "--port",
                                 str(self.port)], self.env(instance_id))

    def start_worker(self) -> str:
        """A new worker process under a fresh instance id, as a supervisor would restart one."""
        self._worker_serial += 1
        name = f"worker{self._worker_serial}"
        instance_id = f"soak{self.run_id}-w{self._worker_serial}"
        self.instance_ids.append(instance_id)
        self.procs.start(name, [sys.executable, "-m", "warmpool", "worker"], self.env(instance_id))
        self.workers[name] = instance_id
        return name

    def revive_exited_workers(self) -> list[str]:
        """Replace each worker that exited by itself (as systemd's Restart=, a restart policy or Kubernetes
        would): a worker started while its engine is down exits ("docker engine unreachable")."""
        revived = []
        for name, instance_id in list(self.workers.items()):
            process = self.procs.started.get(name)
            if process is not None and process.poll() is not None:
                self.procs.stop(name)
                del self.workers[name]
                revived.append(f"{instance_id} exited with {process.returncode}; replaced by "
                               f"{self.workers.get(self.start_worker())}")
        return revived

    def worker_pid(self, name: str) -> int | None:
        process = self.procs.started.get(name)
        return process.pid if process is not None and process.poll() is None else None

    def api_pid(self) -> int | None:
        process = self.procs.started.get("api")
        return process.pid if process is not None else None

    def wait_ready(self, timeout_s: float = 180) -> None:
        deadline = time.monotonic() + timeout_s
        with httpx.Client(base_url=self.url, timeout=10) as client:
            while time.monotonic() < deadline:
                try:
                    if client.get("/readyz").status_code == 200 and self.pools_at_target(client):
                        return
                except httpx.TransportError:
                    pass
                time.sleep(0.3)
        raise RuntimeError(f"the soak's API ({self.url}) was not ready within {timeout_s} s")

    def pools_at_target(self, client: httpx.Client) -> bool:
        """Every tier holds min_idle idle containers, and in scale-out mode every live worker serves it."""
        response = client.get("/v1/admin/pools", headers={"Authorization": f"Bearer {self.admin_key}"})
        if response.status_code != 200:
            return False
        tiers = response.json()["tiers"]
        want_workers = len(self.workers) if self.redis is not None else None
        for tier in tiers:
            if tier["idle"] < tier["min_idle"] or tier.get("starting", 0):
                return False
            if want_workers is not None and len(tier.get("workers", [])) != want_workers:
                return False
        return True

    def stop(self) -> None:
        for name in list(self.workers):
            self.procs.stop(name)
        self.workers.clear()
        self.procs.stop("api")
