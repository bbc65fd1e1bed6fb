"""The hostile suite's service: one tier of a single container (so every task reuses the same one), per runtime.

Each module gets a service per runtime (runc, then gVisor's runsc), started once and checked for leftover
containers when the module ends. `run_case` runs a hostile snippet twice in a row, asserts its safe outcome
both times, then that a plain task on the same tier still succeeds, and (unless the outcome is one that
retires the container) that it ran on the very same container.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import docker
import pytest

from tests.conftest import Service, containers_of, start_service, stop_service

MIB = 1024 ** 2
RUNTIMES = ("runc", "runsc")
PIDS_LIMIT = 64
STORAGE_BYTES = 32 * MIB
OUTPUT_LIMIT_BYTES = MIB
TASK_TIMEOUT_S = 1.5
# What a timed-out task may take beyond its deadline, as seen by the client: the runner kills at the
# deadline, then answers. A hang guard, not a timing: a task whose deadline did not hold runs forever, while
# killing 64 forks under gVisor on two loaded cores was seen to take 5 s.
DEADLINE_GRACE_S = 15.0
# Under gVisor the memory cgroup also holds the Sentry (the sandbox's kernel), which keeps ~3.5 MiB per process
# (measured: 60 sleeping forks of python3 take 225 MiB there, 10 MiB under runc), so the same tasks need more.
RAM_BY_RUNTIME = {"runc": "128MiB", "runsc": "1GiB"}
MAX_WAITING = 8
HOSTNAME = "import socket; print(socket.gethostname())"
# What runner_image/Dockerfile sets: the locale, the path, matplotlib's backend and config dir, and the
# modules the runner preloads. The runner replaces all of it for the task (test_hardening checks the task's).
IMAGE_ENV = {"LANG", "PATH", "MPLBACKEND", "MPLCONFIGDIR", "WARMPOOL_PRELOAD"}



# The datascience interpreter holds ~80 MiB before any task, and a figure flood needs room of its own.
DS_RAM_BY_RUNTIME = {"runc": "1GiB", "runsc": "2GiB"}


def hostile_tiers(runtime: str, image: str = "python") -> dict[str, Any]:
    ram = (RAM_BY_RUNTIME if image == "python" else DS_RAM_BY_RUNTIME)[runtime]
    return {"tiers": [{"name": "box", "cpu": 0.5, "ram": ram, "storage": "32MiB", "image": image,
                       "min_idle": 1, "max_size": 1, "pids_limit": PIDS_LIMIT, "runtime": runtime}]}


@pytest.fixture(scope="session")
def engine_runtimes(docker_client) -> tuple[str, ...]:
    return tuple((docker_client.info().get("Runtimes") or {}).keys())


def box_service(runtime: str, image: str, engine_runtimes: tuple[str, ...], tmp_path_factory: Any) -> Service:
    if runtime not in engine_runtimes:
        pytest.fail(f"the Docker engine has no {runtime!r} runtime (scripts/ensure-docker.sh registers runsc); "
                    f"it offers {list(engine_runtimes)}")
    work = tmp_path_factory.mktemp(f"hostile-{image}-{runtime}")
    tiers_path = work / "tiers.json"
    tiers_path.write_text(json.dumps(hostile_tiers(runtime, image)))
    service = start_service(work, tiers_path, env={
        "WARMPOOL_OUTPUT_LIMIT_BYTES": str(OUTPUT_LIMIT_BYTES), "WARMPOOL_MAX_WAITING": str(MAX_WAITING),
        "WARMPOOL_LEASE_TIMEOUT_S": "10"}, ready_timeout_s=180)
    service.runtime = runtime  # type: ignore[attr-defined]
    return service


@pytest.fixture(scope="module", params=RUNTIMES)
def box(request, docker_client, engine_runtimes, tmp_path_factory) -> Iterator[Service]:
    """A service whose only tier, "box", has one container of the given runtime."""
    service = box_service(request.param, "python", engine_runtimes, tmp_path_factory)
    yield service
    stop_service(service, docker_client)


@pytest.fixture(scope="module", params=RUNTIMES)
def ds_box(request, docker_client, engine_runtimes, tmp_path_factory) -> Iterator[Service]:
    """The same, on the datascience image."""
    service = box_service(request.param, "datascience", engine_runtimes, tmp_path_factory)
    service.defaults = {"image": "datascience"}
    yield service
    stop_service(service, docker_client)


def execute(service: Service, code: str, **fields: Any) -> dict[str, Any]:
    """Run a task that must get a 200 with a well-formed body; returns the body."""
    response = service.execute(code, **fields)
    assert response.status_code == 200, response.text[:2000]
    body = response.json()  # a valid JSON document, whatever the task wrote
    assert body["status"] in ("succeeded", "failed", "timed_out", "memory_exceeded", "output_limit_exceeded",
                              "sandbox_error"), body
    return body


def container_of_box(service: Service) -> str:
    """The hostname of the tier's (only) container, asked from inside it."""
    body = execute(service, HOSTNAME)
    assert body["status"] == "succeeded", body
    return body["stdout"].strip()


def run_case(service: Service, code: str, check: Callable[[dict[str, Any]], None], *, same_container: bool = True,
             timeout_s: float = TASK_TIMEOUT_S, **fields: Any) -> list[dict[str, Any]]:
    """Run `code` twice in a row on the tier, `check` each result, then require a plain task to succeed on
    the same container (`same_container=False` for outcomes that retire it). Returns both results."""
    before = container_of_box(service)
    results = []
    for _ in range(2):
        started = time.monotonic()
        body = execute(service, code, timeout_s=timeout_s, **fields)
        body["elapsed_s"] = time.monotonic() - started
        check(body)
        results.append(body)
    after = execute(service, "print('still serving')")
    assert (after["status"], after["stdout"]) == ("succeeded", "still serving\n"), after
    if same_container:
        assert container_of_box(service) == before, (
            f"the tier has one container: the same one must be reused; the service said: {why_replaced(service)}")
    return results


def why_replaced(service: Service) -> list[str]:
    """The service's log lines about containers it did not reuse (for the failure message)."""
    if service.log_path is None:
        return []
    lines = service.log_path.read_text(errors="replace").splitlines()
    return [line for line in lines if "not clean" in line or "replac" in line or "retir" in line][-5:]


def status_is(status: str) -> Callable[[dict[str, Any]], None]:
    def check(body: dict[str, Any]) -> None:
        assert body["status"] == status, (body["status"], body["message"], body["stdout"][-500:],
                                          body["stderr"][-500:])
    return check


def box_container(service: Service, client: docker.DockerClient) -> Any:
    (container,) = containers_of(client, service.instance_id)
    return container


def server_rss_bytes(service: Service) -> int:
    """Resident memory of the `warmpool serve` process (uvicorn runs the app in that same process)."""
    for line in Path(f"/proc/{service.process.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS line")


def redis_port() -> int:
    """The test Redis's port (from WARMPOOL_TEST_REDIS_URL, as `make test` sets it), else its default."""
    url = os.environ.get("WARMPOOL_TEST_REDIS_URL", "redis://127.0.0.1:6399/0")
    return int(url.rsplit(":", 1)[1].split("/", 1)[0])
