"""What the engine needs of a container backend: lifecycle calls only, blocking (the engine runs each in a
thread). `DockerBackend` is the real one; tests pass a fake whose containers are in-process runner doubles.

Every method raises BackendUnavailable when the backend does not answer and SandboxError when it
refuses. None of them is on the per-task path: a task travels over the socket `attach` returned.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Any, Protocol

POOL_LABEL = "warmpool.pool"
TIER_LABEL = "warmpool.tier"
INSTANCE_LABEL = "warmpool.instance"
OWNER_LABEL = "warmpool.owner"


@dataclass(frozen=True)
class EngineInfo:
    cpus: int
    ram_bytes: int
    runtimes: tuple[str, ...]


@dataclass(frozen=True)
class OurContainer:
    container_id: str
    name: str
    labels: dict[str, str]


class ContainerBackend(Protocol):
    """A container engine as the pool uses it."""

    def ping(self) -> None: ...

    def info(self) -> EngineInfo: ...

    def image_labels(self, image: str) -> dict[str, str] | None:
        """The image's labels, or None when the image is absent."""
        ...

    def create(self, *, image: str, name: str, labels: dict[str, str], host_options: dict[str, Any]) -> str:
        """Create (not start) a container with stdin open; `host_options` come from `sandbox_spec`."""
        ...

    def attach(self, container_id: str) -> socket.socket:
        """The container's stdin and (multiplexed) stdout, as a non-blocking socket the caller owns."""
        ...

    def start(self, container_id: str) -> None: ...

    def remove(self, container_id: str) -> None:
        """Force-remove; a container that is already gone is fine."""
        ...

    def list_ours(self, extra_label: str | None = None) -> list[OurContainer]:
        """Every container carrying our pool label (and `key=value`, when given), running or not."""
        ...

    def oom_killed(self, container_id: str, wait_s: float) -> bool:
        """Whether the kernel's OOM killer ended the container (waiting at most `wait_s` for its exit)."""
        ...

    def error_counts(self) -> dict[str, int]:
        """Failed calls since start, by operation."""
        ...

    def close(self) -> None: ...
