"""The pool manager: warm containers per tier, leased one task at a time, reset or replaced after.

It owns every background task it starts (replenisher, container starts and removals) and cancels and
awaits them in `close()`. Docker is touched only for lifecycle, in threads; the task path is the channel.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import anyio

from pool.engine.container import (
    ContainerHandle,
    CreateOptions,
    explain_loss,
    remove_container,
    start_container,
    status_needs_replacement,
)
from pool.engine.docker_backend import INSTANCE_LABEL, DockerBackend
from pool.engine.inventory import detect_gpu_ids, host_inventory, unfit_reason
from pool.engine.sandbox_spec import owner_is_alive, owner_token
from pool.engine.tier_pool import TierPool
from pool.model.capacity import CapacityLedger
from pool.model.errors import (
    BackendUnavailable,
    CapacityError,
    NoCapacity,
    Overloaded,
    PoolError,
    SandboxError,
    TaskWithdrawn,
)
from pool.model.results import Status, TaskResult, TaskSpec
from pool.model.tasks import Execution
from pool.settings import Settings

log = logging.getLogger(__name__)

TICK_S = 1.0


# Awaited once a container is leased, before the code is sent: False (or an exception) withdraws the task
# and hands the untouched container back. Scale-out workers record "running" here, so that a task whose
# worker dies after this point is known to have started and is never run a second time.
StartGate = Callable[[], Awaitable[bool]]


class PoolManager:
    """Keeps each tier's warm containers and leases them to tasks."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.tiers = {tier.name: tier for tier in settings.tiers}
        self.pools = {tier.name: TierPool(tier) for tier in settings.tiers}
        self.backend: DockerBackend | None = None
        self.ledger: CapacityLedger | None = None
        self.docker_ok = False
        self.image_ok = False
        self.image_labels: dict[str, dict[str, str]] = {}  # image name -> its docker labels, read at start
        self._options = CreateOptions(docker_images={spec.name: spec.docker_image for spec in settings.images},
                                      instance_id=settings.instance_id, owner=owner_token(),
                                      nofile_limit=settings.nofile_limit)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._wake = asyncio.Event()
        self._start_slots = asyncio.Semaphore(settings.start_concurrency)
        self._closing = False

    # lifecycle -------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Connect, clear orphans of dead pools, check capacity, and begin warming in the background."""
        self.backend = await anyio.to_thread.run_sync(DockerBackend, self.settings.docker_host)
        await self._read_images()
        info = await anyio.to_thread.run_sync(self.backend.info)
        self._check_runtimes(info.runtimes)
        detected_gpu_ids = () if self.settings.gpu_ids else await anyio.to_thread.run_sync(detect_gpu_ids)
        self.ledger = CapacityLedger(host_inventory(self.settings, info, detected_gpu_ids))
        self.ledger.check_plan([(t.resources, t.min_idle) for t in self.settings.tiers])
        for pool in self.pools.values():
            pool.unfit = unfit_reason(self.ledger.inventory, pool.tier)
            if pool.unfit is not None:
                log.warning("%s: its requests will be refused", pool.unfit)
        self.docker_ok = True
        await self.remove_orphans()
        self._spawn(self._replenish_loop())

    async def _read_images(self) -> None:
        """Every image a tier serves must be present; their labels say what they hold (GET /v1/images)."""
        assert self.backend is not None
        backend = self.backend
        missing = []
        for spec in self.settings.served_images():
            labels = await anyio.to_thread.run_sync(backend.image_labels, spec.docker_image)
            if labels is None:
                missing.append(f"{spec.name} ({spec.docker_image})")
            else:
                self.image_labels[spec.name] = labels
        if missing:
            raise SandboxError(f"sandbox image(s) missing: {', '.join(missing)}: build them with `warmpool image`")
        self.image_ok = True

    def _check_runtimes(self, runtimes: tuple[str, ...]) -> None:
        for tier in self.settings.tiers:
            if tier.runtime not in runtimes:
                raise SandboxError(f"tier {tier.name!r} wants runtime {tier.runtime!r}, "
                                   f"but the engine offers {list(runtimes)}")

    async def wait_warm(self, timeout_s: float) -> bool:
        """Wait until every tier has reached its min_idle once (for tests and `readyz`)."""
        with anyio.move_on_after(timeout_s):
            while not self.warm:  # noqa: ASYNC110 - warmth spans many tiers; a poll is simplest
                await asyncio.sleep(0.05)
        return self.warm

    @property
    def warm(self) -> bool:
        # Cold mode keeps no warm containers: there is nothing to wait for, so it is ready with Docker.
        return self.docker_ok and (self.settings.mode == "cold" or all(p.ever_warm for p in self.pools.values()))

    async def close(self) -> None:
        """Stop warming, then remove every container this instance started."""
        self._closing = True
        for pool in self.pools.values():
            pool.fail_waiters(BackendUnavailable("the pool is shutting down"))
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        handles = [h for p in self.pools.values() for h in (*p.idle, *p.busy)]
        for pool in self.pools.values():
            pool.idle.clear()
            pool.busy.clear()
        if self.backend is not None:
            await asyncio.gather(*(remove_container(self.backend, h) for h in handles))
            try:
                await self._sweep_strays()
            except PoolError as exc:
                log.warning("shutdown sweep failed: %s", exc)
            await anyio.to_thread.run_sync(self.backend.close)

    async def remove_orphans(self) -> int:
        """Remove containers labelled by pools whose owning process is gone (never a live pool's)."""
        assert self.backend is not None
        backend = self.backend
        ours = await anyio.to_thread.run_sync(backend.list_ours)
        dead = [c for c in ours if owner_is_alive(c.labels.get("warmpool.owner", "")) is False]
        await asyncio.gather(*(anyio.to_thread.run_sync(backend.remove, c.container_id) for c in dead))
        if dead:
            log.info("removed %d orphaned container(s) of earlier runs", len(dead))
        return len(dead)

    async def _sweep_strays(self) -> None:
        """Remove containers of this instance that no handle knows (left by a failed removal)."""
        assert self.backend is not None
        backend = self.backend
        known = {h.container_id for p in self.pools.values() for h in (*p.idle, *p.busy)}
        ours = await anyio.to_thread.run_sync(
            backend.list_ours, f"{INSTANCE_LABEL}={self.settings.instance_id}")
        strays = [c for c in ours if c.container_id not in known]
        await asyncio.gather(*(anyio.to_thread.run_sync(backend.remove, c.container_id) for c in strays))

    # leasing ---------------------------------------------------------------------------------------
    async def execute(self, tier_name: str, spec: TaskSpec, wait_s: float | None = None,
                      start_gate: StartGate | None = None) -> Execution:
        """Lease a container of the tier, run the task on it, and hand it back for reset."""
        started = time.perf_counter()
        handle = await self.lease(tier_name, self.settings.lease_timeout_s if wait_s is None else wait_s)
        queue_ms = (time.perf_counter() - started) * 1000
        if start_gate is not None:
            try:
                go = await start_gate()
            except BaseException:
                self._give_back(handle)
                raise
            if not go:
                self._give_back(handle)
                raise TaskWithdrawn(f"task {spec.task_id} was withdrawn before it started")
        try:
            result = await handle.run(spec, fsize_limit_bytes=handle.tier.resources.storage_bytes,
                                      nofile_limit=self.settings.nofile_limit)
        except BaseException:
            # Cancelled mid-task: the container's state is unknown, so it is not reused.
            self._spawn(self._retire(handle, "cancelled"))
            raise
        if result.status == Status.SANDBOX_ERROR and not handle.alive and self.backend is not None:
            result = await explain_loss(self.backend, handle, result)
        self._spawn(self._finish(handle, spec.task_id, result))
        return Execution(result=result, tier=handle.tier, queue_ms=queue_ms, container_name=handle.name,
                         worker=self.settings.instance_id)

    def _give_back(self, handle: ContainerHandle) -> None:
        """A leased container that never received code is still clean: straight back to the pool."""
        pool = self.pools[handle.tier.name]
        pool.busy.discard(handle)
        reason = "shutdown" if self._closing else "runner_lost" if not handle.alive else None
        if reason is None and self.settings.mode == "cold":
            reason = "cold_mode"
        if reason is not None:
            self._spawn(self._retire(handle, reason))
        else:
            pool.offer(handle)

    async def lease(self, tier_name: str, wait_s: float) -> ContainerHandle:
        """An idle, verified-clean container of the tier, waiting at most `wait_s` for one."""
        pool = self.pools[tier_name]
        pool.note_lease()
        started = time.perf_counter()
        if self.settings.mode == "cold":
            return await self._cold_lease(pool, wait_s)
        handle = pool.take_idle()
        if handle is not None:
            pool.stats.lease_wait_ms.append((time.perf_counter() - started) * 1000)
            return handle
        if not self.docker_ok:
            raise BackendUnavailable("the Docker engine is not answering; retry shortly")
        if (refusal := pool.refusal()) is not None:
            raise refusal
        if pool.pending_waiters() >= self.settings.max_waiting:
            raise Overloaded(f"{self.settings.max_waiting} requests already wait for a {tier_name!r} container",
                             retry_after_s=max(1.0, pool.stats.wait_percentile_ms(0.5) / 1000))
        waiter: asyncio.Future[ContainerHandle] = asyncio.get_running_loop().create_future()
        pool.waiters.append(waiter)
        self._wake.set()
        try:
            async with asyncio.timeout(wait_s):
                handle = await waiter
        except TimeoutError:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                handle = waiter.result()
            else:
                waiter.cancel()
                pool.stats.lease_timeouts += 1
                raise NoCapacity(f"no {tier_name!r} container became free within {wait_s:g} s",
                                 retry_after_s=pool.retry_after_s()) from None
        finally:
            if not waiter.done():
                waiter.cancel()
        pool.stats.lease_wait_ms.append((time.perf_counter() - started) * 1000)
        return handle

    async def _cold_lease(self, pool: TierPool, wait_s: float) -> ContainerHandle:
        """Cold mode: a fresh container per task, started on the request path (for comparison)."""
        assert self.backend is not None and self.ledger is not None
        deadline = time.monotonic() + wait_s
        while pool.total >= pool.max_size:
            if time.monotonic() > deadline:
                raise NoCapacity(f"tier {pool.tier.name!r} is at max_size", retry_after_s=1.0)
            await asyncio.sleep(0.01)
        try:
            gpu_ids = self.ledger.reserve(pool.tier.resources)
        except CapacityError as exc:
            raise NoCapacity(str(exc)) from exc
        pool.starting += 1
        try:
            handle = await start_container(self.backend, pool.tier, self._options, gpu_ids)
        except BaseException:
            self.ledger.release(pool.tier.resources, gpu_ids)
            raise
        finally:
            pool.starting -= 1
        pool.stats.created += 1
        pool.busy.add(handle)
        return handle

    async def _finish(self, handle: ContainerHandle, task_id: str, result: TaskResult) -> None:
        """Await the runner's verified reset; return the container, or replace it."""
        pool = self.pools[handle.tier.name]
        pool.stats.run_times.observe(result.status.value, result.run_ms / 1000)
        reason = status_needs_replacement(result.status)
        if reason is None:
            clean, detail = await handle.await_reset(task_id)
            if not clean:
                log.warning("container %s not clean after a task: %s", handle.name, detail)
                reason = "unclean_reset"
        if reason is None and self.settings.mode == "cold":
            reason = "cold_mode"
        reason = reason or handle.worn_out() or pool.stale(handle) or (None if handle.alive else "runner_lost")
        if reason is not None or self._closing:
            await self._retire(handle, reason or "shutdown")
            return
        pool.busy.discard(handle)
        pool.offer(handle)

    async def _retire(self, handle: ContainerHandle, reason: str) -> None:
        pool = self.pools[handle.tier.name]
        pool.forget(handle)
        pool.stats.replaced[reason] += 1
        assert self.backend is not None and self.ledger is not None
        handle.close_channel()
        self._wake.set()
        try:
            await anyio.to_thread.run_sync(self.backend.remove, handle.container_id)
        except BackendUnavailable as exc:
            self._docker_down(exc)
        except PoolError as exc:
            log.warning("could not remove %s: %s", handle.name, exc)
        finally:
            self.ledger.release(handle.tier.resources, handle.gpu_ids)
            self._wake.set()

    def _on_lost(self, handle: ContainerHandle, reason: str) -> None:
        """An idle container died (killed from outside, engine gone): replace it."""
        pool = self.pools[handle.tier.name]
        if handle in pool.idle:
            self._spawn(self._retire(handle, "runner_lost"))

    # warming ---------------------------------------------------------------------------------------
    async def _replenish_loop(self) -> None:
        while True:
            with anyio.move_on_after(TICK_S):
                await self._wake.wait()
            self._wake.clear()
            if not self.docker_ok:
                await self._probe_docker()
                continue
            self._retire_worn_idle()
            for pool in self.pools.values():
                self.retune(pool)
                self._start_wanted(pool)

    def retune(self, pool: TierPool, *, now: bool = False) -> None:
        """Set the tier's warm target from demand (pool/model/warming.py); remove the idle containers beyond it."""
        assert self.ledger is not None
        for handle, reason in pool.retune(self.settings.warming, self.ledger.room_for(pool.tier.resources),
                                          now=now):
            self.retire(handle, reason)

    def retire(self, handle: ContainerHandle, reason: str) -> None:
        """Remove a container the tier no longer holds, in the background."""
        self._spawn(self._retire(handle, reason))

    def wake(self) -> None:
        """Have the replenisher look at every tier now rather than at its next tick."""
        self._wake.set()

    def _start_wanted(self, pool: TierPool) -> None:
        assert self.ledger is not None
        if self.settings.mode == "cold" or time.monotonic() < pool.retry_at_s:
            return
        for _ in range(pool.starts_wanted()):
            try:
                gpu_ids = self.ledger.reserve(pool.tier.resources)
            except CapacityError as exc:
                log.debug("tier %s cannot grow: %s", pool.tier.name, exc)
                return
            pool.starting += 1
            self._spawn(self._start_one(pool, gpu_ids))

    async def _start_one(self, pool: TierPool, gpu_ids: tuple[str, ...]) -> None:
        assert self.backend is not None and self.ledger is not None
        try:
            async with self._start_slots:
                handle = await start_container(self.backend, pool.tier, self._options, gpu_ids)
        except BaseException as exc:
            pool.starting -= 1
            self.ledger.release(pool.tier.resources, gpu_ids)
            if isinstance(exc, BackendUnavailable):
                self._docker_down(exc)
            elif isinstance(exc, PoolError):
                self._start_failed(pool, exc)
            else:
                raise
            return
        pool.starting -= 1
        pool.stats.created += 1
        pool.start_succeeded()
        if self._closing:
            await remove_container(self.backend, handle)
            self.ledger.release(pool.tier.resources, gpu_ids)
            return
        handle.on_lost = self._on_lost
        pool.offer(handle)

    def _start_failed(self, pool: TierPool, exc: PoolError) -> None:
        backoff_s = pool.start_failed(str(exc))  # this tier backs off; the others keep warming
        log.warning("starting a %s container failed (retry in %.1f s): %s", pool.tier.name, backoff_s, exc)

    def _docker_down(self, exc: BackendUnavailable) -> None:
        if self.docker_ok:
            log.error("Docker engine lost: %s", exc)
        self.docker_ok = False
        for pool in self.pools.values():
            pool.fail_waiters(BackendUnavailable("the Docker engine is not answering; retry shortly"))

    async def _probe_docker(self) -> None:
        assert self.backend is not None
        try:
            await anyio.to_thread.run_sync(self.backend.ping)
            await self._sweep_strays()
        except PoolError:
            return
        log.info("Docker engine is back; warming again")
        self.docker_ok = True
        self._wake.set()

    def _retire_worn_idle(self) -> None:
        for pool in self.pools.values():
            for handle in list(pool.idle):
                reason = handle.worn_out() or (None if handle.alive else "runner_lost")
                if reason is not None:
                    pool.forget(handle)
                    self._spawn(self._retire(handle, reason))

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("pool background task failed", exc_info=task.exception())
