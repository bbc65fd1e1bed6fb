"""A loopback HTTP server of the test's own that records the callbacks it receives."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from tests.polling import wait_for


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def signed_with(self, secret: str) -> bool:
        expected = "sha256=" + hmac.new(secret.encode(), self.body, hashlib.sha256).hexdigest()
        return hmac.compare_digest(self.headers.get("x-warmpool-signature", ""), expected)


@dataclass
class Receiver:
    """Answers each POST with the next of `statuses` (the last one repeats); records every request."""

    host: str
    statuses: list[int] = field(default_factory=lambda: [200])
    location: str = ""  # for 3xx answers
    received: list[Received] = field(default_factory=list)
    port: int = 0
    _server: ThreadingHTTPServer | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def url(self, path: str = "/hook") -> str:
        return f"http://{self.host}:{self.port}{path}"

    def start(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                with receiver._lock:
                    receiver.received.append(Received(self.path, {k.lower(): v for k, v in self.headers.items()},
                                                      body))
                    status = receiver.statuses[min(len(receiver.received), len(receiver.statuses)) - 1]
                self.send_response(status)
                if receiver.location:
                    self.send_header("Location", receiver.location)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer((self.host, 0), Handler)
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def wait_count(self, count: int, timeout_s: float = 60) -> list[Received]:
        wait_for(lambda: len(self.received) >= count, what=f"{count} callback(s) at {self.url()}",
                 timeout_s=timeout_s)
        return list(self.received)

    def by_task(self) -> dict[str, list[Received]]:
        found: dict[str, list[Received]] = {}
        for item in list(self.received):
            found.setdefault(item.headers.get("x-warmpool-task-id", ""), []).append(item)
        return found


@pytest.fixture
def receiver() -> Iterator[Any]:
    """Start receivers (`receiver(host="127.0.0.2", statuses=[500, 200])`); each is stopped at the end."""
    made: list[Receiver] = []

    def start(host: str = "127.0.0.2", statuses: list[int] | None = None, location: str = "") -> Receiver:
        item = Receiver(host=host, statuses=statuses or [200], location=location)
        item.start()
        made.append(item)
        return item

    yield start
    for item in made:
        item.stop()
