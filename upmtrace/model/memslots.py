"""Memslots: guest-physical ranges registered by the VMM, kept in an interval tree of gfns."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from intervaltree import IntervalTree

from upmtrace.model.bits import BLOCK_PAGES_SHIFT


@dataclass(frozen=True)
class Slot:
    id: int
    start: int  # first gfn
    end: int  # gfn past the last
    gmem: bool  # has a guest_memfd: private-capable

    def holds_block(self, block: int) -> bool:
        return (self.start <= block << BLOCK_PAGES_SHIFT
                and (block + 1) << BLOCK_PAGES_SHIFT <= self.end)


class Memslots:
    def __init__(self) -> None:
        self._tree = IntervalTree()
        self._by_id: dict[int, Slot] = {}
        self._last: Slot | None = None
        self._arrays: tuple[list[Slot], np.ndarray, np.ndarray] | None = None

    def lookup(self, gfns: np.ndarray) -> tuple[list[Slot], np.ndarray]:
        """(slots by start, index into it per gfn or -1) for an array of gfns."""
        if self._arrays is None:
            slots = sorted(self._by_id.values(), key=lambda s: s.start)
            self._arrays = (slots, np.asarray([s.start for s in slots], dtype=np.int64),
                            np.asarray([s.end for s in slots], dtype=np.int64))
        slots, starts, ends = self._arrays
        i = np.searchsorted(starts, gfns, side="right") - 1
        if not slots:
            return slots, i
        inside = (i >= 0) & (gfns < ends[np.maximum(i, 0)])
        return slots, np.where(inside, i, -1)

    def add(self, slot: Slot) -> None:
        if self._tree.overlaps(slot.start, slot.end):
            raise ValueError(f"memslot {slot.id} overlaps a live memslot")
        self._tree.addi(slot.start, slot.end, slot)
        self._by_id[slot.id] = slot
        self._arrays = None

    def remove(self, slot_id: int) -> Slot | None:
        slot = self._by_id.pop(slot_id, None)
        if slot is not None:
            self._tree.removei(slot.start, slot.end, slot)
            self._last = None
            self._arrays = None
        return slot

    def find(self, gfn: int) -> Slot | None:
        last = self._last
        if last is not None and last.start <= gfn < last.end:
            return last
        hits = self._tree.at(gfn)
        if not hits:
            return None
        self._last = slot = next(iter(hits)).data
        return slot

    def overlapping(self, g0: int, g1: int) -> list[Slot]:
        return sorted((iv.data for iv in self._tree.overlap(g0, g1)), key=lambda s: s.start)

    def check_invariants(self) -> None:
        slots = sorted(self._by_id.values(), key=lambda s: s.start)
        assert len(self._tree) == len(slots)
        for a, b in zip(slots, slots[1:], strict=False):
            assert a.end <= b.start, f"memslots {a.id} and {b.id} overlap"
        for s in slots:
            assert s.start < s.end
