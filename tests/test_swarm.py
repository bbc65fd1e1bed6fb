"""deploy/swarm/stack.yml deployed on a one-node swarm of a Docker engine of the test's own (tests/swarm_engine.py):
the images reach it with docker save | load, the stack comes up (API, Redis with AOF, a worker per node),
and tasks, a resize and a drain go through the deployed API, and its dashboard shows the worker. `make test`
builds the service image first and runs it (alone: `make test-swarm`, 81 to 108 s with the image build).
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import docker
import httpx
import pytest

from tests.browser import chart_points, click, keep_screenshot, open_with_key, set_input, start_chromium, text_of
from tests.polling import wait_for
from tests.swarm_engine import SwarmEngine, free_tcp_port

pytestmark = [pytest.mark.docker, pytest.mark.swarm, pytest.mark.slow, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parent.parent
STACK = REPO / "deploy" / "swarm" / "stack.yml"
SERVICE_IMAGE = os.environ.get("WARMPOOL_SERVICE_IMAGE", "warmpool-service:latest")
RUNNER_IMAGE = os.environ.get("WARMPOOL_IMAGE", "warmpool-runner:latest")
STACK_TIERS = {"tiers": [
    {"name": "one", "cpu": 0.5, "ram": "96MiB", "storage": "32MiB", "min_idle": 1, "max_size": 2},
    {"name": "two", "cpu": 1, "ram": "256MiB", "storage": "128MiB", "min_idle": 2, "max_size": 4},
]}


class Deployed:
    def __init__(self, engine: SwarmEngine, base_url: str, api_key: str, admin_key: str) -> None:
        self.engine = engine
        self.admin_key = admin_key
        self.http = httpx.Client(base_url=base_url, timeout=60, headers={"authorization": f"Bearer {api_key}"})
        self.admin = {"authorization": f"Bearer {admin_key}"}

    def sandboxes(self, tier: str) -> set[str]:
        """Ids of the sandbox containers of a tier on the swarm's engine (by the workers' tier label)."""
        assert self.engine.client is not None
        return {c["Id"] for c in self.engine.client.api.containers(filters={"label": f"warmpool.tier={tier}"})}


@pytest.fixture
def stack(docker_client, tmp_path) -> Iterator[Deployed]:
    try:
        docker_client.images.get(SERVICE_IMAGE)
    except docker.errors.ImageNotFound:
        pytest.fail(f"{SERVICE_IMAGE} is missing: `make test-swarm` builds it (warmpool service-image)")
    engine = SwarmEngine()
    deployed: Deployed | None = None
    try:
        engine.start()
        engine.load_images(SERVICE_IMAGE, RUNNER_IMAGE)
        engine.docker("node", "update", "--label-add", "warmpool.redis=true", engine.node_id())
        tiers = tmp_path / "tiers.json"
        tiers.write_text(json.dumps(STACK_TIERS))
        port = free_tcp_port()
        api_key, admin_key = secrets.token_hex(8), secrets.token_hex(8)
        engine.docker("stack", "deploy", "--resolve-image", "never", "-c", str(STACK), "wp", env={
            "WARMPOOL_SERVICE_IMAGE": SERVICE_IMAGE, "WARMPOOL_RUNNER_IMAGE": RUNNER_IMAGE,
            "WARMPOOL_DOCKER_SOCKET": str(engine.sock), "WARMPOOL_PORT": str(port), "WARMPOOL_TIERS": str(tiers),
            "WARMPOOL_API_KEYS": api_key, "WARMPOOL_ADMIN_KEY": admin_key})
        deployed = Deployed(engine, f"http://127.0.0.1:{port}", api_key, admin_key)

        def ready() -> bool:
            try:
                return deployed.http.get("/readyz").status_code == 200
            except httpx.TransportError:
                return False

        try:
            wait_for(ready, "the deployed API ready (Redis and a worker up)", timeout_s=180, interval_s=1)
        except AssertionError:
            tasks = engine.docker("service", "ps", "--no-trunc", "wp_api", "wp_worker", "wp_redis")
            pytest.fail(f"stack not ready:\n{tasks}\n{engine.log_tail()}")
        yield deployed
        # Removing the stack stops the worker with SIGTERM: it removes its sandboxes before it exits.
        engine.docker("stack", "rm", "wp")
        wait_for(lambda: not engine.client.containers.list(all=True), "every container gone after stack rm",
                 timeout_s=120, interval_s=1)
    finally:
        if deployed is not None:
            deployed.http.close()
        engine.stop()


def test_stack_runs_tasks_resizes_and_drains(stack, docker_client, tmp_path):
    services = stack.engine.docker("service", "ls", "--format", "{{.Name}} {{.Mode}} {{.Replicas}}").split("\n")
    assert sorted(filter(None, services)) == ["wp_api replicated 1/1", "wp_redis replicated 1/1",
                                              "wp_worker global 1/1"], services
    redis_task = stack.engine.client.containers.list(filters={"label": "com.docker.swarm.service.name=wp_redis"})[0]
    assert redis_task.exec_run(["redis-cli", "config", "get", "appendonly"]).output.split() == [b"appendonly", b"yes"]

    # Tasks go through the deployed API, Redis and the worker, into sandboxes on the swarm's engine.
    for n in range(3):
        answer = stack.http.post("/v1/execute", json={"code": f"print({n} * 7)", "resources": {"ram": "200MiB"}})
        assert answer.status_code == 200, answer.text
        assert (answer.json()["status"], answer.json()["stdout"], answer.json()["tier"]) == ("succeeded", f"{n * 7}\n",
                                                                                              "two")
    wait_for(lambda: len(stack.sandboxes("two")) == 2 and len(stack.sandboxes("one")) == 1, "the tiers' sandboxes")
    ours = {c["Labels"]["warmpool.instance"] for c in stack.engine.client.api.containers(
        filters={"label": "warmpool.tier"})}
    assert not [c for instance in ours for c in docker_client.api.containers(
        all=True, filters={"label": f"warmpool.instance={instance}"})], "no sandbox on the first engine"

    # A resize through the deployed API reaches the worker: three `two` sandboxes on the node.
    resized = stack.http.patch("/v1/admin/pools/two", json={"min_idle": 3}, headers=stack.admin)
    assert resized.status_code == 200, resized.text
    assert (resized.json()["min_idle"], resized.json()["max_size"]) == (3, 4)
    wait_for(lambda: len(stack.sandboxes("two")) == 3, "three `two` sandboxes after the resize", timeout_s=60)

    # A drain through the deployed API replaces them all.
    before = stack.sandboxes("two")
    drained = stack.http.post("/v1/admin/pools/two/drain", headers=stack.admin)
    assert drained.status_code == 200, drained.text
    assert drained.json()["idle_replaced"] == 3, drained.text
    wait_for(lambda: len(after := stack.sandboxes("two")) == 3 and not after & before,
             "three fresh `two` sandboxes after the drain", timeout_s=60)
    answer = stack.http.post("/v1/execute", json={"code": "print('after drain')", "resources": {"ram": "200MiB"}})
    assert answer.json()["stdout"] == "after drain\n", answer.text

    # The dashboard of the deployed API shows the tier per worker, and a resize no worker can hold is
    # refused with the worker and the dimension named.
    view = stack.http.get("/v1/admin/pools", headers=stack.admin).json()
    worker = next(t for t in view["tiers"] if t["name"] == "two")["workers"][0]["worker"]
    browser = start_chromium(tmp_path / "chromium-profile")
    try:
        open_with_key(browser, stack.http.base_url, stack.admin_key)
        row = f'[data-tier="two"] [data-worker="{worker}"]'

        def row_idle_from_api() -> str:
            tiers = stack.http.get("/v1/admin/pools", headers=stack.admin).json()["tiers"]
            rows = next(t for t in tiers if t["name"] == "two")["workers"]
            return str(next(r for r in rows if r["worker"] == worker)["idle"])

        wait_for(lambda: text_of(browser, f'{row} [data-field="idle"]') == row_idle_from_api(),
                 "the worker's row shows its idle count")
        set_input(browser, "two", "max_size", 100_000)
        click(browser, '[data-tier="two"] button.resize')
        message = wait_for(lambda: "refused" in (m := text_of(browser, '[data-tier="two"] .message') or "") and m,
                           "the refusal shown")
        assert "409" in message and worker in message and "memory" in message, message
        idle_line = '[data-tier="two"] polyline[data-series="idle"]'
        wait_for(lambda: len(chart_points(browser, idle_line)) >= 7, "a few samples in the chart")
        keep_screenshot(browser, tmp_path, "dashboard-swarm.png", "WARMPOOL_DASHBOARD_SWARM_SCREENSHOT")
    finally:
        browser.quit()
