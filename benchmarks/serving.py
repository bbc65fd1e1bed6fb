"""A `warmpool serve` on a loopback port for a benchmark, and its removal (every container it started)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from latency import free_port, wait_ready  # noqa: E402
from load import pinned  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


ADMIN_KEY = "bench-admin"  # the admin key of the servers benchmarks start: they listen on loopback only


def instance_id_of(base_url: str) -> str:
    """The instance id `server` gave the server at `base_url` (its containers carry it as a label)."""
    return f"bench-{base_url.rsplit(':', 1)[1]}"


@contextmanager
def server(env_extra: dict[str, str], tiers: dict[str, Any] | None = None,
           checkout: Path = REPO) -> Iterator[tuple[str, int]]:
    """A `warmpool serve` of `checkout` (another checkout's code runs under this venv: its directory comes
    first on the path) on a free loopback port, pinned to cpu 0; yields its URL and pid."""
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    instance_id = instance_id_of(base_url)
    env = {**os.environ, "WARMPOOL_INSTANCE_ID": instance_id, **env_extra}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as tiers_file:
        json.dump(tiers or {}, tiers_file)
    if tiers:
        env["WARMPOOL_TIERS_FILE"] = tiers_file.name
    log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)  # noqa: SIM115 - closed below
    process = subprocess.Popen(pinned(0, [sys.executable, "-m", "warmpool", "serve", "--host", "127.0.0.1",
                                          "--port", str(port)]), cwd=checkout, env=env,
                               stdout=log, stderr=subprocess.STDOUT)
    try:
        with httpx.Client(base_url=base_url, timeout=10) as client:
            if not wait_ready(client, 300):
                log.seek(0)
                raise SystemExit(f"server did not become ready:\n{log.read()[-3000:]}")
        yield base_url, process.pid
    finally:
        process.terminate()
        process.wait(120)
        wait_until_removed(instance_id)
        os.unlink(tiers_file.name)
        log.close()
        os.unlink(log.name)


def containers_of(instance_id: str) -> int:
    """How many containers the engine holds for the instance (running or not)."""
    return len(subprocess.run(["docker", "ps", "-aq", "--filter", f"label=warmpool.instance={instance_id}"],
                              capture_output=True, text=True).stdout.split())


def wait_until_removed(instance_id: str, timeout_s: float = 120) -> None:
    """Let the engine finish removing a stopped server's containers before the next one starts."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not containers_of(instance_id):
            return
        time.sleep(1)


def admin_client(base_url: str) -> httpx.Client:
    """A client of the admin routes of a server `server()` started (with WARMPOOL_ADMIN_KEY=ADMIN_KEY)."""
    return httpx.Client(base_url=base_url, timeout=10, headers={"Authorization": f"Bearer {ADMIN_KEY}"})


def pool_views(admin: httpx.Client) -> list[dict[str, Any]]:
    """Every tier's view from GET /v1/admin/pools."""
    return list(admin.get("/v1/admin/pools").raise_for_status().json()["tiers"])


def tier_view(views: list[dict[str, Any]], tier: str) -> dict[str, Any]:
    return next(view for view in views if view["name"] == tier)


def pool_counters(base_url: str, tier: str) -> tuple[int, int]:
    """The tier's containers created and replaced so far (the admin view's counters)."""
    with admin_client(base_url) as admin:
        view = tier_view(pool_views(admin), tier)
    return int(view["created"]), sum(view["replaced"].values())


def fresh_containers(base_url: str, tier: str, timeout_s: float = 180) -> int:
    """Drain `tier` (admin route) and wait until every drained container is gone, none is starting and the
    tier has idle ones: the open loop then runs on containers that served no task. Without it, whether a
    container wore out (max_uses) inside the loop depended on how many tasks the closed loops before it
    happened to send: one `make bench` run of three had both datascience containers replaced in its open
    loop (p99 275 ms against 14 and 19). What a replacement costs the tasks beside it is measured on its
    own (benchmarks/open_loop_tail.py). Returns how many containers the drain replaced."""
    with admin_client(base_url) as admin:
        drained_before = tier_view(pool_views(admin), tier)["replaced"].get("drained", 0)
        answer = admin.post(f"/v1/admin/pools/{tier}/drain").raise_for_status().json()
        doomed = sum(int(answer[k]) for k in ("idle_replaced", "busy_replaced_when_done",
                                              "starting_replaced_when_ready"))
        deadline_s = time.monotonic() + timeout_s
        while True:
            views = pool_views(admin)
            now = tier_view(views, tier)
            # The admin view counts a drained container when its removal starts: the engine's count of
            # the instance's containers (all tiers) says when the removals are done.
            if (now["replaced"].get("drained", 0) - drained_before >= doomed and now["starting"] == 0
                    and now["idle"] > 0 and containers_of(instance_id_of(base_url)) == held(views)):
                break
            if time.monotonic() > deadline_s:
                raise SystemExit(f"tier {tier} did not settle after a drain: {now}")
            time.sleep(0.5)
    time.sleep(FRESH_SETTLE_S)
    return doomed


FRESH_SETTLE_S = 3.0  # the removals' and starts' last cpu (docker rm, the new runners' imports) dies down


def held(tiers: list[dict[str, Any]]) -> int:
    """The containers the admin view says the server holds, over all its tiers."""
    return sum(int(t["idle"]) + int(t["busy"]) + int(t["starting"]) for t in tiers)
