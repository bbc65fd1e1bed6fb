"""Admin routes under /v1/admin/ (admin key required): see and size the live pools, through the dispatcher.

Sizes changed here last until the service stops unless WARMPOOL_POOL_SIZES_FILE is set; every answer
says which (`persisted` and `note`). In scale-out mode the dispatcher answers NotSupported (409).
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
                              409: {"description": "This process holds no pool to see or size (scale-out mode)"}})


class PoolSizesPatch(BaseModel):
    """New sizes for one tier; give either or both."""

    model_config = ConfigDict(extra="forbid")

    min_idle: int | None = Field(default=None, ge=0, le=MAX_COUNT, description="Idle containers kept warm at least")
    max_size: int | None = Field(default=None, ge=1, le=MAX_COUNT, description="Containers the tier may hold at most")


@router.get("/pools")
async def get_pools(request: Request) -> dict[str, Any]:
    """Every tier's sizes (min_idle, max_size, the demand-driven target_idle), live counts (idle, busy,
    starting, waiting), counters since start (created, replaced by reason, leases, lease timeouts, start
    failures), lease-wait p50/p95, and the host capacity ledger."""
    view = await dispatcher_of(request).pools()
    pools = view.pools
    return {"tiers": [t.as_dict() for t in pools.tiers], "capacity": pools.capacity.as_dict(),
            "warming": dataclasses.asdict(pools.warming), **view.persistence.as_dict()}


@router.patch("/pools/{tier}", responses={404: {"description": "No such tier"},
                                          409: {"description": "The sizes do not fit the host; the detail says why"},
                                          422: {"description": "Invalid sizes"}})
async def patch_pool(tier: str, body: PoolSizesPatch, request: Request) -> dict[str, Any]:
    """Change a tier's min_idle and/or max_size, live. Each must fit the host's capacity alongside the
    other tiers' min_idle (409 says which dimension does not). Idle containers above the new sizes are
    removed at once, busy ones above max_size when their task ends, and missing ones start in the
    background. The answer is the tier's new state, and whether the change outlives a restart."""
    if body.min_idle is None and body.max_size is None:
        raise InvalidRequest("min_idle", "give min_idle, max_size or both")
    resized = await dispatcher_of(request).resize(tier, body.min_idle, body.max_size)
    return {**resized.tier.as_dict(), **resized.persistence.as_dict()}


@router.post("/pools/{tier}/drain", responses={404: {"description": "No such tier"}})
async def drain_pool(tier: str, request: Request) -> dict[str, Any]:
    """Replace every idle container of the tier now (e.g. after a new runner image), and every busy one
    when its task ends; fresh containers start in the background."""
    drained = await dispatcher_of(request).drain(tier)
    return {"tier": drained.tier_name, "idle_replaced": drained.idle_replaced,
            "busy_replaced_when_done": drained.busy_replaced_when_done,
            "starting_replaced_when_ready": drained.starting_replaced_when_ready}
