"""The Redis boundary shared by the API and the workers: key names, clients, error wrapping, Lua scripts.

Layout (every key starts with the configured prefix, `warmpool` by default):

    {p}:stream:{tier}   one stream per tier; an entry carries a task (id, code, stdin, limits, reply_to).
                        Consumer group "workers". Entries are deleted once answered, so the stream's
                        length is the number of tasks waiting or running: the queue bound is on it.
    {p}:task:{id}       hash: state (queued, running, done, abandoned), kind (sync or async), owner,
                        worker, entry, outcome (async only). Expires: pending tasks after a long bound,
                        answered ones after the result TTL.
    {p}:reply:{api}     list: the outcomes of one API process's synchronous tasks, popped by it (BLPOP),
                        so each is delivered once even across reconnects.
    {p}:worker:{id}     a worker's heartbeat (JSON, expires after three missed beats); {p}:workers is the
                        set of their ids.
    {p}:backlog:{tier}:{owner}, {p}:turns:{tier}, {p}:backlog-len:{tier}, {p}:entry:{id}
                        async tasks not yet on the stream, per owner, fed to it in turns
                        (`pool/scaleout/backlog.py`).
    {p}:done            a pub/sub channel: the id of each async task as it ends (long polls wait on it).
    {p}:callbacks       sorted set: async tasks whose callback is due, scored by when (unix ms);
                        {p}:callbacks-wake is a list pushed when one falls due, for a blocking pop
                        (`pool/scaleout/callback_store.py`).
    {p}:out:{id}        stream: a streamed task's output (pool/scaleout/output_relay.py); capped, expiring.
    {p}:session:{id}    hash: a session's state (opening, open, ended), reason, owner, tier, worker, calls,
                        busy, last_used_unix; {p}:sessions-of:{owner} the set of an owner's open ones;
                        {p}:sessions-ended counts endings by reason.
    {p}:calls:{worker}  list: session calls and closes for the worker holding the session (BLPOP).

The cluster's pool sizes and drains (`{p}:sizes:{tier}`, `{p}:config-version`, `{p}:ack:{change}`) are
described in pool/scaleout/cluster_config.py.

State changes are Lua scripts, so that each is atomic and a retried call is harmless: a task goes from
queued to running once (the worker that got the container), and to done once (the first outcome wins;
the entry is acknowledged and deleted in the same step).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff

from pool.model.errors import BackendUnavailable
from pool.scaleout.redis_held import OVERHEAD_BYTES, PRELUDE

GROUP = "workers"
CONNECT_TIMEOUT_S = 2.0
COMMAND_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Keys:
    prefix: str

    def stream(self, tier_name: str) -> str:
        return f"{self.prefix}:stream:{tier_name}"

    def task(self, task_id: str) -> str:
        return f"{self.prefix}:task:{task_id}"

    def reply(self, api_id: str) -> str:
        return f"{self.prefix}:reply:{api_id}"

    def worker(self, worker_id: str) -> str:
        return f"{self.prefix}:worker:{worker_id}"

    @property
    def workers(self) -> str:
        return f"{self.prefix}:workers"

    def backlog_len(self, tier_name: str) -> str:
        return f"{self.prefix}:backlog-len:{tier_name}"

    @property
    def done(self) -> str:
        return f"{self.prefix}:done"

    @property
    def callbacks(self) -> str:
        return f"{self.prefix}:callbacks"

    @property
    def callbacks_wake(self) -> str:
        return f"{self.prefix}:callbacks-wake"

    # streamed output and sessions (pool/scaleout/output_relay.py, session_client.py, session_worker.py)
    def output(self, task_id: str) -> str:
        return f"{self.prefix}:out:{task_id}"

    def session(self, session_id: str) -> str:
        return f"{self.prefix}:session:{session_id}"

    def owner_sessions(self, owner: str) -> str:
        return f"{self.prefix}:sessions-of:{owner}"

    def calls(self, worker_id: str) -> str:
        return f"{self.prefix}:calls:{worker_id}"

    @property
    def sessions_ended(self) -> str:
        return f"{self.prefix}:sessions-ended"


def connect(url: str, *, blocking_s: float = 0.0) -> aioredis.Redis:
    """An asyncio client; `blocking_s` is the longest server-side block (BLPOP, XREADGROUP) it will issue.

    Retries are few and short: while Redis is down, callers should get BackendUnavailable (503) quickly
    rather than wait out redis-py's default of ten retries.
    """
    return aioredis.Redis.from_url(
        url, decode_responses=True, socket_connect_timeout=CONNECT_TIMEOUT_S,
        socket_timeout=COMMAND_TIMEOUT_S + blocking_s, health_check_interval=30,
        retry=Retry(ExponentialWithJitterBackoff(base=0.01, cap=0.1), retries=1))


def is_nogroup(exc: BaseException) -> bool:
    """The stream or its consumer group does not exist (a fresh or restarted Redis)."""
    return isinstance(exc, redis.exceptions.ResponseError) and str(exc).startswith("NOGROUP")


@contextlib.contextmanager
def redis_errors(doing: str) -> Iterator[None]:
    """Turn redis-py's exceptions into BackendUnavailable at the boundary."""
    try:
        yield
    except (redis.exceptions.RedisError, OSError) as exc:
        raise BackendUnavailable(f"Redis unavailable while trying to {doing}: {exc}") from exc


# KEYS: stream, task, backlog length. ARGV: max_len, pending_ttl_ms, n (entry field/value count), entry...,
# hash... A synchronous task (async ones go through pool/scaleout/backlog.py, which holds them against the
# results bound). Returns the entry id (also on a retried call), or false when the tier is full.
_SUBMIT = """
local existing = redis.call('HGET', KEYS[2], 'entry')
if existing then return existing end
-- The tier's bound counts its stream and its backlog of async tasks.
local waiting = redis.call('XLEN', KEYS[1]) + tonumber(redis.call('GET', KEYS[3]) or '0')
if waiting >= tonumber(ARGV[1]) then return false end
local n = tonumber(ARGV[3])
local entry_args = {}
for i = 4, 3 + n do entry_args[#entry_args + 1] = ARGV[i] end
local entry = redis.call('XADD', KEYS[1], '*', unpack(entry_args))
local hash_args = {'entry', entry}
for i = 4 + n, #ARGV do hash_args[#hash_args + 1] = ARGV[i] end
redis.call('HSET', KEYS[2], unpack(hash_args))
redis.call('PEXPIRE', KEYS[2], ARGV[2])
return entry
"""

# KEYS: task. ARGV: worker, started_unix. Returns run (this worker may send the code), or the state.
_MARK_RUNNING = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return 'gone' end
if state == 'queued' then
  redis.call('HSET', KEYS[1], 'state', 'running', 'worker', ARGV[1], 'started_unix', ARGV[2])
  return 'run'
end
if state == 'running' and redis.call('HGET', KEYS[1], 'worker') == ARGV[1] then return 'run' end
return state
"""

# KEYS: task, stream, reply list ('' for none). ARGV: group, entry id, outcome, ttl_ms (async), reply_ttl_ms,
# sync_ttl_ms, prefix, now_ms, task id, max held bytes (the API's bound, carried by the entry; 0: none).
# Only async tasks keep their outcome in the hash (and count it against the results bound): a synchronous
# one is read from the reply list, and its hash only has to outlive a late claim. An async task's end is
# published on {p}:done (long polls wait for it) and, with a callback URL, its callback falls due.
_FINALIZE = """
local P = ARGV[7]
local NOW = tonumber(ARGV[8])
""" + PRELUDE + """
redis.pcall('XACK', KEYS[2], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[2], ARGV[2])
local state = redis.call('HGET', KEYS[1], 'state')
if state ~= 'queued' and state ~= 'running' then return state or 'gone' end
if redis.call('HGET', KEYS[1], 'kind') == 'async' then
  redis.call('HSET', KEYS[1], 'state', 'done', 'outcome', ARGV[3], 'done_ms', ARGV[8])
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
  local owner = redis.call('HGET', KEYS[1], 'owner')
  if owner and tonumber(ARGV[10]) > 0 then
    finish_held(owner, ARGV[9], string.len(ARGV[3]) + """ + str(OVERHEAD_BYTES) + """, NOW + tonumber(ARGV[4]),
                tonumber(ARGV[10]))
  end
  local url = redis.call('HGET', KEYS[1], 'callback_url')
  if url and url ~= '' then
    redis.call('HSET', KEYS[1], 'done_ms', NOW)
    redis.call('ZADD', P .. ':callbacks', NOW, ARGV[9])
    redis.call('RPUSH', P .. ':callbacks-wake', '1')
    redis.call('LTRIM', P .. ':callbacks-wake', -100, -1)
  end
  redis.call('PUBLISH', P .. ':done', ARGV[9])
else
  redis.call('HSET', KEYS[1], 'state', 'done')
  redis.call('PEXPIRE', KEYS[1], ARGV[6])
end
if KEYS[3] ~= '' then
  redis.call('RPUSH', KEYS[3], ARGV[3])
  redis.call('PEXPIRE', KEYS[3], ARGV[5])
end
return 'stored'
"""

# KEYS: task, stream. ARGV: group, entry id. Drop an entry whose task needs nothing more from us.
_FORGET = """
redis.pcall('XACK', KEYS[2], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[2], ARGV[2])
return 1
"""

# KEYS: task, stream. ARGV: ttl_ms. The waiting API gave up: a queued task is withdrawn and never runs.
_ABANDON = """
local state = redis.call('HGET', KEYS[1], 'state')
if state ~= 'queued' then return state or 'gone' end
redis.call('HSET', KEYS[1], 'state', 'abandoned')
redis.call('PEXPIRE', KEYS[1], ARGV[1])
redis.call('XDEL', KEYS[2], redis.call('HGET', KEYS[1], 'entry'))
return 'abandoned'
"""


@dataclass(frozen=True)
class Refusal:
    """The results bound refused a submission: `scope` is "key" or "total"; retry_after_ms is -1 if unknown."""

    scope: str
    retry_after_ms: int
    tasks: int
    size_bytes: int


def now_ms() -> int:
    return int(time.time() * 1000)


class Scripts:
    """The state-changing scripts, registered on one client (re-sent by redis-py after a Redis restart)."""

    def __init__(self, client: aioredis.Redis, prefix: str) -> None:
        self.prefix = prefix
        self.submit_script = client.register_script(_SUBMIT)
        self.mark_running_script = client.register_script(_MARK_RUNNING)
        self.finalize_script = client.register_script(_FINALIZE)
        self.forget_script = client.register_script(_FORGET)
        self.abandon_script = client.register_script(_ABANDON)

    async def submit(self, stream: str, task: str, backlog_len: str, *, max_len: int, pending_ttl_ms: int,
                     entry: dict[str, str], record: dict[str, str]) -> str | None:
        """Add a synchronous task unless the tier is full (None); the entry id, also on a retried call."""
        flat_entry = [x for pair in entry.items() for x in pair]
        flat_record = [x for pair in record.items() for x in pair]
        args: list[Any] = [max_len, pending_ttl_ms, len(flat_entry), *flat_entry, *flat_record]
        reply = await self.submit_script(keys=[stream, task, backlog_len], args=args)
        return None if reply is None else str(reply)

    async def mark_running(self, task: str, worker: str, started_unix: float) -> str:
        return str(await self.mark_running_script(keys=[task], args=[worker, repr(started_unix)]))

    async def finalize(self, task: str, stream: str, reply_to: str, entry_id: str, outcome: str, *,
                       ttl_ms: int, reply_ttl_ms: int, sync_ttl_ms: int, task_id: str = "",
                       max_held_bytes: int = 0) -> str:
        """Answer the task unless it was answered (or withdrawn) already; returns "stored" or the state.
        `max_held_bytes`: the submitting API's total results bound (0: the task is not counted)."""
        return str(await self.finalize_script(
            keys=[task, stream, reply_to],
            args=[GROUP, entry_id, outcome, ttl_ms, reply_ttl_ms, sync_ttl_ms, self.prefix, now_ms(), task_id,
                  max_held_bytes]))

    async def forget(self, task: str, stream: str, entry_id: str) -> None:
        await self.forget_script(keys=[task, stream], args=[GROUP, entry_id])

    async def abandon(self, task: str, stream: str, ttl_ms: int) -> str:
        return str(await self.abandon_script(keys=[task, stream], args=[ttl_ms]))
