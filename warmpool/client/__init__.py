"""The Python client of warmpool: `Client` (blocking) and `AsyncClient` (asyncio), on httpx.

    from warmpool.client import Client

    with Client("http://127.0.0.1:8000", api_key="...") as client:
        result = client.execute("print(6 * 7)", ram="128MiB")
        print(result.status, result.stdout)

It needs only httpx (and httpx-sse for streams): nothing of the server (Docker, Redis) is imported.
"""

from warmpool.client.aio import AsyncClient, AsyncSession
from warmpool.client.errors import (
    AuthError,
    Conflict,
    ConnectionFailed,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    ServerError,
    Unavailable,
    WarmpoolError,
)
from warmpool.client.sync import Client, Session
from warmpool.client.types import ExecuteResult, OutputFile, SessionInfo, StreamEvent, TaskAccepted, TaskPending

__all__ = [
    "AsyncClient", "AsyncSession", "AuthError", "Client", "Conflict", "ConnectionFailed", "ExecuteResult",
    "InvalidRequest", "NotFound", "OutputFile", "PayloadTooLarge", "RateLimited", "ServerError", "Session",
    "SessionInfo", "StreamEvent", "TaskAccepted", "TaskPending", "Unavailable", "WarmpoolError",
]
