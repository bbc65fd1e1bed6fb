"""Drive runner.py over its frame protocol inside containers the product itself creates (tests and timings).

The runner must never run on the host (its reset kills every process it can). Nothing here copies the
pool's hardening: a `RunnerContainer` is created by the pool's own `DockerBackend.create`, with the host
config `pool/engine/sandbox_spec.py` builds for a test tier, the pool's labels and a scratch filesystem of
the pool's own `ScratchStore` (a tmpfs when WARMPOOL_SCRATCH=memory, as the service then gives), then
attached before it is started, as `pool/engine/container.start_container` does, from the image the service runs
(`WARMPOOL_IMAGE`), which must be built from this working tree's runner (else the tests fail: run
`warmpool image`). Frames go over the attach socket; replies are read back with the pool's own
`FrameDecoder` (Docker's multiplexed stream, then the runner's frames).

`python tests/runner_harness.py` prints round-trip times for `print('hello')`.
"""

from __future__ import annotations

import collections
import os
import secrets
import socket
import statistics
import time
from typing import Any

from pool.engine.backend import INSTANCE_LABEL
from pool.engine.docker_backend import DockerBackend
from pool.engine.sandbox_spec import host_config_kwargs, labels_for, owner_token, task_nproc_limit
from pool.engine.scratch import ScratchSlot, ScratchStore, scratch_store
from pool.model import images as catalogue
from pool.model.protocol import FrameDecoder, encode_frame
from pool.model.results import TaskSpec
from pool.model.tiers import Tier, tier_from_dict
from pool.settings import Settings
from runner_image.build import HASH_LABEL, build_hash

# Every container of this test process carries it (as a pool's instance id), so a test can find its own.
INSTANCE_ID = f"runner-test-{os.getpid()}-{secrets.token_hex(3)}"
NOFILE_LIMIT = Settings().nofile_limit  # what the service gives every container


def runner_tier(runtime: str = "runc") -> Tier:
    """The tier the runner tests' containers belong to: small, with a low pids limit to hit."""
    return tier_from_dict({"name": "runner-test", "cpu": 1, "ram": "128MiB", "storage": "64MiB", "min_idle": 0,
                           "max_size": 1, "pids_limit": 64, "runtime": runtime}, 0)


# A run frame's limits as the pool sends them for the test tier (tests override some).
RUN_DEFAULTS: dict[str, Any] = {"stdin": "", "timeout_s": 10.0, "output_limit_bytes": 1 << 20,
                                "fsize_limit_bytes": runner_tier().resources.storage_bytes,
                                "nofile_limit": NOFILE_LIMIT}


def runner_scratch() -> ScratchStore | None:
    """The pool's disk scratch for this test process's containers (opened), as a service would make it; None
    when WARMPOOL_SCRATCH=memory (a tmpfs, as the service then gives). The caller closes it."""
    store = scratch_store(Settings(instance_id=f"{INSTANCE_ID}-{secrets.token_hex(2)}",  # one directory per store
                                   scratch=os.environ.get("WARMPOOL_SCRATCH") or "disk",
                                   scratch_dir=os.environ.get("WARMPOOL_SCRATCH_DIR") or Settings.scratch_dir))
    if store is not None:
        store.open()
    return store


def product_image(backend: DockerBackend) -> str:
    """The `python` image the service runs; AssertionError when it is missing or built from another runner."""
    env = {k: v for k, v in os.environ.items() if k != "WARMPOOL_TIERS_FILE"}
    spec = next(s for s in catalogue.from_env(env) if s.name == "python")
    labels = backend.image_labels(spec.docker_image)
    if labels is None:
        raise AssertionError(f"image {spec.docker_image} is missing: run `make image` (or `warmpool image`)")
    if labels.get(HASH_LABEL) != build_hash(spec):
        raise AssertionError(f"image {spec.docker_image} was built from another runner.py or Dockerfile than this "
                             "working tree's: run `warmpool image` (with your own WARMPOOL_IMAGE tag)")
    return spec.docker_image


class RunnerContainer:
    """One sandbox container, made as the pool makes them, whose attach socket carries the runner's frames."""

    def __init__(self, image: str, backend: DockerBackend, scratch: ScratchStore | None, *,
                 runtime: str = "runc") -> None:
        self.backend = backend
        self.tier = runner_tier(runtime)
        self.name = f"warmpool-runner-test-{secrets.token_hex(4)}"
        self.scratch = scratch
        self.slot: ScratchSlot | None = None
        self.container_id: str | None = None
        self.sock: socket.socket | None = None
        try:
            if scratch is not None:
                self.slot = scratch.make(self.name, self.tier.resources.storage_bytes)
            self.container_id = backend.create(
                image=image, name=self.name, labels=labels_for(self.tier, INSTANCE_ID, owner_token()),
                host_options=host_config_kwargs(self.tier, nofile_limit=NOFILE_LIMIT,
                                                scratch_dir=None if self.slot is None else self.slot.mount_dir))
        except BaseException:
            self.close()
            raise
        try:
            self.sock = backend.attach(self.container_id)  # before start: nothing the runner says is lost
            backend.start(self.container_id)
        except BaseException:
            self.close()
            raise
        self._decoder = FrameDecoder()
        self._frames: collections.deque[dict[str, Any]] = collections.deque()

    def send(self, frame: dict[str, Any]) -> None:
        self.send_raw(encode_frame(frame))

    def send_raw(self, data: bytes) -> None:
        assert self.sock is not None
        self.sock.settimeout(30)
        self.sock.sendall(data)

    def recv(self, wait_s: float = 60.0) -> dict[str, Any]:
        """The next frame, parsed strictly (UTF-8 JSON holding an object, or the decoder raises)."""
        assert self.sock is not None
        deadline = time.monotonic() + wait_s
        while not self._frames:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no complete frame within {wait_s:g} s; container: {self.state()}")
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(1 << 16)
            except TimeoutError:
                continue
            if not data:
                raise EOFError(f"the attach stream ended; container: {self.state()}")
            self._frames.extend(self._decoder.feed(data))
        return self._frames.popleft()

    def ping(self, wait_s: float = 60.0) -> dict[str, Any]:
        frame_id = secrets.token_hex(4)
        self.send({"op": "ping", "id": frame_id})
        pong = self.recv(wait_s)
        assert pong["id"] == frame_id, pong
        return pong

    def run(self, code: str, wait_s: float = 60.0, **fields: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        """Run a task (the pool's run frame for the test tier; `fields` override its values); returns
        (result, reset), checking that both answer this request. `wait_s` bounds the wait for each reply."""
        frame_id = secrets.token_hex(4)
        frame = TaskSpec(task_id=frame_id, code=code).run_frame(
            RUN_DEFAULTS["fsize_limit_bytes"], NOFILE_LIMIT, task_nproc_limit(self.tier))
        self.send({**frame, **{k: v for k, v in RUN_DEFAULTS.items() if k not in frame}, **fields})
        result = self.recv(wait_s)
        reset = self.recv(wait_s)
        assert (result["op"], result["id"]) == ("result", frame_id), result
        assert (reset["op"], reset["id"]) == ("reset", frame_id), reset
        return result, reset

    def close_stdin(self) -> None:
        """Half-close the attach socket: the engine passes that on as EOF on the runner's stdin."""
        assert self.sock is not None
        self.sock.shutdown(socket.SHUT_WR)

    def wait(self, timeout_s: float) -> int:
        """The container's exit code, once it has exited (within `timeout_s`)."""
        assert self.container_id is not None
        return int(self.backend.api.wait(self.container_id, timeout=timeout_s)["StatusCode"])

    def state(self) -> dict[str, Any]:
        """What the engine says of the container (the runner's stderr is not kept: logging is off)."""
        assert self.container_id is not None
        try:
            state = self.backend.inspect(self.container_id).get("State") or {}
        except Exception as exc:  # noqa: BLE001 - only for a failure message
            return {"inspect": repr(exc)}
        return {k: state.get(k) for k in ("Status", "ExitCode", "OOMKilled", "Error")}

    def close(self) -> None:
        """Remove the container whatever state it is in (the pool's own removal: forced), then its scratch."""
        if self.sock is not None:
            self.sock.close()
        try:
            if self.container_id is not None:
                self.backend.remove(self.container_id)
        finally:
            if self.slot is not None and self.scratch is not None:
                self.scratch.release(self.slot)
                self.slot = None


def label_args() -> list[str]:
    """`--label` flags with the pool's labels for a container this process starts with `docker run`."""
    labels = labels_for(runner_tier(), INSTANCE_ID, owner_token())
    return [arg for key, value in labels.items() for arg in ("--label", f"{key}={value}")]


def containers_left(backend: DockerBackend) -> list[str]:
    """Names of this test process's runner containers the engine still has."""
    return [c.name for c in backend.list_ours(f"{INSTANCE_LABEL}={INSTANCE_ID}")]


def measure(runs: int = 200) -> None:
    """Print round-trip times of print('hello') through one container (send -> result, -> reset)."""
    backend = DockerBackend()
    scratch = runner_scratch()
    box = RunnerContainer(product_image(backend), backend, scratch)
    try:
        box.ping()
        to_result, to_reset, run_ms = [], [], []
        for _ in range(runs + 20):
            started = time.perf_counter()
            box.send({"op": "run", "id": "t", "code": "print('hello')", **RUN_DEFAULTS})
            result = box.recv()
            got_result = time.perf_counter()
            reset = box.recv()
            done = time.perf_counter()
            assert result["status"] == "succeeded" and reset["clean"], (result, reset)
            to_result.append((got_result - started) * 1000)
            to_reset.append((done - started) * 1000)
            run_ms.append(result["run_ms"])
        for label, values in (("send->result", to_result), ("send->reset", to_reset), ("run_ms", run_ms)):
            values = sorted(values[20:])  # the first runs warm up caches
            print(f"{label:13} median {statistics.median(values):6.2f} ms  "
                  f"p90 {values[int(len(values) * 0.9)]:6.2f} ms  (n={len(values)})")
    finally:
        box.close()
        if scratch is not None:
            scratch.close()
        backend.close()


if __name__ == "__main__":
    measure()
