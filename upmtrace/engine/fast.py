"""The batch path: the engine's model, with long runs of nested page faults taken a block at a time.

A run of consecutive npf rows changes the machine in a narrow way: a fault whose privacy matches
the attribute only maps (and allocates) in its own 2 MiB block, and memory only grows. Such
faults are grouped by (block, privacy): the first new gfn of a group is mapped by the reference
code, which settles the block's mapping level; if that is 2 MiB the rest are avoided, else the
rest are mapped at 4 KiB with one bitmap operation. Faults that convert (privacy != attribute),
and blocks where a mapping could PSMASH and zap the block, go through the reference code row by
row, in order. tests/test_fast_path.py checks that both paths give byte-identical reports.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pyarrow as pa

from upmtrace.engine.reference import Engine, Row, batch_rows_of
from upmtrace.model.bits import FULL, block_spans, span_mask
from upmtrace.model.machine import SHARED
from upmtrace.model.pool import Folio
from upmtrace.trace.schema import PAGE_SHIFT, PAGE_SIZE, PAGES_PER_BLOCK, Platform

MIN_RUN = 64  # shorter npf runs are not worth the numpy set-up
CHUNK = 8192  # rows per vectorised step; bounds the cost of re-checking after a conversion
MAX_PIECES = 64  # contiguous pieces a run of faults is swept in, at most

Pieces = list[tuple[int, int, bool]]  # [(g0, g1, private)]: gfn ranges of one privacy, in order
ShortRun = tuple[list[int], list[int], list[bool]]  # ts, gfn, private


def run_batches(engines: Engine | list[Engine], batches: Iterable[pa.RecordBatch]) -> None:
    """Feed every batch, decoded once, to each engine in turn; then finish them."""
    engines = engines if isinstance(engines, list) else [engines]
    for batch in batches:
        decoded = Decoded(batch)
        for engine in engines:
            decoded.feed(engine)
    for engine in engines:
        engine.finish()


class Decoded:
    """A record batch decoded once: npf runs as numpy columns, other rows as tuples.

    Decoding is the part of a replay that does not depend on the policy, so one Decoded batch
    feeds any number of engines. So is splitting a run of faults into its contiguous pieces
    (`pieces`): that is done on the first engine's demand and kept for the others.
    """

    def __init__(self, batch: pa.RecordBatch) -> None:
        self.batch = batch
        names = batch.schema.names
        kind = batch.column(names.index("kind"))
        words = kind.dictionary.to_pylist()
        self.segments: list[tuple[int, int, bool]] = []
        if "npf" not in words:
            self.rows = list(batch_rows_of(batch))
            self.segments = [(0, len(self.rows), False)] if self.rows else []
            return
        is_npf = kind.indices.to_numpy(zero_copy_only=False) == words.index("npf")
        edges = np.flatnonzero(np.diff(is_npf.view(np.int8))) + 1
        starts, ends = np.r_[0, edges], np.r_[edges, len(is_npf)]
        self.segments = list(zip(starts.tolist(), ends.tolist(), is_npf[starts].tolist(),
                                 strict=True))
        self.rows = list(batch_rows_of(batch.take(pa.array(np.flatnonzero(~is_npf)))))
        self.ts = batch.column(names.index("ts")).to_numpy()
        self.gfn = (batch.column(names.index("gpa")).fill_null(0).to_numpy().astype(np.int64)
                    >> PAGE_SHIFT)
        self.private = batch.column(names.index("private")).fill_null(False).to_numpy(
            zero_copy_only=False)
        self.short: dict[int, ShortRun] = {}
        self.found: dict[tuple[int, int], Pieces | None] = {}  # pieces, by rows [a, b)
        length = ends - starts
        short = is_npf[starts] & (length < MIN_RUN)
        if short.any():  # every short run's rows as Python lists at once, then sliced
            rows = np.repeat(short, length)
            ts, gfn, private = (self.ts[rows].tolist(), self.gfn[rows].tolist(),
                                self.private[rows].tolist())
            at = 0
            for s, n in zip(starts[short].tolist(), length[short].tolist(), strict=True):
                self.short[s] = ts[at:at + n], gfn[at:at + n], private[at:at + n]
                at += n

    def pieces(self, a: int, b: int) -> Pieces | None:
        """The pieces of the npf rows [a, b) of the batch, found once for every engine: of a
        short run (in self.short) from its lists, of a chunk of a long run with pieces_of."""
        key = (a, b)
        if key not in self.found:
            self.found[key] = (short_pieces(*self.short[a][1:]) if a in self.short
                               else pieces_of(self.gfn[a:b], self.private[a:b]))
        return self.found[key]

    def feed(self, engine: Engine) -> None:
        if engine.paranoid:
            for row in batch_rows_of(self.batch):
                engine.feed(row)
            return
        rows, at = self.rows, 0
        for s, e, npf in self.segments:
            if not npf:
                for row in rows[at:at + e - s]:
                    feed_other(engine, row)
                at += e - s
            elif e - s >= MIN_RUN:
                npf_run(engine, self, s, e)
            else:
                short_npf_run(engine, self, s, e)


def feed_other(engine: Engine, row: Row) -> None:
    """A row other than npf: host accesses of one block take a short cut, the rest the
    reference Engine.feed."""
    if row[1] != "host_access":
        engine.feed(row)
        return
    engine.flush()
    if row[0] > engine.due:
        engine.sample()
    engine.ts = row[0]
    engine.events += 1
    if not host_access_in_block(engine, row[3], row[4]):
        engine.ledger.switch("none")  # no exit causes a host access (Engine.feed's CAUSE)
        engine.host_access(row)
    engine.event_done()


def host_access_in_block(engine: Engine, gpa: int, size: int) -> bool:
    """Engine.host_access for an access inside one block of one memslot; False otherwise.

    The ledger is switched to `none` only when the access populates a page: an access that
    allocates nothing moves no work counter, so there is nothing to charge to any cause."""
    m = engine.m
    g0, g1 = gpa >> PAGE_SHIFT, (gpa + size + PAGE_SIZE - 1) >> PAGE_SHIFT
    block = g0 >> 9
    if (g1 - 1) >> 9 != block:
        return False
    slot = m.slots.find(g0)
    if slot is None or g1 > slot.end:
        return False
    engine.count["host_access.pages"] += g1 - g0
    base = block << 9
    mask = span_mask(g0 - base, g1 - base)
    private = 0 if m.attrs.is_uniform(base, base + PAGES_PER_BLOCK, False) else \
        m.private_bitmap(block, mask)
    if private:
        if m.inplace:
            engine.count["host_access.faults"] += private.bit_count()
            mask &= ~private
        else:
            engine.count["host_access.stale"] += private.bit_count()
    if mask & ~m.pools[SHARED].pages.get(block, 0):
        engine.ledger.switch("none")
        m.populate(SHARED, block, mask)
    return True


def short_npf_run(engine: Engine, decoded: Decoded, s: int, e: int) -> None:
    """The few npf rows [s, e) of a decoded batch, swept in their pieces, or one by one as
    Engine.feed would, without building their row tuples."""
    engine.flush()
    engine.ledger.switch("npf")
    ts, gfn, private = decoded.short[s]
    if short_sweep(engine, decoded, s, e):
        return
    count, m = engine.count, engine.m
    count["npf.recorded"] += len(gfn)
    huge, small = m.maps.huge, m.maps.small
    avoided = 0
    sw = engine.platform is Platform.SW
    for t, g, p in zip(ts, gfn, private, strict=True):
        if t > engine.due:
            count["npf.avoided"] += avoided
            avoided = 0
            engine.sample()
        engine.ts = t
        engine.events += 1
        if not sw:  # already mapped with this privacy: avoided, nothing changes
            block = g >> 9
            level = huge.get(block)
            if level is None:
                if small[p].get(block, 0) >> (g & 511) & 1:
                    avoided += 1
                    continue
            elif level == p:
                avoided += 1
                continue
        engine.fault(g, p)
        engine.event_done()
    count["npf.avoided"] += avoided


def short_sweep(engine: Engine, decoded: Decoded, s: int, e: int) -> bool:
    """The few npf rows [s, e) as their contiguous pieces (sweep_pieces), when no timeline
    sample falls inside them; False, with nothing done, otherwise."""
    n, ts = e - s, decoded.short[s][0]
    if n < 2 or ts[-1] > engine.due or engine.platform is Platform.SW:
        return False
    if not sweep_pieces(engine, decoded.pieces(s, e)):
        return False
    engine.count["npf.recorded"] += n
    engine.ts = ts[-1]
    engine.events += n
    engine.event_done()
    return True


def npf_run(engine: Engine, decoded: Decoded, s: int, e: int) -> None:
    """The npf rows [s, e) of a decoded batch, in chunks of at most CHUNK rows."""
    engine.flush()  # an npf row ends the PSC request being gathered
    engine.ledger.switch("npf")
    ts, gfn, private = decoded.ts[s:e], decoded.gfn[s:e], decoded.private[s:e]
    i, n = 0, e - s
    while i < n:
        if ts[i] > engine.due:
            engine.sample()  # at most one sample before a row, as Engine.feed does
        j = min(n, i + CHUNK)
        if engine.timeline is not None:
            j = max(i + 1, min(j, int(np.searchsorted(ts, engine.due, side="right"))))
        Chunk(engine, gfn[i:j], private[i:j]).run(decoded.pieces(s + i, s + j))
        engine.ts = int(ts[j - 1])
        engine.events += j - i
        engine.event_done()
        i = j


class Chunk:
    """Up to CHUNK consecutive npf rows."""

    def __init__(self, engine: Engine, gfn: np.ndarray, private: np.ndarray) -> None:
        self.engine, self.m, self.count = engine, engine.m, engine.count
        self.gfn, self.private = gfn, private

    def run(self, pieces: Pieces | None) -> None:
        """`pieces`: the chunk's pieces_of, found once for every engine fed the batch."""
        m, count, gfn = self.m, self.count, self.gfn
        count["npf.recorded"] += len(gfn)
        if self.engine.platform is not Platform.SW and self.sweep(pieces):
            return  # every fault usable and matching its attribute: no per-row lookups
        private = m.attrs.lookup(gfn) if self.engine.platform is Platform.SW else self.private
        slots, index = m.slots.lookup(gfn)
        gmem = np.array([s.gmem for s in slots] + [False])[index]  # index -1: no slot
        usable = (index >= 0) & (gmem | ~private)
        mismatch = usable & (private != m.attrs.lookup(gfn))
        if np.count_nonzero(mismatch) > len(gfn) // 16:
            for g, p in zip(gfn.tolist(), private.tolist(), strict=True):
                self.engine.fault(g, p)  # conversions everywhere: row by row
                self.engine.event_done()
            return
        unresolvable = int(np.count_nonzero(~usable & private))
        mmio = int(np.count_nonzero(~usable & ~private))
        count["exits.vm.npf"] += unresolvable + mmio
        count["exits.userspace.KVM_EXIT_MEMORY_FAULT"] += unresolvable
        count["npf.unresolvable"] += unresolvable
        count["npf.mmio"] += mmio
        rows = np.flatnonzero(usable)
        g, p, idx, mis = gfn[rows], private[rows], index[rows], mismatch[rows]
        start = 0
        while True:
            pending = np.flatnonzero(mis[start:])
            if not len(pending):
                break
            k = start + int(pending[0])
            self.clean(g[start:k], p[start:k], idx[start:k], slots)
            self.engine.event_done()  # memory may shrink next: take the peak first
            gk, pk = int(g[k]), bool(p[k])
            self.engine.fault(gk, pk)
            later = np.flatnonzero(g[k + 1:] == gk) + k + 1
            mis[later] = p[later] != pk  # the attribute of gk is now pk
            self.engine.event_done()
            start = k + 1
        self.clean(g[start:], p[start:], idx[start:], slots)

    def clean(self, g: np.ndarray, p: np.ndarray, idx: np.ndarray, slots: list) -> None:
        """Faults whose privacy matches the attribute, in usable slots: grouped per block."""
        if not len(g):
            return
        if self.sweep(pieces_of(g, p)):
            return
        key = (g >> 9 << 1) | p
        order = np.argsort(key, kind="stable")
        sorted_key = key[order]
        bounds = np.flatnonzero(sorted_key[1:] != sorted_key[:-1]) + 1
        groups = [order[a:b] for a, b in zip(np.r_[0, bounds], np.r_[bounds, len(g)],
                                              strict=True)]
        unsafe = {block for rows in groups
                 if risky(self.m, block := int(g[rows[0]]) >> 9, bool(p[rows[0]]),
                          slots[int(idx[rows[0]])])}
        slow: list[np.ndarray] = []
        for rows in groups:
            block = int(g[rows[0]]) >> 9
            if block in unsafe or idx[rows].min() != idx[rows].max():
                slow.append(rows)
                continue
            offsets = (g[rows] & (PAGES_PER_BLOCK - 1)).tolist()
            seen = np.zeros(PAGES_PER_BLOCK, dtype=bool)
            seen[offsets] = True
            wanted = int.from_bytes(np.packbits(seen, bitorder="little").tobytes(), "little")
            group(self.m, self.count, block, bool(p[rows[0]]), wanted, len(offsets),
                  lambda new, offsets=offsets: next(o for o in offsets if new >> o & 1),
                  slots[int(idx[rows[0]])])
        if slow:
            for r in np.sort(np.concatenate(slow)).tolist():
                self.engine.fault(int(g[r]), bool(p[r]))

    def sweep(self, pieces: Pieces | None) -> bool:
        """The common shape, guests touching page after page: contiguous pieces of one
        privacy, mapped a block at a time."""
        return pieces is not None and sweep_pieces(self.engine, pieces)


def short_pieces(gfn: list[int], private: list[bool]) -> Pieces:
    """pieces_of a few npf rows (at least one) given as lists, without numpy."""
    pieces = []
    g0 = prev = gfn[0]
    p0 = private[0]
    for g, p in zip(gfn[1:], private[1:], strict=True):
        if g != prev + 1 or p != p0:
            pieces.append((g0, prev + 1, p0))
            g0, p0 = g, p
        prev = g
    pieces.append((g0, prev + 1, p0))
    return pieces


def pieces_of(g: np.ndarray, p: np.ndarray) -> Pieces | None:
    """npf rows as contiguous pieces of one privacy, in order; None for fewer than two rows or
    more than MAX_PIECES pieces (not worth sweeping)."""
    if len(g) < 2:
        return None
    breaks = (np.flatnonzero((np.diff(g) != 1) | (p[1:] != p[:-1])) + 1).tolist()
    if len(breaks) > MAX_PIECES:
        return None
    first, last = [0, *breaks], [b - 1 for b in breaks] + [len(g) - 1]
    return list(zip(g[first].tolist(), (g[last] + 1).tolist(), p[first].tolist(), strict=True))


def sweep_pieces(engine: Engine, pieces: Pieces) -> bool:
    """Faults on the gfn ranges [g0, g1) of `pieces`, page after page, each range of one
    privacy: True once they are mapped as the row-by-row path would, a block at a time. False,
    with nothing done, unless every range lies in one usable memslot, carries its privacy as
    attribute (no conversion), no (block, privacy) comes twice and no block risks a PSMASH."""
    m = engine.m
    spans: dict[tuple[int, bool], tuple[int, object]] = {}
    for g0, g1, private in pieces:
        slot = m.slots.find(g0)
        if slot is None or g1 > slot.end or (private and not slot.gmem):
            return False
        if not m.attrs.is_uniform(g0, g1, private):
            return False
        for block, mask in block_spans(g0, g1):
            if (block, private) in spans or risky(m, block, private, slot):
                return False
            spans[block, private] = mask, slot
    for (block, private), (mask, slot) in sorted(spans.items()):
        group(m, engine.count, block, private, mask, mask.bit_count(), lowest_bit, slot)
    return True


def risky(m, block: int, private: bool, slot) -> bool:
    """Could mapping in this block PSMASH the RMP entry and zap the whole block?"""
    if not (private and m.snp and not m.inplace and m.policy.gmem_page == "2m"):
        return False
    base = block * PAGES_PER_BLOCK
    if m.attrs.is_uniform(base, base + PAGES_PER_BLOCK, True):
        return False
    return block in m.rmp.huge or (m.pools[True].folio(block) is Folio.NONE
                                   and slot.holds_block(block))


def group(m, count, block: int, private: bool, wanted: int, rows: int, first_of, slot) -> None:
    """`rows` faults on the gfns of `wanted` in one block; first_of(new) is the offset of
    the earliest of them whose gfn is in the bitmap `new`."""
    new = wanted & ~m.maps.mapped_bitmap(block)[private]
    if not new:
        count["npf.avoided"] += rows
        return
    first = first_of(new)
    count["exits.vm.npf"] += 1
    m.map_gfn(block * PAGES_PER_BLOCK + first, private, slot)
    rest = new & ~(1 << first) & FULL
    faults = 1
    if rest and m.maps.huge.get(block) != private:
        faults += rest.bit_count()
        count["exits.vm.npf"] += rest.bit_count()
        m.map_small_many(block, rest, private, slot)
    count["npf.avoided"] += rows - faults


def lowest_bit(bitmap: int) -> int:
    return (bitmap & -bitmap).bit_length() - 1
