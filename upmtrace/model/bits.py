"""Per-block bitmaps: a 2 MiB block's 512 gfns as the bits of one Python int."""

from __future__ import annotations

from collections.abc import Iterator

from upmtrace.trace.schema import PAGES_PER_BLOCK

BLOCK_PAGES_SHIFT = 9
FULL = (1 << PAGES_PER_BLOCK) - 1


def span_mask(lo: int, hi: int) -> int:
    """Bits lo..hi-1 of a block (0 <= lo <= hi <= 512)."""
    return ((1 << (hi - lo)) - 1) << lo


def block_spans(g0: int, g1: int) -> Iterator[tuple[int, int]]:
    """(block, mask) for every block the gfn range [g0, g1) touches, in address order."""
    b0, b1 = g0 >> BLOCK_PAGES_SHIFT, (g1 - 1) >> BLOCK_PAGES_SHIFT
    for b in range(b0, b1 + 1):
        base = b << BLOCK_PAGES_SHIFT
        lo = max(g0 - base, 0)
        hi = min(g1 - base, PAGES_PER_BLOCK)
        yield b, FULL if (lo == 0 and hi == PAGES_PER_BLOCK) else span_mask(lo, hi)


def blocks_in(g0: int, g1: int, present: dict[int, int] | set[int]) -> Iterator[tuple[int, int]]:
    """Like block_spans, limited to blocks present in a sparse map: walks whichever is smaller."""
    if g1 <= g0:
        return
    b0, b1 = g0 >> BLOCK_PAGES_SHIFT, (g1 - 1) >> BLOCK_PAGES_SHIFT
    if b1 - b0 + 1 <= len(present):
        for b, mask in block_spans(g0, g1):
            if b in present:
                yield b, mask
        return
    for b in sorted(k for k in present if b0 <= k <= b1):
        base = b << BLOCK_PAGES_SHIFT
        lo = max(g0 - base, 0)
        hi = min(g1 - base, PAGES_PER_BLOCK)
        yield b, FULL if (lo == 0 and hi == PAGES_PER_BLOCK) else span_mask(lo, hi)


def iter_bits(mask: int) -> Iterator[int]:
    """Indices of the set bits, lowest first."""
    while mask:
        low = mask & -mask
        yield low.bit_length() - 1
        mask ^= low
