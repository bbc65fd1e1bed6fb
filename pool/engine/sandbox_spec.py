"""The hardened container configuration of a tier (pure: builds arguments, starts nothing).

Security defaults for every container (README, Security): no network, read-only root, scratch capped at the
tier's storage (a filesystem of its own on disk, see scratch.py, or a tmpfs), every capability dropped but
the three the runner needs to drop to the sandbox uid and to kill its leftovers, no-new-privileges, Docker's
default seccomp, a pids limit, memory equal to memory+swap, a cpu quota, ulimits, an empty environment, no
mount but that scratch, no logging. The cpu quota's period is a setting (pool/model/cpu_quota.py).
"""

from __future__ import annotations

import os
import socket
from typing import Any

from pool.engine.backend import INSTANCE_LABEL, OWNER_LABEL, POOL_LABEL, TIER_LABEL
from pool.engine.docker_backend import gpu_device_requests, no_logging, scratch_bind, ulimits
from pool.model import cpu_quota
from pool.model.tiers import Tier

RUNNER_CAPABILITIES = ("SETUID", "SETGID", "KILL")
SCRATCH_TARGET = "/tmp"  # the work dir and HOME are made in it per task, and /var/tmp links to it
SHM_CAP_BYTES = 64 * 1024 * 1024
# Under gVisor the host's pids cgroup counts the sandbox kernel's own threads (the Sentry's Go runtime and,
# on the ptrace platform, a traced host thread per task thread), not the task's processes: ~40 idle, and
# a fork bomb drove it past 1,800 in 4 s (Go keeps idle threads). At the limit the Sentry cannot start a
# thread and the whole container dies. So the host limit sits above Go's own cap of 10,000 threads, as a
# backstop only, and the tier's pids_limit is enforced inside the sandbox (RLIMIT_NPROC, `task_nproc_limit`).
SENTRY_THREADS_ALLOWANCE = 10_000


def owner_token(pid: int | None = None) -> str:
    """``host:pid:start`` naming the live process that owns a container (start time defeats pid reuse)."""
    pid = os.getpid() if pid is None else pid
    return f"{socket.gethostname()}:{pid}:{process_start_ticks(pid)}"


def process_start_ticks(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            fields = stat.read().rsplit(b")", 1)[1].split()
        return fields[19].decode()  # field 22 of stat: start time in clock ticks since boot
    except (OSError, IndexError):
        return "gone"


def owner_is_alive(token: str) -> bool | None:
    """True/False for an owner on this host; None when it lives on another host (not ours to judge)."""
    try:
        host, pid_text, start = token.rsplit(":", 2)
        pid = int(pid_text)
    except ValueError:
        return False
    if host != socket.gethostname():
        return None
    return process_start_ticks(pid) == start


def labels_for(tier: Tier, instance_id: str, owner: str) -> dict[str, str]:
    return {POOL_LABEL: instance_id, TIER_LABEL: tier.name, INSTANCE_LABEL: instance_id, OWNER_LABEL: owner}


def host_pids_limit(tier: Tier) -> int:
    """The pids cgroup limit of the container: the tier's own under runc, plus the Sentry's threads otherwise."""
    return tier.pids_limit if tier.runtime == "runc" else tier.pids_limit + SENTRY_THREADS_ALLOWANCE


def task_nproc_limit(tier: Tier) -> int:
    """RLIMIT_NPROC for the task, 0 for none: only where the count is the sandbox's own (not runc's shared
    kernel, where it would count the sandbox uid's processes in every container on the host)."""
    return 0 if tier.runtime == "runc" else tier.pids_limit


def host_config_kwargs(tier: Tier, *, nofile_limit: int, gpu_ids: tuple[str, ...] = (),
                       scratch_dir: str | None = None,
                       cpu_period_us: int = cpu_quota.DEFAULT_PERIOD_US) -> dict[str, Any]:
    """Keyword arguments for docker-py's ``create_host_config`` for one container of `tier`: its scratch is
    `scratch_dir` (a filesystem of the tier's storage, mounted nosuid,nodev,noexec by scratch.py) when
    given, else a tmpfs of that size."""
    storage_bytes = tier.resources.storage_bytes
    period_us, quota_us = cpu_quota.cfs_quota(tier.resources.cpu, cpu_period_us)
    scratch: dict[str, Any] = (
        {"mounts": [scratch_bind(scratch_dir, SCRATCH_TARGET)]} if scratch_dir is not None
        else {"tmpfs": {SCRATCH_TARGET: f"rw,nosuid,nodev,noexec,size={storage_bytes},mode=1777"}})
    kwargs: dict[str, Any] = {
        "network_mode": "none",
        "read_only": True,
        **scratch,
        "shm_size": min(storage_bytes, SHM_CAP_BYTES),
        "cap_drop": ["ALL"],
        "cap_add": list(RUNNER_CAPABILITIES),
        "security_opt": ["no-new-privileges"],
        "pids_limit": host_pids_limit(tier),
        "mem_limit": tier.resources.ram_bytes,
        "memswap_limit": tier.resources.ram_bytes,
        "cpu_period": period_us,  # Docker takes these or nano_cpus (always 100 ms), not both
        "cpu_quota": quota_us,
        "ulimits": ulimits(nofile_limit, storage_bytes),
        "log_config": no_logging(),
        "ipc_mode": "private",
        "privileged": False,
    }
    if tier.runtime != "runc":
        kwargs["runtime"] = tier.runtime
    if gpu_ids:
        kwargs["device_requests"] = gpu_device_requests(gpu_ids)
    return kwargs
