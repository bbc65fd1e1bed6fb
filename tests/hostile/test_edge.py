"""The HTTP edge against clients that send too much, too slowly, or open too many connections (issue 9,
finding 6): a header cap (431), a request-read timeout (408), a connection cap that leaves health probes
answering, and authentication before a body is read. Raw sockets, because an HTTP client library would
not send half a request. Every wait is bounded; no timing is asserted beyond "within the bound"."""

from __future__ import annotations

import contextlib
import select
import socket
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import httpx
import pytest

from pool.settings import Settings
from tests.hostile.conftest import server_rss_bytes

MIB = 1024 ** 2
ONE_TIER = {"tiers": [{"name": "one", "cpu": 0.5, "ram": "96MiB", "storage": "32MiB", "min_idle": 1, "max_size": 1}]}
READ_TIMEOUT_S = 2
GRACE_S = 30  # beyond a server-side timeout, for a loaded machine


def _address(service) -> tuple[str, int]:
    parts = urlsplit(service.base_url)
    return parts.hostname or "127.0.0.1", parts.port or 80


@contextlib.contextmanager
def _connections(service, count: int) -> Iterator[list[socket.socket]]:
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sockets.append(socket.create_connection(_address(service), timeout=10))
        yield sockets
    finally:
        for sock in sockets:
            sock.close()


def _read_until_closed(sock: socket.socket, timeout_s: float) -> bytes | None:
    """Everything the server sends until it closes; None if it is still open after `timeout_s`."""
    data = b""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ready, _, _ = select.select([sock], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            continue
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk
    return None


def _status(response: bytes) -> int:
    return int(response.split(b" ", 2)[1]) if response.startswith(b"HTTP/1.1 ") else 0


def _send_head_until_answered(sock: socket.socket, total_bytes: int) -> bytes:
    """Send a request whose one header is `total_bytes` long, 64 KiB at a time, stopping as soon as the
    server answers (or hangs up); returns the answer, empty if none came within a bounded wait."""
    sock.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-big: ")
    sent = 0
    while sent < total_bytes:
        readable, _, _ = select.select([sock], [], [], 0)
        if readable:
            break
        try:
            sock.sendall(b"a" * 65536)
        except (BrokenPipeError, ConnectionResetError):
            break
        sent += 65536
    return _read_until_closed(sock, timeout_s=10) or b""


@pytest.mark.docker
def test_an_8_mib_header_is_431_and_costs_the_server_no_memory(serve):
    svc = serve(tiers=ONE_TIER)
    with _connections(svc, 1) as (sock,):
        answer = _send_head_until_answered(sock, 8 * MIB)
    assert _status(answer) == 431, answer[:300]
    assert b"16384 byte limit" in answer
    # Four connections each pushing 16 MiB of one header and then holding it: used to be buffered whole.
    before = server_rss_bytes(svc)
    with _connections(svc, 4) as socks:
        for sock in socks:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nx-big: ")
            with contextlib.suppress(BrokenPipeError, ConnectionResetError, TimeoutError):
                for _ in range(256):
                    sock.sendall(b"b" * 65536)
        grown = server_rss_bytes(svc) - before
    assert grown < 16 * MIB, f"the server grew by {grown / MIB:.1f} MiB for 64 MiB of headers"
    ok = httpx.get(f"{svc.base_url}/healthz", headers={"x-fine": "a" * 8000}, timeout=10)
    assert ok.status_code == 200  # an ordinary large header still passes


@pytest.mark.docker
def test_half_sent_requests_are_closed_after_the_read_timeout(serve):
    svc = serve(tiers=ONE_TIER, env={"WARMPOOL_REQUEST_READ_TIMEOUT_S": str(READ_TIMEOUT_S),
                                     "WARMPOOL_KEEP_ALIVE_TIMEOUT_S": "1"})
    partial = [b"", b"POST /v1/execute HTTP/1.1\r\nhost: x\r\n",
               b"POST /v1/execute HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
               b"content-length: 1000\r\n\r\n{\"code\": "]
    with _connections(svc, 30) as socks:
        for index, sock in enumerate(socks):
            sock.sendall(partial[index % 3])
        deadline = time.monotonic() + READ_TIMEOUT_S + GRACE_S  # one bound for all of them
        answers = [_read_until_closed(sock, max(0.1, deadline - time.monotonic())) for sock in socks]
    assert all(a is not None for a in answers), "a half-sent request was still open after the read timeout"
    for index, answer in enumerate(answers):
        assert answer is not None and _status(answer) == 408, (index, answer[:200])
    # Idle after a response: closed by the keep-alive timeout.
    with _connections(svc, 1) as (sock,):
        sock.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        answer = _read_until_closed(sock, 1 + GRACE_S)
    assert answer is not None and _status(answer) == 200
    assert svc.client.get("/healthz").status_code == 200


@pytest.mark.docker
def test_idle_connections_past_the_descriptor_limit_do_not_starve_probes(serve):
    """The server may open 1024 files; 1100 idle connections used to take them all, after which nothing
    was accepted. With a cap of 64, each new connection closes the longest-idle one instead."""
    svc = serve(tiers=ONE_TIER, nofile_limit=1024, env={"WARMPOOL_MAX_CONNECTIONS": "64",
                                                         "WARMPOOL_REQUEST_READ_TIMEOUT_S": "600"})
    with _connections(svc, 1100):
        with httpx.Client(base_url=svc.base_url, timeout=10) as client:
            assert client.get("/healthz").status_code == 200
            assert client.get("/readyz").status_code == 200
            assert client.get("/v1/tiers").status_code == 200
            assert client.post("/v1/execute", json={"code": "print(6 * 7)"}).json()["stdout"] == "42\n"


@pytest.mark.docker
def test_probes_answer_when_every_connection_is_busy(serve):
    """64 connections each in the middle of sending a body are being served, so none may be closed for a
    newcomer: a health probe still gets through (the headroom), anything else is 503 with Retry-After."""
    svc = serve(tiers=ONE_TIER, env={"WARMPOOL_MAX_CONNECTIONS": "64", "WARMPOOL_REQUEST_READ_TIMEOUT_S": "600"})
    with _connections(svc, 64) as socks:
        for sock in socks:
            sock.sendall(b"POST /v1/execute HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                         b"content-length: 1000\r\n\r\n{\"code\": ")
        with httpx.Client(base_url=svc.base_url, timeout=10) as client:
            assert client.get("/healthz").status_code == 200
            assert client.get("/readyz").status_code == 200
        refused = httpx.get(f"{svc.base_url}/v1/tiers", timeout=10)
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1", refused.text
    assert svc.client.get("/v1/tiers").status_code == 200  # once they are gone


@pytest.mark.docker
def test_a_big_unauthenticated_body_is_refused_before_it_is_read(serve):
    svc = serve(tiers=ONE_TIER, env={"WARMPOOL_API_KEYS": "right-key"})
    for size in (100 * 1000 * 1000, MIB):  # over the body cap, and under it
        for auth, status in ((b"", 401), (b"authorization: Bearer wrong-key\r\n", 403)):
            with _connections(svc, 1) as (sock,):
                # The head only: none of the body is sent, so an answer proves none of it was read.
                sock.sendall(b"POST /v1/execute HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                             + auth + b"content-length: " + str(size).encode() + b"\r\n\r\n")
                answer = _read_until_closed(sock, 10)
            assert answer is not None, f"no answer (or the connection stayed open) for a {size}-byte body"
            assert _status(answer) == status and b"connection: close" in answer, answer[:300]
    authorized = svc.client.post("/v1/execute", json={"code": "print(1)"},
                                 headers={"authorization": "Bearer right-key"})
    assert authorized.status_code == 200 and authorized.json()["stdout"] == "1\n"
    too_big = svc.client.post("/v1/execute", content=b"x" * (Settings().max_body_bytes + MIB),
                              headers={"authorization": "Bearer right-key"})
    assert too_big.status_code == 413  # with the right key, the body cap still holds
