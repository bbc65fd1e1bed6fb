"""Scale-out async tasks: a backlog per owner and tier, fed to the tier's stream in turns (Lua, atomic).

Why not add async tasks to the stream directly: workers read a stream in order, so a key's 100-task
batch added at once would run before anything added after it. Instead an async task waits in its owner's
backlog list ({p}:backlog:{tier}:{owner}); the owners with tasks waiting are a ring ({p}:turns:{tier}),
and feeding takes one task from the owner at the front, puts that owner at the back if it has more, and
adds the task to the stream. The stream is fed only up to a small number of entries no worker has read
yet, so whoever submits next is at most that far behind:

- at submission, up to the cluster's size of the tier (what its workers could start at once);
- by a worker about to read, up to its own free slots (so a worker never waits on a backlog).

Synchronous tasks still go straight to the stream; they wait behind at most those few fed entries.
Keys of a backlog are named inside the scripts from the prefix (one standalone Redis, as everywhere here).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis

from pool.model.errors import Overloaded
from pool.model.result_bounds import Bounds, pending_bytes
from pool.model.tasks import Submission
from pool.scaleout.redis_held import PRELUDE
from pool.scaleout.redis_io import GROUP, Keys, Refusal, now_ms

# feed(prefix, tier, target): move tasks from the backlogs to the stream until `target` entries wait unread.
_FEED = """
local function feed(p, tier, target)
  local stream, turns, count = p .. ':stream:' .. tier, p .. ':turns:' .. tier, p .. ':backlog-len:' .. tier
  local unread = redis.call('XLEN', stream)
  local pending = redis.pcall('XPENDING', stream, '""" + GROUP + """')
  if type(pending) == 'table' and pending[1] then unread = unread - tonumber(pending[1]) end
  local fed = 0
  while unread < target do
    local owner = redis.call('LPOP', turns)
    if not owner then break end
    local backlog = p .. ':backlog:' .. tier .. ':' .. owner
    local id = redis.call('LPOP', backlog)
    if id then
      redis.call('DECR', count)
      if redis.call('LLEN', backlog) > 0 then redis.call('RPUSH', turns, owner) end
      local entry_key, task_key = p .. ':entry:' .. id, p .. ':task:' .. id
      local entry = redis.call('HGETALL', entry_key)
      if #entry > 0 and redis.call('HGET', task_key, 'state') == 'queued' then
        redis.call('HSET', task_key, 'entry', redis.call('XADD', stream, '*', unpack(entry)))
        unread = unread + 1
        fed = fed + 1
      end
      redis.call('DEL', entry_key)
    end
  end
  return fed
end
"""

# ARGV: prefix, now_ms, owner, max_len, ttl_ms, the four results bounds (pool/model/result_bounds.py), ntasks,
# then per task: tier, id, held bytes, n, entry (n strings), m, record (m strings); then ntiers, then per
# tier: name, feed target. Returns {'ok'}, {'full', tier, waiting} or the results bound's refusal.
_ENQUEUE = """
local P = ARGV[1]
local NOW = tonumber(ARGV[2])
""" + PRELUDE + _FEED + """
local owner, max_len, ttl = ARGV[3], tonumber(ARGV[4]), ARGV[5]
local i, tasks, adding, held = 11, {}, {}, {}
for t = 1, tonumber(ARGV[10]) do
  local tier, id, size, n = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2]), tonumber(ARGV[i + 3])
  local m = tonumber(ARGV[i + 4 + n])
  if redis.call('EXISTS', P .. ':task:' .. id) == 0 then  -- a retried call adds nothing twice
    tasks[#tasks + 1] = {tier, id, i + 4, n, i + 5 + n, m}
    held[#held + 1] = {id, size}
    adding[tier] = (adding[tier] or 0) + 1
  end
  i = i + 5 + n + m
end
for tier, n in pairs(adding) do
  local waiting = redis.call('XLEN', P .. ':stream:' .. tier)
  waiting = waiting + tonumber(redis.call('GET', P .. ':backlog-len:' .. tier) or '0')
  if waiting + n > max_len then return {'full', tier, tostring(waiting)} end
end
local refused = admit_all(owner, held, NOW + tonumber(ttl), tonumber(ARGV[6]), tonumber(ARGV[7]),
                          tonumber(ARGV[8]), tonumber(ARGV[9]))
if refused then return refused end
for _, task in ipairs(tasks) do
  local tier, id, e, n, r, m = unpack(task)
  local task_key, entry_key = P .. ':task:' .. id, P .. ':entry:' .. id
  redis.call('HSET', entry_key, unpack(ARGV, e, e + n - 1))
  redis.call('PEXPIRE', entry_key, ttl)
  redis.call('HSET', task_key, unpack(ARGV, r, r + m - 1))
  redis.call('PEXPIRE', task_key, ttl)
  local backlog = P .. ':backlog:' .. tier .. ':' .. owner
  if redis.call('RPUSH', backlog, id) == 1 then redis.call('RPUSH', P .. ':turns:' .. tier, owner) end
  redis.call('INCR', P .. ':backlog-len:' .. tier)
end
for k = 1, tonumber(ARGV[i]) do feed(P, ARGV[i + 2 * k - 1], tonumber(ARGV[i + 2 * k])) end
return {'ok'}
"""

_FEED_ONLY = _FEED + "return feed(ARGV[1], ARGV[2], tonumber(ARGV[3]))"


class Backlog:
    """The backlog scripts, registered on one client."""

    def __init__(self, client: aioredis.Redis, keys: Keys) -> None:
        self.keys = keys
        self._enqueue = client.register_script(_ENQUEUE)
        self._feed = client.register_script(_FEED_ONLY)

    async def enqueue(self, items: Sequence[tuple[Submission, dict[str, str], dict[str, str]]], owner: str,
                      *, max_len: int, ttl_ms: int, bounds: Bounds, feed_targets: dict[str, int]) -> Refusal | None:
        """Add every (submission, stream entry, task record) to its owner's backlog, or none: Overloaded when a
        tier's stream and backlog together would pass `max_len`, a Refusal when the results bound refuses
        them. Then feed each tier."""
        args: list[Any] = [self.keys.prefix, now_ms(), owner, max_len, ttl_ms, bounds.max_tasks_per_key,
                           bounds.max_result_bytes_per_key, bounds.max_results, bounds.max_result_bytes, len(items)]
        for submission, entry, record in items:
            flat_entry = [x for pair in entry.items() for x in pair]
            flat_record = [x for pair in record.items() for x in pair]
            args += [submission.tier_name, submission.spec.task_id, pending_bytes(submission.spec),
                     len(flat_entry), *flat_entry, len(flat_record), *flat_record]
        args.append(len(feed_targets))
        for tier_name, target in feed_targets.items():
            args += [tier_name, target]
        answer = await self._enqueue(args=args)
        if answer[0] == "full":
            raise Overloaded(f"tier {answer[1]!r} already has {answer[2]} tasks waiting or running; "
                             f"{len(items)} more would pass the bound of {max_len}", retry_after_s=5.0)
        if answer[0] != "ok":
            return Refusal(scope=str(answer[0]), retry_after_ms=int(answer[1]), tasks=int(answer[2]),
                           size_bytes=int(answer[3]))
        return None

    async def feed(self, tier_name: str, target: int) -> int:
        """Move backlog tasks to the tier's stream until `target` entries wait unread; how many moved."""
        return int(await self._feed(args=[self.keys.prefix, tier_name, target]))
