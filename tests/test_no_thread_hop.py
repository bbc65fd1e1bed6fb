"""No worker-thread hop on the task path: FastAPI runs a plain-`def` endpoint or dependency in a thread of
the pool, which on a 2-cpu host cost ~15% of the server's cpu per task (issue 15, py-spy); every route's
endpoint and dependencies are coroutines (pure: the app is built, not served)."""

from __future__ import annotations

import inspect

from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute

from api.app import create_app
from pool.engine.embedded import EmbeddedDispatcher
from pool.settings import Settings
from tests.fake_backend import FakeBackend


def is_async(call: object) -> bool:
    """A coroutine function, or an object whose __call__ is one (fastapi.security's HTTPBearer)."""
    return inspect.iscoroutinefunction(call) or inspect.iscoroutinefunction(type(call).__call__)


def sync_calls(dependant: Dependant, where: str) -> list[str]:
    found = []
    for sub in dependant.dependencies:
        if sub.call is not None and not is_async(sub.call):
            found.append(f"{where}: dependency {getattr(sub.call, '__qualname__', sub.call)}")
        found += sync_calls(sub, where)
    return found


def api_routes(routes: list, router_dependencies: list) -> tuple[list[APIRoute], list]:
    """Every APIRoute, through included routers (FastAPI 0.16x wraps them as `original_router`), and the
    routers' own `dependencies=[...]`."""
    found: list[APIRoute] = []
    for route in routes:
        if isinstance(route, APIRoute):
            found.append(route)
        router = getattr(route, "original_router", None)
        if router is not None:
            router_dependencies += list(router.dependencies)
            found += api_routes(router.routes, router_dependencies)[0]
    return found, router_dependencies


def test_every_route_and_dependency_is_async():
    app = create_app(Settings(), lambda s: EmbeddedDispatcher(s, FakeBackend()))
    routes, router_dependencies = api_routes(app.routes, [])
    assert any(r.path == "/v1/execute" for r in routes), "the task path is among them"
    offenders = []
    for route in routes:
        where = f"{sorted(route.methods)} {route.path}"
        if not is_async(route.endpoint):
            offenders.append(f"{where}: endpoint {route.endpoint.__qualname__}")
        offenders += sync_calls(route.dependant, where)
    offenders += [f"router dependency {d.dependency.__qualname__}" for d in router_dependencies
                  if not is_async(d.dependency)]
    assert offenders == [], "plain def runs in a worker thread: make these async\n" + "\n".join(offenders)
