"""Counters sampled over the trace's time, at a bounded number of rows (`replay --timeline`)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from upmtrace.atomic import write_atomic
from upmtrace.errors import UsageError

EXIT_KEYS = ("exits.vm.npf", "exits.vm.vmgexit", "exits.vm.tdvmcall", "exits.vm.vmcall",
             "exits.userspace.KVM_EXIT_MEMORY_FAULT", "exits.userspace.KVM_EXIT_HYPERCALL")
COLUMNS = ("ts", "events", "shared_bytes", "private_bytes", "duplicate_bytes", "resident_bytes",
           *EXIT_KEYS, "directmap.splits")


class Timeline:
    """At most `rows` + 1 samples, evenly spaced over [first_ts, last_ts]."""

    def __init__(self, first_ts: int, last_ts: int, rows: int = 1000) -> None:
        self.first = first_ts
        self.step = max((last_ts - first_ts) // max(rows, 1), 1)
        self.next = first_ts
        self.samples: list[tuple[int, ...]] = []

    @classmethod
    def over(cls, table: pa.Table, rows: int = 1000) -> Timeline:
        """A timeline spanning the trace's ts range."""
        if not table.num_rows:
            return cls(0, 0, rows)
        ts = table.column("ts")
        return cls(pc.min(ts).as_py(), pc.max(ts).as_py(), rows)

    def sample(self, ts: int, events: int, memory: tuple[int, int, int], counts, splits: int,
               final: bool = False) -> None:
        if final and self.samples and self.samples[-1][1] == events:
            return
        shared, private, duplicate = (pages * 4096 for pages in memory)
        self.samples.append((ts, events, shared, private, duplicate, shared + private,
                             *(counts[k] for k in EXIT_KEYS), splits))
        self.next = ts - (ts - self.first) % self.step + self.step

    def table(self) -> pa.Table:
        columns = list(zip(*self.samples, strict=True)) if self.samples else [()] * len(COLUMNS)
        return pa.table({name: pa.array(col, pa.int64()) for name, col in zip(COLUMNS, columns,
                                                                              strict=True)})

    def write(self, path: str) -> None:
        check_path(path)
        table = self.table()
        if path.endswith(".parquet"):
            write_atomic(path, lambda f: pq.write_table(table, f, compression="zstd"))
        else:
            write_atomic(path, lambda f: pacsv.write_csv(table, f))


def check_path(path: str) -> None:
    if not path.endswith((".parquet", ".csv")):
        raise UsageError(f"--timeline {path}: use a .parquet or .csv file")
