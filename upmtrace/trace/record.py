"""Record a running VM's KVM tracepoints with trace-cmd or perf into the text log `import` reads.

A recording is two commands: the tool's `record` into a binary file in a temporary folder beside
the output, then its text conversion (`trace-cmd report -t`, `perf script --ns`) streamed into
the output, written atomically. Ctrl-C during the recording ends the recording (the tool stops
and keeps what it recorded) and the log is still written: that is how a recording without
--duration is meant to stop, as with `perf record` and `trace-cmd record` themselves, so the
command then exits 0. Ctrl-C while the log is being converted, or SIGTERM at any time, aborts:
nothing is written and the exit status is 130 or 143.

The tracefs folder is /sys/kernel/tracing (else /sys/kernel/debug/tracing), or the one named by
the UPMTRACE_TRACEFS environment variable.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

from upmtrace.atomic import write_atomic
from upmtrace.errors import UpmtraceError

Tool = Literal["trace-cmd", "perf"]
TRACEFS_ENV = "UPMTRACE_TRACEFS"
TRACEFS_PLACES = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")

# Every kernel tracepoint the importer reads, and what it contributes.
EVENTS: dict[str, str] = {
    "kvm_exit": "every VM exit and its reason; with kvm_entry, each exit's latency",
    "kvm_entry": "the re-entry that ends an exit (latency = entry - exit, per vCPU thread)",
    "kvm_page_fault": "nested page faults: an npf event (GPA, private or shared, write)",
    "kvm_userspace_exit": "exits to the VMM (memory fault, hypercall) and the time spent there",
    "kvm_hypercall": "KVM_HC_MAP_GPA_RANGE hypercalls: a map_gpa event",
    "kvm_vmgexit_enter": "SNP: the GHCB exit code of a vmgexit (page state change, hypercall)",
    "kvm_vmgexit_msr_protocol_enter": "SNP: MSR-protocol page state changes: a psc event",
    "kvm_vm_set_mem_attributes": "attribute changes: the VMM's initial marking, then counts",
}
REQUIRED = ("kvm_exit", "kvm_entry")

# QEMU trace events (`-trace NAME`, log backend) that add what no kernel tracepoint carries.
QEMU_EVENTS: dict[str, str] = {
    "kvm_set_user_memory": "memslots (GPA range, guest_memfd or not)",
    "kvm_memory_fault": "memory-fault exits (implicit conversions)",
    "kvm_hc_map_gpa_range": "page-state changes and MapGPA as QEMU receives them",
    "kvm_convert_memory": "each conversion QEMU makes",
    "kvm_sev_snp_launch_update": "SNP launch: pages populated before the guest runs",
    "kvm_tdx_init_mem_region": "TDX launch: pages populated before the guest runs",
}

PERMISSION_WORDS = ("permission denied", "operation not permitted", "perf_event_paranoid",
                    "eacces", "eperm")


class RecordError(UpmtraceError):
    """A recording that cannot start or failed (missing tool, tracefs, privileges): exit 3."""


@dataclass(frozen=True)
class Request:
    out: str
    tool: Tool = "trace-cmd"
    pid: int | None = None
    duration: float | None = None


@dataclass(frozen=True)
class Plan:
    """The exact commands of a recording; RAW stands for the binary file's path."""

    record: tuple[str, ...]
    convert: tuple[str, ...]
    events: tuple[str, ...]  # the tracepoints enabled
    absent: tuple[str, ...]  # importer tracepoints this kernel does not have
    tracefs: str | None


RAW = "RAW"


def find_tracefs() -> str | None:
    """The tracefs folder (UPMTRACE_TRACEFS, else the usual mount points), if it exists."""
    chosen = os.environ.get(TRACEFS_ENV)
    for place in (chosen,) if chosen else TRACEFS_PLACES:
        if os.path.isdir(os.path.join(place, "events")):
            return place
    return None


def available(tracefs: str | None) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(tracepoints to enable, importer tracepoints the kernel lacks); all when unknown."""
    if tracefs is None or not os.path.isdir(os.path.join(tracefs, "events", "kvm")):
        return tuple(EVENTS), ()
    have = set(os.listdir(os.path.join(tracefs, "events", "kvm")))
    return (tuple(e for e in EVENTS if e in have), tuple(e for e in EVENTS if e not in have))


def threads(pid: int) -> list[int]:
    """Every thread of a process (trace-cmd filters events by thread id)."""
    try:
        return sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))
    except OSError:
        raise RecordError(f"--pid {pid}: no such process") from None


def plan(request: Request) -> Plan:
    tracefs = find_tracefs()
    events, absent = available(tracefs)
    wait = ("sleep", f"{request.duration:g}") if request.duration else ()
    if request.tool == "trace-cmd":
        enable = [arg for event in events for arg in ("-e", f"kvm:{event}")]
        who = [arg for tid in threads(request.pid) for arg in ("-P", str(tid))] \
            if request.pid is not None else []
        record = ("trace-cmd", "record", "-o", RAW, *enable, *who, *wait)
        convert = ("trace-cmd", "report", "-i", RAW, "-t")
    else:
        enable = [arg for event in events for arg in ("-e", f"kvm:{event}")]
        who = ["-p", str(request.pid)] if request.pid is not None else ["-a"]
        if request.pid is not None:
            threads(request.pid)  # the process must exist
        record = ("perf", "record", "-o", RAW, *enable, *who, *(("--", *wait) if wait else ()))
        convert = ("perf", "script", "-i", RAW, "--ns", "-F", "comm,tid,cpu,time,event,trace")
    return Plan(record, convert, events, absent, tracefs)


def recipe(request: Request, the_plan: Plan) -> str:
    """What --dry-run prints: the commands, the import, and the QEMU -trace options."""
    raw = "trace.dat" if request.tool == "trace-cmd" else "perf.data"

    def show(cmd: tuple[str, ...]) -> str:
        return shlex.join(raw if arg == RAW else arg for arg in cmd)

    out = request.out if request.out != "-" else "LOG"
    lines = [f"# record ({'until Ctrl-C' if not request.duration else f'{request.duration:g} s'}"
             f"; as root)", show(the_plan.record), "# convert to the text log `import` reads",
             f"{show(the_plan.convert)} > {shlex.quote(out)}"]
    if the_plan.absent:
        lines.append(f"# not in this kernel, left out: {', '.join(the_plan.absent)}")
    if the_plan.tracefs is None:
        lines.append("# (no tracefs found here: every tracepoint listed; set UPMTRACE_TRACEFS)")
    lines += ["# import and replay", f"upmtrace import {shlex.quote(out)} -o trace.parquet "
              "--platform snp   # or tdx",
              "upmtrace replay trace.parquet",
              "# QEMU: memslots, conversions and launch population (log backend)",
              "qemu-system-x86_64 ... " + " ".join(f"-trace {e}" for e in QEMU_EVENTS)
              + " -msg timestamp=on -D qemu-trace.log",
              "upmtrace import qemu-trace.log -o qemu.parquet"]
    return "\n".join(lines) + "\n"


def check(request: Request, the_plan: Plan) -> None:
    """A missing tool, tracefs, kvm tracepoints or privileges is a RecordError."""
    if shutil.which(request.tool) is None:
        other = "perf" if request.tool == "trace-cmd" else "trace-cmd"
        raise RecordError(f"{request.tool} not found on PATH (install it, or use --tool {other})")
    if the_plan.tracefs is None:
        where = os.environ.get(TRACEFS_ENV) or " or ".join(TRACEFS_PLACES)
        raise RecordError(f"no tracefs at {where} (mount -t tracefs nodev /sys/kernel/tracing)")
    missing = [e for e in REQUIRED if e not in the_plan.events]
    kvm = os.path.join(the_plan.tracefs, "events", "kvm")
    if missing or not os.path.isdir(kvm):
        raise RecordError(f"{kvm}: no kvm tracepoints {', '.join(missing or REQUIRED)} (is the "
                          "kvm module loaded?)")
    mode = os.W_OK if request.tool == "trace-cmd" else os.R_OK
    probe = os.path.join(kvm, "kvm_exit", "enable" if mode == os.W_OK else "id")
    if os.path.exists(probe) and not permitted(probe, mode):
        raise RecordError(denied(request.tool, the_plan.tracefs))


def permitted(path: str, mode: int) -> bool:
    """Whether this process may use a tracefs file that way (root always may)."""
    return os.access(path, mode)


def denied(tool: str, tracefs: str) -> str:
    return (f"{tool}: permission denied on {tracefs}: recording kernel tracepoints needs root "
            "(perf: CAP_PERFMON and kernel.perf_event_paranoid <= -1 also do)")


@dataclass(frozen=True)
class Outcome:
    out: str
    interrupted: bool  # stopped by Ctrl-C (the log was still written)
    bytes: int


def record(request: Request, notify=lambda text: None) -> Outcome:
    """Run the recording and write the log; RecordError when a tool fails."""
    the_plan = plan(request)
    check(request, the_plan)
    folder = Path(request.out).resolve().parent if request.out != "-" else None
    work = tempfile.mkdtemp(prefix=".upmtrace-record-", dir=folder)
    try:
        raw = os.path.join(work, "trace.dat" if request.tool == "trace-cmd" else "perf.data")
        errors = os.path.join(work, "stderr")
        cmd = [raw if arg == RAW else arg for arg in the_plan.record]
        span = f"for {request.duration:g} s" if request.duration else "until Ctrl-C"
        notify(f"recording {len(the_plan.events)} kvm tracepoints with {request.tool} {span}")
        interrupted = _run_recording(cmd, errors, request.tool, the_plan.tracefs)
        if not os.path.exists(raw) or os.path.getsize(raw) == 0:
            raise RecordError(f"{request.tool} record wrote no data{_last_line(errors)}")
        convert = [raw if arg == RAW else arg for arg in the_plan.convert]
        size = _convert(convert, request.out, errors, request.tool)
        return Outcome(request.out, interrupted, size)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run_recording(cmd: list[str], errors: str, tool: str, tracefs: str) -> bool:
    """Run the record command; True when Ctrl-C ended it (the tool keeps what it had)."""
    interrupted = False
    with open(errors, "wb") as err:
        proc = subprocess.Popen(cmd, stdout=sys.stderr.fileno() if _has_fd() else
                                subprocess.DEVNULL, stderr=err)
        try:
            try:
                status = proc.wait()
            except KeyboardInterrupt:
                interrupted = True
                if proc.poll() is None:
                    proc.send_signal(signal.SIGINT)
                status = proc.wait()
        finally:
            if proc.poll() is None:  # SIGTERM or a second Ctrl-C: let the tool clean up
                proc.send_signal(signal.SIGINT)
                proc.wait()
    if status != 0 and not interrupted:
        _fail(f"{tool} record", status, errors, tool, tracefs)
    return interrupted


def _convert(cmd: list[str], out: str, errors: str, tool: str) -> int:
    """Stream the conversion's output into `out` (atomically; `-` is standard output)."""
    written = 0

    def copy(f: BinaryIO) -> None:
        nonlocal written
        with open(errors, "wb") as err:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err)
            try:
                while chunk := proc.stdout.read(1 << 20):
                    f.write(chunk)
                    written += len(chunk)
                status = proc.wait()
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        if status != 0:
            _fail(" ".join(cmd[:2]), status, errors, tool, None)

    if out == "-":
        copy(sys.stdout.buffer)
        sys.stdout.flush()
    else:
        write_atomic(out, copy)
    return written


def _fail(what: str, status: int, errors: str, tool: str, tracefs: str | None) -> None:
    last = _last_line(errors)
    if any(word in last.lower() for word in PERMISSION_WORDS):
        raise RecordError(denied(tool, tracefs or "tracefs") + last)
    raise RecordError(f"{what} failed (exit status {status}){last}")


def _last_line(path: str) -> str:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return ""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return f": {lines[-1]}" if lines else ""


def _has_fd() -> bool:
    try:
        sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        return False
    return True
