"""replay --timeline: bounded samples whose last row is the final state of the report."""

from __future__ import annotations

import json

import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from click.testing import CliRunner
from scenario import K, M, attrs, memslot, npf, psc, table

from upmtrace.cli import cli
from upmtrace.trace.io import write_trace


def long_trace(path, pages=600):
    rows = [memslot(0, 0, 4 * M), attrs(0, 4 * M)]
    for g in range(pages):
        rows.append(npf(g * 4 * K, True))
        if g % 50 == 49:
            rows.append(psc((g - 49) * 4 * K, 50 * 4 * K, "shared", req=g))
    write_trace(table(*rows), path)
    return len(rows)


def test_timeline_is_bounded_and_ends_at_the_final_state(tmp_path):
    trace, out = tmp_path / "t.parquet", tmp_path / "tl.parquet"
    events = long_trace(trace)
    result = CliRunner().invoke(cli, ["replay", str(trace), "--format", "json", "--timeline",
                                      str(out), "--timeline-rows", "20"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    tl = pq.read_table(out).to_pylist()
    assert 2 <= len(tl) <= 22
    last = tl[-1]
    assert last["events"] == events
    assert last["resident_bytes"] == report["memory"]["final_resident_bytes"]
    assert last["exits.vm.npf"] == report["exits"]["vm"]["npf"]
    assert last["exits.userspace.KVM_EXIT_HYPERCALL"] == 12
    assert max(r["resident_bytes"] for r in tl) <= report["memory"]["peak_resident_bytes"]
    for a, b in zip(tl, tl[1:], strict=False):
        assert a["ts"] <= b["ts"] and a["exits.vm.npf"] <= b["exits.vm.npf"]


def test_timeline_csv_and_bad_suffix(tmp_path):
    trace = tmp_path / "t.parquet"
    long_trace(trace, pages=60)
    out = tmp_path / "tl.csv"
    ok = CliRunner().invoke(cli, ["replay", str(trace), "--timeline", str(out)])
    assert ok.exit_code == 0
    assert pacsv.read_csv(out).num_rows == 61 + 2  # every event is its own sample here
    bad = CliRunner().invoke(cli, ["replay", str(trace), "--timeline", str(tmp_path / "x.txt")])
    assert bad.exit_code == 2
    want = f"Error: --timeline {tmp_path / 'x.txt'}: use a .parquet or .csv file"
    assert bad.output.strip() == want
