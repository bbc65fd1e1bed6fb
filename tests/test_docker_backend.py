"""DockerBackend against the real engine: what its calls promise when they return."""
from __future__ import annotations

import secrets
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import docker
import pytest

from pool.engine.docker_backend import DockerBackend
from tests.conftest import IMAGE

pytestmark = pytest.mark.docker


@pytest.fixture
def sleeping_container(docker_client: docker.DockerClient) -> Iterator[str]:
    # gVisor makes a removal slow enough that concurrent removals overlap (409 "already in progress").
    container = docker_client.containers.run(
        IMAGE, ["sleep", "300"], detach=True, runtime="runsc", network_mode="none",
        labels={"warmpool.pool": "1", "warmpool.instance": f"test-backend-{secrets.token_hex(4)}"})
    yield container.id
    try:
        container.remove(force=True)
    except docker.errors.NotFound:
        pass


def test_remove_returns_only_once_the_container_is_gone(docker_client, sleeping_container):
    """A shutdown removes every container it started and then checks none is left: a removal that loses
    the race to another one (the engine's 409) must wait for the winner, not return while it is still there."""
    backend = DockerBackend()
    try:
        def remove_then_look() -> bool:
            backend.remove(sleeping_container)
            try:
                docker_client.api.inspect_container(sleeping_container)
            except docker.errors.NotFound:
                return True
            return False

        with ThreadPoolExecutor(6) as threads:
            gone = list(threads.map(lambda _: remove_then_look(), range(6)))
    finally:
        backend.close()
    assert gone == [True] * 6
