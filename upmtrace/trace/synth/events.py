"""Building blocks of synthetic workloads: the events a guest, its firmware and QEMU produce.

Each function returns `Rows` (one step) or a `Phase` (many groups, e.g. one per request or per
DMA transfer), vectorised over pages. Times are rough and constant per step (ns before the row)
so files compress well; runtime groups add a seeded exponential think time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from upmtrace.trace.schema import MSR_REQ, PAGE_SIZE, PAGES_PER_BLOCK, Kind, PscOp
from upmtrace.trace.synth.layout import DEVICES, RING_PAGES, Layout
from upmtrace.trace.synth.rows import Phase, Rows, iter_runs, rows, spread

GHCB_MAX_ENTRIES = 64  # VMGEXIT_PSC_MAX_ENTRY: what a Linux guest puts in one request
WRITE_SHARE = 0.9  # share of boot touches that are writes (the rest are reads/PVALIDATE)

VMM_NS = 100_000  # a memslot or attribute ioctl from QEMU
MSR_NS = 4_000  # an MSR-protocol VMGEXIT round trip
PSC_FIRST_NS = 6_000  # a GHCB request: first entry carries the exit
PSC_NEXT_NS = 200
MAP_GPA_NS = 8_000
TOUCH_NS = 1_500  # one #NPF / EPT violation resolved in the kernel
HOST_NS = 2_000
IO_THINK_NS = 20_000  # mean think time before a runtime group

Convert = Literal["psc", "map_gpa", "implicit"]


@dataclass
class Ctx:
    """What every generator needs: the layout, the one seeded RNG, request serials."""

    layout: Layout
    rng: np.random.Generator
    serial: int = 0

    @property
    def vcpus(self) -> int:
        return self.layout.vcpus

    def serials(self, n: int) -> np.ndarray:
        """Unique request serials; `Script.table` renumbers them per vCPU in replay order."""
        out = np.arange(self.serial, self.serial + n, dtype=np.int64)
        self.serial += n
        return out

    def think(self, n: int) -> np.ndarray:
        return self.rng.exponential(IO_THINK_NS, n).astype(np.int64)

    def writes(self, n: int) -> np.ndarray:
        return self.rng.random(n) < WRITE_SHARE


# --- VMM setup ---------------------------------------------------------------------------


def memslots(layout: Layout) -> Rows:
    slots = layout.slots()
    return rows(Kind.MEMSLOT, np.array([s.gpa >> 12 for s in slots]), gap=VMM_NS,
                slot=np.array([s.slot for s in slots], dtype=np.int32),
                size=np.array([s.size for s in slots], dtype=np.uint64),
                gmem=np.array([s.gmem for s in slots]))


def set_private(layout: Layout) -> Rows:
    """QEMU marks every guest_memfd slot private when it creates it."""
    slots = [s for s in layout.slots() if s.gmem]
    return rows(Kind.SET_ATTRIBUTES, np.array([s.gpa >> 12 for s in slots]), gap=VMM_NS,
                size=np.array([s.size for s in slots], dtype=np.uint64), private=True)


def flash_reads(layout: Layout, pages: int = 8) -> Rows:
    """Firmware reading its flash (a slot without guest_memfd): shared faults."""
    flash = layout.firmware()
    return touches((flash.gpa >> 12) + np.arange(pages), 0, private=False, write=False)


def firmware_runs(layout: Layout, pages: int = 8) -> Rows:
    """SNP: OVMF runs from its launch-updated image, top pages first (the reset vector sits
    just below 4 GiB): private faults, as populating maps nothing on SNP."""
    firmware = layout.firmware()
    end = (firmware.gpa + firmware.size) >> 12
    return touches(end - 1 - np.arange(pages), 0, private=True, write=False)


# --- primitive guest events -----------------------------------------------------------------


def touches(gfns: np.ndarray, vcpu: np.ndarray | int, *, private: bool,
            write: np.ndarray | bool) -> Rows:
    return rows(Kind.NPF, gfns, vcpu=vcpu, private=private, write=write, gap=TOUCH_NS)


def host(gfns: np.ndarray | int, pages: np.ndarray | int, agent: str,
         write: np.ndarray | bool, n: int | None = None) -> Rows:
    return rows(Kind.HOST_ACCESS, gfns, n, size=_bytes(pages), agent=agent, write=write,
                gap=HOST_NS)


def msr_psc(gfns: np.ndarray, op: PscOp, vcpu: int = 0) -> Rows:
    """MSR-protocol PSC requests, one 4 KiB page each (before per-CPU GHCBs exist)."""
    return rows(Kind.PSC, gfns, vcpu=vcpu, req=MSR_REQ, size=PAGE_SIZE, op=op, gap=MSR_NS)


def map_gpa(gfns: np.ndarray | int, pages: np.ndarray | int, vcpu: np.ndarray | int,
            private: bool, n: int | None = None) -> Rows:
    return rows(Kind.MAP_GPA, gfns, n, vcpu=vcpu, size=_bytes(pages), private=private,
                gap=MAP_GPA_NS)


def _bytes(pages: np.ndarray | int) -> np.ndarray | int:
    if isinstance(pages, np.ndarray):
        return pages.astype(np.uint64) * np.uint64(PAGE_SIZE)
    return int(pages) * PAGE_SIZE


# --- GHCB Page State Change requests -------------------------------------------------------


def entries(first: int, pages: int) -> tuple[np.ndarray, np.ndarray]:
    """GHCB entries for one range, as Linux builds them: 2 MiB where the gfn is 512-aligned
    and a whole block remains, else 4 KiB. Returns (gfn, pages) per entry."""
    head = min(pages, -first % PAGES_PER_BLOCK)
    blocks = (pages - head) // PAGES_PER_BLOCK
    tail = pages - head - blocks * PAGES_PER_BLOCK
    mid = first + head
    gfn = np.concatenate([first + np.arange(head), mid + PAGES_PER_BLOCK * np.arange(blocks),
                          mid + blocks * PAGES_PER_BLOCK + np.arange(tail)])
    size = np.concatenate([np.ones(head, np.int64), np.full(blocks, PAGES_PER_BLOCK),
                           np.ones(tail, np.int64)])
    return gfn.astype(np.int64), size.astype(np.int64)


def plan(gfns: np.ndarray, max_entries: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(entry gfn, entry pages, entries per request) covering sorted `gfns`; a request never
    spans two runs of contiguous pages."""
    gfn, size, per_request = [], [], []
    for first, pages in iter_runs(gfns):
        g, s = entries(first, pages)
        gfn.append(g)
        size.append(s)
        full, rest = divmod(len(g), max_entries)
        per_request.append(np.r_[np.full(full, max_entries), [rest] * (rest > 0)])
    if not gfn:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
    return (np.concatenate(gfn), np.concatenate(size),
            np.concatenate(per_request).astype(np.int64))


def psc_rows(ctx: Ctx, gfn: np.ndarray, pages: np.ndarray, per_request: np.ndarray,
             vcpu_of_request: np.ndarray, op: PscOp) -> Rows:
    """The entries of consecutive GHCB requests (one serial per request)."""
    first = np.zeros(len(gfn), dtype=bool)
    first[np.cumsum(per_request) - per_request] = True
    return rows(Kind.PSC, gfn, vcpu=np.repeat(vcpu_of_request, per_request).astype(np.int32),
                req=np.repeat(ctx.serials(len(per_request)), per_request), size=_bytes(pages),
                op=op, gap=np.where(first, PSC_FIRST_NS, PSC_NEXT_NS))


def ghcb_psc(ctx: Ctx, gfns: np.ndarray, op: PscOp, vcpu: int = 0) -> Rows:
    """Make sorted `gfns` `op` with GHCB requests of at most 64 entries."""
    gfn, pages, per_request = plan(gfns, GHCB_MAX_ENTRIES)
    return psc_rows(ctx, gfn, pages, per_request, np.full(len(per_request), vcpu), op)


def boot_vcpus(ctx: Ctx, n: int) -> np.ndarray:
    """Boot work unit owners: the first half on vCPU 0, the rest spread as the APs come up."""
    owner = ctx.rng.integers(0, ctx.vcpus, n)
    owner[: (n + 1) // 2] = 0
    return owner.astype(np.int32)


def accept(ctx: Ctx, gfns: np.ndarray, *, max_entries: int, psc: bool,
           at_boot: bool = True) -> Phase:
    """Accept sorted `gfns`: per request of `max_entries` GHCB entries, a PSC to private (if
    `psc`) and then one private fault per 4 KiB page as PVALIDATE / TDG.MEM.PAGE.ACCEPT and the
    first writes touch it. One group per request, owned as at boot or by any vCPU."""
    gfn, pages, per_request = plan(gfns, max_entries)
    n = len(per_request)
    if at_boot:
        owners = boot_vcpus(ctx, n)
    else:
        owners = ctx.rng.integers(0, ctx.vcpus, n).astype(np.int32)
    phase = Phase(np.arange(n, dtype=np.float64))
    if psc:
        phase.add(psc_rows(ctx, gfn, pages, per_request, owners, PscOp.PRIVATE), per_request)
    entry_end = np.cumsum(per_request)
    page_end = np.cumsum(pages)[entry_end - 1] if n else np.zeros(0, np.int64)
    touched = np.diff(np.r_[0, page_end])
    pages_gfn = spread(gfn, pages)
    phase.add(touches(pages_gfn, np.repeat(owners, touched), private=True,
                      write=ctx.writes(len(pages_gfn))), touched)
    return phase


# --- per-vCPU shared pages and virtio rings -------------------------------------------------


def percpu_shared(ctx: Ctx, convert: Convert) -> list[Rows]:
    """The guest shares its per-vCPU pages (GHCB on SNP, steal time) and the kvmclock page,
    then each vCPU touches its own pages shared as it comes up."""
    lay = ctx.layout
    own = np.arange(ctx.vcpus, dtype=np.int32)
    if convert == "map_gpa":  # TDX: no GHCB
        pages = np.r_[lay.steal_time(), lay.hv_clock]
        out = [map_gpa(pages, 1, 0, private=False)]
        first = touches(lay.steal_time(), own, private=False, write=True)
        return [*out, first, touches(np.array([lay.hv_clock]), 0, private=False, write=False)]
    out = [] if convert == "implicit" else [msr_psc(lay.percpu_pages(), PscOp.SHARED)]
    gfn = np.stack([lay.ghcb(), lay.steal_time()], axis=1).ravel()
    out.append(touches(gfn, np.repeat(own, 2), private=False, write=True))
    out.append(touches(np.array([lay.hv_clock]), 0, private=False, write=False))
    out.append(host(lay.ghcb(), 1, "ghcb", True))
    return out


def rings(ctx: Ctx, convert: Convert) -> list[Rows]:
    """Virtio drivers allocate their rings with dma_alloc_coherent (decrypted) at probe."""
    out: list[Rows] = []
    for device in range(DEVICES):
        ring = ctx.layout.ring(device)
        if convert == "psc":
            out.append(ghcb_psc(ctx, ring, PscOp.SHARED))
        elif convert == "map_gpa":
            out.append(map_gpa(int(ring[0]), RING_PAGES, 0, private=False))
        out.append(touches(ring, 0, private=False, write=True))
    return out


# --- runtime: DMA through SWIOTLB ------------------------------------------------------------


def buffer_pages(ctx: Ctx, n: int) -> np.ndarray:
    """Seeded DMA transfer sizes, 4 KiB .. 256 KiB, small ones most common."""
    weights = np.array([4, 3, 3, 2, 2, 1, 1], dtype=np.float64)
    return 1 << ctx.rng.choice(len(weights), n, p=weights / weights.sum())


def swiotlb_io(ctx: Ctx, n: int, keys: np.ndarray | None = None) -> Phase:
    """`n` virtio transfers bounced through SWIOTLB, in order. Per transfer: out (to the
    device): the guest writes the bounce buffer, the host reads it; in: the host writes, the
    guest reads. The guest faults only on its first touch of a SWIOTLB page; the host then
    updates the ring; now and then KVM writes the vCPU's steal time."""
    lay, rng = ctx.layout, ctx.rng
    vcpu = rng.integers(0, ctx.vcpus, n).astype(np.int32)
    inbound = rng.random(n) < 0.5
    device = rng.integers(0, DEVICES, n)
    pages = buffer_pages(ctx, n)
    start = _swiotlb_slots(lay, vcpu, pages)
    gfn = spread(start, pages)
    owner = np.repeat(np.arange(n), pages)
    first = np.zeros(len(gfn), dtype=bool)
    first[np.unique(gfn, return_index=True)[1]] = True
    steal = rng.random(n) < 1 / 8
    phase = Phase(np.arange(n, dtype=np.float64) if keys is None else keys, ctx.think(n))
    for want_in in (False, True):
        pick = first & (inbound[owner] == want_in)
        lengths = np.bincount(owner[pick], minlength=n)
        if want_in:
            phase.add(host(start, pages, "virtio", inbound), np.ones(n, np.int64))
        phase.add(touches(gfn[pick], vcpu[owner[pick]], private=False, write=not want_in),
                  lengths)
    phase.add(host(lay.rings + device * RING_PAGES, RING_PAGES, "virtio", True),
              np.ones(n, np.int64))
    phase.add(host(lay.steal_time()[vcpu[steal]], 1, "kvmclock", True), steal.astype(np.int64))
    return phase


def _swiotlb_slots(lay: Layout, vcpu: np.ndarray, pages: np.ndarray) -> np.ndarray:
    """Bounce-buffer placement: one SWIOTLB area per vCPU (power of two, at least 64 pages
    each), a cursor per area that wraps around."""
    areas = 1 << int(np.ceil(np.log2(lay.vcpus)))
    areas = max(1, min(areas, lay.swiotlb_pages // 64))
    area_pages = lay.swiotlb_pages // areas
    area = vcpu % areas
    start = np.empty(len(vcpu), dtype=np.int64)
    for a in np.unique(area):
        at = np.flatnonzero(area == a)
        offset = (np.cumsum(pages[at]) - pages[at]) % area_pages
        start[at] = lay.swiotlb + a * area_pages + np.minimum(offset, area_pages - pages[at])
    return start


# --- runtime: DMA buffers converted per mapping -----------------------------------------------


def buffer_places(ctx: Ctx, n: int, reuse: float = 0.7) -> tuple[np.ndarray, np.ndarray]:
    """(first gfn, pages) of `n` DMA buffers in the DMA zone: size-aligned like page-allocator
    blocks; each buffer, with probability `reuse`, takes the place and size of an earlier one."""
    rng = ctx.rng
    zone_start, zone_end = ctx.layout.dma_zone
    pages = buffer_pages(ctx, n)
    start = zone_start + rng.integers(0, (zone_end - zone_start) // pages) * pages
    root = np.arange(n)
    again = rng.random(n) < reuse
    again[0] = False
    root[again] = (rng.random(n)[again] * np.flatnonzero(again)).astype(np.int64)
    while not np.array_equal(root, root[root]):
        root = root[root]
    return start[root], pages[root]


def buffer_cycles(ctx: Ctx, n: int, convert: Convert, keys: np.ndarray | None = None) -> Phase:
    """`n` buffers, each converted to shared, used for one DMA transfer, converted back and
    touched private again; `convert` says how the guest converts (implicit: by touching)."""
    rng = ctx.rng
    start, pages = buffer_places(ctx, n)
    vcpu = rng.integers(0, ctx.vcpus, n).astype(np.int32)
    inbound = (rng.random(n) < 0.5) if convert != "implicit" else np.zeros(n, dtype=bool)
    gfn = spread(start, pages)
    page_vcpu = np.repeat(vcpu, pages)
    one = np.ones(n, np.int64)
    phase = Phase(np.arange(n, dtype=np.float64) if keys is None else keys, ctx.think(n))
    _convert(ctx, phase, convert, start, pages, vcpu, PscOp.SHARED)
    for want_in in (False, True):
        if want_in:
            phase.add(host(start, pages, "virtio", inbound), one)
        pick = np.repeat(inbound == want_in, pages)
        phase.add(touches(gfn[pick], page_vcpu[pick], private=False, write=not want_in),
                  np.where(inbound == want_in, pages, 0))
    _convert(ctx, phase, convert, start, pages, vcpu, PscOp.PRIVATE)
    phase.add(touches(gfn, page_vcpu, private=True, write=True), pages)
    if convert == "implicit":  # a late device write to a page the guest took back
        late = rng.random(n) < 0.1
        phase.add(host(start[late], pages[late], "virtio", True), late.astype(np.int64))
    return phase


def _convert(ctx: Ctx, phase: Phase, convert: Convert, start: np.ndarray, pages: np.ndarray,
             vcpu: np.ndarray, op: PscOp) -> None:
    if convert == "psc":  # 4 KiB entries (buffers are never 2 MiB), one request per buffer
        assert int(pages.max(initial=0)) <= GHCB_MAX_ENTRIES
        phase.add(psc_rows(ctx, spread(start, pages), np.ones(int(pages.sum()), np.int64),
                           pages, vcpu, op), pages)
    elif convert == "map_gpa":
        phase.add(map_gpa(start, pages, vcpu, private=op == PscOp.PRIVATE),
                  np.ones(len(start), np.int64))
