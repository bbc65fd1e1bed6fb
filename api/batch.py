"""POST /v1/tasks/batch: many async tasks in one request, validated as a whole, queued all or none."""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from api.errors import invalid_body
from api.limits import require_task_quota
from api.responses import API_KEY, described
from api.routes import accepted, callback_refusal, prepare
from api.schemas import BatchAccepted, BatchRequest
from api.state import dispatcher_of, settings_of
from pool.dispatch import owner_of
from pool.model.errors import InvalidRequest
from pool.model.tasks import Submission

router = APIRouter()


def _located(response: JSONResponse, index: int) -> JSONResponse:
    """One task's error answer, as the batch's: its location starts with tasks[index]."""
    body = json.loads(bytes(response.body))
    detail = body.get("detail")
    if isinstance(detail, list):
        for error in detail:
            error["loc"] = ["body", "tasks", index, *error.get("loc", [])[1:]]
    else:
        body["detail"] = f"tasks[{index}].{detail}"
    return JSONResponse(status_code=response.status_code, content=body, headers={
        k: v for k, v in response.headers.items() if k.lower() == "retry-after"})


@router.post("/v1/tasks/batch", status_code=202, response_model=BatchAccepted, tags=["tasks"],
             responses={**API_KEY, **described({
                 413: "Body, or one task's code, stdin or files, too large (names tasks[i])",
                 422: "A task is invalid (its location names tasks[i]), or too many tasks",
                 429: "Over this key's rate or async task bounds, or a tier's queue cannot take them all",
                 503: "No worker serves a tier, or a backend is down"})})
async def submit_batch(body: BatchRequest, request: Request, key: str = Depends(require_task_quota)) -> Any:
    """Queue several snippets at once; each answer is like `POST /v1/tasks`'s, in the order sent.

    The batch is checked as a whole before anything is queued: one invalid task makes it a 422 whose
    location names `tasks[i]`, and no task runs. The tasks run concurrently within their tiers' sizes, and
    tasks waiting for a tier take turns by API key, so a large batch does not hold back other keys'
    tasks. Each item may carry its own `callback_url`. A batch counts as one submission against the
    key's rate limit."""
    settings = settings_of(request)
    if len(body.tasks) > settings.max_batch:
        return invalid_body("tasks", f"at most {settings.max_batch} tasks in one batch, got {len(body.tasks)}")
    submissions: list[Submission] = []
    for index, item in enumerate(body.tasks):
        try:
            prepared = prepare(item, settings)
        except InvalidRequest as exc:
            return JSONResponse(status_code=422, content={"detail": [{
                "loc": ["body", "tasks", index, *exc.field.split(".")], "msg": exc.message, "type": "value_error"}]})
        if isinstance(prepared, JSONResponse):
            return _located(prepared, index)
        refusal = await callback_refusal(item.callback_url, settings)
        if refusal is not None:
            return _located(invalid_body("callback_url", refusal), index)
        spec, tier = prepared
        submissions.append(Submission(tier.name, spec, item.callback_url or ""))
    await dispatcher_of(request).submit_many(submissions, owner_of(key))
    return JSONResponse(status_code=202, content={"tasks": [accepted(s.spec.task_id) for s in submissions]})
