"""Abuse at the HTTP edge: oversized bodies, floods of requests, keys, rates, and where the server listens."""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import subprocess
import sys
import threading

import httpx
import pytest
from fastapi import FastAPI

from api.limits import RateLimiter
from pool.model.errors import InvalidRequest
from pool.settings import Settings, from_env
from tests.conftest import REPO, TEST_TIERS, idle_again
from tests.hostile.conftest import MAX_WAITING, container_of_box, execute
from tests.inprocess import embedded_over_fake
from tests.polling import wait_for

MIB = 1024 ** 2


@pytest.mark.docker
def test_oversized_payloads_are_413_before_any_container_is_touched(box):
    """With the tier's only container busy, a request that reached the pool would wait for it (and get 503
    after the lease timeout); an oversized one gets 413 at once: it never asked for a container."""
    host = container_of_box(box)
    idle_again(box, "box")
    with concurrent.futures.ThreadPoolExecutor(1) as executor:
        busy = executor.submit(box.execute, "import time\ntime.sleep(6)\nprint('done')", timeout_s=20)
        wait_for(lambda: box.client.get("/v1/tiers").json()[0]["busy"] == 1, "the only container busy")
        # Past the default body cap (which leaves room for 16 MiB of files as base64).
        flood = json.dumps({"code": "#" + "x" * (Settings().max_body_bytes + MIB)}).encode()
        response = box.client.post("/v1/execute", content=flood, headers={"content-type": "application/json"})
        assert response.status_code == 413 and "body exceeds" in response.json()["detail"]
        chunked = box.client.post("/v1/execute", content=iter([flood[i:i + MIB] for i in range(0, len(flood), MIB)]),
                                  headers={"content-type": "application/json"})
        assert chunked.status_code == 413  # no Content-Length: refused while reading, past the cap
        for field in ("code", "stdin"):  # under the body cap, over the field's own cap
            body = {"code": "print(1)", field: "#" + "x" * (2 * MIB)}
            response = box.client.post("/v1/execute", json=body)
            assert response.status_code == 413 and response.json()["detail"].startswith(f"{field}:")
        tiers = box.client.get("/v1/tiers").json()[0]
        assert (tiers["busy"], tiers["idle"]) == (1, 0)  # the only container is still the busy one
        assert busy.result(timeout=60).json()["stdout"] == "done\n"
    assert container_of_box(box) == host


@pytest.mark.docker
def test_fifty_parallel_requests_are_all_answered(box):
    """One container, MAX_WAITING leases may wait: the rest are refused at once with 429, none hangs."""
    barrier = threading.Barrier(50)

    def one(_: int) -> httpx.Response:
        with httpx.Client(base_url=box.base_url, timeout=120) as client:
            barrier.wait()
            return client.post("/v1/execute", json={"code": "import time\ntime.sleep(0.2)\nprint('ok')"})

    with concurrent.futures.ThreadPoolExecutor(50) as executor:
        responses = list(executor.map(one, range(50)))
    codes = sorted(r.status_code for r in responses)
    assert set(codes) <= {200, 429, 503}, codes
    assert 1 <= codes.count(200) <= MAX_WAITING + 2 and codes.count(429) >= 50 - MAX_WAITING - 2, codes
    for response in responses:
        if response.status_code == 200:
            assert response.json()["stdout"] == "ok\n"
        else:
            assert int(response.headers["retry-after"]) >= 1 and response.json()["detail"]
    assert box.process.poll() is None
    assert execute(box, "print('after the flood')")["stdout"] == "after the flood\n"


@pytest.mark.docker
def test_keys_rates_and_the_admin_key(serve):
    svc = serve(env={"WARMPOOL_API_KEYS": "key-one,key-two", "WARMPOOL_ADMIN_KEY": "admin-key",
                     "WARMPOOL_RATE_LIMIT_PER_S": "0.5", "WARMPOOL_RATE_LIMIT_BURST": "2"})

    def run(key: str | None) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return svc.client.post("/v1/execute", json={"code": "print('hi')"}, headers=headers)

    missing = run(None)
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    assert run("key-on").status_code == 403 and run("key-one-").status_code == 403
    assert run("admin-key").status_code == 403  # the admin key is not an API key
    assert svc.client.get("/v1/tiers").status_code == 401
    assert [run("key-one").status_code for _ in range(2)] == [200, 200]  # the burst
    limited = run("key-one")
    assert limited.status_code == 429 and int(limited.headers["retry-after"]) >= 1
    assert run("key-two").status_code == 200  # buckets are per key
    assert svc.client.get("/healthz").status_code == 200  # probes need no key
    admin = [svc.client.get("/v1/admin/pools", headers={"Authorization": f"Bearer {t}"} if t else {}).status_code
             for t in (None, "key-one", "admin-key")]
    assert admin == [401, 403, 200]


def admin_operations(app: FastAPI) -> list[tuple[str, str]]:
    """(method, path) of every operation of the app's OpenAPI document under /v1/admin, path parameters
    filled with tier "two"."""
    return [(method.upper(), re.sub(r"\{[^}]+\}", "two", path))
            for path, item in app.openapi()["paths"].items() if path.startswith("/v1/admin/") for method in item]


@pytest.mark.anyio
async def test_every_admin_route_takes_only_the_admin_key(tmp_path):
    """The real app (in process, over the fake backend): every /v1/admin route answers 401 without a key and
    403 to an API key or a near miss, changing nothing; only the admin key opens it. The admin key is no API
    key, and with no admin key configured the admin routes are off for everyone."""
    keys = {"WARMPOOL_API_KEYS": "api-key", "WARMPOOL_ADMIN_KEY": "admin-key"}
    async with embedded_over_fake(tmp_path, TEST_TIERS, keys) as (client, backend, app):
        operations = admin_operations(app)
        assert {path for _, path in operations} >= {"/v1/admin/pools", "/v1/admin/pools/two",
                                                    "/v1/admin/pools/two/drain", "/v1/admin/sessions"}

        async def status(method: str, path: str, token: str | None) -> int:
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            return (await client.request(method, path, json={"min_idle": 2}, headers=headers)).status_code

        for method, path in operations:
            assert [await status(method, path, t) for t in (None, "api-key", "admin-ke", "admin-key-")] == \
                [401, 403, 403, 403], (method, path)
        assert backend.removed == [] and len(backend.by_tier("two")) == 2, "no refused call changed anything"
        for method, path in operations:
            assert await status(method, path, "admin-key") == 200, (method, path)
        assert await status("POST", "/v1/execute", "admin-key") == 403, "the admin key is not an API key"
    async with embedded_over_fake(tmp_path, TEST_TIERS, {"WARMPOOL_API_KEYS": "api-key"}) as (client, _, app):
        for method, path in admin_operations(app):
            for token in ("api-key", None):
                headers = {"Authorization": f"Bearer {token}"} if token else {}
                response = await client.request(method, path, json={"min_idle": 2}, headers=headers)
                assert response.status_code == 403 and "WARMPOOL_ADMIN_KEY" in response.json()["detail"], \
                    (method, path, token, response.text)


def test_admin_key_must_differ_from_the_api_keys():
    with pytest.raises(InvalidRequest, match="WARMPOOL_ADMIN_KEY"):
        from_env({"WARMPOOL_API_KEYS": "a,b", "WARMPOOL_ADMIN_KEY": "b"})


def test_rate_limiter_refills_at_its_rate():
    now = [0.0]
    limiter = RateLimiter(rate_per_s=2.0, burst=3, clock=lambda: now[0])
    assert [limiter.take("k") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.take("k") == pytest.approx(0.5)
    assert limiter.take("other") == 0.0
    now[0] += 0.5
    assert limiter.take("k") == 0.0 and limiter.take("k") > 0
    assert RateLimiter(rate_per_s=0, burst=0).take("k") == 0.0  # off


def test_serve_refuses_a_public_address_without_keys():
    env = {k: v for k, v in os.environ.items() if k != "WARMPOOL_API_KEYS"}
    for host in ("0.0.0.0", "::", "192.0.2.1", "example.org"):
        done = subprocess.run([sys.executable, "-m", "warmpool", "serve", "--host", host, "--port", "1"],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode != 0 and "WARMPOOL_API_KEYS" in done.stderr, (host, done.stderr)


@pytest.mark.docker
def test_serve_says_it_is_loopback_only_without_keys(serve):
    svc = serve()
    assert svc.log_path is not None and "loopback only" in svc.log_path.read_text()


@pytest.mark.docker
def test_lone_surrogates_in_the_body_are_never_a_500(box):
    """JSON may carry a lone surrogate ("\\ud800"), which has no UTF-8 form: both used to make a 500."""
    for raw, status in ((b'{"code": "\\ud800"}', 422), (b'{"code": "import sys; print(len(sys.stdin.read()))", '
                                                          b'"stdin": "\\udc80x"}', 200)):
        response = box.client.post("/v1/execute", content=raw, headers={"content-type": "application/json"})
        assert response.status_code == status, response.text
    assert response.json()["stdout"] == "2\n"  # the runner writes the surrogate as "?"
