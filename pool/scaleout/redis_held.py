"""Scale-out mode's bound on async tasks held in Redis: the rule of pool/model/result_bounds.py, in Lua.

Layout (under the configured prefix `{p}`; `owner/task` names a held task as a member):

    {p}:held:{owner}        hash task id -> bytes it counts for (its reservation, then its outcome's size)
    {p}:held:{owner}:done   zset task id -> expiry (ms) of the owner's finished results, oldest first
    {p}:held-bytes          hash owner -> bytes held by that owner
    {p}:held-pending-bytes  hash owner -> bytes of that owner's pending tasks (reservations)
    {p}:held-totals         hash: tasks, bytes, pending_tasks, pending_bytes (all owners)
    {p}:held-pending        zset owner/task -> when its pending hash expires (ms): released then if lost
    {p}:held-done           zset owner/task -> when its result expires (ms): released then; oldest evicted first

The submit and finalize scripts of pool/scaleout/redis_io.py start with `PRELUDE` and call its functions, so that
holding, finishing, expiring and evicting are each part of one atomic step with the task's own change.
The scripts reach keys they compute from the prefix (not all passed in KEYS): fine on a single Redis,
which is what scale-out mode uses; not for Redis Cluster.

An evicted task's hash becomes a tombstone `{state: evicted, kind: async, owner}` for the rest of its TTL,
so that a GET answers 404 saying it was evicted.
"""

from __future__ import annotations

from pool.model.result_bounds import RECORD_OVERHEAD_BYTES

# Functions over `P` (the prefix) and `NOW` (ms), which each script sets first.
PRELUDE = """
local function held_key(owner) return P .. ':held:' .. owner end

local function unpend(owner, size)
  redis.call('HINCRBY', P .. ':held-totals', 'pending_tasks', -1)
  redis.call('HINCRBY', P .. ':held-totals', 'pending_bytes', -size)
  if redis.call('HINCRBY', P .. ':held-pending-bytes', owner, -size) <= 0 then
    redis.call('HDEL', P .. ':held-pending-bytes', owner)
  end
end

local function release(member)
  local owner, task = string.match(member, '^([^/]*)/(.*)$')
  local held = held_key(owner)
  local size = tonumber(redis.call('HGET', held, task) or '0')
  if redis.call('HDEL', held, task) == 1 then
    redis.call('HINCRBY', P .. ':held-totals', 'tasks', -1)
    redis.call('HINCRBY', P .. ':held-totals', 'bytes', -size)
    if redis.call('HLEN', held) == 0 then
      redis.call('HDEL', P .. ':held-bytes', owner)
    else
      redis.call('HINCRBY', P .. ':held-bytes', owner, -size)
    end
    if redis.call('ZSCORE', P .. ':held-pending', member) then unpend(owner, size) end
  end
  redis.call('ZREM', P .. ':held-pending', member)
  redis.call('ZREM', P .. ':held-done', member)
  redis.call('ZREM', held .. ':done', task)
end

local function expire_held()
  for _, index in ipairs({':held-pending', ':held-done'}) do
    for _, member in ipairs(redis.call('ZRANGEBYSCORE', P .. index, '-inf', NOW, 'LIMIT', 0, 256)) do
      release(member)
    end
  end
end

local function evict(member)
  local owner, task = string.match(member, '^([^/]*)/(.*)$')
  release(member)
  local key = P .. ':task:' .. task
  local ttl = redis.call('PTTL', key)
  redis.call('DEL', key)
  if ttl > 0 then
    redis.call('HSET', key, 'state', 'evicted', 'kind', 'async', 'owner', owner)
    redis.call('PEXPIRE', key, ttl)
  end
end

local function evict_oldest(spare)
  local oldest = redis.call('ZRANGE', P .. ':held-done', 0, 0)[1]
  if not oldest or oldest == spare then return false end
  evict(oldest)
  return true
end

local function totals()
  local t = redis.call('HMGET', P .. ':held-totals', 'tasks', 'bytes', 'pending_tasks', 'pending_bytes')
  return tonumber(t[1] or '0'), tonumber(t[2] or '0'), tonumber(t[3] or '0'), tonumber(t[4] or '0')
end

local function bytes_of(owner) return tonumber(redis.call('HGET', P .. ':held-bytes', owner) or '0') end

-- The refusal {scope, retry_ms, tasks, bytes} (the scopes of pool.model.result_bounds.refusal) of `n` more
-- pending tasks of `size` bytes in all for `owner`, or nil when there is room (maybe after evictions).
local function no_room(owner, n, size, per_key_tasks, per_key_bytes, max_tasks, max_bytes)
  expire_held()
  local held = held_key(owner)
  local mine = redis.call('HLEN', held)
  if mine + n > per_key_tasks then
    local oldest = redis.call('ZRANGE', held .. ':done', 0, 0, 'WITHSCORES')
    return {'key', oldest[2] and math.floor(tonumber(oldest[2]) - NOW) or -1, mine, bytes_of(owner)}
  end
  -- Refused before anything is evicted: only finished results can make room (pool/model/result_bounds.py).
  local pending_mine = tonumber(redis.call('HGET', P .. ':held-pending-bytes', owner) or '0')
  if pending_mine + size > per_key_bytes then return {'key-bytes', -1, mine, pending_mine} end
  local _, _, pending_tasks, pending_bytes = totals()
  if pending_tasks + n > max_tasks or pending_bytes + size > max_bytes then
    return {'total', -1, pending_tasks, pending_bytes}
  end
  return nil
end

-- Admit a pending task of `size` bytes for `owner`, or return a refusal.
local function admit(owner, task, size, pending_until, per_key_tasks, per_key_bytes, max_tasks, max_bytes)
  local refused = no_room(owner, 1, size, per_key_tasks, per_key_bytes, max_tasks, max_bytes)
  if refused then return refused end
  local held = held_key(owner)
  local mine = redis.call('HLEN', held)
  local tasks, bytes
  -- Each loop ends: the checks above leave finished results enough to evict (the guards are for counters
  -- that drifted, say after a partial restore, so that no loop can spin).
  while bytes_of(owner) + size > per_key_bytes do
    local own = redis.call('ZRANGE', held .. ':done', 0, 0)[1]
    if not own then return {'key-bytes', -1, mine, bytes_of(owner)} end
    evict(owner .. '/' .. own)
  end
  tasks, bytes = totals()
  while tasks + 1 > max_tasks or bytes + size > max_bytes do
    if not evict_oldest(nil) then return {'total', -1, tasks, bytes} end
    tasks, bytes = totals()
  end
  local member = owner .. '/' .. task
  redis.call('HSET', held, task, size)
  redis.call('HINCRBY', P .. ':held-bytes', owner, size)
  redis.call('HINCRBY', P .. ':held-totals', 'tasks', 1)
  redis.call('HINCRBY', P .. ':held-totals', 'bytes', size)
  redis.call('HINCRBY', P .. ':held-totals', 'pending_tasks', 1)
  redis.call('HINCRBY', P .. ':held-totals', 'pending_bytes', size)
  redis.call('HINCRBY', P .. ':held-pending-bytes', owner, size)
  redis.call('ZADD', P .. ':held-pending', pending_until, member)
  return nil
end

-- Admit pending tasks {{id, size}, ...} of one owner, all or none (their sums are checked first).
local function admit_all(owner, tasks, pending_until, per_key_tasks, per_key_bytes, max_tasks, max_bytes)
  local size = 0
  for _, task in ipairs(tasks) do size = size + task[2] end
  local refused = no_room(owner, #tasks, size, per_key_tasks, per_key_bytes, max_tasks, max_bytes)
  if refused then return refused end
  for k, task in ipairs(tasks) do
    refused = admit(owner, task[1], task[2], pending_until, per_key_tasks, per_key_bytes, max_tasks, max_bytes)
    if refused then  -- only if the counters drifted: undo this call's admissions
      for j = 1, k - 1 do release(owner .. '/' .. tasks[j][1]) end
      return refused
    end
  end
  return nil
end

-- A held task finished with an outcome of `size` bytes, kept until `expires_at`; evict others past max_bytes.
local function finish_held(owner, task, size, expires_at, max_bytes)
  expire_held()
  local held = held_key(owner)
  local old = redis.call('HGET', held, task)
  if not old then return end
  local delta = size - tonumber(old)
  local member = owner .. '/' .. task
  redis.call('HSET', held, task, size)
  redis.call('HINCRBY', P .. ':held-bytes', owner, delta)
  redis.call('HINCRBY', P .. ':held-totals', 'bytes', delta)
  if redis.call('ZREM', P .. ':held-pending', member) == 1 then unpend(owner, tonumber(old)) end
  redis.call('ZADD', P .. ':held-done', expires_at, member)
  redis.call('ZADD', held .. ':done', expires_at, task)
  local _, bytes = totals()
  while bytes > max_bytes and evict_oldest(member) do
    _, bytes = totals()
  end
end
"""

OVERHEAD_BYTES = RECORD_OVERHEAD_BYTES
