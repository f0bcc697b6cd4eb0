"""The recorded time of a trace's exits: the report's `timing` and `by_vcpu` objects.

Two sources, disjoint by construction (see trace/importers/pairing.py): the `latency` column of
the rows (a VM exit's latency on the first row it produced: npf -> npf, psc -> vmgexit, map_gpa
-> the platform's hypercall exit: vmgexit on SNP, tdvmcall on TDX, vmcall on sw; a latency on a
row of another kind is no exit's and is ignored), and the recorded distributions of the exits
that have no row (`recorded.latency`: userspace exits, exits the model does not cover such as
hlt or interrupt, GHCB requests). Both are merged per exit reason, grouped as the recorded
counts are: `vm` and `userspace` (the keys of exits.vm and exits.userspace), `vm_other` and
`userspace_other` (reasons the model does not cover).

Each reason gives {count, total_ns, min_ns, p50_ns, p95_ns, max_ns}; percentiles are
nearest-rank (the smallest recorded value with at least p % of the values at or below it),
exact while a reason has at most 1,024 distinct latencies, within 1/128 beyond (see
trace/latency.py). The per-vCPU breakdown gives {count, total_ns, min_ns, max_ns}.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from upmtrace.trace.latency import Distribution
from upmtrace.trace.schema import Platform

Reason = tuple[str, str]
GROUPS = ("vm", "userspace", "vm_other", "userspace_other")
HYPERCALL_EXIT = {Platform.SNP: "vmgexit", Platform.TDX: "tdvmcall", Platform.SW: "vmcall"}
COLUMNS = ["kind", "vcpu", "latency"]


def row_reason(kind: str, platform: Platform) -> Reason | None:
    """The VM exit a row's latency belongs to."""
    if kind == "npf":
        return ("vm", "npf")
    if kind == "psc":
        return ("vm", "vmgexit")
    if kind == "map_gpa":
        return ("vm", HYPERCALL_EXIT[platform])
    return None


def _batches(trace) -> Iterator[pa.RecordBatch]:
    """kind, vcpu, latency of every row (a Trace, or a bare table)."""
    table = trace if isinstance(trace, pa.Table) else trace.loaded
    if table is not None:
        if "latency" in table.column_names:
            yield from table.select(COLUMNS).to_batches()
        return
    file = pq.ParquetFile(trace.path)
    if "latency" in file.schema_arrow.names:
        yield from file.iter_batches(columns=COLUMNS)


class Collected:
    """Latency distributions by reason and by (vCPU, reason), and rows by (vCPU, kind)."""

    def __init__(self) -> None:
        self.exits: dict[Reason, Distribution] = {}
        self.by_vcpu: dict[tuple[int, str, str], Distribution] = {}
        self.events: dict[tuple[int, str], int] = {}

    def add(self, reason: Reason, vcpu: int, values: np.ndarray) -> None:
        unique, counts = np.unique(values, return_counts=True)
        for key, target in ((reason, self.exits), ((vcpu, *reason), self.by_vcpu)):
            dist = target.setdefault(key, Distribution())
            for value, times in zip(unique.tolist(), counts.tolist(), strict=True):
                dist.add(value, times)

    def rows(self, batch: pa.RecordBatch, platform: Platform, events: bool) -> None:
        """A batch's latencies (and, if `events`, its rows by vCPU and kind)."""
        latency = batch.column(2)
        if not events and latency.null_count == len(latency):
            return  # the common case of a trace without latencies: nothing to decode
        kinds = batch.column(0)
        if not pa.types.is_dictionary(kinds.type):
            kinds = kinds.dictionary_encode()
        words = kinds.dictionary.to_pylist()
        code = kinds.indices.to_numpy(zero_copy_only=False).astype(np.int64)
        vcpu = pc.fill_null(batch.column(1), -1).to_numpy(zero_copy_only=False).astype(np.int64)
        if events:
            keys, counts = np.unique(vcpu * 256 + code, return_counts=True)
            for key, n in zip(keys.tolist(), counts.tolist(), strict=True):
                cpu, k = divmod(key, 256)
                if cpu >= 0:
                    self.events[(cpu, words[k])] = self.events.get((cpu, words[k]), 0) + n
        if latency.null_count == len(latency):
            return
        has = pc.is_valid(latency).to_numpy(zero_copy_only=False)
        values = pc.fill_null(latency, 0).to_numpy(zero_copy_only=False)
        for k in np.unique(code[has]).tolist():
            reason = row_reason(words[k], platform)
            if reason is None:
                continue
            chosen = has & (code == k)
            for cpu in np.unique(vcpu[chosen]).tolist():
                self.add(reason, cpu, values[chosen & (vcpu == cpu)])

    def recorded(self, latency: dict) -> None:
        """Merge the recorded distributions of the exits that have no row."""
        for group, reasons in _object(latency.get("exits")).items():
            for name, data in _object(reasons).items():
                try:
                    dist = Distribution.from_json(data)
                except ValueError:
                    continue
                self.exits.setdefault((group, name), Distribution()).merge(dist)
        for cpu, groups in _object(latency.get("by_vcpu")).items():
            for group, reasons in _object(groups).items():
                for name, data in _object(reasons).items():
                    dist = self.by_vcpu.setdefault((int(cpu), group, name), Distribution())
                    _merge_summary(dist, data)


def _object(value) -> dict:
    return value if isinstance(value, dict) else {}


def _merge_summary(dist: Distribution, data: dict) -> None:
    """A {count, total_ns, min_ns, max_ns} summary into a distribution (no percentiles)."""
    count = data.get("count", 0)
    if not count:
        return
    dist.count += count
    dist.total += data.get("total_ns", 0)
    low, high = data.get("min_ns", 0), data.get("max_ns", 0)
    dist.min = low if dist.min is None else min(dist.min, low)
    dist.max = high if dist.max is None else max(dist.max, high)


def collect(trace, platform: Platform, recorded: dict | None, events: bool = True) -> Collected:
    collected = Collected()
    for batch in _batches(trace):
        collected.rows(batch, platform, events)
    collected.recorded(_object(_object(recorded).get("latency")))
    return collected


def _grouped(items: dict[Reason, Distribution], stat) -> dict:
    out: dict[str, dict] = {}
    for group in GROUPS:
        names = sorted(name for g, name in items if g == group and items[(g, name)].count)
        if names:
            out[group] = {name: stat(items[(group, name)]) for name in names}
    return out


def timing(collected: Collected) -> dict | None:
    """The `timing` object, or None when nothing carries a latency."""
    return _grouped(collected.exits, Distribution.stats) or None


def by_vcpu(collected: Collected) -> dict:
    """{vcpu: {"events": {kind: rows}, "timing": {group: {reason: summary}}}}, vCPUs in order."""
    cpus = sorted({cpu for cpu, _kind in collected.events}
                  | {cpu for cpu, _g, _n in collected.by_vcpu})
    out: dict[str, Any] = {}
    for cpu in cpus:
        events = {kind: n for (c, kind), n in sorted(collected.events.items()) if c == cpu}
        mine = {(g, n): d for (c, g, n), d in collected.by_vcpu.items() if c == cpu}
        out[str(cpu)] = {"events": events, "timing": _grouped(mine, Distribution.summary)}
    return out


def add_timing(report: dict, trace, platform: Platform, recorded: dict | None,
               per_vcpu: bool = False) -> None:
    """Put `timing` (and `by_vcpu` if asked) in a report; the recorded distributions it is
    made from leave the report's `recorded` echo (they are not counts of the model's keys)."""
    collected = collect(trace, platform, recorded, events=per_vcpu)
    if (found := timing(collected)) is not None:
        report["timing"] = found
    if per_vcpu:
        report["by_vcpu"] = by_vcpu(collected)
    echo = report.get("recorded")
    if isinstance(echo, dict) and "latency" in echo:
        report["recorded"] = {k: v for k, v in echo.items() if k != "latency"}
