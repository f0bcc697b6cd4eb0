"""Nothing lost: every output is written to a temporary file in its own folder and
renamed over the target, so an interrupted run leaves the old file whole and no temporary file.

The check that every output path goes through upmtrace.atomic: os.fsync, which write_atomic
calls on the temporary file just before the rename, is made to fail; an output written any
other way would be overwritten anyway, and the old bytes would be gone.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from scenario import K, M, attrs, host, memslot, npf, psc, table
from test_hostile_input import snapshot

import upmtrace.trace.io as trace_io
from upmtrace.atomic import write_atomic, write_text
from upmtrace.cli import cli
from upmtrace.trace.io import write_trace

ROWS = (memslot(0, 0, 4 * M), attrs(0, 4 * M), npf(0, True), psc(0, 8 * K, "shared"),
        npf(0, False), host(0, 8 * K))
LOG = (" CPU 0/KVM-1234 [001] ..... 100.314706: kvm_page_fault: vcpu 0 rip 0xffffffff81000000 "
       "address 0x0000000000100000 error_code 0x400000006\n")
OLD = b"the old bytes, which must survive\n"

# (id, command line, the output it writes): every output option of every command
OUTPUTS = [
    *[(f"synth-{s}", ["synth", "snp-boot", "--memory", "256M", "-o", f"out.{s}"], f"out.{s}")
      for s in ("parquet", "arrow", "jsonl", "csv")],
    ("import-parquet", ["import", "log.txt", "-o", "out.parquet"], "out.parquet"),
    ("import-jsonl", ["import", "log.txt", "-o", "out.jsonl"], "out.jsonl"),
    ("replay-output", ["replay", "t.parquet", "--format", "json", "--output", "out.json"],
     "out.json"),
    ("replay-timeline-parquet", ["replay", "t.parquet", "--timeline", "tl.parquet"],
     "tl.parquet"),
    ("replay-timeline-csv", ["replay", "t.parquet", "--timeline", "tl.csv"], "tl.csv"),
    ("compare-output", ["compare", "t.parquet", "--policy", "eager", "--policy", "lazy",
                        "--format", "csv", "--output", "out.csv"], "out.csv"),
    ("check-update", ["check", "t.parquet", "--baseline", "base.json", "--update"],
     "base.json"),
    ("check-junit", ["check", "t.parquet", "--baseline", "base.json", "--junit", "j.xml"],
     "j.xml"),
    ("plot", ["plot", "t.parquet", "--policy", "eager", "--timeline-rows", "4", "-o",
              "p.svg"], "p.svg"),
    ("fleet-output", ["fleet", "t.parquet", "--policy", "eager", "--workers", "1", "-o",
                      "res.parquet"], "res.parquet"),
    ("fleet-check-update", ["fleet", "check", "t.parquet", "--baseline", "fleet.json",
                            "--update", "--workers", "1"], "fleet.json"),
    ("fleet-check-junit", ["fleet", "check", "t.parquet", "--baseline", "fleet.json",
                           "--workers", "1", "--junit", "j.xml"], "j.xml"),
    ("fleet-check-output", ["fleet", "check", "t.parquet", "--baseline", "fleet.json",
                            "--workers", "1", "-o", "res.parquet"], "res.parquet"),
]


@pytest.fixture
def work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", "100")
    write_trace(table(*ROWS), "t.parquet")
    Path("log.txt").write_text(LOG)
    for args in (["check", "t.parquet", "--baseline", "base.json", "--update"],
                 ["fleet", "check", "t.parquet", "--baseline", "fleet.json", "--update",
                  "--workers", "1"]):
        assert CliRunner().invoke(cli, args).exit_code == 0
    return tmp_path


def temp_of(fd: int) -> Path:
    return Path(os.readlink(f"/proc/self/fd/{fd}"))


@pytest.mark.parametrize(("args", "output"), [o[1:] for o in OUTPUTS], ids=[o[0] for o in OUTPUTS])
def test_an_interrupt_before_the_rename_keeps_the_old_file(work, monkeypatch, args, output):
    target = work / output
    if target.name not in ("base.json", "fleet.json"):
        target.write_bytes(OLD)
    before = snapshot(work)
    seen: list[Path] = []

    def interrupted(fd: int) -> None:
        seen.append(temp_of(fd))
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", interrupted)
    result = CliRunner().invoke(cli, args)
    assert seen, f"{output} was not written through upmtrace.atomic"
    assert seen[0].parent == work and re.fullmatch(rf"\.{re.escape(output)}\.[0-9a-f]{{8}}\.tmp",
                                                   seen[0].name), seen[0]
    assert result.exit_code == 130 and result.stderr == "Interrupted\n"  # Ctrl-C: never 1
    assert "Traceback" not in result.output
    assert snapshot(work) == before
    assert not list(work.glob(".*.tmp"))


@pytest.mark.parametrize(("args", "output"), [o[1:] for o in OUTPUTS if o[0] in (
    "synth-parquet", "import-parquet", "replay-output", "check-junit", "fleet-output")])
def test_a_failed_write_is_one_error_and_keeps_the_old_file(work, monkeypatch, args, output):
    (work / output).write_bytes(OLD)
    before = snapshot(work)

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 3, result.output
    assert result.stderr == f"Error: {output}: cannot write (No space left on device)\n"
    assert snapshot(work) == before


def test_an_interrupt_in_the_middle_of_writing_a_trace(tmp_path, monkeypatch):
    path = tmp_path / "t.parquet"
    path.write_bytes(OLD)

    def half(table, f, metadata):
        f.write(b"PAR1 half a file")
        raise KeyboardInterrupt

    monkeypatch.setitem(trace_io.WRITERS, "parquet", half)
    with pytest.raises(KeyboardInterrupt):
        write_trace(table(*ROWS), path)
    assert path.read_bytes() == OLD
    assert [p.name for p in tmp_path.iterdir()] == ["t.parquet"]


def test_an_interrupt_in_the_middle_of_write_atomic(tmp_path):
    path = tmp_path / "r.json"
    path.write_bytes(OLD)

    def half(f) -> None:
        f.write(b'{"schema": ')
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomic(path, half)
    assert path.read_bytes() == OLD
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]
    write_text(path, "new\n")  # and a write that completes replaces it whole
    assert path.read_bytes() == b"new\n" and [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_a_temporary_name_taken_by_someone_else_is_not_removed(tmp_path, monkeypatch):
    """O_EXCL failed: the file at that name is another writer's, not ours to unlink."""
    import upmtrace.atomic as atomic

    theirs = tmp_path / ".r.json.00000000.tmp"
    theirs.write_bytes(b"another process's output")
    monkeypatch.setattr(atomic.secrets, "token_hex", lambda n: "00000000")
    with pytest.raises(atomic.UpmtraceError, match="cannot write"):
        write_text(tmp_path / "r.json", "x")
    assert theirs.read_bytes() == b"another process's output"


SIGTERM_MID_WRITE = """
import os, signal, sys
import upmtrace.trace.io as io

def dying(table, f, metadata):
    f.write(b"half a trace")
    os.kill(os.getpid(), signal.SIGTERM)  # a CI timeout, or kill
    f.write(b"never")

io.WRITERS["parquet"] = dying
sys.argv = ["upmtrace", "synth", "snp-boot", "--memory", "256M", "-o", "out.parquet"]
from upmtrace.cli import main
main()
"""


def test_sigterm_during_a_write_keeps_the_old_file(tmp_path):
    (tmp_path / "out.parquet").write_bytes(OLD)
    done = subprocess.run([sys.executable, "-c", SIGTERM_MID_WRITE], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 128 + signal.SIGTERM, done.stderr
    assert "Traceback" not in done.stderr
    assert (tmp_path / "out.parquet").read_bytes() == OLD
    assert [p.name for p in tmp_path.iterdir()] == ["out.parquet"]
