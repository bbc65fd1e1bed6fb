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


def instance_id_of(base_url: str) -> str:
    """The instance id `server` gave the server at `base_url` (its containers carry it as a label)."""
    return f"bench-{base_url.rsplit(':', 1)[1]}"


@contextmanager
def server(env_extra: dict[str, str], tiers: dict[str, Any] | None = None,
           checkout: Path = REPO) -> Iterator[tuple[str, int]]:
    """A `warmpool serve` of `checkout` (another checkout's code runs under this venv: its directory comes
    first on the path) on a free loopback port, pinned to cpu 0; yields its URL and pid."""
    port = free_port()
    instance_id = f"bench-{port}"
    env = {**os.environ, "WARMPOOL_INSTANCE_ID": instance_id, **env_extra}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as tiers_file:
        json.dump(tiers or {}, tiers_file)
    if tiers:
        env["WARMPOOL_TIERS_FILE"] = tiers_file.name
    log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)  # noqa: SIM115 - closed below
    process = subprocess.Popen(pinned(0, [sys.executable, "-m", "warmpool", "serve", "--host", "127.0.0.1",
                                          "--port", str(port)]), cwd=checkout, env=env,
                               stdout=log, stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{port}"
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


def wait_until_removed(instance_id: str, timeout_s: float = 120) -> None:
    """Let the engine finish removing a stopped server's containers before the next one starts."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        listed = subprocess.run(["docker", "ps", "-aq", "--filter", f"label=warmpool.instance={instance_id}"],
                                capture_output=True, text=True).stdout.split()
        if not listed:
            return
        time.sleep(1)
