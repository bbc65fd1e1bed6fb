"""Admin routes under /v1/admin/ (admin key required): see and size the live pools.

Sizes changed here last until the service stops unless WARMPOOL_POOL_SIZES_FILE is set; every answer
says which (`persisted` and `note`).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Request
from pydantic import BaseModel, ConfigDict, Field

from api.auth import require_admin_key
from api.json_body import BodyRoute
from pool.engine.admin import PoolAdmin
from pool.model.errors import InvalidRequest
from pool.model.resources import MAX_COUNT

router = APIRouter(prefix="/v1/admin", tags=["admin"], route_class=BodyRoute,
                   dependencies=[Depends(require_admin_key)],
                   responses={401: {"description": "Missing bearer token"},
                              403: {"description": "Wrong admin key, or no WARMPOOL_ADMIN_KEY set"}})


class PoolSizesPatch(BaseModel):
    """New sizes for one tier; give either or both."""

    model_config = ConfigDict(extra="forbid")

    min_idle: int | None = Field(default=None, ge=0, le=MAX_COUNT, description="Idle containers kept warm at least")
    max_size: int | None = Field(default=None, ge=1, le=MAX_COUNT, description="Containers the tier may hold at most")


def _admin(request: Request, tier: str | None = None) -> PoolAdmin:
    """The app's PoolAdmin (one per pool manager); 404 when `tier` is not one of its tiers."""
    manager = getattr(request.app.state, "pool", None)
    if manager is None:  # e.g. an API process that only dispatches to remote workers
        raise HTTPException(status_code=409, detail="this process runs no pool of its own to see or size")
    admin: PoolAdmin | None = getattr(request.app.state, "pool_admin", None)
    if admin is None or admin.manager is not manager:
        admin = request.app.state.pool_admin = PoolAdmin(manager)
    if tier is not None and tier not in manager.pools:
        raise HTTPException(status_code=404, detail=f"no tier {tier!r}; tiers: {sorted(manager.pools)}")
    return admin


@router.get("/pools")
async def get_pools(request: Request) -> dict[str, Any]:
    """Every tier's sizes (min_idle, max_size, the demand-driven target_idle), live counts (idle, busy,
    starting, waiting), counters since start (created, replaced by reason, leases, lease timeouts, start
    failures), lease-wait p50/p95, and the host capacity ledger."""
    return _admin(request).view()


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
    return await _admin(request, tier).resize(tier, body.min_idle, body.max_size)


@router.post("/pools/{tier}/drain", responses={404: {"description": "No such tier"}})
async def drain_pool(tier: str, request: Request) -> dict[str, Any]:
    """Replace every idle container of the tier now (e.g. after a new runner image), and every busy one
    when its task ends; fresh containers start in the background."""
    return _admin(request, tier).drain(tier)
