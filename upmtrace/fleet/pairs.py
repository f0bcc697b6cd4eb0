"""Fleet replay: every (trace, policy) pair of many traces, on a process pool or a Dask cluster.

A worker runs `replay_pair` on its own: it opens the trace file itself (a path or a URL pyarrow
can open), so only a path and a policy travel to it, and it returns one flat row: the report
keys with dotted names. Rows are gathered as they complete and written sorted by (trace path,
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

Job = tuple[str, dict[str, Any], str | None, dict[str, int] | None]  # replay_pair's arguments


def replay_pair(path: str, policy_json: dict[str, Any], platform: str | None,
                costs: dict[str, int] | None) -> dict[str, Any]:
    """Read the trace at `path`, replay it under the policy; one result row, never raises.

    A pair that fails (unreadable or invalid trace, or anything else) is a row whose `error`
    says why in one line, its metric columns null.
    """
    from upmtrace.engine import replay
    from upmtrace.trace.io import read_trace

    policy = Policy(**policy_json)
    row: dict[str, Any] = dict.fromkeys(RESULT_SCHEMA.names)
    row.update({"trace.path": path, **{f"policy.{k}": v for k, v in policy.to_json().items()}})
    try:
        with _opened(path) as local:
            try:
                report = replay(read_trace(local, platform=platform), policy,
                                costs=costs).report
            except UpmtraceError as err:
                raise UpmtraceError(str(err).replace(local, path)) from None
    except UpmtraceError as err:
        return {**row, "error": one_line(str(err))}
    except Exception as err:  # a bug must not stop the fleet: it is this pair's error
        return {**row, "error": one_line(f"{path}: internal error: {type(err).__name__}: {err}")}
    flat = dict(flatten(report))
    row.update({name: flat[name] for name in ("trace.sha256", "trace.events", "trace.platform",
                                               *METRICS)})
    row["recorded"] = json.dumps(report.get("recorded") or {}, sort_keys=True)
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


def failed_row(job: Job, error: str) -> dict[str, Any]:
    """The row of a pair whose worker never answered (it died, or the cluster lost it)."""
    path, policy_json = job[0], job[1]
    return {**dict.fromkeys(RESULT_SCHEMA.names), "trace.path": path,
            **{f"policy.{k}": v for k, v in policy_json.items()},
            "error": one_line(f"{path}: {error}")}


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
    """Replay every pair; the results table in (trace path, policy order) order."""
    check_policies(fleet.policies)
    pairs = fleet.pairs()
    sent = [trace if _is_url(trace) else os.path.abspath(trace) for trace, _ in pairs]
    jobs: list[Job] = [(path, policy.to_json(), fleet.platform, fleet.costs)
                       for path, (_, policy) in zip(sent, pairs, strict=True)]
    rows: list[dict[str, Any] | None] = [None] * len(jobs)
    for index, outcome in executor.run(replay_pair, jobs):
        row = outcome.value if outcome.error is None else failed_row(jobs[index],
                                                                     outcome.describe())
        rows[index] = _relabel(row, pairs[index][0], sent[index])
        if on_row is not None:
            on_row(rows[index])
    return pa.Table.from_pylist(rows, schema=RESULT_SCHEMA)


def _relabel(row: dict[str, Any], shown: str, sent: str) -> dict[str, Any]:
    """The row under the path as the user named it (workers were sent an absolute one)."""
    error = row.get("error")
    return {**row, "trace.path": shown, "error": error.replace(sent, shown) if error else error}


def write_results(table: pa.Table, path: str) -> None:
    write_atomic(path, lambda f: pq.write_table(table, f))


def check_output(path: str) -> None:
    """Fail before replaying anything when the results file cannot be what we write."""
    if not path.lower().endswith(".parquet"):
        raise UsageError(f"-o {path}: results are written as Parquet (name it *.parquet)")
    folder = os.path.dirname(path) or "."
    if not os.path.isdir(folder):
        raise UsageError(f"-o {path}: no such folder {folder!r}")
