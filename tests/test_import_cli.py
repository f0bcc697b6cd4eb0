"""`upmtrace import` as a user runs it: odd real log shapes, the summary, errors."""

from __future__ import annotations

import gzip
import json
import re

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_import_ftrace import FIXTURES, run

from upmtrace.cli import cli
from upmtrace.errors import InputError
from upmtrace.trace.importers import Options, import_logs
from upmtrace.trace.io import read_trace

SNP = (FIXTURES / "snp-ftrace.txt").read_bytes()
QEMU = (FIXTURES / "qemu-snp.log").read_bytes()


def invoke(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert "Traceback" not in result.output
    return result


def events(path) -> list[dict]:
    return read_trace(path).table.to_pylist()


def test_import_prints_events_skipped_reasons_and_recorded_counts(tmp_path):
    out = tmp_path / "t.parquet"
    result = invoke("import", FIXTURES / "snp-ftrace.txt", "-o", out)
    assert result.exit_code == 0, result.output
    text = result.output
    assert f"8 events written to {out} (platform snp) from 39 lines of 1 file" in text
    assert "events: memslot 1, set_attributes 1, npf 3, psc 2, map_gpa 1" in text
    assert "skipped lines: 14\n  12  comment or header line\n" in text
    assert "latencies (kvm_exit to the vCPU's next kvm_entry): 1 on events, 1 exits" in text
    assert re.search(r"\n  exits\.userspace\.KVM_EXIT_MEMORY_FAULT +1\n", text)
    assert "note: the log registers no memslot: added slot 0 [0x0, 0x80000000)" in text


def test_replay_of_an_import_carries_the_recorded_counts(tmp_path):
    out = tmp_path / "t.parquet"
    assert invoke("import", FIXTURES / "qemu-snp.log", "-o", out).exit_code == 0
    report = json.loads(invoke("replay", out, "--format", "json").output)
    assert report["recorded"]["exits"]["userspace"] == report["exits"]["userspace"]


def test_crlf_binary_garbage_and_a_truncated_last_line(tmp_path):
    clean = tmp_path / "clean.txt"
    clean.write_bytes(SNP)
    odd = tmp_path / "odd.txt"
    garbage = b"\x00\xff\xfe\x80garbage\x1b[0m \xc3\x28 [001] ....\n"
    cut = b"       CPU 1/KVM-7290    [031] .....  2926.100000: kvm_page_fault: vcpu 1 rip 0x"
    odd.write_bytes(SNP.replace(b"\n", b"\r\n") + garbage * 3 + cut)
    trace, summary = run(tmp_path, odd)
    assert trace.table.to_pylist() == events(_import(tmp_path, clean))
    assert summary.skipped["unrecognised line"] == 3
    assert summary.skipped["truncated last line (no newline at end of file)"] == 1


def _import(tmp_path, log, name="ref.parquet"):
    out = tmp_path / name
    import_logs([str(log)], str(out), Options())
    return out


def test_compressed_logs_and_several_files_in_order(tmp_path):
    part1, part2 = QEMU.split(b"7290@1721587409.300000")
    first, second = tmp_path / "q.1.log.gz", tmp_path / "q.2.log"
    first.write_bytes(gzip.compress(part1))
    second.write_bytes(b"7290@1721587409.300000" + part2)
    trace, summary = run(tmp_path, first, second)
    assert trace.table.to_pylist() == events(_import(tmp_path, FIXTURES / "qemu-snp.log"))
    assert summary.files == ((str(first), "qemu"), (str(second), "qemu"))


def test_a_later_file_on_an_earlier_clock_continues_the_timeline(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    line = "  CPU 0/KVM-1 [000] .....  {}: kvm_page_fault: vcpu 0 rip 0x0 address 0x1000 " \
           "error_code 0x6\n"
    a.write_text(line.format("100.000000") + line.format("100.000002"))
    b.write_text(line.format("5.000000") + line.format("5.000003") + line.format("5.000001"))
    trace, summary = run(tmp_path, a, b)
    assert [r["ts"] for r in trace.table.to_pylist() if r["kind"] == "npf"] == \
        [0, 2000, 2000, 5000, 5000]
    assert any("1 lines had a time earlier" in n for n in summary.notes)


def test_nothing_usable_is_exit_3_with_one_line_naming_the_file(tmp_path):
    log = tmp_path / "notes.txt"
    log.write_text("# a comment\nhello world\nthe quick brown fox\n")
    out = tmp_path / "t.parquet"
    result = invoke("import", log, "-o", out)
    assert result.exit_code == 3
    assert result.output == (
        f"Error: {log}: nothing to import: none of its 3 lines is a usable event (2 "
        "unrecognised line; 1 comment or header line); expected ftrace / trace-cmd report / "
        "perf script text of kvm tracepoints or a QEMU -trace log\n")
    assert not out.exists() and list(tmp_path.iterdir()) == [log]


def test_only_recorded_counts_is_nothing_usable(tmp_path):
    log = tmp_path / "exits.txt"
    log.write_text("  CPU 0/KVM-1 [000] .....  1.000000: kvm_exit: vcpu 0 reason hlt rip 0x0\n")
    result = invoke("import", log, "-o", tmp_path / "t.parquet")
    assert result.exit_code == 3 and result.output.count("\n") == 1


@pytest.mark.parametrize("args, code, message", [
    (["missing.log"], 3, "Error: missing.log: no such file\n"),
    (["{fixture}", "--memslot", "0x1000:5"], 2,
     "Error: --memslot '0x1000:5': GPA and SIZE must be 4 KiB aligned, SIZE positive, within "
     "52 bits\n"),
    (["{fixture}", "--memslot", "0:1G:shared"], 2,
     "Error: --memslot '0:1G:shared': expected GPA:SIZE or GPA:SIZE:gmem\n"),
    (["{fixture}", "--memslot", "0:1G", "--memslot", "0x100000:1M"], 2,
     "Error: --memslot 0x0:0x40000000 and 0x100000:0x100000 overlap\n"),
])
def test_usage_and_input_errors_are_one_line(tmp_path, monkeypatch, args, code, message):
    monkeypatch.chdir(tmp_path)
    args = [a.replace("{fixture}", str(FIXTURES / "perf-script.txt")) for a in args]
    result = invoke("import", *args, "-o", "t.parquet")
    assert (result.exit_code, result.output) == (code, message)


def test_unknown_output_suffix_is_a_usage_error(tmp_path):
    result = invoke("import", FIXTURES / "perf-script.txt", "-o", tmp_path / "t.txt")
    assert result.exit_code == 2 and "unknown trace format" in result.output


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".arrow"])
def test_other_output_formats_hold_the_same_events(tmp_path, suffix):
    ref = events(_import(tmp_path, FIXTURES / "qemu-snp.log"))
    out = _import(tmp_path, FIXTURES / "qemu-snp.log", "t" + suffix)
    assert read_trace(out).table.to_pylist() == ref


def test_from_forces_the_format(tmp_path):
    result = invoke("import", FIXTURES / "qemu-snp.log", "--from", "ftrace", "-o",
                    tmp_path / "t.parquet")
    assert result.exit_code == 3 and "nothing to import" in result.output


def test_help_lists_the_options():
    text = invoke("import", "--help").output
    for option in ("--from", "--platform", "--memslot", "--initial-attributes", "--shared-bit"):
        assert option in text


LINES = [
    "  CPU 0/KVM-7 [001] d....  {t}: kvm_page_fault: vcpu 0 rip 0x0 address {a} error_code {e}",
    "  CPU 0/KVM-7 [001] d....  {t}: kvm_vmgexit_msr_protocol_enter: vcpu 0, ghcb_gpa {e}",
    "  CPU 0/KVM-7 [001] d....  {t}: kvm_hypercall: nr 0xc a0 {a} a1 {e} a2 0x10 a3 0x0",
    " qemu-9 [002] .....  {t}: kvm_vm_set_mem_attributes: {a} -- {e} [0x8]",
    "  CPU 0/KVM-7 [001] d....  {t}: kvm_userspace_exit: reason error ({e})",
]
QEMU_LINES = [
    "kvm_set_user_memory AddrSpace#0 Slot#{e} flags=0x4 gpa={a} size={a} ua=0x0 guest_memfd=3 "
    "guest_memfd_offset=0x0 ret=0",
    "1@{t}:kvm_memory_fault start {a} size 0x1000 flags {e}",
    "kvm_hc_map_gpa_range gpa {a} size {e} attributes 0x11 flags 0x1",
]
numbers = st.one_of(st.integers(0, 1 << 64), st.sampled_from([0, 0x1000, 0x200000, 1 << 51]))
hexes = numbers.map(hex) | st.text("0123456789abcdefx-", max_size=20)
times = st.integers(0, 10**12).map(lambda n: f"{n // 10**6}.{n % 10**6:06d}") | st.just("1.5")


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from(LINES + QEMU_LINES), hexes, hexes, times,
                          st.binary(max_size=8)), max_size=12), st.sampled_from(["snp", "tdx"]))
def test_any_mix_of_lines_gives_a_valid_trace_or_one_clear_error(tmp_path, lines, platform):
    """Whatever the lines hold, the import never crashes and writes only a valid trace."""
    from upmtrace.trace.schema import Platform

    body = b"".join(template.format(t=t, a=a, e=e).encode() + junk + b"\n"
                    for template, a, e, t, junk in lines)
    log = tmp_path / "fuzz.log"
    log.write_bytes(body)
    out = tmp_path / "fuzz.parquet"
    out.unlink(missing_ok=True)
    try:
        summary = import_logs([str(log)], str(out), Options(platform=Platform(platform)))
    except InputError as err:
        assert "nothing to import" in str(err) and not out.exists()
        return
    assert read_trace(out).events == summary.total_events


def test_a_corrupt_compressed_tail_keeps_what_was_read(tmp_path):
    log = tmp_path / "q.log.gz"
    data = gzip.compress(QEMU * 50)
    log.write_bytes(data[: len(data) * 3 // 4])
    trace, summary = run(tmp_path, log)
    assert summary.skipped["unreadable rest of file"] == 1
    assert trace.events > 16


def test_an_output_directory_that_does_not_exist_is_one_line(tmp_path):
    out = tmp_path / "no" / "t.parquet"
    result = invoke("import", FIXTURES / "perf-script.txt", "-o", out)
    assert result.exit_code == 3
    assert result.output == f"Error: {out}: cannot write (No such file or directory)\n"
