"""Cluster membership: what a worker's heartbeat says, and the API's view of all live workers (no I/O).

A worker beats every `heartbeat_s` with its state (serving, or draining once told to stop), its capacity
ledger, and each tier it serves as every view shows it (sizes, counts, counters); its beat key expires
after three missed beats, and then the worker is gone. The API reads the beats into a `ClusterView`: a
tier is served when some live, serving worker with a working Docker engine serves it.
"""

from __future__ import annotations

import json
import logging
import socket
from dataclasses import dataclass, field
from typing import Any

from pool.model.cluster import SizingTarget, inventory_of, tier_totals
from pool.model.snapshots import CapacitySnapshot, PoolsSnapshot, TierCounters, TierSnapshot, WorkerRow
from pool.model.tiers import Tier

log = logging.getLogger(__name__)

BEATS_TO_DEATH = 3
SERVING, DRAINING = "serving", "draining"


@dataclass(frozen=True)
class WorkerBeat:
    """One worker's last heartbeat."""

    worker_id: str
    host: str
    docker_ok: bool
    tiers: dict[str, dict[str, Any]]  # tier name -> resources, sizes, counts and counters
    images: dict[str, dict[str, str]] = field(default_factory=dict)  # image name -> its warmpool.image.* labels
    state: str = SERVING
    capacity: CapacitySnapshot | None = None
    engine: str = ""

    def row(self, tier: Tier) -> WorkerRow:
        """This worker's row of one of the tiers it serves, with the API's definition of the tier."""
        raw = self.tiers[tier.name]
        refused = raw.get("sizes_refused")
        return WorkerRow(worker_id=self.worker_id, host=self.host, engine=self.engine, state=self.state,
                         docker_ok=self.docker_ok,
                         inflight=int(raw.get("inflight", 0)), tier=tier_row(tier, raw),
                         sizes_refused=None if refused is None else str(refused))

    def sizing_target(self, tier: Tier, tiers: tuple[Tier, ...]) -> SizingTarget | None:
        """What the API checks new sizes of `tier` against on this worker (None: it has not told its capacity)."""
        if self.capacity is None:
            return None
        raw = self.tiers[tier.name]
        others = tuple((t.resources, int(self.tiers[t.name].get("min_idle", 0))) for t in tiers
                       if t.name != tier.name and t.name in self.tiers)
        return SizingTarget(worker_id=self.worker_id, host=self.host, inventory=inventory_of(self.capacity),
                            current=(int(raw.get("min_idle", 0)), int(raw.get("max_size", 1))), others=others)


def beat_json(worker_id: str, pools: PoolsSnapshot, inflight: dict[str, int], *, state: str = SERVING,
              refused: dict[str, str] | None = None, engine: str = "",
              image_labels: dict[str, dict[str, str]] | None = None) -> str:
    """A worker's heartbeat: each tier as every view shows it, plus the tasks it has in hand, and what its
    engine's images hold (their warmpool.image.* labels, for GET /v1/images)."""
    tiers = {}
    for s in pools.tiers:
        tiers[s.name] = {**s.as_dict(), "inflight": inflight.get(s.name, 0)}
        if refused and s.name in refused:
            tiers[s.name]["sizes_refused"] = refused[s.name]
    images = {name: {k: v for k, v in labels.items() if k.startswith("warmpool.image.")}
              for name, labels in (image_labels or {}).items()}
    return json.dumps({"id": worker_id, "host": socket.gethostname(), "docker_ok": pools.docker_ok,
                       "state": state, "engine": engine, "capacity": pools.capacity.as_dict(), "tiers": tiers,
                       "images": images}, separators=(",", ":"))


def parse_beat(raw: str) -> WorkerBeat | None:
    try:
        body = json.loads(raw)
        capacity = body.get("capacity")
        return WorkerBeat(worker_id=str(body["id"]), host=str(body["host"]), docker_ok=bool(body["docker_ok"]),
                          tiers={str(k): dict(v) for k, v in body["tiers"].items()},
                          images={str(k): {str(a): str(b) for a, b in v.items()}
                                  for k, v in (body.get("images") or {}).items()},
                          state=str(body.get("state", SERVING)), engine=str(body.get("engine", "")),
                          capacity=None if capacity is None else capacity_of(capacity))
    except (KeyError, TypeError, ValueError, AttributeError):
        log.warning("ignoring a malformed worker heartbeat: %.200s", raw)
        return None


def capacity_of(raw: dict[str, Any]) -> CapacitySnapshot:
    """A ledger snapshot back from its `as_dict` form."""
    return CapacitySnapshot(cpus=float(raw["cpus"]), cpu_overcommit=float(raw["cpu_overcommit"]),
                            cpu_budget=float(raw["cpu_budget"]), cpu_held=float(raw["cpu_held"]),
                            ram_bytes=int(raw["ram_bytes"]), ram_held_bytes=int(raw["ram_held_bytes"]),
                            gpu_ids=tuple(map(str, raw["gpu_ids"])), gpus_free=tuple(map(str, raw["gpus_free"])))


def tier_row(tier: Tier, raw: dict[str, Any]) -> TierSnapshot:
    """A tier's snapshot back from its `as_dict` form (a worker's beat, or its answer to a change)."""
    counters = None
    if "created" in raw:
        wait = raw.get("lease_wait_ms") or {}
        counters = TierCounters(
            created=int(raw["created"]), replaced=tuple(sorted((str(k), int(v)) for k, v in
                                                               dict(raw.get("replaced") or {}).items())),
            leases=int(raw.get("leases", 0)), lease_timeouts=int(raw.get("lease_timeouts", 0)),
            lease_wait_p50_ms=float(wait.get("p50", 0.0)), lease_wait_p95_ms=float(wait.get("p95", 0.0)),
            lease_rate_per_s=float(raw.get("lease_rate_per_s", 0.0)),
            typical_hold_ms=float(raw.get("typical_hold_ms", 0.0)),
            start_failures=int(raw.get("start_failures", 0)), last_start_error=raw.get("last_start_error"),
            unfit=raw.get("unfit"), gpus_in_use=tuple(map(str, raw.get("gpus_in_use") or ())))
    target, waiting = raw.get("target_idle"), raw.get("waiting")
    return TierSnapshot(tier=tier, min_idle=int(raw.get("min_idle", 0)), max_size=int(raw.get("max_size", 0)),
                        idle=int(raw.get("idle", 0)), busy=int(raw.get("busy", 0)),
                        starting=int(raw.get("starting", 0)), target_idle=None if target is None else int(target),
                        waiting=None if waiting is None else int(waiting), counters=counters)


@dataclass
class ClusterView:
    """The API's picture of the cluster, refreshed in the background."""

    redis_ok: bool = False
    workers: dict[str, WorkerBeat] = field(default_factory=dict)
    queued: dict[str, int] = field(default_factory=dict)  # per tier: tasks waiting or running
    _warned: set[tuple[str, str]] = field(default_factory=set)

    def serving(self, tier_name: str) -> list[WorkerBeat]:
        """Live workers that take the tier's tasks (a draining worker takes none, nor one whose engine is down)."""
        return [w for w in self.workers.values() if w.docker_ok and w.state == SERVING and tier_name in w.tiers]

    def holding(self, tier_name: str) -> list[WorkerBeat]:
        """Every live worker with a pool of the tier (draining ones and those whose engine is down included)."""
        return [w for _, w in sorted(self.workers.items()) if tier_name in w.tiers]

    def check_tiers(self, tiers: tuple[Tier, ...]) -> None:
        """Warn once per worker and tier when a worker's tier differs from ours (different tiers files)."""
        for tier in tiers:
            mine = {"name": tier.name, "image": tier.image, **tier.resources.as_dict(), "runtime": tier.runtime}
            for worker in self.serving(tier.name):
                theirs = {k: worker.tiers[tier.name].get(k) for k in mine}
                if theirs != mine and (worker.worker_id, tier.name) not in self._warned:
                    self._warned.add((worker.worker_id, tier.name))
                    log.warning("worker %s defines tier %r as %s, the API as %s: use one tiers file",
                                worker.worker_id, tier.name, theirs, mine)

    def image_labels(self, name: str) -> dict[str, str] | None:
        """An image's labels as a live worker read them from its engine (None when no worker has it)."""
        return next((w.images[name] for w in self.workers.values() if name in w.images), None)

    def tier_snapshots(self, tiers: tuple[Tier, ...]) -> tuple[TierSnapshot, ...]:
        """Each of our tiers with its counts summed over the live workers that serve it."""
        return tuple(tier_totals(tier, [w.row(tier).tier for w in self.serving(tier.name)],
                                 queued=self.queued.get(tier.name, 0), workers=len(self.serving(tier.name)))
                     for tier in tiers)
