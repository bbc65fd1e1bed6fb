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
from pydantic import BaseModel, ConfigDict, Field

from api.auth import require_admin_key
from api.json_body import BodyRoute
from api.state import dispatcher_of
from pool.model.errors import InvalidRequest
from pool.model.resources import MAX_COUNT

router = APIRouter(prefix="/v1/admin", tags=["admin"], route_class=BodyRoute,
                   dependencies=[Depends(require_admin_key)],
                   responses={401: {"description": "Missing bearer token"},
                              403: {"description": "Wrong admin key, or no WARMPOOL_ADMIN_KEY set"},
                              409: {"description": "What was asked cannot be done (the detail says why)"}})


class PoolSizesPatch(BaseModel):
    """New sizes for one tier; give either or both."""

    model_config = ConfigDict(extra="forbid")

    min_idle: int | None = Field(default=None, ge=0, le=MAX_COUNT, description="Idle containers kept warm at least")
    max_size: int | None = Field(default=None, ge=1, le=MAX_COUNT, description="Containers the tier may hold at most")


@router.get("/pools")
async def get_pools(request: Request) -> dict[str, Any]:
    """Every tier's sizes (min_idle, max_size, the demand-driven target_idle), live counts (idle, busy,
    starting, waiting), counters since start (created, replaced by reason, leases, lease timeouts, start
    failures), lease-wait p50/p95, and the host capacity ledger. In scale-out mode: totals over the live
    workers (lease-wait percentiles: the highest worker's), each tier's `workers` rows, and the ledgers summed."""
    view = await dispatcher_of(request).pools()
    pools = view.pools
    return {"tiers": [_with_workers(t.as_dict(), view.rows_of(t.name)) for t in pools.tiers],
            "capacity": pools.capacity.as_dict(), "warming": dataclasses.asdict(pools.warming),
            **view.persistence.as_dict()}


def _with_workers(body: dict[str, Any], rows: list[dict[str, Any]] | None) -> dict[str, Any]:
    """Scale-out mode adds a `workers` list (one row per worker) to an answer's tier; embedded mode has none."""
    return body if rows is None else {**body, "workers": rows}


@router.patch("/pools/{tier}", responses={404: {"description": "No such tier"},
                                          409: {"description": "The sizes do not fit the host; the detail says why"},
                                          422: {"description": "Invalid sizes"}})
async def patch_pool(tier: str, body: PoolSizesPatch, request: Request) -> dict[str, Any]:
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
    return {**_with_workers(resized.tier.as_dict(), workers), **resized.persistence.as_dict()}


@router.post("/pools/{tier}/drain", responses={404: {"description": "No such tier"}})
async def drain_pool(tier: str, request: Request) -> dict[str, Any]:
    """Replace every idle container of the tier now (e.g. after a new runner image), and every busy one
    when its task ends; fresh containers start in the background. In scale-out mode: on every worker serving
    the tier, with the counts summed and `workers` saying what each one did."""
    drained = await dispatcher_of(request).drain(tier)
    workers = None if drained.workers is None else [w.as_dict() for w in drained.workers]
    return _with_workers({"tier": drained.tier_name, **drained.counts_dict()}, workers)
