"""A worker's side of cluster admin: apply the stored pool sizes and drains of its tiers, and confirm each.

The worker reads the stored configs before its pool starts and applies the sizes right after the pool
has read the host's capacity, before the replenisher first runs, so a worker started later warms to the
cluster's sizes at once. Then it polls the config version (one GET every `POLL_S`) and, when it moves,
applies what changed through the same `PoolAdmin` embedded mode uses, so sizes are checked against this
host's own ledger here too. Sizes that do not fit (another host's capacity was checked by the API, or
this worker started on a smaller host) are refused: the worker keeps its sizes, says why in its
heartbeat, and confirms the change as refused. See pool/scaleout/cluster_config.py for the keys.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from pool.engine.admin import PoolAdmin
from pool.engine.manager import PoolManager
from pool.model.errors import BackendUnavailable, CapacityError, InvalidRequest
from pool.model.snapshots import Drained
from pool.scaleout.cluster_config import ConfigStore, TierConfig

log = logging.getLogger(__name__)

POLL_S = 0.25


class ConfigFollower:
    """Follows the stored configs of the tiers one worker serves."""

    def __init__(self, worker_id: str, host: str, pool: PoolManager, store: ConfigStore) -> None:
        self.worker_id = worker_id
        self.host = host
        self.pool = pool
        self.admin = PoolAdmin(pool)
        self.store = store
        self.tier_names = list(pool.pools)
        self.refused: dict[str, str] = {}  # tier -> why its stored sizes were not applied (heartbeat)
        self._version: str | None = None
        self._seen: dict[str, TierConfig] = {}

    async def load(self) -> dict[str, TierConfig]:
        """The stored configs, read before the pool starts; none when Redis does not answer yet."""
        try:
            self._version = await self.store.version()
            return await self.store.read(self.tier_names)
        except BackendUnavailable as exc:
            log.warning("%s: starting with the tiers file's sizes; stored ones are applied once Redis answers", exc)
            return {}

    def apply_initial(self, configs: dict[str, TierConfig]) -> None:
        """Apply the stored sizes now (no await: the replenisher has not run yet); past drains are seen."""
        for name, config in configs.items():
            self._apply_sizes(name, config)
            self._seen[name] = config

    async def loop(self, closing: Callable[[], bool]) -> None:
        """Poll the version; apply and confirm whatever changed. `closing()` ends it (TaskOwner.closing)."""
        while not closing():
            await asyncio.sleep(POLL_S)
            try:
                version = await self.store.version()
                if version == self._version:
                    continue
                configs = await self.store.read(self.tier_names)
                for name, config in configs.items():
                    if config.change != self._seen.get(name, TierConfig()).change:
                        await self._apply(name, config)
                self._version = version
            except BackendUnavailable as exc:
                log.debug("%s", exc)

    async def _apply(self, tier_name: str, config: TierConfig) -> None:
        # A tier first seen here (Redis did not answer at start) has no past drain to catch up on: its
        # containers are new. Its sizes are applied.
        first_sight = tier_name not in self._seen
        seen = self._seen.get(tier_name, TierConfig())
        drained: Drained | None = None
        if not first_sight and config.drain is not None and config.drain != seen.drain:
            drained = self.admin.drain(tier_name)
            log.info("drained tier %s (cluster change %s): %d idle replaced", tier_name, config.change,
                     drained.idle_replaced)
        detail = None
        if (config.min_idle, config.max_size) != (seen.min_idle, seen.max_size):
            detail = self._apply_sizes(tier_name, config)
        self._seen[tier_name] = config
        snapshot = self.pool.pools[tier_name].snapshot(self.pool.settings.warming.window_s)
        body: dict[str, Any] = {"host": self.host, "status": "refused" if detail else "applied",
                                "tier": snapshot.as_dict()}
        if detail:
            body["detail"] = detail
        if drained is not None:
            body["drained"] = drained.counts_dict()
        if config.change:  # "" is a Redis that lost the config: nobody waits for that
            await self.store.acknowledge(config.change, self.worker_id, body)

    def _apply_sizes(self, tier_name: str, config: TierConfig) -> str | None:
        """Set the stored sizes; the reason when this host cannot hold them (nothing is changed then)."""
        if config.min_idle is None and config.max_size is None:
            return None
        try:
            self.admin.set_sizes(tier_name, config.min_idle, config.max_size)
        except (CapacityError, InvalidRequest) as exc:
            log.warning("not applying the cluster's sizes of tier %s here: %s", tier_name, exc)
            self.refused[tier_name] = str(exc)
            return str(exc)
        self.refused.pop(tier_name, None)
        log.info("tier %s: min_idle=%d max_size=%d (cluster sizes)", tier_name, self.pool.pools[tier_name].min_idle,
                 self.pool.pools[tier_name].max_size)
        return None
