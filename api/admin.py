"""Admin routes under /v1/admin/ (admin key required): see and size the live pools, through the dispatcher.

Embedded mode: sizes changed here last until the service stops unless WARMPOOL_POOL_SIZES_FILE is set;
every answer says which (`persisted` and `note`). Scale-out mode: the same routes and JSON, for the
whole cluster: each tier's figures are totals over the workers, with a `workers` list of per-worker rows;
a resize or drain applies to every worker serving the tier and is kept in Redis (the answer's `workers`
says what each one did).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from api.auth import require_admin_key
from api.json_body import BodyRoute
from api.responses import ADMIN_KEY, MEANING, described, errors
from api.schemas import TierOut
from api.state import dispatcher_of
from pool.model.errors import InvalidRequest
from pool.model.resources import MAX_COUNT
from pool.model.snapshots import CapacitySnapshot
from pool.model.warming import WarmingPolicy

router = APIRouter(prefix="/v1/admin", tags=["admin"], route_class=BodyRoute,
                   dependencies=[Depends(require_admin_key)],
                   responses={**ADMIN_KEY, **errors(409, 503)})


class PoolSizesPatch(BaseModel):
    """New sizes for one tier; give either or both."""

    model_config = ConfigDict(extra="forbid")

    min_idle: int | None = Field(default=None, ge=0, le=MAX_COUNT, description="Idle containers kept warm at least")
    max_size: int | None = Field(default=None, ge=1, le=MAX_COUNT, description="Containers the tier may hold at most")


class TierAdminOut(TierOut):
    """A tier as the admin sees it: its sizes, live counts and counters (this process's pool, or totals over the
    workers in scale-out mode, with a row per worker in `workers`)."""

    model_config = ConfigDict(extra="allow")

    target_idle: int | None = Field(default=None, description="Idle containers demand-driven warming aims for")
    waiting: int | None = Field(default=None, description="Requests waiting for a container now")
    created: int | None = None
    replaced: dict[str, int] | None = Field(default=None, description="Containers replaced, by reason")
    leases: int | None = None
    lease_timeouts: int | None = None
    lease_wait_ms: dict[str, float] | None = Field(default=None, examples=[{"p50": 0.02, "p95": 0.1}])
    lease_rate_per_s: float | None = None
    typical_hold_ms: float | None = None
    start_failures: int | None = None
    last_start_error: str | None = None
    unfit: str | None = Field(default=None, description="Why the host cannot hold the tier's min_idle, if so")
    gpus_in_use: list[str] | None = None
    workers: list[dict[str, Any]] | None = Field(  # type: ignore[assignment]
        default=None, description="Scale-out mode: one row per live worker serving the tier (its counts)")


class Persisted(BaseModel):
    persisted: bool = Field(description="Whether a resize outlives a restart")
    sizes_file: str | None = Field(default=None, description="Where resizes are kept, when they are")
    note: str


class PoolsOut(Persisted):
    tiers: list[TierAdminOut]
    capacity: CapacitySnapshot  # the snapshot's own fields, as its as_dict gives them
    warming: WarmingPolicy


class ResizedOut(TierAdminOut, Persisted):
    """The tier's new state (and in scale-out mode what each worker applied, refused or has not confirmed)."""


class DrainedOut(BaseModel):
    model_config = ConfigDict(extra="allow")

    tier: str
    idle_replaced: int = Field(description="Idle containers replaced now")
    busy_replaced_when_done: int = Field(description="Busy containers replaced when their task ends")
    starting_replaced_when_ready: int
    workers: list[dict[str, Any]] | None = Field(default=None, description="Scale-out mode: what each worker did")


@router.get("/pools", response_model=PoolsOut)
async def get_pools(request: Request) -> Any:
    """Every tier's sizes (min_idle, max_size, the demand-driven target_idle), live counts (idle, busy,
    starting, waiting), counters since start (created, replaced by reason, leases, lease timeouts, start
    failures), lease-wait p50/p95, and the host capacity ledger. In scale-out mode: totals over the live
    workers (lease-wait percentiles: the highest worker's), each tier's `workers` rows, and the ledgers summed."""
    view = await dispatcher_of(request).pools()
    pools = view.pools
    return JSONResponse({"tiers": [_with_workers(t.as_dict(), view.rows_of(t.name)) for t in pools.tiers],
                         "capacity": pools.capacity.as_dict(), "warming": dataclasses.asdict(pools.warming),
                         **view.persistence.as_dict()})


def _with_workers(body: dict[str, Any], rows: list[dict[str, Any]] | None) -> dict[str, Any]:
    """Scale-out mode adds a `workers` list (one row per worker) to an answer's tier; embedded mode has none."""
    return body if rows is None else {**body, "workers": rows}


@router.patch("/pools/{tier}", response_model=ResizedOut, responses=described({
    404: "No such tier", 409: "The sizes do not fit the host (or a worker's); the detail says why",
    413: MEANING[413], 422: "Invalid sizes"}))
async def patch_pool(tier: str, body: PoolSizesPatch, request: Request) -> Any:
    """Change a tier's min_idle and/or max_size, live. Each must fit the host's capacity alongside the
    other tiers' min_idle (409 says which dimension does not). Idle containers above the new sizes are
    removed at once, busy ones above max_size when their task ends, and missing ones start in the
    background. The answer is the tier's new state, and whether the change outlives a restart. In scale-out
    mode the sizes apply to every worker serving the tier (each keeps that many) and are kept in Redis for
    workers started later; each worker's capacity is checked first (409 naming the worker and the dimension,
    nothing changed anywhere), and `workers` says what each one applied, refused or has not confirmed yet."""
    if body.min_idle is None and body.max_size is None:
        raise InvalidRequest("min_idle", "give min_idle, max_size or both")
    resized = await dispatcher_of(request).resize(tier, body.min_idle, body.max_size)
    workers = None if resized.workers is None else [w.as_dict() for w in resized.workers]
    return JSONResponse({**_with_workers(resized.tier.as_dict(), workers), **resized.persistence.as_dict()})


@router.post("/pools/{tier}/drain", response_model=DrainedOut,
             responses=described({404: "No such tier", 422: MEANING[422]}))
async def drain_pool(tier: str, request: Request) -> Any:
    """Replace every idle container of the tier now (e.g. after a new runner image), and every busy one
    when its task ends; fresh containers start in the background. In scale-out mode: on every worker serving
    the tier, with the counts summed and `workers` saying what each one did."""
    drained = await dispatcher_of(request).drain(tier)
    workers = None if drained.workers is None else [w.as_dict() for w in drained.workers]
    return JSONResponse(_with_workers({"tier": drained.tier_name, **drained.counts_dict()}, workers))
