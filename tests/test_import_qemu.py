"""Importing QEMU -trace logs, and replaying them against the exits QEMU saw."""

from __future__ import annotations

import pytest
from test_import_ftrace import G, M, attrs, rows, run, slot

from upmtrace.policy import PRESETS
from upmtrace.replay import replay
from upmtrace.trace.importers.qemu import psc_entries
from upmtrace.trace.schema import Platform

MS = 1_000_000  # ns


def psc(ts: int, req: int, gpa: int, size: int, op: str) -> dict:
    return {"ts": ts, "kind": "psc", "vcpu": 0, "req": req, "gpa": gpa, "size": size, "op": op}


def fault(ts: int, gpa: int, private: bool) -> dict:
    return {"ts": ts, "kind": "npf", "vcpu": 0, "gpa": gpa, "private": private}


def map_gpa(ts: int, gpa: int, size: int, private: bool) -> dict:
    return {"ts": ts, "kind": "map_gpa", "vcpu": 0, "gpa": gpa, "size": size, "private": private}


def test_snp_log_memslots_marking_psc_requests_and_faults(tmp_path):
    trace, summary = run(tmp_path, "qemu-snp.log")
    t = 910_303_000  # 1721587409.000100 - 1721587408.089797, in ns
    assert trace.table.to_pylist() == rows(
        slot(0, 2 * G, 0), attrs(0, 2 * G),
        slot(0x100000000, 2 * G, 1, ts=13_000), attrs(0x100000000, 2 * G, ts=13_000),
        slot(0xFFC00000, 4 * M, 2, gmem=False, ts=23_000),  # guest_memfd=-1
        psc(t + 1_000, 1, 0x809000, 4096, "shared"),
        # attributes 0x11: private, 2 MiB page-size hint: two 2 MiB entries, one request
        psc(t + 99_900_000, 2, 0x200000, 2 * M, "private"),
        psc(t + 99_900_000, 2, 0x400000, 2 * M, "private"),
        psc(t + 199_900_000, 3, 0x7C000000, 64 * M, "shared"),
        fault(t + 299_900_000, 0x1000000, False),
        fault(t + 399_900_000, 0x7C001000, True),
        # a coalesced 4 KiB run of exactly 2 MiB, unaligned: kept out of the 2 MiB class
        psc(t + 499_900_000, 4, 0x7D100000, 4096, "shared"),
        psc(t + 499_900_000, 4, 0x7D101000, 2 * M - 4096, "shared"),
        fault(t + 599_900_000, 0x100200000, False),
        psc(t + 699_900_000, 5, 0x100200000, 4096, "private"),
        fault(t + 799_900_000, 0x1000000, True),
    )
    assert trace.recorded == {
        "conversions": {"set_attributes_calls": 11},
        "exits": {"userspace": {"KVM_EXIT_HYPERCALL": 5, "KVM_EXIT_MEMORY_FAULT": 4},
                  "userspace_total": 9}}
    assert summary.skipped == {
        "kvm_set_user_memory changing only flags (no model change)": 1,
        "kvm_set_user_memory in address space 1 (SMM)": 1,
        "unrecognised line": 1, "event not imported: kvm_run_exit": 1}
    assert not any("memslot" in n for n in summary.notes)


@pytest.mark.parametrize("log, platform", [("qemu-snp.log", "snp"), ("qemu-tdx.log", "tdx"),
                                           ("qemu-iso.log", "snp")])
def test_model_reproduces_the_exits_and_conversions_qemu_saw(tmp_path, log, platform):
    """The recorded counts come from the log's own exit lines; the model computes its own from
    the demands alone. Equal counts mean the model's attribute tracking matched the machine's."""
    trace, _ = run(tmp_path, log, platform=Platform(platform))
    report = replay(trace, PRESETS["eager"]).report
    assert report["exits"]["userspace"] == trace.recorded["exits"]["userspace"]
    assert report["exits"]["userspace_total"] == trace.recorded["exits"]["userspace_total"]
    assert (report["conversions"]["set_attributes_calls"]
            == trace.recorded["conversions"]["set_attributes_calls"])
    assert report["recorded"] == trace.recorded


def test_tdx_mapgpa_chunks_are_rebuilt_into_the_guest_request(tmp_path):
    trace, _ = run(tmp_path, "qemu-tdx.log", platform=Platform.TDX)
    assert trace.table.to_pylist() == rows(
        slot(0, 2 * G, 0), attrs(0, 2 * G), slot(0x100000000, 2 * G, 1),
        attrs(0x100000000, 2 * G),
        map_gpa(0, 0x7C000000, 5 * M, False),  # chunks of 2 + 2 + 1 MiB: one MapGPA
        map_gpa(0, 0x7C500000, M, False),  # follows a 1 MiB chunk: a new MapGPA
        fault(0, 0x7C001000, True),
        map_gpa(0, 0x7C000000, 2 * M, True),
        fault(0, 0x100000000, False),
    )
    report = replay(trace, PRESETS["eager"]).report
    assert report["exits"]["vm"]["tdvmcall"] == 3


def test_iso_prefix_gives_exact_nanoseconds_and_size_0_deletes(tmp_path):
    trace, _ = run(tmp_path, "qemu-iso.log")
    got = [(r["ts"], r["kind"], r["size"]) for r in trace.table.to_pylist()]
    assert got == [(0, "memslot", G), (0, "set_attributes", G), (910_203_000, "psc", 4 * M),
                   (1_410_203_123, "npf", None), (1_910_203_000, "memslot", 0)]


def test_sw_platform_makes_map_gpa_rows(tmp_path):
    trace, _ = run(tmp_path, "qemu-iso.log", platform=Platform.SW)
    assert [r for r in trace.table.to_pylist() if r["kind"] == "map_gpa"] == rows(
        map_gpa(910_203_000, 0x3C000000, 4 * M, False))


def test_initial_attributes_shared_leaves_guest_memfd_slots_unmarked(tmp_path):
    trace, _ = run(tmp_path, "qemu-snp.log", initial_private=False)
    kinds = [r["kind"] for r in trace.table.to_pylist()]
    assert "set_attributes" not in kinds
    assert trace.recorded["conversions"]["set_attributes_calls"] == 9


def test_qemu_log_without_memslot_lines_gets_a_synthesised_slot(tmp_path):
    log = tmp_path / "q.log"
    log.write_text("kvm_memory_fault start 0x7c001000 size 0x1000 flags 0x8\n")
    trace, summary = run(tmp_path, log)
    assert trace.table.to_pylist() == rows(slot(0x7C000000, 2 * M), attrs(0x7C000000, 2 * M),
                                           fault(0, 0x7C001000, True))
    assert any("added slot 0 [0x7c000000, 0x7c200000) guest_memfd" in n for n in summary.notes)


@pytest.mark.parametrize("gpa, size, huge, entries", [
    (0x200000, 0x400000, True, [(0x200000, 2 * M), (0x400000, 2 * M)]),
    (0x201000, 0x200000, True, [(0x201000, 4096), (0x202000, 2 * M - 4096)]),
    (0x200000, 0x200000, False, [(0x200000, 2 * M)]),
    (0x200000, 0x3000, False, [(0x200000, 0x3000)]),
])
def test_psc_entries_of_one_exit(gpa, size, huge, entries):
    assert psc_entries(gpa, size, huge) == entries
