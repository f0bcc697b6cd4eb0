"""KVM tracepoints in ftrace text, `trace-cmd report` and `perf script` output.

Guest demands become rows: kvm_page_fault -> npf, an MSR-protocol PSC request -> psc (req -1),
kvm_hypercall KVM_HC_MAP_GPA_RANGE -> map_gpa, kvm_vm_set_mem_attributes before any vCPU ran ->
set_attributes (the VMM marking memory on its own). Responses are recorded counts only: exits
(kvm_exit, kvm_userspace_exit), attribute changes made once vCPUs run, GHCB PSC requests (whose
entries live in guest memory, not in any tracepoint).
"""

from __future__ import annotations

import re
from collections.abc import Callable

from upmtrace.trace.importers.common import (
    COMMENT,
    INT32_MAX,
    UNRECOGNISED,
    Context,
    Row,
    attributes_row,
    malformed,
    not_imported,
    ns_of,
)
from upmtrace.trace.importers.pairing import Pairing
from upmtrace.trace.schema import GPA_LIMIT, MSR_REQ, PAGE_SHIFT, PAGE_SIZE, Platform

# comm-tid [cpu] flags secs.usecs: event: payload       (ftrace; trace-cmd may omit the flags)
# comm tid [cpu] secs.usecs: kvm:event: payload          (perf script; pid/tid and a period too)
# Thread names may hold spaces, slashes and dashes: the tid is the last number before [cpu].
PREFIX = re.compile(
    r"\s*(?P<comm>.*?)[-\s](?P<tid>\d+)(?:/(?P<thread>\d+))?\s+(?:\(\s*[-\d]+\)\s+)?\[(?P<cpu>\d+)\]"
    r"(?:\s+\S+)??\s+(?P<secs>\d+)\.(?P<frac>\d+):\s+(?:\d+\s+)?(?:\w+:)?(?P<event>\w+):"
    r"\s*(?P<payload>.*)")
HEADER = re.compile(r"\s*(?:#|version = |cpus=|CPU \d+ is empty|trace-cmd: )")
VCPU_THREAD = re.compile(r"CPU (\d+)/KVM")

PAGE_FAULT = re.compile(r"(?:vcpu (\d+) rip 0x[0-9a-f]+ )?address (?:0x)?([0-9a-f]+) "
                        r"error_code (?:0x)?([0-9a-f]+)")
EXIT = re.compile(r"(?:vcpu (\d+) )?reason (\S+)")
ENTRY = re.compile(r"vcpu (\d+)")
USERSPACE_EXIT = re.compile(r"reason (\S+) \((-?\d+)\)")
HYPERCALL = re.compile(r"nr 0x([0-9a-f]+) a0 0x([0-9a-f]+) a1 0x([0-9a-f]+) a2 0x([0-9a-f]+)")
MSR_PROTOCOL = re.compile(r"vcpu (\d+), ghcb_gpa (?:0x)?([0-9a-f]+)")
VMGEXIT = re.compile(r"vcpu (\d+), exit_reason (?:0x)?([0-9a-f]+)")
ATTRIBUTES = re.compile(r"(?:0x)?([0-9a-f]+) -- (?:0x)?([0-9a-f]+) \[(?:0x)?([0-9a-f]+)\]")

PFERR_WRITE = 1 << 1
PFERR_GUEST_ENC = 1 << 34  # SNP: the C-bit of the access
PFERR_PRIVATE_ACCESS = 1 << 49  # ORed in by KVM before the tracepoint fires
KVM_HC_MAP_GPA_RANGE = 12
MAP_GPA_ENCRYPTED = 1 << 4
ATTRIBUTE_PRIVATE = 1 << 3
GHCB_MSR_PSC_REQ = 0x014
GHCB_MSR_INFO_MASK = 0xFFF
GFN_MASK = (1 << 40) - 1
MSR_PSC_OPS = {1: "private", 2: "shared", 3: "psmash", 4: "unsmash"}
SVM_EXIT_PSC = 0x80000010
EFAULT = 14

# kvm_exit reasons (SVM lower case, VMX upper case) -> report exits.vm keys
# (SVM prints VMMCALL as `hypercall`, INTR as `interrupt`: SVM_EXIT_REASONS)
VM_EXITS = {"npf": "npf", "ept_violation": "npf", "vmgexit": "vmgexit", "hypercall": "vmcall",
            "vmmcall": "vmcall", "vmcall": "vmcall", "tdcall": "tdvmcall"}
MODELLED_USERSPACE = ("KVM_EXIT_HYPERCALL", "KVM_EXIT_MEMORY_FAULT")
USERSPACE_BY_NUMBER = {3: "KVM_EXIT_HYPERCALL", 39: "KVM_EXIT_MEMORY_FAULT", 40: "KVM_EXIT_TDX"}
# events that run in a vCPU's context: the first one ends the VMM's set-up phase
VCPU_EVENTS = frozenset({
    "kvm_entry", "kvm_exit", "kvm_page_fault", "kvm_hypercall", "kvm_userspace_exit",
    "kvm_vmgexit_enter", "kvm_vmgexit_exit", "kvm_vmgexit_msr_protocol_enter",
    "kvm_vmgexit_msr_protocol_exit", "kvm_mmio", "kvm_pio", "kvm_msr", "kvm_cpuid",
})


def looks_like(text: str) -> bool:
    return PREFIX.match(text) is not None


class KernelParser:
    """Parser for kernel tracepoint text (see the module docstring)."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.sink = ctx.sink
        self.recorded = ctx.tally.recorded
        self.platform = ctx.options.platform
        self.shared = 1 << ctx.options.shared_bit
        self.vcpu_started = False
        self.thread_vcpu: dict[str, int] = {}
        self.markers: dict[str, int] = {"snp": 0, "tdx": 0}
        self.ghcb_psc = 0
        self.tid = ""  # the thread of the line being handled
        self.pairing = Pairing(ctx.sink, ctx.tally.recorded)
        self.handlers: dict[str, Callable[[int, re.Match], str | None]] = {
            "kvm_page_fault": self.page_fault,
            "kvm_exit": self.exit,
            "kvm_entry": self.entry,
            "kvm_userspace_exit": self.userspace_exit,
            "kvm_hypercall": self.hypercall,
            "kvm_vmgexit_msr_protocol_enter": self.msr_protocol,
            "kvm_vmgexit_enter": self.vmgexit,
            "kvm_vm_set_mem_attributes": self.set_mem_attributes,
        }

    def line(self, text: str) -> str | None:
        m = PREFIX.match(text)
        if m is None:
            return COMMENT if not text.strip() or HEADER.match(text) else UNRECOGNISED
        event = m["event"]
        handler = self.handlers.get(event)
        if handler is None:
            if event in VCPU_EVENTS:
                self.vcpu_started = True
            return not_imported(event)
        if event != "kvm_vm_set_mem_attributes":
            self.vcpu_started = True
        self.tid = m["thread"] or m["tid"]
        return handler(self.ctx.clock.at(ns_of(m["secs"], m["frac"])), m)

    def end_file(self) -> None:
        """Each file is one recording: exits still open at its end are unmatched."""
        self.pairing.end()
        self.ctx.tally.trees["latency"] = self.pairing.tree()

    def emit(self, row: Row) -> None:
        """Write a row; the exit its vCPU thread is in, if any, gives it its latency."""
        claimed = self.pairing.claims(self.tid)
        stored = self.sink.add(row, wait=claimed)
        if claimed:
            self.pairing.row(self.tid, stored)

    def vcpu_of(self, m: re.Match, field: str | None) -> int | None:
        """The vCPU from the payload, else from a `CPU n/KVM` thread name, else 0; None if it
        is not a plausible index."""
        if field is not None:
            vcpu = int(field)
        else:
            comm = m["comm"]
            vcpu = self.thread_vcpu.get(comm)
            if vcpu is None:
                found = VCPU_THREAD.search(comm)
                vcpu = self.thread_vcpu[comm] = int(found[1]) if found else 0
        return vcpu if vcpu <= INT32_MAX else None

    # --- guest demands ----------------------------------------------------------------------

    def page_fault(self, ts: int, m: re.Match) -> str | None:
        p = PAGE_FAULT.match(m["payload"])
        if p is None:
            return malformed("kvm_page_fault")
        gpa, error = int(p[2], 16), int(p[3], 16)
        if self.platform is Platform.TDX:
            private = not gpa & self.shared
            gpa &= ~self.shared
        else:
            private = bool(error & (PFERR_PRIVATE_ACCESS | PFERR_GUEST_ENC))
        vcpu = self.vcpu_of(m, p[1])
        if gpa >= GPA_LIMIT or vcpu is None:
            return malformed("kvm_page_fault")
        self.emit((ts, "npf", vcpu, gpa, None, private,
                   bool(error & PFERR_WRITE), None, None, None, None))
        return None

    def msr_protocol(self, ts: int, m: re.Match) -> str | None:
        p = MSR_PROTOCOL.match(m["payload"])
        if p is None:
            return malformed("kvm_vmgexit_msr_protocol_enter")
        self.markers["snp"] += 1
        value = int(p[2], 16)
        if value & GHCB_MSR_INFO_MASK != GHCB_MSR_PSC_REQ:
            return "MSR-protocol request other than PSC"
        op = MSR_PSC_OPS.get((value >> 52) & 0xF)
        if op is None:
            return "MSR-protocol PSC with an unknown operation"
        vcpu = self.vcpu_of(m, p[1])
        if vcpu is None:
            return malformed("kvm_vmgexit_msr_protocol_enter")
        self.recorded["psc.requests"] += 1
        gpa = ((value >> PAGE_SHIFT) & GFN_MASK) << PAGE_SHIFT
        self.emit((ts, "psc", vcpu, gpa, PAGE_SIZE, None, None, None, None, MSR_REQ, op))
        return None

    def hypercall(self, ts: int, m: re.Match) -> str | None:
        p = HYPERCALL.match(m["payload"])
        if p is None:
            return malformed("kvm_hypercall")
        if int(p[1], 16) != KVM_HC_MAP_GPA_RANGE:
            return "hypercall other than KVM_HC_MAP_GPA_RANGE"
        gpa, pages, attributes = int(p[2], 16), int(p[3], 16), int(p[4], 16)
        if self.platform is Platform.TDX:
            gpa &= ~self.shared
        size = pages << PAGE_SHIFT
        if gpa % PAGE_SIZE or pages == 0 or gpa + size > GPA_LIMIT:
            return "KVM_HC_MAP_GPA_RANGE that KVM refuses (misaligned, empty or too large)"
        vcpu = self.pairing.vcpu(self.tid)
        if vcpu is None:
            vcpu = self.vcpu_of(m, None)
        if vcpu is None:
            return malformed("kvm_hypercall")
        self.emit((ts, "map_gpa", vcpu, gpa, size,
                   bool(attributes & MAP_GPA_ENCRYPTED), None, None, None, None, None))
        return None

    def set_mem_attributes(self, ts: int, m: re.Match) -> str | None:
        p = ATTRIBUTES.match(m["payload"])
        if p is None:
            return malformed("kvm_vm_set_mem_attributes")
        start, end, attributes = int(p[1], 16), int(p[2], 16), int(p[3], 16)
        if end <= start or end << PAGE_SHIFT > GPA_LIMIT:
            return malformed("kvm_vm_set_mem_attributes")
        self.recorded["conversions.set_attributes_calls"] += 1
        if self.vcpu_started:  # a response to an exit: the model computes it
            return None
        self.ctx.initial_marks += 1
        self.emit(attributes_row(ts, start << PAGE_SHIFT, (end - start) << PAGE_SHIFT,
                                 bool(attributes & ATTRIBUTE_PRIVATE)))
        return None

    # --- responses: recorded counts ---------------------------------------------------------

    def exit(self, ts: int, m: re.Match) -> str | None:
        p = EXIT.match(m["payload"])
        if p is None:
            return malformed("kvm_exit")
        reason = p[2]
        key = VM_EXITS.get(reason.lower())
        if key == "vmgexit":
            self.markers["snp"] += 1
        elif key == "tdvmcall":
            self.markers["tdx"] += 1
        group, name = ("vm", key) if key else ("vm_other", reason)
        self.recorded[f"exits.{group}.{name}"] += 1
        vcpu = self.vcpu_of(m, p[1])
        if vcpu is not None:
            self.pairing.exit(self.tid, ts, vcpu, (group, name))
        return None

    def entry(self, ts: int, m: re.Match) -> str | None:
        p = ENTRY.match(m["payload"])
        vcpu = self.vcpu_of(m, p[1] if p else None)
        if vcpu is None:
            return malformed("kvm_entry")
        self.pairing.entry(self.tid, ts, vcpu)
        return None

    def userspace_exit(self, ts: int, m: re.Match) -> str | None:
        p = USERSPACE_EXIT.match(m["payload"])
        if p is None:
            return malformed("kvm_userspace_exit")
        name, number = p[1], int(p[2])
        if name == "error":  # KVM_RUN failed; -EFAULT comes with KVM_EXIT_MEMORY_FAULT
            name = "KVM_EXIT_MEMORY_FAULT" if number == EFAULT else f"error_{number}"
        elif name != "restart":
            name = USERSPACE_BY_NUMBER.get(number, name)
        group = "userspace" if name in MODELLED_USERSPACE else "userspace_other"
        self.recorded[f"exits.{group}.{name}"] += 1
        vcpu = self.vcpu_of(m, None)
        if vcpu is not None:
            self.pairing.userspace(self.tid, ts, vcpu, (group, name))
        return None

    def vmgexit(self, ts: int, m: re.Match) -> str | None:
        p = VMGEXIT.match(m["payload"])
        if p is None:
            return malformed("kvm_vmgexit_enter")
        self.markers["snp"] += 1
        if int(p[2], 16) != SVM_EXIT_PSC:
            return "VMGEXIT other than Page State Change"
        self.recorded["psc.requests"] += 1
        self.ghcb_psc += 1
        return None

    def notes(self) -> list[str]:
        notes = []
        lost = self.pairing.released
        if lost:
            notes.append(f"{lost:,} exits kept no latency: their event was written before their "
                         "kvm_entry came (another vCPU produced too many events meanwhile)")
        if self.ghcb_psc:
            notes.append(f"GHCB Page State Change requests (VMGEXIT 0x80000010): {self.ghcb_psc:,} "
                         "counted as recorded, not imported: their entries "
                         "are in guest memory, not in any tracepoint (a QEMU -trace log with "
                         "kvm_hc_map_gpa_range has them)")
        return notes

    def looks_like(self) -> Platform | None:
        """The platform the log's own events point to, if any."""
        snp, tdx = self.markers["snp"], self.markers["tdx"]
        if snp or tdx:
            return Platform.SNP if snp >= tdx else Platform.TDX
        return None

