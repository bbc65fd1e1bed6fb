"""The pools of a cluster seen from the API (scale-out mode; pure): tier totals over the workers' rows, the
cluster's capacity, and the check that new sizes fit every worker that would apply them.

Each worker keeps `min_idle`/`max_size` containers of a tier itself, so the totals are sums; a
percentile cannot be summed, so a tier's lease-wait p50/p95 is the highest of its workers' (the worst a
client sees).
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

from pool.model.capacity import HostInventory, check_sizes
from pool.model.errors import CapacityError, InvalidRequest
from pool.model.resources import Resources
from pool.model.snapshots import CapacitySnapshot, TierCounters, TierSnapshot
from pool.model.tiers import Tier


def tier_totals(tier: Tier, rows: list[TierSnapshot], queued: int | None = None,
                workers: int | None = None) -> TierSnapshot:
    """One tier summed over the workers' rows of it (counters too, when the rows have them)."""
    counters = [r.counters for r in rows if r.counters is not None]
    return TierSnapshot(
        tier=tier, min_idle=sum(r.min_idle for r in rows), max_size=sum(r.max_size for r in rows),
        idle=sum(r.idle for r in rows), busy=sum(r.busy for r in rows), starting=sum(r.starting for r in rows),
        target_idle=sum(r.target_idle or 0 for r in rows) if any(r.target_idle is not None for r in rows) else None,
        waiting=sum(r.waiting or 0 for r in rows) if any(r.waiting is not None for r in rows) else None,
        counters=_sum_counters(counters) if counters else None, workers=workers, queued=queued)


def _sum_counters(parts: list[TierCounters]) -> TierCounters:
    replaced: collections.Counter[str] = collections.Counter()
    for part in parts:
        replaced.update(dict(part.replaced))
    leases = sum(p.leases for p in parts)
    hold_ms = sum(p.typical_hold_ms * p.leases for p in parts) / leases if leases else 0.0
    return TierCounters(
        created=sum(p.created for p in parts), replaced=tuple(sorted(replaced.items())), leases=leases,
        lease_timeouts=sum(p.lease_timeouts for p in parts),
        lease_wait_p50_ms=max(p.lease_wait_p50_ms for p in parts),
        lease_wait_p95_ms=max(p.lease_wait_p95_ms for p in parts),
        lease_rate_per_s=sum(p.lease_rate_per_s for p in parts), typical_hold_ms=hold_ms,
        start_failures=sum(p.start_failures for p in parts),
        last_start_error=next((p.last_start_error for p in parts if p.last_start_error), None),
        unfit=next((p.unfit for p in parts if p.unfit), None),
        gpus_in_use=tuple(g for p in parts for g in p.gpus_in_use))


def cluster_capacity(parts: dict[str, CapacitySnapshot]) -> CapacitySnapshot:
    """The workers' ledgers added up (GPU ids are prefixed with their worker's id)."""
    cpus = sum(c.cpus for c in parts.values())
    budget = sum(c.cpu_budget for c in parts.values())
    return CapacitySnapshot(
        cpus=cpus, cpu_overcommit=budget / cpus if cpus else 1.0, cpu_budget=budget,
        cpu_held=sum(c.cpu_held for c in parts.values()), ram_bytes=sum(c.ram_bytes for c in parts.values()),
        ram_held_bytes=sum(c.ram_held_bytes for c in parts.values()),
        gpu_ids=tuple(f"{w}/{g}" for w, c in sorted(parts.items()) for g in c.gpu_ids),
        gpus_free=tuple(f"{w}/{g}" for w, c in sorted(parts.items()) for g in c.gpus_free))


def inventory_of(capacity: CapacitySnapshot) -> HostInventory:
    """The host inventory a worker's ledger snapshot describes."""
    return HostInventory(cpus=capacity.cpus, ram_bytes=capacity.ram_bytes, gpu_ids=capacity.gpu_ids,
                         cpu_overcommit=capacity.cpu_overcommit)


@dataclass(frozen=True)
class SizingTarget:
    """A worker that would apply new sizes of a tier: its host, its sizes of the tier now, and the other
    tiers it holds warm (resources and min_idle)."""

    worker_id: str
    host: str
    inventory: HostInventory
    current: tuple[int, int]  # (min_idle, max_size)
    others: tuple[tuple[Resources, int], ...]


def check_cluster_sizes(tier: Tier, targets: list[SizingTarget], min_idle: int | None,
                        max_size: int | None) -> None:
    """Every worker's own check (`check_sizes`), the first refusal naming its worker; nothing is applied
    anywhere unless all of them pass."""
    for target in targets:
        where = f"worker {target.worker_id!r} (host {target.host})"
        try:
            check_sizes(target.inventory, tier.name, tier.resources, target.current, min_idle, max_size,
                        list(target.others))
        except InvalidRequest as exc:
            raise InvalidRequest(exc.field, f"{exc.message} on {where}") from None
        except CapacityError as exc:
            raise CapacityError(f"{where}: {exc}") from None
