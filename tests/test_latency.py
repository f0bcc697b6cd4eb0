"""Exit latencies end to end on a generated log of interleaved vCPUs with known timings:
import pairs every kvm_exit with its vCPU's next kvm_entry, replay's `timing` is exact."""

from __future__ import annotations

import json
import math
from collections import defaultdict

import pytest
from click.testing import CliRunner
from gen_ftrace_log import T0, Costs, generate

from upmtrace.cli import cli
from upmtrace.engine import replay
from upmtrace.trace.importers import Options, common, import_logs
from upmtrace.trace.io import read_trace
from upmtrace.trace.latency import EXACT_LIMIT, Distribution

ROW_KINDS = ("npf", "psc", "map_gpa")


def nearest_rank(values: list[int], p: int) -> int:
    ordered = sorted(values)
    return ordered[math.ceil(p * len(ordered) / 100) - 1]


def expected_stats(values: list[int]) -> dict[str, int]:
    return {"count": len(values), "total_ns": sum(values), "min_ns": min(values),
            "p50_ns": nearest_rank(values, 50), "p95_ns": nearest_rank(values, 95),
            "max_ns": max(values)}


def imported(tmp_path, generated, name="gen"):
    log = tmp_path / f"{name}.log"
    log.write_text(generated.text())
    out = tmp_path / f"{name}.parquet"
    summary = import_logs([str(log)], str(out), Options())
    return read_trace(out), summary


@pytest.fixture(scope="module")
def jittered():
    return generate(vcpus=5, rounds=12, costs=Costs(jitter=130))


def test_import_recovers_every_latency_on_its_row(tmp_path, jittered):
    trace, summary = imported(tmp_path, jittered)
    got = [(r["ts"], r["kind"], r["vcpu"], r["latency"]) for r in trace.table.to_pylist()
           if r["kind"] in ROW_KINDS]
    assert got == jittered.rows
    assert summary.latencies == sum(1 for row in jittered.rows if row[3] is not None)
    # rows whose exit the log cut (its start, its end) keep no latency
    assert sum(1 for row in jittered.rows if row[3] is None) == 3


def test_timing_statistics_are_exact(tmp_path, jittered):
    trace, _ = imported(tmp_path, jittered)
    timing = replay(trace).report["timing"]
    expected: dict = defaultdict(dict)
    for (group, reason), values in jittered.exits.items():
        expected[group][reason] = expected_stats(values)
    assert timing == dict(expected)
    assert set(timing) == {"vm", "userspace", "vm_other"}
    assert set(timing["vm_other"]) == {"hlt", "interrupt"}  # recorded, never dropped
    assert timing["vm"]["vmgexit"]["count"] == 3 * 5 * 12  # MSR PSC, GHCB PSC, hypercall


def test_unmatched_exits_at_both_ends_are_counted_by_reason(tmp_path, jittered):
    trace, summary = imported(tmp_path, jittered)
    unmatched = trace.recorded["exits_unmatched"]
    flat = {f"{group}.{reason}": n for group, reasons in unmatched.items()
            if isinstance(reasons, dict) for reason, n in reasons.items()}
    flat["entries_without_exit"] = unmatched["entries_without_exit"]
    assert flat == dict(jittered.unmatched)
    text = CliRunner().invoke(cli, ["import", str(tmp_path / "gen.log"), "-o",
                                    str(tmp_path / "again.parquet")]).output
    assert "exits_unmatched.vm.npf" in text and "exits_unmatched.vm_other.hlt" in text


def test_vcpus_interleave_and_are_paired_per_thread(tmp_path, jittered):
    vcpus = [int(line.split("CPU ")[1].split("/")[0]) for line in jittered.lines
             if "/KVM-" in line]
    switches = sum(a != b for a, b in zip(vcpus, vcpus[1:], strict=False))
    assert switches > len(vcpus) // 3  # lines of different vCPUs alternate throughout
    trace, _ = imported(tmp_path, jittered)
    by_vcpu = replay(trace, by_vcpu=True).report["by_vcpu"]
    assert list(by_vcpu) == ["0", "1", "2", "3", "4"]
    for (cpu, group, reason), values in jittered.by_vcpu.items():
        assert by_vcpu[str(cpu)]["timing"][group][reason] == {
            "count": len(values), "total_ns": sum(values), "min_ns": min(values),
            "max_ns": max(values)}
    rows_of_1 = [r for r in jittered.rows if r[2] == 1]
    assert by_vcpu["1"]["events"] == {kind: sum(1 for r in rows_of_1 if r[1] == kind)
                                      for kind in sorted({r[1] for r in rows_of_1})}


def test_latencies_to_the_microsecond_without_jitter(tmp_path):
    generated = generate(vcpus=4, rounds=3)
    trace, _ = imported(tmp_path, generated)
    costs = generated.costs
    npf = sorted({r["latency"] for r in trace.table.to_pylist()
                  if r["kind"] == "npf" and r["latency"] is not None})
    # a plain fault, the memory-fault exit's whole round trip, the retried access
    assert npf == sorted({costs.npf, costs.fault_kernel + costs.fault_user, costs.retry})
    timing = replay(trace).report["timing"]
    assert timing["userspace"]["KVM_EXIT_MEMORY_FAULT"]["p50_ns"] == costs.fault_user
    assert timing["vm_other"]["hlt"]["max_ns"] == costs.hlt


def test_rows_wait_for_their_entry_across_record_batches(tmp_path, monkeypatch, jittered):
    """A row waiting for its latency holds back the rows after it, never reorders them."""
    monkeypatch.setattr(common, "CHUNK", 8)
    monkeypatch.setattr(common, "HOLD_LIMIT", 10_000)
    trace, _ = imported(tmp_path, jittered, "small")
    got = [(r["ts"], r["kind"], r["vcpu"], r["latency"]) for r in trace.table.to_pylist()
           if r["kind"] in ROW_KINDS]
    assert got == jittered.rows


def test_a_row_held_back_too_long_is_written_without_latency(tmp_path, monkeypatch):
    """The import's memory stays bounded: past HOLD_LIMIT rows the waiting row is released."""
    lines = ["       CPU 0/KVM-1 [000] d.... 10.000000000: kvm_exit: vcpu 0 reason npf rip 0x0",
             "       CPU 0/KVM-1 [000] ..... 10.000000100: kvm_page_fault: vcpu 0 rip 0x0 "
             "address 0x0000000000001000 error_code 0x500000004"]
    for i in range(40):  # another vCPU keeps faulting, its exits not traced
        lines.append(f"       CPU 1/KVM-2 [001] ..... 10.{1000 + i:09d}: kvm_page_fault: vcpu 1 "
                     f"rip 0x0 address 0x{(i + 2) * 4096:016x} error_code 0x500000004")
    lines.append("       CPU 0/KVM-1 [000] d.... 10.000009000: kvm_entry: vcpu 0, rip 0x0")
    log = tmp_path / "held.log"
    log.write_text("\n".join(lines) + "\n")
    monkeypatch.setattr(common, "CHUNK", 4)
    monkeypatch.setattr(common, "HOLD_LIMIT", 16)
    summary = import_logs([str(log)], str(tmp_path / "held.parquet"), Options())
    assert any(note.startswith("1 exits kept no latency") for note in summary.notes)
    rows = [r for r in read_trace(tmp_path / "held.parquet").table.to_pylist()
            if r["kind"] == "npf"]
    assert len(rows) == 41 and [r["ts"] for r in rows] == sorted(r["ts"] for r in rows)
    assert rows[0]["latency"] is None  # released before its entry came: not guessed
    monkeypatch.setattr(common, "HOLD_LIMIT", 1000)
    import_logs([str(log)], str(tmp_path / "kept.parquet"), Options())
    kept = read_trace(tmp_path / "kept.parquet").table.to_pylist()
    assert [r["latency"] for r in kept if r["kind"] == "npf"][0] == 9000 - 0


def test_timing_is_absent_without_latencies(tmp_path):
    from upmtrace.trace.io import from_rows

    table = from_rows([{"ts": 0, "kind": "npf", "vcpu": 0, "gpa": 4096, "private": False}])
    report = replay(table).report
    assert "timing" not in report


def test_timing_of_a_hand_made_trace_follows_the_platform(tmp_path):
    from upmtrace.trace.io import from_rows, write_trace

    rows = [{"ts": 0, "kind": "map_gpa", "vcpu": 0, "gpa": 0, "size": 4096, "private": True,
             "latency": 5000},
            {"ts": 1, "kind": "npf", "vcpu": 1, "gpa": 4096, "private": False, "latency": 700}]
    write_trace(from_rows(rows), tmp_path / "t.parquet", platform="tdx")
    report = replay(read_trace(tmp_path / "t.parquet"), by_vcpu=True).report
    assert report["timing"]["vm"]["tdvmcall"]["total_ns"] == 5000
    assert report["timing"]["vm"]["npf"]["p95_ns"] == 700
    assert report["by_vcpu"]["1"]["events"] == {"npf": 1}


def test_replay_json_and_table_show_recorded_time_beside_the_estimate(tmp_path, jittered):
    imported(tmp_path, jittered)
    runner = CliRunner()
    text = runner.invoke(cli, ["replay", str(tmp_path / "gen.parquet"), "--by-vcpu"],
                         env={"COLUMNS": "120"}).output
    assert "Recorded time" in text and "By vCPU" in text
    header = next(line for line in text.splitlines() if line.startswith("VM-EXIT") and
                  "p95" in line)
    assert header.split() == ["VM-EXIT", "Samples", "Time%", "Total", "Avg", "p50", "p95",
                              "Min", "Max", "Est."]
    report = json.loads(runner.invoke(cli, ["replay", str(tmp_path / "gen.parquet"),
                                            "--format", "json", "--by-vcpu"]).output)
    assert "latency" not in report["recorded"]  # the distributions became `timing`
    assert report["timing"]["vm_other"]["hlt"]["count"] == 5 * 12
    assert set(report["by_vcpu"]) == {"0", "1", "2", "3", "4"}


# --- the distribution itself --------------------------------------------------------------


def test_distribution_percentiles_are_nearest_rank():
    d = Distribution()
    for v in (15, 20, 35, 40, 50):
        d.add(v)
    assert (d.percentile(30), d.percentile(40), d.percentile(50), d.percentile(100)) == \
        (20, 20, 35, 50)
    assert d.stats() == {"count": 5, "total_ns": 160, "min_ns": 15, "p50_ns": 35, "p95_ns": 50,
                         "max_ns": 50}


def test_distribution_stays_bounded_and_close_beyond_the_exact_limit():
    d = Distribution()
    values = [1000 + 37 * i for i in range(5 * EXACT_LIMIT)]
    for v in values:
        d.add(v)
    assert d.bits and len(d.values) < EXACT_LIMIT
    assert (d.count, d.total, d.min, d.max) == (len(values), sum(values), min(values),
                                                max(values))
    true = nearest_rank(values, 95)
    assert abs(d.percentile(95) - true) <= true / 128


def test_distribution_json_round_trip_and_merge():
    a, b = Distribution(), Distribution()
    for v in (5, 7, 7):
        a.add(v)
    b.add(100)
    back = Distribution.from_json(json.loads(json.dumps(a.to_json())))
    assert back == a
    back.merge(b)
    assert back.stats() == {"count": 4, "total_ns": 119, "min_ns": 5, "p50_ns": 7,
                            "p95_ns": 100, "max_ns": 100}
    with pytest.raises(ValueError):
        Distribution.from_json({"count": 2, "total_ns": 1, "min_ns": 0, "max_ns": 1,
                                "values": {"1": 1}})


def test_generated_rows_start_at_the_first_line():
    generated = generate(vcpus=4, rounds=1)
    first = generated.lines[2]
    assert f"{T0 // 10**9}.{T0 % 10**9:09d}" in first
