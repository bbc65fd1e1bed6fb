"""Bearer-token checks: API keys for task routes, a separate admin key for /v1/admin/*.

The checks run twice over: as route dependencies (the authority, shown in the OpenAPI document), and
first in `AuthBeforeBody`, which answers a request with a missing or wrong key before its body is read,
because FastAPI reads and parses the whole body before it runs any dependency.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Annotated

from fastapi import HTTPException, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.types import ASGIApp, Receive, Scope, Send

# Where AuthBeforeBody leaves the key it checked, so that the route's dependency does not hash it again.
_CHECKED_KEY = "warmpool.api_key"
MCP_PATH = "/mcp"  # the MCP endpoint (api/mcp_http.py) takes the same API keys as /v1/


# The OpenAPI document's security schemes: an Authorize button in /docs, and generated clients that send the
# key. The checks below read the header themselves (AuthBeforeBody calls them outside FastAPI's injection), so
# the schemes' own answers are unused: auto_error=False keeps them from answering anything.
API_KEY_SCHEME = HTTPBearer(scheme_name="ApiKey", auto_error=False,
                            description="One of the server's WARMPOOL_API_KEYS (not needed when it has none)")
ADMIN_KEY_SCHEME = HTTPBearer(scheme_name="AdminKey", auto_error=False,
                              description="The server's WARMPOOL_ADMIN_KEY")
ApiKeyScheme = Annotated[HTTPAuthorizationCredentials | None, Security(API_KEY_SCHEME)]
AdminKeyScheme = Annotated[HTTPAuthorizationCredentials | None, Security(ADMIN_KEY_SCHEME)]


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode("utf-8", "surrogatepass")).digest()


def _matches(token: str, keys: tuple[str, ...]) -> bool:
    # compare_digest on fixed-length digests (on raw strings it returns early when the lengths differ, which
    # tells a key's length), against every key without stopping early, so the time says nothing of which.
    probe = _digest(token)
    found = False
    for key in keys:
        found |= hmac.compare_digest(probe, _digest(key))
    return found


# async on purpose: FastAPI runs a plain `def` dependency in a worker thread, a costly hop per request.
async def require_api_key(request: Request, _scheme: ApiKeyScheme = None) -> str:
    """The caller's key (or "anonymous" when the server has no keys configured)."""
    keys: tuple[str, ...] = request.app.state.settings.api_keys
    if not keys:
        return "anonymous"
    checked: str | None = request.scope.get(_CHECKED_KEY)
    if checked is not None:
        return checked
    token = _bearer(request)
    if token is None:
        raise HTTPException(status_code=401, detail="missing bearer token",
                            headers={"WWW-Authenticate": "Bearer"})
    if not _matches(token, keys):
        raise HTTPException(status_code=403, detail="invalid API key")
    return token


async def require_admin_key(request: Request, _scheme: AdminKeyScheme = None) -> None:
    admin_key: str | None = request.app.state.settings.admin_key
    if not admin_key:
        raise HTTPException(status_code=403, detail="admin routes are disabled: set WARMPOOL_ADMIN_KEY")
    token = _bearer(request)
    if token is None:
        raise HTTPException(status_code=401, detail="missing bearer token",
                            headers={"WWW-Authenticate": "Bearer"})
    if not _matches(token, (admin_key,)):
        raise HTTPException(status_code=403, detail="invalid admin key")


class AuthBeforeBody:
    """Pure ASGI: a request under /v1/ (or to /mcp) whose key is missing or wrong is answered 401/403 before any of its
    body is read, and, when it announced a body, with `connection: close`, so the rest is never read.

    Without it a flood of unauthenticated uploads costs the body cap's worth of memory and reading each
    (BodySizeLimit buffers before the app runs). A passing request goes on untouched."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope.get("path", "")
        if scope["type"] != "http" or not (path.startswith("/v1/") or path == MCP_PATH):
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        try:
            if path.startswith("/v1/admin/") or path == "/v1/admin":
                await require_admin_key(request)
            else:
                scope[_CHECKED_KEY] = await require_api_key(request)
        except HTTPException as exc:
            await _refuse(scope, send, exc)
            return
        await self.app(scope, receive, send)


async def _refuse(scope: Scope, send: Send, exc: HTTPException) -> None:
    body = json.dumps({"detail": exc.detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in (exc.headers or {}).items()]
    if any(name in (b"content-length", b"transfer-encoding") and value not in (b"0", b"")
           for name, value in scope["headers"]):
        headers.append((b"connection", b"close"))  # a body follows that we will not read
    await send({"type": "http.response.start", "status": exc.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": body})
