"""GPU tiers on the real engine, which has no GPU here: a declared inventory, the exact device requests
the engine receives, its refusal (no nvidia driver) reported cleanly, and a GPU-less host saying so."""

from __future__ import annotations

import asyncio
import json
import secrets
from typing import Any

import pytest

from pool.engine.docker_backend import DockerBackend
from pool.engine.manager import PoolManager
from pool.model.errors import CapacityError, NoCapacity
from pool.model.results import TaskSpec
from pool.settings import from_env

pytestmark = pytest.mark.docker

ADMIN_KEY = "gpu-admin-key"
AUTH = {"authorization": f"Bearer {ADMIN_KEY}"}
GPU_IDS = "GPU-fake-0,GPU-fake-1"
TIERS = {"tiers": [
    {"name": "cpu", "cpu": 0.5, "ram": "64MiB", "storage": "16MiB", "min_idle": 1, "max_size": 2},
    {"name": "gpu1", "cpu": 1, "gpu": 1, "ram": "128MiB", "storage": "16MiB", "min_idle": 0, "max_size": 2},
]}


def test_a_gpu_container_is_created_with_its_gpu_ids_and_the_engine_refusal_is_clean(tiers_file, docker_client):
    """In process, so the create call and the engine's view of it can be captured before the start fails."""
    instance_id = f"test-gpu-{secrets.token_hex(4)}"
    settings = from_env({"WARMPOOL_TIERS_FILE": str(tiers_file(TIERS)), "WARMPOOL_GPU_IDS": GPU_IDS,
                         "WARMPOOL_INSTANCE_ID": instance_id})
    created: list[dict[str, Any]] = []

    async def scenario() -> None:
        backend = DockerBackend(settings.docker_host)
        manager = PoolManager(settings, backend)
        await manager.start()
        try:
            assert await manager.wait_warm(60)
            real_start = backend.start

            def start_after_inspecting(container_id: str) -> None:
                created.append(backend.inspect(container_id)["HostConfig"])  # what the engine holds
                real_start(container_id)

            backend.start = start_after_inspecting  # type: ignore[method-assign]
            spec = TaskSpec(task_id="t1", code="print(1)")
            with pytest.raises(NoCapacity, match='could not select device driver "nvidia"'):
                await manager.execute("gpu1", spec, wait_s=30)
            assert sorted(manager.ledger.gpus_free) == ["GPU-fake-0", "GPU-fake-1"], "the GPU came back"
            pool = manager.pools["gpu1"]
            assert pool.total == 0 and pool.start_failures == 1
            with pytest.raises(NoCapacity, match="cannot start containers") as refused:
                await manager.execute("gpu1", TaskSpec(task_id="t2", code="print(2)"), wait_s=30)
            assert refused.value.retry_after_s >= 1
            assert len(created) == 1, "refused during the backoff: no second create, no crash loop"
            assert backend.error_counts() == {"start": 1}
            done = await manager.execute("cpu", TaskSpec(task_id="t3", code="print(3)"), wait_s=30)
            assert done.result.stdout == "3\n", "the other tiers keep serving"
        finally:
            await manager.close()

    asyncio.run(scenario())
    (host_config,) = created
    assert host_config["DeviceRequests"] == [
        {"Driver": "nvidia", "Count": 0, "DeviceIDs": ["GPU-fake-0"], "Capabilities": [["gpu"]], "Options": {}}]
    assert (host_config["CpuQuota"], host_config["CpuPeriod"]) == (100_000, 100_000)
    assert host_config["Memory"] == 128 * 1024**2
    assert docker_client.api.containers(all=True, filters={"label": f"warmpool.instance={instance_id}"}) == []


def test_gpu_tier_through_the_service(serve):
    service = serve(tiers=TIERS, env={"WARMPOOL_GPU_IDS": GPU_IDS, "WARMPOOL_ADMIN_KEY": ADMIN_KEY})
    response = service.execute("print(1)", resources={"gpu": 1})
    assert response.status_code == 503, response.text
    assert "nvidia" in response.json()["detail"] and int(response.headers["retry-after"]) >= 1
    too_many = service.execute("print(1)", resources={"gpu": 2})
    assert too_many.status_code == 422 and "largest tier offers 1" in too_many.text

    view = service.client.get("/v1/admin/pools", headers=AUTH).json()
    gpu1 = next(t for t in view["tiers"] if t["name"] == "gpu1")
    assert gpu1["gpu"] == 1 and gpu1["unfit"] is None and "nvidia" in gpu1["last_start_error"]
    assert gpu1["gpus_in_use"] == [] and view["capacity"]["gpus_free"] == ["GPU-fake-0", "GPU-fake-1"]
    failures = gpu1["start_failures"]
    assert failures == 1

    over = service.client.patch("/v1/admin/pools/gpu1", json={"max_size": 3}, headers=AUTH)
    assert over.status_code == 409 and "gpu: 3 needed, the host has 2" in over.json()["detail"]
    assert service.client.patch("/v1/admin/pools/gpu1", json={"max_size": 2}, headers=AUTH).status_code == 200

    assert service.execute("print('cpu')").json()["stdout"] == "cpu\n"
    metrics = service.client.get("/metrics").text
    assert 'warmpool_docker_api_errors_total{operation="start"} 1.0' in metrics
    assert 'warmpool_container_start_failures_total{tier="gpu1"} 1.0' in metrics
    assert "warmpool_capacity_gpus_free 2.0" in metrics


def test_a_host_without_gpus_says_so_for_gpu_requests(serve):
    service = serve(tiers=TIERS)  # no GPU declared, and no nvidia-smi on this machine
    response = service.execute("print(1)", resources={"gpu": 1})
    assert response.status_code == 422, response.text
    (error,) = response.json()["detail"]
    assert error["loc"] == ["body", "resources", "gpu"] and "this host has 0" in error["msg"]
    assert service.execute("print('cpu')").json()["stdout"] == "cpu\n"


def test_a_gpu_tier_whose_min_idle_the_host_cannot_hold_stops_the_start(tiers_file, docker_client):
    tiers = json.loads(json.dumps(TIERS))
    tiers["tiers"][1]["min_idle"] = 1
    settings = from_env({"WARMPOOL_TIERS_FILE": str(tiers_file(tiers)),
                         "WARMPOOL_INSTANCE_ID": f"test-gpu-{secrets.token_hex(4)}"})

    async def start() -> None:
        manager = PoolManager(settings, DockerBackend(settings.docker_host))
        try:
            await manager.start()
        finally:
            await manager.close()

    with pytest.raises(CapacityError, match="gpu: 1 needed, the host has 0"):
        asyncio.run(start())
    assert docker_client.api.containers(all=True, filters={"label": f"warmpool.instance={settings.instance_id}"}) == []
