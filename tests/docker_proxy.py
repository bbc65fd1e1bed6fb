"""A unix-socket proxy in front of the Docker engine that a test can cut and restore, and that logs every
API request it carries.

Pointing a service's DOCKER_HOST at it lets a test take "dockerd" away from that one service (API calls
and attach streams both break) without stopping the engine that other tests share, and count the engine
calls a service makes (an attach's upgraded stream, which carries the runner's frames, is not a call).
"""

from __future__ import annotations

import os
import re
import selectors
import socket
import threading
from collections.abc import Callable

ENGINE_SOCKET = "/var/run/docker.sock"


class DockerProxy:
    def __init__(self, path: str, engine_socket: str = ENGINE_SOCKET) -> None:
        self.path = path
        self.engine_socket = engine_socket
        self._listener: socket.socket | None = None
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._requests: list[tuple[str, str]] = []  # (method, path) of every API request, in order

    def requests(self) -> list[tuple[str, str]]:
        """Every API request carried so far, as (method, path without the version prefix)."""
        with self._lock:
            return list(self._requests)

    def _log_request(self, method: str, path: str) -> None:
        with self._lock:
            self._requests.append((method, re.sub(r"^/v[0-9.]+/", "/", path)))

    @property
    def url(self) -> str:
        return f"unix://{self.path}"

    def start(self) -> None:
        if os.path.exists(self.path):
            os.unlink(self.path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(self.path)
        listener.listen(64)
        self._listener = listener
        thread = threading.Thread(target=self._accept, args=(listener,), daemon=True)
        thread.start()
        self._threads.append(thread)

    def cut(self) -> None:
        """The engine 'goes away': no new connections, every open one (attach streams too) dropped."""
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if os.path.exists(self.path):
            os.unlink(self.path)
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for client, upstream in pairs:
            for sock in (client, upstream):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()

    def close(self) -> None:
        self.cut()
        for thread in self._threads:
            thread.join(timeout=5)

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            upstream.connect(self.engine_socket)
            with self._lock:
                self._pairs.append((client, upstream))
            thread = threading.Thread(target=self._pump, args=(client, upstream, RequestParser(self._log_request)),
                                      daemon=True)
            thread.start()

    @staticmethod
    def _pump(client: socket.socket, upstream: socket.socket, parser: RequestParser) -> None:
        peers = {client: upstream, upstream: client}
        with selectors.DefaultSelector() as selector:
            for sock in peers:
                selector.register(sock, selectors.EVENT_READ)
            while True:
                try:
                    events = selector.select(timeout=1.0)
                except (OSError, ValueError):
                    return
                for key, _ in events:
                    source = key.fileobj
                    try:
                        data = source.recv(65536)  # type: ignore[union-attr]
                        if not data:
                            peers[source].shutdown(socket.SHUT_WR)  # type: ignore[index]
                            selector.unregister(source)
                            if not selector.get_map():
                                return
                            continue
                        if source is client:
                            parser.feed(data)
                        peers[source].sendall(data)  # type: ignore[index]
                    except OSError:
                        return


class RequestParser:
    """Finds the HTTP/1.1 requests in what a client sends on one connection (bodies skipped by their
    Content-Length or chunks); after an upgrade (`attach`) the rest of the connection is not HTTP."""

    def __init__(self, on_request: Callable[[str, str], None]) -> None:
        self._on_request = on_request
        self._buffer = bytearray()
        self._body_left = 0  # bytes of the current body still to skip
        self._chunked = False
        self._raw = False

    def feed(self, data: bytes) -> None:
        if self._raw:
            return
        self._buffer += data
        while self._step():
            pass

    def _step(self) -> bool:
        """Consume what the buffer holds of the current request; False when more bytes are needed."""
        buffer = self._buffer
        if self._body_left:
            taken = min(self._body_left, len(buffer))
            del buffer[:taken]
            self._body_left -= taken
            return bool(buffer) and not self._body_left
        if self._chunked:
            end = buffer.find(b"\r\n")
            if end < 0:
                return False
            size = int(bytes(buffer[:end]).split(b";")[0], 16)
            if len(buffer) < end + 2 + size + 2:
                return False
            del buffer[:end + 2 + size + 2]  # the chunk and its CRLF (the last, empty one: the final CRLF)
            self._chunked = size > 0
            return True
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            return False
        lines = bytes(buffer[:end]).decode("latin-1").split("\r\n")
        del buffer[:end + 4]
        method, path = lines[0].split(" ")[:2]
        headers = {name.strip().lower(): value.strip().lower()
                   for name, _, value in (line.partition(":") for line in lines[1:])}
        self._on_request(method, path.split("?")[0])
        if "upgrade" in headers.get("connection", ""):
            self._raw = True  # the attach: from here on, the container's stdin
            return False
        self._chunked = headers.get("transfer-encoding") == "chunked"
        self._body_left = int(headers.get("content-length", "0"))
        return True
