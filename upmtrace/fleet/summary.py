"""A fleet's summary: per policy, the totals of its replayed pairs and their spread."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from upmtrace.fleet.pairs import TOTALLED
from upmtrace.policy import Policy

SCHEMA_ID = "upmtrace.fleet.v1"  # the summary JSON
PERCENTILE_METHOD = "linear"  # numpy's default (Hyndman & Fan type 7)

HEADLINE = ("exits.userspace_total", "exits.vm_total", "memory.peak_resident_bytes",
            "memory.peak_duplicate_bytes", "directmap.splits")
STATS = ("total", "p50", "p95", "max")


@dataclass(frozen=True)
class PolicySummary:
    """One policy over the fleet: its replayed pairs' totals and spread."""

    policy: dict[str, Any]  # name and knobs
    traces: int
    failed: int
    totals: dict[str, int]  # every integer metric summed over the replayed pairs
    stats: dict[str, dict[str, int | float]]  # HEADLINE metric -> STATS; empty if none replayed
    delta: dict[str, dict[str, int | float]] | None  # stats minus the first policy's

    @property
    def name(self) -> str:
        return self.policy["name"]


@dataclass(frozen=True)
class Summary:
    traces: int
    policies: tuple[PolicySummary, ...]
    failures: tuple[dict[str, str], ...]  # {"trace", "policy", "error"} in row order
    results: str | None = None  # where the results table was written

    @property
    def pairs(self) -> int:
        return self.traces * len(self.policies)

    def to_json(self) -> str:
        doc = {"schema": SCHEMA_ID, "traces": self.traces, "pairs": self.pairs,
               "failed": len(self.failures), "results": self.results,
               "percentiles": {"method": PERCENTILE_METHOD, "rounded_to": 6},
               "policies": [{"name": p.name, "policy": p.policy, "traces": p.traces,
                             "failed": p.failed, "stats": p.stats, "delta": p.delta,
                             "totals": p.totals} for p in self.policies],
               "failures": list(self.failures)}
        return json.dumps(doc, indent=2) + "\n"


def summarize(table: pa.Table, policies: Sequence[Policy],
              results: str | None = None) -> Summary:
    """Per policy, in the order given: totals and p50/p95/max over its replayed pairs."""
    ok = pc.is_null(table["error"])
    summaries: list[PolicySummary] = []
    for policy in policies:
        mine = pc.equal(table["policy.name"], policy.name)
        done = table.filter(pc.and_(mine, ok))
        stats = {m: spread(done[m].to_numpy()) for m in HEADLINE} if done.num_rows else {}
        first = summaries[0].stats if summaries else None
        delta = None if first is None or not first or not stats else {
            m: {s: _round(stats[m][s] - first[m][s]) for s in STATS} for m in HEADLINE}
        traces = table.filter(mine).num_rows
        summaries.append(PolicySummary(
            policy.to_json(), traces, traces - done.num_rows,
            {m: int(pc.sum(done[m]).as_py() or 0) for m in TOTALLED}, stats, delta))
    bad = table.filter(pc.invert(ok)).select(["trace.path", "policy.name", "error"])
    failures = tuple({"trace": t, "policy": p, "error": e}
                     for t, p, e in zip(*(c.to_pylist() for c in bad.columns), strict=True))
    return Summary(len(set(table["trace.path"].to_pylist())), tuple(summaries), failures,
                   results)


def spread(values: np.ndarray) -> dict[str, int | float]:
    """total, p50, p95 (numpy percentile, method PERCENTILE_METHOD, 6 decimals) and max."""
    p50, p95 = np.percentile(values, [50, 95], method=PERCENTILE_METHOD)
    return {"total": int(values.sum()), "p50": _round(p50), "p95": _round(p95),
            "max": int(values.max())}


def _round(value: float | int) -> int | float:
    return value if isinstance(value, int) else round(float(value), 6)
