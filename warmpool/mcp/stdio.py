"""`warmpool mcp`: warmpool's tools over MCP on stdio, for an agent that starts it as a subprocess.

It talks to the server at WARMPOOL_URL (default http://127.0.0.1:8000) with WARMPOOL_API_KEY, through
one client for the whole process.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from mcp.server.mcpserver import Context

from warmpool.client import AsyncClient
from warmpool.client.sync import DEFAULT_URL
from warmpool.mcp.tools import build_server


def main() -> None:
    client = AsyncClient(os.environ.get("WARMPOOL_URL") or DEFAULT_URL,
                         api_key=os.environ.get("WARMPOOL_API_KEY") or None)

    @asynccontextmanager
    async def source(_: Context) -> AsyncIterator[AsyncClient]:
        yield client

    build_server(source).run("stdio")
