"""The app served in this process, no socket: httpx's ASGI transport, with the app's lifespan run around it;
`embedded_over_fake` is the whole embedded-mode service over the fake container backend."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
from fastapi import FastAPI

from api.app import create_app
from pool.engine.embedded import EmbeddedDispatcher
from pool.settings import from_env
from tests.fake_backend import FakeBackend
from tests.polling import until


@asynccontextmanager
async def serve_in_process(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """Start the app (its lifespan starts the dispatcher), yield a client talking to it, then stop it."""
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://warmpool.test",
                                     timeout=30) as client:
            yield client


@asynccontextmanager
async def embedded_over_fake(workdir: Path, tiers: dict, env: dict[str, str]
                             ) -> AsyncIterator[tuple[httpx.AsyncClient, FakeBackend, FastAPI]]:
    """The app with `tiers` and `WARMPOOL_*` settings `env`, started and warm, over a fake backend; at the end
    every container it started must be removed and every runner double ended."""
    tiers_path = workdir / "tiers.json"
    tiers_path.write_text(json.dumps(tiers))
    settings = from_env({"WARMPOOL_TIERS_FILE": str(tiers_path), "WARMPOOL_INSTANCE_ID": "inproc", **env})
    backend = FakeBackend()
    app = create_app(settings, lambda s: EmbeddedDispatcher(s, backend))
    async with serve_in_process(app) as client:
        async def ready() -> bool:
            return (await client.get("/readyz")).status_code == 200

        await until(ready, "the in-process service to be ready")
        yield client, backend, app
    assert backend.containers == {} and backend.join() == []
