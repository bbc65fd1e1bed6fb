"""What the chaos soak (make soak, benchmarks/soak/) found, each fixed and held here against a real service
on the real engine."""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import pytest

from tests.docker_proxy import DockerProxy
from tests.polling import wait_for

pytestmark = pytest.mark.docker

CALLBACK_ENV = {"WARMPOOL_CALLBACK_ALLOW": "127.0.0.2", "WARMPOOL_CALLBACK_SECRET": "soak-finding"}


def _raw_exchange(base_url: str, request: bytes, split_at: int | None = None) -> bytes:
    """Send `request` in one write (as a client with a small request does), or in two split at `split_at`
    with a pause between, and read the answer."""
    parts = urlsplit(base_url)
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if split_at is None:
            sock.sendall(request)
        else:
            sock.sendall(request[:split_at])
            time.sleep(0.3)  # the server reads the first part alone
            sock.sendall(request[split_at:])
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
        return answer


def _post(header_pad: int, body: bytes) -> bytes:
    return (b"POST /v1/execute HTTP/1.1\r\nHost: soak\r\ncontent-type: application/json\r\n"
            b"X-Pad: " + b"p" * header_pad + b"\r\n" + f"content-length: {len(body)}\r\n\r\n".encode() + body)


def test_a_head_past_the_cap_is_431_even_when_it_arrives_in_one_read(serve):
    # Found by the soak's malformed burst: a 20 KB header in one write ran the task (200), because the
    # head was parsed, and its count reset, before it was compared with the 16 KiB cap.
    service = serve()
    answer = _raw_exchange(service.base_url, _post(20_000, b'{"code": "print(1)"}'))
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]


def test_a_body_in_the_same_read_does_not_count_against_the_head_cap(serve):
    service = serve()
    code = "print(len('" + "z" * 40_000 + "'))"  # a 40 KB body sent with its head in one write
    request = _post(1_000, json.dumps({"code": code}).encode())
    answer = _raw_exchange(service.base_url, request)
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
    # The blank line that ends the head split across two reads: the body after it is still not head.
    answer = _raw_exchange(service.base_url, request, split_at=request.index(b"\r\n\r\n") + 3)
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]


def test_async_submissions_are_refused_503_while_the_engine_is_away(serve, tmp_path):
    # Found by the soak's dockerd restarts, embedded mode: async tasks were accepted (202) while the engine
    # was gone and then all ended in an error at once; 173 of 420 in a 100 s run. Scale-out mode refuses
    # them (503) while no worker serves the tier, and a synchronous request is refused too.
    proxy = DockerProxy(str(tmp_path / "docker.sock"))
    proxy.start()
    service = serve(env={"DOCKER_HOST": proxy.url})
    try:
        proxy.cut()
        wait_for(lambda: service.client.get("/readyz").status_code == 503, "the service to see the engine gone")
        refused = service.client.post("/v1/tasks", json={"code": "print('during')"})
        assert refused.status_code == 503, refused.text
        assert int(refused.headers["retry-after"]) >= 1 and "detail" in refused.json()
        batch = service.client.post("/v1/tasks/batch", json={"tasks": [{"code": "print(1)"}]})
        assert batch.status_code == 503, batch.text
        proxy.start()
        wait_for(lambda: service.client.get("/readyz").status_code == 200, "the engine back", timeout_s=60)
        accepted = service.client.post("/v1/tasks", json={"code": "print('after')"})
        assert accepted.status_code == 202, accepted.text
        done = service.client.get(f"/v1/tasks/{accepted.json()['id']}", params={"wait_s": 30}).json()
        assert done["status"] == "succeeded" and done["stdout"] == "after\n"
    finally:
        service.stop()  # while the proxy is up, so that shutdown can remove its containers
        proxy.close()


def test_an_async_task_that_cannot_get_a_container_waits_for_one(serve):
    # The other half of the same finding: a task accepted just before the engine went away, or while
    # sessions held every container of its tier, ended as an error when its lease failed, although its
    # code was never sent. It now waits (as a task in scale-out mode's backlog does) and runs once.
    service = serve(env={"WARMPOOL_LEASE_TIMEOUT_S": "1"})
    session = service.client.post("/v1/sessions", json={"resources": {"ram": "64MiB"}})
    assert session.status_code == 201 and session.json()["tier"] == "one"  # the tier's only container
    task = service.client.post("/v1/tasks", json={"code": "print('waited')", "resources": {"ram": "64MiB"}})
    assert task.status_code == 202
    link = f"/v1/tasks/{task.json()['id']}"
    time.sleep(3)  # past the 1 s lease wait, more than once
    assert service.client.get(link).json()["status"] == "queued"
    assert service.client.delete(f"/v1/sessions/{session.json()['id']}").status_code == 204
    done = service.client.get(link, params={"wait_s": 30}).json()
    assert done["status"] == "succeeded" and done["stdout"] == "waited\n", done


@pytest.mark.redis
def test_a_callback_delivered_while_redis_restarts_is_not_sent_again(cluster, redis_server):
    # Found by the soak's Redis restarts (scale-out): attempt 1 reached the receiver, recording it failed
    # because Redis was restarting, the claim lapsed and the receiver got the same callback again.
    server = redis_server(appendonly=True)
    c = cluster(redis_url_=server.url)
    c.worker()
    # A 2 s attempt timeout makes the claim's lease 9 s: a lapsed claim would show up well within the wait.
    api = c.api(env={**CALLBACK_ENV, "WARMPOOL_CALLBACK_ATTEMPT_TIMEOUT_S": "2"})
    attempts: list[str] = []

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
            self.rfile.read(int(self.headers.get("content-length", "0")))
            attempts.append(self.headers.get("x-warmpool-attempt", ""))
            if len(attempts) == 1:
                assert server.process is not None
                server.process.terminate()  # a clean restart: Redis writes its AOF out, nothing is lost
                server.process.wait(10)
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    hook = ThreadingHTTPServer(("127.0.0.2", 0), Hook)
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.2:{hook.server_address[1]}/hook"
        submitted = api.client.post("/v1/tasks", json={"code": "print('once')", "callback_url": url})
        assert submitted.status_code == 202
        wait_for(lambda: len(attempts) == 1, "the first attempt", timeout_s=60)
        time.sleep(1)  # the API tries to record the attempt while Redis is away
        server.process = None
        server.start()
        key = f"{c.prefix}:task:{submitted.json()['id']}"
        wait_for(lambda: c.redis.hget(key, "callback_state") == "delivered", "the attempt recorded", timeout_s=30)
        time.sleep(12)  # past the claim's lease: a second attempt would have come by now
        assert attempts == ["1"]
    finally:
        hook.shutdown()
        hook.server_close()
