"""The demand-driven warming policy and the tier bookkeeping that applies it (pure logic, no Docker)."""

import concurrent.futures
import math

import pytest

from pool.engine.container import ContainerHandle
from pool.engine.tier_pool import TierPool
from pool.model.resources import Resources
from pool.model.tiers import Tier
from pool.model.warming import (
    SOON_MAX_S,
    Demand,
    WarmingPolicy,
    demand_idle,
    idle_to_remove,
    waiters_to_start_for,
    warm_target,
)
from tests.polling import wait_for

MIB = 1024**2
POLICY = WarmingPolicy(window_s=10, quiet_s=30, burst_sigmas=2)


def target(rate_per_s: float, hold_s: float, *, min_idle: int = 1, ceiling: int = 50, quiet_for_s: float = 0,
           policy: WarmingPolicy = POLICY) -> int:
    return warm_target(policy, min_idle=min_idle, ceiling=ceiling, rate_per_s=rate_per_s, hold_s=hold_s,
                       quiet_for_s=quiet_for_s)


@pytest.mark.parametrize(("rate_per_s", "hold_s", "expected"), [
    (0, 1, 0),  # no demand
    (1, 0, 0),  # nothing came back yet: no hold time known
    (1, 1, 3),  # 1 busy on average, plus 2 sigmas (2 x 1)
    (10, 0.5, 10),  # 5 + 2 x sqrt(5) = 9.47
    (100, 0.01, 3),  # 1 + 2
    (0.1, 0.1, 1),  # a trickle still asks for one
    (20, 2, 53),  # 40 + 2 x sqrt(40) = 52.6
])
def test_demand_is_rate_times_hold_plus_poisson_margin(rate_per_s, hold_s, expected):
    assert demand_idle(rate_per_s, hold_s, burst_sigmas=2) == expected


def test_target_stays_between_min_idle_and_the_ceiling():
    assert target(0, 0, min_idle=2) == 2
    assert target(10, 0.5, min_idle=2) == 10
    assert target(10, 0.5, min_idle=2, ceiling=4) == 4
    assert target(10, 0.5, min_idle=6, ceiling=4) == 6, "the ceiling never pushes the target below min_idle"
    assert target(10, 0.5, min_idle=12) == 12


def test_a_quiet_tier_falls_back_to_min_idle():
    assert target(10, 0.5, quiet_for_s=29.9) == 10
    assert target(10, 0.5, quiet_for_s=30) == 1
    assert target(10, 0.5, quiet_for_s=math.inf) == 1


def test_disabled_warming_keeps_min_idle():
    assert target(10, 0.5, min_idle=2, policy=WarmingPolicy(enabled=False)) == 2


def test_demand_measures_rate_over_its_window_and_the_median_hold():
    demand = Demand()
    for i in range(20):
        demand.record_lease(100 + i * 0.5)  # 2 per second for 10 s
    assert demand.rate_per_s(now_s=109.5, window_s=10) == 2.0
    assert demand.rate_per_s(now_s=114.6, window_s=10) == pytest.approx(1.0), "older arrivals leave the window"
    assert demand.quiet_for_s(119.5) == pytest.approx(10)
    assert Demand().quiet_for_s(5) == math.inf and Demand().typical_hold_s() == 0
    for hold_s in (0.1, 0.2, 5.0):
        demand.record_hold(hold_s)
    assert demand.typical_hold_s() == 0.2, "the median: one slow task does not move it"


@pytest.mark.parametrize(("ages", "target_", "total", "max_size", "now", "expected"), [
    ([100, 50, 1], 1, 3, 8, False, 2),  # two above the target, both idle for longer than quiet_s
    ([100, 5, 1], 1, 3, 8, False, 1),  # only the least recently used one has been quiet long enough
    ([5, 5, 1], 1, 3, 8, False, 0),  # recently used: kept (no churn under steady load)
    ([5, 5, 1], 1, 3, 8, True, 2),  # an operator's resize removes at once
    ([1, 1, 1], 3, 6, 4, False, 2),  # over max_size: removed whatever their age
    ([1], 0, 5, 2, False, 1),  # over max_size by 3 but only one is idle (busy ones go when they return)
    ([], 0, 0, 2, True, 0),
])
def test_idle_to_remove(ages, target_, total, max_size, now, expected):
    assert idle_to_remove(idle_for_s=ages, target=target_, total=total, max_size=max_size, quiet_s=30,
                          now=now) == expected


TIER = Tier("t", Resources(0.5, 0, 64 * MIB, 32 * MIB), min_idle=1, max_size=6)


class Clock:
    def __init__(self) -> None:
        self.now_s = 1000.0

    def __call__(self) -> float:
        return self.now_s


class FakeChannel:
    alive = True

    def close(self) -> None:
        self.alive = False


def handle(serial: int, created_at: float = 0.0) -> ContainerHandle:
    h = ContainerHandle(TIER, f"id{serial}", f"c{serial}", ())
    h.channel = FakeChannel()  # type: ignore[assignment]
    h.created_at = created_at
    return h


def test_a_burst_raises_the_target_and_a_quiet_period_brings_it_back():
    clock = Clock()
    policy = WarmingPolicy(window_s=5, quiet_s=10, burst_sigmas=1)
    pool = TierPool(TIER, clock)
    for i in range(6):
        pool.offer(handle(i))
    assert pool.retune(policy, ledger_room=10) == [] and pool.target_idle == 1, "no demand yet: min_idle"
    leased = []
    for _ in range(6):  # a burst: six leases within half a second, each held over two seconds
        pool.note_lease()
        leased.append(pool.take_idle())
        clock.now_s += 0.1
    clock.now_s += 2
    for h in leased:
        pool.offer(h)
    # 6 leases in the 5 s window (1.2/s), median hold 2.35 s: 2.82 busy on average, + 1 sigma (1.68) -> 5
    assert pool.retune(policy, ledger_room=10) == [], "recently used containers are kept"
    assert pool.target_idle == 5
    clock.now_s += 9
    assert pool.retune(policy, ledger_room=10) == [] and pool.target_idle == 1, "the window is empty"
    clock.now_s += 1.5
    removed = pool.retune(policy, ledger_room=10)
    assert pool.target_idle == 1
    assert len(removed) == 5 and len(pool.idle) == 1 and {reason for _, reason in removed} == {"scaled_down"}
    assert pool.idle[0] is leased[-1], "the most recently used container stays"


def test_a_steady_trickle_of_long_tasks_keeps_more_warm():
    clock = Clock()
    pool = TierPool(TIER, clock)
    pool.offer(handle(0))
    for _ in range(8):  # 8 leases in 4 s, each held 0.5 s: 1.6/s x 0.5 s = 0.8, + 1 sigma (0.89) -> 2
        pool.note_lease()
        h = pool.take_idle()
        clock.now_s += 0.5
        pool.offer(h)
    pool.retune(WarmingPolicy(window_s=5, quiet_s=10, burst_sigmas=1), ledger_room=10)
    assert pool.target_idle == 2
    assert pool.starts_wanted() == 1


def test_the_ledger_and_max_size_cap_the_target():
    clock = Clock()
    pool = TierPool(TIER, clock)
    pool.offer(handle(0))
    for _ in range(20):
        pool.demand.record_lease(clock.now_s)
    pool.demand.record_hold(2.0)  # 4/s x 2 s = 8 busy on average: demand says 14
    policy = WarmingPolicy(window_s=5, quiet_s=10, burst_sigmas=2)
    pool.retune(policy, ledger_room=2)
    assert pool.target_idle == 3, "1 idle + room for 2 more"
    pool.retune(policy, ledger_room=50)
    assert pool.target_idle == 6, "max_size"


def test_lowering_max_size_removes_idle_containers_at_once():
    pool = TierPool(TIER, Clock())
    for i in range(4):
        pool.offer(handle(i))
    pool.max_size = 2
    removed = pool.retune(WarmingPolicy(), ledger_room=5)
    assert len(removed) == 2 and len(pool.idle) == 2


def test_a_drained_tier_replaces_returning_and_late_containers():
    clock = Clock()
    pool = TierPool(TIER, clock)
    old, new = handle(1, created_at=1.0), handle(2, created_at=3.0)
    pool.drained_at_s = 2.0
    assert pool.state_of(old).drained and not pool.state_of(new).drained
    pool.offer(old)  # a container that was starting during the drain
    pool.offer(new)
    assert pool.retune(WarmingPolicy(), ledger_room=5) == [(old, "drained")]
    assert list(pool.idle) == [new]


def test_a_tier_that_cannot_start_fails_its_waiters_and_backs_off():
    clock = Clock()
    pool = TierPool(TIER, clock)
    assert pool.refusal() is None
    backoffs = [pool.start_failed("no nvidia driver") for _ in range(10)]
    assert backoffs == sorted(backoffs) and backoffs[-1] == 60.0, "exponential, capped"
    refusal = pool.refusal()
    assert refusal is not None and "no nvidia driver" in str(refusal) and refusal.retry_after_s == 60
    clock.now_s += 61
    assert pool.refusal() is None, "after the backoff a lease may try again"
    pool.start_succeeded()
    assert pool.last_start_error is None and pool.start_failures == 0


BURST_TIERS = {"tiers": [
    {"name": "one", "cpu": 0.5, "ram": "96MiB", "storage": "32MiB", "min_idle": 1, "max_size": 1},
    {"name": "burst", "cpu": 0.25, "ram": "128MiB", "storage": "16MiB", "min_idle": 1, "max_size": 6},
]}
BURST_ENV = {"WARMPOOL_ADMIN_KEY": "warm-key", "WARMPOOL_WARM_WINDOW_S": "4", "WARMPOOL_WARM_QUIET_S": "3",
             "WARMPOOL_WARM_BURST_SIGMAS": "1"}


@pytest.mark.docker
def test_a_burst_on_one_tier_warms_it_and_it_idles_back_down(serve, docker_client):
    """Short windows (4 s rate window, 3 s quiet period) keep this to seconds; nothing asserts a duration."""
    service = serve(tiers=BURST_TIERS, env=BURST_ENV)

    def tiers() -> dict[str, dict]:
        body = service.client.get("/v1/admin/pools", headers={"authorization": "Bearer warm-key"}).json()
        return {t["name"]: t for t in body["tiers"]}

    def burst_containers() -> int:
        labels = [f"warmpool.instance={service.instance_id}", "warmpool.tier=burst"]
        return len(docker_client.api.containers(all=True, filters={"label": labels}))

    assert burst_containers() == 1
    seen_target, seen_idle, one_targets = 0, 0, set()
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(service.execute, "import time; time.sleep(0.5); print('ok')",
                               resources={"ram": "100MiB"}) for _ in range(12)]
        while True:  # watch the tiers during the burst and just after it
            now = tiers()
            seen_target = max(seen_target, now["burst"]["target_idle"])
            seen_idle = max(seen_idle, now["burst"]["idle"])
            one_targets.add(now["one"]["target_idle"])
            if all(f.done() for f in futures) and now["burst"]["busy"] == 0:
                break
    assert [f.result().json()["stdout"] for f in futures] == ["ok\n"] * 12
    after = tiers()["burst"]
    seen_target, seen_idle = max(seen_target, after["target_idle"]), max(seen_idle, after["idle"])
    assert seen_target > 1, "demand raised the warm target above min_idle"
    assert seen_idle > 1, "and the tier held more than min_idle warm"
    assert after["lease_rate_per_s"] > 0 and after["typical_hold_ms"] >= 500
    assert one_targets == {1}, "the other tier was not touched"

    wait_for(lambda: tiers()["burst"]["target_idle"] == 1, "the quiet tier's target back at min_idle")
    wait_for(lambda: burst_containers() == 1, "the quiet tier idled back down to one container")
    burst = tiers()["burst"]
    assert burst["idle"] == 1 and burst["replaced"].get("scaled_down", 0) >= 1


def test_a_container_still_cooling_after_its_reset_is_passed_over_for_a_rested_one():
    """One client, task after task on a 0.5-cpu tier: the most recent container is taken only once it has
    rested the tier's cooldown; until then the one that rested longest is (issue 15: two containers
    ping-ponged over their cpu quota and were throttled)."""
    clock = Clock()
    pool = TierPool(TIER, clock)
    assert pool.cooldown_s == pytest.approx(0.01), "5 ms of housekeeping cpu at 0.5 cpu"
    handles = [handle(i) for i in range(4)]
    for h in handles:
        pool.offer(h)
        clock.now_s += 1.0  # all rested
    served = []
    for _ in range(8):  # a task every 4 ms: each container gets one per ~16 ms, not every other task
        h = pool.take_idle()
        assert h is not None
        served.append(h.name)
        clock.now_s += 0.004
        pool.offer(h)
    assert served[:4] == ["c3", "c2", "c1", "c0"], "most recent first among the rested"
    assert served[4:] == ["c3", "c2", "c1", "c0"], "then the one that rested longest"
    clock.now_s += 1.0
    last = pool.take_idle()
    assert last is not None and last.name == "c0", "once all rested: the most recent again (the rest age out)"


def test_without_a_cooldown_the_most_recent_is_always_taken():
    clock = Clock()
    pool = TierPool(TIER, clock, housekeeping_cpu_s=0.0)
    for h in (handle(0), handle(1)):
        pool.offer(h)
    served = []
    for _ in range(4):
        h = pool.take_idle()
        assert h is not None
        served.append(h.name)
        clock.now_s += 0.004
        pool.offer(h)
    assert served == ["c1"] * 4


def test_a_dead_idle_container_is_never_lent():
    clock = Clock()
    pool = TierPool(TIER, clock)
    live, dead = handle(0), handle(1)
    pool.offer(live)
    pool.offer(dead)
    clock.now_s += 1.0
    dead.channel.alive = False  # type: ignore[union-attr]
    assert pool.take_idle() is live
    assert pool.take_idle() is None and not pool.idle


def test_a_waiter_gets_a_new_container_only_when_no_busy_one_comes_back_sooner():
    # 4 ms tasks: busy containers leased within the last 16 ms are as good as back.
    assert waiters_to_start_for(3, [0.001, 0.002, 0.5], typical_hold_s=0.004) == (1, pytest.approx(0.014))
    assert waiters_to_start_for(2, [0.001, 0.002, 0.003], typical_hold_s=0.004)[0] == 0
    # Long tasks (or a session holding its container): the window is capped, so waiters get new containers.
    assert waiters_to_start_for(2, [0.3, 5.0], typical_hold_s=10.0) == (2, math.inf)
    assert waiters_to_start_for(2, [0.1], typical_hold_s=10.0) == (1, pytest.approx(SOON_MAX_S - 0.1))
    # Nothing known yet, or nothing waits: every waiter counts, and there is nothing to recheck.
    assert waiters_to_start_for(2, [0.001], typical_hold_s=0.0) == (2, math.inf)
    assert waiters_to_start_for(0, [0.001], typical_hold_s=0.004) == (0, math.inf)
