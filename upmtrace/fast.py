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

from upmtrace.engine import Engine, batch_rows_of
from upmtrace.model.bits import FULL, block_spans
from upmtrace.model.pool import Folio
from upmtrace.trace.schema import PAGE_SHIFT, PAGES_PER_BLOCK, Platform

MIN_RUN = 64  # shorter npf runs are not worth the numpy set-up
CHUNK = 8192  # rows per vectorised step; bounds the cost of re-checking after a conversion


def run_batches(engine: Engine, batches: Iterable[pa.RecordBatch]) -> None:
    for batch in batches:
        run_batch(engine, batch)
    engine.finish()


def feed_rows(engine: Engine, batch: pa.RecordBatch) -> None:
    for row in batch_rows_of(batch):
        engine.feed(row)


def run_batch(engine: Engine, batch: pa.RecordBatch) -> None:
    names = batch.schema.names
    kind = batch.column(names.index("kind"))
    words = kind.dictionary.to_pylist()
    if "npf" not in words or engine.paranoid:
        return feed_rows(engine, batch)
    is_npf = kind.indices.to_numpy(zero_copy_only=False) == words.index("npf")
    edges = np.flatnonzero(np.diff(is_npf.view(np.int8))) + 1
    starts, ends = np.r_[0, edges], np.r_[edges, len(is_npf)]
    npf_starts = is_npf[starts]
    other_rows = batch_rows_of(batch.take(pa.array(np.flatnonzero(~is_npf))))
    ts = batch.column(names.index("ts")).to_numpy()
    gfn = (batch.column(names.index("gpa")).fill_null(0).to_numpy().astype(np.int64)
           >> PAGE_SHIFT)
    private = batch.column(names.index("private")).fill_null(False).to_numpy(
        zero_copy_only=False)
    for s, e, npf in zip(starts.tolist(), ends.tolist(), npf_starts.tolist(), strict=True):
        if not npf:
            for _ in range(e - s):
                engine.feed(next(other_rows))
        elif e - s >= MIN_RUN:
            npf_run(engine, ts[s:e], gfn[s:e], private[s:e])
        else:
            short_npf_run(engine, ts[s:e].tolist(), gfn[s:e].tolist(), private[s:e].tolist())


def short_npf_run(engine: Engine, ts: list[int], gfn: list[int], private: list[bool]) -> None:
    """A few npf rows, one by one as Engine.feed would, without building their row tuples."""
    engine.flush()
    engine.ledger.switch("npf")
    engine.count["npf.recorded"] += len(gfn)
    for t, g, p in zip(ts, gfn, private, strict=True):
        if t > engine.due:
            engine.sample()
        engine.ts = t
        engine.events += 1
        engine.fault(g, p)
        engine.event_done()


def npf_run(engine: Engine, ts: np.ndarray, gfn: np.ndarray, private: np.ndarray) -> None:
    engine.flush()  # an npf row ends the PSC request being gathered
    engine.ledger.switch("npf")
    i, n = 0, len(gfn)
    while i < n:
        if ts[i] > engine.due:
            engine.sample()  # at most one sample before a row, as Engine.feed does
        j = min(n, i + CHUNK)
        if engine.timeline is not None:
            j = max(i + 1, min(j, int(np.searchsorted(ts, engine.due, side="right"))))
        Chunk(engine, gfn[i:j], private[i:j]).run()
        engine.ts = int(ts[j - 1])
        engine.events += j - i
        engine.event_done()
        i = j


class Chunk:
    """Up to CHUNK consecutive npf rows."""

    def __init__(self, engine: Engine, gfn: np.ndarray, private: np.ndarray) -> None:
        self.engine, self.m, self.count = engine, engine.m, engine.count
        self.gfn, self.private = gfn, private

    def run(self) -> None:
        m, count, gfn = self.m, self.count, self.gfn
        count["npf.recorded"] += len(gfn)
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
        if self.sweep(g, p, idx, slots):
            return
        key = (g >> 9 << 1) | p
        order = np.argsort(key, kind="stable")
        sorted_key = key[order]
        bounds = np.flatnonzero(sorted_key[1:] != sorted_key[:-1]) + 1
        groups = [order[a:b] for a, b in zip(np.r_[0, bounds], np.r_[bounds, len(g)],
                                              strict=True)]
        risky = {block for rows in groups
                 if self.risky(block := int(g[rows[0]]) >> 9, bool(p[rows[0]]),
                               slots[int(idx[rows[0]])])}
        slow: list[np.ndarray] = []
        for rows in groups:
            block = int(g[rows[0]]) >> 9
            if block in risky or idx[rows].min() != idx[rows].max():
                slow.append(rows)
                continue
            offsets = (g[rows] & (PAGES_PER_BLOCK - 1)).tolist()
            seen = np.zeros(PAGES_PER_BLOCK, dtype=bool)
            seen[offsets] = True
            wanted = int.from_bytes(np.packbits(seen, bitorder="little").tobytes(), "little")
            self.group(block, bool(p[rows[0]]), wanted, len(offsets),
                       lambda new, offsets=offsets: next(o for o in offsets if new >> o & 1),
                       slots[int(idx[rows[0]])])
        if slow:
            for r in np.sort(np.concatenate(slow)).tolist():
                self.engine.fault(int(g[r]), bool(p[r]))

    def sweep(self, g: np.ndarray, p: np.ndarray, idx: np.ndarray, slots: list) -> bool:
        """The common shape, a guest touching page after page: whole spans per block."""
        if len(g) < 2 or p.min() != p.max() or idx.min() != idx.max() or g[-1] - g[0] != len(g) - 1:
            return False
        if not (np.diff(g) == 1).all():
            return False
        private, slot = bool(p[0]), slots[int(idx[0])]
        spans = list(block_spans(int(g[0]), int(g[-1]) + 1))
        if any(self.risky(block, private, slot) for block, _ in spans):
            return False
        for block, mask in spans:
            self.group(block, private, mask, mask.bit_count(), lowest_bit, slot)
        return True

    def risky(self, block: int, private: bool, slot) -> bool:
        """Could mapping in this block PSMASH the RMP entry and zap the whole block?"""
        m = self.m
        if not (private and m.snp and not m.inplace and m.policy.gmem_page == "2m"):
            return False
        base = block * PAGES_PER_BLOCK
        if m.attrs.is_uniform(base, base + PAGES_PER_BLOCK, True):
            return False
        return block in m.rmp.huge or (m.pools[True].folio(block) is Folio.NONE
                                       and slot.holds_block(block))

    def group(self, block: int, private: bool, wanted: int, rows: int, first_of, slot) -> None:
        """`rows` faults on the gfns of `wanted` in one block; first_of(new) is the offset of
        the earliest of them whose gfn is in the bitmap `new`."""
        m, count = self.m, self.count
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
