"""Where a synthetic guest's memory lies: QEMU-style memslots and the guest's shared regions.

Everything is in 4 KiB guest frames (gfn). "RAM index" numbers the RAM pages in address order:
the low slot's pages first, then the high slot's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from upmtrace.errors import UsageError
from upmtrace.trace.schema import BLOCK_SIZE, PAGE_SHIFT, PAGE_SIZE, PAGES_PER_BLOCK

MiB = 1 << 20
GiB = 1 << 30

LOW_RAM_MAX = 2 * GiB  # QEMU splits RAM below 4 GiB at 2 GiB (or 3 GiB) on q35
HIGH_RAM_BASE = 4 * GiB
FIRMWARE_GPA = 4 * GiB - 4 * MiB  # pc.bios, mapped just below 4 GiB (never RAM: see launch.py)
FIRMWARE_SIZE = 4 * MiB  # an OVMF / TDVF image
MIN_MEMORY = 256 * MiB
MAX_MEMORY = 256 * GiB
MAX_VCPUS = 512
DMA_ZONE_START = 16 * MiB >> PAGE_SHIFT  # keep the first 16 MiB (firmware, kernel image) out
RING_PAGES = 4  # one virtqueue: descriptor table, avail and used rings
DEVICES = 2  # virtio-net and virtio-blk

SWIOTLB_MIN = 64 * MiB
SWIOTLB_MAX = 1 * GiB


def swiotlb_bytes(memory: int) -> int:
    """Linux SEV/TDX guests size SWIOTLB at 6 % of memory, clamped to 64 MiB .. 1 GiB; rounded
    up to whole 2 MiB blocks here."""
    size = min(max(memory * 6 // 100, SWIOTLB_MIN), SWIOTLB_MAX)
    return -(-size // BLOCK_SIZE) * BLOCK_SIZE


def boot_accepted_bytes(memory: int) -> int:
    """With lazy acceptance the firmware accepts max(256 MiB, memory/16), in 4 MiB units."""
    unit = 4 * MiB
    return min(memory, -(-max(256 * MiB, memory // 16) // unit) * unit)


@dataclass(frozen=True)
class Slot:
    slot: int
    gpa: int
    size: int
    gmem: bool


@dataclass(frozen=True)
class Layout:
    memory: int
    vcpus: int
    boot_pages: int  # RAM index below which memory is accepted (touched private) at boot
    swiotlb: int  # first gfn of SWIOTLB
    swiotlb_pages: int
    percpu: int  # first gfn of the per-vCPU shared pages
    rings: int  # first gfn of the virtio rings (DEVICES * RING_PAGES pages)
    dma_zone: tuple[int, int]  # [first, end) gfns where drivers place DMA buffers
    launch: str | None = None  # "snp" / "tdx": a confidential launch (launch.py): the
    # firmware is guest_memfd-backed and populated before the guest runs; None: a flash slot
    # without guest_memfd, no launch

    @property
    def low_pages(self) -> int:
        return min(self.memory, LOW_RAM_MAX) >> PAGE_SHIFT

    @property
    def ram_pages(self) -> int:
        return self.memory >> PAGE_SHIFT

    def slots(self) -> list[Slot]:
        out = [Slot(0, 0, self.low_pages << PAGE_SHIFT, True)]
        if self.memory > LOW_RAM_MAX:
            out.append(Slot(1, HIGH_RAM_BASE, self.memory - LOW_RAM_MAX, True))
        out.append(Slot(2, FIRMWARE_GPA, FIRMWARE_SIZE, self.launch is not None))
        return out

    def firmware(self) -> Slot:
        return self.slots()[-1]

    def ghcb(self) -> np.ndarray:
        """One GHCB page per vCPU."""
        return self.percpu + np.arange(self.vcpus, dtype=np.int64)

    def steal_time(self) -> np.ndarray:
        """One steal-time page per vCPU (Linux's per-CPU decrypted section)."""
        return self.percpu + self.vcpus + np.arange(self.vcpus, dtype=np.int64)

    @property
    def hv_clock(self) -> int:
        """The kvmclock page (Linux's __bss_decrypted hv_clock_boot)."""
        return self.percpu + 2 * self.vcpus

    def percpu_pages(self) -> np.ndarray:
        return self.percpu + np.arange(2 * self.vcpus + 1, dtype=np.int64)

    def ring(self, device: int) -> np.ndarray:
        return self.rings + device * RING_PAGES + np.arange(RING_PAGES, dtype=np.int64)

    def swiotlb_gfns(self) -> np.ndarray:
        return self.swiotlb + np.arange(self.swiotlb_pages, dtype=np.int64)

    def boot_shared(self) -> np.ndarray:
        """Pages the guest makes shared before it touches the rest: per-vCPU pages, SWIOTLB."""
        return np.concatenate([self.percpu_pages(), self.swiotlb_gfns()])

    def ram_gfns(self, first: int = 0, end: int | None = None) -> np.ndarray:
        """gfns of RAM index range [first, end)."""
        index = np.arange(first, self.ram_pages if end is None else end, dtype=np.int64)
        high = index >= self.low_pages
        index[high] += (HIGH_RAM_BASE >> PAGE_SHIFT) - self.low_pages
        return index


def validate(memory: int, vcpus: int) -> None:
    if memory % BLOCK_SIZE or not MIN_MEMORY <= memory <= MAX_MEMORY:
        raise UsageError(
            f"--memory must be a multiple of 2 MiB between 256M and 256G, not {memory} bytes")
    if not 1 <= vcpus <= MAX_VCPUS:
        raise UsageError(f"--vcpus must be between 1 and {MAX_VCPUS}, not {vcpus}")


def make_layout(memory: int, vcpus: int, boot_bytes: int, rng: np.random.Generator,
                launch: str | None = None) -> Layout:
    """Shared regions sit at the top of the boot-accepted low RAM, as early memblock
    allocations do: SWIOTLB ends 1..511 pages below that top (so neither end is 2 MiB
    aligned), the per-vCPU pages and the virtio rings lie just below it."""
    validate(memory, vcpus)
    boot_pages = boot_bytes >> PAGE_SHIFT
    top = min(boot_pages, min(memory, LOW_RAM_MAX) >> PAGE_SHIFT)
    swiotlb_pages = swiotlb_bytes(memory) // PAGE_SIZE
    swiotlb = top - int(rng.integers(1, PAGES_PER_BLOCK)) - swiotlb_pages
    percpu = swiotlb - int(rng.integers(0, PAGES_PER_BLOCK)) - (2 * vcpus + 1)
    rings = percpu - DEVICES * RING_PAGES
    rings -= rings % RING_PAGES
    return Layout(memory, vcpus, boot_pages, swiotlb, swiotlb_pages, percpu, rings,
                  (DMA_ZONE_START, rings), launch)
