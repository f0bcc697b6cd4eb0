"""The host kernel's direct map over guest memory, 2 MiB regions congruent with guest blocks."""

from __future__ import annotations

from enum import IntEnum


class Region(IntEnum):
    INTACT = 0  # mapped 2 MiB
    SPLIT = 1  # mapped at 4 KiB (private pages removed, with `unmap`)
    REMOVED = 2  # the whole 2 MiB region removed (`unmap` after a 2 MiB private RMP update)


class DirectMap:
    """Reacts to RMP updates under one policy: split, unmap or none."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.regions: dict[int, Region] = {}  # absent: INTACT
        self.splits = 0
        self.restores = 0

    def on_rmp_update(self, block: int, to_private: bool, huge: bool, private_left: int) -> None:
        """An RMP update in the block; private_left = RMP-private pages in it afterwards."""
        if self.mode == "split":
            if not huge and block not in self.regions:
                self.regions[block] = Region.SPLIT
                self.splits += 1
        elif self.mode == "unmap":
            state = self.regions.get(block, Region.INTACT)
            if to_private:
                if huge:
                    self.regions[block] = Region.REMOVED
                elif state is Region.INTACT:
                    self.regions[block] = Region.SPLIT
                    self.splits += 1
            else:
                if state is Region.REMOVED and not huge:
                    self.regions[block] = Region.SPLIT  # freed pages mapped back at 4 KiB
                if not private_left and block in self.regions:
                    del self.regions[block]
                    self.restores += 1

    def check_invariants(self, rmp_private: dict[int, int]) -> None:
        if self.mode == "unmap":
            for block in self.regions:
                assert rmp_private.get(block), f"region {block} unmapped with no private page"
        elif self.mode == "none":
            assert not self.regions and not self.splits
