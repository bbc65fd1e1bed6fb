"""Cluster admin, API side (scale-out mode): see, size and drain the pools that live on the workers.

The view is the workers' heartbeats: each worker's row of each tier, and tier totals summed over them.
A resize is checked first against every live worker serving the tier, with the capacity each one reports
in its heartbeat (409 naming the first worker and dimension that cannot hold it; nothing is written
then), then stored in Redis (pool/scaleout/cluster_config.py) with a compare-and-set, so that two
concurrent resizes cannot both pass a check made against the other's absence. Workers apply it within a
fraction of a second and confirm; the answer waits for those confirmations (at most `APPLY_WAIT_S`) and
says, per worker, what was applied, refused (the worker's own ledger disagreed) or not confirmed yet
(pending: it applies the change when it reads it). A drain is asked for the same way.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from pool.model.capacity import check_size_range
from pool.model.cluster import check_cluster_sizes, cluster_capacity, tier_totals
from pool.model.errors import CapacityError, UnknownTier
from pool.model.snapshots import (
    AdminView,
    Drained,
    Persistence,
    PoolsSnapshot,
    Resized,
    TierSnapshot,
    WorkerChange,
)
from pool.model.tiers import Tier
from pool.scaleout.cluster_config import ConfigStore
from pool.scaleout.membership import SERVING, ClusterView, WorkerBeat, tier_row
from pool.settings import Settings

APPLY_WAIT_S = 3.0  # how long an admin answer waits for the workers to confirm a change
ACK_POLL_S = 0.05
CAS_ATTEMPTS = 3


class ClusterAdmin:
    """The scale-out dispatcher's admin side, over the cluster view it keeps fresh."""

    def __init__(self, settings: Settings, store: ConfigStore, cluster: ClusterView,
                 refresh: Callable[[], Awaitable[None]]) -> None:
        self.settings = settings
        self.store = store
        self.cluster = cluster
        self.refresh = refresh  # re-reads the heartbeats now
        self.tiers = {t.name: t for t in settings.tiers}

    def persistence(self) -> Persistence:
        return Persistence(persisted=True, note=(
            f"pool sizes changed here are kept in Redis ({self.store.prefix}:sizes:<tier>) and applied by every "
            "worker serving the tier, also by workers started later; they outlive a Redis restart when Redis "
            "persists its data (AOF, as scripts/ensure-redis.sh sets it up)"))

    def _tier(self, name: str) -> Tier:
        tier = self.tiers.get(name)
        if tier is None:
            raise UnknownTier(f"no tier {name!r}; tiers: {sorted(self.tiers)}")
        return tier

    async def view(self) -> AdminView:
        await self.refresh()
        rows = tuple(w.row(tier) for tier in self.settings.tiers for w in self.cluster.holding(tier.name))
        totals = tuple(tier_totals(tier, [r.tier for r in rows if r.tier.name == tier.name],
                                   queued=self.cluster.queued.get(tier.name, 0)) for tier in self.settings.tiers)
        capacities = {w.worker_id: w.capacity for w in self.cluster.workers.values() if w.capacity is not None}
        docker_ok = any(w.docker_ok for w in self.cluster.workers.values())
        pools = PoolsSnapshot(tiers=totals, capacity=cluster_capacity(capacities), warming=self.settings.warming,
                              docker_ok=docker_ok)
        return AdminView(pools=pools, persistence=self.persistence(), workers=rows)

    async def resize(self, tier_name: str, min_idle: int | None, max_size: int | None) -> Resized:
        tier = self._tier(tier_name)
        for _ in range(CAS_ATTEMPTS):
            await self.refresh()
            (config,) = (await self.store.read([tier.name])).values()
            holders = self._serving(tier)
            # What a worker started later applies: the stored sizes with this change, over the tiers file's.
            stored = (tier.min_idle if config.min_idle is None else config.min_idle,
                      tier.max_size if config.max_size is None else config.max_size)
            check_size_range(stored, min_idle, max_size)
            check_cluster_sizes(tier, [t for w in holders if (t := w.sizing_target(tier, self.settings.tiers))],
                                min_idle, max_size)
            change = await self.store.set_sizes(tier.name, config.change, min_idle, max_size)
            if change is not None:
                break
        else:
            raise CapacityError(f"the sizes of tier {tier.name!r} kept changing meanwhile; retry")
        changes = await self._confirmations(tier, change, holders)
        totals = tier_totals(tier, [c.tier for c in changes if c.tier is not None],
                             queued=self.cluster.queued.get(tier.name, 0))
        return Resized(tier=totals, persistence=self.persistence(), workers=changes)

    async def drain(self, tier_name: str) -> Drained:
        tier = self._tier(tier_name)
        await self.refresh()
        holders = self._serving(tier)
        change = await self.store.request_drain(tier.name)
        changes = await self._confirmations(tier, change, holders)
        done = [c.drained for c in changes if c.drained is not None]
        return Drained(tier_name=tier.name, idle_replaced=sum(d.idle_replaced for d in done),
                       busy_replaced_when_done=sum(d.busy_replaced_when_done for d in done),
                       starting_replaced_when_ready=sum(d.starting_replaced_when_ready for d in done),
                       workers=changes)

    def _serving(self, tier: Tier) -> list[WorkerBeat]:
        """The workers a change of the tier is for: live ones holding it, not those draining to stop."""
        return [w for w in self.cluster.holding(tier.name) if w.state == SERVING]

    async def _confirmations(self, tier: Tier, change: str, holders: list[WorkerBeat]) -> tuple[WorkerChange, ...]:
        """Wait (bounded) for each holder to confirm the change; what each did, or `pending`."""
        deadline = time.monotonic() + APPLY_WAIT_S
        wanted = {w.worker_id for w in holders}
        acks: dict[str, dict[str, Any]] = {}
        while True:
            acks = await self.store.acks(change)
            if wanted <= set(acks) or time.monotonic() >= deadline:
                break
            await asyncio.sleep(ACK_POLL_S)
        return tuple(_change_of(tier, w, acks.get(w.worker_id)) for w in holders)


def _change_of(tier: Tier, worker: WorkerBeat, ack: dict[str, Any] | None) -> WorkerChange:
    if ack is None:
        return WorkerChange(worker_id=worker.worker_id, host=worker.host, status="pending",
                            detail="not confirmed in time: the worker applies the change when it reads it",
                            tier=worker.row(tier).tier)
    snapshot: TierSnapshot | None = tier_row(tier, ack["tier"]) if isinstance(ack.get("tier"), dict) else None
    drained = None
    if isinstance(ack.get("drained"), dict):
        d = ack["drained"]
        drained = Drained(tier_name=tier.name, idle_replaced=int(d.get("idle_replaced", 0)),
                          busy_replaced_when_done=int(d.get("busy_replaced_when_done", 0)),
                          starting_replaced_when_ready=int(d.get("starting_replaced_when_ready", 0)))
    detail = ack.get("detail")
    return WorkerChange(worker_id=worker.worker_id, host=str(ack.get("host", worker.host)),
                        status=str(ack.get("status", "applied")), detail=None if detail is None else str(detail),
                        tier=snapshot, drained=drained)

