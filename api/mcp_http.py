"""`/mcp`: warmpool's MCP tools (warmpool/mcp/tools.py) over streamable HTTP, on the API, with the same keys.

`AuthBeforeBody` checks the bearer key of every request to /mcp as it does for /v1/. A tool call then
goes through this very app, in process (an httpx ASGI transport, no socket), with the caller's own key:
so it meets the same validation, rate limit, queue bounds and ownership of tasks and sessions as a REST
call would. The MCP session manager runs in the app's lifespan (`session_manager.run()`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
from fastapi import FastAPI
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.transport_security import TransportSecuritySettings
from starlette.routing import Route

from api.auth import MCP_PATH
from pool.settings import Settings
from warmpool.client import AsyncClient
from warmpool.mcp.tools import build_server

INTERNAL_URL = "http://warmpool.internal"  # never resolved: the transport hands requests to the app itself


def install_mcp(app: FastAPI, settings: Settings) -> MCPServer:
    """Add the /mcp route; the caller runs `server.session_manager.run()` for the app's lifetime."""

    @asynccontextmanager
    async def source(ctx: Context) -> AsyncIterator[AsyncClient]:
        scheme, _, token = (ctx.headers or {}).get("authorization", "").partition(" ")
        key = token.strip() if scheme.lower() == "bearer" and token.strip() else None
        # No retries in here: a 429 or 503 goes back to the agent, whose own client decides.
        async with AsyncClient(INTERNAL_URL, api_key=key, transport=httpx.ASGITransport(app=app),
                               max_retries=0) as client:
            yield client

    server = build_server(source)
    # Without keys the API serves loopback only; refuse requests whose Host is not loopback there (a web page
    # could otherwise reach it by DNS rebinding). With keys, the key is the guard.
    security = TransportSecuritySettings(enable_dns_rebinding_protection=False) if settings.api_keys else None
    mcp_app = server.streamable_http_app(streamable_http_path=MCP_PATH, transport_security=security,
                                         max_request_body_size=settings.max_body_bytes)
    route = next(r for r in mcp_app.routes if isinstance(r, Route) and r.path == MCP_PATH)
    app.router.routes.append(route)
    return server
