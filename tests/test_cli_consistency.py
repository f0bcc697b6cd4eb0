"""Every command alike: exit status on interrupt, --debug anywhere, formats and -o/--output,
tables that are never cut off a terminal, colour only on one, names that include overrides."""

from __future__ import annotations

import json
import os
import pty
import re
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from scenario import K, M, attrs, memslot, npf, psc, table
from test_timeline import long_trace

import upmtrace.fleet.pairs
import upmtrace.fleet.sweep
import upmtrace.gate.check
import upmtrace.gate.fleet
import upmtrace.trace.importers
import upmtrace.trace.io
import upmtrace.trace.synth
from upmtrace.cli import cli
from upmtrace.trace.io import write_trace

ROWS = (memslot(0, 0, 4 * M), attrs(0, 4 * M), npf(0, True), psc(0, 4 * K, "shared"),
        psc(4 * K, 4 * K, "shared"), npf(0, False))
ANSI = re.compile(r"\x1b\[[0-9;]*m")


@pytest.fixture
def work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_trace(table(*ROWS), "t.parquet")
    return tmp_path


def run(*args: str, env: dict | None = None):
    result = CliRunner(env=env).invoke(cli, list(args))
    assert "Traceback" not in result.output
    return result


# --- interrupts ------------------------------------------------------------------------------

# (command line, the function it calls that the interrupt hits)
INTERRUPTED = {
    "replay": (["replay", "t.parquet"], upmtrace.trace.io, "read_trace"),
    "compare": (["compare", "t.parquet", "--policy", "eager", "--policy", "lazy"],
                upmtrace.trace.io, "read_trace"),
    "plot": (["plot", "t.parquet", "--policy", "eager", "-o", "p.png"], upmtrace.trace.io,
             "read_trace"),
    "info": (["info", "t.parquet"], upmtrace.trace.io, "read_trace"),
    "check": (["check", "t.parquet", "--baseline", "b.json"], upmtrace.gate.check,
              "read_baseline"),
    "synth": (["synth", "snp-boot", "-o", "s.parquet"], upmtrace.trace.synth, "synthesize"),
    "import": (["import", "log.txt", "-o", "i.parquet"], upmtrace.trace.importers,
               "import_logs"),
    "fleet": (["fleet", "t.parquet", "--policy", "eager", "--workers", "1"],
              upmtrace.fleet.pairs, "run"),
    "sweep": (["sweep", "t.parquet", "--vary", "prefault=false,true", "--workers", "1"],
              upmtrace.fleet.sweep, "run_sweep"),
    "fleet-check": (["fleet", "check", "t.parquet", "--baseline", "f.json", "--workers", "1"],
                    upmtrace.gate.fleet, "read_fleet_baseline"),
    "policies": (["policies"], __import__("upmtrace.report.table").report.table,
                 "policies_table"),
}


@pytest.mark.parametrize("name", list(INTERRUPTED))
def test_ctrl_c_is_130_on_every_command(work, monkeypatch, name):
    args, module, function = INTERRUPTED[name]
    (work / "log.txt").write_text("x\n")

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(module, function, interrupted)
    result = CliRunner().invoke(cli, args)
    assert (result.exit_code, result.stderr) == (130, "Interrupted\n")


def default_sigint() -> None:
    """The child takes SIGINT as a terminal's Ctrl-C, even when this run was started in the
    background (where SIGINT is ignored, and children inherit that)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


SIGNALLED = """
import os, signal, sys, time
import upmtrace.engine as engine

def hit(*args, **kwargs):
    os.kill(os.getpid(), signal.{name})
    time.sleep(30)

engine.replay = hit
sys.argv = ["upmtrace", "replay", "t.parquet"]
from upmtrace.cli import main
main()
"""


@pytest.mark.parametrize(("name", "code"), [("SIGINT", 130), ("SIGTERM", 143)])
def test_a_real_signal_exits_128_plus_its_number(work, name, code):
    done = subprocess.run([sys.executable, "-c", SIGNALLED.format(name=name)], cwd=work,
                          capture_output=True, text=True, timeout=120,
                          preexec_fn=default_sigint)
    assert done.returncode == code, done.stderr
    assert "Traceback" not in done.stderr


# --- options every command shares ------------------------------------------------------------


def test_debug_is_accepted_after_the_command_too(work):
    for args in (["--debug", "replay", "nope.parquet"], ["replay", "nope.parquet", "--debug"],
                 ["fleet", "check", "t.parquet", "--baseline", "nope.json", "--debug"]):
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 3, args
        assert "Traceback" in result.stderr and result.stderr.splitlines()[-1].startswith(
            "Error: ")
    assert "Traceback" not in CliRunner().invoke(cli, ["replay", "nope.parquet"]).stderr


@pytest.mark.parametrize("args", [
    ["info", "t.parquet", "--format", "json"],
    ["replay", "t.parquet", "--format", "json"],
    ["compare", "t.parquet", "--policy", "eager", "--policy", "lazy", "--format", "json"],
])
@pytest.mark.parametrize("option", ["-o", "--output"])
def test_o_and_output_write_what_stdout_would_show(work, args, option):
    shown = run(*args).stdout
    assert run(*args, option, "out.json").stdout == ""
    assert (work / "out.json").read_text(encoding="utf-8") == shown


def test_info_json_and_replay_csv(work):
    info = json.loads(run("info", "t.parquet", "--format", "json").stdout)
    assert info["events"] == len(ROWS)
    rows = run("replay", "t.parquet", "--format", "csv").stdout.splitlines()
    assert rows[0] == "key,value"
    assert "exits.vm.npf,2" in rows and "policy.prefault,false" in rows
    report = json.loads(run("replay", "t.parquet", "--format", "json").stdout)
    assert f"memory.peak_resident_bytes,{report['memory']['peak_resident_bytes']}" in rows


@pytest.mark.parametrize("command", ["replay", "compare", "check", "plot", "fleet"])
@pytest.mark.parametrize("given", ["folder", "log.txt", "qemu.log"])
def test_a_recording_or_a_folder_given_as_a_trace_says_to_import_it(work, command, given):
    if given == "folder":
        (work / given).mkdir()
        if command == "fleet":
            return  # a folder is a fleet of traces
    else:
        (work / given).write_text("kvm_page_fault ...\n")
    args = {"replay": ["replay", given],
            "check": ["check", given, "--baseline", "b.json", "--update"],
            "compare": ["compare", given, "--policy", "eager", "--policy", "lazy"],
            "plot": ["plot", given, "--policy", "eager", "-o", "p.png"],
            "fleet": ["fleet", given, "--policy", "eager"]}[command]
    result = run(*args)
    assert result.exit_code == 3
    assert result.stderr.startswith(f"Error: {given}: ")
    assert "`upmtrace import LOG... -o OUT.parquet`" in result.stderr


def test_names_include_the_overrides_in_fleet_and_compare(work):
    fleet = json.loads(run("fleet", "t.parquet", "--policy", "eager", "--set", "prefault=true",
                           "--workers", "1", "--format", "json").stdout)
    assert [p["name"] for p in fleet["policies"]] == ["eager+prefault=true"]
    compare = json.loads(run("compare", "t.parquet", "--policy", "eager", "--policy",
                             "lazy+exits=per-entry", "--set", "prefault=true",
                             "--format", "json").stdout)
    assert [r["policy"]["name"] for r in compare["results"]] == [
        "eager+prefault=true", "lazy+exits=per-entry+prefault=true"]


# --- tables off a terminal: as wide as needed, whatever COLUMNS says -------------------------


@pytest.mark.parametrize("args", [
    ["compare", "t.parquet", "--policy", "eager", "--policy", "lazy", "--policy", "sg",
     "--policy", "hugepool+lazy_limit=1T"],
    ["info", "t.parquet"],
    ["replay", "t.parquet", "--policy", "lazy+lazy_limit=1T"],
    ["policies"],
])
def test_tables_off_a_terminal_are_never_cut_and_ignore_columns(work, args):
    narrow, wide = (run(*args, env={"COLUMNS": c}).stdout for c in ("40", "300"))
    assert narrow == wide
    assert "…" not in narrow
    if args[0] == "info":
        sha = json.loads(run("info", "t.parquet", "--format", "json").stdout)["sha256"]
        assert sha in narrow
    if args[0] == "compare":
        row = next(line for line in narrow.splitlines() if "memory.peak_resident_bytes" in line)
        assert len(row.split("  ")) > 1 and "hugepool+lazy_limit=1T" in narrow
    if args[0] == "replay":
        assert "lazy_limit=1.0 TiB" in narrow and "1099511627776" not in narrow


def test_check_metric_names_are_whole(work):
    run("check", "t.parquet", "--baseline", "b.json", "--update", "--metric", "memory")
    out = run("check", "t.parquet", "--baseline", "b.json", env={"COLUMNS": "30"}).stdout
    assert "memory.peak_duplicate_bytes" in out and "…" not in out
    row = next(line for line in out.splitlines() if "memory.peak_resident_bytes" in line)
    assert "KiB" in row  # sizes human-readable in tables


def tdx_trace(path: Path) -> None:
    rows = (memslot(0, 0, 4 * M), attrs(0, 4 * M), npf(0, True), npf(4 * K, True))
    write_trace(table(*rows), path, platform="tdx")


def test_tdx_names_the_fault_an_ept_violation_and_has_no_rmp(work):
    tdx_trace(work / "tdx.parquet")
    out = run("replay", "tdx.parquet").stdout
    rows = {line.split("│")[1].strip() for line in out.splitlines() if line.startswith("│")}
    assert "EPT_VIOLATION" in rows and "npf" not in rows
    for label in ("RMP updates 4 KiB", "PSMASH", "direct-map splits"):
        assert re.search(rf"{label}\s+n/a", out), label
    snp = run("replay", "t.parquet").stdout
    assert re.search(r"RMP updates 4 KiB\s+\d", snp) and "EPT_VIOLATION" not in snp


# --- colour: on a terminal only, never with NO_COLOR -----------------------------------------


def on_a_terminal(args: list[str], cwd: Path, **env: str) -> str:
    """stdout (and stderr) of `upmtrace ARGS` run on a pseudo-terminal, 120 columns wide."""
    main, sub = pty.openpty()
    environ = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
    environ.update(COLUMNS="120", TERM="xterm", **env)
    with subprocess.Popen([sys.executable, "-m", "upmtrace", *args], cwd=cwd, stdout=sub,
                          stderr=sub, env=environ) as proc:
        os.close(sub)
        chunks = []
        while True:
            try:
                chunk = os.read(main, 65536)
            except OSError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        proc.wait(timeout=120)
    os.close(main)
    return b"".join(chunks).decode()


def test_regressions_are_red_on_a_terminal_and_plain_elsewhere(work):
    run("check", "t.parquet", "--baseline", "b.json", "--update")
    args = ["check", "t.parquet", "--baseline", "b.json", "--set", "exits=per-entry"]
    coloured = on_a_terminal(args, work)
    regressed = next(line for line in coloured.splitlines() if "REGRESSED" in line)
    assert "\x1b[1;31m" in regressed  # bold red
    assert "\x1b[" not in on_a_terminal(args, work, NO_COLOR="1")
    assert "\x1b[" not in run(*args).stdout  # piped (CliRunner is not a terminal)


def test_compare_deltas_are_coloured_on_a_terminal(work):
    args = ["compare", "t.parquet", "--policy", "eager", "--policy", "eager+exits=per-entry"]
    coloured = on_a_terminal(args, work)
    line = next(line for line in coloured.splitlines() if "KVM_EXIT_HYPERCALL" in line)
    assert "\x1b[31m+1" in line  # more exits: red
    plain = next(x for x in run(*args).stdout.splitlines() if "KVM_EXIT_HYPERCALL" in x)
    assert ANSI.sub("", line).split() == plain.split()


# --- timeline bound, progress, Dask scratch --------------------------------------------------


@pytest.mark.parametrize("rows", [1, 2, 3, 7, 20, 100])
def test_timeline_rows_is_an_upper_bound(work, rows):
    events = long_trace(work / "long.parquet")
    assert run("replay", "long.parquet", "--timeline", "tl.parquet", "--timeline-rows",
               str(rows)).exit_code == 0
    tl = pq.read_table(work / "tl.parquet").to_pylist()
    assert 1 <= len(tl) <= rows
    assert tl[-1]["events"] == events  # the last row is the final state
    assert [r["ts"] for r in tl] == sorted(r["ts"] for r in tl)


def test_paranoid_shows_the_bar_for_shorter_traces(monkeypatch):
    import io

    import upmtrace.progress as progress

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(progress.sys, "stderr", Terminal())

    class Trace:
        events = 5_000

    with progress.watched(Trace(), slow=True) as seen:
        assert isinstance(seen, progress.Tracked)
    with progress.watched(Trace()) as seen:
        assert isinstance(seen, Trace)  # a normal replay of 5,000 events takes no time


def test_dask_leaves_no_scratch_space_in_the_working_directory(work):
    pytest.importorskip("distributed")
    result = run("fleet", "t.parquet", "--policy", "eager", "--executor", "dask",
                 "--workers", "1", "--format", "json")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in work.iterdir()) == ["t.parquet"]
