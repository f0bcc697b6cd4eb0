"""Where outputs go: `-` is standard output, devices and FIFOs are written in place, symbolic
links are followed, and an output that cannot be written fails before anything is replayed."""

from __future__ import annotations

import io
import json
import os
import stat
import sys
import threading
from pathlib import Path

import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from scenario import K, M, attrs, memslot, npf, psc, table

import upmtrace.gate.check
from upmtrace.cli import cli
from upmtrace.trace.io import write_trace

ROWS = (memslot(0, 0, 4 * M), attrs(0, 4 * M), npf(0, True), psc(0, 4 * K, "shared"),
        psc(4 * K, 4 * K, "shared"), npf(0, False))
OLD = b"old bytes\n"


@pytest.fixture
def work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_trace(table(*ROWS), "t.parquet")
    return tmp_path


def run(*args: str):
    result = CliRunner().invoke(cli, list(args))
    assert "Traceback" not in result.output
    return result


def replay_json(*extra: str):
    return run("replay", "t.parquet", "--format", "json", *extra)


# --- `-`, devices, FIFOs, symbolic links ---------------------------------------------------


@pytest.mark.parametrize("option", ["-o", "--output"])
def test_dash_is_standard_output_and_no_file_named_dash(work, option):
    result = replay_json(option, "-")
    assert result.exit_code == 0
    assert json.loads(result.stdout)["policy"]["name"] == "eager"
    assert not (work / "-").exists()


def test_a_symlink_is_followed_and_stays_a_link(work):
    target = work / "real.json"
    target.write_bytes(OLD)
    os.chmod(target, 0o640)
    (work / "link.json").symlink_to("real.json")
    assert replay_json("--output", "link.json").exit_code == 0
    assert (work / "link.json").is_symlink()
    assert json.loads(target.read_text(encoding="utf-8"))["schema"] == "upmtrace.report.v1"
    assert stat.S_IMODE(target.stat().st_mode) == 0o640  # the replaced file keeps its mode
    assert sorted(p.name for p in work.iterdir()) == ["link.json", "real.json", "t.parquet"]


def test_a_dangling_symlink_creates_its_target(work):
    (work / "link.json").symlink_to("made.json")
    assert replay_json("--output", "link.json").exit_code == 0
    assert (work / "link.json").is_symlink() and (work / "made.json").is_file()


def test_dev_null_stays_a_character_device(work):
    before = os.stat("/dev/null")
    for args in (["replay", "t.parquet", "--output", "/dev/null"],
                 ["replay", "t.parquet", "--format", "csv", "-o", "/dev/null"],
                 ["synth", "snp-boot", "--memory", "256M", "-o", "/dev/null"]):
        assert run(*args).exit_code == 0, args
    after = os.stat("/dev/null")
    assert stat.S_ISCHR(after.st_mode) and after.st_rdev == before.st_rdev
    assert not list(Path("/dev").glob(".null.*"))


def test_a_fifo_is_written_in_place(work):
    fifo = work / "pipe"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()))
    reader.start()
    result = replay_json("--output", str(fifo))
    reader.join(timeout=60)
    assert result.exit_code == 0
    assert json.loads(got[0])["schema"] == "upmtrace.report.v1"
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    assert sorted(p.name for p in work.iterdir()) == ["pipe", "t.parquet"]


def test_synth_and_import_write_parquet_to_standard_output(work):
    result = run("synth", "snp-boot", "--memory", "256M", "-o", "-")
    assert result.exit_code == 0
    assert pq.read_table(io.BytesIO(result.stdout_bytes)).num_rows > 0
    assert result.stderr.endswith(" rows written to -\n")
    log = work / "log.txt"
    log.write_text(" CPU 0/KVM-1 [001] ..... 100.314706: kvm_page_fault: vcpu 0 rip 0x0 "
                   "address 0x0000000000100000 error_code 0x400000006\n")
    result = run("import", str(log), "-o", "-")
    assert result.exit_code == 0, result.stderr
    assert pq.read_table(io.BytesIO(result.stdout_bytes)).num_rows > 0
    assert sorted(p.name for p in work.iterdir()) == ["log.txt", "t.parquet"]


def test_plot_and_fleet_results_to_standard_output(work):
    image = run("plot", "t.parquet", "--policy", "eager", "--timeline-rows", "4", "-o", "-")
    assert image.exit_code == 0 and image.stdout_bytes.startswith(b"\x89PNG")
    assert image.stderr == "wrote - (eager)\n"
    fleet = run("fleet", "t.parquet", "--policy", "eager", "--workers", "1", "-o", "-")
    assert fleet.exit_code == 0
    assert pq.read_table(io.BytesIO(fleet.stdout_bytes)).column("policy.name").to_pylist() == [
        "eager"]
    assert "Fleet: 1 traces" in fleet.stderr  # the summary moved aside


def test_timeline_to_standard_output_moves_the_report_aside(work):
    result = run("replay", "t.parquet", "--timeline", "-", "--format", "json")
    assert result.exit_code == 0
    assert pacsv.read_csv(io.BytesIO(result.stdout_bytes)).num_rows >= 1
    assert json.loads(result.stderr)["schema"] == "upmtrace.report.v1"


def test_two_outputs_cannot_both_be_standard_output(work):
    result = run("replay", "t.parquet", "--output", "-", "--timeline", "-")
    assert result.exit_code == 2
    assert result.stderr == ("Error: --output and --timeline both name standard output (-); "
                             "name a file for all but one\n")


def test_binary_output_to_a_terminal_is_a_usage_error(work, monkeypatch):
    import upmtrace.atomic as atomic

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(atomic.sys, "stdout", Terminal())
    with pytest.raises(atomic.UsageError, match=r"^-o -: Parquet is binary; redirect"):
        atomic.check_output("-", "-o", binary="Parquet")
    atomic.check_output("-", "--output")  # text is fine on a terminal


# --- unwritable outputs fail before the replay -----------------------------------------------


@pytest.fixture
def no_replay(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("replayed before checking the output")

    monkeypatch.setattr(sys.modules["upmtrace.engine"], "replay", refuse)  # the package
    monkeypatch.setattr(upmtrace.gate.check, "replay", refuse)


@pytest.mark.parametrize("args", [
    ["replay", "t.parquet", "--output", "{bad}"],
    ["replay", "t.parquet", "--timeline", "{bad}.csv"],
    ["compare", "t.parquet", "--policy", "eager", "--policy", "lazy", "-o", "{bad}"],
    ["plot", "t.parquet", "--policy", "eager", "-o", "{bad}.png"],
    ["check", "t.parquet", "--baseline", "b.json", "--junit", "{bad}.xml", "--update"],
    ["info", "t.parquet", "-o", "{bad}"],
])
@pytest.mark.parametrize(("bad", "reason"), [
    ("no/such/folder/out", "No such file or directory"),
    ("adir", "Is a directory"),
])
def test_an_unwritable_output_is_one_error_before_replaying(work, no_replay, args, bad, reason):
    (work / "adir").mkdir()
    (work / "adir.csv").mkdir()
    (work / "adir.png").mkdir()
    (work / "adir.xml").mkdir()
    args = [a.replace("{bad}", bad) for a in args]
    path = next(a for a in args if a.startswith(bad))
    if reason == "No such file or directory" and "--junit" in args:
        return  # --junit creates its folder (tested below)
    result = run(*args)
    assert (result.exit_code, result.stdout) == (3, "")
    assert result.stderr == f"Error: {path}: cannot write ({reason})\n"


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into a read-only folder")
def test_a_read_only_folder_is_one_error_before_replaying(work, no_replay):
    folder = work / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    result = replay_json("--output", "ro/out.json")
    assert (result.exit_code, result.stderr) == (
        3, "Error: ro/out.json: cannot write (Permission denied)\n")


# --- check: folders, JUnit always ---------------------------------------------------------


def junit_of(path: Path) -> dict[str, str]:
    import xml.etree.ElementTree as ET

    suite = ET.parse(path).getroot().find("testsuite")
    return {k: suite.get(k) for k in ("tests", "failures", "errors")}


def test_check_update_creates_the_baseline_and_junit_folders(work):
    result = run("check", "t.parquet", "--update", "--baseline", "baselines/ci/x.json",
                 "--junit", "reports/junit.xml")
    assert result.exit_code == 0, result.output
    assert json.loads((work / "baselines/ci/x.json").read_text(encoding="utf-8"))["schema"] == (
        "upmtrace.baseline.v1")
    assert junit_of(work / "reports/junit.xml") == {"tests": "1", "failures": "0",
                                                     "errors": "0"}


@pytest.mark.parametrize(("setup", "code", "counts"), [
    ("missing", 3, {"tests": "1", "failures": "0", "errors": "1"}),
    ("corrupt", 3, {"tests": "1", "failures": "0", "errors": "1"}),
    ("pass", 0, {"tests": "8", "failures": "0", "errors": "0"}),
    ("regression", 1, {"tests": "8", "failures": "2", "errors": "0"}),
])
def test_junit_is_always_written(work, setup, code, counts):
    if setup != "missing":
        run("check", "t.parquet", "--baseline", "b.json", "--update")
    if setup == "corrupt":
        (work / "b.json").write_text("{not json")
    extra = ["--set", "exits=per-entry"] if setup == "regression" else []
    result = run("check", "t.parquet", "--baseline", "b.json", "--junit", "j.xml", *extra)
    assert result.exit_code == code
    assert junit_of(work / "j.xml") == counts


def test_check_format_json(work):
    run("check", "t.parquet", "--baseline", "b.json", "--update")
    result = run("check", "t.parquet", "--baseline", "b.json", "--set", "exits=per-entry",
                 "--format", "json")
    doc = json.loads(result.stdout)
    assert result.exit_code == 1 and doc["schema"] == "upmtrace.check.v1"
    assert doc["regressions"] == 2 and doc["policy"] == "eager"
    assert doc["knob_changes"] == {"exits": {"baseline": "coalesce", "now": "per-entry"}}
    hypercall = next(v for v in doc["verdicts"]
                     if v["metric"] == "exits.userspace.KVM_EXIT_HYPERCALL")
    assert hypercall == {"metric": "exits.userspace.KVM_EXIT_HYPERCALL", "baseline": 1,
                         "now": 2, "delta": 1, "status": "regressed"}


def test_fleet_check_names_the_traces_that_regressed(work):
    write_trace(table(memslot(0, 0, 4 * M), attrs(0, 4 * M), npf(0, True)), "quiet.parquet")
    args = ["fleet", "check", "t.parquet", "quiet.parquet", "--baseline", "f.json",
            "--workers", "1"]
    assert run(*args, "--update").exit_code == 0
    result = run(*args, "--set", "exits=per-entry", "--format", "json", "--junit", "j.xml")
    assert result.exit_code == 1
    traces = json.loads(result.stdout)["traces"]
    assert {(d["metric"], d["trace"], d["baseline"], d["now"]) for d in traces} == {
        ("eager:exits.userspace_total", "t.parquet", 1, 2),
        ("eager:exits.userspace.KVM_EXIT_HYPERCALL", "t.parquet", 1, 2)}
    table_out = run(*args, "--set", "exits=per-entry").stdout
    assert "Traces behind the regressions" in table_out
    row = next(line for line in table_out.splitlines()
               if line.strip().startswith("eager:exits.userspace_total") and "t.parquet" in line)
    assert row.split() == ["eager:exits.userspace_total", "t.parquet", "1", "2", "+1"]
    assert "quiet.parquet" not in table_out
    junit = (work / "j.xml").read_text(encoding="utf-8")
    assert "\n  t.parquet: 1 -&gt; 2 (+1)" in junit and "quiet.parquet" not in junit
