"""The host capacity ledger: tiers never hold more cpu, memory or GPUs than the host has (pure)."""

from __future__ import annotations

from dataclasses import dataclass

from pool.model.errors import CapacityError, InvalidRequest
from pool.model.resources import Resources, format_bytes
from pool.model.snapshots import CapacitySnapshot


@dataclass(frozen=True)
class HostInventory:
    """What the host offers to sandboxes, after the reserve kept for the host itself."""

    cpus: float
    ram_bytes: int
    gpu_ids: tuple[str, ...] = ()
    cpu_overcommit: float = 1.0

    @property
    def cpu_budget(self) -> float:
        """CPU quotas may be overcommitted (they are shares of time); memory never is."""
        return self.cpus * self.cpu_overcommit


class CapacityLedger:
    """Counts what live containers hold; a container is created only after its reservation."""

    def __init__(self, inventory: HostInventory) -> None:
        self.inventory = inventory
        self.cpu_held = 0.0
        self.ram_held_bytes = 0
        self.gpus_free: list[str] = list(inventory.gpu_ids)

    def snapshot(self) -> CapacitySnapshot:
        inventory = self.inventory
        return CapacitySnapshot(cpus=inventory.cpus, cpu_overcommit=inventory.cpu_overcommit,
                                cpu_budget=inventory.cpu_budget, cpu_held=self.cpu_held,
                                ram_bytes=inventory.ram_bytes, ram_held_bytes=self.ram_held_bytes,
                                gpu_ids=inventory.gpu_ids, gpus_free=tuple(sorted(self.gpus_free)))

    def check_fits(self, resources: Resources, count: int = 1) -> None:
        """Raise CapacityError naming the dimension when `count` more containers would not fit."""
        cpu_after = self.cpu_held + resources.cpu * count
        ram_after = self.ram_held_bytes + resources.ram_bytes * count
        if ram_after > self.inventory.ram_bytes:
            raise CapacityError(
                f"memory: {format_bytes(ram_after)} would exceed the host's {format_bytes(self.inventory.ram_bytes)}")
        if cpu_after > self.inventory.cpu_budget + 1e-9:
            raise CapacityError(
                f"cpu: {cpu_after:g} would exceed the host's budget of {self.inventory.cpu_budget:g} "
                f"({self.inventory.cpus:g} cpus x overcommit {self.inventory.cpu_overcommit:g})")
        if resources.gpu * count > len(self.gpus_free):
            raise CapacityError(f"gpu: {resources.gpu * count} wanted, {len(self.gpus_free)} free")

    def room_for(self, resources: Resources) -> int:
        """How many more containers of this size the ledger could hold now."""
        limits = [(self.inventory.ram_bytes - self.ram_held_bytes) // max(1, resources.ram_bytes)]
        if resources.cpu > 0:
            limits.append(int((self.inventory.cpu_budget - self.cpu_held + 1e-9) // resources.cpu))
        if resources.gpu > 0:
            limits.append(len(self.gpus_free) // resources.gpu)
        return max(0, min(limits))

    def reserve(self, resources: Resources) -> tuple[str, ...]:
        """Hold one container's resources; returns the GPU ids it gets. Raises CapacityError."""
        self.check_fits(resources)
        self.cpu_held += resources.cpu
        self.ram_held_bytes += resources.ram_bytes
        gpu_ids = tuple(self.gpus_free[: resources.gpu])
        del self.gpus_free[: resources.gpu]
        return gpu_ids

    def release(self, resources: Resources, gpu_ids: tuple[str, ...] = ()) -> None:
        self.cpu_held = max(0.0, self.cpu_held - resources.cpu)
        self.ram_held_bytes = max(0, self.ram_held_bytes - resources.ram_bytes)
        self.gpus_free.extend(gpu_ids)

    def check_plan(self, plan: list[tuple[Resources, int]]) -> None:
        """Raise CapacityError when holding `count` containers of each entry at once would not fit."""
        check_plan(self.inventory, plan)


def check_plan(inventory: HostInventory, plan: list[tuple[Resources, int]]) -> None:
    """Raise CapacityError naming the dimension when `count` containers of each entry would not fit at once."""
    cpu = sum(r.cpu * n for r, n in plan)
    ram = sum(r.ram_bytes * n for r, n in plan)
    gpus = sum(r.gpu * n for r, n in plan)
    if ram > inventory.ram_bytes:
        raise CapacityError(f"memory: {format_bytes(ram)} needed, the host offers {format_bytes(inventory.ram_bytes)}")
    if cpu > inventory.cpu_budget + 1e-9:
        raise CapacityError(f"cpu: {cpu:g} needed, the host's budget is {inventory.cpu_budget:g}")
    if gpus > len(inventory.gpu_ids):
        raise CapacityError(f"gpu: {gpus} needed, the host has {len(inventory.gpu_ids)}")


def check_size_range(current: tuple[int, int], min_idle: int | None, max_size: int | None) -> None:
    """Raise InvalidRequest unless 0 <= min_idle <= max_size and max_size >= 1 once applied over `current`
    (the tier's (min_idle, max_size) now)."""
    new_min = current[0] if min_idle is None else min_idle
    new_max = current[1] if max_size is None else max_size
    if new_max < 1:
        raise InvalidRequest("max_size", f"must be at least 1, got {new_max}")
    if not 0 <= new_min <= new_max:
        raise InvalidRequest("min_idle", f"must be between 0 and max_size ({new_max}), got {new_min}")


def check_sizes(inventory: HostInventory, tier_name: str, resources: Resources, current: tuple[int, int],
                min_idle: int | None, max_size: int | None, others: list[tuple[Resources, int]]) -> None:
    """Raise InvalidRequest for sizes that make no sense, CapacityError for sizes the host cannot hold.

    `current` is the tier's (min_idle, max_size) now; `others` the other tiers' resources and min_idle. A
    tier's new min_idle or max_size must fit the host alongside every other tier's min_idle: the sizes an
    operator sets are then reachable, whatever the other tiers' demand.
    """
    check_size_range(current, min_idle, max_size)
    for name, count in (("min_idle", min_idle), ("max_size", max_size)):
        if count is None:
            continue
        try:
            check_plan(inventory, [(resources, count), *others])
        except CapacityError as exc:
            raise CapacityError(f"{name}={count} for tier {tier_name!r} does not fit the host alongside "
                                f"the other tiers' min_idle: {exc}") from None
