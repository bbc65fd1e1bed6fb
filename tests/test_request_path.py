"""What the README says of a task's path, on the real engine: no Docker API call on it; a client that goes
away mid-task leaves the container to the next task; a runner that hangs is a sandbox_error and its container
is replaced; a task that names no timeout gets WARMPOOL_DEFAULT_TIMEOUT_S."""

from __future__ import annotations

import concurrent.futures
import json
import socket

import pytest

from tests.conftest import ADMIN_KEY, TEST_TIERS, containers_of, idle_again, tier_view
from tests.docker_proxy import DockerProxy
from tests.polling import wait_for
from tests.test_streaming import run_seconds

pytestmark = pytest.mark.docker

ONE = {"ram": "64MiB"}  # tier "one": a single container, so consecutive tasks share it
TWO = {"ram": "200MiB"}
HOSTNAME = "import socket; print(socket.gethostname())"


def settled(service) -> bool:
    """Every tier holds its min_idle idle containers, none busy or starting."""
    tiers = service.client.get("/v1/tiers").json()
    return all(t["idle"] == t["min_idle"] and t["busy"] == t["starting"] == 0 for t in tiers)


def test_no_docker_api_call_on_the_request_path(serve, tmp_path):
    """The service talks to the engine through a proxy that logs every API request. Once warm, with tiers
    that cannot grow (min_idle == max_size, warming off) and tasks whose outcomes keep their containers,
    forty tasks (one after another, and eight at once) make no engine call at all: each is a frame over the
    socket attached when its container was made."""
    proxy = DockerProxy(str(tmp_path / "docker.sock"))
    proxy.start()
    steady = {"tiers": [TEST_TIERS["tiers"][0], {**TEST_TIERS["tiers"][1], "min_idle": 2, "max_size": 2}]}
    svc = serve(tiers=steady, env={"DOCKER_HOST": proxy.url, "WARMPOOL_WARMING": "off"})
    try:
        wait_for(lambda: settled(svc), "every tier warm and idle")
        started = proxy.requests()
        assert sum(1 for method, path in started if path == "/containers/create") == 3, started
        assert any(path.endswith("/attach") for _, path in started), "the proxy sees the service's calls"
        before = len(started)
        tasks = [("print('hi')", {}), ("import sys; sys.exit(3)", {}), ("raise ValueError('boom')", {}),
                 ("import sys; print(sys.stdin.read())", {"stdin": "piped"}),
                 ("import time; time.sleep(30)", {"timeout_s": 0.5}),
                 ("import sys\nwhile True: sys.stdout.write('x' * 65536)", {})]
        statuses = [svc.execute(code, resources=resources, **fields).json()["status"]
                    for code, fields in tasks for resources in (ONE, TWO)]
        assert statuses == [status for status in ("succeeded", "failed", "failed", "succeeded", "timed_out",
                                                  "output_limit_exceeded") for _ in range(2)]
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            bodies = list(pool.map(lambda i: svc.execute(f"print({i})", resources=TWO if i % 2 else ONE).json(),
                                   range(28)))
        assert [b["stdout"] for b in bodies] == [f"{i}\n" for i in range(28)]
        wait_for(lambda: settled(svc), "every container back, reset and idle")
        assert proxy.requests()[before:] == [], "engine calls made while tasks ran"
    finally:
        svc.stop()  # while the proxy is up, so that shutdown can remove its containers
        proxy.close()


def send_and_hang_up(service, body: dict, stream: bool) -> None:
    """Send a task request on a raw connection, wait until the task holds its container, then go away."""
    raw = json.dumps(body).encode()
    port = int(service.base_url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as sock:
        accept = b"accept: text/event-stream\r\n" if stream else b""
        sock.sendall(b"POST /v1/execute HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\n" + accept
                     + b"content-length: %d\r\n\r\n" % len(raw) + raw)
        wait_for(lambda: tier_view(service, "one")["busy"] == 1, "the task to hold tier one's container")


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_a_client_gone_mid_task_leaves_the_container_to_the_next_task(serve, stream):
    """The task runs to its end without its client; its container is reset and reused, not replaced."""
    service = serve(env={"WARMPOOL_ADMIN_KEY": ADMIN_KEY})
    host = service.execute(HOSTNAME, resources=ONE).json()["stdout"]
    runs = run_seconds(service, "one", "succeeded")[0]
    idle_again(service, "one")
    send_and_hang_up(service, {"code": "import time\nprint('working', flush=True)\ntime.sleep(2)",
                               "resources": ONE}, stream)
    wait_for(lambda: run_seconds(service, "one", "succeeded")[0] == runs + 1, "the task to run to its end")
    after = service.execute(HOSTNAME, resources=ONE).json()
    assert after["stdout"] == host, "the same container served the next task"
    assert tier_view(service, "one")["replaced"] == {}


def test_a_hung_runner_is_a_sandbox_error_and_its_container_is_replaced(serve, docker_client):
    """`docker pause` freezes the runner mid-task: it cannot report, kill or reset. Past the task's timeout
    and the host's grace, the task is a sandbox_error and the container is replaced."""
    service = serve(env={"WARMPOOL_ADMIN_KEY": ADMIN_KEY})
    (old,) = [c for c in containers_of(docker_client, service.instance_id) if c.labels["warmpool.tier"] == "one"]
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(service.execute, "import time; time.sleep(30)", resources=ONE, timeout_s=1)
        wait_for(lambda: tier_view(service, "one")["busy"] == 1, "the task to hold the container")
        old.pause()
        body = pending.result(timeout=60).json()
    assert body["status"] == "sandbox_error" and "did not answer" in body["message"], body
    wait_for(lambda: tier_view(service, "one")["replaced"] == {"sandbox_error": 1}, "the hung container retired")
    after = service.execute(HOSTNAME, resources=ONE).json()
    assert after["status"] == "succeeded" and after["stdout"].strip() != old.id[:12]
    wait_for(lambda: old.id not in {c.id for c in containers_of(docker_client, service.instance_id)},
             "the paused container removed")


def test_a_task_without_a_timeout_gets_the_default_one(serve):
    """WARMPOOL_DEFAULT_TIMEOUT_S=1: a 3 s task that names no timeout is stopped, one that asks for 10 s is not,
    and an async task gets the same default."""
    service = serve(env={"WARMPOOL_DEFAULT_TIMEOUT_S": "1"})
    slow = "import time; time.sleep(3); print('finished')"
    assert service.execute(slow, resources=ONE).json()["status"] == "timed_out"
    asked = service.execute(slow, resources=ONE, timeout_s=10).json()
    assert (asked["status"], asked["stdout"]) == ("succeeded", "finished\n")
    link = service.client.post("/v1/tasks", json={"code": slow, "resources": ONE}).json()["link"]
    ended = wait_for(lambda: (b := service.client.get(link).json())["status"] not in ("queued", "running") and b,
                     "the async task to end")
    assert ended["status"] == "timed_out", ended
