"""A unix-socket proxy in front of the Docker engine that a test can cut and restore.

Pointing a service's DOCKER_HOST at it lets a test take "dockerd" away from that one service (API calls
and attach streams both break) without stopping the engine that other tests share.
"""

from __future__ import annotations

import os
import selectors
import socket
import threading

ENGINE_SOCKET = "/var/run/docker.sock"


class DockerProxy:
    def __init__(self, path: str, engine_socket: str = ENGINE_SOCKET) -> None:
        self.path = path
        self.engine_socket = engine_socket
        self._listener: socket.socket | None = None
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

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
            thread = threading.Thread(target=self._pump, args=(client, upstream), daemon=True)
            thread.start()

    @staticmethod
    def _pump(client: socket.socket, upstream: socket.socket) -> None:
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
                        peers[source].sendall(data)  # type: ignore[index]
                    except OSError:
                        return
