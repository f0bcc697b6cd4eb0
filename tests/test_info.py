"""`upmtrace info` and summarize() on a small known trace."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from upmtrace.cli import cli
from upmtrace.report.info import RENDERERS
from upmtrace.trace.info import summarize
from upmtrace.trace.io import from_rows, read_trace, write_trace

GIB, MIB = 1 << 30, 1 << 20
ROWS = [
    {"ts": 1000, "kind": "memslot", "slot": 0, "gpa": 0, "size": 2 * GIB, "gmem": True},
    {"ts": 1000, "kind": "memslot", "slot": 1, "gpa": 4 * GIB, "size": 64 * MIB},
    {"ts": 1100, "kind": "set_attributes", "gpa": 0, "size": 2 * GIB, "private": True},
    {"ts": 2000, "kind": "npf", "vcpu": 3, "gpa": 0x1000, "private": False},
    {"ts": 2500, "kind": "npf", "vcpu": 0, "gpa": 0x2000, "private": True},
    {"ts": 3000, "kind": "psc", "vcpu": 1, "req": 0, "gpa": 0, "size": 4096, "op": "shared"},
    {"ts": 3000, "kind": "psc", "vcpu": 1, "req": 0, "gpa": 4096, "size": 4096,
     "op": "shared"},
    {"ts": 4000, "kind": "memslot", "slot": 1, "gpa": 8 * GIB, "size": 128 * MIB},
    {"ts": 5000, "kind": "host_access", "vcpu": -1, "gpa": 0, "size": 64, "agent": "virtio"},
    {"ts": 1_500_001_000, "kind": "memslot", "slot": 0, "gpa": 0, "size": 0},
]
RECORDED = {"exits": {"userspace": {"KVM_EXIT_HYPERCALL": 1}}}


@pytest.fixture(autouse=True)
def _fixed_width(monkeypatch):
    monkeypatch.setenv("COLUMNS", "120")


@pytest.fixture
def trace_path(tmp_path):
    path = tmp_path / "small.parquet"
    write_trace(from_rows(ROWS), path, platform="tdx", source="hand made", recorded=RECORDED)
    return path


def test_summarize(trace_path):
    trace = read_trace(trace_path)
    summary = summarize(trace)
    assert list(summary) == ["path", "sha256", "platform", "source", "events",
                             "events_by_kind", "vcpus", "time", "memslots", "memslot_bytes",
                             "gmem_bytes", "populate_bytes", "recorded"]
    assert summary["path"] == str(trace_path)
    assert summary["sha256"] == trace.sha256
    assert (summary["platform"], summary["source"], summary["events"]) == ("tdx", "hand made", 10)
    assert summary["events_by_kind"] == {"memslot": 4, "set_attributes": 1, "npf": 2, "psc": 2,
                                         "map_gpa": 0, "host_access": 1, "populate": 0}
    assert summary["vcpus"] == [0, 1, 3]
    assert summary["time"] == {"first_ts": 1000, "last_ts": 1_500_001_000,
                               "duration_ns": 1_500_000_000}
    assert summary["memslots"] == [
        {"event": 1, "slot": 0, "action": "add", "gpa": 0, "size": 2 * GIB, "gmem": True},
        {"event": 2, "slot": 1, "action": "add", "gpa": 4 * GIB, "size": 64 * MIB,
         "gmem": False},
        {"event": 8, "slot": 1, "action": "move", "gpa": 8 * GIB, "size": 128 * MIB,
         "gmem": False},
        {"event": 10, "slot": 0, "action": "delete", "gpa": 0, "size": 0, "gmem": False},
    ]
    assert (summary["memslot_bytes"], summary["gmem_bytes"]) == (128 * MIB, 0)
    assert summary["recorded"] == RECORDED


def test_json_output(trace_path):
    result = CliRunner().invoke(cli, ["info", str(trace_path), "--format", "json"])
    assert result.exit_code == 0, result.output
    assert result.stdout.endswith("}\n")
    doc = json.loads(result.stdout)
    assert doc["path"] == str(trace_path) and len(doc["sha256"]) == 64
    assert (doc["platform"], doc["source"], doc["events"]) == ("tdx", "hand made", 10)
    assert doc["events_by_kind"] == {"memslot": 4, "set_attributes": 1, "npf": 2, "psc": 2,
                                     "map_gpa": 0, "host_access": 1, "populate": 0}
    assert doc["vcpus"] == [0, 1, 3]
    assert doc["time"] == {"first_ts": 1000, "last_ts": 1_500_001_000,
                           "duration_ns": 1_500_000_000}
    assert [(m["event"], m["action"]) for m in doc["memslots"]] == [
        (1, "add"), (2, "add"), (8, "move"), (10, "delete")]
    assert (doc["memslot_bytes"], doc["gmem_bytes"]) == (128 * MIB, 0)
    assert doc["recorded"] == RECORDED


def test_table_output(trace_path):
    result = CliRunner().invoke(cli, ["info", str(trace_path)])
    assert result.exit_code == 0, result.output
    out = result.stdout
    for expected in ("tdx", "hand made", "0-1, 3 (3)", "1.500000000 s", "128.0 MiB",
                     "0x200000000", "0x208000000", "move", "delete",
                     "exits.userspace.KVM_EXIT_HYPERCALL"):
        assert expected in out, expected
    kinds = {line.split()[1]: line.split()[3] for line in out.splitlines()
             if line.startswith("│") and line.split()[1] in summarize(read_trace(trace_path))
             ["events_by_kind"]}
    assert kinds == {"memslot": "4", "set_attributes": "1", "npf": "2", "psc": "2",
                     "map_gpa": "0", "host_access": "1", "populate": "0"}
    # off a terminal nothing is cut or folded, however long the path: both are whole
    assert str(trace_path) in out and read_trace(trace_path).sha256 in out
    assert "\x1b[" not in out


def test_platform_override(trace_path):
    result = CliRunner().invoke(cli, ["info", str(trace_path), "--format", "json",
                                      "--platform", "sw"])
    assert json.loads(result.stdout)["platform"] == "sw"


def test_empty_trace_renders(tmp_path):
    path = tmp_path / "empty.csv"
    path.write_text("ts,kind\n")
    summary = summarize(read_trace(path))
    assert summary["events"] == 0
    assert summary["time"] == {"first_ts": None, "last_ts": None, "duration_ns": None}
    for render in RENDERERS.values():
        assert render(summary, 80)


def test_help_and_usage_errors(trace_path):
    runner = CliRunner()
    assert "events by kind" in runner.invoke(cli, ["info", "--help"]).stdout
    assert runner.invoke(cli, ["info", str(trace_path), "--format", "xml"]).exit_code == 2
    assert runner.invoke(cli, ["info", str(trace_path), "--platform", "arm"]).exit_code == 2


def test_populate_rows_are_counted_and_their_bytes_summed(tmp_path):
    rows = ROWS[:3] + [
        {"ts": 1200, "kind": "populate", "gpa": 0x100000, "size": 6 * MIB},
        {"ts": 1300, "kind": "populate", "gpa": 0x800000, "size": 0x9000},
    ] + ROWS[3:]
    path = tmp_path / "launch.jsonl"
    write_trace(from_rows(rows), path, platform="snp")
    summary = summarize(read_trace(path))
    assert summary["events_by_kind"]["populate"] == 2
    assert summary["populate_bytes"] == 6 * MIB + 0x9000
    out = CliRunner().invoke(cli, ["info", str(path)]).stdout
    populated = [line for line in out.splitlines() if "populated bytes" in line]
    assert len(populated) == 1 and "6.0 MiB" in populated[0], populated
    kinds = {line.split()[1]: line.split()[3] for line in out.splitlines()
             if line.startswith("│") and line.split()[1] == "populate"}
    assert kinds == {"populate": "2"}


def test_populate_bytes_is_zero_without_populate(trace_path):
    assert summarize(read_trace(trace_path))["populate_bytes"] == 0
