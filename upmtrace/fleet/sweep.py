"""Sweep: traces replayed under every combination of varied knobs on top of a base policy.

A fleet whose policies are a knob grid: the pairs run on the fleet's executors, and each policy
is ranked by its totals over all traces on the objectives (lower is better on every one). The
policies no other policy beats on all objectives at once are the Pareto frontier.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from upmtrace.atomic import write_atomic
from upmtrace.errors import InputError, PolicyError, UsageError
from upmtrace.fleet.executors import Executor
from upmtrace.fleet.frontier import frontier
from upmtrace.fleet.pairs import FLOATS, METRICS, RESULT_SCHEMA, Fleet, run
from upmtrace.fleet.summary import summarize
from upmtrace.policy import KNOBS, Policy, check_knob, parse_value

SCHEMA_ID = "upmtrace.sweep.v1"  # the JSON output
RESULTS_ID = "upmtrace.sweep-results.v1"  # the results table (Parquet schema metadata)
EXITS_TOTAL = "exits.total"  # exits.vm_total + exits.userspace_total
DEFAULT_OBJECTIVES = ("memory.peak_resident_bytes", EXITS_TOTAL, "cost.total_ns")
NUMERIC = (*METRICS, EXITS_TOTAL)  # the keys an objective may name
VARY_FORM = "KNOB=V1,V2[,...]"

# --- options -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Vary:
    """One --vary option: a knob and its values, as written."""

    knob: str
    values: tuple[str, ...]


def parse_varies(items: Sequence[str]) -> tuple[Vary, ...]:
    """--vary options, each KNOB=V1,V2,...; anything wrong is a one-line usage error."""
    if not items:
        raise UsageError(f"sweep needs at least one --vary {VARY_FORM}")
    varies = tuple(parse_vary(item) for item in items)
    knobs = [v.knob for v in varies]
    for knob in knobs:
        if knobs.count(knob) > 1:
            raise UsageError(f"--vary {knob} given twice (list its values in one --vary "
                             f"{knob}=V1,V2)")
    return varies


def parse_vary(item: str) -> Vary:
    knob, sep, text = (part.strip() for part in item.partition("="))
    if not sep or not knob:
        raise UsageError(f"--vary {item!r}: expected {VARY_FORM}")
    if knob not in KNOBS:
        raise UsageError(f"--vary {item!r}: unknown policy knob {knob!r} (knobs: "
                         f"{', '.join(KNOBS)})")
    values = tuple(v.strip() for v in text.split(","))
    if not text.strip():
        raise UsageError(f"--vary {item!r}: no values (expected {VARY_FORM})")
    if "" in values:
        raise UsageError(f"--vary {item!r}: an empty value between commas")
    for value in values:
        try:
            check_knob(knob, parse_value(knob, value))
        except PolicyError as err:
            raise UsageError(f"--vary {item!r}: {err}") from None
    return Vary(knob, values)


def check_objectives(keys: Sequence[str]) -> tuple[str, ...]:
    """The objectives: the keys given (each a numeric report key, once), else the defaults."""
    for key in keys:
        if key not in NUMERIC:
            raise UsageError(f"--objective {key!r}: not a numeric report key (for example "
                             f"{', '.join(DEFAULT_OBJECTIVES)}, memory.peak_duplicate_bytes)")
        if keys.count(key) > 1:
            raise UsageError(f"--objective {key} given twice")
    return tuple(keys) or DEFAULT_OBJECTIVES


# --- the grid ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Grid:
    """The distinct policies of a sweep, in grid order (the last --vary changing fastest).

    Combinations with the same knobs are one policy, named by the first of them; the base is
    the combination with its knobs, else an extra policy placed first.
    """

    base: Policy
    varies: tuple[Vary, ...]
    policies: tuple[Policy, ...]
    combinations: int
    base_name: str  # the name of the policy that has the base's knobs


def make_grid(base: Policy, varies: Sequence[Vary]) -> Grid:
    combos = list(itertools.product(*(v.values for v in varies)))
    seen: dict[tuple, Policy] = {}
    for values in combos:
        policy = base.with_sets([f"{v.knob}={value}" for v, value in zip(varies, values,
                                                                          strict=True)])
        seen.setdefault(_knobs(policy), policy)
    if _knobs(base) not in seen:
        seen = {_knobs(base): base, **seen}
    return Grid(base, tuple(varies), tuple(seen.values()), len(combos),
                seen[_knobs(base)].name)


def _knobs(policy: Policy) -> tuple:
    return tuple(policy.knobs().items())


# --- running and ranking -------------------------------------------------------------------


@dataclass(frozen=True)
class Sweep:
    traces: tuple[str, ...]
    grid: Grid
    objectives: tuple[str, ...] = DEFAULT_OBJECTIVES
    platform: str | None = None
    costs: dict[str, int] | None = None


@dataclass(frozen=True)
class Ranked:
    """One policy of a sweep: its totals over all traces and where it stands."""

    policy: Policy
    is_base: bool
    totals: dict[str, int | float]  # every metric: integers summed, ratios averaged over traces
    values: dict[str, int | float]  # objective -> total
    delta: dict[str, int | float]  # objective -> total minus the base's
    dominated_by: str | None  # None: on the frontier
    frontier_traces: tuple[str, ...]  # the traces on whose own frontier it is

    @property
    def name(self) -> str:
        return self.policy.name

    @property
    def on_frontier(self) -> bool:
        return self.dominated_by is None


@dataclass(frozen=True)
class Ranking:
    """A sweep's policies with their totals and standing (the frontier, who dominates whom)."""

    sweep: Sweep
    events: dict[str, int]  # trace path -> events
    ranked: tuple[Ranked, ...]  # in grid order
    results: str | None = None  # where the results table was written

    @property
    def shown(self) -> list[Ranked]:
        """The frontier, then the dominated; each by its objective values, then grid order."""
        order = sorted(range(len(self.ranked)), key=lambda i: (
            not self.ranked[i].on_frontier,
            tuple(self.ranked[i].values[k] for k in self.sweep.objectives), i))
        return [self.ranked[i] for i in order]

    @property
    def base(self) -> Ranked:
        return next(r for r in self.ranked if r.is_base)

    def to_json(self) -> str:
        sweep = self.sweep
        doc = {"schema": SCHEMA_ID, "traces": [{"path": p, "events": self.events[p]}
                                               for p in sweep.traces],
               "base": self.base.name, "objectives": list(sweep.objectives),
               "varied": {v.knob: list(v.values) for v in sweep.grid.varies},
               "combinations": sweep.grid.combinations, "policies": len(self.ranked),
               "results": self.results,
               "ranked": [{"name": r.name, "policy": r.policy.to_json(), "base": r.is_base,
                           "on_frontier": r.on_frontier, "dominated_by": r.dominated_by,
                           "objectives": r.values, "delta": r.delta,
                           "frontier_traces": list(r.frontier_traces), "totals": r.totals}
                          for r in self.shown]}
        return json.dumps(doc, indent=2) + "\n"


def run_sweep(sweep: Sweep, executor: Executor,
              on_row: Callable[[dict[str, Any]], None] | None = None) -> Ranking:
    """Replay every (trace, policy) pair once; rank the policies. A failed pair is exit 3."""
    policies = sweep.grid.policies
    table = run(Fleet(sweep.traces, policies, sweep.platform, sweep.costs), executor, on_row)
    failures = summarize(table, policies).failures
    if failures:
        raise InputError(f"{len(failures)} of {table.num_rows} pairs failed, so the sweep's "
                         f"totals are incomplete; first: {failures[0]['error']}")
    return rank(sweep, table)


def rank(sweep: Sweep, table: pa.Table) -> Ranking:
    """The policies' totals, frontier and per-trace frontier membership from the pairs' rows."""
    policies, objectives = sweep.grid.policies, sweep.objectives
    summaries = summarize(table, policies).policies
    totals = [{**s.totals, **_means(table, p.name)} for s, p in zip(summaries, policies,
                                                                     strict=True)]
    for t in totals:
        t[EXITS_TOTAL] = t["exits.vm_total"] + t["exits.userspace_total"]
    values = [{k: t[k] for k in objectives} for t in totals]
    base = next(i for i, p in enumerate(policies) if p.name == sweep.grid.base_name)
    dominators = frontier([tuple(v.values()) for v in values])
    on_traces = _trace_frontiers(table, sweep)
    ranked = tuple(
        Ranked(p, i == base, totals[i], values[i],
               {k: _round(values[i][k] - values[base][k]) for k in objectives},
               None if d is None else policies[d].name, on_traces[p.name])
        for i, (p, d) in enumerate(zip(policies, dominators, strict=True)))
    events = dict(zip(table["trace.path"].to_pylist(), table["trace.events"].to_pylist(),
                      strict=True))
    return Ranking(sweep, events, ranked)


def _means(table: pa.Table, name: str) -> dict[str, float]:
    mine = table.filter(pc.equal(table["policy.name"], name))
    return {m: round(pc.mean(mine[m]).as_py(), 6) for m in FLOATS}


def _trace_frontiers(table: pa.Table, sweep: Sweep) -> dict[str, tuple[str, ...]]:
    """policy name -> the traces on whose own frontier (of the objectives) it is."""
    on: dict[str, list[str]] = {p.name: [] for p in sweep.grid.policies}
    rows = table.to_pylist()
    for trace in sweep.traces:
        mine = [r for r in rows if r["trace.path"] == trace]
        points = [tuple(_row_value(r, k) for k in sweep.objectives) for r in mine]
        for row, dominator in zip(mine, frontier(points), strict=True):
            if dominator is None:
                on[row["policy.name"]].append(trace)
    return {name: tuple(traces) for name, traces in on.items()}


def _row_value(row: dict[str, Any], key: str) -> int | float:
    if key == EXITS_TOTAL:
        return row["exits.vm_total"] + row["exits.userspace_total"]
    return row[key]


def _round(value: int | float) -> int | float:
    return value if isinstance(value, int) else round(value, 6)


# --- the results table ---------------------------------------------------------------------


def _knob_fields() -> list[pa.Field]:
    return [RESULT_SCHEMA.field(f"policy.{k}") for k in KNOBS]


def results_schema() -> pa.Schema:
    metrics = [RESULT_SCHEMA.field(m) for m in METRICS]
    return pa.schema(
        [("policy.name", pa.string()), *_knob_fields(), ("base", pa.bool_()),
         ("traces", pa.int64()), *metrics, (EXITS_TOTAL, pa.int64()),
         ("on_frontier", pa.bool_()), ("dominated_by", pa.string()),
         ("frontier_traces", pa.list_(pa.string()))],
        metadata={"upmtrace.results": RESULTS_ID})


def results_table(ranking: Ranking) -> pa.Table:
    """One row per policy, in grid order: its knobs, totals over all traces, frontier."""
    sweep = ranking.sweep
    rows = [{"policy.name": r.name, **{f"policy.{k}": v for k, v in r.policy.knobs().items()},
             "base": r.is_base, "traces": len(sweep.traces),
             **{m: r.totals[m] for m in (*METRICS, EXITS_TOTAL)},
             "on_frontier": r.on_frontier, "dominated_by": r.dominated_by,
             "frontier_traces": list(r.frontier_traces)} for r in ranking.ranked]
    schema = results_schema().with_metadata({
        "upmtrace.results": RESULTS_ID,
        "upmtrace.objectives": json.dumps(list(sweep.objectives)),
        "upmtrace.traces": json.dumps(list(sweep.traces))})
    return pa.Table.from_pylist(rows, schema=schema)


def write_results(ranking: Ranking, path: str) -> None:
    table = results_table(ranking)
    write_atomic(path, lambda f: pq.write_table(table, f))

