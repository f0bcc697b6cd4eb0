"""Real log shapes: leading blanks, QEMU log-backend prefixes among warnings and unrelated
events, both kernel layouts of kvm_page_fault, perf script with and without `kvm:`."""

from __future__ import annotations

from test_import_ftrace import US, attrs, npf, rows, run, slot

from upmtrace.engine import replay
from upmtrace.trace.schema import Platform

M = 1 << 20


def test_qemu_prefixes_blanks_warnings_and_unrelated_events(tmp_path):
    trace, summary = run(tmp_path, "qemu-mixed.log", platform=Platform.TDX)
    t0 = 1721587408_089797 * US
    assert trace.table.to_pylist() == rows(
        slot(0, 2048 * M),
        attrs(0, 2048 * M),
        {"ts": 1721587409_000101 * US - t0, "kind": "map_gpa", "vcpu": 0, "gpa": 0x809000,
         "size": 0x1000, "private": False},
        npf(1721587409_400000 * US - t0, 0, 0x7C001000, True, None),
    )
    assert summary.skipped == {"unrecognised line": 2, "event not imported: kvm_vm_ioctl": 1,
                               "event not imported: kvm_run_exit": 1,
                               "event not imported: virtio_queue_notify": 1}
    assert trace.recorded["conversions"] == {"set_attributes_calls": 3}


def test_both_kvm_page_fault_layouts_with_leading_blanks(tmp_path):
    trace, summary = run(tmp_path, "kernel-layouts.txt")
    assert trace.table.to_pylist() == rows(
        slot(2 * M, 2 * M), attrs(2 * M, 2 * M),
        npf(0, 0, 0x201000, True, True),  # vcpu/rip layout: bit 34 private, bit 1 write
        npf(1 * US, 1, 0x202000, False, True),  # old layout, bare hex: vCPU from the thread
        npf(2 * US, 1, 0x203000, False, False),  # old layout with 0x
        npf(3 * US, 0, 0x204000, False, False),  # trailing blanks, padded event name
    )
    assert summary.skipped == {"comment or header line": 1}


def test_perf_script_ns_with_and_without_the_kvm_prefix(tmp_path):
    trace, summary = run(tmp_path, "perf-script-ns.txt", platform=Platform.SW)
    got = [(r["ts"], r["kind"], r["vcpu"], r["latency"]) for r in trace.table.to_pylist()
           if r["kind"] != "memslot" and r["kind"] != "set_attributes"]
    # ns times: the npf exit at .982871000 re-entered at .982873650 (perf --ns digits kept)
    assert got == [(400, "npf", 0, 2650), (9100, "map_gpa", 0, 19_000)]
    assert summary.skipped == {}
    report = replay(trace).report
    # SVM prints VMMCALL as `hypercall`; the interrupt is kept though the model has no such exit
    assert report["timing"]["vm"] == {
        "npf": {"count": 1, "total_ns": 2650, "min_ns": 2650, "p50_ns": 2650, "p95_ns": 2650,
                "max_ns": 2650},
        "vmcall": {"count": 1, "total_ns": 19_000, "min_ns": 19_000, "p50_ns": 19_000,
                   "p95_ns": 19_000, "max_ns": 19_000}}
    assert report["timing"]["vm_other"]["interrupt"]["total_ns"] == 650
    assert report["timing"]["userspace"]["KVM_EXIT_HYPERCALL"]["total_ns"] == 18_000
    assert trace.recorded["exits"]["vm"] == {"npf": 1, "vmcall": 1}
    assert trace.recorded["exits"]["vm_other"] == {"interrupt": 1}
