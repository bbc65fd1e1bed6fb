"""The pool's error tree; Docker and Redis exceptions are wrapped into it at the boundary.

    PoolError
    ├── InvalidRequest          a request field is malformed (names the field)
    │   └── NoTierFits          no tier can ever cover the request (names the dimension)
    ├── UnknownTier             no tier has that name (admin routes)
    ├── CapacityError           the host ledger cannot hold what was asked (admin sizing)
    ├── NotSupported            this mode cannot do that (yet): admin of the pools in scale-out mode
    ├── NoCapacity              no container could be leased in time (retry later)
    │   └── Overloaded          too many tasks already wait for the tier (refused at once; HTTP 429)
    │       └── TooManySessions the key holds as many sessions as it may (HTTP 429)
    ├── BackendUnavailable      Docker (or Redis) does not answer (retry later)
    ├── SandboxError            a container or its runner broke; the container is replaced
    ├── ResultEvicted           an async task's result was evicted to keep the results bound (HTTP 404)
    ├── TaskWithdrawn           a leased task was withdrawn before its code was sent (nothing ran)
    ├── SessionGone             no such session for this key: unknown, or ended (says why; HTTP 404)
    └── SessionBusy             a call of the session is running already (HTTP 409)

A task's own timeout, OOM or crash is never one of these: it is data in `TaskResult`.
"""

from __future__ import annotations


class PoolError(Exception):
    """Base of every error the pool engine raises on purpose."""


class InvalidRequest(PoolError):
    """A request field is malformed; `field` names it (dotted, e.g. ``resources.ram``)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class NoTierFits(InvalidRequest):
    """No configured tier can ever cover the request in `field` (e.g. ``resources.gpu``)."""


class UnknownTier(PoolError):
    """No configured tier has the name asked for; the message lists the names."""


class CapacityError(PoolError):
    """What was asked does not fit the host's capacity ledger; the message gives the reason."""


class NotSupported(PoolError):
    """What was asked is not available in this mode (e.g. sizing pools that live on remote workers)."""


class NoCapacity(PoolError):
    """No container of the tier could be had within the wait bound."""

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Overloaded(NoCapacity):
    """The tier's bounded queue of waiting leases is full; the request is refused without waiting."""


class BackendUnavailable(PoolError):
    """The Docker engine (or Redis, in scale-out mode) is unreachable."""

    def __init__(self, message: str, retry_after_s: float = 2.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class SandboxError(PoolError):
    """A container or its runner failed in a way that is not the task's own doing."""


class ResultEvicted(PoolError):
    """An async task's finished result was dropped before its TTL to keep the server's results bound."""


class TaskWithdrawn(PoolError):
    """The task's start gate said no (abandoned, answered elsewhere, or its store is down): nothing ran."""


class TooManySessions(Overloaded):
    """The key already holds WARMPOOL_MAX_SESSIONS_PER_KEY sessions."""


class SessionGone(PoolError):
    """No session by this id for this key: never opened, another key's, or ended; `reason` says why it
    ended when that is known (and it was this key's)."""

    def __init__(self, session_id: str, reason: str | None = None) -> None:
        super().__init__(f"session {session_id!r} has ended: {reason}" if reason
                         else f"no session {session_id!r}")
        self.session_id = session_id
        self.reason = reason


class SessionBusy(PoolError):
    """A call of the session is still running; calls run one at a time."""
