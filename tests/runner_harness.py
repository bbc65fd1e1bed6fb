"""Drive runner.py over its frame protocol inside real, hardened containers (tests and quick timings).

The runner must never run on the host (its reset kills every process it can), so everything here goes
through `docker run -i` with the same hardening the pool applies. `python tests/runner_harness.py`
builds the test image and prints round-trip times for `print('hello')`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import secrets
import select
import statistics
import struct
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from pool.engine.sandbox_spec import owner_token
from runner_image.build import CONTEXT_FILES, write_context

REPO = Path(__file__).resolve().parent.parent
BASE_IMAGE = "warmpool-base:bookworm"
# Tagged by the runner's content, so that checkouts with different runners never test each other's.
TEST_IMAGE = "warmpool-runner-test:" + hashlib.sha256(
    b"".join((REPO / "runner_image" / name).read_bytes() for name in CONTEXT_FILES)).hexdigest()[:12]
POOL_LABEL = "runner-test"

# What the pool applies to every sandbox container (DESIGN.md section 3), at test sizes.
HARDENING = [
    "--network", "none", "--read-only",
    "--tmpfs", "/tmp:rw,nosuid,nodev,noexec,size=64m,mode=1777", "--shm-size", "16m",
    "--cap-drop", "ALL", "--cap-add", "SETUID", "--cap-add", "SETGID", "--cap-add", "KILL",
    "--security-opt", "no-new-privileges", "--pids-limit", "64",
    "--memory", "128m", "--memory-swap", "128m", "--log-driver", "none",
]

RUN_DEFAULTS = {"stdin": "", "timeout_s": 10.0, "output_limit_bytes": 1 << 20,
                "fsize_limit_bytes": 32 << 20, "nofile_limit": 256}


def label_args() -> list[str]:
    """`--label` flags for a test container: the pool label every container carries, and this
    process as its owner, so that a pool starting meanwhile does not take it for an orphan."""
    labels = {"warmpool.pool": POOL_LABEL, "warmpool.owner": owner_token()}
    return [arg for key, value in labels.items() for arg in ("--label", f"{key}={value}")]


def build_image(tag: str = TEST_IMAGE) -> str:
    """Build the test image from the base image, the one Dockerfile and the working tree's runner.py (the
    `python` image's recipe, under a tag of its own); returns the tag."""
    context = io.BytesIO()
    write_context(context, None)
    subprocess.run(["docker", "build", "-q", "--network", "none", "--build-arg", f"BASE={BASE_IMAGE}",
                    "-t", tag, "-"], input=context.getvalue(), check=True, capture_output=True,
                   env={**os.environ, "DOCKER_BUILDKIT": "0"})
    return tag


def encode_frame(frame: dict[str, Any]) -> bytes:
    body = json.dumps(frame).encode()
    return struct.pack(">I", len(body)) + body


class RunnerContainer:
    """One `docker run -i` container whose stdin/stdout carry the runner's frames."""

    def __init__(self, image: str = TEST_IMAGE, *, runtime: str | None = None,
                 hardening: list[str] = HARDENING, extra_args: tuple[str, ...] = ()) -> None:
        self.name = f"warmpool-runner-test-{secrets.token_hex(4)}"
        runtime_args = ["--runtime", runtime] if runtime else []
        self.stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            ["docker", "run", "-i", "--rm", "--name", self.name, *label_args(), *runtime_args, *hardening,
             *extra_args, image],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, bufsize=0)
        self._buf = bytearray()

    def send(self, frame: dict[str, Any]) -> None:
        self.send_raw(encode_frame(frame))

    def send_raw(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def _read_exactly(self, n: int, deadline: float) -> bytes:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while len(self._buf) < n:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                raise TimeoutError(f"no complete frame in time; runner stderr: {self.stderr_text()}")
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                raise EOFError(f"runner closed its stdout; stderr: {self.stderr_text()}")
            self._buf += chunk
        data = bytes(self._buf[:n])
        del self._buf[:n]
        return data

    def recv(self, wait_s: float = 60.0) -> dict[str, Any]:
        """The next frame, parsed strictly (the body must be valid UTF-8 JSON holding an object)."""
        deadline = time.monotonic() + wait_s
        (size,) = struct.unpack(">I", self._read_exactly(4, deadline))
        frame = json.loads(self._read_exactly(size, deadline).decode("utf-8"))
        assert isinstance(frame, dict)
        return frame

    def ping(self, wait_s: float = 60.0) -> dict[str, Any]:
        frame_id = secrets.token_hex(4)
        self.send({"op": "ping", "id": frame_id})
        pong = self.recv(wait_s)
        assert pong["id"] == frame_id, pong
        return pong

    def run(self, code: str, wait_s: float = 60.0, **fields: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        """Run a task (`fields` override RUN_DEFAULTS); returns (result, reset), checking that both
        answer this request. `wait_s` bounds the wait for each reply frame."""
        frame_id = secrets.token_hex(4)
        self.send({"op": "run", "id": frame_id, "code": code, **{**RUN_DEFAULTS, **fields}})
        result = self.recv(wait_s)
        reset = self.recv(wait_s)
        assert (result["op"], result["id"]) == ("result", frame_id), result
        assert (reset["op"], reset["id"]) == ("reset", frame_id), reset
        return result, reset

    def stderr_text(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read().decode(errors="replace")[-2000:]

    def close(self) -> None:
        """Stop the container whatever state it is in (EOF first, then force removal)."""
        try:
            if self.proc.stdin:
                self.proc.stdin.close()
            self.proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            pass
        subprocess.run(["docker", "rm", "-f", self.name], capture_output=True, check=False)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()
        self.stderr.close()


def measure(runs: int = 200) -> None:
    """Print round-trip times of print('hello') through one container (send -> result, -> reset)."""
    build_image()
    box = RunnerContainer()
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


if __name__ == "__main__":
    measure()
