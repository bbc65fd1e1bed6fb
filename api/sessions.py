"""Session routes: a container held for one key, whose calls share one interpreter (DESIGN.md 1b).

Open with `POST /v1/sessions`, run calls with `POST /v1/sessions/{id}/execute` (the /v1/execute body, or
its event stream), look with `GET`, end with `DELETE`. The pool side is pool/engine/sessions.py.
"""

from __future__ import annotations

import re
import time
from typing import Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from api.auth import require_admin_key, require_api_key
from api.limits import require_task_quota
from api.responses import ADMIN_KEY, API_KEY, MEANING, described, errors
from api.routes import build_spec, execution_body, image_tier, outcome_body
from api.schemas import ExecuteRequest, ExecuteResponse, FileIn, ResourcesIn, ResourcesOut
from api.state import dispatcher_of, settings_of
from api.streaming import stream_response, wants_stream
from pool.dispatch import owner_of
from pool.model.errors import PoolError, SessionGone
from pool.model.sessions import SessionInfo
from pool.model.tasks import Execution
from pool.model.tiers import Tier
from pool.settings import Settings

router = APIRouter(tags=["sessions"])
admin_router = APIRouter(prefix="/v1/admin", tags=["admin"], dependencies=[Depends(require_admin_key)])
_SESSION_ID = re.compile(r"[0-9a-f]{32}")
GONE = {**API_KEY, **described({404: "Unknown, ended (the detail says why) or another key's session"}),
        **errors(503)}


class SessionCreate(BaseModel):
    """What the session's container needs, and how long it may sit idle."""

    model_config = ConfigDict(extra="forbid")

    resources: ResourcesIn | None = None
    image: str = Field(default="python", description="The sandbox image its interpreter runs")
    idle_timeout_s: float | None = Field(
        default=None, gt=0, allow_inf_nan=False,
        description="Close it after this long without a call (the server's default when absent; capped)")
    max_wait_ms: float | None = Field(default=None, ge=0, allow_inf_nan=False,
                                      description="Longest wait for a free container (capped by the server)")


class SessionExecute(BaseModel):
    """One call: code run in the session's interpreter, with this call's stdin and time limit."""

    model_config = ConfigDict(extra="forbid")

    code: str = Field(min_length=1, description="Python source, run in the session's __main__")
    stdin: str = Field(default="", description="Text given to this call on standard input")
    timeout_s: float | None = Field(default=None, gt=0, description="This call's wall-clock limit; at it the "
                                    "code is interrupted (KeyboardInterrupt) and the session keeps its state")
    files: list[FileIn] = Field(default_factory=list, description="Written under the session's working directory "
                                "before this call's code runs (replacing a file already at that path); like "
                                "every file there, they stay for the session's later calls")
    outputs: list[str] = Field(default_factory=list, description="Globs relative to the working directory: the "
                               "regular files they match when this call ends come back in `files`")


class SessionOut(BaseModel):
    id: str
    tier: str
    image: str
    resources: ResourcesOut
    idle_timeout_s: float
    state: Literal["idle", "busy"]
    calls: int
    created_unix: float
    idle_s: float
    expires_in_s: float | None = Field(description="Until the idle timeout closes it; null while a call runs")


class AdminSessionOut(SessionOut):
    owner: str = Field(description="A digest of the key that holds it (never the key)")
    worker: str = Field(description="The pool instance holding its container")
    container: str


class AdminSessionsOut(BaseModel):
    sessions: list[AdminSessionOut]
    count: int


def session_body(info: SessionInfo) -> dict[str, Any]:
    return {"id": info.session_id, "tier": info.tier.name, "image": info.image,
            "resources": info.tier.resources.as_dict(), "idle_timeout_s": info.idle_timeout_s,
            "state": "busy" if info.busy else "idle", "calls": info.calls, "created_unix": round(info.created_unix, 3),
            "idle_s": round(info.idle_s, 3),
            "expires_in_s": None if info.expires_in_s is None else round(info.expires_in_s, 3)}


def session_tier(body: SessionCreate, settings: Settings) -> Tier:
    """The smallest tier serving the image that covers the resources (422 naming the field otherwise)."""
    return image_tier(settings, body.resources, body.image)


def _checked_id(session_id: str) -> str:
    if not _SESSION_ID.fullmatch(session_id):
        raise SessionGone(session_id)
    return session_id


@router.post("/v1/sessions", status_code=201, response_model=SessionOut,
             responses={**API_KEY, **described({
                 413: MEANING[413], 422: MEANING[422],
                 429: "This key holds WARMPOOL_MAX_SESSIONS_PER_KEY sessions, or over its rate",
                 503: "No container free in time, or Docker unavailable"})})
async def open_session(body: SessionCreate, request: Request, key: str = Depends(require_task_quota)) -> Any:
    """Lease a container of the smallest tier that covers `resources` for this key's session: its calls share
    one interpreter (globals, imports and files persist) until it is deleted or idle past `idle_timeout_s`.
    It holds the container all along, so it counts against the tier's capacity."""
    settings = settings_of(request)
    tier = session_tier(body, settings)
    idle_timeout_s = min(body.idle_timeout_s or settings.session_idle_timeout_s, settings.max_session_idle_s)
    wait_s = settings.lease_timeout_s if body.max_wait_ms is None else min(body.max_wait_ms / 1000,
                                                                          settings.lease_timeout_s)
    info = await dispatcher_of(request).open_session(tier.name, owner_of(key), body.image, idle_timeout_s, wait_s)
    link = f"/v1/sessions/{info.session_id}"
    return JSONResponse(status_code=201, content=session_body(info), headers={"Location": link})


@router.get("/v1/sessions/{session_id}", response_model=SessionOut, responses={**GONE, **errors(422)})
async def get_session(session_id: str, request: Request, key: str = Depends(require_api_key)) -> Any:
    """The session: its tier, state (`idle` or `busy`), calls so far, and when the idle timeout closes it."""
    info = await dispatcher_of(request).session(_checked_id(session_id), owner_of(key))
    return JSONResponse(session_body(info))


@router.post("/v1/sessions/{session_id}/execute", response_model=ExecuteResponse,
             responses={**GONE, **described({409: "Another call of this session is running",
                                             413: "Body, code, stdin or files too large",
                                             422: "Invalid request (a bad `files` or `outputs` entry is named)",
                                             429: "Over this key's rate"})})
async def session_execute(session_id: str, body: SessionExecute, request: Request,
                          key: str = Depends(require_task_quota)) -> Any:
    """Run code in the session's interpreter; the answer is the /v1/execute body (or, with
    `Accept: text/event-stream`, its event stream). `files` are written before the code runs and `outputs`
    collected after it, as for /v1/execute; the working directory is the session's, so files persist
    between calls. On the `datascience` image the figures a call shows or leaves open come back as
    `figures/figure-<n>.png` and are closed. A call that times out is interrupted and the session keeps
    its state when the code stops; a call that runs out of memory, or would not stop, ends the session (its
    `message` says so; later calls get 404 saying why)."""
    started = time.perf_counter()
    settings = settings_of(request)
    spec = build_spec(ExecuteRequest(code=body.code, stdin=body.stdin, timeout_s=body.timeout_s, files=body.files,
                                     outputs=body.outputs), settings)
    if isinstance(spec, JSONResponse):
        return spec
    dispatcher, owner = dispatcher_of(request), owner_of(key)
    session_id = _checked_id(session_id)
    if wants_stream(request):
        tier = (await dispatcher.session(session_id, owner)).tier
        stream = await dispatcher.session_stream(session_id, owner, spec)

        async def result_body(outcome: Execution | PoolError) -> dict[str, Any]:
            return outcome_body(outcome, spec.task_id, tier, started)
        return stream_response(stream, result_body)
    execution = await dispatcher.session_execute(session_id, owner, spec)
    return JSONResponse(execution_body(execution, spec.task_id, (time.perf_counter() - started) * 1000))


@router.delete("/v1/sessions/{session_id}", status_code=204, responses={**GONE, **errors(422)})
async def delete_session(session_id: str, request: Request, key: str = Depends(require_api_key)) -> Response:
    """End the session. Its container is reset and verified clean (or replaced) before anyone else gets it; a
    call still running finishes first."""
    await dispatcher_of(request).delete_session(_checked_id(session_id), owner_of(key))
    return Response(status_code=204)


@admin_router.get("/sessions", response_model=AdminSessionsOut, responses={**ADMIN_KEY, **errors(503)})
async def admin_sessions(request: Request) -> Any:
    """Every live session: tier, state, calls, idle time, the worker and container holding it, and a digest
    of its key."""
    infos = await dispatcher_of(request).all_sessions()
    return JSONResponse({"sessions": [admin_session_body(info) for info in infos], "count": len(infos)})


def admin_session_body(info: SessionInfo) -> dict[str, Any]:
    return {**session_body(info), "owner": info.owner, "worker": info.worker, "container": info.container}
