"""Importing kvm tracepoints from ftrace text, trace-cmd report and perf script output."""

from __future__ import annotations

from pathlib import Path

import pytest

from upmtrace.engine import replay
from upmtrace.policy import PRESETS
from upmtrace.trace.importers import Options, import_logs
from upmtrace.trace.io import from_rows, read_trace
from upmtrace.trace.schema import Platform

FIXTURES = Path(__file__).parent / "fixtures" / "import"
M, G = 1 << 20, 1 << 30
US = 1000  # ns


def rows(*dicts: dict) -> list[dict]:
    """Expected rows, every column present (None where unused)."""
    return from_rows(list(dicts)).to_pylist()


def slot(gpa: int, size: int, slot_id: int = 0, gmem: bool = True, ts: int = 0) -> dict:
    return {"ts": ts, "kind": "memslot", "vcpu": -1, "slot": slot_id, "gpa": gpa, "size": size,
            "gmem": gmem}


def attrs(gpa: int, size: int, private: bool = True, ts: int = 0) -> dict:
    return {"ts": ts, "kind": "set_attributes", "vcpu": -1, "gpa": gpa, "size": size,
            "private": private}


def npf(ts: int, vcpu: int, gpa: int, private: bool, write: bool | None) -> dict:
    return {"ts": ts, "kind": "npf", "vcpu": vcpu, "gpa": gpa, "private": private,
            "write": write}


def run(tmp_path, *logs: str | Path, **options):
    """Import fixture logs into a Parquet trace; (the trace read back, the summary)."""
    out = tmp_path / "out.parquet"
    paths = [str(FIXTURES / log) if isinstance(log, str) else str(log) for log in logs]
    summary = import_logs(paths, str(out), Options(**options))
    return read_trace(out), summary


def test_snp_ftrace_demands_become_events_and_responses_recorded_counts(tmp_path):
    trace, summary = run(tmp_path, "snp-ftrace.txt")
    t0 = 0  # 2925.600000, the first event: the VMM marking memory private before any vCPU ran
    assert trace.table.to_pylist() == rows(
        slot(0, 2 * G),
        attrs(0, 2 * G, True, ts=t0),
        # MSR-protocol PSC: GHCB MSR 0x0020000000100014 = op 2 (shared), gfn 0x100; its
        # vmgexit (2925.640967) re-entered at 2925.640980
        {"ts": 40_968 * US, "kind": "psc", "vcpu": 0, "req": -1, "gpa": 0x100000,
         "size": 4096, "op": "shared", "latency": 13 * US},
        # a shared access (no bit 34/49) to a private page, then its retry after the exit
        npf(41_001 * US, 0, 0x200000, False, False),
        npf(41_021 * US, 0, 0x200000, False, False),
        # bits 49 and 34 (private) and 1 (write), vCPU 1 from the payload
        npf(100_001 * US, 1, 0x300000, True, True),
        # kvm_hypercall KVM_HC_MAP_GPA_RANGE: a0 gpa, a1 pages, a2 bit 4 = encrypted
        {"ts": 300_001 * US, "kind": "map_gpa", "vcpu": 1, "gpa": 0x500000, "size": 16 * 4096,
         "private": True},
        {"ts": 400_002 * US, "kind": "psc", "vcpu": 0, "req": -1, "gpa": 0x100000,
         "size": 4096, "op": "private"},
    )
    assert trace.platform is Platform.SNP
    # no kvm_entry follows the other exits: unmatched, by reason, never guessed
    assert trace.recorded.pop("exits_unmatched") == {
        "userspace": {"KVM_EXIT_HYPERCALL": 3, "KVM_EXIT_MEMORY_FAULT": 1},
        "vm": {"npf": 3, "vmcall": 1, "vmgexit": 2}, "vm_other": {"hlt": 1}}
    # the MSR-protocol exit's userspace part: 2925.640970 to the entry at 2925.640980
    assert trace.recorded.pop("latency")["exits"] == {"userspace": {"KVM_EXIT_HYPERCALL": {
        "bits": 0, "count": 1, "max_ns": 10 * US, "min_ns": 10 * US, "total_ns": 10 * US,
        "values": {"10000": 1}}}}
    assert trace.recorded == {
        "conversions": {"set_attributes_calls": 4},
        "exits": {"userspace": {"KVM_EXIT_HYPERCALL": 4, "KVM_EXIT_MEMORY_FAULT": 1},
                  "userspace_total": 5,
                  "vm": {"npf": 3, "vmcall": 1, "vmgexit": 3}, "vm_total": 7,
                  "vm_other": {"hlt": 1}},
        "psc": {"requests": 3},
    }
    assert summary.skipped == {"comment or header line": 12,
                               "hypercall other than KVM_HC_MAP_GPA_RANGE": 1,
                               "MSR-protocol request other than PSC": 1}
    assert summary.lines == 39
    # the log marked memory itself before any vCPU ran: no second, synthesised marking
    assert any("added slot 0 [0x0, 0x80000000) guest_memfd" in n and "marked" not in n
               for n in summary.notes)
    assert any("GHCB Page State Change requests (VMGEXIT 0x80000010): 1" in n
               for n in summary.notes)
    assert "upmtrace import (ftrace): snp-ftrace.txt" in trace.source


def test_replaying_the_kernel_log_matches_its_exits_but_for_the_ghcb_psc(tmp_path):
    trace, _ = run(tmp_path, "snp-ftrace.txt")
    report = replay(trace, PRESETS["eager"]).report
    recorded = trace.recorded["exits"]
    assert report["exits"]["vm"]["npf"] == recorded["vm"]["npf"] == 3
    assert report["npf"]["avoided"] == 1  # the fault retried after the memory-fault exit
    assert report["exits"]["userspace"]["KVM_EXIT_MEMORY_FAULT"] == 1
    # the model issues an SNP guest's MAP_GPA_RANGE as a vmgexit (the log's vmmcall exit is not
    # one an SNP guest can make); the GHCB request's entries are in no tracepoint: one vmgexit
    # and one hypercall short of the log's PSC exits
    assert (report["exits"]["vm"]["vmcall"], recorded["vm"]["vmcall"]) == (0, 1)
    assert (report["exits"]["vm"]["vmgexit"], recorded["vm"]["vmgexit"]) == (3, 3)
    assert (report["exits"]["userspace"]["KVM_EXIT_HYPERCALL"],
            recorded["userspace"]["KVM_EXIT_HYPERCALL"]) == (3, 4)


def test_trace_cmd_report_without_flags_on_tdx_strips_the_shared_bit(tmp_path):
    trace, summary = run(tmp_path, "tdx-trace-cmd.txt", platform=Platform.TDX)
    assert trace.table.to_pylist() == rows(
        slot(0, 4 * M), attrs(0, 4 * M),
        npf(1 * US, 0, 0x100000, False, True),  # bit 47 set: shared; exit qualification bit 1
        npf(101 * US, 1, 0x200000, True, False),
    )
    assert trace.recorded["exits"] == {
        "userspace": {"KVM_EXIT_HYPERCALL": 1, "KVM_EXIT_MEMORY_FAULT": 1},
        "userspace_other": {"restart": 1}, "userspace_total": 2,
        "vm": {"npf": 2, "tdvmcall": 1}, "vm_total": 3}
    assert summary.skipped == {"comment or header line": 3}


def test_tdx_shared_bit_51_keeps_bit_47_as_an_address_bit(tmp_path):
    trace, _ = run(tmp_path, "tdx-trace-cmd.txt", platform=Platform.TDX, shared_bit=51)
    faults = [r for r in trace.table.to_pylist() if r["kind"] == "npf"]
    assert [(r["gpa"], r["private"]) for r in faults] == [(0x800000100000, True),
                                                          (0x200000, True)]


def test_old_kernel_layout_takes_the_vcpu_from_the_thread_name(tmp_path):
    trace, summary = run(tmp_path, "old-kernel.txt")
    assert trace.table.to_pylist() == rows(
        slot(0, 0xFF000000), attrs(0, 0xFF000000),
        npf(0, 3, 0x7F001000, False, True),  # error_code 6: user write; vCPU from "CPU 3/KVM"
        npf(1 * US, 3, 0xFEE00000, False, False),
        npf(2 * US, 0, 0x1000, False, False),  # "kworker/u8:2": not a vCPU thread
    )
    assert summary.skipped == {"comment or header line": 4, "event not imported: kvm_set_irq": 1}
    assert trace.recorded == {}


def test_perf_script_with_kvm_prefix_pid_tid_and_period_columns(tmp_path):
    trace, summary = run(tmp_path, "perf-script.txt")
    assert trace.table.to_pylist() == rows(
        slot(2 * M, 4 * M), attrs(2 * M, 4 * M),
        npf(1 * US, 1, 0x300000, True, True),
        npf(3 * US, 0, 0x400000, False, True),
        {"ts": 4 * US, "kind": "map_gpa", "vcpu": 0, "gpa": 0x400000, "size": 4096,
         "private": False},
    )
    # `83801/83810` is pid/tid: the exit and the fault are one thread's (no entry follows)
    assert trace.recorded == {"exits": {"userspace_other": {"KVM_EXIT_UNKNOWN": 1},
                                        "vm": {"npf": 1}, "vm_total": 1},
                              "exits_unmatched": {"userspace_other": {"KVM_EXIT_UNKNOWN": 1},
                                                  "vm": {"npf": 1}}}
    assert summary.skipped == {}


def test_memslot_option_replaces_the_synthesised_slot(tmp_path):
    from upmtrace.trace.importers import parse_memslot

    slots = (parse_memslot("0x0:1M"), parse_memslot("0x200000:4M:gmem"))
    trace, summary = run(tmp_path, "perf-script.txt", memslots=slots)
    assert trace.table.to_pylist()[:3] == rows(slot(0, M, 0, gmem=False),
                                               slot(2 * M, 4 * M, 1), attrs(2 * M, 4 * M))
    assert any("from --memslot" in n for n in summary.notes)


def test_initial_attributes_shared_adds_no_marking(tmp_path):
    trace, _ = run(tmp_path, "perf-script.txt", initial_private=False)
    assert [r["kind"] for r in trace.table.to_pylist()] == ["memslot", "npf", "npf", "map_gpa"]


def test_a_tdx_looking_log_imported_as_snp_says_so(tmp_path):
    _, summary = run(tmp_path, "tdx-trace-cmd.txt")
    assert any("look like tdx but it was imported as snp" in n for n in summary.notes)


@pytest.mark.parametrize("payload, reason", [
    ("kvm_page_fault: vcpu 0 rip 0x0 address zz error_code 0x1", "malformed kvm_page_fault line"),
    ("kvm_page_fault: vcpu 99999999999 rip 0x0 address 0x1000 error_code 0x1",
     "malformed kvm_page_fault line"),
    ("kvm_hypercall: nr 0xc a0 0x1001 a1 0x1 a2 0x0 a3 0x0",
     "KVM_HC_MAP_GPA_RANGE that KVM refuses (misaligned, empty or too large)"),
    ("kvm_vmgexit_msr_protocol_enter: vcpu 0, ghcb_gpa 0070000000100014",
     "MSR-protocol PSC with an unknown operation"),
    ("kvm_vm_set_mem_attributes: 0x10 -- 0x10 [0x8]", "malformed kvm_vm_set_mem_attributes line"),
    ("kvm_vmgexit_enter: vcpu 0, exit_reason 7b, exit_info1 0, exit_info2 0",
     "VMGEXIT other than Page State Change"),
])
def test_broken_or_refused_payloads_are_counted_by_reason(tmp_path, payload, reason):
    log = tmp_path / "t.txt"
    good = "  CPU 0/KVM-1 [000] .....  1.000000: kvm_page_fault: vcpu 0 rip 0x0 address " \
           "0x1000 error_code 0x6\n"
    log.write_text(good + f"  CPU 0/KVM-1 [000] .....  1.000001: {payload}\n")
    trace, summary = run(tmp_path, log)
    assert summary.skipped == {reason: 1}
    assert summary.events["npf"] == 1


@pytest.mark.parametrize(("error_code", "private", "write"), [
    (0x400000006, True, True),  # bit 34 alone (SNP's encrypted access, PFERR_GUEST_ENC)
    (0x2000000000004, True, False),  # bit 49 alone (PFERR_PRIVATE_ACCESS)
    (0x2000400000002, True, True),  # both
    (0x6, False, True),  # neither: a shared access
])
def test_a_fault_is_private_when_error_code_bit_34_or_bit_49_is_set(tmp_path, error_code,
                                                                    private, write):
    log = tmp_path / "t.txt"
    log.write_text("  CPU 0/KVM-1 [000] .....  1.000000: kvm_page_fault: vcpu 0 rip 0x0 "
                   f"address 0x1000 error_code {error_code:#x}\n")
    trace, _ = run(tmp_path, log)
    faults = [r for r in trace.table.to_pylist() if r["kind"] == "npf"]
    assert [(r["gpa"], r["private"], r["write"]) for r in faults] == [(0x1000, private, write)]
