"""A loopback HTTP server that receives the soak's callbacks: per task id, each attempt, signature checked."""

from __future__ import annotations

import hashlib
import hmac
import threading
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Receiver:
    """Answers every POST 204 at once (so the server never has a reason to retry) and records it."""

    def __init__(self, secret: str) -> None:
        self.secret = secret.encode()
        self.attempts: dict[str, list[int]] = defaultdict(list)
        self.bad_signatures: dict[str, int] = defaultdict(int)
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}/hook"

    def start(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                expected = "sha256=" + hmac.new(receiver.secret, body, hashlib.sha256).hexdigest()
                task_id = self.headers.get("x-warmpool-task-id", "")
                attempt = int(self.headers.get("x-warmpool-attempt", "0") or 0)
                with receiver._lock:
                    receiver.attempts[task_id].append(attempt)
                    if not hmac.compare_digest(self.headers.get("x-warmpool-signature", ""), expected):
                        receiver.bad_signatures[task_id] += 1
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="soak-receiver", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(10)

    def received(self, task_id: str) -> tuple[list[int], int]:
        with self._lock:
            return list(self.attempts.get(task_id, [])), self.bad_signatures.get(task_id, 0)
