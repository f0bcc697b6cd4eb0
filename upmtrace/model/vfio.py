"""VFIO DMA mappings of guest memory for an assigned device: the shared pages it has pinned.

A pinned page stays resident: guest memory the device may reach cannot be discarded until the
VMM unmaps it (VFIO_IOMMU_UNMAP_DMA) and the pages are unpinned.
"""

from __future__ import annotations

from upmtrace.model.bits import blocks_in


class Vfio:
    def __init__(self, mode: str) -> None:
        self.mode = mode  # none | pin-all | on-convert
        self.pinned: dict[int, int] = {}  # block -> bitmap of pinned pages (shared side)
        self.count = 0  # pinned pages now
        self.map_calls = 0  # VFIO_IOMMU_MAP_DMA
        self.unmap_calls = 0  # VFIO_IOMMU_UNMAP_DMA
        self.pages_pinned = 0  # pins made over the whole replay

    def bitmap(self, block: int) -> int:
        return self.pinned.get(block, 0)

    def pin(self, block: int, mask: int) -> int:
        """Pin the pages of mask; returns how many were not pinned before."""
        old = self.pinned.get(block, 0)
        new = mask & ~old
        if new:
            self.pinned[block] = old | new
            n = new.bit_count()
            self.count += n
            self.pages_pinned += n
            return n
        return 0

    def pinned_in(self, g0: int, g1: int) -> int:
        """How many pages of [g0, g1) are pinned."""
        return sum((self.pinned[b] & m).bit_count() for b, m in blocks_in(g0, g1, self.pinned))

    def unpin(self, g0: int, g1: int) -> None:
        for b, m in list(blocks_in(g0, g1, self.pinned)):
            old = self.pinned[b]
            left = old & ~m
            self.count -= (old & m).bit_count()
            if left:
                self.pinned[b] = left
            else:
                del self.pinned[b]

    def check_invariants(self, resident: dict[int, int]) -> None:
        assert self.mode != "none" or not self.pinned, "pinned pages without vfio"
        assert all(self.pinned.values()), "vfio: empty bitmap kept"
        assert self.count == sum(m.bit_count() for m in self.pinned.values()), "vfio count"
        for block, mask in self.pinned.items():
            assert mask & ~resident.get(block, 0) == 0, f"block {block}: pinned but not resident"
