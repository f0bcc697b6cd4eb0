"""Replaying a trace: the row-by-row reference loop (reference.py) and the batch core (fast.py).

`replay` runs one policy; `replay_many` decodes the trace once and feeds every policy from it.
"""

from __future__ import annotations

import copy

import pyarrow as pa

from upmtrace.engine.fast import run_batches
from upmtrace.engine.reference import BATCH_ROWS, COLS, Engine, Result, batch_rows_of
from upmtrace.policy import PRESETS, Policy
from upmtrace.timeline import Timeline
from upmtrace.timing import add_timing
from upmtrace.trace.schema import Platform


def _open(trace, batch_rows: int, platform: str | None):
    """(record batches, trace info, recorded metadata, platform) of a Trace or a bare table."""
    if isinstance(trace, pa.Table):
        batches = trace.select(list(COLS)).to_batches(max_chunksize=batch_rows)
        info, recorded = {"path": None, "sha256": None, "events": trace.num_rows}, None
        plat = Platform(platform or "snp")
    else:
        batches, recorded = trace.batches(batch_rows), trace.recorded
        plat = Platform(platform or trace.platform)
        info = {"path": trace.path, "sha256": trace.sha256, "events": trace.events}
    info["platform"] = plat.value
    return batches, info, recorded, plat


def replay(trace, policy: Policy | None = None, *, platform: str | None = None,
           costs: dict[str, int] | None = None, paranoid: bool = False,
           batch_rows: int = BATCH_ROWS, timeline: Timeline | None = None,
           reference: bool = False, by_vcpu: bool = False) -> Result:
    """Replay a Trace (or a bare SCHEMA table) under a policy; returns the report
    (docs/report.md).

    The batch path (upmtrace.engine.fast) is used unless `reference` or `paranoid` asks for the
    row-by-row reference loop; both give the same report.
    """
    policy = policy or PRESETS["eager"]
    batches, info, recorded, plat = _open(trace, batch_rows, platform)
    engine = Engine(policy, plat, paranoid=paranoid, timeline=timeline)
    if reference or paranoid:
        engine.run(row for batch in batches for row in batch_rows_of(batch))
    else:
        run_batches(engine, batches)
    report = engine.report(info, recorded, costs)
    add_timing(report, trace, plat, recorded, per_vcpu=by_vcpu)  # the recorded time, if any
    return Result(report)


def replay_many(trace, policies: list[Policy], *, platform: str | None = None,
                costs: dict[str, int] | None = None,
                batch_rows: int = BATCH_ROWS) -> list[Result]:
    """Replay one trace under every policy in one pass: each record batch is read, validated
    and decoded once and fed to one engine per policy. Results in policy order, each the same
    report `replay` gives."""
    if not policies:
        return []
    batches, info, recorded, plat = _open(trace, batch_rows, platform)
    engines = [Engine(policy, plat) for policy in policies]
    run_batches(engines, batches)
    reports = [engine.report(dict(info), recorded, costs) for engine in engines]
    first = reports[0]
    add_timing(first, trace, plat, recorded)  # the recorded time: the same under every policy
    for report in reports[1:]:
        report["recorded"] = copy.deepcopy(first["recorded"])
        if "timing" in first:
            report["timing"] = copy.deepcopy(first["timing"])
    return [Result(report) for report in reports]


__all__ = ["Engine", "Result", "replay", "replay_many"]
