"""The reference replay loop: trace events in, counters out (docs/model.md), row by row.
Prints nothing.

The Engine feeds one event at a time to the model; it is the oracle the batch path
(upmtrace.engine.fast) is tested against.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from upmtrace.attribution import Ledger, by_exit
from upmtrace.costs import default_costs, estimate
from upmtrace.errors import InputError
from upmtrace.model.bits import block_spans
from upmtrace.model.machine import POPULATE_LIMIT_PAGES, PRIVATE, SHARED, Machine
from upmtrace.policy import Policy
from upmtrace.timeline import Timeline
from upmtrace.trace.schema import (
    BLOCK_SIZE,
    MSR_REQ,
    PAGE_SHIFT,
    PAGE_SIZE,
    Platform,
)

SCHEMA_ID = "upmtrace.report.v1"
BATCH_ROWS = 262_144
Row = tuple  # (ts, kind, vcpu, gpa, size, private, write, slot, gmem, req, op, agent)
COLS = ("ts", "kind", "vcpu", "gpa", "size", "private", "write", "slot", "gmem", "req", "op",
        "agent")
MF, HYPERCALL = "KVM_EXIT_MEMORY_FAULT", "KVM_EXIT_HYPERCALL"
CAUSE = {"npf": "npf", "map_gpa": HYPERCALL}  # whose work a row's handler does (attribution.py)


@dataclass(frozen=True)
class Result:
    """One replay's report (docs/report.md) as plain data."""

    report: dict[str, Any]

    def to_json(self) -> str:
        return json.dumps(self.report, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Result:
        return cls(json.loads(text))

    def get(self, key: str) -> Any:
        node: Any = self.report
        for part in key.split("."):
            node = node[part]
        return node


class Engine:
    """Feeds events to a Machine and keeps the exit and memory counters."""

    def __init__(self, policy: Policy, platform: Platform, paranoid: bool = False,
                 timeline: Timeline | None = None) -> None:
        self.policy = policy
        self.timeline = timeline
        self.due = timeline.next if timeline else float("inf")  # ts of the next sample
        self.request: list[Row] = []  # the PSC request being gathered
        self.events = 0  # rows fed
        self.ts = 0  # ts of the last row fed
        self.platform = platform
        self.m = Machine(policy, platform)
        self.count = self.m.count
        self.ledger = Ledger(self.m)
        self.paranoid = paranoid
        self.peak = {"resident": 0, "shared": 0, "private": 0, "duplicate": 0, "pinned": 0}
        self.handlers: dict[str, Callable[[Row], None]] = {
            "memslot": self.memslot,
            "set_attributes": self.set_attributes,
            "npf": self.npf,
            "map_gpa": self.map_gpa,
            "host_access": self.host_access,
            "populate": self.populate,
        }

    # --- the loop ---------------------------------------------------------------------------

    def run(self, rows: Iterator[Row]) -> None:
        for row in rows:
            self.feed(row)
        self.finish()

    def feed(self, row: Row) -> None:
        """One trace row; consecutive psc rows of one (vcpu, req) gather into one request."""
        request = self.request
        if request and (row[1] != "psc" or row[9] == MSR_REQ
                        or (row[2], row[9]) != (request[0][2], request[0][9])):
            self.flush()
        if row[0] > self.due:
            self.sample()
        self.ts = row[0]
        self.events += 1
        if row[1] == "psc":
            self.request.append(row)
        else:
            self.ledger.switch(CAUSE.get(row[1], "none"))
            self.event_done(self.handlers[row[1]](row))

    def flush(self) -> None:
        """Replay the PSC request being gathered, if any."""
        if self.request:
            request, self.request = self.request, []
            self.ledger.switch(HYPERCALL)
            self.event_done(self.psc(request))

    def finish(self) -> None:
        self.flush()
        if self.timeline is not None:
            self.sample(final=True)

    def sample(self, final: bool = False) -> None:
        """A timeline row for the state after every event fed so far (pending PSC excepted)."""
        timeline = self.timeline
        timeline.sample(self.ts, self.events - len(self.request), self.m.memory_pages(),
                        self.count, self.m.directmap.splits, final, machine=self.m)
        self.due = timeline.next

    def event_done(self, _: None = None) -> None:
        if self.paranoid:
            self.m.check_invariants()
        if not self.m.grew:
            return  # nothing was allocated: no figure can have reached a new peak
        self.m.grew = False
        shared, private, duplicate = self.m.memory_pages()
        peak = self.peak
        resident = shared + private
        if resident > peak["resident"]:
            peak["resident"] = resident
        if shared > peak["shared"]:
            peak["shared"] = shared
        if private > peak["private"]:
            peak["private"] = private
        if duplicate > peak["duplicate"]:
            peak["duplicate"] = duplicate
        if self.m.vfio.count > peak["pinned"]:
            peak["pinned"] = self.m.vfio.count

    # --- events -----------------------------------------------------------------------------

    def memslot(self, row: Row) -> None:
        self.m.set_memslot(row[7], row[3] >> PAGE_SHIFT, row[4] >> PAGE_SHIFT, bool(row[8]))

    def set_attributes(self, row: Row) -> None:
        g0 = row[3] >> PAGE_SHIFT
        self.m.set_attributes_row(g0, g0 + (row[4] >> PAGE_SHIFT), bool(row[5]))

    def npf(self, row: Row) -> None:
        self.count["npf.recorded"] += 1
        self.fault(row[3] >> PAGE_SHIFT, bool(row[5]))

    def fault(self, gfn: int, private: bool) -> None:
        """A nested page fault on gfn, the access private or not (docs/model.md, npf)."""
        m, count = self.m, self.count
        if self.platform is Platform.SW:
            private = m.attrs.is_private(gfn)
        block, bit = gfn >> 9, 1 << (gfn & 511)
        if m.maps.maps(block, bit, private):
            count["npf.avoided"] += 1
            return
        count["exits.vm.npf"] += 1
        slot = m.slots.find(gfn)
        if slot is None or (private and not slot.gmem):
            if private:
                count["exits.userspace.KVM_EXIT_MEMORY_FAULT"] += 1
                count["npf.unresolvable"] += 1
            else:
                count["npf.mmio"] += 1
            return
        if private != m.attrs.is_private(gfn):
            count["exits.userspace.KVM_EXIT_MEMORY_FAULT"] += 1
            count["conversions.implicit"] += 1
            self.ledger.switch(MF)  # the VMM converts; the retried access maps (an npf again)
            m.convert(gfn, gfn + 1, private, explicit=False)
            self.ledger.switch("npf")
            count["exits.vm.npf"] += 1  # the retried access
        m.map_gfn(gfn, private, slot)

    def psc(self, request: list[Row]) -> None:
        count = self.count
        count["exits.vm.vmgexit"] += 1
        count["psc.requests"] += 1
        count["psc.entries"] += len(request)
        if request[0][9] == MSR_REQ:  # MSR protocol: always one 4 KiB page
            _ts, _k, _v, gpa, _s, _p, _w, _sl, _g, _r, op, _a = request[0]
            if op in ("psmash", "unsmash"):
                count["psc.skipped"] += 1
                return
            count["exits.userspace.KVM_EXIT_HYPERCALL"] += 1
            g0 = gpa >> PAGE_SHIFT
            self.m.convert(g0, g0 + 1, op == "private", explicit=True)
            return
        runs = self.psc_runs(request)
        mode = self.policy.exits
        if mode == "per-entry":
            for entries in runs:
                for gpa, size, private in entries:
                    count["exits.userspace.KVM_EXIT_HYPERCALL"] += 1
                    self.convert_bytes(gpa, size, private)
            return
        if runs:
            count["exits.userspace.KVM_EXIT_HYPERCALL"] += 1 if mode == "batched" else len(runs)
        for entries in runs:
            first, last = entries[0], entries[-1]
            self.convert_bytes(first[0], last[0] + last[1] - first[0], first[2])

    def psc_runs(self, request: list[Row]) -> list[list[tuple[int, int, bool]]]:
        """Maximal runs of same-op, same-size-class, contiguous entries, in order."""
        runs: list[list[tuple[int, int, bool]]] = []
        prev = None  # (op, huge, end) of the run being built
        for row in request:
            gpa, size, op = row[3], row[4], row[10]
            huge = size == BLOCK_SIZE
            if huge and gpa % BLOCK_SIZE:
                self.count["psc.invalid"] += 1
                break
            if op in ("psmash", "unsmash"):
                self.count["psc.skipped"] += 1
                prev = None
                continue
            if prev is not None and prev == (op, huge, gpa):
                runs[-1].append((gpa, size, op == "private"))
            else:
                runs.append([(gpa, size, op == "private")])
            prev = (op, huge, gpa + size)
        return runs

    def map_gpa(self, row: Row) -> None:
        count = self.count
        gpa, size, private = row[3], row[4], bool(row[5])
        if self.platform is Platform.TDX:
            count["exits.vm.tdvmcall"] += 1
            if self.policy.exits != "batched":
                if size > POPULATE_LIMIT_PAGES * PAGE_SIZE:  # one conversion per 2 MiB chunk
                    raise InputError(f"map_gpa of {size:#x} bytes at gpa {gpa:#x} would make "
                                     "more 2 MiB chunks than the model's limit of 1 TiB in one "
                                     "event")
                for start in range(gpa, gpa + size, BLOCK_SIZE):
                    count["exits.userspace.KVM_EXIT_HYPERCALL"] += 1
                    self.convert_bytes(start, min(BLOCK_SIZE, gpa + size - start), private)
                return
        elif self.platform is Platform.SNP:
            count["exits.vm.vmgexit"] += 1  # the hypercall goes through the GHCB (exit 0x81)
        else:
            count["exits.vm.vmcall"] += 1
        count["exits.userspace.KVM_EXIT_HYPERCALL"] += 1
        self.convert_bytes(gpa, size, private)

    def convert_bytes(self, gpa: int, size: int, private: bool) -> None:
        g0 = gpa >> PAGE_SHIFT
        self.m.convert(g0, g0 + (size >> PAGE_SHIFT), private, explicit=True)

    def host_access(self, row: Row) -> None:
        m, count = self.m, self.count
        gpa, size = row[3], row[4]
        g0, g1 = gpa >> PAGE_SHIFT, (gpa + size + PAGE_SIZE - 1) >> PAGE_SHIFT
        count["host_access.pages"] += g1 - g0
        slot = m.slots.find(g0)
        slots = [slot] if slot is not None and g1 <= slot.end else m.slots.overlapping(g0, g1)
        if g1 - g0 > POPULATE_LIMIT_PAGES:
            m.check_populate_limit("host_access", g0, g1, slots)
        for slot in slots:
            for block, mask in block_spans(max(g0, slot.start), min(g1, slot.end)):
                private = m.private_bitmap(block, mask)  # pages the guest has taken private
                if m.inplace:
                    count["host_access.faults"] += private.bit_count()
                    mask &= ~private  # the access faults; nothing is populated
                else:
                    count["host_access.stale"] += private.bit_count()  # reaches a stale copy
                if mask:
                    m.populate(SHARED, block, mask)

    def populate(self, row: Row) -> None:
        """Launch-time population of private memory (no exit)."""
        self.count["populate.calls"] += 1
        g0 = row[3] >> PAGE_SHIFT
        self.m.populate_private(g0, g0 + (row[4] >> PAGE_SHIFT))

    # --- the report -------------------------------------------------------------------------

    def report(self, trace_info: dict[str, Any], recorded: dict | None,
               costs: dict[str, int] | None) -> dict[str, Any]:
        c, m = self.count, self.m
        c["rmp.updates_4k"], c["rmp.updates_2m"] = m.rmp.updates_4k, m.rmp.updates_2m
        c["rmp.psmash"] = m.rmp.psmash
        c["directmap.splits"], c["directmap.restores"] = m.directmap.splits, m.directmap.restores
        c["vfio.dma_map_calls"], c["vfio.dma_unmap_calls"] = m.vfio.map_calls, m.vfio.unmap_calls
        c["vfio.pages_pinned"] = m.vfio.pages_pinned
        userspace = {k: c[f"exits.userspace.{k}"]
                     for k in ("KVM_EXIT_MEMORY_FAULT", "KVM_EXIT_HYPERCALL")}
        vm = {k: c[f"exits.vm.{k}"] for k in ("npf", "vmgexit", "tdvmcall", "vmcall")}
        c["exits.userspace_total"], c["exits.vm_total"] = sum(userspace.values()), sum(vm.values())
        shared, private, _dup = m.memory_pages()
        touched = m.touched_pages * PAGE_SIZE
        peak = {k: v * PAGE_SIZE for k, v in self.peak.items()}
        costs = costs or default_costs()
        total, by_category = estimate(c, costs)

        def group(prefix: str, *keys: str) -> dict[str, int]:
            return {k: c[f"{prefix}.{k}"] for k in keys}

        return {
            "schema": SCHEMA_ID,
            "trace": trace_info,
            "policy": self.policy.to_json(),
            "exits": {"userspace": userspace, "userspace_total": c["exits.userspace_total"],
                      "vm": vm, "vm_total": c["exits.vm_total"]},
            "npf": group("npf", "recorded", "avoided", "mmio", "unresolvable"),
            "conversions": group("conversions", "implicit", "set_attributes_calls",
                                 "to_private_pages", "to_shared_pages"),
            "psc": group("psc", "requests", "entries", "skipped", "invalid"),
            "memory": {
                "peak_resident_bytes": peak["resident"],
                "peak_shared_bytes": peak["shared"],
                "peak_private_bytes": peak["private"],
                "peak_duplicate_bytes": peak["duplicate"],
                "final_resident_bytes": (shared + private) * PAGE_SIZE,
                "touched_bytes": touched,
                "ratio_to_touched": round(peak["resident"] / touched, 6) if touched else 0.0,
                "pages_allocated": c["memory.pages_allocated"],
                "pages_freed": c["memory.pages_freed"],
            },
            "gmem": group("gmem", "folio_splits"),
            "rmp": group("rmp", "updates_4k", "updates_2m", "psmash"),
            "directmap": group("directmap", "splits", "restores"),
            "mappings": group("mappings", "4k", "2m"),
            "host_access": group("host_access", "pages", "stale", "faults"),
            "populate": group("populate", "calls", "pages", "skipped_pages"),
            "vfio": {"dma_map_calls": m.vfio.map_calls, "dma_unmap_calls": m.vfio.unmap_calls,
                     "pinned_peak_bytes": peak["pinned"],
                     "pinned_final_bytes": m.vfio.count * PAGE_SIZE,
                     "pages_pinned": m.vfio.pages_pinned},
            "cost": {"total_ns": total, "by_category": by_category, "estimate": True,
                     "by_exit": by_exit(vm, userspace, self.ledger.counts(), costs,
                                        by_category)},
            "recorded": recorded or {},
        }


FILL = {"vcpu": -2, "gpa": 0, "size": 0, "private": False, "write": False, "slot": -1,
        "gmem": False, "req": 0}


def column_list(column: pa.ChunkedArray | pa.Array, name: str) -> list:
    """A column as a Python list, nulls filled; dictionary strings decoded (None for null)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if pa.types.is_dictionary(column.type):
        words = column.dictionary.to_pylist() + [None]
        indices = pc.fill_null(column.indices.cast(pa.int32()), len(words) - 1)
        return [words[i] for i in indices.to_numpy().tolist()]
    if name in FILL and column.null_count:
        column = pc.fill_null(column, FILL[name])
    return column.to_numpy(zero_copy_only=False).tolist()


def batch_rows_of(batch: pa.RecordBatch) -> Iterator[Row]:
    """A record batch's rows as tuples in COLS order."""
    names = batch.schema.names
    columns = [column_list(batch.column(names.index(name)), name) for name in COLS]
    return zip(*columns, strict=True)


def iter_rows(table: pa.Table, batch_rows: int = BATCH_ROWS) -> Iterator[Row]:
    """Rows as tuples, one record batch of Python lists at a time."""
    for batch in table.to_batches(max_chunksize=batch_rows):
        yield from batch_rows_of(batch)


__all__ = ["Engine", "Result", "PRIVATE", "SHARED"]
