"""The HTTP API in process over the embedded dispatcher and a fake container backend (tests/fake_backend.py):
auth, size caps, validation, the task routes, Retry-After, and the admin routes through the door, with no
engine. The same contract against Docker is in tests/test_service.py, tests/test_admin.py and the others
marked `docker`.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path

import httpx
import pytest

from api.app import create_app
from pool.engine.embedded import EmbeddedDispatcher
from pool.settings import from_env
from tests.conftest import TEST_TIERS
from tests.fake_backend import FakeBackend
from tests.inprocess import serve_in_process
from tests.polling import until

pytestmark = pytest.mark.anyio

KEYS = {"WARMPOOL_API_KEYS": "alice,bob", "WARMPOOL_ADMIN_KEY": "root-key"}
ALICE = {"authorization": "Bearer alice"}
BOB = {"authorization": "Bearer bob"}
ADMIN = {"authorization": "Bearer root-key"}
App = Callable[..., AbstractAsyncContextManager[tuple[httpx.AsyncClient, FakeBackend]]]


@pytest.fixture
def app_of(tmp_path: Path) -> App:
    """`async with app_of(**env) as (client, backend)`: the app, started and warm, over a fake backend."""
    tiers = tmp_path / "tiers.json"
    tiers.write_text(json.dumps(TEST_TIERS))

    @asynccontextmanager
    async def make(**env: str) -> AsyncIterator[tuple[httpx.AsyncClient, FakeBackend]]:
        settings = from_env({"WARMPOOL_TIERS_FILE": str(tiers), "WARMPOOL_INSTANCE_ID": "inproc", **env})
        backend = FakeBackend()
        async with serve_in_process(create_app(settings, lambda s: EmbeddedDispatcher(s, backend))) as client:
            await until_ready(client)
            yield client, backend
        assert backend.containers == {} and backend.join() == []

    return make


async def until_ready(client: httpx.AsyncClient) -> None:
    for _ in range(500):
        if (await client.get("/readyz")).status_code == 200:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("not ready")


async def test_a_task_round_trip_and_the_tier_it_went_to(app_of):
    async with app_of() as (client, _):
        response = await client.post("/v1/execute", json={
            "task_type": "execute_code", "code": "print('Hello, World!')",
            "resources": {"cpu": "1", "gpu": "0", "ram": "200MB", "storage": "100MB"}})
        body = response.json()
        assert response.status_code == 200 and body["status"] == "succeeded" and body["stdout"] == "Hello, World!\n"
        assert body["tier"] == "two" and body["resources"]["ram_bytes"] == 256 * 1024**2
        assert set(body["timings"]) == {"queue_ms", "run_ms", "total_ms"} and body["worker"] == "inproc"
        assert (await client.get("/healthz")).json() == {"status": "ok"}


async def test_task_routes_need_a_key_and_admin_routes_the_admin_key(app_of):
    async with app_of(**KEYS) as (client, _):
        for method, path in (("POST", "/v1/execute"), ("POST", "/v1/tasks"), ("GET", "/v1/tiers"),
                             ("GET", "/v1/tasks/" + "0" * 32)):
            missing = await client.request(method, path, json={"code": "print(1)"})
            assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
            wrong = await client.request(method, path, json={"code": "print(1)"},
                                         headers={"authorization": "Bearer eve"})
            assert wrong.status_code == 403
        assert (await client.get("/v1/admin/pools", headers=ALICE)).status_code == 403, "an API key is no admin key"
        assert (await client.get("/v1/admin/pools")).status_code == 401
        assert (await client.get("/v1/admin/pools", headers=ADMIN)).status_code == 200
        assert (await client.post("/v1/execute", json={"code": "print(1)"}, headers=ALICE)).status_code == 200


@pytest.mark.parametrize(("body", "field"), [
    ({}, "code"), ({"code": ""}, "code"), ({"code": "x", "task_type": "shell"}, "task_type"),
    ({"code": "x", "resources": {"ram": "lots"}}, "ram"), ({"code": "x", "resources": {"cpu": "-1"}}, "cpu"),
    ({"code": "x", "resources": {"cpu": "NaN"}}, "cpu"), ({"code": "x", "resources": {"gpu": 1}}, "gpu"),
    ({"code": "x", "resources": {"ram": "64GiB"}}, "ram"), ({"code": "x", "resources": {"disk": "1G"}}, "disk"),
    ({"code": "x", "timeout_s": 10_000}, "timeout_s"), ({"code": "x", "max_wait_ms": -1}, "max_wait_ms"),
])
async def test_bad_input_is_a_422_naming_the_field_and_reaches_no_container(app_of, body, field):
    async with app_of() as (client, backend):
        response = await client.post("/v1/execute", json=body)
        assert response.status_code == 422 and field in response.text, response.text
        assert all(c.codes == [] for c in backend.containers.values()), "no container saw it"


async def test_too_large_is_413_before_it_is_parsed(app_of):
    async with app_of(WARMPOOL_MAX_CODE_BYTES="1KiB", WARMPOOL_MAX_BODY_BYTES="64KiB") as (client, backend):
        over_field = await client.post("/v1/execute", json={"code": "#" + "x" * 2048})
        assert over_field.status_code == 413 and over_field.json()["detail"].startswith("code:")
        flood = json.dumps({"code": "#" + "x" * 100_000}).encode()
        over_body = await client.post("/v1/execute", content=flood, headers={"content-type": "application/json"})
        assert over_body.status_code == 413 and "body exceeds" in over_body.json()["detail"]
        assert all(c.codes == [] for c in backend.containers.values())


async def test_a_busy_tier_answers_503_with_retry_after_within_max_wait_ms(app_of):
    async with app_of() as (client, _):
        busy = asyncio.create_task(client.post("/v1/execute", json={"code": "# fake: sleep=0.3",
                                                                     "resources": {"ram": "64MiB"}}))
        for _ in range(500):
            if (await client.get("/v1/tiers")).json()[0]["busy"] == 1:
                break
            await asyncio.sleep(0.01)
        refused = await client.post("/v1/execute", json={"code": "print(1)", "resources": {"ram": "64MiB"},
                                                          "max_wait_ms": 20})
        assert refused.status_code == 503 and int(refused.headers["retry-after"]) >= 1
        assert "within 0.02 s" in refused.json()["detail"]
        assert (await busy).status_code == 200


async def test_async_tasks_are_kept_for_their_submitter_only(app_of):
    async with app_of(**KEYS) as (client, _):
        accepted = await client.post("/v1/tasks", json={"code": "print('later')"}, headers=ALICE)
        assert accepted.status_code == 202 and accepted.headers["location"] == accepted.json()["link"]
        link = accepted.json()["link"]
        assert (await client.get(link, headers=BOB)).status_code == 404
        for _ in range(500):
            body = (await client.get(link, headers=ALICE)).json()
            if body["status"] not in ("queued", "running"):
                break
            await asyncio.sleep(0.01)
        assert body["status"] == "succeeded" and body["stdout"] == "later\n"


async def test_admin_sees_sizes_and_drains_through_the_embedded_dispatcher(app_of):
    async with app_of(WARMPOOL_ADMIN_KEY="root-key") as (client, backend):
        view = (await client.get("/v1/admin/pools", headers=ADMIN)).json()
        assert [t["name"] for t in view["tiers"]] == ["one", "two"] and view["persisted"] is False
        assert view["capacity"]["ram_bytes"] == 22 * 1024**3, "24 GiB from the fake engine, less the 2 GiB reserve"
        resized = await client.patch("/v1/admin/pools/two", json={"min_idle": 3}, headers=ADMIN)
        assert resized.status_code == 200 and (resized.json()["min_idle"], resized.json()["max_size"]) == (3, 4)
        await until(lambda: len(backend.by_tier("two")) == 3, "two grows to three")
        assert (await client.patch("/v1/admin/pools/two", json={"max_size": 500}, headers=ADMIN)).status_code == 409
        assert (await client.patch("/v1/admin/pools/nope", json={"max_size": 2}, headers=ADMIN)).status_code == 404
        assert (await client.patch("/v1/admin/pools/two", json={}, headers=ADMIN)).status_code == 422
        drained = (await client.post("/v1/admin/pools/one/drain", headers=ADMIN)).json()
        assert drained == {"tier": "one", "idle_replaced": 1, "busy_replaced_when_done": 0,
                           "starting_replaced_when_ready": 0}
        await until(lambda: backend.removed, "the drained container removed")
        metrics = (await client.get("/metrics")).text
        assert 'warmpool_container_replacements_total{reason="drained",tier="one"} 1.0' in metrics
        assert 'warmpool_min_idle{tier="two"} 3.0' in metrics
