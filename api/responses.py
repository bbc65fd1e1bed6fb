"""What the OpenAPI document says of the error answers, so that a client generated from it can read them.

Only the document: the answers themselves are made elsewhere (api/errors.py, api/auth.py, api/limits.py) and
keep DESIGN.md's shapes: `{"detail": "..."}`, and for 422 FastAPI's list of located errors. `errors()` gives a
route's `responses=` entry for the statuses it can answer, each with its schema, and `Retry-After` on 429
and 503, where the server always sends it.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class ErrorOut(BaseModel):
    """Every error but 422: what went wrong, in words."""

    detail: str = Field(examples=["no task 'ab12' (unknown, or expired)"])


class ValidationErrorItem(BaseModel):
    """One invalid input, located (`["body", "resources", "ram"]`), as FastAPI reports it."""

    model_config = ConfigDict(extra="allow")

    loc: list[str | int] = Field(examples=[["body", "resources", "ram"]])
    msg: str = Field(examples=["Value error, cannot read 'lots' as a size"])
    type: str = Field(examples=["value_error"])
    input: Any = None
    ctx: dict[str, Any] | None = None


class ValidationErrorOut(BaseModel):
    """422: the request is invalid; each entry names the field (a task's `tasks[i]` in a batch)."""

    detail: list[ValidationErrorItem]


RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before retrying (a whole number, at least 1)",
                               "schema": {"type": "integer", "minimum": 1}}}
# The generic meaning of each status; a route passes its own words where it says more.
MEANING = {
    401: "Missing bearer token",
    403: "Wrong key (or, for /v1/admin, no WARMPOOL_ADMIN_KEY set)",
    404: "Not found",
    409: "What was asked cannot be done now (the detail says why)",
    413: "The body, code, stdin or files are too large",
    422: "Invalid request: each error names the field",
    429: "Over this key's rate or a queue bound",
    503: "No capacity in time, or a backend (Docker, Redis) unavailable",
}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The `responses=` entries of these statuses, with their generic descriptions (see `described`)."""
    return described({status: MEANING[status] for status in statuses})


def described(descriptions: dict[int, str]) -> dict[int | str, dict[str, Any]]:
    """The `responses=` entries of these statuses with these descriptions: a schema for each, Retry-After on
    429 and 503."""
    out: dict[int | str, dict[str, Any]] = {}
    for status, description in descriptions.items():
        entry: dict[str, Any] = {"description": description,
                                 "model": ValidationErrorOut if status == 422 else ErrorOut}
        if status in (429, 503):
            entry["headers"] = RETRY_AFTER
        out[status] = entry
    return out


API_KEY = described({401: MEANING[401], 403: "Wrong API key"})
ADMIN_KEY = described({401: MEANING[401], 403: "Wrong admin key, or no WARMPOOL_ADMIN_KEY set"})


TAGS = [
    {"name": "tasks", "description": "Run a snippet: at once (`/v1/execute`), in the background, or many at once"},
    {"name": "sessions", "description": "A container held for one key, whose calls share one interpreter"},
    {"name": "catalogue", "description": "The tiers and images this server offers"},
    {"name": "admin", "description": "See, size and drain the pools (the admin key)"},
    {"name": "health", "description": "Probes and metrics, without a key"},
]
