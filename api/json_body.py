"""Request bodies parsed so that no number in them can escape as a 400 or a 500.

Python's `json` refuses integers of more than 4300 digits with a ValueError (CPython's guard against
quadratic int parsing), which FastAPI answers "400 There was an error parsing the body", naming nothing.
Here such an integer becomes an infinite float that says what it was, so it reaches validation like any
other number and is refused as a 422 naming its field ("must be a finite number, got an integer of 5001
digits"). Floats past the double range (`1e400`) already parse as infinity and meet the same checks.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute

# Well below CPython's 4300-digit limit, and far above any count or size a request can mean: no tier has
# 10^30 bytes. Converting fewer digits than this is cheap.
MAX_INT_DIGITS = 64


class HugeInt(float):
    """An integer from a request too long to be any quantity: infinite, and shown by its length."""

    digits: int

    def __new__(cls, text: str) -> HugeInt:
        negative = text.startswith("-")
        value = super().__new__(cls, "-inf" if negative else "inf")
        value.digits = len(text) - negative
        return value

    def __repr__(self) -> str:
        return f"{'a negative' if self < 0 else 'an'} integer of {self.digits} digits"

    __str__ = __repr__


def parse_int(text: str) -> int | float:
    return int(text) if len(text) <= MAX_INT_DIGITS else HugeInt(text)


class BodyRequest(Request):
    """A Request whose `json()` reads huge integers as `HugeInt` instead of failing."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = json.loads(await self.body(), parse_int=parse_int)
        return self._json


class BodyRoute(APIRoute):
    """The route class of every router here: FastAPI parses bodies through `BodyRequest`."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route_handler(request: Request) -> Response:
            return await handler(BodyRequest(request.scope, request.receive))

        return route_handler


def finite_for_json(value: Any) -> Any:
    """`value` with every non-finite float replaced by its text: validation errors echo their input, and
    `json.dumps` would write those as `Infinity`/`NaN`, which is not JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if isinstance(value, dict):
        return {k: finite_for_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite_for_json(v) for v in value]
    return value
