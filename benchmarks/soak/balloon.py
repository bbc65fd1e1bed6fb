"""A memory balloon: grows in chunks up to a target, never leaving the host less than a floor of available
memory (re-read before every chunk, and while it holds: it lets go at once when others need the room),
holds for a while, then exits. Run: python -m benchmarks.soak.balloon TARGET_BYTES HOLD_S FLOOR_BYTES."""

from __future__ import annotations

import sys
import time
from pathlib import Path

MIB = 1024 ** 2
GIB = 1024 ** 3
CHUNK_BYTES = 64 * MIB


def next_chunk_bytes(available_bytes: int, floor_bytes: int, held_bytes: int, target_bytes: int,
                     chunk_bytes: int = CHUNK_BYTES) -> int:
    """How much to allocate next (0: stop growing): never past the target, never below the floor."""
    room = min(target_bytes - held_bytes, available_bytes - floor_bytes - chunk_bytes)
    return max(0, min(chunk_bytes, room))


def available_bytes(meminfo: str | None = None) -> int:
    text = meminfo if meminfo is not None else Path("/proc/meminfo").read_text()
    for line in text.splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def main(argv: list[str]) -> int:
    target_bytes, hold_s, floor_bytes = int(argv[0]), float(argv[1]), int(argv[2])
    held: list[bytes] = []
    held_bytes = 0
    while (size := next_chunk_bytes(available_bytes(), floor_bytes, held_bytes, target_bytes)) > 0:
        held.append(b"\x01" * size)  # written, so resident (not a lazily zeroed mapping)
        held_bytes += size
    print(f"balloon: holding {held_bytes // MIB} MiB", flush=True)
    deadline = time.monotonic() + hold_s
    while time.monotonic() < deadline:
        if available_bytes() < floor_bytes:
            print("balloon: below the floor, letting go early", flush=True)
            break
        time.sleep(0.2)
    held.clear()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
