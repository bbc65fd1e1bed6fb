"""Every route reaches the pools through the one Dispatcher, and answers from the frozen values it returns.

In process (tests/inprocess.py runs the app's lifespan around an ASGI client): a recording dispatcher
shows which door each route knocks on; the scale-out dispatcher, over a real Redis with no worker, shows
that its admin side answers 409 through that same door while its tier view is the cluster's.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from api.app import create_app
from pool.model.errors import NotSupported, UnknownTier
from pool.model.results import Status, TaskResult, TaskSpec
from pool.model.sessions import SessionFigures, SessionInfo
from pool.model.snapshots import (
    AdminView,
    CapacitySnapshot,
    Drained,
    HistogramSnapshot,
    Persistence,
    PoolsSnapshot,
    Resized,
    TierCounters,
    TierSnapshot,
)
from pool.model.tasks import DueCallback, Execution, Submission, TaskState, TaskView
from pool.model.warming import WarmingPolicy
from pool.settings import Settings, from_env
from tests.conftest import TEST_TIERS
from tests.inprocess import serve_in_process

ADMIN = {"authorization": "Bearer door-admin"}
SETTINGS_ENV = {"WARMPOOL_ADMIN_KEY": "door-admin"}


@pytest.fixture
def settings(tmp_path: Path) -> Callable[..., Settings]:
    """Settings with the test tiers and an admin key, plus any WARMPOOL_* given."""
    tiers = tmp_path / "tiers.json"
    tiers.write_text(json.dumps(TEST_TIERS))

    def make(**env: str) -> Settings:
        return from_env({"WARMPOOL_TIERS_FILE": str(tiers), **SETTINGS_ENV, **env})
    return make


def tier_snapshot(s: Settings, name: str) -> TierSnapshot:
    tier = next(t for t in s.tiers if t.name == name)
    histogram = HistogramSnapshot(buckets=(("0.001", 3), ("+Inf", 4)), sum_s=0.25)
    counters = TierCounters(created=5, replaced=(("drained", 2),), leases=4, lease_timeouts=1,
                            lease_wait_p50_ms=0.5, lease_wait_p95_ms=7.0, lease_wait=histogram,
                            run_times=(("succeeded", histogram),))
    return TierSnapshot(tier=tier, min_idle=3, max_size=7, idle=2, busy=1, starting=0, target_idle=3,
                        waiting=0, counters=counters)


class RecordingDispatcher:
    """A Dispatcher that answers from canned values and notes every call."""

    def __init__(self, s: Settings, refuse_admin: Exception | None = None) -> None:
        self.settings = s
        self.calls: list[str] = []
        self.refuse_admin = refuse_admin

    def pools_snapshot(self) -> PoolsSnapshot:
        capacity = CapacitySnapshot(cpus=2, cpu_overcommit=16, cpu_budget=32, cpu_held=1.5, ram_bytes=8 << 30,
                                    ram_held_bytes=1 << 30, gpu_ids=(), gpus_free=())
        return PoolsSnapshot(tiers=tuple(tier_snapshot(self.settings, t.name) for t in self.settings.tiers),
                             capacity=capacity, warming=WarmingPolicy(), docker_ok=True,
                             docker_api_errors=(("ping", 2),))

    async def start(self) -> None:
        self.calls.append("start")

    async def close(self) -> None:
        self.calls.append("close")

    async def execute(self, tier_name: str, spec: TaskSpec, wait_s: float) -> Execution:
        self.calls.append(f"execute {tier_name}")
        tier = next(t for t in self.settings.tiers if t.name == tier_name)
        result = TaskResult(task_id=spec.task_id, status=Status.SUCCEEDED, exit_code=0, stdout="recorded\n")
        return Execution(result=result, tier=tier, queue_ms=0.0, container_name="c", worker="w")

    async def submit(self, tier_name: str, spec: TaskSpec, owner: str, callback_url: str = "") -> None:
        self.calls.append(f"submit {tier_name}")

    async def submit_many(self, submissions: Sequence[Submission], owner: str) -> None:
        self.calls.append("submit_many " + ",".join(s.tier_name for s in submissions))

    async def task(self, task_id: str, owner: str, wait_s: float = 0.0) -> TaskView | None:
        self.calls.append(f"task {wait_s:g}")
        return TaskView(task_id=task_id, state=TaskState.RUNNING, tier=self.settings.tiers[0])

    async def due_callbacks(self, limit: int, wait_s: float) -> list[DueCallback]:
        self.calls.append("due_callbacks")
        return []

    async def callback_finished(self, due: DueCallback, delivered: bool) -> None:
        self.calls.append("callback_finished")

    async def tiers(self) -> tuple[TierSnapshot, ...]:
        self.calls.append("tiers")
        return self.pools_snapshot().tiers

    async def readiness(self) -> dict[str, bool]:
        self.calls.append("readiness")
        return {"recorded": True}

    async def images(self) -> list[dict[str, Any]]:
        self.calls.append("images")
        return [{"name": "python", "docker_image": "recorded:tag", "python_version": "3.11.2", "packages": {},
                 "preloaded": [], "description": ""}]

    async def figures(self) -> PoolsSnapshot | None:
        self.calls.append("figures")
        return self.pools_snapshot()

    async def pools(self) -> AdminView:
        self.calls.append("pools")
        if self.refuse_admin:
            raise self.refuse_admin
        return AdminView(pools=self.pools_snapshot(), persistence=Persistence(persisted=False, note="n"))

    async def resize(self, tier_name: str, min_idle: int | None, max_size: int | None) -> Resized:
        self.calls.append(f"resize {tier_name} {min_idle} {max_size}")
        if self.refuse_admin:
            raise self.refuse_admin
        return Resized(tier=tier_snapshot(self.settings, tier_name), persistence=Persistence(False, "n"))

    async def drain(self, tier_name: str) -> Drained:
        self.calls.append(f"drain {tier_name}")
        if self.refuse_admin:
            raise self.refuse_admin
        return Drained(tier_name=tier_name, idle_replaced=2, busy_replaced_when_done=1, starting_replaced_when_ready=0)

    # sessions: canned, one live session of tier "one"
    def session_info(self, session_id: str = "0" * 32) -> SessionInfo:
        return SessionInfo(session_id=session_id, owner="o", tier=self.settings.tiers[0], image="python",
                           idle_timeout_s=60.0, busy=False, created_unix=1.0, idle_s=2.0, calls=3, worker="w",
                           container="c")

    async def open_session(self, tier_name: str, owner: str, image: str, idle_timeout_s: float,
                           wait_s: float) -> SessionInfo:
        self.calls.append(f"open_session {tier_name} {image} {idle_timeout_s:g}")
        return self.session_info()

    async def session(self, session_id: str, owner: str) -> SessionInfo:
        self.calls.append("session")
        return self.session_info(session_id)

    async def session_execute(self, session_id: str, owner: str, spec: TaskSpec) -> Execution:
        self.calls.append("session_execute")
        return await self.execute(self.settings.tiers[0].name, spec, 0.0)

    async def delete_session(self, session_id: str, owner: str) -> None:
        self.calls.append("delete_session")

    async def all_sessions(self) -> tuple[SessionInfo, ...]:
        self.calls.append("all_sessions")
        return (self.session_info(),)

    async def session_figures(self) -> SessionFigures:
        self.calls.append("session_figures")
        return SessionFigures(open_by_tier=(("one", 1), ("two", 0)), ended_by_reason=(("deleted", 2),))


pytestmark = pytest.mark.anyio


@pytest.fixture
async def recorded(settings) -> AsyncIterator[tuple[httpx.AsyncClient, RecordingDispatcher]]:
    s = settings()
    dispatcher = RecordingDispatcher(s)
    async with serve_in_process(create_app(s, dispatcher_factory=lambda _: dispatcher)) as client:
        yield client, dispatcher
    assert dispatcher.calls[-1] == "close", "the lifespan closes the dispatcher"


async def test_task_routes_go_through_the_dispatcher(recorded):
    client, dispatcher = recorded
    assert (await client.post("/v1/execute", json={"code": "x", "resources": {"ram": "200MiB"}})).json()["stdout"] == \
        "recorded\n"
    accepted = (await client.post("/v1/tasks", json={"code": "x"})).json()
    assert (await client.get(accepted["link"])).json() == {"id": accepted["id"], "status": "running"}
    assert (await client.get(accepted["link"], params={"wait_s": 2})).json()["status"] == "running"
    batch = await client.post("/v1/tasks/batch", json={"tasks": [{"code": "x"}, {"code": "y", "resources": {
        "ram": "200MiB"}}]})
    assert batch.status_code == 202 and len(batch.json()["tasks"]) == 2
    assert (await client.get("/readyz")).json() == {"ready": True, "checks": {"recorded": True}}
    assert (await client.get("/v1/images")).json()[0]["docker_image"] == "recorded:tag"
    assert dispatcher.calls == ["start", "execute two", "submit one", "task 0", "task 2", "submit_many one,two",
                                "readiness", "images"]


async def test_tier_views_admin_and_metrics_are_rendered_from_the_dispatchers_snapshots(recorded):
    client, dispatcher = recorded
    tiers = (await client.get("/v1/tiers")).json()
    assert [t["name"] for t in tiers] == ["one", "two"]
    assert tiers[0] == {"name": "one", "image": "python", "cpu": 0.5, "gpu": 0, "ram_bytes": 96 << 20,
                        "storage_bytes": 32 << 20, "runtime": "runc", "min_idle": 3, "max_size": 7, "idle": 2,
                        "busy": 1, "starting": 0}
    pools = (await client.get("/v1/admin/pools", headers=ADMIN)).json()
    assert pools["tiers"][1]["replaced"] == {"drained": 2} and pools["tiers"][1]["lease_wait_ms"] == {
        "p50": 0.5, "p95": 7.0}
    assert pools["capacity"]["cpu_held"] == 1.5 and pools["persisted"] is False and pools["warming"]["enabled"]
    resized = (await client.patch("/v1/admin/pools/two", json={"min_idle": 3}, headers=ADMIN)).json()
    assert (resized["name"], resized["min_idle"], resized["target_idle"]) == ("two", 3, 3)
    assert (await client.post("/v1/admin/pools/two/drain", headers=ADMIN)).json() == {
        "tier": "two", "idle_replaced": 2, "busy_replaced_when_done": 1, "starting_replaced_when_ready": 0}
    metrics = (await client.get("/metrics")).text
    assert 'warmpool_containers{state="busy",tier="two"} 1.0' in metrics
    assert 'warmpool_container_replacements_total{reason="drained",tier="one"} 2.0' in metrics
    assert 'warmpool_lease_wait_seconds_bucket{le="0.001",tier="one"} 3.0' in metrics
    assert 'warmpool_docker_api_errors_total{operation="ping"} 2.0' in metrics
    assert "warmpool_request_duration_seconds_count" in metrics
    assert 'warmpool_sessions{tier="one"} 1.0' in metrics
    assert 'warmpool_sessions_ended_total{reason="deleted"} 2.0' in metrics
    assert dispatcher.calls == ["start", "tiers", "pools", "resize two 3 None", "drain two", "figures",
                                "session_figures"]


async def test_session_routes_go_through_the_dispatcher(recorded):
    client, dispatcher = recorded
    opened = await client.post("/v1/sessions", json={"idle_timeout_s": 30})
    assert opened.status_code == 201 and opened.json()["calls"] == 3
    sid = opened.json()["id"]
    assert (await client.get(f"/v1/sessions/{sid}")).json()["idle_s"] == 2.0
    assert (await client.post(f"/v1/sessions/{sid}/execute", json={"code": "x"})).json()["stdout"] == "recorded\n"
    assert (await client.delete(f"/v1/sessions/{sid}")).status_code == 204
    assert (await client.get("/v1/admin/sessions", headers=ADMIN)).json()["count"] == 1
    assert dispatcher.calls == ["start", "open_session one python 30", "session", "session_execute", "execute one",
                                "delete_session", "all_sessions"]


@pytest.mark.parametrize(("refusal", "status"), [(NotSupported("no pool here"), 409),
                                                 (UnknownTier("no tier 'x'"), 404)])
async def test_admin_refusals_come_through_the_door(settings, refusal: Exception, status: int):
    s = settings()
    dispatcher = RecordingDispatcher(s, refuse_admin=refusal)
    async with serve_in_process(create_app(s, dispatcher_factory=lambda _: dispatcher)) as client:
        for method, path in (("GET", "/v1/admin/pools"), ("PATCH", "/v1/admin/pools/x"),
                             ("POST", "/v1/admin/pools/x/drain")):
            response = await client.request(method, path, json={"max_size": 2}, headers=ADMIN)
            assert (response.status_code, response.json()) == (status, {"detail": str(refusal)})
    assert dispatcher.calls[1:4] == ["pools", "resize x None 2", "drain x"]


@pytest.mark.redis
async def test_scale_out_admin_goes_through_the_door_and_tiers_are_the_clusters(settings, redis_url: str):
    """The real scale-out dispatcher over a real Redis, with no worker: the cluster's sizes are kept for
    workers to come, nothing is served (tests/test_cluster.py has the workers)."""
    prefix = f"door-{secrets.token_hex(4)}"
    s = settings(WARMPOOL_REDIS_URL=redis_url, WARMPOOL_REDIS_PREFIX=prefix)
    async with serve_in_process(create_app(s)) as client:
        pools = (await client.get("/v1/admin/pools", headers=ADMIN)).json()
        assert [(t["name"], t["idle"], t["workers"]) for t in pools["tiers"]] == [("one", 0, []), ("two", 0, [])]
        assert pools["persisted"] is True and f"{prefix}:sizes:" in pools["note"]
        resized = (await client.patch("/v1/admin/pools/two", json={"min_idle": 1}, headers=ADMIN)).json()
        assert resized["workers"] == [] and resized["persisted"] is True
        refused = await client.patch("/v1/admin/pools/two", json={"min_idle": 9}, headers=ADMIN)
        assert refused.status_code == 422 and "max_size" in refused.text, "checked against the stored sizes"
        assert (await client.post("/v1/admin/pools/one/drain", headers=ADMIN)).json() == {
            "tier": "one", "idle_replaced": 0, "busy_replaced_when_done": 0, "starting_replaced_when_ready": 0,
            "workers": []}
        assert (await client.patch("/v1/admin/pools/nine", json={"min_idle": 1}, headers=ADMIN)).status_code == 404
        tiers: list[dict[str, Any]] = (await client.get("/v1/tiers")).json()
        assert [(t["name"], t["workers"], t["queued"], t["idle"]) for t in tiers] == [("one", 0, 0, 0),
                                                                                       ("two", 0, 0, 0)]
        assert (await client.get("/readyz")).json() == {"ready": False, "checks": {"redis": True, "workers": False}}
        metrics = (await client.get("/metrics")).text
        assert "warmpool_request_duration_seconds" in metrics and "warmpool_containers" not in metrics
    cleanup = redis.Redis.from_url(redis_url)
    keys = list(cleanup.scan_iter(f"{prefix}:*"))
    assert keys, "the sizes were kept in Redis"
    cleanup.delete(*keys)
    cleanup.close()
