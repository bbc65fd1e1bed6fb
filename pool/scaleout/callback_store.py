"""Scale-out callbacks: due ones in a Redis sorted set, claimed by one API process per attempt (Lua, atomic).

A worker that ends an async task with a callback URL adds its id to {p}:callbacks scored now (the
`_FINALIZE` script) and pushes a token on {p}:callbacks-wake. Every API process runs a relay that blocks
on that list (BLPOP, at most until the earliest score) and then claims what is due: the claim moves the
task's score past a lease and counts the attempt in the task's hash, so no other process sends it
meanwhile. The claimer reports the attempt: delivered (removed), failed (scored at the retry time), or
given up (removed). A claimer that dies mid-attempt lets its lease lapse and any API process claims the
callback again, so it is sent even when the API that accepted the task is gone. An attempt reported
after its lease lapsed and another process claimed it is ignored (its attempt number is stale).
"""

from __future__ import annotations

import time
from typing import cast

import redis.asyncio as aioredis

from pool.model.callback_rules import next_delay_s
from pool.model.tasks import DueCallback
from pool.scaleout.redis_io import Keys, redis_errors

# KEYS: callbacks. ARGV: now_ms, lease_ms, limit, task key prefix.
# Returns flat [id, url, attempt, done_ms, ...] for the claimed ones.
_CLAIM = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
local out = {}
for _, id in ipairs(ids) do
  local task_key = ARGV[4] .. id
  local found = redis.call('HMGET', task_key, 'callback_url', 'done_ms')
  if not found[1] or not found[2] then
    redis.call('ZREM', KEYS[1], id)
  else
    local attempt = redis.call('HINCRBY', task_key, 'callback_attempts', 1)
    redis.call('ZADD', KEYS[1], tonumber(ARGV[1]) + tonumber(ARGV[2]), id)
    out[#out + 1] = id
    out[#out + 1] = found[1]
    out[#out + 1] = tostring(attempt)
    out[#out + 1] = found[2]
  end
end
return out
"""

# KEYS: callbacks, task. ARGV: id, attempt, outcome (delivered, retry, failed), retry_at_ms.
_FINISH = """
if redis.call('HGET', KEYS[2], 'callback_attempts') ~= ARGV[2] then return 'stale' end
if ARGV[3] == 'retry' then
  redis.call('ZADD', KEYS[1], ARGV[4], ARGV[1])
else
  redis.call('ZREM', KEYS[1], ARGV[1])
  redis.call('HSET', KEYS[2], 'callback_state', ARGV[3])
end
return 'ok'
"""

BLOCK_MAX_S = 5.0


class CallbackStore:
    """Claims and reports callback attempts for one API process."""

    def __init__(self, client: aioredis.Redis, blocking: aioredis.Redis, keys: Keys, *, lease_s: float,
                 retry_window_s: float) -> None:
        self.client = client
        self.blocking = blocking  # for BLPOP: a connection that may wait BLOCK_MAX_S
        self.keys = keys
        self.lease_ms = int(lease_s * 1000)
        self.retry_window_s = retry_window_s
        self._claim = client.register_script(_CLAIM)
        self._finish = client.register_script(_FINISH)

    async def claim(self, limit: int, wait_s: float) -> list[tuple[str, str, int, float]]:
        """Up to `limit` due callbacks claimed for us, as (task id, url, attempt, age_s); waits on the wake
        list at most `wait_s`, and never past the earliest score (a retry, or a lapsed claim)."""
        with redis_errors("claim callbacks"):
            claimed = await self._claim_now(limit)
            if claimed or limit <= 0 or wait_s <= 0:
                return claimed
            earliest = cast(list[tuple[str, float]], await self.client.zrange(
                self.keys.callbacks, 0, 0, withscores=True))
            block_s = min(wait_s, BLOCK_MAX_S)
            if earliest:
                block_s = min(block_s, max(0.0, earliest[0][1] / 1000 - time.time()))
            if block_s > 0.01:
                await self.blocking.blpop([self.keys.callbacks_wake], timeout=block_s)
            return await self._claim_now(limit)

    async def _claim_now(self, limit: int) -> list[tuple[str, str, int, float]]:
        now_ms = int(time.time() * 1000)
        flat = cast(list[str], await self._claim(keys=[self.keys.callbacks],
                                                 args=[now_ms, self.lease_ms, limit, self.keys.task("")]))
        return [(flat[i], flat[i + 1], int(flat[i + 2]), max(0.0, (now_ms - float(flat[i + 3])) / 1000))
                for i in range(0, len(flat), 4)]

    async def finish(self, due: DueCallback, delivered: bool) -> None:
        outcome, retry_at_ms = "delivered", 0
        if not delivered:
            delay_s = next_delay_s(due.attempt, due.age_s, self.retry_window_s)
            outcome = "failed" if delay_s is None else "retry"
            retry_at_ms = int((time.time() + (delay_s or 0.0)) * 1000)
        with redis_errors("record a callback attempt"):
            await self._finish(keys=[self.keys.callbacks, self.keys.task(due.task_id)],
                               args=[due.task_id, due.attempt, outcome, retry_at_ms])

