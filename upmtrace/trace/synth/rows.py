"""Columnar event building: rows as numpy columns, laid out by position, made into one table.

A workload is a `Script` of phases. A `Phase` is a set of groups (a PSC request with the faults
that follow it, one DMA transfer, ...) that stay together in replay order; each group is the same
fixed sequence of segments, any of which may be empty for a given group. Groups are ordered by a
key, so two phases can be merged (interleaved) without sorting a single row. Rows are placed by
computed position into preallocated columns: generation is O(rows) and builds no Python object
per row.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from upmtrace.trace.schema import MSR_REQ, PAGE_SHIFT, SCHEMA, Kind, PscOp

KINDS: tuple[str, ...] = tuple(k.value for k in Kind)
OPS: tuple[str, ...] = tuple(o.value for o in PscOp)
AGENTS: tuple[str, ...] = ("vmm", "virtio", "kvmclock", "ghcb")

# Working dtype of each column and the value that stands for null in it. Booleans are int8 with
# -1 = null; dictionary columns hold codes with -1 = null; `gap` (ns since the previous row)
# becomes `ts` at the end. vcpu is never null: host/VMM events carry -1.
DTYPES: dict[str, type] = {
    "gap": np.int64, "kind": np.int8, "vcpu": np.int32, "gpa": np.uint64, "size": np.uint64,
    "private": np.int8, "write": np.int8, "slot": np.int32, "gmem": np.int8, "req": np.int64,
    "op": np.int8, "agent": np.int8,
}
FILL: dict[str, int] = {
    "gap": 0, "kind": -1, "vcpu": -1, "gpa": 0, "size": np.iinfo(np.uint64).max,
    "private": -1, "write": -1, "slot": np.iinfo(np.int32).min, "gmem": -1,
    "req": np.iinfo(np.int64).min, "op": -1, "agent": -1,
}

Column = np.ndarray | int | bool


@dataclass(frozen=True)
class Rows:
    """n rows of one kind; each column a scalar (broadcast) or an array of length n."""

    n: int
    cols: dict[str, Column]


def rows(kind: Kind, gfn: Column, n: int | None = None, **cols: Column) -> Rows:
    """Rows of `kind` at guest frames `gfn`; op and agent given by name, everything else raw."""
    if n is None:
        n = np.size(gfn)
    out: dict[str, Column] = {"kind": KINDS.index(kind.value), "gpa": _gpa(gfn)}
    for name, value in cols.items():
        if name == "op":
            value = OPS.index(PscOp(value).value)
        elif name == "agent":
            value = AGENTS.index(value)
        out[name] = value
    return Rows(n, out)


def _gpa(gfn: Column) -> Column:
    if isinstance(gfn, np.ndarray):
        return gfn.astype(np.uint64) << np.uint64(PAGE_SHIFT)
    return int(gfn) << PAGE_SHIFT


@dataclass
class Phase:
    """Groups of rows that stay together, laid out in ascending key order (ties keep index
    order). Segment s holds the rows of every group for that step, group by group."""

    keys: np.ndarray
    think: np.ndarray | None = None  # extra ns before each group's first row
    segments: list[tuple[Rows, np.ndarray]] = field(default_factory=list)

    @classmethod
    def single(cls, *parts: Rows) -> Phase:
        """One group made of `parts` in order."""
        phase = cls(np.zeros(1))
        for part in parts:
            phase.add(part, np.array([part.n]))
        return phase

    @property
    def groups(self) -> int:
        return len(self.keys)

    @property
    def n(self) -> int:
        return sum(r.n for r, _ in self.segments)

    def add(self, part: Rows, lengths: np.ndarray) -> Phase:
        lengths = np.asarray(lengths, dtype=np.int64)
        assert len(lengths) == self.groups and int(lengths.sum()) == part.n
        self.segments.append((part, lengths))
        return self

    def layout(self) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
        """(first row and row count of each group, row positions of each segment), relative
        to the phase's first row."""
        per_group = np.zeros(self.groups, dtype=np.int64)
        for _, lengths in self.segments:
            per_group += lengths
        order = np.argsort(self.keys, kind="stable")
        start = np.empty(self.groups, dtype=np.int64)
        start[order] = np.cumsum(per_group[order]) - per_group[order]
        positions = []
        offset = start.copy()
        for _, lengths in self.segments:
            positions.append(spread(offset, lengths))
            offset += lengths
        return start, per_group, positions


def spread(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of arange(s, s + l) for each (s, l): the positions of runs."""
    lengths = np.asarray(lengths, dtype=np.int64)
    total = int(lengths.sum())
    run_start = np.cumsum(lengths) - lengths
    return np.repeat(np.asarray(starts, dtype=np.int64) - run_start, lengths) + np.arange(total)


def merge(*phases: Phase) -> Phase:
    """Interleave phases by their group keys (ties: earlier phase first)."""
    total = sum(p.groups for p in phases)
    merged = Phase(np.concatenate([p.keys for p in phases]).astype(np.float64))
    if any(p.think is not None for p in phases):
        merged.think = np.concatenate(
            [p.think if p.think is not None else np.zeros(p.groups, np.int64) for p in phases])
    before = 0
    for phase in phases:
        for part, lengths in phase.segments:
            padded = np.zeros(total, dtype=np.int64)
            padded[before:before + phase.groups] = lengths
            merged.segments.append((part, padded))
        before += phase.groups
    return merged


class Script:
    """The phases of a workload in replay order."""

    def __init__(self) -> None:
        self.phases: list[Phase] = []

    def add(self, *parts: Phase | Rows) -> Script:
        for part in parts:
            self.phases.append(part if isinstance(part, Phase) else Phase.single(part))
        return self

    def table(self) -> pa.Table:
        n = sum(p.n for p in self.phases)
        cols = {name: np.full(n, FILL[name], dtype=dtype) for name, dtype in DTYPES.items()}
        base = 0
        for phase in self.phases:
            start, per_group, positions = phase.layout()
            for (part, _), pos in zip(phase.segments, positions, strict=True):
                for name, value in part.cols.items():
                    cols[name][base + pos] = value
            if phase.think is not None:
                used = per_group > 0
                cols["gap"][base + start[used]] += phase.think[used]
            base += phase.n
        number_requests(cols)
        return to_table(cols)


def number_requests(cols: dict[str, np.ndarray]) -> None:
    """Turn the unique serials generators put in `req` into ids counting up per vCPU."""
    at = np.flatnonzero((cols["kind"] == KINDS.index(Kind.PSC.value)) & (cols["req"] != MSR_REQ))
    if len(at) == 0:
        return
    serial = cols["req"][at]
    first = np.ones(len(at), dtype=bool)
    first[1:] = serial[1:] != serial[:-1]
    request = np.cumsum(first) - 1
    vcpu = cols["vcpu"][at][first]
    order = np.argsort(vcpu, kind="stable")
    sorted_vcpu = vcpu[order]
    group_start = np.flatnonzero(np.r_[True, sorted_vcpu[1:] != sorted_vcpu[:-1]])
    rank = np.arange(len(order)) - np.repeat(group_start, np.diff(np.r_[group_start, len(order)]))
    ids = np.empty(len(order), dtype=np.int64)
    ids[order] = rank
    cols["req"][at] = ids[request]


def _dictionary(codes: np.ndarray, values: tuple[str, ...]) -> pa.DictionaryArray:
    indices = pa.array(codes, type=pa.int8(), mask=codes < 0)
    return pa.DictionaryArray.from_arrays(indices, pa.array(values, type=pa.string()))


def _bools(col: np.ndarray) -> pa.Array:
    return pa.array(col == 1, type=pa.bool_(), mask=col < 0)


def _nullable(col: np.ndarray, name: str, type_: pa.DataType) -> pa.Array:
    return pa.array(col, type=type_, mask=col == FILL[name])


def to_table(cols: dict[str, np.ndarray]) -> pa.Table:
    ts = np.cumsum(cols["gap"])
    if len(ts):
        ts -= ts[0]
    arrays = {
        "ts": pa.array(ts, type=pa.int64()),
        "kind": _dictionary(cols["kind"], KINDS),
        "vcpu": pa.array(cols["vcpu"], type=pa.int32()),
        "gpa": pa.array(cols["gpa"], type=pa.uint64()),
        "size": _nullable(cols["size"], "size", pa.uint64()),
        "private": _bools(cols["private"]),
        "write": _bools(cols["write"]),
        "slot": _nullable(cols["slot"], "slot", pa.int32()),
        "gmem": _bools(cols["gmem"]),
        "req": _nullable(cols["req"], "req", pa.int64()),
        "op": _dictionary(cols["op"], OPS),
        "agent": _dictionary(cols["agent"], AGENTS),
        "latency": pa.nulls(len(ts), pa.int64()),  # nothing was recorded
    }
    return pa.Table.from_arrays([arrays[name] for name in SCHEMA.names], schema=SCHEMA)


def iter_runs(gfns: np.ndarray) -> Iterator[tuple[int, int]]:
    """(first gfn, pages) of each run of consecutive values in a sorted gfn array."""
    if len(gfns) == 0:
        return
    breaks = np.flatnonzero(np.diff(gfns) != 1) + 1
    for chunk in np.split(gfns, breaks):
        yield int(chunk[0]), len(chunk)
