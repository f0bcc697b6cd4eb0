"""Recorded exit latencies as compact distributions: exact counts, totals and extremes, and
percentiles exact while few distinct values occur.

A Distribution keeps every distinct latency with its count until EXACT_LIMIT distinct values;
beyond that each value is rounded down to its SIGNIFICANT_BITS leading bits (a relative error
below 1/128), so that memory and the JSON form stay bounded (at most 128 values per power of
two) however long the recording. Count, total, min and max are always exact.

Percentiles use the nearest-rank method: the p-th percentile of n values is the smallest value
v such that at least ceil(p * n / 100) of the values are <= v; it is always a value that
occurred (or, once rounded, the lower edge of its bucket, kept within [min, max]).
"""

from __future__ import annotations

from dataclasses import dataclass, field

EXACT_LIMIT = 1024  # distinct values kept exactly
SIGNIFICANT_BITS = 7


def bucket(value: int, bits: int) -> int:
    """value with only its `bits` leading bits kept (0: value itself)."""
    if not bits or value < 1 << bits:
        return value
    shift = value.bit_length() - bits
    return (value >> shift) << shift


@dataclass
class Distribution:
    count: int = 0
    total: int = 0
    min: int | None = None
    max: int | None = None
    values: dict[int, int] = field(default_factory=dict)  # value (or bucket) -> occurrences
    bits: int = 0  # 0: values exact; else rounded to this many leading bits

    def add(self, value: int, times: int = 1) -> None:
        self.count += times
        self.total += value * times
        self.min = value if self.min is None or value < self.min else self.min
        self.max = value if self.max is None or value > self.max else self.max
        key = bucket(value, self.bits)
        self.values[key] = self.values.get(key, 0) + times
        if not self.bits and len(self.values) > EXACT_LIMIT:
            self.coarsen(SIGNIFICANT_BITS)

    def coarsen(self, bits: int) -> None:
        values: dict[int, int] = {}
        for value, times in self.values.items():
            key = bucket(value, bits)
            values[key] = values.get(key, 0) + times
        self.values, self.bits = values, bits

    def merge(self, other: Distribution) -> None:
        if not other.count:
            return
        if other.bits and not self.bits:
            self.coarsen(other.bits)
        for value, times in other.values.items():
            key = bucket(value, self.bits)
            self.values[key] = self.values.get(key, 0) + times
        self.count += other.count
        self.total += other.total
        self.min = other.min if self.min is None else min(self.min, other.min)
        self.max = other.max if self.max is None else max(self.max, other.max)
        if not self.bits and len(self.values) > EXACT_LIMIT:
            self.coarsen(SIGNIFICANT_BITS)

    def percentile(self, p: float) -> int:
        """Nearest rank (see the module docstring); 0 for an empty distribution."""
        if not self.count:
            return 0
        rank = max(1, -(-p * self.count // 100))
        seen = 0
        for value in sorted(self.values):
            seen += self.values[value]
            if seen >= rank:
                return min(max(value, self.min), self.max)
        return self.max

    def stats(self) -> dict[str, int]:
        """{count, total_ns, min_ns, p50_ns, p95_ns, max_ns} (the report's `timing` entry)."""
        return {"count": self.count, "total_ns": self.total, "min_ns": self.min or 0,
                "p50_ns": self.percentile(50), "p95_ns": self.percentile(95),
                "max_ns": self.max or 0}

    def summary(self) -> dict[str, int]:
        """{count, total_ns, min_ns, max_ns}: what a per-vCPU breakdown keeps."""
        return {"count": self.count, "total_ns": self.total, "min_ns": self.min or 0,
                "max_ns": self.max or 0}

    def to_json(self) -> dict:
        """A tree of counts (valid in a trace's recorded metadata)."""
        return {"count": self.count, "total_ns": self.total, "min_ns": self.min or 0,
                "max_ns": self.max or 0, "bits": self.bits,
                "values": {str(v): n for v, n in sorted(self.values.items())}}

    @classmethod
    def from_json(cls, data: dict) -> Distribution:
        """The inverse of to_json; ValueError when `data` is not one."""
        try:
            values = {int(v): int(n) for v, n in data["values"].items()}
            d = cls(int(data["count"]), int(data["total_ns"]), int(data["min_ns"]),
                    int(data["max_ns"]), values, int(data.get("bits", 0)))
        except (KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"not a latency distribution ({err})") from None
        if d.count != sum(values.values()):
            raise ValueError("latency distribution whose values do not add up to its count")
        if not d.count:
            d.min = d.max = None
        return d


def merged(*parts: Distribution) -> Distribution:
    out = Distribution()
    for part in parts:
        out.merge(part)
    return out
