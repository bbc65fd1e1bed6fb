"""What the app keeps for its routes: the settings and the one dispatcher (set by the lifespan)."""

from __future__ import annotations

from fastapi import Request

from pool.dispatch import Dispatcher
from pool.settings import Settings


def dispatcher_of(request: Request) -> Dispatcher:
    """The app's only way to the pools."""
    dispatcher: Dispatcher = request.app.state.dispatcher
    return dispatcher


def settings_of(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings
