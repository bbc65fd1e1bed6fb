"""The cluster's pool sizes and drains, kept in Redis: the API writes them, every worker follows them.

Keys (after the configured prefix):

    {p}:sizes:{tier}      hash: min_idle and/or max_size (only those an operator set), drain (the id of the
                          last drain asked for), change (the id of the last change of any kind)
    {p}:config-version    a counter, bumped by every change: what workers poll (a GET every quarter second)
    {p}:ack:{change}      hash: worker id -> what that worker did with the change (JSON); expires after a
                          minute, since only the API waiting on the change reads it

Sizes are per worker (each worker keeps that many), so a worker started later applies the stored ones.
A drain is an event, not a state: a worker drains when the stored drain id differs from the last one it
saw, and a worker that starts takes the stored id as seen (its containers are new anyway). Ids rather
than counters, so that a Redis that lost its data cannot make a worker miss the next drain.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from typing import Any, cast

import redis.asyncio as aioredis

from pool.scaleout.redis_io import redis_errors

ACK_TTL_MS = 60_000

# KEYS: sizes hash, version. ARGV: expected change id ('' for none yet), new change id, field/value pairs.
# Compare-and-set: an API checked the sizes against the workers' capacity as they were at the expected
# change; if another change landed meanwhile, nothing is written and the caller checks again.
_SET_SIZES = """
local current = redis.call('HGET', KEYS[1], 'change') or ''
if current ~= ARGV[1] then return 0 end
local args = {'change', ARGV[2]}
for i = 3, #ARGV do args[#args + 1] = ARGV[i] end
redis.call('HSET', KEYS[1], unpack(args))
redis.call('INCR', KEYS[2])
return 1
"""


@dataclass(frozen=True)
class TierConfig:
    """A tier's stored sizes (None: never set, each worker keeps its tiers file's) and its last drain."""

    min_idle: int | None = None
    max_size: int | None = None
    drain: str | None = None
    change: str = ""


def _int_or_none(raw: str | None) -> int | None:
    return None if raw is None else int(raw)


class ConfigStore:
    """Reads and writes the tier configs under one prefix; every Redis error is BackendUnavailable."""

    def __init__(self, client: aioredis.Redis, prefix: str) -> None:
        self.redis = client
        self.prefix = prefix
        self._set_sizes = client.register_script(_SET_SIZES)

    def sizes_key(self, tier_name: str) -> str:
        return f"{self.prefix}:sizes:{tier_name}"

    @property
    def version_key(self) -> str:
        return f"{self.prefix}:config-version"

    def ack_key(self, change: str) -> str:
        return f"{self.prefix}:ack:{change}"

    async def version(self) -> str | None:
        with redis_errors("read the cluster's config version"):
            return cast(str | None, await self.redis.get(self.version_key))

    async def read(self, tier_names: list[str]) -> dict[str, TierConfig]:
        """The stored config of each named tier (a default one for a tier never changed)."""
        with redis_errors("read the cluster's pool sizes"):
            async with self.redis.pipeline(transaction=False) as pipe:
                for name in tier_names:
                    pipe.hgetall(self.sizes_key(name))
                raws = cast(list[dict[str, str]], await pipe.execute())
        return {name: TierConfig(min_idle=_int_or_none(raw.get("min_idle")),
                                 max_size=_int_or_none(raw.get("max_size")), drain=raw.get("drain"),
                                 change=raw.get("change", ""))
                for name, raw in zip(tier_names, raws, strict=True)}

    async def set_sizes(self, tier_name: str, expected_change: str, min_idle: int | None,
                        max_size: int | None) -> str | None:
        """Store new sizes unless the tier changed since `expected_change`; the new change id, or None."""
        change = secrets.token_hex(8)
        fields = [x for name, value in (("min_idle", min_idle), ("max_size", max_size)) if value is not None
                  for x in (name, str(value))]
        with redis_errors("store the pool sizes"):
            done = await self._set_sizes(keys=[self.sizes_key(tier_name), self.version_key],
                                         args=[expected_change, change, *fields])
        return change if int(done) == 1 else None

    async def request_drain(self, tier_name: str) -> str:
        """Ask every worker holding the tier to drain it; the change id."""
        change = secrets.token_hex(8)
        with redis_errors("ask for a drain"):
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.hset(self.sizes_key(tier_name), mapping={"drain": change, "change": change})
                pipe.incr(self.version_key)
                await pipe.execute()
        return change

    async def acknowledge(self, change: str, worker_id: str, body: dict[str, Any]) -> None:
        """Record what this worker did with a change, for the API that waits on it."""
        with redis_errors("confirm a change"):
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.hset(self.ack_key(change), worker_id, json.dumps(body, separators=(",", ":")))
                pipe.pexpire(self.ack_key(change), ACK_TTL_MS)
                await pipe.execute()

    async def acks(self, change: str) -> dict[str, dict[str, Any]]:
        """What each worker that confirmed the change did with it."""
        with redis_errors("read the confirmations of a change"):
            raw = cast(dict[str, str], await self.redis.hgetall(self.ack_key(change)))
        out = {}
        for worker_id, body in raw.items():
            try:
                out[worker_id] = dict(json.loads(body))
            except (ValueError, TypeError):
                continue  # not ours; the worker shows as pending
        return out
