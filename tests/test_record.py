"""`upmtrace record` with fake trace-cmd and perf executables first on PATH.

The fakes log their arguments (one JSON list per call), write a binary file where `record -o`
says, and print a canned text log for `report` / `script`; the tracefs folder is a temporary
tree named by UPMTRACE_TRACEFS.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_cli_consistency import default_sigint

from upmtrace.cli import cli
from upmtrace.trace import record as recorder
from upmtrace.trace.record import EVENTS, QEMU_EVENTS

FIXTURES = Path(__file__).parent / "fixtures" / "import"
CANNED = (FIXTURES / "snp-ftrace.txt").read_text(encoding="utf-8")

FAKE = '''#!{python}
import json, os, signal, sys, time
args = sys.argv[1:]
with open(os.environ["FAKE_CALLS"], "a") as f:
    f.write(json.dumps([os.path.basename(sys.argv[0])] + args) + "\\n")
mode = os.environ.get("FAKE_MODE", "ok")
if args[0] == "record":
    if mode == "denied":
        sys.stderr.write("trace-cmd: Permission denied\\n  opening /sys/kernel/tracing/events\\n"
                         "Permission denied\\n")
        sys.exit(1)
    if mode == "broken":
        sys.stderr.write("something else went wrong\\n")
        sys.exit(2)
    raw = args[args.index("-o") + 1]
    if mode == "ctrl-c":  # as a terminal does: SIGINT to upmtrace, which passes it on
        stopped = []
        signal.signal(signal.SIGINT, lambda *_: stopped.append(1))
        os.kill(os.getppid(), signal.SIGINT)
        while not stopped:
            signal.pause()
    with open(raw, "wb") as f:
        f.write(b"raw tracing data")
    sys.exit(0)
if args[0] in ("report", "script"):
    sys.stdout.write(open(os.environ["FAKE_OUTPUT"]).read())
    sys.stdout.flush()
    if mode == "ctrl-c-convert":  # interrupted while the log is being written
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        os.kill(os.getppid(), signal.SIGINT)
        time.sleep(60)
    sys.exit(0)
sys.exit(9)
'''


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """A bin folder with trace-cmd and perf first on PATH, a tracefs tree, a calls log."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("trace-cmd", "perf"):
        tool = bin_dir / name
        tool.write_text(FAKE.format(python=sys.executable))
        tool.chmod(0o755)
    tracefs = tmp_path / "tracing"
    for event in EVENTS:
        (tracefs / "events" / "kvm" / event).mkdir(parents=True)
        (tracefs / "events" / "kvm" / event / "enable").write_text("0\n")
        (tracefs / "events" / "kvm" / event / "id").write_text("1\n")
    canned = tmp_path / "canned.txt"
    canned.write_text(CANNED)
    calls = tmp_path / "calls.jsonl"
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "UPMTRACE_TRACEFS": str(tracefs),
           "FAKE_CALLS": str(calls), "FAKE_OUTPUT": str(canned)}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return type("Fake", (), {"bin": bin_dir, "tracefs": tracefs, "calls": calls, "env": env})


def calls(fake) -> list[list[str]]:
    if not fake.calls.exists():
        return []
    return [json.loads(line) for line in fake.calls.read_text(encoding="utf-8").splitlines()]


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def error(result) -> str:
    """The error line: the last line on stderr (a progress line may come before it)."""
    lines = result.stderr.splitlines()
    assert sum(line.startswith("Error:") for line in lines) == 1, result.stderr
    assert "Traceback" not in result.output
    return lines[-1] + "\n"


def enabled(argv: list[str]) -> list[str]:
    return [argv[i + 1] for i, arg in enumerate(argv) if arg == "-e"]


def test_trace_cmd_records_every_importer_tracepoint_then_writes_the_report(tmp_path, fake):
    out = tmp_path / "kvm.log"
    result = invoke("record", "-o", out, "--duration", "2.5")
    assert result.exit_code == 0, result.output
    record, report = calls(fake)
    assert record[:3] == ["trace-cmd", "record", "-o"]
    assert enabled(record) == [f"kvm:{e}" for e in EVENTS]
    assert {"kvm:kvm_exit", "kvm:kvm_entry"} <= set(enabled(record))
    assert record[-2:] == ["sleep", "2.5"]
    raw = record[3]
    assert report == ["trace-cmd", "report", "-i", raw, "-t"]
    assert out.read_text(encoding="utf-8") == CANNED
    assert not Path(raw).exists()  # the binary file and its folder are removed
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert f"wrote {out}" in result.output


def test_pid_records_every_thread_of_the_vmm(tmp_path, fake):
    me = os.getpid()
    tids = sorted(int(t) for t in os.listdir(f"/proc/{me}/task"))
    assert invoke("record", "-o", tmp_path / "l.log", "--pid", me).exit_code == 0
    record = calls(fake)[0]
    assert [int(record[i + 1]) for i, a in enumerate(record) if a == "-P"] == tids
    assert "sleep" not in record  # until Ctrl-C


def test_perf_records_the_process_and_scripts_with_nanoseconds(tmp_path, fake):
    out = tmp_path / "kvm.log"
    result = invoke("record", "-o", out, "--tool", "perf", "--pid", os.getpid(),
                    "--duration", "1")
    assert result.exit_code == 0, result.output
    record, script = calls(fake)
    assert record[:4] == ["perf", "record", "-o", record[3]]
    assert enabled(record) == [f"kvm:{e}" for e in EVENTS]
    assert record[-5:] == ["-p", str(os.getpid()), "--", "sleep", "1"]
    assert script == ["perf", "script", "-i", record[3], "--ns", "-F",
                      "comm,tid,cpu,time,event,trace"]
    assert out.read_text(encoding="utf-8") == CANNED


def test_system_wide_perf_without_pid(tmp_path, fake):
    assert invoke("record", "-o", tmp_path / "l.log", "--tool", "perf").exit_code == 0
    assert calls(fake)[0][-1] == "-a"


def test_tracepoints_this_kernel_lacks_are_left_out(tmp_path, fake):
    import shutil

    shutil.rmtree(fake.tracefs / "events" / "kvm" / "kvm_vmgexit_enter")
    assert invoke("record", "-o", tmp_path / "l.log").exit_code == 0
    assert "kvm:kvm_vmgexit_enter" not in enabled(calls(fake)[0])
    dry = invoke("record", "-o", tmp_path / "l.log", "--dry-run").output
    assert "# not in this kernel, left out: kvm_vmgexit_enter" in dry


def test_the_log_goes_to_standard_output_with_dash(tmp_path, fake, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, ["record", "-o", "-", "--duration", "1"])
    assert result.exit_code == 0, result.stderr
    assert result.stdout == CANNED


def test_dry_run_prints_the_recipe_and_runs_nothing(tmp_path, fake):
    result = invoke("record", "-o", tmp_path / "kvm.log", "--dry-run", "--duration", "10")
    assert result.exit_code == 0, result.output
    text = result.output
    events = " ".join(f"-e kvm:{e}" for e in EVENTS)
    assert f"trace-cmd record -o trace.dat {events} sleep 10\n" in text
    assert f"trace-cmd report -i trace.dat -t > {tmp_path / 'kvm.log'}\n" in text
    for event in QEMU_EVENTS:
        assert f"-trace {event} " in text
    assert "upmtrace import" in text
    assert calls(fake) == []
    assert not (tmp_path / "kvm.log").exists()


def test_dry_run_needs_neither_tool_nor_tracefs(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("UPMTRACE_TRACEFS", str(tmp_path / "nowhere"))
    result = invoke("record", "-o", tmp_path / "kvm.log", "--dry-run", "--tool", "perf")
    assert result.exit_code == 0, result.output
    assert "perf record -o perf.data" in result.output
    assert "-a\n" in result.output


def test_a_missing_tool_is_one_line_exit_3(tmp_path, fake, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    result = invoke("record", "-o", tmp_path / "kvm.log")
    assert result.exit_code == 3
    assert result.output == "Error: trace-cmd not found on PATH (install it, or use --tool perf)\n"


def test_a_missing_tracefs_is_one_line_exit_3(tmp_path, fake, monkeypatch):
    monkeypatch.setenv("UPMTRACE_TRACEFS", str(tmp_path / "nowhere"))
    result = invoke("record", "-o", tmp_path / "kvm.log")
    assert result.exit_code == 3
    assert result.output == (f"Error: no tracefs at {tmp_path / 'nowhere'} (mount -t tracefs "
                             "nodev /sys/kernel/tracing)\n")
    assert calls(fake) == []


def test_a_tracefs_without_kvm_events_is_one_line_exit_3(tmp_path, fake):
    import shutil

    shutil.rmtree(fake.tracefs / "events" / "kvm")
    result = invoke("record", "-o", tmp_path / "kvm.log")
    assert result.exit_code == 3
    assert result.output.startswith("Error: ")
    assert "kvm module loaded?" in result.output and result.output.count("\n") == 1


def test_missing_privileges_found_before_running(tmp_path, fake, monkeypatch):
    monkeypatch.setattr(recorder, "permitted", lambda path, mode: False)
    result = invoke("record", "-o", tmp_path / "kvm.log")
    assert result.exit_code == 3
    assert error(result) == (f"Error: trace-cmd: permission denied on {fake.tracefs}: recording "
                             "kernel tracepoints needs root (perf: CAP_PERFMON and "
                             "kernel.perf_event_paranoid <= -1 also do)\n")
    assert calls(fake) == []


def test_missing_privileges_reported_by_the_tool(tmp_path, fake, monkeypatch):
    monkeypatch.setenv("FAKE_MODE", "denied")
    result = invoke("record", "-o", tmp_path / "kvm.log")
    assert result.exit_code == 3
    assert error(result).startswith("Error: trace-cmd: permission denied on ")
    assert error(result).endswith(": Permission denied\n")
    assert not (tmp_path / "kvm.log").exists()


def test_a_failing_tool_is_one_line_exit_3(tmp_path, fake, monkeypatch):
    monkeypatch.setenv("FAKE_MODE", "broken")
    result = invoke("record", "-o", tmp_path / "kvm.log", "--tool", "perf")
    assert result.exit_code == 3
    assert error(result) == ("Error: perf record failed (exit status 2): something else went "
                             "wrong\n")


def test_an_unknown_pid_is_one_line_exit_3(tmp_path, fake):
    result = invoke("record", "-o", tmp_path / "kvm.log", "--pid", 2**22 + 12345)
    assert result.exit_code == 3
    assert result.output == f"Error: --pid {2**22 + 12345}: no such process\n"


@pytest.mark.parametrize("duration", ["0", "-1", "soon"])
def test_a_bad_duration_is_a_usage_error(tmp_path, fake, duration):
    assert invoke("record", "-o", tmp_path / "kvm.log", "--duration", duration).exit_code == 2


def test_ctrl_c_ends_the_recording_writes_the_log_and_exits_0(tmp_path, fake):
    """The fake recorder sends SIGINT to upmtrace (as a terminal's Ctrl-C does) and waits for
    upmtrace to pass it on before it writes its data."""
    out = tmp_path / "kvm.log"
    env = os.environ | fake.env | {"FAKE_MODE": "ctrl-c"}
    done = subprocess.run([sys.executable, "-m", "upmtrace", "record", "-o", str(out)], env=env,
                          capture_output=True, text=True, timeout=120,
                          preexec_fn=default_sigint)
    assert done.returncode == 0, done.stderr
    assert "recording stopped by Ctrl-C" in done.stderr
    assert out.read_text(encoding="utf-8") == CANNED
    assert [c[1] for c in calls(fake)] == ["record", "report"]


def test_the_recorded_log_imports_with_latencies(tmp_path, fake):
    out = tmp_path / "kvm.log"
    assert invoke("record", "-o", out, "--duration", "1").exit_code == 0
    result = invoke("import", out, "-o", tmp_path / "t.parquet")
    assert result.exit_code == 0, result.output
    assert "latencies (kvm_exit to the vCPU's next kvm_entry): 1 on events" in result.output



def test_ctrl_c_while_converting_aborts_with_130_and_writes_nothing(tmp_path, fake):
    out = tmp_path / "kvm.log"
    env = os.environ | fake.env | {"FAKE_MODE": "ctrl-c-convert"}
    done = subprocess.run([sys.executable, "-m", "upmtrace", "record", "-o", str(out),
                           "--duration", "1"], env=env, capture_output=True, text=True,
                          timeout=120, preexec_fn=default_sigint)
    assert done.returncode == 130, done.stderr
    assert "Traceback" not in done.stderr
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_an_unwritable_log_is_refused_before_recording(tmp_path, fake):
    """The output is checked as every command's is, before the recording, not after it."""
    out = tmp_path / "nowhere" / "kvm.log"
    result = invoke("record", "-o", out, "--duration", "1")
    assert result.exit_code == 3
    assert error(result) == f"Error: {out}: cannot write (No such file or directory)\n"
    assert calls(fake) == []  # the recorder never ran
