"""Sessions' state in Redis, shared by the API (session_client.py) and the workers (session_worker.py).

`{p}:session:{id}` holds a session's state (opening, open, ended), why it ended, its owner, tier, image,
idle timeout, worker and container, its calls so far, whether a call runs, and when the last one ended.
`{p}:sessions-of:{owner}` is the set of an owner's sessions not known to have ended (the per-key bound);
`{p}:sessions-ended` counts endings by reason. An ended session's hash lives ENDED_TTL_MS, so that its
owner's later calls learn why; an open one expires a while after its idle timeout, refreshed by its calls.
"""

from __future__ import annotations

import time
from typing import Any, cast

import redis.asyncio as aioredis

from pool.model.sessions import SessionInfo
from pool.scaleout.redis_io import Keys, redis_errors

ENDED_TTL_MS = 3_600_000
OPEN_TTL_MARGIN_MS = 3_600_000  # an open session's hash outlives its idle timeout by this much

# KEYS: the owner's set, the new session's hash. ARGV: prefix, max per key, session id, owner, tier, opening
# ttl ms. Drops members no longer open (ended, expired, or whose worker stopped beating), then reserves a
# slot if the key has one left: 1, else 0. (It reads session and worker keys it is not given: fine on one
# Redis, which is what the cluster uses.)
_RESERVE = """
for _, sid in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local hash = ARGV[1] .. ':session:' .. sid
  local state = redis.call('HGET', hash, 'state')
  local worker = redis.call('HGET', hash, 'worker')
  if (not state) or state == 'ended'
     or (state == 'open' and ((not worker) or redis.call('EXISTS', ARGV[1] .. ':worker:' .. worker) == 0)) then
    redis.call('SREM', KEYS[1], sid)
  end
end
if redis.call('SCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('SADD', KEYS[1], ARGV[3])
redis.call('HSET', KEYS[2], 'state', 'opening', 'owner', ARGV[4], 'tier', ARGV[5])
redis.call('PEXPIRE', KEYS[2], ARGV[6])
return 1
"""

# KEYS: the session's hash, the owner's set, the endings counter. ARGV: session id, reason, ttl ms. Ends it
# once: whoever records the end first (its worker, or an API that found the worker gone) gives the reason
# and counts it. Returns 1 if this call ended it.
_END = """
if redis.call('HGET', KEYS[1], 'state') == 'ended' then return 0 end
redis.call('HSET', KEYS[1], 'state', 'ended', 'reason', ARGV[2], 'busy', '0')
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('SREM', KEYS[2], ARGV[1])
redis.call('HINCRBY', KEYS[3], ARGV[2], 1)
return 1
"""


class SessionStore:
    """Reads and writes sessions' state in Redis; every Redis failure is BackendUnavailable."""

    def __init__(self, client: aioredis.Redis, keys: Keys) -> None:
        self.redis = client
        self.keys = keys
        self.reserve_script = client.register_script(_RESERVE)
        self.end_script = client.register_script(_END)

    async def reserve(self, session_id: str, owner: str, tier_name: str, limit: int, ttl_ms: int) -> bool:
        with redis_errors("reserve a session"):
            return bool(await self.reserve_script(
                keys=[self.keys.owner_sessions(owner), self.keys.session(session_id)],
                args=[self.keys.prefix, limit, session_id, owner, tier_name, ttl_ms]))

    async def release(self, session_id: str, owner: str) -> None:
        """Give back the slot of a session that did not open (unless it opened after all)."""
        with redis_errors("release a session slot"):
            if await self.redis.hget(self.keys.session(session_id), "state") != "open":
                await self.redis.srem(self.keys.owner_sessions(owner), session_id)
                await self.redis.delete(self.keys.session(session_id))

    async def record_open(self, info: SessionInfo) -> None:
        fields: dict[Any, Any] = {  # Any: redis-py's mapping type is invariant in str/bytes
            "state": "open", "owner": info.owner, "tier": info.tier.name, "image": info.image,
            "idle_timeout_s": repr(info.idle_timeout_s), "created_unix": repr(info.created_unix),
            "last_used_unix": repr(time.time()), "calls": "0", "busy": "0", "worker": info.worker,
            "container": info.container}
        with redis_errors("record an open session"):
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.hset(self.keys.session(info.session_id), mapping=fields)
                pipe.pexpire(self.keys.session(info.session_id), self._open_ttl_ms(info.idle_timeout_s))
                pipe.sadd(self.keys.owner_sessions(info.owner), info.session_id)
                await pipe.execute()

    async def record_call(self, session_id: str, *, busy: bool, idle_timeout_s: float, calls: int = -1) -> None:
        """A call started (busy) or ended (then its count and time too)."""
        fields: dict[Any, Any] = {"busy": "1" if busy else "0"}
        if not busy:
            fields.update(calls=str(calls), last_used_unix=repr(time.time()))
        key = self.keys.session(session_id)
        with redis_errors("record a session call"):
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.hset(key, mapping=fields)
                pipe.pexpire(key, self._open_ttl_ms(idle_timeout_s))
                await pipe.execute()

    async def end(self, session_id: str, owner: str, reason: str) -> bool:
        with redis_errors("record a session's end"):
            return bool(await self.end_script(
                keys=[self.keys.session(session_id), self.keys.owner_sessions(owner), self.keys.sessions_ended],
                args=[session_id, reason, ENDED_TTL_MS]))

    async def read(self, session_id: str) -> dict[str, str]:
        with redis_errors("read the session"):
            return cast(dict[str, str], await self.redis.hgetall(self.keys.session(session_id)))

    async def read_all(self) -> dict[str, dict[str, str]]:
        """Every session hash there is, by id (admin view and metrics: a SCAN, not for the task path)."""
        with redis_errors("list the sessions"):
            keys = [key async for key in self.redis.scan_iter(f"{self.keys.prefix}:session:*", count=1000)]
            async with self.redis.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.hgetall(key)
                records = cast(list[dict[str, str]], await pipe.execute())
        return {key.rsplit(":", 1)[1]: record for key, record in zip(keys, records, strict=True) if record}

    async def ended_counts(self) -> dict[str, int]:
        with redis_errors("count ended sessions"):
            counts = cast(dict[str, Any], await self.redis.hgetall(self.keys.sessions_ended))
        return {reason: int(count) for reason, count in counts.items()}

    @staticmethod
    def _open_ttl_ms(idle_timeout_s: float) -> int:
        return int(idle_timeout_s * 1000) + OPEN_TTL_MARGIN_MS
