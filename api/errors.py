"""Pool errors to HTTP answers: 422 names the field, 503 carries Retry-After, nothing becomes a 500."""

from __future__ import annotations

import logging
import math

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from pool.errors import (
    BackendUnavailable,
    CapacityError,
    InvalidRequest,
    NoCapacity,
    PoolError,
    QueueFull,
    SandboxError,
)

log = logging.getLogger(__name__)


def invalid_body(field: str, message: str, kind: str = "value_error") -> JSONResponse:
    """A 422 shaped like FastAPI's own validation errors, located at the field."""
    loc = ["body", *field.split(".")]
    return JSONResponse(status_code=422, content={"detail": [{"loc": loc, "msg": message, "type": kind}]})


def retry_after(status_code: int, message: str, retry_after_s: float) -> JSONResponse:
    return JSONResponse(status_code=status_code, content={"detail": message},
                        headers={"Retry-After": str(max(1, math.ceil(retry_after_s)))})


async def _pool_error(request: Request, exc: Exception) -> JSONResponse:
    if isinstance(exc, InvalidRequest):
        return invalid_body(exc.field, exc.message)
    if isinstance(exc, CapacityError):
        return JSONResponse(status_code=409, content={"detail": str(exc)})
    if isinstance(exc, QueueFull):
        return retry_after(429, str(exc), exc.retry_after_s)
    if isinstance(exc, NoCapacity):
        return retry_after(503, str(exc), exc.retry_after_s)
    if isinstance(exc, BackendUnavailable):
        return retry_after(503, str(exc), exc.retry_after_s)
    if isinstance(exc, SandboxError):
        return retry_after(503, f"sandbox unavailable: {exc}", 1.0)
    log.exception("unexpected pool error", exc_info=exc)
    return retry_after(503, str(exc), 1.0)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(PoolError, _pool_error)
