"""Counters sampled over the trace's time, at a bounded number of rows (`replay --timeline`)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from upmtrace.atomic import STDOUT, write_atomic
from upmtrace.errors import UsageError

EXIT_KEYS = ("exits.vm.npf", "exits.vm.vmgexit", "exits.vm.tdvmcall", "exits.vm.vmcall",
             "exits.userspace.KVM_EXIT_MEMORY_FAULT", "exits.userspace.KVM_EXIT_HYPERCALL")
# cumulative counters the engine keeps in its Counter, and the ones only the machine's RMP and
# direct map hold (null when the engine does not hand the machine to sample())
COUNT_KEYS = ("memory.pages_allocated", "memory.pages_freed", "conversions.set_attributes_calls",
              "mappings.4k", "mappings.2m")
MACHINE_KEYS = ("rmp.updates_4k", "rmp.updates_2m", "rmp.psmash", "directmap.restores",
                "vfio.dma_map_calls", "vfio.dma_unmap_calls", "vfio.pages_pinned")
GAUGES = ("pinned_bytes",)  # VFIO-pinned memory now (null without the machine)
COLUMNS = ("ts", "events", "shared_bytes", "private_bytes", "duplicate_bytes", "resident_bytes",
           *EXIT_KEYS, "directmap.splits", *COUNT_KEYS, *MACHINE_KEYS, *GAUGES)


class Timeline:
    """At most `rows` samples, evenly spaced over [first_ts, last_ts]; the last is the final
    state."""

    def __init__(self, first_ts: int, last_ts: int, rows: int = 1000) -> None:
        self.first, self.rows = first_ts, max(rows, 1)
        self.step = max(-(-(last_ts - first_ts) // self.rows), 1)
        self.next = first_ts
        self.samples: list[tuple[int, ...]] = []

    @classmethod
    def over(cls, trace, rows: int = 1000) -> Timeline:
        """A timeline spanning the ts range of a Trace (or a bare table)."""
        if isinstance(trace, pa.Table):
            if not trace.num_rows:
                return cls(0, 0, rows)
            ts = trace.column("ts")
            return cls(pc.min(ts).as_py(), pc.max(ts).as_py(), rows)
        return cls(*trace.ts_span(), rows)

    def sample(self, ts: int, events: int, memory: tuple[int, int, int], counts, splits: int,
               final: bool = False, machine=None) -> None:
        if final and self.samples and self.samples[-1][1] == events:
            return
        shared, private, duplicate = (pages * 4096 for pages in memory)
        self.samples.append((ts, events, shared, private, duplicate, shared + private,
                             *(counts[k] for k in EXIT_KEYS), splits,
                             *(counts[k] for k in COUNT_KEYS), *machine_counts(machine)))
        self.next = ts - (ts - self.first) % self.step + self.step

    def table(self) -> pa.Table:
        samples = bounded(self.samples, self.rows)
        columns = list(zip(*samples, strict=True)) if samples else [()] * len(COLUMNS)
        return pa.table({name: pa.array(col, pa.int64()) for name, col in zip(COLUMNS, columns,
                                                                              strict=True)})

    def write(self, path: str) -> None:
        check_path(path)
        table = self.table()
        if is_parquet(path):
            write_atomic(path, lambda f: pq.write_table(table, f, compression="zstd"))
        else:
            write_atomic(path, lambda f: pacsv.write_csv(table, f))


def bounded(samples: list, rows: int) -> list:
    """At most `rows` of the samples, evenly picked, the first and the last (final) kept."""
    n = len(samples)
    if n <= rows:
        return samples
    if rows == 1:
        return samples[-1:]
    return [samples[round(i * (n - 1) / (rows - 1))] for i in range(rows)]


def machine_counts(machine) -> tuple[int | None, ...]:
    """The MACHINE_KEYS and GAUGES of a model.machine.Machine; nulls without one."""
    if machine is None:
        return (None,) * (len(MACHINE_KEYS) + len(GAUGES))
    rmp, vfio = machine.rmp, machine.vfio
    return (rmp.updates_4k, rmp.updates_2m, rmp.psmash, machine.directmap.restores,
            vfio.map_calls, vfio.unmap_calls, vfio.pages_pinned, vfio.count * 4096)


def counters(table: pa.Table) -> dict[str, np.ndarray]:
    """A timeline's cumulative counters by report key (exit totals included), one value per
    sample; columns that were not sampled (all null) are left out."""
    found = {name: table.column(name) for name in COLUMNS[6:]
             if name in table.column_names and name not in GAUGES}
    out = {name: col.to_numpy().astype(np.int64) for name, col in found.items()
           if not col.null_count}
    for level in ("vm", "userspace"):
        keys = [k for k in EXIT_KEYS if k.startswith(f"exits.{level}.")]
        out[f"exits.{level}_total"] = sum(out[k] for k in keys)
    return out


def check_path(path: str) -> None:
    """A .parquet or .csv file, or `-` (CSV on standard output)."""
    if path != STDOUT and not path.endswith((".parquet", ".csv")):
        raise UsageError(f"--timeline {path}: use a .parquet or .csv file")


def is_parquet(path: str) -> bool:
    return path.endswith(".parquet")
