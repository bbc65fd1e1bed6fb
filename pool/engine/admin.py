"""Operator controls over the live pools: a view of every tier, resizing within the ledger, draining.

No HTTP here (`api/admin.py` maps these to routes). Resizes take effect at once: the warm target is
recomputed, idle containers beyond it or beyond a lowered max_size are removed now, busy ones above
max_size when their task ends, and missing ones start in the background. They last until the service
stops, unless `WARMPOOL_POOL_SIZES_FILE` names a file to keep them in (see pool/sizes_file.py).
"""

from __future__ import annotations

import asyncio
import logging
import time

import anyio

from pool.engine.manager import PoolManager
from pool.engine.tier_pool import TierPool
from pool.model.capacity import check_sizes
from pool.model.errors import InvalidRequest, UnknownTier
from pool.model.lifecycle import RetireReason
from pool.model.snapshots import AdminView, Drained, Persistence, Resized
from pool.sizes_file import load_sizes, save_sizes

log = logging.getLogger(__name__)

NOT_PERSISTED = ("not persisted: pool sizes changed here last until the service stops; set "
                 "WARMPOOL_POOL_SIZES_FILE to keep them across restarts")


def check_resize(manager: PoolManager, pool: TierPool, min_idle: int | None, max_size: int | None) -> None:
    """Raise InvalidRequest or CapacityError when the sizes make no sense or do not fit this host's ledger."""
    others = [(p.tier.resources, p.min_idle) for p in manager.pools.values() if p is not pool]
    check_sizes(manager.ledger.inventory, pool.tier.name, pool.tier.resources, (pool.min_idle, pool.max_size),
                min_idle, max_size, others)


class PoolAdmin:
    """Resizes and drains one manager's pools; serialises writes of the optional sizes file."""

    def __init__(self, manager: PoolManager) -> None:
        self.manager = manager
        self.sizes_file = manager.settings.pool_sizes_file
        self._file_lock = asyncio.Lock()

    def persistence(self) -> Persistence:
        if self.sizes_file is None:
            return Persistence(persisted=False, note=NOT_PERSISTED)
        return Persistence(persisted=True, sizes_file=self.sizes_file,
                           note=f"pool sizes changed here are kept in {self.sizes_file} and applied at the next start")

    def pool(self, tier_name: str) -> TierPool:
        """The tier's pool, or UnknownTier naming the tiers there are."""
        pool = self.manager.pools.get(tier_name)
        if pool is None:
            raise UnknownTier(f"no tier {tier_name!r}; tiers: {sorted(self.manager.pools)}")
        return pool

    def set_sizes(self, tier_name: str, min_idle: int | None, max_size: int | None) -> TierPool:
        """Check the sizes against the ledger and apply them now, without awaiting anything (a worker applies
        the cluster's sizes this way before its replenisher first runs)."""
        pool = self.pool(tier_name)
        check_resize(self.manager, pool, min_idle, max_size)
        if min_idle is not None:
            pool.min_idle = min_idle
        if max_size is not None:
            pool.max_size = max_size
        pool.reset_backoff()
        self.manager.retune(pool, now=True)
        self.manager.wake()
        return pool

    def view(self) -> AdminView:
        return AdminView(pools=self.manager.snapshot(), persistence=self.persistence())

    async def resize(self, tier_name: str, min_idle: int | None, max_size: int | None) -> Resized:
        """Set the tier's sizes (checked against the ledger), apply them now, and keep them if configured."""
        pool = self.set_sizes(tier_name, min_idle, max_size)
        persistence = self.persistence()
        if self.sizes_file is not None:
            try:
                await self._save(tier_name, pool.min_idle, pool.max_size)
            except (OSError, InvalidRequest) as exc:
                log.error("could not keep the sizes of tier %s: %s", tier_name, exc)
                persistence = Persistence(persisted=False, note=f"applied, but not kept: {exc}")
        return Resized(tier=pool.snapshot(self.manager.settings.warming.window_s), persistence=persistence)

    def drain(self, tier_name: str) -> Drained:
        """Replace every idle container of the tier now, and every busy one when its task ends."""
        pool = self.pool(tier_name)
        pool.drained_at_s = time.monotonic()
        pool.reset_backoff()
        idle = pool.take_all_idle()
        for handle in idle:
            self.manager.retire(handle, RetireReason.DRAINED)
        self.manager.wake()
        return Drained(tier_name=tier_name, idle_replaced=len(idle), busy_replaced_when_done=len(pool.busy),
                       starting_replaced_when_ready=pool.starting)

    async def _save(self, tier_name: str, min_idle: int, max_size: int) -> None:
        path = self.sizes_file
        assert path is not None

        def update() -> None:
            sizes = load_sizes(path)
            sizes[tier_name] = {"min_idle": min_idle, "max_size": max_size}
            save_sizes(path, sizes)

        async with self._file_lock:
            await anyio.to_thread.run_sync(update)
