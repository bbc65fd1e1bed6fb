"""What the host offers to sandboxes: cpus, memory and GPUs, less a reserve kept for the host itself.

GPUs come from `WARMPOOL_GPU_IDS` when declared (an operator's choice, and how tests declare a GPU
inventory on a machine without one), else from ``nvidia-smi -L``: each GPU's UUID, or the UUIDs of its
MIG devices when it is partitioned. Docker hands a container exactly these ids as device requests, so
the ledger can give each GPU to one container at a time.
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess

from pool.engine.backend import EngineInfo
from pool.model.capacity import HostInventory
from pool.model.errors import NoTierFits
from pool.model.resources import format_bytes
from pool.model.tiers import Tier
from pool.settings import Settings

log = logging.getLogger(__name__)

NVIDIA_SMI_TIMEOUT_S = 10.0
_GPU_LINE = re.compile(r"^GPU\s+\d+:.*\(UUID:\s*(GPU-[^)\s]+)\)")
_MIG_LINE = re.compile(r"^\s+MIG\b.*\(UUID:\s*(MIG-[^)\s]+)\)")


def parse_gpu_list(text: str) -> tuple[str, ...]:
    """Device ids from ``nvidia-smi -L`` output: a GPU's UUID, replaced by its MIG devices' when it has any."""
    ids: list[str] = []
    gpu: str | None = None
    migs: list[str] = []
    for line in text.splitlines():
        if (found := _GPU_LINE.match(line)) is not None:
            if gpu is not None:
                ids.extend(migs or [gpu])
            gpu, migs = found.group(1), []
        elif (found := _MIG_LINE.match(line)) is not None and gpu is not None:
            migs.append(found.group(1))
    if gpu is not None:
        ids.extend(migs or [gpu])
    return tuple(ids)


def detect_gpu_ids() -> tuple[str, ...]:
    """The GPUs ``nvidia-smi -L`` lists; none when the tool is absent or fails (blocking: run in a thread)."""
    tool = shutil.which("nvidia-smi")
    if tool is None:
        return ()
    try:
        listed = subprocess.run([tool, "-L"], capture_output=True, text=True, timeout=NVIDIA_SMI_TIMEOUT_S,
                                check=True)
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("nvidia-smi -L failed, assuming no GPUs: %s", exc)
        return ()
    return parse_gpu_list(listed.stdout)


def host_inventory(settings: Settings, engine: EngineInfo, detected_gpu_ids: tuple[str, ...]) -> HostInventory:
    """The engine's cpus and memory less the host reserve (declared sizes are taken as given), and the GPUs."""
    cpus = settings.host_cpus if settings.host_cpus is not None else engine.cpus - settings.host_reserve_cpus
    if settings.host_ram_bytes is not None:
        ram_bytes = settings.host_ram_bytes
    else:
        ram_bytes = engine.ram_bytes - settings.host_reserve_ram_bytes
    return HostInventory(cpus=max(0.0, float(cpus)), ram_bytes=max(0, ram_bytes),
                         gpu_ids=settings.gpu_ids or detected_gpu_ids, cpu_overcommit=settings.cpu_overcommit)


def unfit_reason(inventory: HostInventory, tier: Tier) -> NoTierFits | None:
    """Why not even one container of the tier can ever run on this host, naming the dimension; else None."""
    r = tier.resources
    if r.gpu > len(inventory.gpu_ids):
        return NoTierFits("resources.gpu", f"tier {tier.name!r} needs {r.gpu} GPU(s) but this host has "
                                           f"{len(inventory.gpu_ids)}")
    if r.ram_bytes > inventory.ram_bytes:
        return NoTierFits("resources.ram", f"tier {tier.name!r} needs {format_bytes(r.ram_bytes)} but this host "
                                           f"offers {format_bytes(inventory.ram_bytes)}")
    if r.cpu > inventory.cpu_budget + 1e-9:
        return NoTierFits("resources.cpu", f"tier {tier.name!r} needs {r.cpu:g} cpus but this host's budget is "
                                           f"{inventory.cpu_budget:g}")
    return None
