"""One warm sandbox container: created hardened, attached once, then driven only through its channel."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import anyio

from pool.engine.backend import ContainerBackend
from pool.engine.channel import ChannelClosed, RunnerChannel
from pool.engine.sandbox_spec import host_config_kwargs, labels_for, task_nproc_limit
from pool.engine.scratch import ScratchSlot, ScratchStore
from pool.model import cpu_quota
from pool.model.errors import PoolError, SandboxError
from pool.model.lifecycle import draw_wear_share
from pool.model.resources import format_bytes
from pool.model.results import Status, TaskResult, TaskSpec
from pool.model.tasks import RESULT_GRACE_S
from pool.model.tiers import Tier

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT_S = 10.0
RESET_TIMEOUT_S = 15.0  # the runner kills for up to 6 s (KILL_WAIT_S), cleans for up to 5 s, then verifies
# How long to wait for the engine to record the exit of a container that died under a task.
DEATH_RECORD_WAIT_S = 3.0
_serial = itertools.count(1)

# Called with ("stdout" or "stderr", text) for each `output` frame of a streamed task; it must not block.
OutputSink = Callable[[str, str], None]


@dataclass(frozen=True)
class CreateOptions:
    """What every container of this pool instance is created with, besides its tier."""

    docker_images: dict[str, str]  # image name -> docker tag: a tier's containers run its image's
    instance_id: str
    owner: str
    nofile_limit: int
    scratch: ScratchStore | None = None  # None: scratch is a tmpfs (WARMPOOL_SCRATCH=memory, a fake backend)
    cpu_period_us: int = cpu_quota.DEFAULT_PERIOD_US


class ContainerHandle:
    """A started container whose runner answered a ping; leased to one task at a time."""

    def __init__(self, tier: Tier, container_id: str, name: str, gpu_ids: tuple[str, ...]) -> None:
        self.tier = tier
        self.container_id = container_id
        self.name = name
        self.gpu_ids = gpu_ids
        self.created_at = time.monotonic()
        self.uses = 0
        self.wear_share = draw_wear_share()  # its own share of the tier's max_uses and max_age_s (lifecycle)
        self.channel: RunnerChannel | None = None
        self.on_lost: Callable[[ContainerHandle, str], None] | None = None
        self.scratch: tuple[ScratchStore, ScratchSlot] | None = None  # its disk scratch, until given back

    @property
    def alive(self) -> bool:
        return self.channel is not None and self.channel.alive

    @property
    def age_s(self) -> float:
        return time.monotonic() - self.created_at

    def _lost(self, reason: str) -> None:
        if self.on_lost is not None:  # None once we closed it ourselves: not a loss
            log.info("container %s lost its runner: %s", self.name, reason)
            self.on_lost(self, reason)

    async def run(self, spec: TaskSpec, *, fsize_limit_bytes: int, nofile_limit: int,
                  on_output: OutputSink | None = None) -> TaskResult:
        """Run one task; a broken container gives a sandbox_error result (then it must be replaced).
        With `on_output`, the runner streams the task's output to it as it comes."""
        assert self.channel is not None
        self.uses += 1
        frame = spec.run_frame(fsize_limit_bytes, nofile_limit, task_nproc_limit(self.tier))
        if on_output is not None:
            frame["stream"] = True
        reply = await self.request(frame, "result", spec.timeout_s + RESULT_GRACE_S, on_output)
        return reply if isinstance(reply, TaskResult) else self.result_of(reply)

    async def request(self, frame: dict[str, Any], answer_op: str, timeout_s: float,
                      on_output: OutputSink | None = None) -> dict[str, Any] | TaskResult:
        """Send a request frame and wait for its `answer_op` reply, handing `output` frames to `on_output`
        meanwhile. A broken channel, a late or out-of-turn answer is a sandbox_error result instead."""
        assert self.channel is not None
        request_id = frame["id"]
        try:
            self.channel.send(frame)
            async with asyncio.timeout(timeout_s):
                while True:
                    reply = await self.channel.receive(timeout_s)
                    if reply.get("op") == "output" and reply.get("id") == request_id and on_output is not None:
                        on_output(str(reply.get("stream")), str(reply.get("text", "")))
                        continue
                    break
        except ChannelClosed as exc:
            return TaskResult.sandbox_error(request_id, f"the sandbox container died during the task: {exc}")
        except TimeoutError:
            return TaskResult.sandbox_error(request_id, "the runner did not answer within the deadline")
        if reply.get("op") != answer_op or reply.get("id") != request_id:
            return TaskResult.sandbox_error(request_id, f"the runner answered out of turn: {reply.get('op')!r}")
        return reply

    @staticmethod
    def result_of(frame: dict[str, Any]) -> TaskResult:
        try:
            return TaskResult.from_frame(frame)
        except (KeyError, ValueError, TypeError) as exc:
            return TaskResult.sandbox_error(str(frame.get("id", "")), f"the runner sent a malformed result: {exc!r}")

    async def await_reset(self, task_id: str) -> tuple[bool, str]:
        """Wait for the runner's verified reset after a task: (clean, detail)."""
        assert self.channel is not None
        try:
            frame = await self.channel.receive(RESET_TIMEOUT_S)
        except ChannelClosed as exc:
            return False, f"runner gone: {exc}"
        except TimeoutError:
            return False, "reset timed out"
        if frame.get("op") != "reset" or frame.get("id") != task_id:
            return False, f"expected reset, got {frame.get('op')!r}"
        return bool(frame.get("clean")), str(frame.get("detail", ""))

    async def release_scratch(self) -> None:
        """Give back its scratch filesystem once the container is removed (or being removed: a mount it
        still holds goes lazily). The new image of a replacement is the wipe: nothing here reads the old."""
        if self.scratch is not None:
            (store, slot), self.scratch = self.scratch, None
            with anyio.CancelScope(shield=True):
                try:
                    await anyio.to_thread.run_sync(store.release, slot)
                except PoolError as exc:
                    log.warning("could not release the scratch of %s: %s", self.name, exc)

    def close_channel(self) -> None:
        self.on_lost = None  # our own close is not a loss to report
        if self.channel is not None:
            self.channel.close()


async def explain_loss(backend: ContainerBackend, handle: ContainerHandle, result: TaskResult) -> TaskResult:
    """The result of a task whose container died under it: the task's `memory_exceeded` when the kernel's
    OOM killer did it (under gVisor the whole sandbox is what the memory cgroup kills), else unchanged."""
    try:
        oom_killed = await anyio.to_thread.run_sync(backend.oom_killed, handle.container_id, DEATH_RECORD_WAIT_S)
    except PoolError as exc:
        log.warning("could not learn why %s died: %s", handle.name, exc)
        return result
    if not oom_killed:
        return result
    return TaskResult(task_id=result.task_id, status=Status.MEMORY_EXCEEDED, run_ms=result.run_ms,
                      message=f"the kernel's OOM killer stopped the sandbox at its "
                              f"{format_bytes(handle.tier.resources.ram_bytes)} memory limit")


async def start_container(backend: ContainerBackend, tier: Tier, options: CreateOptions,
                          gpu_ids: tuple[str, ...] = ()) -> ContainerHandle:
    """Create, attach, start and handshake one container; on any failure nothing is left behind."""
    serial = next(_serial)
    name = f"warmpool-{tier.name}-{options.instance_id}-{serial}"
    slot: ScratchSlot | None = None
    if options.scratch is not None:
        store = options.scratch
        slot = await anyio.to_thread.run_sync(store.make, f"{tier.name}-{serial}", tier.resources.storage_bytes)
    try:
        host_options = host_config_kwargs(tier, nofile_limit=options.nofile_limit, gpu_ids=gpu_ids,
                                          scratch_dir=None if slot is None else slot.mount_dir,
                                          cpu_period_us=options.cpu_period_us)
        labels = labels_for(tier, options.instance_id, options.owner)
        container_id = await anyio.to_thread.run_sync(
            lambda: backend.create(image=options.docker_images[tier.image], name=name, labels=labels,
                                   host_options=host_options))
    except BaseException:
        if slot is not None:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(store.release, slot)
        raise
    handle = ContainerHandle(tier, container_id, name, gpu_ids)
    if slot is not None:
        handle.scratch = (store, slot)
    try:
        # Attach before start so nothing the runner says is lost; the channel lives as long as the container.
        sock = await anyio.to_thread.run_sync(backend.attach, container_id)
        handle.channel = await RunnerChannel.open(sock, handle._lost)
        await anyio.to_thread.run_sync(backend.start, container_id)
        ping_id = uuid.uuid4().hex
        handle.channel.send({"op": "ping", "id": ping_id})
        pong = await handle.channel.receive(HANDSHAKE_TIMEOUT_S)
        if pong.get("op") != "pong" or pong.get("id") != ping_id:
            raise SandboxError(f"runner handshake failed: {pong!r}")
        if not pong.get("clean", False):
            raise SandboxError(f"fresh container is not clean: {pong.get('detail')}")
    except BaseException as exc:
        handle.close_channel()
        with anyio.CancelScope(shield=True):
            try:
                await anyio.to_thread.run_sync(backend.remove, container_id)
            finally:
                await handle.release_scratch()
        if isinstance(exc, ChannelClosed | TimeoutError):
            raise SandboxError(f"container {name} did not come up: {exc!r}") from exc
        raise
    return handle


async def remove_container(backend: ContainerBackend, handle: ContainerHandle) -> None:
    handle.close_channel()
    try:
        await anyio.to_thread.run_sync(backend.remove, handle.container_id)
    except PoolError as exc:
        log.warning("could not remove %s: %s", handle.name, exc)
    finally:
        await handle.release_scratch()


