"""Validation (docs/format.md) of a SCHEMA table, vectorised; the earliest bad row is reported.

Each rule looks at the whole table and returns its first offending index with a message; the
earliest index wins, and on one row the rule listed first wins. Rules see `kind` and `op` as
codes in the canonical order (cast.FIXED_DICTIONARY), whatever order the table's dictionary
has: a file written by another tool may order its dictionary differently.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from upmtrace.errors import TraceError
from upmtrace.trace.cast import FIXED_DICTIONARY, Rows
from upmtrace.trace.schema import GPA_LIMIT, PAGE_SIZE, REQUIRED, Kind

KINDS = list(Kind)
CODE = {kind: code for code, kind in enumerate(KINDS)}
ALIGNED_KINDS = (Kind.MEMSLOT, Kind.SET_ATTRIBUTES, Kind.PSC, Kind.MAP_GPA, Kind.POPULATE)
VCPU_KINDS = (Kind.NPF, Kind.PSC, Kind.MAP_GPA)
SIZED_KINDS = tuple(k for k in Kind if "size" in REQUIRED[k])
NEEDED = {name: tuple(k for k in KINDS if name in REQUIRED[k])  # column -> kinds that need it
          for name in ("vcpu", "gpa", "size", "private", "slot", "req", "op")}
NEED_BITS = np.array([sum(1 << bit for bit, kinds in enumerate(NEEDED.values()) if k in kinds)
                      for k in KINDS] + [0], dtype=np.uint8)
HOST = -1


@dataclass(frozen=True)
class Problem:
    index: int
    column: str
    message: str


class Columns:
    """numpy views of a SCHEMA table: values (nulls filled) and null masks."""

    def __init__(self, table: pa.Table, carry: Carry) -> None:
        self.table = table
        self.carry = carry
        self.live = dict(carry.live)  # memslots live after this table (set by the overlap rule)
        self._values: dict[str, np.ndarray] = {}
        self._nulls: dict[str, np.ndarray] = {}
        self._kinds: dict[tuple, np.ndarray] = {}
        self.kind = self.codes("kind")
        self.op = self.codes("op")
        # -1 (null) and unknown kinds: the last entry of a lookup table
        self._kind_index = np.clip(self.kind, -1, len(KINDS)).astype(np.intp)

    def codes(self, name: str) -> np.ndarray:
        """Canonical codes (FIXED_DICTIONARY order, then other values), -1 for null."""
        column = self.table.column(name)
        if column.num_chunks == 0:
            return np.zeros(0, dtype=np.int16)
        parts = [_canonical(chunk, FIXED_DICTIONARY[name]) for chunk in column.chunks]
        return np.concatenate(parts)

    def values(self, name: str) -> np.ndarray:
        if name not in self._values:
            column = self.table.column(name)
            if column.null_count:
                column = column.fill_null(False if pa.types.is_boolean(column.type) else 0)
            self._values[name] = np.asarray(column)
        return self._values[name]

    def has_null(self, name: str) -> bool:
        return self.table.column(name).null_count > 0

    def null(self, name: str) -> np.ndarray:
        if name not in self._nulls:
            self._nulls[name] = np.asarray(self.table.column(name).is_null())
        return self._nulls[name]

    def of_kinds(self, kinds) -> np.ndarray:
        """Rows whose kind is one of `kinds` (a lookup table indexed by the int8 code)."""
        key = tuple(kinds)
        if key not in self._kinds:
            lookup = np.zeros(len(KINDS) + 1, dtype=bool)
            lookup[[CODE[k] for k in kinds]] = True
            self._kinds[key] = lookup.take(self._kind_index)
        return self._kinds[key]

    def needs(self) -> np.ndarray:
        """Per row, the bits (1 << position in NEEDED) of the columns its kind requires."""
        return NEED_BITS.take(self._kind_index)

    def label(self, name: str, index: int) -> str:
        return str(self.table.column(name)[index].as_py())


def _canonical(chunk: pa.DictionaryArray, fixed: tuple[str, ...]) -> np.ndarray:
    """A dictionary chunk's indices as codes: position in `fixed`, else len(fixed) + position
    among the other values of its dictionary; -1 for null."""
    words = chunk.dictionary.to_pylist()
    if words[:len(fixed)] == list(fixed):  # canonical already: the codes are the indices
        indices = chunk.indices if not chunk.null_count else chunk.indices.fill_null(-1)
        return np.asarray(indices).astype(np.int16)
    extra = [w for w in words if w not in fixed]
    lookup = np.array([fixed.index(w) if w in fixed else len(fixed) + extra.index(w)
                       for w in words] + [-1], dtype=np.int16)
    return lookup[np.asarray(chunk.indices.fill_null(len(words)), dtype=np.int64)]


Rule = Callable[[Columns], Problem | None]


@dataclass
class Carry:
    """What validation of a streamed trace carries from one batch to the next."""

    last_ts: int | None = None
    live: dict[int, tuple[int, int]] = field(default_factory=dict)  # memslot -> [gpa, end)


def validate(table: pa.Table, *, path: str | None = None, rows: Rows | None = None,
             carry: Carry | None = None) -> None:
    """Raise TraceError for the earliest row of a SCHEMA table that breaks docs/format.md.

    A trace read in batches passes the same `carry` with each batch, in order.
    """
    cols = Columns(table, carry or Carry())
    problems = [p for rule in RULES if (p := rule(cols)) is not None]
    if problems:
        first = min(problems, key=lambda p: p.index)  # min keeps the earlier rule on a tie
        rows = rows or Rows()
        raise TraceError(first.message, path=path, row=rows(first.index), column=first.column)
    if carry is not None and table.num_rows:
        carry.last_ts = int(cols.values("ts")[-1])
        carry.live = cols.live


def _first(mask: np.ndarray) -> int | None:
    return int(np.argmax(mask)) if mask.any() else None


def _never_null(cols: Columns) -> Problem | None:
    for name in ("ts", "kind"):
        if cols.has_null(name) and (i := _first(cols.null(name))) is not None:
            return Problem(i, name, f"{name} is missing")
    return None


def _known_kind(cols: Columns) -> Problem | None:
    i = _first(cols.kind >= len(KINDS))
    if i is None:
        return None
    return Problem(i, "kind", f"unknown kind {cols.label('kind', i)!r} "
                              f"(expected one of {', '.join(KINDS)})")


def _required(cols: Columns) -> Problem | None:
    found = []
    needs = None
    for bit, name in enumerate(NEEDED):
        if not cols.has_null(name):
            continue
        needs = cols.needs() if needs is None else needs
        if (i := _first(cols.null(name) & (needs & (1 << bit)).astype(bool))) is not None:
            kind = KINDS[cols.kind[i]]
            found.append(Problem(i, name, f"missing {name} (a {kind} event needs "
                                          f"{', '.join(REQUIRED[kind])})"))
    return min(found, key=lambda p: p.index) if found else None


def _known_op(cols: Columns) -> Problem | None:
    i = _first(cols.op >= len(FIXED_DICTIONARY["op"]))
    if i is None:
        return None
    return Problem(i, "op", f"unknown psc op {cols.label('op', i)!r} "
                            f"(expected one of {', '.join(FIXED_DICTIONARY['op'])})")


def _vcpu(cols: Columns) -> Problem | None:
    vcpu = cols.values("vcpu")
    negative = vcpu < 0
    if not negative.any():
        return None
    valid, guest = ~cols.null("vcpu"), cols.of_kinds(VCPU_KINDS)
    i = _first(valid & ((vcpu < HOST) | (guest & negative)))
    if i is None:
        return None
    if vcpu[i] < HOST:
        return Problem(i, "vcpu", f"vcpu {vcpu[i]} is negative (only -1, the host, is allowed)")
    return Problem(i, "vcpu", f"vcpu {vcpu[i]} is not a vCPU index "
                              f"({KINDS[cols.kind[i]]} events come from a vCPU)")


def _positive_size(cols: Columns) -> Problem | None:
    kinds = [k for k in SIZED_KINDS if k is not Kind.MEMSLOT]  # memslot size 0 deletes
    zero = cols.values("size") == 0
    if cols.has_null("size"):
        zero &= ~cols.null("size")
    if not zero.any():
        return None
    i = _first(cols.of_kinds(kinds) & zero)
    return None if i is None else Problem(i, "size", "size must be greater than 0")


def _latency(cols: Columns) -> Problem | None:
    if cols.table.column("latency").null_count == cols.table.num_rows:
        return None
    i = _first(~cols.null("latency") & (cols.values("latency") < 0))
    if i is None:
        return None
    return Problem(i, "latency", f"latency {cols.values('latency')[i]} is negative "
                                 "(nanoseconds from an exit to the next entry)")


def _aligned(cols: Columns) -> Problem | None:
    gpa, size = cols.values("gpa"), cols.values("size")
    if not ((gpa | size) & np.uint64(PAGE_SIZE - 1)).any():
        return None
    kinds = cols.of_kinds(ALIGNED_KINDS)
    bad_gpa = _first(kinds & (gpa % PAGE_SIZE != 0))
    bad_size = _first(kinds & (size % PAGE_SIZE != 0))
    found = []
    if bad_gpa is not None:
        found.append(Problem(bad_gpa, "gpa", f"gpa {gpa[bad_gpa]:#x} is not 4 KiB aligned"))
    if bad_size is not None:
        found.append(Problem(bad_size, "size",
                             f"size {size[bad_size]} is not a multiple of 4 KiB"))
    return min(found, key=lambda p: p.index) if found else None


def _gpa_limit(cols: Columns) -> Problem | None:
    gpa, size = cols.values("gpa"), cols.values("size")
    limit = np.uint64(GPA_LIMIT)
    if not len(gpa) or (gpa.max() < limit and size.max() <= limit - gpa.max()):
        return None  # every row ends inside the limit
    beyond = ~cols.null("gpa") & (gpa >= limit)
    with np.errstate(over="ignore"):
        room = limit - gpa  # wraps where gpa > limit, which `beyond` already reports
    ends_beyond = cols.of_kinds(SIZED_KINDS) & ~beyond & (size > room)
    found = []
    if (i := _first(beyond)) is not None:
        found.append(Problem(i, "gpa", f"gpa {gpa[i]:#x} is beyond the 52-bit "
                                       "guest physical address space"))
    if (i := _first(ends_beyond)) is not None:
        found.append(Problem(i, "size", f"gpa {gpa[i]:#x} + size {size[i]:#x} ends beyond "
                                        "the 52-bit guest physical address space"))
    return min(found, key=lambda p: p.index) if found else None


def _ts_order(cols: Columns) -> Problem | None:
    ts = cols.values("ts")
    last = cols.carry.last_ts
    if last is not None and len(ts) and ts[0] < last:
        return Problem(0, "ts", f"ts {ts[0]} goes backwards (previous event at {last})")
    i = _first(ts[1:] < ts[:-1])
    if i is None:
        return None
    return Problem(i + 1, "ts", f"ts {ts[i + 1]} goes backwards (previous event at {ts[i]})")


def _memslot_overlap(cols: Columns) -> Problem | None:
    """Replay memslot registrations; a slot overlapping another live slot is refused by KVM."""
    indices = np.flatnonzero(cols.kind == CODE[Kind.MEMSLOT])
    if len(indices) == 0:
        return None
    part = cols.table.select(["slot", "gpa", "size"]).take(pa.array(indices)).to_pylist()
    live = cols.live
    for index, row in zip(indices.tolist(), part, strict=True):
        slot, gpa, size = row["slot"], row["gpa"], row["size"]
        if slot is None or gpa is None or size is None:
            continue  # reported by _required
        live.pop(slot, None)
        if size == 0:
            continue
        for other, (start, end) in live.items():
            if gpa < end and start < gpa + size:
                return Problem(index, "gpa", f"memslot {slot} [{gpa:#x}, {gpa + size:#x}) "
                                             f"overlaps memslot {other} [{start:#x}, {end:#x})")
        live[slot] = (gpa, gpa + size)
    return None


RULES: tuple[Rule, ...] = (
    _never_null, _known_kind, _required, _known_op, _vcpu, _positive_size, _aligned, _gpa_limit,
    _latency, _ts_order, _memslot_overlap,
)
