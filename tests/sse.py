"""Reading server-sent events from an httpx response, each with the time it arrived."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx


@dataclass(frozen=True)
class Event:
    name: str
    data: Any  # the parsed JSON of its data lines
    arrived_unix: float


def events(response: httpx.Response) -> Iterator[Event]:
    """The events of a text/event-stream response as they arrive (comments, e.g. keep-alives, skipped)."""
    name, data = "message", []
    for line in response.iter_lines():
        if not line:
            if data:
                yield Event(name, json.loads("\n".join(data)), time.time())
            name, data = "message", []
        elif line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))


def stream_all(client: httpx.Client, method: str, url: str, **kwargs: Any) -> tuple[httpx.Response, list[Event]]:
    """Send a request asking for an event stream; the response and all its events."""
    headers = {"accept": "text/event-stream", **kwargs.pop("headers", {})}
    with client.stream(method, url, headers=headers, **kwargs) as response:
        if response.headers.get("content-type", "").startswith("text/event-stream"):
            return response, list(events(response))
        response.read()
        return response, []


def text_of(found: list[Event], stream: str) -> str:
    return "".join(e.data["text"] for e in found if e.name == stream)
