"""`warmpool worker`: takes tasks from Redis streams and runs them on this host's own warm pool.

One worker per Docker host (several may share one engine: each has its own pool instance, and orphan
clean-up only removes containers whose owning process is dead). For each tier it serves, a reader takes
entries through the consumer group "workers", never more than the tier's max_size at once, so waiting
tasks stay in the stream where any worker can take them.

Faults. While a task is in hand the worker re-claims its entry to itself every so often (XCLAIM resets
the idle time), so its entries never look idle. A worker that dies stops doing that; after the
visibility timeout a live worker takes its entries over (XAUTOCLAIM) and looks at each task's state:

- `queued`: the dead worker had read it but never sent its code to a container: it is run now.
- `running`: its code was sent (the worker marks that atomically, right before sending). It is answered
  `sandbox_error` "worker lost" and is NOT run again: the code may have had effects, and at-most-once is
  the only safe default for arbitrary code. The client may resubmit. (A delivery count alone cannot tell
  "read but not started" from "started", so the state is recorded instead.)
- `done`, `abandoned` or gone: the entry is dropped.

A result is stored and pushed to the waiting API in the same atomic step that acknowledges and deletes
the entry, and only if the task was not answered already: it is never delivered twice.

Stopping (SIGTERM, SIGINT) drains: the worker beats "draining" (the API stops counting it as serving),
stops reading and claiming, lets the tasks in hand finish for up to `worker_grace_s`, answers those still
running after that `sandbox_error` "worker stopped" (never run again, as above; tasks it had not started
stay pending for another worker to claim), removes its containers, and only then leaves the membership.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import signal
import socket
import sys
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any, cast

import redis.exceptions

from pool.background import TaskOwner
from pool.engine.backend import ContainerBackend
from pool.engine.docker_backend import DockerBackend
from pool.engine.manager import PoolManager
from pool.engine.scratch import ScratchStore, scratch_store
from pool.model.backoff import Backoff
from pool.model.errors import BackendUnavailable, InvalidRequest, PoolError
from pool.scaleout.backlog import Backlog
from pool.scaleout.cluster_config import ConfigStore
from pool.scaleout.membership import BEATS_TO_DEATH, DRAINING, SERVING, beat_json
from pool.scaleout.redis_io import GROUP, Keys, Scripts, connect, is_nogroup, redis_errors
from pool.scaleout.session_worker import WorkerSessions
from pool.scaleout.worker_config import ConfigFollower
from pool.scaleout.worker_tasks import TaskHandler
from pool.settings import Settings, from_env

log = logging.getLogger(__name__)

READ_BLOCK_S = 2.0
READ_BACKOFF_S = 0.1
MAX_READ_BACKOFF_S = 2.0
PRUNE_EVERY_ROUNDS = 20
WARM_WAIT_S = 120.0
DEFAULT_ENGINE = "unix:///var/run/docker.sock"  # docker-py's, when DOCKER_HOST is unset
CLAIM_POLL_S = 0.5  # how often idle entries are looked for: part of a dead worker's detection time

# Something to run beside the worker for its whole life (the CLI's /metrics and /healthz server).
Sidecar = Callable[["Worker"], AbstractAsyncContextManager[Any]]


class Worker:
    """Reads the tiers it serves, runs each task on its own `PoolManager`, and reports the outcome."""

    def __init__(self, settings: Settings, backend: ContainerBackend, scratch: ScratchStore | None = None) -> None:
        assert settings.redis_url
        known = [t.name for t in settings.tiers]
        served = settings.worker_tiers or tuple(known)
        unknown = sorted(set(served) - set(known))
        if unknown:
            raise InvalidRequest("WARMPOOL_WORKER_TIERS", f"unknown tiers {unknown}; the tiers are {known}")
        self.settings = dataclasses.replace(settings, tiers=tuple(t for t in settings.tiers if t.name in served))
        self.worker_id = settings.instance_id
        self.pool = PoolManager(self.settings, backend, scratch)
        self.keys = Keys(settings.redis_prefix)
        self.redis = connect(settings.redis_url)
        self.blocking = connect(settings.redis_url, blocking_s=READ_BLOCK_S)
        self.scripts = Scripts(self.redis, settings.redis_prefix)
        self.backlog = Backlog(self.redis, self.keys)
        self.inflight: dict[str, dict[str, str]] = {name: {} for name in served}  # tier -> entry id -> task id
        self._entries: dict[str, tuple[str, dict[str, str]]] = {}  # entry id -> (tier, fields), while in hand
        self.state = "starting"
        self.redis_ok = False
        self._freed = {name: asyncio.Event() for name in served}
        self._loops = TaskOwner("worker loops")  # readers, claimer, heartbeat: stopped first
        self._handlers = TaskOwner("worker tasks")  # one per task in hand: drained at shutdown
        self._keeper = TaskOwner("worker keeper")  # keeps in-hand entries claimed until the drain ends
        self._beating = TaskOwner("worker heartbeat")  # beats until the worker leaves, draining included
        self.follower = ConfigFollower(self.worker_id, socket.gethostname(), self.pool,
                                       ConfigStore(self.redis, settings.redis_prefix))
        self._sweeping = False
        self.sessions = WorkerSessions(self.worker_id, self.settings, self.pool, self.keys, self.redis, self.blocking,
                                       self.scripts, on_freed=self._wake_readers)
        self.handler = TaskHandler(self.worker_id, self.settings, self.pool, self.keys, self.redis, self.scripts,
                                   on_peer_lost=self._sweep_orphans, sessions=self.sessions)

    # lifecycle -------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Warm the pool first, so that the first heartbeat announces a worker that can answer at once.

        The cluster's stored sizes are applied as soon as the pool knows the host's capacity, before it
        starts a container, so a worker started later warms to them directly."""
        configs = await self.follower.load()
        await self.pool.start()
        self.follower.apply_initial(configs)  # before any await: the replenisher has not run yet
        await self.sessions.start()
        if not await self.pool.wait_warm(WARM_WAIT_S):
            log.warning("the pool is not warm after %.0f s; serving anyway", WARM_WAIT_S)
        for tier_name in self.inflight:
            try:
                await self._ensure_group(tier_name)
            except BackendUnavailable as exc:
                log.warning("%s (the readers will retry)", exc)
        self.state = SERVING
        try:
            await self._beat()
        except BackendUnavailable as exc:
            log.warning("%s (the heartbeat will retry)", exc)
        for tier_name in self.inflight:
            self._loops.spawn(self._read_loop(tier_name))
        self._loops.spawn(self._claim_loop())
        self._loops.spawn(self.follower.loop(lambda: self._loops.closing))
        self._loops.spawn(self.sessions.calls_loop())
        self._beating.spawn(self._heartbeat_loop())
        self._keeper.spawn(self._keep_claimed_loop())
        log.info("worker %s serving tiers %s", self.worker_id, list(self.inflight))

    async def close(self) -> None:
        """Drain (see the module's docstring): stop taking tasks, let those in hand finish within the grace
        period, answer those that did not, remove our containers, then leave the cluster."""
        self.state = DRAINING
        with contextlib.suppress(BackendUnavailable):
            await self._beat()  # the API stops counting this worker as serving at once
        await self._loops.close()
        if len(self._handlers):
            grace_s = self.settings.worker_grace_s
            log.info("draining: waiting up to %.0f s for %d task(s) in hand", grace_s, len(self._handlers))
            if not await self._handlers.wait(grace_s):
                await self._stop_unfinished()
        await self._handlers.close()
        await self._keeper.close()
        await self.sessions.close()  # recorded as ended ("worker stopped") before the containers go
        await self.pool.close()
        await self._beating.close()
        try:
            with redis_errors("leave the cluster"):
                await self.redis.delete(self.keys.worker(self.worker_id))
                await self.redis.srem(self.keys.workers, self.worker_id)
        except BackendUnavailable as exc:
            log.warning("%s", exc)
        else:
            log.info("worker %s left the cluster; its containers are removed", self.worker_id)
        await self.redis.aclose()
        await self.blocking.aclose()

    async def _stop_unfinished(self) -> None:
        """The grace period is over: stop the tasks still in hand, and answer those that had started."""
        unfinished = dict(self._entries)
        log.warning("grace period over: stopping %d task(s) still in hand", len(unfinished))
        await self._handlers.close()  # each running task's container is removed (its state is unknown)
        for entry_id, (tier_name, fields) in unfinished.items():
            try:
                await self.handler.answer_stopped(tier_name, entry_id, fields)
            except BackendUnavailable as exc:
                log.warning("task entry %s left to be claimed: %s", entry_id, exc)

    async def _ensure_group(self, tier_name: str) -> None:
        """Create the tier's stream and group if missing; from id 0, so tasks added before are not skipped."""
        with redis_errors("create the consumer group"):
            try:
                await self.redis.xgroup_create(self.keys.stream(tier_name), GROUP, id="0", mkstream=True)
            except redis.exceptions.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    def health(self) -> dict[str, Any]:
        """What /healthz of a worker says: alive, and in which state."""
        return {"worker": self.worker_id, "engine": self.settings.docker_host or DEFAULT_ENGINE, "state": self.state,
                "docker_ok": self.pool.docker_ok, "redis_ok": self.redis_ok,
                "inflight": {name: len(e) for name, e in self.inflight.items()}}

    def _wake_readers(self) -> None:
        """A session ended: its container may take a task now."""
        for freed in self._freed.values():
            freed.set()

    def _free(self, tier_name: str) -> int:
        """Tasks of the tier we may take now: containers neither running one nor held by a session."""
        held = len(self.inflight[tier_name]) + self.sessions.held_in(tier_name)
        return self.pool.pools[tier_name].max_size - held

    # loops -----------------------------------------------------------------------------------------
    async def _read_loop(self, tier_name: str) -> None:
        stream = self.keys.stream(tier_name)
        backoff = Backoff(first_s=READ_BACKOFF_S, max_s=MAX_READ_BACKOFF_S)
        while not self._loops.closing:  # see TaskOwner.close
            if not self.pool.docker_ok:  # our engine is down: leave the tasks to workers that can run them
                await asyncio.sleep(0.5)
                continue
            free = self._free(tier_name)
            if free <= 0:
                self._freed[tier_name].clear()
                await self._freed[tier_name].wait()
                continue
            try:
                with redis_errors("read tasks"):
                    # Async tasks wait in per-owner backlogs: bring our share of them to the stream first.
                    await self.backlog.feed(tier_name, free)
                    try:
                        reply = await self.blocking.xreadgroup(GROUP, self.worker_id, {stream: ">"}, count=free,
                                                               block=int(READ_BLOCK_S * 1000))
                    except redis.exceptions.ResponseError as exc:
                        if not is_nogroup(exc):
                            raise
                        await self._ensure_group(tier_name)
                        continue
            except BackendUnavailable as exc:
                (log.debug if backoff.failing else log.warning)("%s; retrying", exc)
                await asyncio.sleep(backoff.next_s())
                continue
            if backoff.failing:
                log.info("reading tier %s from Redis again", tier_name)
            backoff.reset()
            for _stream, entries in cast(list[tuple[str, list[tuple[str, dict[str, str]]]]], reply or []):
                for entry_id, fields in entries:
                    self._take(tier_name, entry_id, fields, claimed=False)

    async def _claim_loop(self) -> None:
        """Take over entries that stayed idle past the visibility timeout: their worker is gone."""
        min_idle_ms = int(self.settings.visibility_timeout_s * 1000)
        rounds = 0
        while not self._loops.closing:  # see TaskOwner.close
            await asyncio.sleep(min(CLAIM_POLL_S, self.settings.visibility_timeout_s / 2))
            rounds += 1
            if not self.pool.docker_ok:
                continue
            for tier_name in self.inflight:
                stream = self.keys.stream(tier_name)
                try:
                    with redis_errors("claim idle tasks"):
                        reply = await self.redis.xautoclaim(stream, GROUP, self.worker_id, min_idle_ms, "0-0",
                                                            count=max(1, self._free(tier_name)))
                        if rounds % PRUNE_EVERY_ROUNDS == 0:
                            await self._prune_consumers(stream)
                except BackendUnavailable as exc:
                    log.debug("%s", exc)
                    continue
                for entry_id, fields in reply[1]:
                    if fields and entry_id not in self.inflight[tier_name]:
                        log.info("claimed task entry %s of tier %s from a silent worker", entry_id, tier_name)
                        self._take(tier_name, entry_id, fields, claimed=True)

    async def _prune_consumers(self, stream: str) -> None:
        """Forget consumers of dead workers once they hold nothing (worker ids are new at every start)."""
        prune_after_ms = 20 * self.settings.visibility_timeout_s * 1000
        for consumer in await self.redis.xinfo_consumers(stream, GROUP):
            name = consumer["name"]
            if (name != self.worker_id and int(consumer["pending"]) == 0 and int(consumer["idle"]) > prune_after_ms
                    and not await self.redis.exists(self.keys.worker(name))):
                await self.redis.xgroup_delconsumer(stream, GROUP, name)

    async def _keep_claimed_loop(self) -> None:
        """Re-claim our in-hand entries to ourselves (resets their idle time) so no one takes them over."""
        interval_s = max(0.1, min(1.0, self.settings.visibility_timeout_s / 4))
        while not self._keeper.closing:  # see TaskOwner.close
            await asyncio.sleep(interval_s)
            for tier_name, entries in self.inflight.items():
                if not entries:
                    continue
                try:
                    with redis_errors("keep tasks claimed"):
                        await self.redis.xclaim(self.keys.stream(tier_name), GROUP, self.worker_id, 0,
                                                list(entries), justid=True)
                except BackendUnavailable as exc:
                    log.debug("%s", exc)

    async def _heartbeat_loop(self) -> None:
        while not self._beating.closing:  # see TaskOwner.close
            await asyncio.sleep(self.settings.heartbeat_s)
            try:
                await self._beat()
            except BackendUnavailable as exc:
                log.debug("%s", exc)

    async def _beat(self) -> None:
        inflight = {name: len(entries) for name, entries in self.inflight.items()}
        ttl_ms = int(self.settings.heartbeat_s * BEATS_TO_DEATH * 1000)
        beat = beat_json(self.worker_id, self.pool.snapshot(), inflight, state=self.state,
                         refused=self.follower.refused, engine=self.settings.docker_host or DEFAULT_ENGINE,
                         image_labels=self.pool.image_labels)
        try:
            with redis_errors("send a heartbeat"):
                async with self.redis.pipeline(transaction=True) as pipe:
                    pipe.set(self.keys.worker(self.worker_id), beat, px=ttl_ms)
                    pipe.sadd(self.keys.workers, self.worker_id)
                    await pipe.execute()
        except BackendUnavailable:
            self.redis_ok = False
            raise
        self.redis_ok = True

    # one task --------------------------------------------------------------------------------------
    def _take(self, tier_name: str, entry_id: str, fields: dict[str, str], *, claimed: bool) -> None:
        self.inflight[tier_name][entry_id] = fields.get("id", "")
        self._entries[entry_id] = (tier_name, fields)
        self._handlers.spawn(self._handle(tier_name, entry_id, fields, claimed))

    async def _handle(self, tier_name: str, entry_id: str, fields: dict[str, str], claimed: bool) -> None:
        try:
            await self.handler.handle(tier_name, entry_id, fields, claimed=claimed)
        finally:
            self.inflight[tier_name].pop(entry_id, None)
            self._entries.pop(entry_id, None)
            self._freed[tier_name].set()

    def _sweep_orphans(self) -> None:
        """A peer died: remove the containers it left on this engine (only those whose owner is dead)."""
        if self._sweeping:
            return
        self._sweeping = True

        async def sweep() -> None:
            try:
                await self.pool.remove_orphans()
            except PoolError as exc:
                log.warning("orphan sweep failed: %s", exc)
            finally:
                self._sweeping = False

        self._keeper.spawn(sweep())


async def run(settings: Settings, sidecar: Sidecar | None = None) -> None:
    """Serve until SIGTERM or SIGINT, then drain and shut down; `sidecar` runs for the worker's whole life
    (from before it warms to after it has left)."""
    worker = Worker(settings, DockerBackend(settings.docker_host), scratch_store(settings))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with contextlib.AsyncExitStack() as stack:
        if sidecar is not None:
            await stack.enter_async_context(sidecar(worker))
        try:
            await worker.start()
            await stop.wait()
            log.info("worker %s draining", worker.worker_id)
        finally:
            await worker.close()


def main(sidecar: Sidecar | None = None) -> None:
    """Entry point of `warmpool worker`: settings from the environment (WARMPOOL_REDIS_URL is required)."""
    try:
        settings = from_env()
    except (PoolError, OSError, ValueError) as exc:
        sys.exit(f"warmpool worker: bad settings: {exc}")
    if not settings.redis_url:
        sys.exit("warmpool worker: set WARMPOOL_REDIS_URL (e.g. redis://127.0.0.1:6379/0)")
    try:
        asyncio.run(run(settings, sidecar))
    except PoolError as exc:
        sys.exit(f"warmpool worker: {exc}")
