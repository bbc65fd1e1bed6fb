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
    {p}:out:{id}        stream: a streamed task's output (pool/scaleout/output_relay.py); capped, expiring.
    {p}:session:{id}    hash: a session's state (opening, open, ended), reason, owner, tier, worker, calls,
                        busy, last_used_unix; {p}:sessions-of:{owner} the set of an owner's open ones;
                        {p}:sessions-ended counts endings by reason.
    {p}:calls:{worker}  list: session calls and closes for the worker holding the session (BLPOP).

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
from pool.model.result_bounds import Bounds
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


# KEYS: stream, task. ARGV: prefix, now_ms, max_len, pending_ttl_ms, owner, task id, reserve (bytes an async
# task holds; -1 for a synchronous one, which holds nothing), per-key tasks, per-key bytes, total tasks, total
# bytes, n (entry field/value count), entry..., hash... Returns the entry id, false (the stream is full), or a
# refusal {'key'|'total', retry_ms, tasks, bytes} from the results bound.
_SUBMIT = """
local P = ARGV[1]
local NOW = tonumber(ARGV[2])
""" + PRELUDE + """
local existing = redis.call('HGET', KEYS[2], 'entry')
if existing then return existing end
if redis.call('XLEN', KEYS[1]) >= tonumber(ARGV[3]) then return false end
if tonumber(ARGV[7]) >= 0 then
  local refused = admit(ARGV[5], ARGV[6], tonumber(ARGV[7]), NOW + tonumber(ARGV[4]), tonumber(ARGV[8]),
                        tonumber(ARGV[9]), tonumber(ARGV[10]), tonumber(ARGV[11]))
  if refused then return refused end
end
local n = tonumber(ARGV[12])
local entry_args = {}
for i = 13, 12 + n do entry_args[#entry_args + 1] = ARGV[i] end
local entry = redis.call('XADD', KEYS[1], '*', unpack(entry_args))
local hash_args = {'entry', entry}
for i = 13 + n, #ARGV do hash_args[#hash_args + 1] = ARGV[i] end
redis.call('HSET', KEYS[2], unpack(hash_args))
redis.call('PEXPIRE', KEYS[2], ARGV[4])
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
# one is read from the reply list, and its hash only has to outlive a late claim.
_FINALIZE = """
local P = ARGV[7]
local NOW = tonumber(ARGV[8])
""" + PRELUDE + """
redis.pcall('XACK', KEYS[2], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[2], ARGV[2])
local state = redis.call('HGET', KEYS[1], 'state')
if state ~= 'queued' and state ~= 'running' then return state or 'gone' end
if redis.call('HGET', KEYS[1], 'kind') == 'async' then
  redis.call('HSET', KEYS[1], 'state', 'done', 'outcome', ARGV[3])
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
  local owner = redis.call('HGET', KEYS[1], 'owner')
  if owner and tonumber(ARGV[10]) > 0 then
    finish_held(owner, ARGV[9], string.len(ARGV[3]) + """ + str(OVERHEAD_BYTES) + """, NOW + tonumber(ARGV[4]),
                tonumber(ARGV[10]))
  end
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
class Held:
    """An async task's claim on the results bound: who holds it, what it reserves, and the API's bounds."""

    owner: str
    size_bytes: int
    bounds: Bounds


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

    async def submit(self, stream: str, task: str, *, max_len: int, pending_ttl_ms: int,
                     entry: dict[str, str], record: dict[str, str], held: Held | None = None) -> str | Refusal | None:
        """Add the task unless the stream is full (None) or the results bound refuses it (a Refusal); the
        entry id, also on a retried call. `held`: an async task's owner and reservation, else None."""
        flat_entry = [x for pair in entry.items() for x in pair]
        flat_record = [x for pair in record.items() for x in pair]
        bounds = held.bounds if held else Bounds(0, 0, 0, 0)
        args: list[Any] = [self.prefix, now_ms(), max_len, pending_ttl_ms, held.owner if held else "",
                           entry.get("id", ""), held.size_bytes if held else -1, bounds.max_tasks_per_key,
                           bounds.max_result_bytes_per_key, bounds.max_results, bounds.max_result_bytes,
                           len(flat_entry), *flat_entry, *flat_record]
        reply = await self.submit_script(keys=[stream, task], args=args)
        if isinstance(reply, list):
            return Refusal(scope=str(reply[0]), retry_after_ms=int(reply[1]), tasks=int(reply[2]),
                           size_bytes=int(reply[3]))
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
