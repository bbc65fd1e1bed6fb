"""Parsing of the resources a request asks for (pure: no I/O).

Units follow Docker's own flags: ``K/M/G/T`` with an optional ``B`` and ``KiB/MiB/GiB/TiB`` are all
powers of 1024, so ``"512MB"`` is 512 MiB, as ``docker run --memory 512MB`` reads it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from pool.model.errors import InvalidRequest

_UNIT_POWERS = {"": 0, "b": 0, "k": 1, "m": 2, "g": 3, "t": 4}
# Docker (and the kernel) take sizes as int64; anything larger is no size a host has, and refusing it here
# keeps float('inf') and 400-digit integers out of everything downstream.
MAX_SIZE_BYTES = 2 ** 63 - 1
# GPUs, containers, processes, uses: no count we take is near this, and it keeps messages short.
MAX_COUNT = 2 ** 31 - 1
# A number written with more characters than this is refused before it is converted: float() is linear,
# but there is no reason to convert a megabyte of digits.
MAX_NUMBER_CHARS = 64
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?|\.[0-9]+)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class Resources:
    """An amount of each dimension; a request's or a tier's."""

    cpu: float
    gpu: int
    ram_bytes: int
    storage_bytes: int

    def covers(self, other: Resources) -> bool:
        """True when every dimension of self is at least other's."""
        return (
            self.cpu >= other.cpu
            and self.gpu >= other.gpu
            and self.ram_bytes >= other.ram_bytes
            and self.storage_bytes >= other.storage_bytes
        )

    def as_dict(self) -> dict[str, float | int]:
        return {"cpu": self.cpu, "gpu": self.gpu, "ram_bytes": self.ram_bytes,
                "storage_bytes": self.storage_bytes}


@dataclass(frozen=True)
class ResourceRequest:
    """What a task asks for; a dimension left out is None and any tier covers it."""

    cpu: float | None = None
    gpu: int = 0
    ram_bytes: int | None = None
    storage_bytes: int | None = None

    def as_minimum(self) -> Resources:
        return Resources(cpu=self.cpu or 0.0, gpu=self.gpu, ram_bytes=self.ram_bytes or 0,
                         storage_bytes=self.storage_bytes or 0)


def parse_number(field: str, value: Any, *, allow_zero: bool) -> float:
    """A positive finite number from a number or a numeric string.

    Total: whatever JSON or the environment can hold (a 400-digit integer, ``1e400``, a million digits in
    a string) ends in InvalidRequest naming the field, never OverflowError or ValueError."""
    if isinstance(value, bool):
        raise InvalidRequest(field, f"expected a number, got {value!r}")
    if isinstance(value, str):
        text = value.strip()
        if len(text) > MAX_NUMBER_CHARS:
            raise InvalidRequest(field, f"expected a number, got a string of {len(value)} characters")
        try:
            number = float(text)
        except ValueError:
            raise InvalidRequest(field, f"expected a number, got {value!r}") from None
    elif isinstance(value, int | float):
        try:
            number = float(value)
        except OverflowError:  # an int past float's range: finite in Python, but no quantity we can hold
            raise InvalidRequest(field, f"is too large, got {_short(value)}") from None
    else:
        raise InvalidRequest(field, f"expected a number, got {type(value).__name__}")
    if not math.isfinite(number):
        raise InvalidRequest(field, f"must be a finite number, got {_short(value)}")
    if number < 0 or (number == 0 and not allow_zero):
        raise InvalidRequest(field, f"must be {'at least 0' if allow_zero else 'greater than 0'}, "
                                    f"got {_short(value)}")
    return number


def parse_count(field: str, value: Any, *, minimum: int = 0) -> int:
    """A whole number (an int, an integral float or a numeric string) from `minimum` to MAX_COUNT."""
    number = parse_number(field, value, allow_zero=True)
    if number != int(number):
        raise InvalidRequest(field, f"must be a whole number, got {_short(value)}")
    if not minimum <= number <= MAX_COUNT:
        raise InvalidRequest(field, f"must be from {minimum} to {MAX_COUNT}, got {_short(value)}")
    return int(number)


def _short(value: Any) -> str:
    """The value for a message, cut short: a 400-digit number is shown by its length."""
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:20]}... ({len(text)} characters)"


def parse_bytes(field: str, value: Any) -> int:
    """A byte count from an integer or a string such as ``"512MB"``, ``"1g"``, ``"2GiB"``."""
    if isinstance(value, bool):
        raise InvalidRequest(field, f"expected a size such as '512MB', got {value!r}")
    if isinstance(value, int | float):
        size = parse_number(field, value, allow_zero=False)
        if size != int(size):
            raise InvalidRequest(field, f"a byte count must be whole, got {_short(value)}")
        if size > MAX_SIZE_BYTES:
            raise InvalidRequest(field, f"is too large (at most {MAX_SIZE_BYTES} bytes), got {_short(value)}")
        return int(size)
    if not isinstance(value, str):
        raise InvalidRequest(field, f"expected a size such as '512MB', got {type(value).__name__}")
    match = _SIZE_RE.match(value) if len(value) <= MAX_NUMBER_CHARS else None
    if match is None:
        raise InvalidRequest(
            field, f"cannot read {_short(value)} as a size; use a byte count or K/M/G/T, KB/MB/GB/TB, KiB/MiB/GiB/TiB")
    number_text, prefix, suffix = match.groups()
    if suffix and suffix.lower() == "ib" and not prefix:
        raise InvalidRequest(field, f"cannot read {_short(value)} as a size ('iB' needs K, M, G or T before it)")
    size = float(number_text) * 1024 ** _UNIT_POWERS[prefix.lower()]
    if not math.isfinite(size) or size > MAX_SIZE_BYTES:
        raise InvalidRequest(field, f"is too large (at most {MAX_SIZE_BYTES} bytes), got {_short(value)}")
    if size < 1:
        raise InvalidRequest(field, f"must be greater than 0, got {value!r}")
    return int(size)


def parse_request(raw: dict[str, Any] | None, prefix: str = "resources") -> ResourceRequest:
    """Parse the ``resources`` object of a request; every field is optional."""
    if raw is None:
        return ResourceRequest()
    cpu = raw.get("cpu")
    gpu = raw.get("gpu")
    ram = raw.get("ram")
    storage = raw.get("storage")
    gpu_count = 0 if gpu is None else parse_count(f"{prefix}.gpu", gpu)
    return ResourceRequest(
        cpu=None if cpu is None else parse_number(f"{prefix}.cpu", cpu, allow_zero=False),
        gpu=gpu_count,
        ram_bytes=None if ram is None else parse_bytes(f"{prefix}.ram", ram),
        storage_bytes=None if storage is None else parse_bytes(f"{prefix}.storage", storage),
    )


def format_bytes(size_bytes: int) -> str:
    """Human form of a byte count in powers of 1024, for messages."""
    for unit, power in (("TiB", 4), ("GiB", 3), ("MiB", 2), ("KiB", 1)):
        if size_bytes >= 1024 ** power and size_bytes % (1024 ** power // 1024 or 1) == 0:
            value = size_bytes / 1024 ** power
            return f"{value:g}{unit}"
    return f"{size_bytes}B"
