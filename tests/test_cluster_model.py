"""The cluster's pure parts: tier totals over workers' rows, the sizing check across workers, and a
heartbeat's round trip (no Redis, no engine)."""

from __future__ import annotations

import pytest

from pool.model.capacity import HostInventory
from pool.model.cluster import SizingTarget, check_cluster_sizes, cluster_capacity, tier_totals
from pool.model.errors import CapacityError, InvalidRequest
from pool.model.resources import Resources
from pool.model.snapshots import CapacitySnapshot, PoolsSnapshot, TierCounters, TierSnapshot
from pool.model.tiers import Tier
from pool.model.warming import WarmingPolicy
from pool.scaleout.membership import DRAINING, ClusterView, beat_json, parse_beat

MIB = 1024 ** 2
TWO = Tier("two", Resources(cpu=1.0, gpu=0, ram_bytes=256 * MIB, storage_bytes=128 * MIB), min_idle=2, max_size=4)
ONE = Tier("one", Resources(cpu=0.5, gpu=0, ram_bytes=96 * MIB, storage_bytes=32 * MIB), min_idle=1, max_size=1)


def row(idle: int, p95: float, leases: int, replaced: tuple = ()) -> TierSnapshot:
    counters = TierCounters(created=idle, replaced=replaced, leases=leases, lease_wait_p50_ms=p95 / 2,
                            lease_wait_p95_ms=p95, lease_rate_per_s=1.5, typical_hold_ms=10.0 * leases)
    return TierSnapshot(tier=TWO, min_idle=2, max_size=4, idle=idle, busy=1, starting=0, target_idle=2, waiting=0,
                        counters=counters)


def test_tier_totals_add_up_the_workers_and_keep_the_worst_percentile():
    total = tier_totals(TWO, [row(2, 3.0, 10, (("drained", 2),)), row(3, 9.0, 30, (("drained", 1), ("aged", 4)))],
                        queued=5)
    assert (total.min_idle, total.max_size, total.idle, total.busy, total.target_idle) == (4, 8, 5, 2, 4)
    c = total.counters
    assert c is not None and c.leases == 40 and dict(c.replaced) == {"drained": 3, "aged": 4}
    assert (c.lease_wait_p95_ms, c.lease_rate_per_s) == (9.0, 3.0)
    assert c.typical_hold_ms == pytest.approx((100 * 10 + 300 * 30) / 40)
    assert total.as_dict()["queued"] == 5 and "workers" not in total.as_dict()
    empty = tier_totals(TWO, [])
    assert (empty.min_idle, empty.idle, empty.counters) == (0, 0, None)


def target(name: str, ram_mib: int, current=(2, 4)) -> SizingTarget:
    return SizingTarget(worker_id=name, host="h", inventory=HostInventory(cpus=2, ram_bytes=ram_mib * MIB,
                                                                          cpu_overcommit=16),
                        current=current, others=((ONE.resources, 1),))


def test_new_sizes_are_checked_on_every_worker_and_the_refusal_names_it():
    targets = [target("big", 20_000), target("small", 1200)]
    check_cluster_sizes(TWO, targets, min_idle=3, max_size=4)
    with pytest.raises(CapacityError, match="worker 'small' .*max_size=5 .*memory"):
        check_cluster_sizes(TWO, targets, min_idle=None, max_size=5)
    with pytest.raises(InvalidRequest, match="min_idle: must be between 0 and max_size \\(3\\).* on worker 'big'"):
        check_cluster_sizes(TWO, [target("big", 20_000, current=(2, 3))], min_idle=4, max_size=None)


def test_a_heartbeat_round_trips_into_rows_targets_and_totals():
    capacity = CapacitySnapshot(cpus=2, cpu_overcommit=16, cpu_budget=32, cpu_held=1.5, ram_bytes=1200 * MIB,
                                ram_held_bytes=608 * MIB, gpu_ids=("0",), gpus_free=("0",))
    pools = PoolsSnapshot(tiers=(row(2, 3.0, 10),), capacity=capacity, warming=WarmingPolicy(), docker_ok=True)
    beat = parse_beat(beat_json("wk", pools, {"two": 1}, state=DRAINING, refused={"two": "memory: no"},
                                engine="unix:///e2.sock"))
    assert beat is not None and beat.capacity == capacity and beat.state == DRAINING
    r = beat.row(TWO)
    assert (r.engine, r.inflight, r.sizes_refused, r.tier) == ("unix:///e2.sock", 1, "memory: no", row(2, 3.0, 10))
    assert r.as_dict()["min_idle"] == 2 and "ram_bytes" not in r.as_dict()
    t = beat.sizing_target(TWO, (ONE, TWO))
    assert t is not None and t.current == (2, 4) and t.others == ()  # the worker holds no tier "one"
    view = ClusterView(redis_ok=True, workers={"wk": beat})
    assert view.serving("two") == [] and view.holding("two") == [beat], "a draining worker serves nothing"
    assert cluster_capacity({"wk": capacity, "wk2": capacity}).gpu_ids == ("wk/0", "wk2/0")
    assert parse_beat("{}") is None
