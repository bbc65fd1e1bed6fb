"""The HTTP routes; each docstring is the OpenAPI text."""

from __future__ import annotations

import functools
import re
import time
import uuid
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse

from api.auth import require_api_key
from api.callback_http import submission_refusal
from api.errors import invalid_body
from api.json_body import BodyRoute
from api.limits import require_task_quota
from api.responses import API_KEY, MEANING, RETRY_AFTER, described, errors
from api.schemas import (
    ExecuteRequest,
    ExecuteResponse,
    ImageOut,
    ReadyOut,
    ResourcesIn,
    TaskAccepted,
    TaskPending,
    TaskRequest,
    TierOut,
)
from api.state import dispatcher_of, settings_of
from api.streaming import result_response, stream_response, wants_stream
from pool.dispatch import owner_of
from pool.model.callback_rules import CallbackPolicy
from pool.model.errors import InvalidRequest, PoolError
from pool.model.files import check_outputs, decode_files
from pool.model.resources import ResourceRequest, format_bytes
from pool.model.results import TaskResult, TaskSpec
from pool.model.tasks import Execution, TaskState, TaskView
from pool.model.tiers import Tier, fit_tier
from pool.settings import Settings

router = APIRouter(route_class=BodyRoute)
_TASK_ID = re.compile(r"[0-9a-f]{32}")


def build_spec(body: ExecuteRequest, settings: Settings) -> TaskSpec | JSONResponse:
    """Server-side checks the schema cannot know: the size caps (code, stdin, files), the timeout cap, and the
    files' paths and encodings (InvalidRequest naming the entry, a 422)."""
    for field, text, limit in (("code", body.code, settings.max_code_bytes),
                               ("stdin", body.stdin, settings.max_stdin_bytes)):
        size = utf8_size(text)
        if size > limit:
            return JSONResponse(status_code=413, content={
                "detail": f"{field}: {size} bytes exceeds the {limit} byte limit"})
    timeout_s = settings.default_timeout_s if body.timeout_s is None else body.timeout_s
    if timeout_s > settings.max_timeout_s:
        return invalid_body("timeout_s", f"must be at most {settings.max_timeout_s:g} seconds, got {timeout_s:g}")
    files = decode_files(body.files)
    files_bytes = sum(len(f.content) for f in files)
    if files_bytes > settings.max_files_bytes:
        return JSONResponse(status_code=413, content={
            "detail": f"files: {files_bytes} bytes decoded exceeds the {settings.max_files_bytes} byte limit "
                      f"({format_bytes(settings.max_files_bytes)})"})
    return TaskSpec(task_id=uuid.uuid4().hex, code=body.code, stdin=body.stdin, timeout_s=timeout_s,
                    output_limit_bytes=settings.output_limit_bytes, files=files, outputs=check_outputs(body.outputs),
                    max_output_files_bytes=settings.max_output_files_bytes)


def utf8_size(text: str) -> int:
    # "surrogatepass": a JSON string may hold a lone surrogate (\ud800), which plain .encode() refuses
    return len(text.encode("utf-8", "surrogatepass"))


def lease_wait_s(body: ExecuteRequest, settings: Settings) -> float:
    """The request's max_wait_ms, within the server's lease timeout (its default).

    In scale-out mode it bounds the wait for a worker to start the task, time in the queue included."""
    if body.max_wait_ms is None:
        return settings.lease_timeout_s
    return min(body.max_wait_ms / 1000, settings.lease_timeout_s)


def execution_body(execution: Execution, task_id: str, total_ms: float) -> dict[str, Any]:
    result = execution.result
    return {
        "id": task_id, "status": result.status.value, "exit_code": result.exit_code,
        "stdout": result.stdout, "stderr": result.stderr,
        "stdout_truncated": result.stdout_truncated, "stderr_truncated": result.stderr_truncated,
        "tier": execution.tier.name, "image": execution.tier.image, "resources": execution.tier.resources.as_dict(),
        "timings": {"queue_ms": round(execution.queue_ms, 3), "run_ms": round(result.run_ms, 3),
                    "total_ms": round(total_ms, 3)},
        "usage": {"cpu_s": result.usage.cpu_s, "max_rss_bytes": result.usage.max_rss_bytes},
        "message": result.message, "worker": execution.worker,
        "files": [f.as_dict() for f in result.files], "files_truncated": result.files_truncated,
    }


def task_body(view: TaskView) -> dict[str, Any]:
    """An async task's answer: its state while pending, then the same body /v1/execute gives."""
    if view.state != TaskState.DONE:
        return {"id": view.task_id, "status": view.state.value}
    if view.execution is not None:
        return execution_body(view.execution, view.task_id, view.total_ms)
    # It never ran (no capacity in time, a backend down): for an async task that is data, not an HTTP error.
    return not_run_body(view.task_id, view.tier, f"the task could not run: {view.error}", view.total_ms)


def not_run_body(task_id: str, tier: Tier, message: str, total_ms: float) -> dict[str, Any]:
    """The body of a task that a pool error kept from running or finishing: a sandbox_error result."""
    result = TaskResult.sandbox_error(task_id, message)
    not_run = Execution(result=result, tier=tier, queue_ms=total_ms, container_name="")
    return execution_body(not_run, task_id, total_ms)


def outcome_body(outcome: Execution | PoolError, task_id: str, tier: Tier, started: float) -> dict[str, Any]:
    """A streamed task's `result` event: the plain call's body (a sandbox_error when it could not finish)."""
    total_ms = (time.perf_counter() - started) * 1000
    if isinstance(outcome, Execution):
        return execution_body(outcome, task_id, total_ms)
    return not_run_body(task_id, tier, f"the task could not finish: {outcome}", total_ms)


def image_tier(settings: Settings, resources: ResourcesIn | None, image: str) -> Tier:
    """The smallest tier of `image` that covers `resources`; InvalidRequest (a 422) naming `image` when no
    such image is configured, or the dimension no tier of it reaches."""
    known = [spec.name for spec in settings.images]
    if image not in known:
        raise InvalidRequest("image", f"unknown image {image!r}; known: {known} (see GET /v1/images)")
    return fit_tier(settings.tiers, resources.to_request() if resources else ResourceRequest(), image)


def prepare(body: ExecuteRequest, settings: Settings) -> tuple[TaskSpec, Tier] | JSONResponse:
    spec = build_spec(body, settings)
    if isinstance(spec, JSONResponse):
        return spec
    return spec, image_tier(settings, body.resources, body.image)


@router.post("/v1/execute", response_model=ExecuteResponse, tags=["tasks"],
             responses={**API_KEY, **described({
                 413: "Body, code, stdin or files too large", 422: MEANING[422],
                 429: "Over this key's rate, or too many requests wait for the tier",
                 503: "No capacity in time, or Docker unavailable"})})
async def execute(body: ExecuteRequest, request: Request, _key: str = Depends(require_task_quota)) -> Any:
    """Run a Python snippet on a warm container of the smallest tier that covers its resources.

    The answer is 200 whenever the task ran, whatever it did: see `status`. With `Accept: text/event-stream`
    it is a stream of `stdout` and `stderr` events (`{"text": ...}`) as the task writes, then one `result`
    event holding this same body; errors found before the task starts stay plain HTTP errors."""
    started = time.perf_counter()
    settings = settings_of(request)
    prepared = prepare(body, settings)
    if isinstance(prepared, JSONResponse):
        return prepared
    spec, tier = prepared
    if wants_stream(request):
        stream = await dispatcher_of(request).execute_stream(tier.name, spec, lease_wait_s(body, settings))

        async def result_body(outcome: Execution | PoolError) -> dict[str, Any]:
            return outcome_body(outcome, spec.task_id, tier, started)
        return stream_response(stream, result_body)
    execution = await dispatcher_of(request).execute(tier.name, spec, lease_wait_s(body, settings))
    return JSONResponse(execution_body(execution, spec.task_id, (time.perf_counter() - started) * 1000))


async def callback_refusal(url: str | None, settings: Settings) -> str | None:
    """Why a task's callback_url is refused (not allowed, or not a URL), checked at submission; None if fine."""
    if url is None:
        return None
    return await submission_refusal(callback_policy(settings.callback_allow), url)


@functools.lru_cache(maxsize=4)
def callback_policy(entries: tuple[str, ...]) -> CallbackPolicy:
    return CallbackPolicy.parse(entries)


def accepted(task_id: str) -> dict[str, str]:
    return {"id": task_id, "status": "queued", "link": f"/v1/tasks/{task_id}"}


@router.post("/v1/tasks", status_code=202, response_model=TaskAccepted, tags=["tasks"],
             responses={**API_KEY, **described({
                 413: "Body, code, stdin or files too large",
                 422: "Invalid request, or a callback_url the server does not allow",
                 429: "Over this key's rate or async task bounds, or the tier's queue is full",
                 503: "No worker serves the tier, or a backend is down"})})
async def submit_task(body: TaskRequest, request: Request, key: str = Depends(require_task_quota)) -> Any:
    """Queue a snippet to run in the background; poll `link` for its state and then its result.

    `GET link?wait_s=N` waits up to N seconds for the end. With `callback_url`, the result body is also
    POSTed there when the task ends, signed (`X-Warmpool-Signature`). The result is kept for the server's
    result TTL after the task ends; only the same API key can read it. Tasks waiting for a tier take turns
    by API key, so one key's many tasks do not hold back another key's."""
    settings = settings_of(request)
    prepared = prepare(body, settings)
    if isinstance(prepared, JSONResponse):
        return prepared
    spec, tier = prepared
    refusal = await callback_refusal(body.callback_url, settings)
    if refusal is not None:
        return invalid_body("callback_url", refusal)
    await dispatcher_of(request).submit(tier.name, spec, owner_of(key), body.callback_url or "")
    content = accepted(spec.task_id)
    return JSONResponse(status_code=202, content=content, headers={"Location": content["link"]})


@router.get("/v1/tasks/{task_id}", response_model=ExecuteResponse | TaskPending, tags=["tasks"],
            responses={**API_KEY, **described({404: "Unknown task (or another key's), or its result expired"}),
                       **errors(422, 503)})
async def get_task(task_id: str, request: Request, key: str = Depends(require_api_key),
                   wait_s: float = Query(default=0.0, ge=0, le=30, allow_inf_nan=False,
                                         description="Long poll: answer as soon as the task ends, or after this "
                                                     "many seconds with its pending state")) -> Any:
    """An async task: `queued` or `running` while pending, then the full result, as /v1/execute answers it."""
    known = _TASK_ID.fullmatch(task_id)
    view = await dispatcher_of(request).task(task_id, owner_of(key), wait_s) if known else None
    if view is None:
        return JSONResponse(status_code=404, content={"detail": f"no task {task_id!r} (unknown, or expired)"})
    return JSONResponse(task_body(view))


@router.get("/v1/tasks/{task_id}/events", tags=["tasks"],
            responses={200: {"content": {"text/event-stream": {"schema": {"type": "string"}}},
                             "description": "The task's events"},
                       **API_KEY, **described({404: "Unknown task (or another key's), or its result expired"}),
                       **errors(422, 503)})
async def task_events(task_id: str, request: Request, key: str = Depends(require_api_key)) -> Any:
    """An async task's output as server-sent events: `stdout` and `stderr` as it writes (from its start, also
    when followed late), then one `result` event with the body `GET /v1/tasks/{id}` gives. A task that has
    ended answers its `result` at once."""
    started = time.perf_counter()
    dispatcher, owner = dispatcher_of(request), owner_of(key)
    view = await dispatcher.task(task_id, owner) if _TASK_ID.fullmatch(task_id) else None
    found = await dispatcher.task_events(task_id, owner) if view is not None and view.state != TaskState.DONE \
        else view
    if found is None or view is None:
        return JSONResponse(status_code=404, content={"detail": f"no task {task_id!r} (unknown, or expired)"})
    if isinstance(found, TaskView):
        return result_response(task_body(found))
    tier = view.tier

    async def result_body(outcome: Execution | PoolError) -> dict[str, Any]:
        latest = await dispatcher.task(task_id, owner)
        if latest is not None and latest.state == TaskState.DONE:
            return task_body(latest)
        return outcome_body(outcome, task_id, tier, started)
    return stream_response(found, result_body)


@router.get("/v1/tiers", response_model=list[TierOut], response_model_exclude_none=True, tags=["catalogue"],
            operation_id="list_tiers", responses={**API_KEY, **errors(503)})
async def tiers(request: Request, _key: str = Depends(require_api_key)) -> list[dict[str, Any]]:
    """The resource tiers, smallest first, with their live container counts.

    In scale-out mode the counts are summed over the live workers serving each tier (`workers`), and
    `queued` counts the tier's tasks waiting or running."""
    return [snapshot.as_dict() for snapshot in await dispatcher_of(request).tiers()]


@router.get("/v1/images", response_model=list[ImageOut], tags=["catalogue"], operation_id="list_images",
            responses={**API_KEY, **errors(503)})
async def images(request: Request, _key: str = Depends(require_api_key)) -> list[dict[str, Any]]:
    """The sandbox images the tiers serve: Python version, every package with its version, and the modules
    already imported in the warm interpreter (so that importing them in a task costs next to nothing).

    Read from the images' labels, written when `warmpool image` built them."""
    return await dispatcher_of(request).images()


@router.get("/healthz", tags=["health"])
async def healthz() -> dict[str, str]:
    """The process is alive."""
    return {"status": "ok"}


@router.get("/readyz", tags=["health"], response_model=ReadyOut,
            responses={503: {"model": ReadyOut, "headers": RETRY_AFTER,
                             "description": "Not ready: the checks say which part is not"}})
async def readyz(request: Request) -> JSONResponse:
    """Docker reachable, runner image present, and every tier warmed to its min_idle.

    In scale-out mode: Redis answers and at least one worker is alive."""
    checks = await dispatcher_of(request).readiness()
    ready = all(checks.values())
    return JSONResponse(status_code=200 if ready else 503, content={"ready": ready, "checks": checks},
                        headers=None if ready else {"Retry-After": "1"})
