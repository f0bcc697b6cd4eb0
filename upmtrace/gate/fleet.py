"""The CI gate on fleet totals (`upmtrace fleet check`): check.py's rule, per policy and metric.

The baseline (schema upmtrace.fleet-baseline.v1) records the traces (path and sha256), the
policies (name and knobs), every integer total per policy, and what it guards:

    {"schema": "upmtrace.fleet-baseline.v1",
     "guard": {"metrics": ["exits.vm_total", ...], "tolerance": 0},
     "platform": null,
     "policies": [{"name": "eager", "dealloc": "eager", ...}, ...],
     "traces": [{"path": "traces/a.parquet", "sha256": "..."}, ...],
     "totals": {"eager": {"exits.vm_total": 123, ...}, ...},
     "per_trace": {"eager": {"traces/a.parquet": {"exits.vm_total": 100, ...}, ...}, ...}}

`per_trace` (the guarded metrics of each trace) lets a regression name the traces behind it; a
baseline written before it existed still gates the totals.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from upmtrace.atomic import write_text
from upmtrace.errors import InputError, PolicyError, UpmtraceError, UsageError
from upmtrace.fleet.executors import Executor
from upmtrace.fleet.pairs import TOTALLED, Fleet, run
from upmtrace.fleet.summary import summarize
from upmtrace.gate.baseline import is_percentage, loads
from upmtrace.gate.check import (
    DEFAULT_METRICS,
    GateOptions,
    Outcome,
    TraceDelta,
    Verdict,
    status,
)
from upmtrace.policy import PRESETS, Policy, load_policy, parse_overrides

SCHEMA_ID = "upmtrace.fleet-baseline.v1"


@dataclass(frozen=True)
class FleetBaseline:
    metrics: tuple[str, ...]
    tolerance: Fraction
    policies: tuple[Policy, ...]
    traces: tuple[dict[str, str], ...]  # {"path", "sha256"}, sorted by path
    totals: dict[str, dict[str, int]]  # policy name -> metric -> total
    platform: str | None = None
    path: str | None = None
    per_trace: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)

    def to_json(self) -> str:
        t = self.tolerance
        doc = {"schema": SCHEMA_ID,
               "guard": {"metrics": list(self.metrics),
                         "tolerance": int(t) if t.denominator == 1 else float(t)},
               "platform": self.platform,
               "policies": [p.to_json() for p in self.policies],
               "traces": list(self.traces), "totals": self.totals,
               "per_trace": self.per_trace}
        return json.dumps(doc, indent=2) + "\n"


@dataclass(frozen=True)
class Request(GateOptions):
    """The `fleet check` options."""

    policy_specs: tuple[str, ...] = ()  # empty: the baseline's policies


OnRow = Callable[[dict[str, Any]], None] | None


# --- reading the baseline ------------------------------------------------------------------


def read_fleet_baseline(path: str) -> FleetBaseline:
    try:
        doc = loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError("no such fleet baseline (create it with --update)", path=path) from None
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"cannot read fleet baseline: {err}", path=path) from None
    except json.JSONDecodeError as err:
        raise InputError(f"fleet baseline is not JSON: {err}", path=path) from None
    except (ValueError, RecursionError) as err:  # a 5000-digit number, deep nesting
        raise InputError(f"fleet baseline is not JSON: {str(err).split(';')[0]}",
                         path=path) from None
    except InputError as err:  # NaN, Infinity, a number that overflows
        raise InputError(str(err).replace("baseline", "fleet baseline", 1), path=path) from None
    try:
        return parse_fleet_baseline(doc, path)
    except (InputError, PolicyError, TypeError, KeyError, AttributeError) as err:
        raise InputError(f"not a valid fleet baseline: {err}", path=path) from None


def parse_fleet_baseline(doc: Any, path: str | None = None) -> FleetBaseline:
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA_ID:
        raise InputError(f"expected schema {SCHEMA_ID!r}")
    guard = doc["guard"]
    metrics, tolerance = guard["metrics"], guard.get("tolerance", 0)
    if not isinstance(metrics, list) or not metrics or not set(metrics) <= set(TOTALLED):
        raise InputError("guard.metrics must be a non-empty list of fleet total keys")
    if not is_percentage(tolerance):
        raise InputError("guard.tolerance must be a percentage >= 0")
    policies = tuple(Policy(**p) for p in doc["policies"])
    totals = doc["totals"]
    if not policies or any(set(metrics) - set(totals[p.name]) for p in policies):
        raise InputError("totals lack a guarded metric of a policy")
    traces = tuple({"path": str(t["path"]), "sha256": str(t["sha256"])} for t in doc["traces"])
    per_trace = doc.get("per_trace", {})
    if not isinstance(per_trace, dict) or not all(
            isinstance(v, dict) and all(isinstance(m, dict) for m in v.values())
            for v in per_trace.values()):
        raise InputError("per_trace must map policy -> trace -> metric -> value")
    return FleetBaseline(tuple(metrics), Fraction(str(tolerance)), policies, traces, totals,
                         doc.get("platform"), path, per_trace)


# --- check and update ----------------------------------------------------------------------


def check(traces: Sequence[str], request: Request, executor: Executor,
          on_row: OnRow = None) -> tuple[Outcome, pa.Table]:
    """Replay the fleet as the baseline was and compare the guarded totals of every policy."""
    base = read_fleet_baseline(request.baseline)
    if request.platform is not None and request.platform != base.platform:
        raise UpmtraceError(f"--platform {request.platform} is not the baseline's "
                            f"({base.platform or 'each trace its own'}; {request.baseline}); "
                            "use --update to re-baseline")
    policies = _policies(request, base)
    table = _replay(traces, policies, base.platform, request, executor, on_row)
    changed = _fleet_changed(table, policies[0], base)
    if changed and not request.allow_trace_change:
        raise UpmtraceError(f"the fleet is not the baseline's ({changed}; {request.baseline}); "
                            "pass --allow-trace-change to accept it, or --update to "
                            "re-baseline")
    metrics = expand_metrics(request.metrics) if request.metrics else base.metrics
    tolerance = base.tolerance if request.tolerance is None else request.tolerance
    now = {p.name: p.totals for p in summarize(table, policies).policies}
    verdicts = tuple(
        Verdict(f"{name}:{key}", base.totals[name][key], now[name][key],
                status(base.totals[name][key], now[name][key], tolerance))
        for name in now for key in metrics)
    knobs = _knob_changes(base, policies)
    behind = _trace_deltas(table, policies, [v for v in verdicts if v.status == "regressed"],
                           base.per_trace)
    outcome = Outcome(verdicts, tolerance, ", ".join(now), request.baseline,
                      f"a fleet of {len(set(table['trace.path'].to_pylist()))} traces",
                      bool(changed), knobs, behind)
    return outcome, table


def update(traces: Sequence[str], request: Request, executor: Executor,
           on_row: OnRow = None) -> tuple[FleetBaseline, pa.Table]:
    """Replay and write the baseline atomically; an existing one lends policies and guard."""
    try:
        old: FleetBaseline | None = read_fleet_baseline(request.baseline)
    except InputError:
        old = None  # missing or broken: --update is how it gets replaced
    if request.policy_specs:
        policies = tuple(load_policy(s, request.overrides) for s in request.policy_specs)
    else:
        policies = tuple(p.with_sets(request.overrides)
                         for p in (old.policies if old else (PRESETS["eager"],)))
    platform = request.platform if request.platform is not None else (
        old.platform if old else None)
    table = _replay(traces, policies, platform, request, executor, on_row)
    summary = summarize(table, policies)
    wanted = request.metrics or (old.metrics if old else DEFAULT_METRICS)
    tolerance = request.tolerance if request.tolerance is not None else (
        old.tolerance if old else Fraction(0))
    rows = _rows_of(table, policies[0])
    listed = tuple({"path": p, "sha256": s} for p, s in
                   zip(rows["trace.path"].to_pylist(), rows["trace.sha256"].to_pylist(),
                       strict=True))
    metrics = expand_metrics(wanted)
    baseline = FleetBaseline(metrics, tolerance, policies, listed,
                             {p.name: p.totals for p in summary.policies}, platform,
                             request.baseline, _per_trace(table, policies, metrics))
    write_text(request.baseline, baseline.to_json(), make_parents=True)
    return baseline, table


def expand_metrics(keys: Sequence[str]) -> tuple[str, ...]:
    """Keys of fleet totals; a section ('exits', 'memory') stands for every total under it."""
    leaves: list[str] = []
    for key in keys:
        found = [m for m in TOTALLED if m == key or m.startswith(key + ".")]
        if not found:
            raise UsageError(f"--metric {key!r}: not a fleet total (keys are dotted, e.g. "
                             "exits.vm_total, or a section such as exits)")
        leaves += [m for m in found if m not in leaves]
    return tuple(leaves)


def _policies(request: Request, base: FleetBaseline) -> tuple[Policy, ...]:
    """The guarded policies; --set edits their knobs and keeps their names (as in `check`)."""
    edits = parse_overrides(request.overrides)
    if not request.policy_specs:
        return tuple(p.with_overrides(edits) for p in base.policies)
    policies = tuple(load_policy(s).with_overrides(edits) for s in request.policy_specs)
    known = [p.name for p in base.policies]
    for policy in policies:
        if policy.name not in known:
            raise UpmtraceError(f"--policy {policy.name!r} is not in the baseline "
                                f"({', '.join(known)}; {request.baseline}); use --update to "
                                "re-baseline")
    return policies


def _replay(traces: Sequence[str], policies: tuple[Policy, ...], platform: str | None,
            request: Request, executor: Executor, on_row: OnRow) -> pa.Table:
    table = run(Fleet(tuple(traces), policies, platform, request.costs), executor, on_row)
    failures = summarize(table, policies).failures
    if failures:
        first = failures[0]
        raise UpmtraceError(f"{len(failures)} of {table.num_rows} pairs failed, so the fleet "
                            f"totals are incomplete; first: {first['error']} "
                            f"(policy {first['policy']})")
    return table


def _rows_of(table: pa.Table, policy: Policy) -> pa.Table:
    """One policy's rows: one per trace."""
    return table.filter(pc.equal(table["policy.name"], policy.name))


def _fleet_changed(table: pa.Table, policy: Policy, base: FleetBaseline) -> str:
    """'' when the traces (by sha256) are the baseline's, else what changed."""
    now = Counter(_rows_of(table, policy)["trace.sha256"].to_pylist())
    was = Counter(t["sha256"] for t in base.traces)
    new, gone = sum((now - was).values()), sum((was - now).values())
    return "" if not new and not gone else f"{new} traces new, {gone} gone"


def _per_trace(table: pa.Table, policies: Sequence[Policy],
               metrics: Sequence[str]) -> dict[str, dict[str, dict[str, int]]]:
    """policy -> trace path -> guarded metric -> value."""
    out: dict[str, dict[str, dict[str, int]]] = {}
    for policy in policies:
        rows = _rows_of(table, policy).select(["trace.path", *metrics]).to_pylist()
        out[policy.name] = {row.pop("trace.path"): row for row in rows}
    return out


def _trace_deltas(table: pa.Table, policies: Sequence[Policy], regressed: Sequence[Verdict],
                  before: dict[str, dict[str, dict[str, int]]]) -> tuple[TraceDelta, ...]:
    """For each regressed total, the traces whose value grew (or that are new), most first.

    Without per-trace values in the baseline every trace of the policy is listed as new."""
    now = _per_trace(table, policies, sorted({v.metric.rpartition(":")[2] for v in regressed}))
    found: list[TraceDelta] = []
    for verdict in regressed:
        name, _, key = verdict.metric.rpartition(":")
        grown = [TraceDelta(verdict.metric, path, before.get(name, {}).get(path, {}).get(key),
                            values[key]) for path, values in now[name].items()]
        grown = [d for d in grown if d.baseline is None or d.now > d.baseline]
        found += sorted(grown, key=lambda d: (-d.delta, d.trace))
    return tuple(found)


def _knob_changes(base: FleetBaseline, policies: Sequence[Policy]) -> dict[str, tuple]:
    before = {p.name: p.knobs() for p in base.policies}
    return {f"{p.name}.{k}": (before[p.name][k], v) for p in policies
            for k, v in p.knobs().items() if before[p.name][k] != v}
