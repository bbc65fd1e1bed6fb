"""Frozen pictures of the pools, taken at one moment: what the API, the admin routes, heartbeats and
/metrics read instead of live objects (pure: no I/O).

The engine builds them (`TierPool.snapshot`, `PoolManager.snapshot`); scale-out builds `TierSnapshot`s
by summing its workers' heartbeats. `as_dict` is the one JSON shape of a tier, everywhere it is shown.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pool.model.tiers import Tier
from pool.model.warming import WarmingPolicy


@dataclass(frozen=True)
class HistogramSnapshot:
    """Cumulative counts per upper bound, Prometheus-style (``"+Inf"`` last), and their sum in seconds."""

    buckets: tuple[tuple[str, int], ...]
    sum_s: float


@dataclass(frozen=True)
class TierCounters:
    """One tier's counters since start and recent figures (what only a pool that holds the tier knows)."""

    created: int = 0
    replaced: tuple[tuple[str, int], ...] = ()  # by reason, sorted
    leases: int = 0
    lease_timeouts: int = 0
    lease_wait_p50_ms: float = 0.0
    lease_wait_p95_ms: float = 0.0
    lease_rate_per_s: float = 0.0
    typical_hold_ms: float = 0.0
    start_failures: int = 0
    last_start_error: str | None = None
    unfit: str | None = None  # why the host can never hold one of its containers
    gpus_in_use: tuple[str, ...] = ()
    lease_wait: HistogramSnapshot | None = None
    run_times: tuple[tuple[str, HistogramSnapshot], ...] = ()  # by task status, sorted


@dataclass(frozen=True)
class TierSnapshot:
    """A tier's sizes and live counts; `counters` when this process holds the pool, `workers` and
    `queued` in scale-out mode (counts summed over the live workers serving it)."""

    tier: Tier
    min_idle: int
    max_size: int
    idle: int
    busy: int
    starting: int
    target_idle: int | None = None
    waiting: int | None = None
    counters: TierCounters | None = None
    workers: int | None = None
    queued: int | None = None

    @property
    def name(self) -> str:
        return self.tier.name

    def counts_dict(self) -> dict[str, Any]:
        """`as_dict` without the tier's description (name, resources, runtime): a worker's row of the tier."""
        described = set(self.tier.describe()) - {"min_idle", "max_size"}
        return {k: v for k, v in self.as_dict().items() if k not in described}

    def as_dict(self) -> dict[str, Any]:
        """The tier as every JSON answer shows it (`/v1/tiers` keeps the fields its schema names)."""
        out: dict[str, Any] = {**self.tier.describe(), "min_idle": self.min_idle, "max_size": self.max_size}
        if self.target_idle is not None:
            out["target_idle"] = self.target_idle
        out.update(idle=self.idle, busy=self.busy, starting=self.starting)
        if self.waiting is not None:
            out["waiting"] = self.waiting
        if self.counters is not None:
            c = self.counters
            out.update({
                "created": c.created, "replaced": dict(c.replaced),
                "leases": c.leases, "lease_timeouts": c.lease_timeouts,
                "lease_wait_ms": {"p50": round(c.lease_wait_p50_ms, 3), "p95": round(c.lease_wait_p95_ms, 3)},
                "lease_rate_per_s": round(c.lease_rate_per_s, 3), "typical_hold_ms": round(c.typical_hold_ms, 3),
                "start_failures": c.start_failures, "last_start_error": c.last_start_error, "unfit": c.unfit,
                "gpus_in_use": list(c.gpus_in_use),
            })
        if self.workers is not None:
            out["workers"] = self.workers
        if self.queued is not None:
            out["queued"] = self.queued
        return out


@dataclass(frozen=True)
class CapacitySnapshot:
    """The host ledger: what the host offers the tiers and what live containers hold."""

    cpus: float
    cpu_overcommit: float
    cpu_budget: float
    cpu_held: float
    ram_bytes: int
    ram_held_bytes: int
    gpu_ids: tuple[str, ...]
    gpus_free: tuple[str, ...]

    def as_dict(self) -> dict[str, Any]:
        return {"cpus": self.cpus, "cpu_overcommit": self.cpu_overcommit, "cpu_budget": self.cpu_budget,
                "cpu_held": round(self.cpu_held, 6), "ram_bytes": self.ram_bytes,
                "ram_held_bytes": self.ram_held_bytes, "gpu_ids": list(self.gpu_ids),
                "gpus_free": sorted(self.gpus_free)}


@dataclass(frozen=True)
class PoolsSnapshot:
    """Every tier of one pool instance, its ledger and its engine: the admin view and the /metrics figures."""

    tiers: tuple[TierSnapshot, ...]
    capacity: CapacitySnapshot
    warming: WarmingPolicy
    docker_ok: bool
    docker_api_errors: tuple[tuple[str, int], ...] = ()  # failed engine calls since start, by operation


@dataclass(frozen=True)
class Persistence:
    """Whether admin resizes outlive a restart, and where they are kept."""

    persisted: bool
    note: str
    sizes_file: str | None = None

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"persisted": self.persisted}
        if self.sizes_file is not None:
            out["sizes_file"] = self.sizes_file
        out["note"] = self.note
        return out


@dataclass(frozen=True)
class WorkerRow:
    """One worker's part of a tier (scale-out mode), as its last heartbeat told it."""

    worker_id: str
    host: str
    engine: str  # the Docker engine it runs containers on (its DOCKER_HOST)
    state: str  # "serving", or "draining" once it was told to stop
    docker_ok: bool
    inflight: int
    tier: TierSnapshot
    sizes_refused: str | None = None  # why it did not apply the cluster's stored sizes (its capacity)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"worker": self.worker_id, "host": self.host, "engine": self.engine,
                               "state": self.state, "docker_ok": self.docker_ok, "inflight": self.inflight,
                               **self.tier.counts_dict()}
        if self.sizes_refused is not None:
            out["sizes_refused"] = self.sizes_refused
        return out


@dataclass(frozen=True)
class WorkerChange:
    """What one worker did with a cluster-wide resize or drain: `applied`, `refused` (with the reason in
    `detail`), or `pending` (it did not confirm in time; it applies the change when it next reads it)."""

    worker_id: str
    host: str
    status: str
    detail: str | None = None
    tier: TierSnapshot | None = None  # the worker's tier right after the change (or at its last beat)
    drained: Drained | None = None

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"worker": self.worker_id, "host": self.host, "status": self.status}
        if self.detail is not None:
            out["detail"] = self.detail
        if self.tier is not None:
            out.update(self.tier.counts_dict())
        if self.drained is not None:
            out.update(self.drained.counts_dict())
        return out


@dataclass(frozen=True)
class AdminView:
    """What `GET /v1/admin/pools` shows; `workers` (scale-out mode) has every live worker's row of each tier."""

    pools: PoolsSnapshot
    persistence: Persistence
    workers: tuple[WorkerRow, ...] | None = None

    def rows_of(self, tier_name: str) -> list[dict[str, Any]] | None:
        if self.workers is None:
            return None
        return [row.as_dict() for row in self.workers if row.tier.name == tier_name]


@dataclass(frozen=True)
class Resized:
    """A tier's state right after a resize, and whether the new sizes were kept; in scale-out mode the
    tier's cluster totals, and what each worker did."""

    tier: TierSnapshot
    persistence: Persistence
    workers: tuple[WorkerChange, ...] | None = None


@dataclass(frozen=True)
class Drained:
    """What a drain replaced now, and what it will replace when it comes back (summed over the workers in
    scale-out mode, with what each did in `workers`)."""

    tier_name: str
    idle_replaced: int
    busy_replaced_when_done: int
    starting_replaced_when_ready: int
    workers: tuple[WorkerChange, ...] | None = None

    def counts_dict(self) -> dict[str, int]:
        return {"idle_replaced": self.idle_replaced, "busy_replaced_when_done": self.busy_replaced_when_done,
                "starting_replaced_when_ready": self.starting_replaced_when_ready}
