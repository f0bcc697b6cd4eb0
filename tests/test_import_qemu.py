"""Importing QEMU -trace logs, and replaying them against the exits QEMU saw."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from test_import_ftrace import FIXTURES, G, M, attrs, rows, run, slot

from upmtrace.cli import cli
from upmtrace.engine import replay
from upmtrace.policy import PRESETS
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
    # 253 2 MiB entries is the most one GHCB request holds (VMGEXIT_PSC_MAX_COUNT); a longer
    # 2 MiB-hinted run is kept whole, so one line never becomes millions of rows
    (0, 253 * 2 * M, True, [(i * 2 * M, 2 * M) for i in range(253)]),
    (0, 254 * 2 * M, True, [(0, 254 * 2 * M)]),
    (0, 1 << 51, True, [(0, 1 << 51)]),
])
def test_psc_entries_of_one_exit(gpa, size, huge, entries):
    assert psc_entries(gpa, size, huge) == entries


# --- launch-time population ------------------------------------------------------------------

def populate(ts: int, gpa: int, size: int) -> dict:
    return {"ts": ts, "kind": "populate", "vcpu": -1, "gpa": gpa, "size": size}


# (gpa, len, us since the first imported line, 1733051000.013201) of the log's
# kvm_sev_snp_launch_update lines: OVMF ending at 4 GiB, a 5.9 MiB kernel at 1 MiB, then OVMF's
# SEV metadata pages (pre-validated zero pages, secrets, CPUID)
LAUNCH_UPDATES = [(0xFFC00000, 4 * M, 188_675), (0x100000, 0x5F3000, 284_802),
                  (0x800000, 0x9000, 358_039), (0x80B000, 0x2000, 358_200),
                  (0x80D000, 0x1000, 358_321), (0x80E000, 0x1000, 358_429),
                  (0x80F000, 0x1000, 358_598), (0x810000, 0x10000, 358_704)]


def test_snp_launch_log_imports_to_memslots_and_populate_rows(tmp_path):
    trace, summary = run(tmp_path, "qemu-snp-launch.log")
    table = trace.table.to_pylist()
    assert table[:6] == rows(
        slot(0, 2 * G, 0), attrs(0, 2 * G),
        slot(0x100000000, 2 * G, 1, ts=39_000), attrs(0x100000000, 2 * G, ts=39_000),
        # QEMU backs the firmware (pc.bios) of a confidential guest with guest_memfd
        slot(0xFFC00000, 4 * M, 2, ts=74_000), attrs(0xFFC00000, 4 * M, ts=74_000))
    launch = []
    for gpa, size, us in LAUNCH_UPDATES:  # QEMU sets the range private, then launch-updates
        launch += [attrs(gpa, size, ts=us * 1000), populate(us * 1000, gpa, size)]
    assert table[6:6 + len(launch)] == rows(*launch)
    guest = table[6 + len(launch):]
    assert [r["kind"] for r in guest] == ["psc"] * 4 + ["npf", "psc", "npf"]
    assert min(r["ts"] for r in guest) > max(r["ts"] for r in table[:6 + len(launch)])
    assert summary.events == {"memslot": 3, "set_attributes": 3 + 8, "populate": 8, "psc": 5,
                              "npf": 2}
    assert trace.recorded == {
        "conversions": {"set_attributes_calls": 3 + 8 + 7},
        "exits": {"userspace": {"KVM_EXIT_HYPERCALL": 5, "KVM_EXIT_MEMORY_FAULT": 2},
                  "userspace_total": 7}}
    # the three QEMU warnings are the only unrecognised lines: indented lines are read
    assert summary.skipped["unrecognised line"] == 3
    assert summary.skipped["event not imported: kvm_sev_snp_launch_finish"] == 1


def test_snp_launch_log_replays_under_eager(tmp_path):
    trace, _ = run(tmp_path, "qemu-snp-launch.log")
    report = replay(trace, PRESETS["eager"]).report
    pages = sum(size for _, size, _ in LAUNCH_UPDATES) // 4096
    assert report["populate"] == {"calls": 8, "pages": pages, "skipped_pages": 0}
    assert report["exits"]["userspace"] == trace.recorded["exits"]["userspace"]
    assert (report["conversions"]["set_attributes_calls"]
            == trace.recorded["conversions"]["set_attributes_calls"])


@pytest.mark.parametrize("line", [
    "kvm_sev_snp_launch_update addr 0x7f2b48000000 gpa 0xffc00000 len 0x400000 (Normal page)",
    "kvm_sev_snp_launch_update src 0x0 gpa 0xffc00000 len 0x400000 (Zero page)",
    "kvm_sev_snp_launch_update addr (nil) gpa 0xffc00000 len 0x400000 (Unmeasured page)",
    "  kvm_sev_snp_launch_update src 0x7f2b48000000 gpa 0xffc00000 len 0x400000 (Normal)",
    "kvm_sev_snp_launch_update src 0x7f2b48000000 gpa 0xffc00000 len 0x400000",
], ids=["addr", "src_zero", "addr_nil", "indented_old_type", "no_type"])
def test_snp_launch_update_forms(tmp_path, line):
    log = tmp_path / "q.log"
    log.write_text(line + "\n")
    trace, _ = run(tmp_path, log)
    assert [(r["kind"], r["gpa"], r["size"]) for r in trace.table.to_pylist()] == [
        ("memslot", 0xFFC00000, 4 * M), ("set_attributes", 0xFFC00000, 4 * M),
        ("set_attributes", 0xFFC00000, 4 * M), ("populate", 0xFFC00000, 4 * M)]


TDX_LAUNCH = """\
kvm_set_user_memory AddrSpace#0 Slot#0 flags=0x4 gpa=0x0 size=0x80000000 ua=0x7fe827fff000 \
guest_memfd=16 guest_memfd_offset=0x0 ret=0
kvm_set_user_memory AddrSpace#0 Slot#2 flags=0x4 gpa=0xffc00000 size=0x400000 \
ua=0x7fea34200000 guest_memfd=33 guest_memfd_offset=0x0 ret=0
kvm_tdx_init_mem_region type=0x0 attributes=0x1 source=0x7fea34284000 gfn=0xffc84 nr_pages=0x37c
kvm_tdx_init_mem_region type=0x1 attributes=0x0 source=0x7fea34200000 gfn=0xffc00 nr_pages=0x84
kvm_tdx_init_mem_region type=0x3 attributes=0x0 source=0x7fea37750000 gfn=0x810 nr_pages=0x10
kvm_tdx_init_mem_region type=0x3 attributes=0x0 source=0x7fea3774d000 gfn=0x80b nr_pages=0x2
kvm_tdx_init_mem_region type=0x2 attributes=0x0 source=0x7fea3774a000 gfn=0x809 nr_pages=0x2
kvm_tdx_init_mem_region type=0x3 attributes=0x0 source=0x7fea37743000 gfn=0x800 nr_pages=0x6
VNC server running on ::1:5900
kvm_memory_fault start 0x7c001000 size 0x1000 flags 0x0
"""
TDVF = [(0xFFC84000, 0x37C000), (0xFFC00000, 0x84000), (0x810000, 0x10000),
        (0x80B000, 0x2000), (0x809000, 0x2000), (0x800000, 0x6000)]


def test_tdx_init_mem_region_lines_become_populate_rows(tmp_path):
    """TDVF's sections as QEMU logged them (BFV and CFV ending at 4 GiB, TD HOB and temporary
    memory at 8 MiB); QEMU marked the slots private at creation and does not again."""
    log = tmp_path / "q.log"
    log.write_text(TDX_LAUNCH)
    trace, summary = run(tmp_path, log, platform=Platform.TDX)
    table = trace.table.to_pylist()
    assert [(r["gpa"], r["size"]) for r in table if r["kind"] == "populate"] == TDVF
    assert [r["kind"] for r in table] == (["memslot", "set_attributes"] * 2
                                          + ["populate"] * 6 + ["npf"])
    assert summary.skipped == {"unrecognised line": 1}
    report = replay(trace, PRESETS["eager"], platform=Platform.TDX).report
    pages = sum(size for _, size in TDVF) // 4096
    assert report["populate"] == {"calls": 6, "pages": pages, "skipped_pages": 0}


@pytest.mark.parametrize("line, reason", [
    ("kvm_sev_snp_launch_update src 0x1 gpa 0xffc00800 len 0x1000 (Normal page)",
     "malformed kvm_sev_snp_launch_update line"),
    ("kvm_sev_snp_launch_update src 0x1 gpa 0xffc00000 len 0x0 (Normal page)",
     "kvm_sev_snp_launch_update of no page"),
    ("kvm_sev_snp_launch_update 0xffc00000 0x1000", "malformed kvm_sev_snp_launch_update line"),
    ("kvm_tdx_init_mem_region type=0x0 attributes=0x0 source=0x1 gfn=0x10000000000000 "
     "nr_pages=0x1", "malformed kvm_tdx_init_mem_region line"),
    ("kvm_tdx_init_mem_region type=0x0 attributes=0x0 source=0x1 gfn=0x800 nr_pages=0x0",
     "kvm_tdx_init_mem_region of no page"),
])
def test_bad_launch_lines_are_skipped_with_a_reason(tmp_path, line, reason):
    log = tmp_path / "q.log"
    log.write_text(f"{line}\nkvm_memory_fault start 0x1000 size 0x1000 flags 0x8\n")
    trace, summary = run(tmp_path, log)
    assert summary.skipped == {reason: 1}
    assert "populate" not in [r["kind"] for r in trace.table.to_pylist()]


# --- the import writers keep the metadata -----------------------------------------------------

@pytest.mark.parametrize("suffix", [".parquet", ".arrow", ".feather", ".jsonl", ".csv"])
@pytest.mark.parametrize("log, platform, version", [
    ("qemu-snp-launch.log", "snp", "1.1"), ("qemu-tdx.log", "tdx", "1"),
    ("qemu-iso.log", "sw", "1")])
def test_every_import_writer_keeps_platform_source_recorded_and_version(
        tmp_path, monkeypatch, suffix, log, platform, version):
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    out = f"t{suffix}"
    result = runner.invoke(cli, ["import", str(FIXTURES / log), "-o", out,
                                 "--platform", platform])
    assert result.exit_code == 0, result.output
    report = json.loads(runner.invoke(cli, ["replay", out, "--format", "json"]).stdout)
    assert report["trace"]["platform"] == platform
    info = json.loads(runner.invoke(cli, ["info", out, "--format", "json"]).stdout)
    assert info["source"].startswith(f"upmtrace import (qemu): {log}")
    assert info["recorded"] == report["recorded"] and info["recorded"]["exits"]
    assert _stored_format(tmp_path / out) == version


def _stored_format(path) -> str:
    """upmtrace.format as the file holds it, read without upmtrace's readers."""
    if path.suffix == ".jsonl":
        return json.loads(path.read_text(encoding="utf-8").splitlines()[0])["upmtrace"]["format"]
    if path.suffix == ".csv":
        return path.read_text(encoding="utf-8").splitlines()[0].removeprefix("# upmtrace.format=")
    schema = pq.read_schema(path) if path.suffix == ".parquet" else \
        pa.ipc.open_file(pa.memory_map(str(path))).schema
    return schema.metadata[b"upmtrace.format"].decode()


# --- the row builder carries latency (format 1.1) ------------------------------------------

@pytest.mark.parametrize("suffix", [".parquet", ".jsonl"])
def test_rows_with_a_latency_make_a_1_1_trace(tmp_path, suffix):
    """A parser may append the recorded latency to a row; rows without one stay 11 wide."""
    from upmtrace.trace.importers.common import Context, Options, RowSink
    from upmtrace.trace.importers.writer import metadata, write_output
    from upmtrace.trace.io import read_trace

    out = str(tmp_path / f"t{suffix}")
    sink = RowSink(str(tmp_path / "body"), out)
    sink.add((0, "npf", 0, 0x1000, None, True, True, None, None, None, None, 2_500))
    sink.add((5, "npf", 1, 0x2000, None, False, None, None, None, None, None))
    sink.add((9, "psc", 1, 0x2000, 4096, None, None, None, None, 3, "shared", None))
    sink.close()
    ctx = Context(Options(), sink)
    header = [(0, "memslot", -1, 0, 2 * M, None, None, 0, True, None, None)]
    write_output(out, header, sink.path, metadata(ctx, "test", {}))
    trace = read_trace(out)
    assert trace.table.column("latency").to_pylist() == [None, 2_500, None, None]
    assert _stored_format(tmp_path / f"t{suffix}") == "1.1"
    sink = RowSink(str(tmp_path / "body2"), out)
    sink.add((9, "psc", 1, 0x2000, 4096, None, None, None, None, 3, "shared", None))
    sink.close()
    assert metadata(Context(Options(), sink), "test", {})["upmtrace.format"] == "1"
