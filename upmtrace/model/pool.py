"""A backing pool: resident 4 KiB pages per block, and the block's 2 MiB folio if it has one."""

from __future__ import annotations

from enum import IntEnum

from upmtrace.model.bits import FULL


class Folio(IntEnum):
    NONE = 0  # single 4 KiB pages, or nothing
    INTACT = 1  # one 2 MiB folio: all 512 pages resident
    SPLIT = 2  # was a 2 MiB folio, part of it has been freed


class Pool:
    """One side's memory: the VMM's shared memory, or a guest_memfd."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.pages: dict[int, int] = {}  # block -> resident bitmap
        self.folios: dict[int, Folio] = {}  # block -> INTACT/SPLIT (absent: NONE)
        self.count = 0  # resident pages

    def resident(self, block: int, bit: int) -> bool:
        return bool(self.pages.get(block, 0) & bit)

    def folio(self, block: int) -> Folio:
        return self.folios.get(block, Folio.NONE)

    def add(self, block: int, mask: int) -> int:
        """Make the pages of mask resident; returns the bitmap of pages newly allocated."""
        old = self.pages.get(block, 0)
        new = mask & ~old
        if new:
            self.pages[block] = old | new
            self.count += new.bit_count()
        return new

    def add_folio(self, block: int) -> int:
        """Give the block one 2 MiB folio: every missing page is allocated."""
        new = self.add(block, FULL)
        self.folios[block] = Folio.INTACT
        return new

    def remove(self, block: int, mask: int) -> tuple[int, bool]:
        """Free the resident pages of mask: (bitmap freed, whether an intact folio split)."""
        old = self.pages.get(block, 0)
        gone = old & mask
        if not gone:
            return 0, False
        left = old & ~gone
        self.count -= gone.bit_count()
        split = False
        if left:
            self.pages[block] = left
            if self.folios.get(block) is Folio.INTACT:
                self.folios[block] = Folio.SPLIT
                split = True
        else:
            del self.pages[block]
            self.folios.pop(block, None)  # nothing left: the next allocation is a fresh folio
        return gone, split

    def check_invariants(self) -> None:
        assert self.count == sum(m.bit_count() for m in self.pages.values()), self.name
        assert all(self.pages.values()), f"{self.name}: empty bitmap kept"
        for block, state in self.folios.items():
            assert block in self.pages, f"{self.name}: folio of block {block} without pages"
            if state is Folio.INTACT:
                assert self.pages[block] == FULL, f"{self.name}: intact folio {block} not full"
