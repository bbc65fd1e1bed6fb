"""The app factory; its lifespan owns the dispatcher (started before serving, closed at shutdown).

Embedded mode (the default): the dispatcher owns this process's pool, also kept as `app.state.pool`.
Scale-out mode (WARMPOOL_REDIS_URL set): the dispatcher talks to workers through Redis; no pool here.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from api.admin import router as admin_router
from api.auth import AuthBeforeBody
from api.errors import install_error_handlers
from api.limits import BodySizeLimit, limiter_from
from api.metrics import install_metrics
from api.routes import router
from pool.dispatch import create_dispatcher
from pool.engine.embedded import EmbeddedDispatcher
from pool.settings import Settings, from_env

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the service; settings come from the environment unless given."""
    settings = settings or from_env()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        dispatcher = create_dispatcher(settings)
        app.state.dispatcher = dispatcher
        app.state.pool = dispatcher.pool if isinstance(dispatcher, EmbeddedDispatcher) else None
        try:
            await dispatcher.start()
            if not settings.api_keys:
                log.warning("no WARMPOOL_API_KEYS set: every caller is anonymous, so `warmpool serve` listens on "
                            "loopback only; set WARMPOOL_API_KEYS to serve other hosts")
            if settings.redis_url:
                log.info("scale-out mode: tasks go to workers through Redis (prefix %r)", settings.redis_prefix)
            yield
        finally:
            await dispatcher.close()

    app = FastAPI(title="warmpool", version="0.1.0", lifespan=lifespan,
                  description="Run Python snippets in warm, verified-clean Docker containers.")
    app.state.settings = settings
    app.state.rate_limiter = limiter_from(settings)
    app.add_middleware(BodySizeLimit, max_body_bytes=settings.max_body_bytes)
    app.add_middleware(AuthBeforeBody)  # added last, so it runs first: no body is read for a wrong key
    install_error_handlers(app)
    app.include_router(router)
    app.include_router(admin_router)
    install_metrics(app)
    return app
