"""The pool's logic over a fake container backend (tests/fake_backend.py): no engine, milliseconds a test.

Leasing and waiting, retiring by use and age, replacement after a runner's death or an unclean reset,
an engine outage and its recovery, cold mode, demand-driven warming, admin resizes and drains, orphans,
shutdown. The real-engine tests (tests/test_service.py and the others marked `docker`) prove the same
behaviours against Docker; these pin the pool's decisions down quickly.
"""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
import socket
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from pool.engine import container as container_module
from pool.engine.admin import PoolAdmin
from pool.engine.backend import INSTANCE_LABEL, OWNER_LABEL, POOL_LABEL, TIER_LABEL
from pool.engine.manager import PoolManager
from pool.engine.sandbox_spec import owner_token
from pool.model.errors import BackendUnavailable, CapacityError, NoCapacity, Overloaded, TaskWithdrawn, UnknownTier
from pool.model.results import Status, TaskSpec
from pool.model.tasks import Execution
from pool.model.tiers import sorted_tiers, tier_from_dict
from pool.model.warming import WarmingPolicy
from pool.settings import Settings
from tests.fake_backend import FakeBackend
from tests.polling import until

pytestmark = pytest.mark.anyio

ONE = {"name": "one", "cpu": 0.5, "ram": "96MiB", "storage": "32MiB", "min_idle": 1, "max_size": 1}
TWO = {"name": "two", "cpu": 1, "ram": "256MiB", "storage": "128MiB", "min_idle": 2, "max_size": 4}

Pools = Callable[..., Awaitable[tuple[PoolManager, FakeBackend]]]


@pytest.fixture
async def pool_of() -> AsyncIterator[Pools]:
    """Start pools over fake backends (`await pool_of(tiers=[...], **settings)`); each is closed at the end
    and must leave no container and no runner behind."""
    made: list[tuple[PoolManager, FakeBackend]] = []

    async def make(tiers: list[dict[str, Any]] | None = None, backend: FakeBackend | None = None,
                   warm: bool = True, **fields: Any) -> tuple[PoolManager, FakeBackend]:
        entries = tiers or [ONE, TWO]
        settings = Settings(tiers=sorted_tiers(tuple(tier_from_dict(t, i) for i, t in enumerate(entries))),
                            instance_id=f"fake-{secrets.token_hex(3)}", **fields)
        backend = backend or FakeBackend()
        manager = PoolManager(settings, backend)
        made.append((manager, backend))
        await manager.start()
        if warm:
            assert await manager.wait_warm(5), "the pool warms to every tier's min_idle"
        return manager, backend

    yield make
    for manager, backend in made:
        await manager.close()
        instance_id = manager.settings.instance_id
        ours = [c.name for c in backend.containers.values() if c.labels.get(INSTANCE_LABEL) == instance_id]
        assert ours == [], "shutdown removes every container of the pool"
        assert backend.join() == [], "every runner double ended"


def spec(code: str = "print('hi')", **fields: Any) -> TaskSpec:
    return TaskSpec(task_id=secrets.token_hex(16), code=code, **fields)


def replaced(manager: PoolManager, tier: str) -> dict[str, int]:
    return dict(manager.pools[tier].stats.replaced)


async def settled(manager: PoolManager, tier: str, idle: int) -> None:
    """Wait until the tier has `idle` idle containers and nothing busy or starting."""
    pool = manager.pools[tier]
    await until(lambda: len(pool.idle) == idle and not pool.busy and not pool.starting,
                f"tier {tier} settles with {idle} idle")


# leasing -------------------------------------------------------------------------------------------------
async def test_a_task_runs_on_a_warm_container_and_the_next_one_reuses_it_without_an_engine_call(pool_of):
    manager, backend = await pool_of()
    (container,) = backend.by_tier("one")
    calls_before = dict(backend.calls)
    first = await manager.execute("one", spec("print('hi')"))
    await settled(manager, "one", idle=1)
    second = await manager.execute("one", spec("print('again')"))
    assert (first.result.status, first.result.stdout, second.result.stdout) == (Status.SUCCEEDED, "hi\n", "again\n")
    assert first.container_name == second.container_name == container.name
    assert container.codes == ["print('hi')", "print('again')"]
    assert backend.calls == calls_before, "no engine call on the task path"


async def test_a_lease_waits_for_the_busy_container_and_gets_it_when_it_comes_back(pool_of):
    manager, _ = await pool_of()
    busy = asyncio.create_task(manager.execute("one", spec("# fake: sleep=0.2")))
    await until(lambda: manager.pools["one"].busy, "the only container is busy")
    waited = await manager.execute("one", spec("print('after')"), wait_s=5)
    assert (await busy).container_name == waited.container_name and waited.result.stdout == "after\n"
    assert len(manager.pools["one"].stats.lease_wait_ms) == 2


async def test_no_container_in_time_is_no_capacity_with_a_retry_after(pool_of):
    manager, _ = await pool_of()
    busy = asyncio.create_task(manager.execute("one", spec("# fake: sleep=0.5")))
    await until(lambda: manager.pools["one"].busy, "the only container is busy")
    with pytest.raises(NoCapacity, match="no 'one' container became free within 0.05 s") as refused:
        await manager.execute("one", spec(), wait_s=0.05)
    assert refused.value.retry_after_s >= 1 and manager.pools["one"].stats.lease_timeouts == 1
    await busy


async def test_past_max_waiting_a_lease_is_refused_at_once(pool_of):
    manager, _ = await pool_of(max_waiting=1)
    busy = asyncio.create_task(manager.execute("one", spec("# fake: sleep=0.3")))
    await until(lambda: manager.pools["one"].busy, "the only container is busy")
    waiting = asyncio.create_task(manager.execute("one", spec(), wait_s=5))
    await until(lambda: manager.pools["one"].pending_waiters() == 1, "one lease waits")
    with pytest.raises(Overloaded, match="1 requests already wait"):
        await manager.execute("one", spec(), wait_s=5)
    assert (await waiting).result.status == Status.SUCCEEDED and (await busy).result.status == Status.SUCCEEDED


async def test_a_withdrawn_task_sends_no_code_and_the_container_stays(pool_of):
    manager, backend = await pool_of()

    async def no() -> bool:
        return False

    with pytest.raises(TaskWithdrawn, match="was withdrawn before it started"):
        await manager.execute("one", spec(), start_gate=no)
    await settled(manager, "one", idle=1)
    (container,) = backend.by_tier("one")
    assert container.codes == [] and replaced(manager, "one") == {}


async def test_a_cancelled_task_retires_its_container(pool_of):
    manager, backend = await pool_of()
    (old,) = backend.by_tier("one")
    task = asyncio.create_task(manager.execute("one", spec("# fake: sleep=0.3")))
    await until(lambda: old.codes, "the code reached the container")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await until(lambda: replaced(manager, "one") == {"cancelled": 1}, "the container retired")
    await settled(manager, "one", idle=1)
    assert old.name in backend.removed


# retiring ----------------------------------------------------------------------------------------------
async def test_max_uses_retires_a_container_after_its_last_task(pool_of):
    manager, _ = await pool_of(tiers=[{**ONE, "max_uses": 2}])
    names = []
    for _ in range(3):
        names.append((await manager.execute("one", spec())).container_name)
        await settled(manager, "one", idle=1)
    assert names[0] == names[1] != names[2]
    assert replaced(manager, "one") == {"use_limit": 1}


async def test_a_container_retires_at_its_own_share_of_max_uses(pool_of):
    manager, _ = await pool_of(tiers=[{**ONE, "max_uses": 4}])
    (first,) = manager.pools["one"].idle
    first.wear_share = 0.75  # drawn at start in [0.75, 1]: this one serves 3 of the tier's 4
    names = []
    for _ in range(4):
        names.append((await manager.execute("one", spec())).container_name)
        await settled(manager, "one", idle=1)
    assert names[:3] == [first.name] * 3 and names[3] != first.name
    assert replaced(manager, "one") == {"use_limit": 1}


async def test_a_waiter_is_left_to_a_busy_container_only_if_that_one_comes_back(pool_of):
    manager, _ = await pool_of(tiers=[{**ONE, "max_size": 2, "max_uses": 2}])
    pool = manager.pools["one"]
    for _ in range(8):
        pool.demand.record_hold(0.1)  # tasks hold a container 0.1 s: one leased just now is back within 0.2 s
    held = await manager.lease("one", 1)
    waiter = asyncio.get_running_loop().create_future()
    pool.waiters.append(waiter)
    try:
        assert pool._waiters_to_start_for()[0] == 0  # held comes back sooner than a start would
        assert 0 < pool.recheck_in_s() <= 0.2
        held.uses = 2  # its task wears it out: it will be replaced, not returned, so the waiter needs a start
        assert pool._waiters_to_start_for() == (1, float("inf"))
    finally:
        waiter.cancel()
        held.uses = 0
        manager.give_back(held)


async def test_max_age_retires_a_container_when_it_returns_and_when_it_idles(pool_of):
    manager, backend = await pool_of(tiers=[{**ONE, "max_age_s": 0.2}])
    first = await manager.execute("one", spec())
    await until(lambda: all(h.age_s >= 0.2 for h in manager.pools["one"].idle), "the container past its max age")
    assert (await manager.execute("one", spec())).container_name == first.container_name, "old, but not retired yet"
    await until(lambda: replaced(manager, "one").get("age_limit") == 1, "retired when it came back")
    await settled(manager, "one", idle=1)
    await until(lambda: all(h.age_s >= 0.2 for h in manager.pools["one"].idle), "the new one past its max age too")
    manager.wake()
    await until(lambda: replaced(manager, "one").get("age_limit") == 2, "an idle container past its age retired")
    await settled(manager, "one", idle=1)


@pytest.mark.parametrize(("code", "status", "reason"), [
    ("# fake: die", Status.SANDBOX_ERROR, "sandbox_error"),
    ("# fake: oom", Status.MEMORY_EXCEEDED, "memory_exceeded"),
    ("# fake: status=memory_exceeded", Status.MEMORY_EXCEEDED, "memory_exceeded"),
    ("# fake: dirty", Status.SUCCEEDED, "unclean_reset"),
])
async def test_a_container_that_cannot_vouch_for_itself_is_replaced(pool_of, code, status, reason):
    manager, backend = await pool_of()
    (old,) = backend.by_tier("one")
    execution = await manager.execute("one", spec(code))
    assert execution.result.status == status
    await until(lambda: replaced(manager, "one") == {reason: 1}, f"retired: {reason}")
    await settled(manager, "one", idle=1)
    (new,) = backend.by_tier("one")
    assert new.name != old.name and old.name in backend.removed
    assert (await manager.execute("one", spec())).container_name == new.name


async def test_a_hung_runner_is_a_sandbox_error_after_the_grace_and_is_replaced(pool_of, monkeypatch):
    monkeypatch.setattr(container_module, "RESULT_GRACE_S", 0.05)
    manager, _ = await pool_of()
    execution = await manager.execute("one", spec("# fake: silent", timeout_s=0.05))
    assert execution.result.status == Status.SANDBOX_ERROR and "did not answer" in execution.result.message
    await until(lambda: replaced(manager, "one") == {"sandbox_error": 1}, "the hung container retired")
    await settled(manager, "one", idle=1)


async def test_an_idle_container_killed_from_outside_is_replaced(pool_of):
    manager, backend = await pool_of()
    (old,) = backend.by_tier("one")
    backend.kill(old.container_id)
    await until(lambda: replaced(manager, "one") == {"runner_lost": 1}, "the dead container retired")
    await settled(manager, "one", idle=1)
    assert [c.name for c in backend.by_tier("one")] != [old.name]


# the engine ----------------------------------------------------------------------------------------------
async def test_an_engine_outage_fails_fast_and_the_pool_recovers(pool_of):
    manager, backend = await pool_of()
    (old,) = backend.by_tier("one")
    backend.down = True
    backend.kill(old.container_id)  # its removal fails: that is how the pool learns the engine is gone
    await until(lambda: not manager.docker_ok, "the pool sees the engine down")
    with pytest.raises(BackendUnavailable, match="not answering"):
        await manager.execute("one", spec(), wait_s=5)
    assert manager.snapshot().docker_ok is False and backend.error_counts()["remove"] >= 1
    backend.down = False
    manager.wake()
    await until(lambda: manager.docker_ok, "the engine is back", timeout_s=5)
    assert await manager.wait_warm(5)
    assert (await manager.execute("one", spec())).result.status == Status.SUCCEEDED
    assert old.container_id not in backend.containers, "the container whose removal failed was swept"


async def test_a_tier_the_engine_refuses_to_start_backs_off_and_refuses_leases(pool_of):
    backend = FakeBackend()
    backend.refuse_starts = 'could not select device driver "nvidia"'
    manager, _ = await pool_of(tiers=[{**ONE, "min_idle": 0}], backend=backend)
    with pytest.raises(NoCapacity, match="could not select device driver"):
        await manager.execute("one", spec(), wait_s=5)
    with pytest.raises(NoCapacity, match="cannot start containers") as refused:
        await manager.execute("one", spec(), wait_s=5)
    assert refused.value.retry_after_s >= 1 and backend.error_counts() == {"start": 1}, "no retry storm"
    assert manager.ledger.snapshot().cpu_held == 0, "the failed start gave its reservation back"


async def test_a_missing_image_stops_the_start():
    manager = PoolManager(Settings(tiers=sorted_tiers((tier_from_dict(ONE, 0),))), FakeBackend(image_present=False))
    with pytest.raises(Exception, match="python .warmpool-runner:latest.: build them with `warmpool image`"):
        await manager.start()
    await manager.close()


async def test_orphans_of_dead_pools_go_at_start_and_live_ones_stay(pool_of):
    backend = FakeBackend()
    dead = backend.add_stray({POOL_LABEL: "old", TIER_LABEL: "one", INSTANCE_LABEL: "old",
                              OWNER_LABEL: f"{socket.gethostname()}:1:gone"})  # pid 1 did not start at "gone"
    alive = backend.add_stray({POOL_LABEL: "other", TIER_LABEL: "one", INSTANCE_LABEL: "other",
                               OWNER_LABEL: owner_token()})
    await pool_of(backend=backend)
    assert dead not in backend.containers and alive in backend.containers
    backend.remove(alive)


# modes and warming ---------------------------------------------------------------------------------------
async def test_cold_mode_starts_a_container_per_task_and_never_reuses_one(pool_of):
    manager, backend = await pool_of(mode="cold")
    assert backend.containers == {}, "cold mode keeps nothing warm, and is ready at once"
    first = await manager.execute("one", spec())
    second = await manager.execute("one", spec())
    assert first.container_name != second.container_name
    await until(lambda: replaced(manager, "one") == {"cold_mode": 2}, "each retired after its task")
    assert backend.containers == {}


async def test_a_burst_warms_the_tier_beyond_min_idle(pool_of):
    policy = WarmingPolicy(window_s=5, quiet_s=30, burst_sigmas=1)
    manager, backend = await pool_of(tiers=[{**TWO, "min_idle": 1, "max_size": 6}], warming=policy)
    await asyncio.gather(*(manager.execute("two", spec("# fake: sleep=0.5"), wait_s=5) for _ in range(4)))
    manager.wake()
    pool = manager.pools["two"]
    await until(lambda: pool.target_idle > 1, "demand raises the warm target")
    # 4 leases in the 5 s window, held 0.5 s: 0.4 busy on average, + 1 sigma -> 2 (min_idle is 1); the
    # containers started for the burst stay while they are recently used (no churn)
    assert pool.target_idle == 2 and len(pool.idle) == len(backend.by_tier("two")) > pool.target_idle


# admin -------------------------------------------------------------------------------------------------
async def test_resizes_apply_at_once_and_what_the_host_cannot_hold_is_refused(pool_of):
    manager, backend = await pool_of()
    admin = PoolAdmin(manager)
    grown = await admin.resize("two", min_idle=4, max_size=None)
    assert (grown.tier.min_idle, grown.tier.max_size, grown.persistence.persisted) == (4, 4, False)
    await settled(manager, "two", idle=4)
    shrunk = await admin.resize("two", min_idle=1, max_size=1)
    assert (shrunk.tier.min_idle, shrunk.tier.max_size) == (1, 1)
    await until(lambda: replaced(manager, "two") == {"scaled_down": 3}, "three removed")
    await settled(manager, "two", idle=1)
    # The count goes up when a container leaves the pool; its removal from the engine follows in a thread.
    await until(lambda: len(backend.by_tier("two")) == 1, "the engine holds one container of the tier")
    with pytest.raises(CapacityError, match="max_size=500 for tier 'two' does not fit"):
        await admin.resize("two", min_idle=None, max_size=500)
    with pytest.raises(UnknownTier, match="no tier 'nope'"):
        admin.drain("nope")
    assert admin.view().pools.tiers[1].max_size == 1, "a refused resize changes nothing"


async def test_a_drain_replaces_idle_containers_now_and_busy_ones_when_they_return(pool_of):
    manager, backend = await pool_of()
    admin = PoolAdmin(manager)
    old_two = {c.name for c in backend.by_tier("two")}
    (old_one,) = backend.by_tier("one")
    busy = asyncio.create_task(manager.execute("one", spec("# fake: sleep=0.2")))
    await until(lambda: manager.pools["one"].busy, "one is busy")
    assert dataclasses.astuple(admin.drain("two"))[1:4] == (2, 0, 0)
    assert dataclasses.astuple(admin.drain("one"))[1:4] == (0, 1, 0)
    assert isinstance(await busy, Execution)
    await settled(manager, "two", idle=2)
    await settled(manager, "one", idle=1)
    assert old_two.isdisjoint(c.name for c in backend.by_tier("two")) and old_one.name in backend.removed
    assert replaced(manager, "two") == {"drained": 2} and replaced(manager, "one") == {"drained": 1}


async def test_a_container_that_was_starting_during_a_drain_is_never_leased(pool_of):
    """A drain replaces what was starting when it came: such a container, once ready, must not reach the idle
    queue (a session opened on it would be ended as drained a moment later)."""
    release = threading.Event()

    class SlowStarts(FakeBackend):
        def start(self, container_id: str) -> None:
            release.wait(10)
            super().start(container_id)

    backend = SlowStarts()
    manager, _ = await pool_of(tiers=[ONE], backend=backend, warm=False)
    pool = manager.pools["one"]
    await until(lambda: pool.starting == 1 and backend.containers, "one container is starting")
    (before_drain,) = backend.containers.values()
    assert dataclasses.astuple(PoolAdmin(manager).drain("one"))[1:4] == (0, 0, 1)
    release.set()
    handle = await until(lambda: next(iter(pool.idle), None), "a container is idle")
    assert handle.name != before_drain.name
    assert before_drain.name in backend.removed and replaced(manager, "one") == {"drained": 1}
