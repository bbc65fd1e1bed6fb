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
from pool.model.errors import CapacityError, InvalidRequest, UnknownTier
from pool.model.lifecycle import RetireReason
from pool.model.snapshots import AdminView, Drained, Persistence, Resized
from pool.sizes_file import load_sizes, save_sizes

log = logging.getLogger(__name__)

NOT_PERSISTED = ("not persisted: pool sizes changed here last until the service stops; set "
                 "WARMPOOL_POOL_SIZES_FILE to keep them across restarts")


def check_resize(manager: PoolManager, pool: TierPool, min_idle: int | None, max_size: int | None) -> None:
    """Raise InvalidRequest for sizes that make no sense, CapacityError for sizes the host cannot hold.

    A tier's new min_idle or max_size must fit the host ledger alongside every other tier's min_idle:
    the sizes an operator sets are then reachable, whatever the other tiers' demand.
    """
    new_min = pool.min_idle if min_idle is None else min_idle
    new_max = pool.max_size if max_size is None else max_size
    if new_max < 1:
        raise InvalidRequest("max_size", f"must be at least 1, got {new_max}")
    if not 0 <= new_min <= new_max:
        raise InvalidRequest("min_idle", f"must be between 0 and max_size ({new_max}), got {new_min}")
    others = [(p.tier.resources, p.min_idle) for p in manager.pools.values() if p is not pool]
    for name, count in (("min_idle", min_idle), ("max_size", max_size)):
        if count is None:
            continue
        try:
            manager.ledger.check_plan([(pool.tier.resources, count), *others])
        except CapacityError as exc:
            raise CapacityError(f"{name}={count} for tier {pool.tier.name!r} does not fit the host alongside "
                                f"the other tiers' min_idle: {exc}") from None


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

    def view(self) -> AdminView:
        return AdminView(pools=self.manager.snapshot(), persistence=self.persistence())

    async def resize(self, tier_name: str, min_idle: int | None, max_size: int | None) -> Resized:
        """Set the tier's sizes (checked against the ledger), apply them now, and keep them if configured."""
        pool = self.pool(tier_name)
        check_resize(self.manager, pool, min_idle, max_size)
        if min_idle is not None:
            pool.min_idle = min_idle
        if max_size is not None:
            pool.max_size = max_size
        pool.reset_backoff()
        self.manager.retune(pool, now=True)
        self.manager.wake()
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
