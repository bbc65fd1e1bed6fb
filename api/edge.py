"""The HTTP edge uvicorn lacks: a header size cap (431), a request-read timeout (408), a connection cap.

uvicorn gives a keep-alive timeout (used as is, from settings) and nothing else that holds against a
client that sends slowly or opens many connections:

- httptools, its fast parser, has no header size limit (an 8 MiB header is buffered whole); h11 has one
  (`h11_max_incomplete_event_size`) but uvicorn answers it 400, not 431, and h11 is much slower;
- neither has a timeout on reading a request: a connection that sends half a request, or nothing, is
  kept forever (the keep-alive timer runs only between requests, after a response);
- `limit_concurrency` counts idle connections and answers every request 503 past it, health probes
  included, and it does not stop connections from being accepted (each one costs a file descriptor).

So the server runs `GuardedHttpToolsProtocol`, uvicorn's httptools protocol with three additions, each
a few lines on uvicorn's own hooks:

- head bytes (request line and headers) are counted as they arrive; past `max_header_bytes` the
  answer is 431 and the connection is closed, so at most the cap plus one read is ever buffered;
- from the moment a connection opens (or a request's first byte arrives) the whole request must arrive
  within `request_read_timeout_s`, else 408 and close (slowloris, and connections that send nothing);
- at most `max_connections` are open: a new one past it closes the longest-idle connection that has no
  request being served (idle keep-alive, or still sending its request). When every connection is busy
  serving a request, up to `PROBE_HEADROOM` more are accepted for `/healthz` and `/readyz` only (any
  other path gets 503), so probes still answer; past that a new connection is closed at once.

The cap is kept below the process's file-descriptor limit (see `effective_max_connections`), leaving
room for the containers' attached sockets, Docker and Redis connections and log files.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from starlette.types import Receive, Scope, Send
from uvicorn._types import ASGI3Application
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger(__name__)

PROBE_PATHS = frozenset({"/healthz", "/readyz"})
PROBE_HEADROOM = 16
# Descriptors kept back from the connection cap for everything else the process opens: the Docker API's
# connection pool, Redis clients, logs, the listening socket. Attached container sockets are added per tier.
FD_RESERVE = 256


@dataclass(frozen=True)
class EdgeLimits:
    max_header_bytes: int
    request_read_timeout_s: float
    max_connections: int


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a head size cap, a request-read deadline and a connection cap."""

    limits: EdgeLimits  # set on the subclass `protocol_class` makes

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._reading_head = True  # the next bytes belong to a request line or headers
        self._head_bytes = 0
        self._head_tail = b""  # the last bytes of the head read so far: its end may straddle two reads
        self._read_deadline: asyncio.TimerHandle | None = None
        self._last_active_s = 0.0

    # connections ---------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._last_active_s = self.loop.time()
        if len(self.connections) > self.limits.max_connections and not self._make_room():
            if len(self.connections) > self.limits.max_connections + PROBE_HEADROOM:
                log.warning("connection cap (%d, +%d for probes) reached with every connection busy: "
                            "closing a new one", self.limits.max_connections, PROBE_HEADROOM)
                self.transport.close()
                return
            self.app = _probes_only(self.app)
        self._arm_read_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_read_deadline()
        super().connection_lost(exc)

    def _idle(self) -> bool:
        """No request of this connection is being served: it can be closed without losing an answer."""
        return (self.cycle is None or self.cycle.response_complete) and not self.pipeline

    def _make_room(self) -> bool:
        """Close the longest-idle other connection that serves nothing; False when there is none."""
        victims = [c for c in self.connections
                   if c is not self and isinstance(c, GuardedHttpToolsProtocol) and c._idle()
                   and not c.transport.is_closing()]
        if not victims:
            return False
        victim = min(victims, key=lambda c: c._last_active_s)
        victim.transport.close()
        self.connections.discard(victim)  # it is gone for counting now; uvicorn discards it again on loss
        return True

    # reading a request ---------------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        self._last_active_s = self.loop.time()
        if self._reading_head:
            # Counted before the parser sees the bytes: a head that arrives whole in one read (anything up
            # to the 64 KiB uvicorn reads at once) would otherwise be parsed, its request complete and the
            # count reset before it was ever compared with the cap. Only the head's own bytes count (up to
            # the blank line, which may straddle two reads), never a body that came in the same read.
            window = self._head_tail + data
            end = window.find(b"\r\n\r\n")
            self._head_bytes += len(data) if end < 0 else max(0, end + 4 - len(self._head_tail))
            self._head_tail = window[-3:]
            if self._head_bytes > self.limits.max_header_bytes:
                if not self.transport.is_closing():
                    self._refuse(431, f"request line and headers exceed the {self.limits.max_header_bytes} "
                                      "byte limit")
                return
        super().data_received(data)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm_read_deadline()

    def on_headers_complete(self) -> None:
        self._reading_head = False
        self._head_bytes = 0
        self._head_tail = b""
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._reading_head = True
        self._disarm_read_deadline()

    def on_response_complete(self) -> None:
        self._last_active_s = self.loop.time()
        super().on_response_complete()

    def _arm_read_deadline(self) -> None:
        if self._read_deadline is None and not self.transport.is_closing():
            self._read_deadline = self.loop.call_later(self.limits.request_read_timeout_s, self._read_timed_out)

    def _disarm_read_deadline(self) -> None:
        if self._read_deadline is not None:
            self._read_deadline.cancel()
            self._read_deadline = None

    def _read_timed_out(self) -> None:
        self._read_deadline = None
        if self.transport.is_closing():
            return
        if self.pipeline:  # a pipelined request waits (unread, by uvicorn's choice) behind one being served
            self._arm_read_deadline()
            return
        if self.cycle is not None and not self.cycle.response_complete and self.cycle.response_started:
            self.transport.close()  # an answer is under way (e.g. refused early): just stop reading
            return
        self._refuse(408, f"the request did not arrive within {self.limits.request_read_timeout_s:g} s")

    def _refuse(self, status: int, detail: str) -> None:
        """Answer `status` with a JSON detail and close, whatever state the request was in."""
        body = json.dumps({"detail": detail}).encode()
        head = f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n" \
               f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
        self.transport.write(head.encode() + body)
        self.transport.close()
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.disconnected = True  # the app must not write after our answer


def _probes_only(app: ASGI3Application) -> ASGI3Application:
    """`app` for health probes; 503 (and close) for anything else."""
    async def guarded(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in PROBE_PATHS:
            await app(scope, receive, send)  # type: ignore[arg-type]
            return
        body = json.dumps({"detail": "too many connections; retry shortly"}).encode()
        await send({"type": "http.response.start", "status": 503,
                    "headers": [(b"content-type", b"application/json"), (b"retry-after", b"1"),
                                (b"content-length", str(len(body)).encode()), (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})

    return guarded  # type: ignore[return-value]


def protocol_class(limits: EdgeLimits) -> type[GuardedHttpToolsProtocol]:
    """A protocol class for `uvicorn.run(http=...)` bound to these limits."""
    return type("WarmpoolHttpProtocol", (GuardedHttpToolsProtocol,), {"limits": limits})


def raise_nofile_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard one (at most 2^20); returns the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = min(hard if hard != resource.RLIM_INFINITY else 1 << 20, 1 << 20)
    if soft == resource.RLIM_INFINITY or soft >= target:
        return soft if soft != resource.RLIM_INFINITY else 1 << 20
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as exc:
        log.warning("could not raise the open-file limit from %d to %d: %s", soft, target, exc)
        return soft
    return target


def effective_max_connections(wanted: int, nofile_limit: int, container_sockets: int) -> int:
    """The connection cap to use: `wanted`, or less when the descriptors left after everything else the
    process holds (FD_RESERVE, one attached socket per container the tiers may hold, the probe headroom)
    would not cover it. At least 1."""
    room = nofile_limit - FD_RESERVE - container_sockets - PROBE_HEADROOM
    return max(1, min(wanted, room))
