"""The pool manager: warm containers per tier, leased one task at a time, reset or replaced after.

It owns every background task it starts (replenisher, container starts and removals) and cancels and
awaits them in `close()`. The backend (Docker, or a test's fake) is touched only for lifecycle, in
threads; the task path is the channel. What becomes of a container after a task is decided in
pool/model/lifecycle.py; how a lease is served (warm or cold) by the mode in pool/engine/modes.py.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import anyio

from pool.background import TaskOwner
from pool.engine.backend import INSTANCE_LABEL, ContainerBackend
from pool.engine.container import (
    ContainerHandle,
    CreateOptions,
    OutputSink,
    explain_loss,
    remove_container,
    start_container,
)
from pool.engine.inventory import detect_gpu_ids, host_inventory, unfit_reason
from pool.engine.modes import ColdMode, Mode, WarmMode
from pool.engine.sandbox_spec import owner_is_alive, owner_token
from pool.engine.scratch import ScratchStore
from pool.engine.tier_pool import TierPool
from pool.model.capacity import CapacityLedger, HostInventory
from pool.model.errors import (
    BackendUnavailable,
    CapacityError,
    NoCapacity,
    PoolError,
    SandboxError,
    TaskWithdrawn,
)
from pool.model.lifecycle import Fate, RetireReason
from pool.model.results import Status, TaskResult, TaskSpec
from pool.model.snapshots import PoolsSnapshot
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

    def __init__(self, settings: Settings, backend: ContainerBackend, scratch: ScratchStore | None = None) -> None:
        """`scratch`: the store of each container's disk scratch (pool/engine/scratch.py), for a local Docker
        engine; None, a tmpfs (WARMPOOL_SCRATCH=memory, or a test's fake backend)."""
        self.settings = settings
        self.backend = backend
        self.scratch = scratch
        self.tiers = {tier.name: tier for tier in settings.tiers}
        # The one place the mode is looked at: from here on the mode object decides (pool/engine/modes.py).
        self.mode: Mode = (ColdMode(self._start_for_lease) if settings.mode == "cold"
                           else WarmMode(settings.max_waiting, engine_up=lambda: self.docker_ok, wake=self.wake))
        self.pools = {tier.name: TierPool(tier, single_use=self.mode.single_use,
                                          housekeeping_cpu_s=settings.reuse_cooldown_cpu_ms / 1000)
                      for tier in settings.tiers}
        # Nothing is held before `start` reads the host's inventory: until then no container fits.
        self.ledger = CapacityLedger(HostInventory(cpus=0.0, ram_bytes=0))
        self.docker_ok = False
        self.image_ok = False
        self.image_labels: dict[str, dict[str, str]] = {}  # image name -> its docker labels, read at start
        self._options = CreateOptions(docker_images={spec.name: spec.docker_image for spec in settings.images},
                                      instance_id=settings.instance_id, owner=owner_token(),
                                      nofile_limit=settings.nofile_limit, scratch=scratch,
                                      cpu_period_us=settings.cpu_period_us)
        self._background = TaskOwner("pool")  # replenisher, container starts and removals
        self._wake = asyncio.Event()
        self._start_slots = asyncio.Semaphore(settings.start_concurrency)
        self._closing = False

    # lifecycle -------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Connect, clear orphans of dead pools, check capacity, and begin warming in the background."""
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
        if self.scratch is not None:
            worst_case_bytes = sum(t.resources.storage_bytes * t.max_size for t in self.settings.tiers)
            await anyio.to_thread.run_sync(self.scratch.open, worst_case_bytes)
        self._wake.set()  # warm at once rather than after the first tick
        self._background.spawn(self._replenish_loop())

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

    def snapshot(self) -> PoolsSnapshot:
        """Every tier, the ledger and the engine's state, frozen now."""
        window_s = self.settings.warming.window_s
        errors = self.backend.error_counts()
        return PoolsSnapshot(tiers=tuple(p.snapshot(window_s) for p in self.pools.values()),
                             capacity=self.ledger.snapshot(), warming=self.settings.warming,
                             docker_ok=self.docker_ok, docker_api_errors=tuple(sorted(errors.items())))

    @property
    def warm(self) -> bool:
        return self.docker_ok and self.mode.ready(self.pools.values())

    async def close(self) -> None:
        """Stop warming, then remove every container this instance started."""
        self._closing = True
        for pool in self.pools.values():
            pool.fail_waiters(BackendUnavailable("the pool is shutting down"))
        await self._background.close()
        handles = [h for p in self.pools.values() for h in (*p.idle, *p.busy)]
        for pool in self.pools.values():
            pool.idle.clear()
            pool.busy.clear()
        await asyncio.gather(*(remove_container(self.backend, h) for h in handles))
        if self.image_ok:  # the engine answered once: sweep what a failed removal may have left
            try:
                await self._sweep_strays()
            except PoolError as exc:
                log.warning("shutdown sweep failed: %s", exc)
        await anyio.to_thread.run_sync(self.backend.close)
        if self.scratch is not None:
            # Slots of containers whose removal was cut short go here too (lazily, if one still holds it).
            await anyio.to_thread.run_sync(self.scratch.close)

    async def remove_orphans(self) -> int:
        """Remove containers labelled by pools whose owning process is gone (never a live pool's), then
        those pools' scratch filesystems."""
        backend = self.backend
        ours = await anyio.to_thread.run_sync(backend.list_ours)
        dead = [c for c in ours if owner_is_alive(c.labels.get("warmpool.owner", "")) is False]
        await asyncio.gather(*(anyio.to_thread.run_sync(backend.remove, c.container_id) for c in dead))
        if dead:
            log.info("removed %d orphaned container(s) of earlier runs", len(dead))
        if self.scratch is not None:
            await anyio.to_thread.run_sync(self.scratch.sweep_orphans)
        return len(dead)

    async def _sweep_strays(self) -> None:
        """Remove containers of this instance that no handle knows (left by a failed removal)."""
        backend = self.backend
        known = {h.container_id for p in self.pools.values() for h in (*p.idle, *p.busy)}
        ours = await anyio.to_thread.run_sync(
            backend.list_ours, f"{INSTANCE_LABEL}={self.settings.instance_id}")
        strays = [c for c in ours if c.container_id not in known]
        await asyncio.gather(*(anyio.to_thread.run_sync(backend.remove, c.container_id) for c in strays))

    # leasing ---------------------------------------------------------------------------------------
    async def execute(self, tier_name: str, spec: TaskSpec, wait_s: float | None = None,
                      start_gate: StartGate | None = None, on_output: OutputSink | None = None) -> Execution:
        """Lease a container of the tier, run the task on it, and hand it back for reset. With `on_output`
        the task's output is streamed to it as it comes (it must not block: the channel waits for no one)."""
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
                                      nofile_limit=self.settings.nofile_limit, on_output=on_output)
        except BaseException:
            # Cancelled mid-task: the container's state is unknown, so it is not reused.
            self.retire(handle, RetireReason.CANCELLED)
            raise
        result = await self.explain(handle, result)
        self._background.spawn(self._finish(handle, spec.task_id, result))
        return Execution(result=result, tier=handle.tier, queue_ms=queue_ms, container_name=handle.name,
                         worker=self.settings.instance_id)

    async def lease(self, tier_name: str, wait_s: float) -> ContainerHandle:
        """A verified-clean container of the tier, waiting at most `wait_s` for one."""
        pool = self.pools[tier_name]
        pool.note_lease()
        return await self.mode.lease(pool, wait_s)

    def _give_back(self, handle: ContainerHandle) -> None:
        """A leased container that never received code needs no reset: back to the pool, unless it must go."""
        pool = self.pools[handle.tier.name]
        verdict = pool.after_task(handle, status=None, closing=self._closing)
        if verdict.reason is not None:
            self.retire(handle, verdict.reason)
            return
        pool.offer(handle)

    async def _finish(self, handle: ContainerHandle, task_id: str, result: TaskResult) -> None:
        """Await the runner's verified reset when the outcome allows one; return the container, or replace it."""
        self.pools[handle.tier.name].stats.run_times.observe(result.status.value, result.run_ms / 1000)
        await self._settle(handle, task_id, result.status)

    async def _settle(self, handle: ContainerHandle, task_id: str, status: Status) -> None:
        pool = self.pools[handle.tier.name]
        verdict = pool.after_task(handle, status=status, closing=self._closing)
        if verdict.fate == Fate.RESET:
            clean, detail = await handle.await_reset(task_id)
            if not clean:
                log.warning("container %s not clean after a task: %s", handle.name, detail)
            verdict = pool.after_task(handle, status=status, reset_clean=clean, closing=self._closing)
        if verdict.reason is not None:
            await self._retire(handle, verdict.reason)
            return
        pool.offer(handle)

    async def _start_for_lease(self, pool: TierPool) -> ContainerHandle:
        """A container started for one lease (cold mode), on the request path."""
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

    async def explain(self, handle: ContainerHandle, result: TaskResult) -> TaskResult:
        """A sandbox_error whose container died: memory_exceeded when the kernel's OOM killer did it."""
        if result.status == Status.SANDBOX_ERROR and not handle.alive:
            return await explain_loss(self.backend, handle, result)
        return result

    # sessions: a lease held across calls -----------------------------------------------------------
    async def lease_session(self, tier_name: str, wait_s: float) -> ContainerHandle:
        """A container of the tier held for one session until `release` or `retire`; busy all along, so it
        counts against the tier's max_size and the host's capacity like any lease."""
        handle = await self.lease(tier_name, wait_s)
        handle.uses += 1
        return handle

    def give_back(self, handle: ContainerHandle) -> None:
        """A leased container that never received code goes back to the pool as it is (it is still clean)."""
        self._give_back(handle)

    def note_run(self, handle: ContainerHandle, result: TaskResult) -> None:
        """Count a session call's run time with the tier's tasks."""
        self.pools[handle.tier.name].stats.run_times.observe(result.status.value, result.run_ms / 1000)

    def release(self, handle: ContainerHandle, frame_id: str, status: Status = Status.SUCCEEDED) -> None:
        """The runner is resetting a session's container (answering `frame_id`): await that verified reset
        when the outcome allows one, then return the container to the pool, or replace it."""
        self._background.spawn(self._settle(handle, frame_id, status))

    # retiring --------------------------------------------------------------------------------------
    def retire(self, handle: ContainerHandle, reason: RetireReason) -> None:
        """Remove a container the tier no longer holds, in the background."""
        self._background.spawn(self._retire(handle, reason))

    async def _retire(self, handle: ContainerHandle, reason: RetireReason) -> None:
        pool = self.pools[handle.tier.name]
        pool.forget(handle)
        pool.stats.replaced[reason] += 1
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
            self._wake.set()  # the replacement may start while the old scratch is unmounted
            await handle.release_scratch()

    def _on_lost(self, handle: ContainerHandle, reason: str) -> None:
        """An idle container died (killed from outside, engine gone): replace it."""
        pool = self.pools[handle.tier.name]
        if handle in pool.idle:
            self.retire(handle, RetireReason.RUNNER_LOST)

    # warming ---------------------------------------------------------------------------------------
    async def _replenish_loop(self) -> None:
        while True:
            # Sooner than the tick when a waiting lease was left to a busy container that may not come back.
            recheck_s = min((pool.recheck_in_s() for pool in self.pools.values()), default=TICK_S)
            with anyio.move_on_after(min(TICK_S, recheck_s + 0.001)):
                await self._wake.wait()
            self._wake.clear()
            if not self.docker_ok:
                await self._probe_docker()
                continue
            for pool in self.pools.values():
                for handle, reason in pool.take_worn_idle():
                    self.retire(handle, reason)
                self.retune(pool)
                self._start_wanted(pool)

    def retune(self, pool: TierPool, *, now: bool = False) -> None:
        """Set the tier's warm target from demand (pool/model/warming.py); remove the idle containers beyond it."""
        for handle, reason in pool.retune(self.settings.warming, self.ledger.room_for(pool.tier.resources),
                                          now=now):
            self.retire(handle, reason)

    def wake(self) -> None:
        """Have the replenisher look at every tier now rather than at its next tick."""
        self._wake.set()

    def _start_wanted(self, pool: TierPool) -> None:
        if time.monotonic() < pool.retry_at_s:
            return
        for _ in range(self.mode.starts_wanted(pool)):
            try:
                gpu_ids = self.ledger.reserve(pool.tier.resources)
            except CapacityError as exc:
                log.debug("tier %s cannot grow: %s", pool.tier.name, exc)
                return
            pool.starting += 1
            self._background.spawn(self._start_one(pool, gpu_ids))

    async def _start_one(self, pool: TierPool, gpu_ids: tuple[str, ...]) -> None:
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
        if pool.state_of(handle).drained:  # a drain came while it started: it is replaced, never leased
            self.retire(handle, RetireReason.DRAINED)
            return
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
        try:
            await anyio.to_thread.run_sync(self.backend.ping)
            await self._sweep_strays()
        except PoolError:
            return
        log.info("Docker engine is back; warming again")
        self.docker_ok = True
        self._wake.set()
