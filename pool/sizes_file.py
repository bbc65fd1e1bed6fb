"""The optional pool sizes file (`WARMPOOL_POOL_SIZES_FILE`): admin resizes that outlive a restart.

Without it, a resize through the admin API lasts until the service stops. With it, every resize rewrites
the file (atomically) and the next start applies it over the tiers' configured sizes::

    {"tiers": {"small": {"min_idle": 3, "max_size": 8}}}

Reading happens once, with the other settings; writing blocks, so callers run it in a thread.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path

from pool.model.errors import InvalidRequest
from pool.model.tiers import Tier, validate_tier

Sizes = dict[str, dict[str, int]]


def load_sizes(path: str | Path) -> Sizes:
    """Sizes by tier name; a file that does not exist yet means none."""
    try:
        raw = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise InvalidRequest("WARMPOOL_POOL_SIZES_FILE", f"{path}: cannot be read: {exc}") from exc
    entries = raw.get("tiers") if isinstance(raw, dict) else None
    if not isinstance(entries, dict):
        raise InvalidRequest("WARMPOOL_POOL_SIZES_FILE", f"{path}: expected {{\"tiers\": {{name: sizes}}}}")
    sizes: Sizes = {}
    for name, entry in entries.items():
        if not isinstance(entry, dict) or set(entry) - {"min_idle", "max_size"}:
            raise InvalidRequest("WARMPOOL_POOL_SIZES_FILE", f"{path}: tiers.{name} may hold min_idle and max_size")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in entry.values()):
            raise InvalidRequest("WARMPOOL_POOL_SIZES_FILE", f"{path}: tiers.{name}: sizes must be integers")
        sizes[str(name)] = dict(entry)
    return sizes


def apply_sizes(tiers: tuple[Tier, ...], sizes: Sizes) -> tuple[Tier, ...]:
    """The tiers with saved sizes applied; sizes of tiers no longer configured are ignored."""
    out = []
    for tier in tiers:
        if tier.name in sizes:
            saved = sizes[tier.name]
            tier = dataclasses.replace(tier, min_idle=saved.get("min_idle", tier.min_idle),
                                       max_size=saved.get("max_size", tier.max_size))
            validate_tier(tier, f"WARMPOOL_POOL_SIZES_FILE: tiers.{tier.name}")
        out.append(tier)
    return tuple(out)


def save_sizes(path: str | Path, sizes: Sizes) -> None:
    """Write the sizes atomically (a reader sees the old file or the new one, never half of one)."""
    target = Path(path)
    text = json.dumps({"tiers": sizes}, indent=2, sort_keys=True) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent or ".")
    try:
        with os.fdopen(fd, "w") as out:
            out.write(text)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
