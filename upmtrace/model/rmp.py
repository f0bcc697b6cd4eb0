"""The SEV-SNP Reverse Map Table: which host pages are guest-private, at 4 KiB or 2 MiB."""

from __future__ import annotations

from upmtrace.model.bits import FULL


class Rmp:
    def __init__(self) -> None:
        self.private: dict[int, int] = {}  # block -> bitmap of RMP-private pages
        self.huge: set[int] = set()  # blocks covered by one 2 MiB private entry
        self.smashed: set[int] = set()  # blocks whose 2 MiB entry was PSMASHed into 4 KiB ones
        self.updates_4k = 0
        self.updates_2m = 0
        self.psmash = 0

    def private_bitmap(self, block: int) -> int:
        return self.private.get(block, 0)

    def make_private_2m(self, block: int) -> None:
        self.private[block] = FULL
        self.huge.add(block)
        self.smashed.discard(block)
        self.updates_2m += 1

    def smash(self, block: int) -> None:
        self.huge.discard(block)
        self.smashed.add(block)
        self.psmash += 1

    def make_private_4k(self, block: int, mask: int) -> int:
        """4 KiB updates for the pages of mask not yet private; returns how many."""
        old = self.private.get(block, 0)
        new = mask & ~old
        if new:
            self.private[block] = old | new
            self.updates_4k += new.bit_count()
        return new.bit_count()

    def make_private_launch(self, block: int, mask: int) -> int:
        """Launch pages (SNP_LAUNCH_UPDATE): 4 KiB entries, and the block then holds 4 KiB
        entries as after a PSMASH (none is counted: there was no 2 MiB entry to smash)."""
        self.smashed.add(block)
        return self.make_private_4k(block, mask)

    def make_shared(self, block: int, mask: int) -> tuple[int, bool]:
        """Return private pages of mask to shared: (4 KiB updates made, whether one 2 MiB)."""
        old = self.private.get(block, 0)
        gone = old & mask
        if not gone:
            return 0, False
        if block in self.huge:
            if gone == FULL:
                self.huge.discard(block)
                del self.private[block]
                self.updates_2m += 1
                return 0, True
            self.smash(block)
        left = old & ~gone
        if left:
            self.private[block] = left
        else:
            del self.private[block]
        n = gone.bit_count()
        self.updates_4k += n
        return n, False

    def check_invariants(self) -> None:
        for block in self.huge:
            assert self.private.get(block) == FULL, f"2 MiB RMP entry {block} not wholly private"
            assert block not in self.smashed
        assert all(self.private.values())
