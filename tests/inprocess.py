"""The app served in this process, no socket: httpx's ASGI transport, with the app's lifespan run around it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
from fastapi import FastAPI


@asynccontextmanager
async def serve_in_process(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """Start the app (its lifespan starts the dispatcher), yield a client talking to it, then stop it."""
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://warmpool.test",
                                     timeout=30) as client:
            yield client
