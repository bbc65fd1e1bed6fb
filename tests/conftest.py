"""Fixtures: a real Docker engine and runner image, services started per test, and clean-up checks."""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import secrets
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import IO, Any

import docker
import docker.errors
import httpx
import pytest

from pool.engine.scratch import loops_backed_under
from pool.model import images as catalogue
from pool.settings import Settings
from runner_image.build import HASH_LABEL, build_hash
from tests.polling import wait_for

REPO = Path(__file__).resolve().parent.parent
IMAGE = os.environ.get("WARMPOOL_IMAGE", "warmpool-runner:latest")
SCRATCH_ROOT = Settings.scratch_dir  # services here keep the default WARMPOOL_SCRATCH_DIR

# Small tiers keep the suite quick: "one" has a single container, so consecutive tasks share it.
TEST_TIERS = {"tiers": [
    {"name": "one", "cpu": 0.5, "ram": "96MiB", "storage": "32MiB", "min_idle": 1, "max_size": 1},
    {"name": "two", "cpu": 1, "ram": "256MiB", "storage": "128MiB", "min_idle": 2, "max_size": 4},
]}


# Fixtures that need a Docker engine or a Redis (directly or through the fixtures they use). A test that
# uses one must carry the matching marker, so that `make check` (-m "not docker and not redis") never
# needs either; pytest_collection_modifyitems refuses a test that forgot it.
NEEDS = {"docker": ("docker_client", "runner_image", "datascience", "docker2"), "redis": ("redis_url", "redis_server")}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    unmarked = []
    for item in items:
        used = set(getattr(item, "fixturenames", ()))
        for marker, fixtures in NEEDS.items():
            if used.intersection(fixtures) and item.get_closest_marker(marker) is None:
                unmarked.append(f"{item.nodeid} uses {sorted(used.intersection(fixtures))} but is not marked {marker}")
    if unmarked:
        raise pytest.UsageError("tests that need an engine must say so:\n" + "\n".join(unmarked))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, None]:
    """A test that skips fails instead: what it needs is missing, and a skip would pass that by in silence.
    (`make check` deselects the tests that need an engine by marker; none of those is run, so none skips.)"""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped, which the suite does not allow (make test must run everything): {report.longrepr}"


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    """asyncio only: the service runs on uvicorn's asyncio loop. (anyio's plugin otherwise runs every async
    test on each backend it finds installed, and selenium brings trio in.)"""
    return "asyncio"


@pytest.fixture(scope="session")
def docker_client() -> Iterator[docker.DockerClient]:
    """The real engine; `make test` starts it and builds the image, so here its absence is a failure."""
    try:
        client = docker.from_env()
        client.ping()
        client.images.get(IMAGE)
    except Exception as exc:  # noqa: BLE001 - any reason is the same message
        pytest.fail(f"Docker engine with image {IMAGE} is required (run `make test`): {exc}")
    # A stale image would test an older runner than the working tree's: `make test` rebuilds them first.
    for spec in catalogue.with_env_tags(catalogue.BUILTIN, os.environ):
        try:
            labels = client.images.get(spec.docker_image).labels or {}
        except docker.errors.ImageNotFound:
            labels = {}
        if labels.get(HASH_LABEL) != build_hash(spec):
            pytest.fail(f"image {spec.docker_image} ({spec.name}) is missing or stale: run `make image` "
                        "(with the same WARMPOOL_IMAGE* variables as the tests)")
    yield client
    client.close()


@dataclasses.dataclass(frozen=True)
class Engine:
    """A Docker engine a worker may use: its address (DOCKER_HOST; None: the default) and a client."""

    host: str | None
    client: docker.DockerClient


@pytest.fixture(scope="session")
def docker2(docker_client) -> Iterator[Engine]:
    """A second engine on this machine ("another host"): `make test` starts it (scripts/ensure-docker2.sh)
    with the runner image loaded, and exports WARMPOOL_TEST_DOCKER2_HOST; its absence is a failure."""
    host = os.environ.get("WARMPOOL_TEST_DOCKER2_HOST")
    if not host:
        pytest.fail("WARMPOOL_TEST_DOCKER2_HOST is required (run `make test`, which starts a second engine)")
    try:
        client = docker.DockerClient(base_url=host)
        client.ping()
        client.images.get(IMAGE)
    except Exception as exc:  # noqa: BLE001 - any reason is the same message
        pytest.fail(f"a second Docker engine with image {IMAGE} is required at {host} "
                    f"(bash scripts/ensure-docker2.sh start): {exc}")
    yield Engine(host, client)
    client.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def containers_of(client: docker.DockerClient, instance_id: str) -> list:
    return client.containers.list(all=True, filters={"label": f"warmpool.instance={instance_id}"})


ADMIN_KEY = "test-admin-key"  # what tests that read the admin view start their services with


def tier_view(service: Service, tier: str) -> dict[str, Any]:
    """The tier as GET /v1/admin/pools shows it (the service runs with WARMPOOL_ADMIN_KEY=ADMIN_KEY)."""
    response = service.client.get("/v1/admin/pools", headers={"authorization": f"Bearer {ADMIN_KEY}"})
    assert response.status_code == 200, response.text
    (view,) = [t for t in response.json()["tiers"] if t["name"] == tier]
    return dict(view)


def idle_again(service: Service, tier: str, headers: dict[str, str] | None = None) -> None:
    """Wait until the tier's containers are all back from their tasks (returned after their reset), so that
    the next "busy" a test waits for is its own task's."""
    def idle() -> bool:
        (found,) = [t for t in service.client.get("/v1/tiers", headers=headers or {}).json() if t["name"] == tier]
        return found["busy"] == 0 and found["idle"] >= 1

    wait_for(idle, f"tier {tier} idle again")


class Service:
    """A `warmpool serve` process on a loopback port."""

    def __init__(self, process: subprocess.Popen, base_url: str, instance_id: str, log: IO[str]) -> None:
        self.process = process
        self.log = log
        self.base_url = base_url
        self.instance_id = instance_id
        self.client = httpx.Client(base_url=base_url, timeout=60)
        self.log_path: Path | None = None
        self.defaults: dict[str, object] = {}  # fields every `execute` sends unless it says otherwise

    def execute(self, code: str, **fields) -> httpx.Response:
        return self.client.post("/v1/execute", json={"code": code, **self.defaults, **fields})

    def stop(self, timeout_s: float = 90) -> int:
        # Generous: the engine sometimes takes ~35 s to remove a gVisor sandbox (seen after a fork bomb on
        # two loaded cores), and the service's shutdown waits for every removal so as to leave nothing behind.
        self.client.close()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()
        return self.process.returncode


@pytest.fixture
def tiers_file(tmp_path: Path) -> Callable[[dict], Path]:
    def write(tiers: dict) -> Path:
        path = tmp_path / f"tiers-{secrets.token_hex(3)}.json"
        path.write_text(json.dumps(tiers))
        return path
    return write


def start_service(log_dir: Path, tiers_path: Path, env: dict[str, str] | None = None,
                  ready_timeout_s: float = 60, nofile_limit: int | None = None, ready: bool = True) -> Service:
    """A `warmpool serve` process on a free loopback port (the one way tests start one), answering `/readyz`
    with 200, or with anything when `ready` is False (a scale-out API with no worker yet); else the test
    fails with its log. `env` may name its WARMPOOL_INSTANCE_ID; `nofile_limit` sets its open-file limit
    (soft and hard), to exhaust it with few connections."""
    port = _free_port()
    full_env = {**os.environ, "WARMPOOL_TIERS_FILE": str(tiers_path),
                "WARMPOOL_INSTANCE_ID": f"test-{secrets.token_hex(4)}", **(env or {})}
    instance_id = full_env["WARMPOOL_INSTANCE_ID"]
    log_path = log_dir / f"serve-{port}.log"
    log = open(log_path, "w")  # noqa: SIM115 - closed with the process
    def limit_files() -> None:
        if nofile_limit is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile_limit, nofile_limit))

    process = subprocess.Popen([sys.executable, "-m", "warmpool", "serve", "--host", "127.0.0.1",
                                "--port", str(port)], env=full_env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                               preexec_fn=limit_files if nofile_limit is not None else None)
    service = Service(process, f"http://127.0.0.1:{port}", instance_id, log)
    service.log_path = log_path

    def answering() -> bool:
        if process.poll() is not None:
            raise RuntimeError("exited early")
        try:
            status = service.client.get("/readyz").status_code
        except httpx.TransportError:
            return False
        return status == 200 or not ready

    try:
        wait_for(answering, f"the service on port {port} to be ready", timeout_s=ready_timeout_s, interval_s=0.1)
    except (AssertionError, RuntimeError) as exc:
        service.stop()
        pytest.fail(f"service not ready ({exc}):\n{log_path.read_text()}")
    return service


def scratch_left(instance_id: str) -> list[str]:
    """What the instance's disk scratch still holds on the host: mounts, loop devices, its state dir."""
    directory = os.path.join(SCRATCH_ROOT, instance_id)
    left = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()
            if line.split()[1].startswith(directory + "/")]
    left += loops_backed_under(Path("/sys/block"), directory)
    return left + ([directory] if os.path.exists(directory) else [])


def stop_service(service: Service, client: docker.DockerClient) -> None:
    """Stop a service and fail if it left any of its containers or scratch filesystems behind (removing
    the containers first)."""
    service.stop()
    leftovers = containers_of(client, service.instance_id)
    for container in leftovers:
        container.remove(force=True)
    assert not leftovers, f"service {service.instance_id} left {len(leftovers)} container(s) behind"
    # A loop device goes with the last user of its filesystem, which a removed gVisor sandbox may be for
    # a moment more.
    try:
        wait_for(lambda: not scratch_left(service.instance_id), "no scratch left", timeout_s=15)
    except AssertionError:
        raise AssertionError(f"service {service.instance_id} left scratch behind: "
                             f"{scratch_left(service.instance_id)}") from None


@pytest.fixture
def serve(docker_client, tiers_file, tmp_path) -> Iterator[Callable[..., Service]]:
    """Start services (`serve(tiers=..., env={...})`); each is stopped and checked for leftovers."""
    started: list[Service] = []

    def start(tiers: dict | None = None, env: dict[str, str] | None = None, ready_timeout_s: float = 60,
              nofile_limit: int | None = None) -> Service:
        service = start_service(tmp_path, tiers_file(tiers or TEST_TIERS), env, ready_timeout_s, nofile_limit)
        started.append(service)
        return service

    yield start
    for service in started:
        stop_service(service, docker_client)


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The shared test Redis; `make test` starts it and exports WARMPOOL_TEST_REDIS_URL."""
    import redis

    url = os.environ.get("WARMPOOL_TEST_REDIS_URL")
    if not url:
        pytest.fail("WARMPOOL_TEST_REDIS_URL is required (run `make test`, which starts a redis-server)")
    client = redis.Redis.from_url(url, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.RedisError as exc:
        pytest.fail(f"no Redis answers at {url}: {exc}")
    finally:
        client.close()
    return url


@pytest.fixture
def redis_server(tmp_path) -> Iterator[Callable[..., object]]:
    """Start redis-servers of the test's own (to stop and restart); every one is stopped at the end."""
    from tests.scaleout_support import RedisServer

    servers: list[RedisServer] = []

    def start(appendonly: bool = False) -> RedisServer:
        server = RedisServer(tmp_path / f"redis-{len(servers)}", appendonly=appendonly)
        server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def cluster(docker_client, redis_url, tiers_file, tmp_path) -> Iterator[Callable[..., object]]:
    """Scale-out clusters (`cluster(redis_url=..., tiers=...)`): an API and workers as processes."""
    from tests.scaleout_support import Cluster

    made: list[Cluster] = []

    def make(redis_url_: str | None = None, tiers: dict | None = None) -> Cluster:
        made.append(Cluster(redis_url_ or redis_url, tmp_path, tiers_file(tiers or TEST_TIERS), docker_client))
        return made[-1]

    yield make
    for item in made:
        item.close()
