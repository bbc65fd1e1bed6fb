"""What the soak checks once a phase has stopped: nothing left behind on the engine, in Redis, in the
processes' temporary directory, or on the host (scratch mounts, loop devices); memory; the pool's return
to its targets."""

from __future__ import annotations

import re
import time
from pathlib import Path

import httpx
import redis

from benchmarks.soak.stack import Engine, Stack

MIB = 1024 ** 2
# The API's resident memory after the soak may exceed what it had once warm by at most this much
# (allocator arenas and caches grow under load and are not all handed back).
RSS_SLACK_BYTES = 96 * MIB
POOL_RECOVERY_BOUND_S = 120.0


def rss_bytes(pid: int | None) -> int:
    if pid is None:
        return 0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def memory_check(start_bytes: int, end_bytes: int) -> str:
    """'' when the end is near the start (within RSS_SLACK_BYTES), else what grew."""
    if end_bytes <= start_bytes + RSS_SLACK_BYTES:
        return ""
    return f"API RSS grew from {start_bytes // MIB} MiB to {end_bytes // MIB} MiB"


def wait_pools_at_target(stack: Stack, bound_s: float = POOL_RECOVERY_BOUND_S) -> float | None:
    """Seconds until every tier is back at its targets (None: not within the bound)."""
    started = time.monotonic()
    with httpx.Client(base_url=stack.url, timeout=10) as client:
        while time.monotonic() - started < bound_s:
            try:
                if stack.pools_at_target(client):
                    return time.monotonic() - started
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
    return None


# Cluster bookkeeping that lives as long as the cluster (no TTL): the async results bound's indexes and
# counters (pool/scaleout/redis_held.py), the per-tier backlog length, the tiers' streams (with their
# consumer groups) and the count of session endings by reason. Left behind, they must say that nothing is
# pending any more: a reservation, a backlog count or a stream entry still held after every task ended is
# a leak.
BOOKKEEPING = re.compile(r"^held(-bytes|-done|-totals|-pending|-pending-bytes|:[^:]+(:done)?)$"
                         r"|^backlog-len:[^:]+$|^stream:[^:]+$|^sessions-ended$")


def redis_keys_left(url: str, prefix: str) -> str:
    """Keys of the soak's prefix that would never expire, apart from bookkeeping that reads as idle."""
    client = redis.Redis.from_url(url, decode_responses=True)
    try:
        forever = [key for key in client.scan_iter(match=f"{prefix}:*", count=500) if client.ttl(key) == -1]
        problems = [key for key in forever if not BOOKKEEPING.match(key[len(prefix) + 1:])]
        totals = {name: int(value) for name, value in client.hgetall(f"{prefix}:held-totals").items()}
        problems += [f"held-totals {name}={totals[name]}" for name in ("pending_tasks", "pending_bytes")
                     if totals.get(name, 0)]
        done = int(client.zcard(f"{prefix}:held-done"))
        if totals.get("tasks", 0) != done:
            problems.append(f"held-totals tasks={totals.get('tasks', 0)} but held-done has {done}")
        if pending_members := int(client.zcard(f"{prefix}:held-pending")):
            problems.append(f"held-pending has {pending_members} member(s)")
        problems += [f"{key}={int(client.get(key) or 0)}" for key in forever if ":backlog-len:" in key
                     and int(client.get(key) or 0)]
        for key in (k for k in forever if ":stream:" in k):
            pending = sum(int(g["pending"]) for g in client.xinfo_groups(key))
            if client.xlen(key) or pending:
                problems.append(f"{key}: {client.xlen(key)} entries, {pending} pending")
    finally:
        client.close()
    return ", ".join(problems[:10]) + (f" (+{len(problems) - 10})" if len(problems) > 10 else "")


def containers_left(engine: Engine, instance_ids: list[str]) -> str:
    out = engine.docker("ps", "-a", "--filter", "label=warmpool.pool", "--format",
                        '{{.ID}} {{.Label "warmpool.instance"}}')
    left = [line for line in out.splitlines() if line.split()[-1:] and line.split()[-1] in instance_ids]
    return f"{len(left)} container(s): {', '.join(left[:5])}" if left else ""


def scratch_left(scratch_dir: Path) -> str:
    """Mounts under the soak's scratch directory, loop devices backed by files in it, entries in it."""
    root = str(scratch_dir)
    mounts = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()
              if line.split()[1].startswith(root + "/")]
    loops = []
    for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
        try:
            if backing.read_text().strip().startswith(root + "/"):
                loops.append(backing.parts[3])
        except OSError:
            continue
    entries = sorted(p.name for p in scratch_dir.iterdir()) if scratch_dir.is_dir() else []
    parts = [f"{len(mounts)} mount(s)" if mounts else "", f"loop devices {loops}" if loops else "",
             f"scratch entries {entries[:5]}" if entries else ""]
    return "; ".join(p for p in parts if p)


def tmp_left(tmp_dir: Path) -> str:
    entries = sorted(p.name for p in tmp_dir.iterdir()) if tmp_dir.is_dir() else []
    return f"{len(entries)} file(s): {entries[:5]}" if entries else ""
