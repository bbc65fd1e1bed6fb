"""The app factory; its lifespan owns the dispatcher (started before serving, closed at shutdown).

Every route reaches the pools through that one `Dispatcher` (`app.state.dispatcher`), whichever kind
it is: embedded mode (the default) runs this process's own pool; scale-out mode (WARMPOOL_REDIS_URL set)
talks to workers through Redis.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI

from api.admin import router as admin_router
from api.auth import AuthBeforeBody
from api.batch import router as batch_router
from api.callback_relay import CallbackRelay
from api.dashboard import router as dashboard_router
from api.errors import install_error_handlers
from api.limits import BodySizeLimit, limiter_from
from api.mcp_http import install_mcp
from api.metrics import install_metrics
from api.responses import TAGS
from api.routes import router, task_body
from api.sessions import admin_router as session_admin_router
from api.sessions import router as session_router
from pool.dispatch import Dispatcher, create_dispatcher
from pool.settings import Settings, from_env

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None,
               dispatcher_factory: Callable[[Settings], Dispatcher] = create_dispatcher) -> FastAPI:
    """Build the service; settings come from the environment unless given. Tests pass their own
    `dispatcher_factory` (an embedded dispatcher over a fake container backend, say)."""
    settings = settings or from_env()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        dispatcher = dispatcher_factory(settings)
        app.state.dispatcher = dispatcher
        relay = CallbackRelay(dispatcher, settings, task_body) if settings.callback_allow else None
        try:
            await dispatcher.start()
            if relay is not None:
                await relay.start()
            if not settings.api_keys:
                log.warning("no WARMPOOL_API_KEYS set: every caller is anonymous, so `warmpool serve` listens on "
                            "loopback only; set WARMPOOL_API_KEYS to serve other hosts")
            if settings.redis_url:
                log.info("scale-out mode: tasks go to workers through Redis (prefix %r)", settings.redis_prefix)
            async with app.state.mcp.session_manager.run():  # MCP sessions end before the dispatcher closes
                yield
        finally:
            if relay is not None:
                await relay.close()
            await dispatcher.close()

    # Operation ids are the routes' names (`execute`, `get_task`), not FastAPI's `execute_v1_execute_post`:
    # what generated clients name their methods after; tests/test_openapi.py lists them.
    app = FastAPI(title="warmpool", version="0.1.0", lifespan=lifespan, openapi_tags=TAGS,
                  generate_unique_id_function=lambda route: route.name,
                  description="Run Python snippets in warm, verified-clean Docker containers.")
    app.state.settings = settings
    app.state.rate_limiter = limiter_from(settings)
    app.add_middleware(BodySizeLimit, max_body_bytes=settings.max_body_bytes)
    app.add_middleware(AuthBeforeBody)  # added last, so it runs first: no body is read for a wrong key
    install_error_handlers(app)
    app.include_router(router)
    app.include_router(batch_router)
    app.include_router(session_router)
    app.include_router(admin_router)
    app.include_router(session_admin_router)
    app.include_router(dashboard_router)
    app.state.mcp = install_mcp(app, settings)
    install_metrics(app)
    return app
