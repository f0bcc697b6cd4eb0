"""Nested page table mappings (NPT/EPT): per gfn none, shared or private, at 4 KiB or 2 MiB."""

from __future__ import annotations

from upmtrace.model.bits import FULL, blocks_in


class Mappings:
    def __init__(self) -> None:
        self.huge: dict[int, bool] = {}  # block -> privacy of its 2 MiB mapping
        self.small: tuple[dict[int, int], dict[int, int]] = ({}, {})  # [private] block -> bitmap

    def maps(self, block: int, bit: int, private: bool) -> bool:
        huge = self.huge.get(block)
        if huge is not None:
            return huge == private
        return bool(self.small[private].get(block, 0) & bit)

    def map_small(self, block: int, bit: int, private: bool) -> None:
        side = self.small[private]
        side[block] = side.get(block, 0) | bit

    def map_huge(self, block: int, private: bool) -> None:
        self.small[0].pop(block, None)
        self.small[1].pop(block, None)
        self.huge[block] = private

    def zap(self, g0: int, g1: int) -> None:
        """Zap the range; a 2 MiB mapping that overlaps it goes whole."""
        for table in (self.huge, *self.small):
            for block, mask in list(blocks_in(g0, g1, table)):
                if table is self.huge:
                    del table[block]
                    continue
                left = table[block] & ~mask
                if left:
                    table[block] = left
                else:
                    del table[block]

    def zap_block(self, block: int) -> None:
        self.huge.pop(block, None)
        self.small[0].pop(block, None)
        self.small[1].pop(block, None)

    def mapped_bitmap(self, block: int) -> tuple[int, int]:
        """(shared, private) bitmaps of the gfns mapped in a block."""
        huge = self.huge.get(block)
        if huge is not None:
            return (0, FULL) if huge else (FULL, 0)
        return self.small[0].get(block, 0), self.small[1].get(block, 0)

    def blocks(self) -> set[int]:
        return set(self.huge) | set(self.small[0]) | set(self.small[1])

    def check_invariants(self) -> None:
        for block in self.small[0].keys() & self.small[1].keys():
            assert not (self.small[0][block] & self.small[1][block]), f"block {block} mapped twice"
        for block in self.huge:
            assert block not in self.small[0] and block not in self.small[1], block
        assert all(self.small[0].values()) and all(self.small[1].values())
