"""The client's errors: one per kind of HTTP answer a caller handles differently, all `WarmpoolError`s.

    WarmpoolError            status (None when no answer came), detail (the body's "detail", or its text)
    ├── ConnectionFailed     the server could not be reached, or the answer did not come in time
    ├── AuthError            401, 403: no key, or a wrong one
    ├── NotFound             404: unknown (or expired, or another key's) task or session
    ├── Conflict             409: a session already running a call
    ├── PayloadTooLarge      413: body, code, stdin or files past the server's limits
    ├── InvalidRequest       422: a field the server refused (detail names it)
    ├── RateLimited          429: over the key's rate or a queue's bound (retry_after_s)
    ├── Unavailable          503: no capacity in time, or a backend down (retry_after_s)
    └── ServerError          any other status

A task's own failure (non-zero exit, timeout, memory) is not an error: it is the result's `status`.
"""

from __future__ import annotations

from typing import Any


class WarmpoolError(Exception):
    """An HTTP answer that was not a success, or no answer at all."""

    def __init__(self, message: str, status: int | None = None, detail: Any = None,
                 retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.detail = detail
        self.retry_after_s = retry_after_s


class ConnectionFailed(WarmpoolError):
    """No answer: the server is unreachable, or it did not answer in time."""


class AuthError(WarmpoolError):
    """401 or 403."""


class NotFound(WarmpoolError):
    """404."""


class Conflict(WarmpoolError):
    """409."""


class PayloadTooLarge(WarmpoolError):
    """413."""


class InvalidRequest(WarmpoolError):
    """422: `detail` is the server's list of {loc, msg} naming each refused field."""


class RateLimited(WarmpoolError):
    """429."""


class Unavailable(WarmpoolError):
    """503."""


class ServerError(WarmpoolError):
    """Any other non-success status."""


_BY_STATUS: dict[int, type[WarmpoolError]] = {401: AuthError, 403: AuthError, 404: NotFound, 409: Conflict,
                                              413: PayloadTooLarge, 422: InvalidRequest, 429: RateLimited,
                                              503: Unavailable}


def error_for(status: int, detail: Any, retry_after_s: float | None = None) -> WarmpoolError:
    """The error for an HTTP status, with a message that says what the server said."""
    cls = _BY_STATUS.get(status, ServerError)
    return cls(f"HTTP {status}: {describe(detail)}", status=status, detail=detail, retry_after_s=retry_after_s)


def describe(detail: Any) -> str:
    """FastAPI's detail as one line: its message, or each refused field as `loc: msg`."""
    if isinstance(detail, list):
        parts = []
        for item in detail:
            if isinstance(item, dict):
                loc = ".".join(str(p) for p in item.get("loc", []) if p not in ("body", "query"))
                parts.append(f"{loc}: {item.get('msg', '')}" if loc else str(item.get("msg", item)))
            else:
                parts.append(str(item))
        return "; ".join(parts)
    return str(detail)
