"""Pool errors to HTTP answers: 422 names the field, 404 an unknown tier, 409 what cannot be done, 429/503
carry Retry-After, nothing becomes a 500."""

from __future__ import annotations

import json
import logging
import math

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from api.json_body import finite_for_json
from pool.model.errors import (
    BackendUnavailable,
    CapacityError,
    InvalidRequest,
    NoCapacity,
    NotSupported,
    Overloaded,
    PoolError,
    ResultEvicted,
    SandboxError,
    SessionBusy,
    SessionGone,
    UnknownTier,
)

log = logging.getLogger(__name__)


def invalid_body(field: str, message: str, kind: str = "value_error") -> JSONResponse:
    """A 422 shaped like FastAPI's own validation errors, located at the field."""
    loc: list[str | int] = ["body", *(int(part) if part.isdigit() else part for part in field.split("."))]
    return JSONResponse(status_code=422, content={"detail": [{"loc": loc, "msg": message, "type": kind}]})


def retry_after(status_code: int, message: str, retry_after_s: float) -> JSONResponse:
    return JSONResponse(status_code=status_code, content={"detail": message},
                        headers={"Retry-After": str(max(1, math.ceil(retry_after_s)))})


async def _pool_error(request: Request, exc: Exception) -> JSONResponse:
    if isinstance(exc, InvalidRequest):
        return invalid_body(exc.field, exc.message)
    if isinstance(exc, UnknownTier):
        return JSONResponse(status_code=404, content={"detail": str(exc)})
    if isinstance(exc, CapacityError | NotSupported | SessionBusy):
        return JSONResponse(status_code=409, content={"detail": str(exc)})
    if isinstance(exc, SessionGone):
        return JSONResponse(status_code=404, content={"detail": str(exc)})
    if isinstance(exc, Overloaded):
        return retry_after(429, str(exc), exc.retry_after_s)
    if isinstance(exc, NoCapacity):
        return retry_after(503, str(exc), exc.retry_after_s)
    if isinstance(exc, BackendUnavailable):
        return retry_after(503, str(exc), exc.retry_after_s)
    if isinstance(exc, ResultEvicted):
        return JSONResponse(status_code=404, content={"detail": str(exc)})
    if isinstance(exc, SandboxError):
        return retry_after(503, f"sandbox unavailable: {exc}", 1.0)
    log.exception("unexpected pool error", exc_info=exc)
    return retry_after(503, str(exc), 1.0)


async def _validation_error(request: Request, exc: Exception) -> Response:
    """FastAPI's 422, rendered with ASCII escapes: the errors echo the input, and an input holding a lone
    surrogate (JSON allows "\\ud800") cannot be encoded as UTF-8, which made FastAPI's own handler a 500; and
    an infinite input (`1e400`) is written as text, since `Infinity` is not JSON."""
    assert isinstance(exc, RequestValidationError)
    body = json.dumps({"detail": finite_for_json(jsonable_encoder(exc.errors()))}, ensure_ascii=True,
                      allow_nan=False)
    return Response(body, status_code=422, media_type="application/json")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(PoolError, _pool_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
