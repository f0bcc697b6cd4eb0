"""The synthetic workloads: each composes the building blocks of events.py into a Script."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from upmtrace.trace.schema import PAGE_SHIFT, PscOp
from upmtrace.trace.synth.events import (
    GHCB_MAX_ENTRIES,
    Ctx,
    accept,
    buffer_cycles,
    firmware_runs,
    flash_reads,
    ghcb_psc,
    map_gpa,
    memslots,
    percpu_shared,
    rings,
    set_private,
    swiotlb_io,
    touches,
)
from upmtrace.trace.synth.launch import launch, launch_gfns
from upmtrace.trace.synth.layout import Layout, MiB
from upmtrace.trace.synth.rows import Phase, Script, merge

CHUNK_PAGES = 4 * MiB >> PAGE_SHIFT  # lazy acceptance unit on SNP Linux guests


def io_count(layout: Layout) -> int:
    """Runtime SWIOTLB transfers: one per MiB of guest memory."""
    return layout.memory // MiB


def boot_ram(layout: Layout, *, keep_shared: bool = False) -> np.ndarray:
    """Sorted gfns of the RAM accepted at boot, without the pages the launch populated
    (already accepted) and, unless `keep_shared`, without the pages made shared before it."""
    gfns = layout.ram_gfns(0, layout.boot_pages)
    if layout.launch is not None:
        gfns = gfns[~np.isin(gfns, launch_gfns(layout.launch))]
    if keep_shared:
        return gfns
    keep = np.ones(len(gfns), dtype=bool)
    for first, pages in ((layout.percpu, 2 * layout.vcpus + 1),
                         (layout.swiotlb, layout.swiotlb_pages)):
        keep &= (gfns < first) | (gfns >= first + pages)
    return gfns[keep]


def vmm_setup(ctx: Ctx) -> Script:
    """QEMU creates the slots and marks the guest_memfd ones private; with a launch it then
    populates the firmware (and on SNP the kernel), and the firmware starts: on SNP it faults
    its first pages and the kernel's in (populating maps nothing), on TDX nothing faults."""
    lay = ctx.layout
    script = Script().add(memslots(lay), set_private(lay))
    if lay.launch is None:
        return script.add(flash_reads(lay))
    script.add(launch(lay.launch))
    if lay.launch == "snp":
        low = launch_gfns(lay.launch)
        low = low[low < lay.low_pages]
        script.add(firmware_runs(lay), touches(low, 0, private=True, write=ctx.writes(len(low))))
    return script


def snp_setup(ctx: Ctx) -> Script:
    """The VMM's setup (vmm_setup); the guest shares its per-vCPU pages (MSR protocol), then
    SWIOTLB (GHCB requests), then accepts the boot RAM: PSC to private in requests of 64
    entries, each followed by a private fault per page."""
    lay = ctx.layout
    script = vmm_setup(ctx)
    script.add(*percpu_shared(ctx, "psc"), ghcb_psc(ctx, lay.swiotlb_gfns(), PscOp.SHARED))
    script.add(accept(ctx, boot_ram(lay), max_entries=GHCB_MAX_ENTRIES, psc=True))
    return script.add(*rings(ctx, "psc"))


def interleaved(ctx: Ctx, base: Phase, other: Phase | None = None, n_io: int = 0) -> Phase:
    """`base` groups in order with `other` (if any) and `n_io` SWIOTLB transfers spread
    among them at seeded points."""
    span = max(base.groups, 1)
    phases = [base]
    if other is not None:
        other.keys = np.sort(ctx.rng.uniform(0, span, other.groups))
        phases.append(other)
    if n_io:
        phases.append(swiotlb_io(ctx, n_io, np.sort(ctx.rng.uniform(0, span, n_io))))
    return merge(*phases)


def snp_boot(ctx: Ctx) -> Script:
    return snp_setup(ctx).add(swiotlb_io(ctx, io_count(ctx.layout)))


def lazy_accept(ctx: Ctx) -> Script:
    """Boot as snp_boot over the boot-accepted part, then the working set grows to a seeded
    50-90 % of memory, accepting 4 MiB chunks in address order (the order Linux keeps
    unaccepted memory in), with SWIOTLB traffic in between."""
    lay = ctx.layout
    script = snp_setup(ctx)
    target = int(ctx.rng.uniform(0.5, 0.9) * lay.ram_pages)
    end = min(lay.ram_pages, max(target, lay.boot_pages))
    end = lay.boot_pages + -(-(end - lay.boot_pages) // CHUNK_PAGES) * CHUNK_PAGES
    grow = lay.ram_gfns(lay.boot_pages, min(end, lay.ram_pages))
    chunks = accept(ctx, grow, max_entries=2, psc=True, at_boot=False)
    return script.add(interleaved(ctx, chunks, n_io=io_count(lay)))


def dma_churn(ctx: Ctx) -> Script:
    """A short boot (boot-accepted part only), then a driver that maps and unmaps DMA buffers
    by converting them: one buffer per 256 KiB of memory."""
    n = ctx.layout.memory // (256 << 10)
    return snp_setup(ctx).add(buffer_cycles(ctx, n, "psc"))


def tdx_boot(ctx: Ctx) -> Script:
    """After the launch, TDVF accepts all other RAM (one EPT violation per page); the kernel
    shares its per-vCPU pages and kvmclock with 4 KiB MapGPAs and SWIOTLB with one MapGPA; at
    runtime SWIOTLB traffic and now and then a coherent DMA buffer shared and taken back with
    MapGPA."""
    lay = ctx.layout
    script = vmm_setup(ctx)
    script.add(accept(ctx, boot_ram(lay, keep_shared=True), max_entries=GHCB_MAX_ENTRIES,
                      psc=False))
    script.add(*percpu_shared(ctx, "map_gpa"))
    script.add(map_gpa(lay.swiotlb, lay.swiotlb_pages, 0, private=False, n=1))
    script.add(*rings(ctx, "map_gpa"))
    n_io = io_count(lay)
    io = swiotlb_io(ctx, n_io)
    return script.add(interleaved(ctx, io, buffer_cycles(ctx, max(1, n_io // 32), "map_gpa")))


def implicit(ctx: Ctx) -> Script:
    """A guest that never sends a PSC: it accepts its boot RAM by touching it, and flips pages
    by touching them with the other C-bit (per-vCPU pages, rings, SWIOTLB on first use, DMA
    buffers shared and back), with host accesses, some after the page went private again."""
    lay = ctx.layout
    script = vmm_setup(ctx)
    script.add(accept(ctx, boot_ram(lay), max_entries=GHCB_MAX_ENTRIES, psc=False))
    script.add(*percpu_shared(ctx, "implicit"), *rings(ctx, "implicit"))
    flips = buffer_cycles(ctx, lay.memory // (512 << 10), "implicit")
    return script.add(interleaved(ctx, flips, n_io=io_count(lay)))


BUILDERS: dict[str, Callable[[Ctx], Script]] = {
    "snp-boot": snp_boot,
    "lazy-accept": lazy_accept,
    "dma-churn": dma_churn,
    "tdx-boot": tdx_boot,
    "implicit": implicit,
}
