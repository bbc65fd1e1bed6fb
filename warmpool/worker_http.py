"""`warmpool worker --metrics-port N`: /metrics and /healthz of a worker, served beside it in its event loop.

/metrics has the same pool figures as embedded mode's, each labelled `worker="<id>"`, taken from the
worker's pool as one frozen snapshot at scrape time. /healthz answers 200 while the worker process runs
(states `starting`, `serving`, `draining`), with its engine's and Redis's state; the server starts before
the worker warms and stops after it has left the cluster, so a drain can be watched to its end.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator

import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from api.metrics import render_pools
from pool.model.errors import PoolError
from pool.scaleout.worker import Sidecar, Worker

START_TIMEOUT_S = 10.0


class _SignalFreeServer(uvicorn.Server):
    """uvicorn, minus its signal handlers: the worker owns SIGTERM and SIGINT (they start its drain)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def worker_app(worker: Worker) -> FastAPI:
    app = FastAPI(title="warmpool worker", docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/metrics")
    async def metrics() -> Response:
        """The worker's pool figures (Prometheus text format), labelled by worker."""
        return Response(render_pools(worker.pool.snapshot(), worker=worker.worker_id), media_type=CONTENT_TYPE_LATEST)

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        """Alive: the worker's state, and whether its engine and Redis answer."""
        return JSONResponse(worker.health())

    return app


def metrics_sidecar(host: str, port: int) -> Sidecar:
    """A sidecar (see pool.scaleout.worker.run) serving the worker's /metrics and /healthz on host:port."""

    @contextlib.asynccontextmanager
    async def serving(worker: Worker) -> AsyncIterator[None]:
        config = uvicorn.Config(worker_app(worker), host=host, port=port, lifespan="off", access_log=False,
                                log_level="warning")
        server = _SignalFreeServer(config)
        task = asyncio.create_task(server.serve())
        try:
            async with asyncio.timeout(START_TIMEOUT_S):
                while not server.started:  # noqa: ASYNC110 - uvicorn offers no event for it
                    if task.done():
                        break
                    await asyncio.sleep(0.02)
        except TimeoutError:
            pass
        if not server.started:
            server.should_exit = True
            with contextlib.suppress(BaseException):  # uvicorn exits (SystemExit) when it cannot bind
                await task
            raise PoolError(f"cannot serve worker metrics on {host}:{port} (see the log above)")
        try:
            yield
        finally:
            server.should_exit = True
            await task

    return serving
