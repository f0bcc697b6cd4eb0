"""The memory-attributes xarray: which gfns are private. Shared is the default (no entry).

Kept as sorted disjoint private runs [start, end) so that marking a terabyte slot private is one
entry, as in KVM's xarray of ranges.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right

import numpy as np


class AttributeMap:
    def __init__(self) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []
        self._arrays: tuple[np.ndarray, np.ndarray] | None = None

    def lookup(self, gfns: np.ndarray) -> np.ndarray:
        """is_private for an array of gfns at once."""
        if self._arrays is None:
            self._arrays = (np.asarray(self._starts, dtype=np.int64),
                            np.asarray(self._ends, dtype=np.int64))
        starts, ends = self._arrays
        i = np.searchsorted(starts, gfns, side="right") - 1
        return (i >= 0) & (gfns < ends[np.maximum(i, 0)] if len(ends) else False)

    def is_private(self, gfn: int) -> bool:
        i = bisect_right(self._starts, gfn) - 1
        return i >= 0 and gfn < self._ends[i]

    def private_runs(self, g0: int, g1: int) -> list[tuple[int, int]]:
        """The private runs clipped to [g0, g1), in order."""
        runs = []
        i = max(bisect_right(self._starts, g0) - 1, 0)
        while i < len(self._starts) and self._starts[i] < g1:
            lo, hi = max(self._starts[i], g0), min(self._ends[i], g1)
            if lo < hi:
                runs.append((lo, hi))
            i += 1
        return runs

    def block_bitmap(self, base: int, pages: int) -> int:
        """Bitmap of the private gfns of [base, base + pages), bit 0 for base."""
        starts, ends = self._starts, self._ends
        i = bisect_right(starts, base) - 1
        if i >= 0 and ends[i] >= base + pages:
            return (1 << pages) - 1  # inside one private run
        if (i < 0 or ends[i] <= base) and (i + 1 >= len(starts) or starts[i + 1] >= base + pages):
            return 0  # between two runs
        bitmap = 0
        for lo, hi in self.private_runs(base, base + pages):
            bitmap |= ((1 << (hi - lo)) - 1) << (lo - base)
        return bitmap

    def is_uniform(self, g0: int, g1: int, private: bool) -> bool:
        """Every gfn of [g0, g1) carries the attribute."""
        i = bisect_right(self._starts, g0) - 1
        covered = i >= 0 and self._ends[i] >= g1
        if private:
            return covered
        if i >= 0 and self._ends[i] > g0:
            return False
        j = bisect_left(self._starts, g0)
        return j >= len(self._starts) or self._starts[j] >= g1

    def set_range(self, g0: int, g1: int, private: bool) -> list[tuple[int, int]]:
        """Set [g0, g1) to the attribute; returns the runs whose attribute changed."""
        inside = self.private_runs(g0, g1)
        if private:
            changed, pos = [], g0
            for lo, hi in inside:
                if pos < lo:
                    changed.append((pos, lo))
                pos = hi
            if pos < g1:
                changed.append((pos, g1))
        else:
            changed = inside
        if not changed:
            return changed
        self._replace(g0, g1, private)
        return changed

    def _replace(self, g0: int, g1: int, private: bool) -> None:
        starts, ends = self._starts, self._ends
        # runs touching or overlapping [g0, g1) (touching merges when marking private)
        lo = bisect_left(ends, g0)
        hi = bisect_right(starts, g1)
        new_s, new_e = [], []
        if lo < hi:
            first_s, last_e = starts[lo], ends[hi - 1]
            if first_s < g0:
                new_s.append(first_s)
                new_e.append(g0)
            if last_e > g1:
                new_s.append(g1)
                new_e.append(last_e)
        if private:
            merged_s = min([g0] + [s for s in new_s if s < g0])
            merged_e = max([g1] + [e for e in new_e if e > g1])
            new_s, new_e = [merged_s], [merged_e]
        starts[lo:hi] = new_s
        ends[lo:hi] = new_e
        self._arrays = None

    def check_invariants(self) -> None:
        for i, (s, e) in enumerate(zip(self._starts, self._ends, strict=True)):
            assert s < e, f"empty private run {s}..{e}"
            if i:
                assert self._ends[i - 1] < s, "private runs overlap or touch unmerged"
