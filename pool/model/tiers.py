"""Resource tiers and nearest-fit mapping of a request onto them (pure: no I/O)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pool.model.errors import InvalidRequest, NoTierFits
from pool.model.resources import ResourceRequest, Resources, format_bytes, parse_bytes, parse_count, parse_number

MIB = 1024 ** 2
GIB = 1024 ** 3
DEFAULT_IMAGE = "python"


# Tasks a container serves before it is replaced (each draws 75-100% of it: lifecycle.WEAR_SPREAD). Every
# task runs in a fresh fork of a pristine template and every reuse is verified clean, so this bounds only
# the runner's own drift, and none was seen: over 10,000 hello tasks in one container PID 1's RSS grew
# 13.3 -> 14.0 MiB in the first 4,000 and not after, the template's not at all, open fds not at all. A
# replacement is a `docker run` (0.44 s here), and while one starts a sequential client's p99 went from 9
# to 23 ms: at 1,000 uses, replacements came every few seconds under load and made the open loop's slow
# bursts (benchmarks/RESULTS.md, "Open loop tail").
DEFAULT_MAX_USES = 10_000


@dataclass(frozen=True)
class Tier:
    """A class of identical warm containers; the pool keeps between min_idle and max_size of them."""

    name: str
    resources: Resources
    min_idle: int = 1
    max_size: int = 8
    runtime: str = "runc"
    pids_limit: int = 128
    max_uses: int = DEFAULT_MAX_USES
    max_age_s: float = 3600.0
    image: str = DEFAULT_IMAGE  # the name of the sandbox image its containers run (pool/model/images.py)

    def sort_key(self) -> tuple[int, int, float, int, str]:
        """Smaller tiers first: GPUs are the scarcest, then memory, cpu, storage."""
        r = self.resources
        return (r.gpu, r.ram_bytes, r.cpu, r.storage_bytes, self.name)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "image": self.image, **self.resources.as_dict(), "runtime": self.runtime,
                "min_idle": self.min_idle, "max_size": self.max_size}


def default_tiers() -> tuple[Tier, ...]:
    """Tiers that fit a 2-core, 24 GiB host and serve the seed's examples, on both built-in images.

    Memory is never overcommitted: at max_size they hold 2 + 4 + 4 + 2 = 12 GiB. CPU quotas (32 at max_size)
    are shares of time, so they fit the default overcommit of 16 on two cores; `large` gave two of its
    four containers to `datascience` for that. The `datascience` tier has 1 GiB: its idle interpreter
    alone holds ~80 MiB (numpy, pandas, scipy, matplotlib imported).
    """
    return (
        Tier("nano", Resources(cpu=0.5, gpu=0, ram_bytes=128 * MIB, storage_bytes=128 * MIB),
             min_idle=4, max_size=16, pids_limit=64),
        Tier("small", Resources(cpu=2.0, gpu=0, ram_bytes=512 * MIB, storage_bytes=1 * GIB),
             min_idle=2, max_size=8),
        Tier("large", Resources(cpu=2.0, gpu=0, ram_bytes=2 * GIB, storage_bytes=2 * GIB),
             min_idle=1, max_size=2, pids_limit=256),
        Tier("datascience", Resources(cpu=2.0, gpu=0, ram_bytes=1 * GIB, storage_bytes=1 * GIB),
             min_idle=1, max_size=2, pids_limit=256, image="datascience"),
    )


def tier_from_dict(raw: dict[str, Any], index: int) -> Tier:
    """One tier from a tiers file entry; sizes take the same units as requests."""
    where = f"tiers[{index}]"
    known = {"name", "cpu", "gpu", "ram", "storage", "min_idle", "max_size", "runtime", "pids_limit",
             "max_uses", "max_age_s", "image"}
    unknown = set(raw) - known
    if unknown:
        raise InvalidRequest(where, f"unknown keys {sorted(unknown)}; known: {sorted(known)}")
    if not isinstance(raw.get("name"), str) or not raw["name"]:
        raise InvalidRequest(f"{where}.name", "a non-empty string is required")
    if not isinstance(raw.get("image", DEFAULT_IMAGE), str):
        raise InvalidRequest(f"{where}.image", "the name of an image (see GET /v1/images), e.g. 'datascience'")
    tier = Tier(
        name=raw["name"],
        resources=Resources(
            cpu=parse_number(f"{where}.cpu", raw.get("cpu", 1), allow_zero=False),
            gpu=_whole_gpus(f"{where}.gpu", raw.get("gpu", 0)),
            ram_bytes=parse_bytes(f"{where}.ram", raw.get("ram", "256MiB")),
            storage_bytes=parse_bytes(f"{where}.storage", raw.get("storage", "256MiB")),
        ),
        min_idle=parse_count(f"{where}.min_idle", raw.get("min_idle", 1)),
        max_size=parse_count(f"{where}.max_size", raw.get("max_size", 8)),
        runtime=str(raw.get("runtime", "runc")),
        pids_limit=parse_count(f"{where}.pids_limit", raw.get("pids_limit", 128)),
        max_uses=parse_count(f"{where}.max_uses", raw.get("max_uses", DEFAULT_MAX_USES)),
        max_age_s=parse_number(f"{where}.max_age_s", raw.get("max_age_s", 3600.0), allow_zero=False),
        image=raw.get("image", DEFAULT_IMAGE),
    )
    validate_tier(tier, where)
    return tier


def _whole_gpus(field: str, value: Any) -> int:
    if parse_number(field, value, allow_zero=True) % 1:
        raise InvalidRequest(field, f"a tier holds whole GPUs, got {value!r}")
    return parse_count(field, value)


def validate_tier(tier: Tier, where: str) -> None:
    if not 0 <= tier.min_idle <= tier.max_size:
        raise InvalidRequest(f"{where}.min_idle", "must be between 0 and max_size")
    if tier.max_size < 1:
        raise InvalidRequest(f"{where}.max_size", "must be at least 1")
    if tier.resources.ram_bytes < 32 * MIB:
        raise InvalidRequest(f"{where}.ram", "must be at least 32MiB (the runner needs ~10 MiB)")
    if tier.pids_limit < 8:
        raise InvalidRequest(f"{where}.pids_limit", "must be at least 8")


def load_tiers_file(path: str | Path) -> tuple[Tier, ...]:
    """Tiers from a JSON file: ``{"tiers": [{"name": "nano", "cpu": 0.5, "ram": "128MiB", ...}]}``."""
    return tiers_from_config(json.loads(Path(path).read_text()), str(path))


def tiers_from_config(raw: Any, path: str) -> tuple[Tier, ...]:
    """Tiers from a tiers file's parsed JSON (`path` names it in errors)."""
    entries = raw.get("tiers") if isinstance(raw, dict) else raw
    if not isinstance(entries, list) or not entries:
        raise InvalidRequest("tiers", f"{path}: expected a non-empty list under 'tiers'")
    tiers = tuple(tier_from_dict(entry, i) for i, entry in enumerate(entries))
    names = [t.name for t in tiers]
    if len(set(names)) != len(names):
        raise InvalidRequest("tiers", f"{path}: tier names must be unique, got {names}")
    return tiers


def sorted_tiers(tiers: tuple[Tier, ...]) -> tuple[Tier, ...]:
    return tuple(sorted(tiers, key=Tier.sort_key))


def fit_tier(tiers: tuple[Tier, ...], request: ResourceRequest, image: str = DEFAULT_IMAGE) -> Tier:
    """The smallest tier of `image` whose every dimension covers the request, or NoTierFits naming why.

    The caller has checked that `image` is one the service knows; a known image no tier serves is a
    NoTierFits on `image`."""
    wanted = request.as_minimum()
    of_image = tuple(tier for tier in tiers if tier.image == image)
    if not of_image:
        served = sorted({tier.image for tier in tiers})
        raise NoTierFits("image", f"no tier serves image {image!r}; the tiers serve {served}")
    for tier in sorted_tiers(of_image):
        if tier.resources.covers(wanted):
            return tier
    raise _no_fit(of_image, wanted)


def _no_fit(tiers: tuple[Tier, ...], wanted: Resources) -> NoTierFits:
    """Name the first dimension that no tier reaches, with the most any tier offers."""
    def size(value: float) -> str:
        return format_bytes(int(value))

    def number(value: float) -> str:
        return f"{value:g}"

    dimensions: tuple[tuple[str, float, float, Callable[[float], str]], ...] = (
        ("gpu", wanted.gpu, max(t.resources.gpu for t in tiers), number),
        ("ram", wanted.ram_bytes, max(t.resources.ram_bytes for t in tiers), size),
        ("cpu", wanted.cpu, max(t.resources.cpu for t in tiers), number),
        ("storage", wanted.storage_bytes, max(t.resources.storage_bytes for t in tiers), size),
    )
    for name, asked, most, show in dimensions:
        if asked > most:
            if name == "gpu" and most == 0:
                return NoTierFits(f"resources.{name}", f"asked for {asked} GPU(s) but this service has no GPU tier")
            return NoTierFits(f"resources.{name}", f"asked for {show(asked)} but the largest tier offers {show(most)}")
    return NoTierFits("resources", "no single tier covers every dimension of the request; see GET /v1/tiers")
