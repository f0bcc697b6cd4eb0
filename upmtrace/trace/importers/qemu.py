"""QEMU `-trace` logs (log backend), with no prefix, `tid@secs.usecs:` or an ISO-8601 time,
after any leading blanks.

kvm_set_user_memory -> memslot (plus the set_attributes private row QEMU issues for every
guest_memfd slot it creates); kvm_memory_fault -> npf; kvm_hc_map_gpa_range -> psc on SNP (one
request per line: KVM issues one exit per run of a GHCB request) or map_gpa on TDX and sw. Every
kvm_memory_fault and kvm_hc_map_gpa_range line is also a recorded userspace exit, every
kvm_convert_memory line a recorded KVM_SET_MEMORY_ATTRIBUTES call.

Launch-time population: kvm_sev_snp_launch_update (`src` or, in older AMD trees, `addr`) ->
set_attributes private + populate (QEMU's sev_snp_launch_update sets the range private itself
before each KVM_SEV_SNP_LAUNCH_UPDATE, which requires it); kvm_tdx_init_mem_region -> populate
(QEMU relies on the slot having been marked private at creation). Every page type (Normal, Zero,
Secrets, Cpuid, ...) goes through kvm_gmem_populate alike.
"""

from __future__ import annotations

import calendar
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
    memslot_row,
    not_imported,
    ns_of,
    populate_row,
)
from upmtrace.trace.schema import BLOCK_SIZE, GPA_LIMIT, PAGE_SHIFT, PAGE_SIZE, Platform

LINE = re.compile(
    r"\s*(?:(?P<y>\d{4})-(?P<mo>\d\d)-(?P<d>\d\d)T(?P<h>\d\d):(?P<mi>\d\d):(?P<s>\d\d)"
    r"(?:\.(?P<isofrac>\d+))?(?P<tz>Z|[+-]\d\d:?\d\d)?\s+)?"
    r"(?:(?P<tid>\d+)@(?P<secs>\d+)\.(?P<frac>\d+):\s*)?"
    r"(?P<event>[a-z][a-z0-9]*_[a-z0-9_]*)\s+(?P<payload>.*)")

SET_USER_MEMORY = re.compile(
    r"(?:AddrSpace#(\d+) )?Slot#(\d+) flags=0x([0-9a-f]+) gpa=0x([0-9a-f]+) "
    r"size=0x([0-9a-f]+) ua=0x[0-9a-f]+(?: guest_memfd=(-?\d+) guest_memfd_offset=0x[0-9a-f]+)?"
    r" ret=(-?\d+)")
MEMORY_FAULT = re.compile(r"start 0x([0-9a-f]+) size 0x([0-9a-f]+) flags 0x([0-9a-f]+)")
MAP_GPA_RANGE = re.compile(r"gpa 0x([0-9a-f]+) size 0x([0-9a-f]+) attributes 0x([0-9a-f]+)")
CONVERT = re.compile(r"start 0x[0-9a-f]+ size 0x[0-9a-f]+")
SNP_LAUNCH_UPDATE = re.compile(
    r"(?:src|addr) (?:0x[0-9a-f]+|\(nil\)) gpa 0x([0-9a-f]+) len 0x([0-9a-f]+)")
TDX_INIT_MEM_REGION = re.compile(
    r"type=0x[0-9a-f]+ attributes=0x[0-9a-f]+ source=(?:0x[0-9a-f]+|\(nil\)) "
    r"gfn=0x([0-9a-f]+) nr_pages=0x([0-9a-f]+)")

KVM_MEM_GUEST_MEMFD = 1 << 2
KVM_MEMORY_EXIT_FLAG_PRIVATE = 1 << 3
MAP_GPA_ENCRYPTED = 1 << 4
MAP_GPA_PAGE_SIZE_MASK = 0xF
MAP_GPA_PAGE_SZ_2M = 1
PSC_MAX_COUNT = 253  # VMGEXIT_PSC_MAX_COUNT: the most entries KVM accepts in one PSC request
HANDLED = ("kvm_set_user_memory", "kvm_memory_fault", "kvm_hc_map_gpa_range",
           "kvm_convert_memory", "kvm_sev_snp_launch_update", "kvm_tdx_init_mem_region")


def looks_like(text: str) -> bool:
    m = LINE.match(text)
    return m is not None and m["event"] in HANDLED


def iso_ns(m: re.Match) -> int:
    """The ISO-8601 prefix as exact ns since the epoch (UTC unless an offset is given)."""
    seconds = calendar.timegm((int(m["y"]), int(m["mo"]), int(m["d"]), int(m["h"]),
                               int(m["mi"]), int(m["s"]), 0, 0, 0))
    tz = m["tz"]
    if tz and tz != "Z":
        offset = int(tz[1:3]) * 3600 + int(tz[-2:]) * 60
        seconds -= offset if tz[0] == "+" else -offset
    return ns_of(str(seconds), m["isofrac"] or "")


def psc_entries(gpa: int, size: int, huge: bool) -> list[tuple[int, int]]:
    """The entries of one KVM exit (one run of a GHCB request) as psc rows' (gpa, size). A 2 MiB
    run longer than one request can hold came from no GHCB: it is kept whole (a 4 KiB-class
    entry), so that one line never becomes an unbounded number of rows."""
    if huge and gpa % BLOCK_SIZE == 0 and size % BLOCK_SIZE == 0 \
            and size // BLOCK_SIZE <= PSC_MAX_COUNT:
        return [(start, BLOCK_SIZE) for start in range(gpa, gpa + size, BLOCK_SIZE)]
    if size == BLOCK_SIZE and gpa % BLOCK_SIZE:
        # a coalesced 4 KiB run of exactly 2 MiB, unaligned: split so that no entry looks
        # like a (misaligned, hence invalid) 2 MiB entry; still one contiguous run
        return [(gpa, PAGE_SIZE), (gpa + PAGE_SIZE, size - PAGE_SIZE)]
    return [(gpa, size)]


class QemuParser:
    """Parser for QEMU trace logs (see the module docstring)."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.sink = ctx.sink
        self.recorded = ctx.tally.recorded
        self.platform = ctx.options.platform
        self.initial_private = ctx.options.initial_private
        self.live: dict[int, tuple[int, int, bool]] = {}  # slot -> (gpa, size, gmem)
        self.req = 0
        self.pending: list | None = None  # TDX MapGPA being rebuilt from its 2 MiB chunks
        self.handlers: dict[str, Callable[[int, str], str | None]] = {
            "kvm_set_user_memory": self.set_user_memory,
            "kvm_memory_fault": self.memory_fault,
            "kvm_hc_map_gpa_range": self.map_gpa_range,
            "kvm_convert_memory": self.convert_memory,
            "kvm_sev_snp_launch_update": self.snp_launch_update,
            "kvm_tdx_init_mem_region": self.tdx_init_mem_region,
        }

    def line(self, text: str) -> str | None:
        m = LINE.match(text)
        if m is None:
            return COMMENT if not text.strip() or text.lstrip().startswith("#") else UNRECOGNISED
        handler = self.handlers.get(m["event"])
        if handler is None:
            return not_imported(m["event"])
        clock = self.ctx.clock
        if m["secs"] is not None:
            ts = clock.at(ns_of(m["secs"], m["frac"]))
        elif m["y"] is not None:
            ts = clock.at(iso_ns(m))
        else:
            ts = clock.last  # no time: keep file order
        return handler(ts, m["payload"])

    def end_file(self) -> None:
        self.flush()

    def emit(self, row: Row) -> None:
        self.flush()
        self.sink.add(row)

    def flush(self) -> None:
        if self.pending is not None:
            ts, gpa, size, private = self.pending
            self.pending = None
            self.sink.add((ts, "map_gpa", 0, gpa, size, private, None, None, None, None, None))

    # --- events -----------------------------------------------------------------------------

    def set_user_memory(self, ts: int, payload: str) -> str | None:
        p = SET_USER_MEMORY.search(payload)
        if p is None:
            return malformed("kvm_set_user_memory")
        space, slot, flags = int(p[1] or 0), int(p[2]), int(p[3], 16)
        gpa, size, ret = int(p[4], 16), int(p[5], 16), int(p[7])
        gmem = int(p[6]) >= 0 if p[6] is not None else bool(flags & KVM_MEM_GUEST_MEMFD)
        if ret < 0:
            return "kvm_set_user_memory that failed (ret < 0)"
        if space != 0:
            return "kvm_set_user_memory in address space 1 (SMM)"
        if gpa % PAGE_SIZE or size % PAGE_SIZE or gpa + size > GPA_LIMIT or slot > INT32_MAX:
            return malformed("kvm_set_user_memory")
        if size == 0:
            self.live.pop(slot, None)
            self.emit(memslot_row(ts, slot, gpa, 0, False))
            return None
        if self.live.get(slot) == (gpa, size, gmem):
            return "kvm_set_user_memory changing only flags (no model change)"
        if any(gpa < g + s and g < gpa + size for i, (g, s, _) in self.live.items() if i != slot):
            return "kvm_set_user_memory overlapping a live memslot"
        self.live[slot] = (gpa, size, gmem)
        self.emit(memslot_row(ts, slot, gpa, size, gmem))
        if gmem and self.initial_private:  # QEMU marks a new guest_memfd slot private
            self.recorded["conversions.set_attributes_calls"] += 1
            self.emit(attributes_row(ts, gpa, size, True))
        return None

    def memory_fault(self, ts: int, payload: str) -> str | None:
        p = MEMORY_FAULT.match(payload)
        if p is None:
            return malformed("kvm_memory_fault")
        gpa, flags = int(p[1], 16), int(p[3], 16)
        self.recorded["exits.userspace.KVM_EXIT_MEMORY_FAULT"] += 1
        if gpa >= GPA_LIMIT:
            return "kvm_memory_fault address beyond 52 bits"
        private = bool(flags & KVM_MEMORY_EXIT_FLAG_PRIVATE)
        self.emit((ts, "npf", 0, gpa, None, private, None, None, None, None, None))
        return None

    def map_gpa_range(self, ts: int, payload: str) -> str | None:
        p = MAP_GPA_RANGE.match(payload)
        if p is None:
            return malformed("kvm_hc_map_gpa_range")
        gpa, size, attributes = int(p[1], 16), int(p[2], 16), int(p[3], 16)
        self.recorded["exits.userspace.KVM_EXIT_HYPERCALL"] += 1
        if gpa % PAGE_SIZE or size % PAGE_SIZE or size == 0 or gpa + size > GPA_LIMIT:
            return "kvm_hc_map_gpa_range with a misaligned or empty range"
        private = bool(attributes & MAP_GPA_ENCRYPTED)
        if self.platform is Platform.SNP:
            self.req += 1
            op = "private" if private else "shared"
            huge = attributes & MAP_GPA_PAGE_SIZE_MASK == MAP_GPA_PAGE_SZ_2M
            for start, length in psc_entries(gpa, size, huge):
                self.emit((ts, "psc", 0, start, length, None, None, None, None, self.req, op))
        elif self.platform is Platform.TDX:
            self.tdx_chunk(ts, gpa, size, private)
        else:
            self.emit((ts, "map_gpa", 0, gpa, size, private, None, None, None, None, None))
        return None

    def tdx_chunk(self, ts: int, gpa: int, size: int, private: bool) -> None:
        """KVM cuts a TDX MapGPA into 2 MiB chunks from its start, one exit each: a line that
        continues a pending MapGPA made only of whole chunks is its next chunk."""
        pending = self.pending
        if (pending is not None and pending[2] % BLOCK_SIZE == 0 and size <= BLOCK_SIZE
                and gpa == pending[1] + pending[2] and private == pending[3]):
            pending[2] += size
            return
        self.flush()
        self.pending = [ts, gpa, size, private]

    def convert_memory(self, ts: int, payload: str) -> str | None:
        if CONVERT.match(payload) is None:
            return malformed("kvm_convert_memory")
        self.recorded["conversions.set_attributes_calls"] += 1
        return None

    def snp_launch_update(self, ts: int, payload: str) -> str | None:
        p = SNP_LAUNCH_UPDATE.match(payload)
        if p is None:
            return malformed("kvm_sev_snp_launch_update")
        gpa, size = int(p[1], 16), int(p[2], 16)
        if problem := self.launch_range("kvm_sev_snp_launch_update", gpa, size):
            return problem
        self.recorded["conversions.set_attributes_calls"] += 1
        self.emit(attributes_row(ts, gpa, size, True))
        self.emit(populate_row(ts, gpa, size))
        return None

    def tdx_init_mem_region(self, ts: int, payload: str) -> str | None:
        p = TDX_INIT_MEM_REGION.match(payload)
        if p is None:
            return malformed("kvm_tdx_init_mem_region")
        gfn, pages = int(p[1], 16), int(p[2], 16)
        if gfn >= GPA_LIMIT >> PAGE_SHIFT or pages >= GPA_LIMIT >> PAGE_SHIFT:
            return malformed("kvm_tdx_init_mem_region")
        gpa, size = gfn << PAGE_SHIFT, pages << PAGE_SHIFT
        if problem := self.launch_range("kvm_tdx_init_mem_region", gpa, size):
            return problem
        self.emit(populate_row(ts, gpa, size))
        return None

    @staticmethod
    def launch_range(event: str, gpa: int, size: int) -> str | None:
        """Why a launch-time range cannot be a populate row (KVM refuses such a call)."""
        if gpa % PAGE_SIZE or size % PAGE_SIZE or gpa + size > GPA_LIMIT:
            return malformed(event)
        if size == 0:
            return f"{event} of no page"
        return None
