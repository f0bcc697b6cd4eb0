"""Fleet replay: every (trace, policy) pair of many traces, on a process pool or a Dask cluster.

A worker runs `replay_trace` on its own: it opens the trace file itself (a path or a URL pyarrow
can open), so only a path and the policies travel to it, replays the trace once for all of them
(upmtrace.replay_many), and returns one flat row per policy: the report keys with dotted
names. Rows are gathered as they complete and written sorted by (trace path,
policy order), so every executor (upmtrace.fleet.executors) gives the same bytes.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from glob import glob
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from upmtrace.atomic import write_atomic
from upmtrace.costs import DEFAULTS as COSTS
from upmtrace.errors import InputError, UpmtraceError, UsageError
from upmtrace.fleet.executors import Executor, one_line
from upmtrace.policy import KNOBS, Policy, check_distinct
from upmtrace.trace.io import IMPORT_HINT

RESULTS_ID = "upmtrace.fleet-results.v1"  # the results table (Parquet schema metadata)
TRACE_SUFFIXES = (".parquet", ".arrow", ".feather", ".jsonl", ".csv")

# --- the result table: one row per pair, the report keys flattened --------------------

METRICS: tuple[str, ...] = (
    "exits.userspace.KVM_EXIT_MEMORY_FAULT", "exits.userspace.KVM_EXIT_HYPERCALL",
    "exits.userspace_total",
    "exits.vm.npf", "exits.vm.vmgexit", "exits.vm.tdvmcall", "exits.vm.vmcall", "exits.vm_total",
    "npf.recorded", "npf.avoided", "npf.mmio", "npf.unresolvable",
    "conversions.implicit", "conversions.set_attributes_calls",
    "conversions.to_private_pages", "conversions.to_shared_pages",
    "psc.requests", "psc.entries", "psc.skipped", "psc.invalid",
    "memory.peak_resident_bytes", "memory.peak_shared_bytes", "memory.peak_private_bytes",
    "memory.peak_duplicate_bytes", "memory.final_resident_bytes", "memory.touched_bytes",
    "memory.ratio_to_touched", "memory.pages_allocated", "memory.pages_freed",
    "gmem.folio_splits",
    "rmp.updates_4k", "rmp.updates_2m", "rmp.psmash",
    "directmap.splits", "directmap.restores",
    "mappings.4k", "mappings.2m",
    "host_access.pages", "host_access.stale", "host_access.faults",
    "populate.calls", "populate.pages", "populate.skipped_pages",
    "vfio.dma_map_calls", "vfio.dma_unmap_calls", "vfio.pinned_peak_bytes",
    "vfio.pinned_final_bytes", "vfio.pages_pinned",
    "cost.total_ns", *(f"cost.by_category.{name}" for name in COSTS),
)
FLOATS = frozenset({"memory.ratio_to_touched"})
TOTALLED = tuple(m for m in METRICS if m not in FLOATS)  # summed over a fleet


def _knob_type(knob: str) -> pa.DataType:
    allowed = KNOBS[knob][0]
    return pa.bool_() if allowed is bool else pa.int64() if allowed is int else pa.string()


RESULT_SCHEMA = pa.schema(
    [("trace.path", pa.string()), ("trace.sha256", pa.string()), ("trace.events", pa.int64()),
     ("trace.platform", pa.string()), ("policy.name", pa.string()),
     *((f"policy.{k}", _knob_type(k)) for k in KNOBS),
     *((m, pa.float64() if m in FLOATS else pa.int64()) for m in METRICS),
     ("recorded", pa.string()),  # the trace's recorded counts as JSON ({} when none)
     ("error", pa.string())],  # null, or why the pair failed (one line)
    metadata={"upmtrace.results": RESULTS_ID},
)


# --- pairs ---------------------------------------------------------------------------------


def find_traces(args: Sequence[str], exclude: Sequence[str] = ()) -> list[str]:
    """The trace files named by files, globs, folders and URLs: each once, sorted."""
    skip = {os.path.abspath(p) for p in exclude}
    found: dict[str, None] = {}
    for arg in args:
        for path in _expand(arg):
            if _is_url(path) or os.path.abspath(path) not in skip:
                found.setdefault(path if _is_url(path) else os.path.normpath(path))
    if not found:
        raise InputError("no trace to replay (only the results file was named)")
    return sorted(found)


def _expand(arg: str) -> list[str]:
    if _is_url(arg):
        return [_check_suffix(arg)]
    if os.path.isdir(arg):
        files = sorted(entry.path for entry in os.scandir(arg)
                       if _is_trace_name(entry.name) and entry.is_file())
        if not files:
            raise InputError(f"folder holds no trace files (*{', *'.join(TRACE_SUFFIXES)})",
                             path=arg)
        return files
    if any(c in arg for c in "*?["):
        files = sorted(p for p in glob(arg, recursive=True)
                       if _is_trace_name(os.path.basename(p)) and os.path.isfile(p))
        if not files:
            raise InputError(f"no trace file matches {arg!r} "
                             f"(*{', *'.join(TRACE_SUFFIXES)})")
        return files
    if os.path.isfile(arg):
        return [_check_suffix(arg)]
    raise InputError("no such file or folder", path=arg)


def _is_url(path: str) -> bool:
    return "://" in path


def _is_trace_name(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(TRACE_SUFFIXES)


def _check_suffix(path: str) -> str:
    if not path.lower().endswith(TRACE_SUFFIXES):
        raise InputError(f"not a trace file name (expected *{', *'.join(TRACE_SUFFIXES)}); "
                         f"{IMPORT_HINT}", path=path)
    return path


def check_policies(policies: Sequence[Policy]) -> None:
    if not policies:
        raise UsageError("fleet needs at least one --policy")
    check_distinct(policies, "result rows are keyed by policy name")


# --- the worker ----------------------------------------------------------------------------

# replay_trace's arguments: a trace, the policies (as JSON) it is replayed under, platform, costs
Job = tuple[str, list[dict[str, Any]], str | None, dict[str, int] | None]


def replay_trace(path: str, policies_json: list[dict[str, Any]], platform: str | None,
                 costs: dict[str, int] | None) -> list[dict[str, Any]]:
    """Read the trace at `path` once and replay it under every policy (replay_many: the trace
    is read, validated and decoded once); one result row per policy, in order. Never raises.

    A trace that fails (unreadable or invalid, or anything else) gives every policy a row whose
    `error` says why in one line, its metric columns null.
    """
    from upmtrace.engine import replay_many
    from upmtrace.trace.io import read_trace

    policies = [Policy(**policy_json) for policy_json in policies_json]
    rows = [_blank_row(path, policy.to_json()) for policy in policies]
    try:
        with _opened(path) as local:
            try:
                reports = [r.report for r in replay_many(read_trace(local, platform=platform),
                                                         policies, costs=costs)]
            except UpmtraceError as err:
                raise UpmtraceError(str(err).replace(local, path)) from None
    except UpmtraceError as err:
        return [{**row, "error": one_line(str(err))} for row in rows]
    except Exception as err:  # a bug must not stop the fleet: it is these pairs' error
        error = one_line(f"{path}: internal error: {type(err).__name__}: {err}")
        return [{**row, "error": error} for row in rows]
    for row, report in zip(rows, reports, strict=True):
        flat = dict(flatten(report))
        row.update({name: flat[name] for name in ("trace.sha256", "trace.events",
                                                   "trace.platform", *METRICS)})
        row["recorded"] = json.dumps(report.get("recorded") or {}, sort_keys=True)
    return rows


def _blank_row(path: str, policy_json: dict[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = dict.fromkeys(RESULT_SCHEMA.names)
    row.update({"trace.path": path, **{f"policy.{k}": v for k, v in policy_json.items()}})
    return row


@contextmanager
def _opened(path: str) -> Iterator[str]:
    """A local file holding the trace: the path itself, or a copy of what a URL names."""
    if not _is_url(path):
        yield path
        return
    from pyarrow import fs

    with tempfile.TemporaryDirectory(prefix="upmtrace-") as tmp:
        local = os.path.join(tmp, "trace" + Path(path).suffix)
        try:
            filesystem, inner = fs.FileSystem.from_uri(path)
            with filesystem.open_input_stream(inner) as src, open(local, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        except (pa.ArrowException, OSError, ValueError) as err:
            raise InputError(f"cannot open ({one_line(str(err))})", path=path) from None
        yield local


def flatten(node: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in node.items():
        if isinstance(value, dict):
            yield from flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def failed_rows(job: Job, error: str) -> list[dict[str, Any]]:
    """The rows of a job whose worker never answered (it died, or the cluster lost it)."""
    path, policies_json = job[0], job[1]
    return [{**_blank_row(path, policy_json), "error": one_line(f"{path}: {error}")}
            for policy_json in policies_json]


# --- running a fleet -----------------------------------------------------------------------


@dataclass(frozen=True)
class Fleet:
    """What to replay: traces (sorted) x policies (in order), with the shared options."""

    traces: tuple[str, ...]
    policies: tuple[Policy, ...]
    platform: str | None = None
    costs: dict[str, int] | None = None

    def pairs(self) -> list[tuple[str, Policy]]:
        return [(trace, policy) for trace in self.traces for policy in self.policies]


def run(fleet: Fleet, executor: Executor,
        on_row: Callable[[dict[str, Any]], None] | None = None) -> pa.Table:
    """Replay every pair; the results table in (trace path, policy order) order.

    Each job replays one trace under a group of its policies in one pass (replay_trace). A
    trace's policies are split into as many groups as it takes to give every worker a job,
    and no more: fewer groups share more of the reading and decoding."""
    check_policies(fleet.policies)
    pairs = fleet.pairs()
    groups = _groups(len(fleet.traces), len(fleet.policies), getattr(executor, "workers", 1))
    jobs: list[Job] = []
    members: list[list[int]] = []  # the pair indices of each job
    for t, trace in enumerate(fleet.traces):
        sent = trace if _is_url(trace) else os.path.abspath(trace)
        for group in groups:
            jobs.append((sent, [fleet.policies[p].to_json() for p in group], fleet.platform,
                         fleet.costs))
            members.append([t * len(fleet.policies) + p for p in group])
    rows: list[dict[str, Any] | None] = [None] * len(pairs)
    for index, outcome in executor.run(replay_trace, jobs):
        job = jobs[index]
        got = outcome.value if outcome.error is None else failed_rows(job, outcome.describe())
        for pair, row in zip(members[index], got, strict=True):
            rows[pair] = _relabel(row, pairs[pair][0], job[0])
            if on_row is not None:
                on_row(rows[pair])
    return pa.Table.from_pylist(rows, schema=RESULT_SCHEMA)


def _groups(traces: int, policies: int, workers: int) -> list[list[int]]:
    """Policy indices split into contiguous groups: one group per trace when there are at
    least as many traces as workers, else enough groups per trace to keep every worker busy."""
    count = max(1, min(policies, -(-max(1, workers) // max(1, traces))))
    bounds = [i * policies // count for i in range(count + 1)]  # sizes differ by one at most
    return [list(range(a, b)) for a, b in zip(bounds, bounds[1:], strict=False)]


def _relabel(row: dict[str, Any], shown: str, sent: str) -> dict[str, Any]:
    """The row under the path as the user named it (workers were sent an absolute one)."""
    error = row.get("error")
    return {**row, "trace.path": shown, "error": error.replace(sent, shown) if error else error}


def write_results(table: pa.Table, path: str) -> None:
    write_atomic(path, lambda f: pq.write_table(table, f))


def check_output(path: str) -> None:
    """The results file's name: Parquet (whether it can be written is checked with every other
    output, by upmtrace.atomic.check_outputs)."""
    if not path.lower().endswith(".parquet"):
        raise UsageError(f"-o {path}: results are written as Parquet (name it *.parquet)")
