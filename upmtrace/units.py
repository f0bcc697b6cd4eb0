"""Byte counts in and out: '512M' -> 536870912 -> '512.0 MiB'."""

from __future__ import annotations

_SUFFIX = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}


def parse_bytes(text: str) -> int:
    """'4096', '0x1000', '512M', '1G', '2GiB', '64k' -> bytes (ValueError if not a size)."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = t[-1:] if t[-1:] in _SUFFIX and not t[-1:].isdigit() else ""
    if t.startswith("0X"):
        unit = ""
    number = t[: len(t) - len(unit)] if unit else t
    value = int(number, 0) * _SUFFIX[unit]
    if value < 0:
        raise ValueError(text)
    return value


def human_bytes(n: int | float) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
