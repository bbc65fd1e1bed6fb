"""Bearer-token checks: API keys for task routes, a separate admin key for /v1/admin/*."""

from __future__ import annotations

import hashlib
import hmac

from fastapi import HTTPException, Request


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
async def require_api_key(request: Request) -> str:
    """The caller's key (or "anonymous" when the server has no keys configured)."""
    keys: tuple[str, ...] = request.app.state.settings.api_keys
    if not keys:
        return "anonymous"
    token = _bearer(request)
    if token is None:
        raise HTTPException(status_code=401, detail="missing bearer token",
                            headers={"WWW-Authenticate": "Bearer"})
    if not _matches(token, keys):
        raise HTTPException(status_code=403, detail="invalid API key")
    return token


async def require_admin_key(request: Request) -> None:
    admin_key: str | None = request.app.state.settings.admin_key
    if not admin_key:
        raise HTTPException(status_code=403, detail="admin routes are disabled: set WARMPOOL_ADMIN_KEY")
    token = _bearer(request)
    if token is None:
        raise HTTPException(status_code=401, detail="missing bearer token",
                            headers={"WWW-Authenticate": "Bearer"})
    if not _matches(token, (admin_key,)):
        raise HTTPException(status_code=403, detail="invalid admin key")
