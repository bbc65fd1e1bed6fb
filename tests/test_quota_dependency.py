"""The per-key rate limit's dependency, in process over the fake backend: it runs on the event loop (never in
FastAPI's thread pool, where the token buckets would change from several threads), and a key past its rate
gets a 429 with Retry-After."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from api.limits import RateLimiter
from tests.conftest import TEST_TIERS
from tests.inprocess import embedded_over_fake

pytestmark = pytest.mark.anyio


async def test_the_task_quota_is_taken_on_the_event_loop_thread(tmp_path: Path):
    env = {"WARMPOOL_API_KEYS": "alice", "WARMPOOL_RATE_LIMIT_PER_S": "0.01", "WARMPOOL_RATE_LIMIT_BURST": "1"}
    async with embedded_over_fake(tmp_path, TEST_TIERS, env) as (client, _, app):
        limiter: RateLimiter = app.state.rate_limiter
        taken_on: list[int] = []
        take = limiter.take

        def recording(key: str) -> float:
            taken_on.append(threading.get_ident())
            return take(key)

        limiter.take = recording  # type: ignore[method-assign]
        headers = {"authorization": "Bearer alice"}
        first = await client.post("/v1/execute", json={"code": "print(1)"}, headers=headers)
        second = await client.post("/v1/execute", json={"code": "print(1)"}, headers=headers)
        assert first.status_code == 200, first.text
        assert second.status_code == 429 and int(second.headers["retry-after"]) >= 1, second.text
        assert taken_on == [threading.get_ident()] * 2, "the quota was taken off the event loop's thread"
