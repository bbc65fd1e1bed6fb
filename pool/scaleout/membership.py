"""Cluster membership: what a worker's heartbeat says, and the API's view of all live workers (no I/O).

A worker beats every `heartbeat_s` with the tiers it serves and their container counts; its beat key
expires after three missed beats, and then the worker is gone. The API reads the beats into a
`ClusterView`: a tier is served when some live worker with a working Docker engine serves it.
"""

from __future__ import annotations

import json
import logging
import socket
from dataclasses import dataclass, field
from typing import Any

from pool.model.snapshots import PoolsSnapshot, TierSnapshot
from pool.model.tiers import Tier

log = logging.getLogger(__name__)

BEATS_TO_DEATH = 3
_COUNTS = ("min_idle", "max_size", "idle", "busy", "starting")


@dataclass(frozen=True)
class WorkerBeat:
    """One worker's last heartbeat."""

    worker_id: str
    host: str
    docker_ok: bool
    tiers: dict[str, dict[str, Any]]  # tier name -> resources and counts
    images: dict[str, dict[str, str]] = field(default_factory=dict)  # image name -> its warmpool.image.* labels


def beat_json(worker_id: str, pools: PoolsSnapshot, inflight: dict[str, int],
              image_labels: dict[str, dict[str, str]] | None = None) -> str:
    """A worker's heartbeat: each tier as every view shows it, plus the tasks it has in hand, and what its
    engine's images hold (their warmpool.image.* labels, for GET /v1/images)."""
    tiers = {s.name: {**s.as_dict(), "inflight": inflight.get(s.name, 0)} for s in pools.tiers}
    images = {name: {k: v for k, v in labels.items() if k.startswith("warmpool.image.")}
              for name, labels in (image_labels or {}).items()}
    return json.dumps({"id": worker_id, "host": socket.gethostname(), "docker_ok": pools.docker_ok,
                       "tiers": tiers, "images": images}, separators=(",", ":"))


def parse_beat(raw: str) -> WorkerBeat | None:
    try:
        body = json.loads(raw)
        return WorkerBeat(worker_id=str(body["id"]), host=str(body["host"]), docker_ok=bool(body["docker_ok"]),
                          tiers={str(k): dict(v) for k, v in body["tiers"].items()},
                          images={str(k): {str(a): str(b) for a, b in v.items()}
                                  for k, v in (body.get("images") or {}).items()})
    except (KeyError, TypeError, ValueError, AttributeError):
        log.warning("ignoring a malformed worker heartbeat: %.200s", raw)
        return None


@dataclass
class ClusterView:
    """The API's picture of the cluster, refreshed in the background."""

    redis_ok: bool = False
    workers: dict[str, WorkerBeat] = field(default_factory=dict)
    queued: dict[str, int] = field(default_factory=dict)  # per tier: tasks waiting or running
    _warned: set[tuple[str, str]] = field(default_factory=set)

    def serving(self, tier_name: str) -> list[WorkerBeat]:
        return [w for w in self.workers.values() if w.docker_ok and tier_name in w.tiers]

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
        rows = []
        for tier in tiers:
            serving = self.serving(tier.name)
            min_idle, max_size, idle, busy, starting = (
                sum(int(w.tiers[tier.name].get(k, 0)) for w in serving) for k in _COUNTS)
            rows.append(TierSnapshot(tier=tier, min_idle=min_idle, max_size=max_size, idle=idle, busy=busy,
                                     starting=starting, workers=len(serving), queued=self.queued.get(tier.name, 0)))
        return tuple(rows)
