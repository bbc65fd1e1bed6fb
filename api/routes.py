"""The HTTP routes; each docstring is the OpenAPI text."""

from __future__ import annotations

import time
import uuid
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from api.auth import require_api_key
from api.errors import invalid_body
from api.limits import require_task_quota
from api.schemas import ExecuteRequest, ExecuteResponse, TierOut
from pool.manager import Execution, PoolManager
from pool.resources import ResourceRequest
from pool.results import TaskSpec
from pool.settings import Settings
from pool.tiers import fit_tier

router = APIRouter()


def _pool(request: Request) -> PoolManager:
    return request.app.state.pool


def _settings(request: Request) -> Settings:
    return request.app.state.settings


def build_spec(body: ExecuteRequest, settings: Settings) -> TaskSpec | JSONResponse:
    """Server-side checks the schema cannot know: the code size cap and the timeout cap."""
    for field, text, limit in (("code", body.code, settings.max_code_bytes),
                               ("stdin", body.stdin, settings.max_stdin_bytes)):
        size = utf8_size(text)
        if size > limit:
            return JSONResponse(status_code=413, content={
                "detail": f"{field}: {size} bytes exceeds the {limit} byte limit"})
    timeout_s = settings.default_timeout_s if body.timeout_s is None else body.timeout_s
    if timeout_s > settings.max_timeout_s:
        return invalid_body("timeout_s", f"must be at most {settings.max_timeout_s:g} seconds, got {timeout_s:g}")
    return TaskSpec(task_id=uuid.uuid4().hex, code=body.code, stdin=body.stdin, timeout_s=timeout_s,
                    output_limit_bytes=settings.output_limit_bytes)


def utf8_size(text: str) -> int:
    # "surrogatepass": a JSON string may hold a lone surrogate (\ud800), which plain .encode() refuses
    return len(text.encode("utf-8", "surrogatepass"))


def lease_wait_s(body: ExecuteRequest, settings: Settings) -> float:
    """The request's max_wait_ms, within the server's lease timeout (its default)."""
    if body.max_wait_ms is None:
        return settings.lease_timeout_s
    return min(body.max_wait_ms / 1000, settings.lease_timeout_s)


def execution_body(execution: Execution, task_id: str, total_ms: float) -> dict[str, Any]:
    result = execution.result
    return {
        "id": task_id, "status": result.status.value, "exit_code": result.exit_code,
        "stdout": result.stdout, "stderr": result.stderr,
        "stdout_truncated": result.stdout_truncated, "stderr_truncated": result.stderr_truncated,
        "tier": execution.tier.name, "resources": execution.tier.resources.as_dict(),
        "timings": {"queue_ms": round(execution.queue_ms, 3), "run_ms": round(result.run_ms, 3),
                    "total_ms": round(total_ms, 3)},
        "usage": {"cpu_s": result.usage.cpu_s, "max_rss_bytes": result.usage.max_rss_bytes},
        "message": result.message,
    }


@router.post("/v1/execute", response_model=ExecuteResponse,
             responses={413: {"description": "Body, code or stdin too large"},
                        422: {"description": "Invalid request"},
                        429: {"description": "Over this key's rate, or too many requests wait for the tier "
                                             "(Retry-After)"},
                        503: {"description": "No capacity in time, or Docker unavailable (Retry-After)"}})
async def execute(body: ExecuteRequest, request: Request, _key: str = Depends(require_task_quota)) -> Any:
    """Run a Python snippet on a warm container of the smallest tier that covers its resources.

    The answer is 200 whenever the task ran, whatever it did: see `status`."""
    started = time.perf_counter()
    settings = _settings(request)
    spec = build_spec(body, settings)
    if isinstance(spec, JSONResponse):
        return spec
    tier = fit_tier(settings.tiers, body.resources.to_request() if body.resources else ResourceRequest())
    execution = await _pool(request).execute(tier.name, spec, lease_wait_s(body, settings))
    return JSONResponse(execution_body(execution, spec.task_id, (time.perf_counter() - started) * 1000))


@router.get("/v1/tiers", response_model=list[TierOut])
async def tiers(request: Request, _key: str = Depends(require_api_key)) -> list[dict[str, Any]]:
    """The resource tiers, smallest first, with their live container counts."""
    pool = _pool(request)
    return [{**p.tier.describe(), "min_idle": p.min_idle, "max_size": p.max_size, "idle": len(p.idle),
             "busy": len(p.busy), "starting": p.starting} for p in pool.pools.values()]


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is alive."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(request: Request) -> JSONResponse:
    """Docker reachable, runner image present, and every tier warmed to its min_idle."""
    pool = _pool(request)
    checks = {"docker": pool.docker_ok, "image": pool.image_ok, "pools_warm": pool.warm}
    ready = all(checks.values())
    return JSONResponse(status_code=200 if ready else 503, content={"ready": ready, "checks": checks},
                        headers=None if ready else {"Retry-After": "1"})
