"""The simulated machine of SPEC.md section 5: state and the operations events are made of.

The engine decides what an event means (exits, runs, chunks); the Machine carries it out on the
memslots, the attribute map, the two pools, the mappings, the RMP and the direct map, and keeps
the counters those parts produce.
"""

from __future__ import annotations

from collections import Counter, deque

from upmtrace.errors import InputError
from upmtrace.model.attributes import AttributeMap
from upmtrace.model.bits import BLOCK_PAGES_SHIFT, FULL, block_spans, blocks_in, iter_bits
from upmtrace.model.directmap import DirectMap
from upmtrace.model.mappings import Mappings
from upmtrace.model.memslots import Memslots, Slot
from upmtrace.model.pool import Folio, Pool
from upmtrace.model.rmp import Rmp
from upmtrace.policy import Policy
from upmtrace.trace.schema import PAGES_PER_BLOCK, Platform

SHARED, PRIVATE = False, True
POPULATE_LIMIT_PAGES = 1 << 28  # 1 TiB of 4 KiB pages
BLOCK_MASK = PAGES_PER_BLOCK - 1


class Machine:
    def __init__(self, policy: Policy, platform: Platform) -> None:
        self.policy = policy
        self.platform = platform
        self.snp = platform is Platform.SNP
        self.tdx = platform is Platform.TDX
        self.inplace = policy.backing == "inplace"
        self.lazy = policy.dealloc == "lazy"
        self.slots = Memslots()
        self.attrs = AttributeMap()
        shared = Pool("shared")
        self.pools = (shared, shared if self.inplace else Pool("private"))
        self.maps = Mappings()
        self.rmp = Rmp()
        self.directmap = DirectMap(policy.directmap if self.snp else "none")
        self.count: Counter[str] = Counter()
        self.duplicate = 0  # pages resident on both sides (separate backing)
        self.inplace_private = 0  # resident pages whose attribute is private (inplace backing)
        self.touched: dict[int, int] = {}  # block -> bitmap of gfns ever resident
        self.touched_pages = 0
        self.stale: dict[int, int] = {}  # gfn -> age of its stale copy (lazy dealloc)
        self.stale_order: deque[tuple[int, int]] = deque()  # (age, gfn), oldest first
        self.conversions = 0  # age counter
        self.grew = False  # memory may have grown since the last measurement

    # --- memslots ---------------------------------------------------------------------------

    def set_memslot(self, slot_id: int, start: int, npages: int, gmem: bool) -> None:
        old = self.slots.remove(slot_id)
        if old is not None:
            self.maps.zap(old.start, old.end)
            for side in (SHARED, PRIVATE):
                self.free_range(side, old.start, old.end)
        if npages:
            self.slots.add(Slot(slot_id, start, start + npages, gmem))

    # --- attributes and conversion ----------------------------------------------------------

    def set_attributes(self, g0: int, g1: int, private: bool) -> bool:
        """One KVM_SET_MEMORY_ATTRIBUTES call; zaps when anything changed. True if it did."""
        self.count["conversions.set_attributes_calls"] += 1
        changed = self.attrs.set_range(g0, g1, private)
        if not changed:
            return False
        pages = sum(hi - lo for lo, hi in changed)
        self.count["conversions.to_private_pages" if private else "conversions.to_shared_pages"] \
            += pages
        self.maps.zap(g0, g1)
        if self.inplace:
            pool = self.pools[0]
            moved = sum((pool.pages[b] & m).bit_count()
                        for lo, hi in changed for b, m in blocks_in(lo, hi, pool.pages))
            self.inplace_private += moved if private else -moved
            self.grew = True
        if self.lazy:  # only where the attribute changed: elsewhere a stale copy stays stale
            for lo, hi in changed:
                self._unstale(lo, hi, private)
        return True

    def convert(self, g0: int, g1: int, private: bool, explicit: bool) -> None:
        """A VMM conversion: set attributes, free the old side's copy by policy, prefault."""
        self.set_attributes(g0, g1, private)
        self.conversions += 1
        if self.inplace:
            if self.snp and not private:
                for b, m in blocks_in(g0, g1, self.rmp.private):
                    self._rmp_shared(b, m)
        else:
            self._dealloc(g0, g1, not private)
        if explicit and self.policy.prefault:
            self.prefault(g0, g1, private)

    def _dealloc(self, g0: int, g1: int, old: bool) -> None:
        mode = self.policy.dealloc
        if mode == "eager":
            self.free_range(old, g0, g1)
        elif mode == "aligned-2m":  # the blocks wholly inside the range
            first, last = (g0 + BLOCK_MASK) >> BLOCK_PAGES_SHIFT, g1 >> BLOCK_PAGES_SHIFT
            if first < last:
                self.free_range(old, first << BLOCK_PAGES_SHIFT, last << BLOCK_PAGES_SHIFT)
        elif self._mark_stale(g0, g1, old) and self.policy.lazy_limit:
            self._reclaim()

    # --- lazy dealloc: stale copies -----------------------------------------------------------

    def _mark_stale(self, g0: int, g1: int, side: bool) -> bool:
        pages, added, age = self.pools[side].pages, False, self.conversions
        for b, m in blocks_in(g0, g1, pages):
            base = b << BLOCK_PAGES_SHIFT
            for i in iter_bits(pages[b] & m):
                gfn = base + i
                if gfn not in self.stale:
                    self.stale[gfn] = age
                    self.stale_order.append((age, gfn))
                    added = True
        return added

    def _unstale(self, g0: int, g1: int, side: bool) -> None:
        """Copies on `side` in the range are live again (reused without allocation)."""
        if not self.stale:
            return
        pages = self.pools[side].pages
        for b, m in blocks_in(g0, g1, pages):
            base = b << BLOCK_PAGES_SHIFT
            for i in iter_bits(pages[b] & m):
                self.stale.pop(base + i, None)

    def _reclaim(self) -> None:
        limit_pages = self.policy.lazy_limit >> 12
        while len(self.stale) > limit_pages:
            age, gfn = self.stale_order.popleft()
            if self.stale.get(gfn) != age:
                continue  # reused or freed since
            side = not self.attrs.is_private(gfn)
            self.free_range(side, gfn, gfn + 1)

    # --- freeing ------------------------------------------------------------------------------

    def free_range(self, side: bool, g0: int, g1: int) -> None:
        pool = self.pools[side]
        for b, m in list(blocks_in(g0, g1, pool.pages)):
            gone, split = pool.remove(b, m)
            if not gone:
                continue
            self.count["memory.pages_freed"] += gone.bit_count()
            if split and (side is PRIVATE or self.inplace):
                self.count["gmem.folio_splits"] += 1
            if self.inplace:
                private_gone = gone & self.private_bitmap(b, gone)
                self.inplace_private -= private_gone.bit_count()
            else:
                other = self.pools[not side].pages.get(b, 0)
                self.duplicate -= (gone & other).bit_count()
            if self.stale:
                base = b << BLOCK_PAGES_SHIFT
                for i in iter_bits(gone):
                    self.stale.pop(base + i, None)
            if self.snp and (side is PRIVATE or self.inplace):
                self._rmp_shared(b, gone)

    def private_bitmap(self, block: int, mask: int) -> int:
        """Bitmap of the gfns of mask (in block) whose attribute is private."""
        base = block << BLOCK_PAGES_SHIFT
        bitmap = 0
        for lo, hi in self.attrs.private_runs(base, base + PAGES_PER_BLOCK):
            bitmap |= ((1 << (hi - lo)) - 1) << (lo - base)
        return bitmap & mask

    def _rmp_shared(self, block: int, mask: int) -> None:
        n, huge = self.rmp.make_shared(block, mask)
        if n or huge:
            self.directmap.on_rmp_update(block, False, huge, self.rmp.private_bitmap(block))

    # --- allocation and mapping ---------------------------------------------------------------

    def _allocated(self, side: bool, block: int, new: int) -> None:
        if not new:
            return
        self.count["memory.pages_allocated"] += new.bit_count()
        self.grew = True
        if self.inplace:
            self.inplace_private += self.private_bitmap(block, new).bit_count()
        else:
            self.duplicate += (new & self.pools[not side].pages.get(block, 0)).bit_count()
        seen = self.touched.get(block, 0)
        fresh = new & ~seen
        if fresh:
            self.touched[block] = seen | fresh
            self.touched_pages += fresh.bit_count()

    def populate(self, side: bool, block: int, mask: int) -> None:
        """Single 4 KiB pages (host population): no folio."""
        self._allocated(side, block, self.pools[side].add(block, mask))

    def _page_size_2m(self, private: bool, slot: Slot) -> bool:
        pol = self.policy
        if private or (self.inplace and slot.gmem):
            return pol.gmem_page == "2m"
        return pol.shared_page == "2m"

    def map_gfn(self, gfn: int, private: bool, slot: Slot) -> None:
        """Map one gfn with the given privacy, allocating the backing it needs (npf, prefault)."""
        block, bit = gfn >> BLOCK_PAGES_SHIFT, 1 << (gfn & (BLOCK_MASK))
        pool = self.pools[private]
        huge_pages = self._page_size_2m(private, slot)
        inside = slot.holds_block(block)
        if huge_pages and inside and pool.folio(block) is Folio.NONE:
            new, whole = pool.add_folio(block), True
        else:
            new, whole = pool.add(block, bit), False
        self._allocated(private, block, new)
        if new and private and self.snp and not self.inplace:
            self._rmp_private_alloc(block, new, whole)
        base = block << BLOCK_PAGES_SHIFT
        huge = (huge_pages and inside and pool.folio(block) is Folio.INTACT
                and not (private and self.tdx)
                and not (private and self.snp and block in self.rmp.smashed)
                and self.attrs.is_uniform(base, base + PAGES_PER_BLOCK, private))
        if private and self.snp and not huge and block in self.rmp.huge:
            # RMP size mismatch: KVM PSMASHes, zaps the block, the access faults twice more
            self.rmp.smash(block)
            self.maps.zap_block(block)
            self.count["exits.vm.npf"] += 2
        if private and self.snp and self.inplace and self.rmp.make_private_4k(
                block, FULL if huge else bit):
            self.directmap.on_rmp_update(block, True, False, self.rmp.private_bitmap(block))
        if huge:
            self.maps.map_huge(block, private)
            self.count["mappings.2m"] += 1
        else:
            self.maps.map_small(block, bit, private)
            self.count["mappings.4k"] += 1

    def map_small_many(self, block: int, mask: int, private: bool, slot: Slot) -> None:
        """Map the gfns of mask at 4 KiB, as map_gfn would one by one once the block's level is
        known to be 4 KiB and its RMP entry is not 2 MiB (the batch path's bulk case)."""
        pool = self.pools[private]
        if (self._page_size_2m(private, slot) and slot.holds_block(block)
                and pool.folio(block) is Folio.NONE):
            new, whole = pool.add_folio(block), True
        else:
            new, whole = pool.add(block, mask), False
        self._allocated(private, block, new)
        if private and self.snp:
            if self.inplace:
                if self.rmp.make_private_4k(block, mask):
                    self.directmap.on_rmp_update(block, True, False,
                                                 self.rmp.private_bitmap(block))
            elif new:
                self._rmp_private_alloc(block, new, whole)
        side = self.maps.small[private]
        side[block] = side.get(block, 0) | mask
        self.count["mappings.4k"] += mask.bit_count()

    def _rmp_private_alloc(self, block: int, new: int, whole: bool) -> None:
        if whole and not self.rmp.private_bitmap(block):
            self.rmp.make_private_2m(block)
            self.directmap.on_rmp_update(block, True, True, FULL)
        elif self.rmp.make_private_4k(block, new):
            self.directmap.on_rmp_update(block, True, False, self.rmp.private_bitmap(block))

    def prefault(self, g0: int, g1: int, private: bool) -> None:
        """KVM_PRE_FAULT_MEMORY over the range: map every page that lies in a usable memslot.

        Page by page in address order, a block at a time: the first unmapped page settles the
        block's level (and may PSMASH and zap the block); the pages after it that are then
        unmapped are mapped at 4 KiB together, exactly as one map_gfn call each would.
        """
        slots = [s for s in self.slots.overlapping(g0, g1) if s.gmem or not private]
        self.check_populate_limit("prefault", g0, g1, slots)
        for slot in slots:
            for block, mask in block_spans(max(g0, slot.start), min(g1, slot.end)):
                todo = mask & ~self.maps.mapped_bitmap(block)[private]
                if not todo:
                    continue
                first = (todo & -todo).bit_length() - 1
                self.map_gfn((block << BLOCK_PAGES_SHIFT) + first, private, slot)
                if self.maps.huge.get(block) == private:
                    continue
                rest = mask & ~((2 << first) - 1) & ~self.maps.mapped_bitmap(block)[private]
                if rest:
                    self.map_small_many(block, rest, private, slot)

    def check_populate_limit(self, what: str, g0: int, g1: int, slots: list[Slot]) -> None:
        """The model keeps state per touched block: one event may populate at most 1 TiB."""
        pages = sum(min(g1, s.end) - max(g0, s.start) for s in slots)
        if pages > POPULATE_LIMIT_PAGES:
            raise InputError(f"{what} of {pages << 12:#x} bytes at gpa {g0 << 12:#x} would "
                             "populate more than the model's limit of 1 TiB in one event")

    # --- measurements -------------------------------------------------------------------------

    def memory_pages(self) -> tuple[int, int, int]:
        """(shared, private, duplicate) resident pages now."""
        if self.inplace:
            resident = self.pools[0].count
            return resident - self.inplace_private, self.inplace_private, 0
        return self.pools[0].count, self.pools[1].count, self.duplicate

    def check_invariants(self) -> None:
        self.slots.check_invariants()
        self.attrs.check_invariants()
        for pool in set(self.pools):
            pool.check_invariants()
        self.maps.check_invariants()
        self.rmp.check_invariants()
        self.directmap.check_invariants(self.rmp.private)
        assert min(self.count.values(), default=0) >= 0, "a counter went negative"
        shared, private = self.pools
        if not self.inplace:
            dup = sum((m & private.pages.get(b, 0)).bit_count() for b, m in shared.pages.items())
            assert dup == self.duplicate, f"duplicate {self.duplicate} != {dup}"
        else:
            priv = sum(self.private_bitmap(b, m).bit_count() for b, m in shared.pages.items())
            assert priv == self.inplace_private, f"inplace private {self.inplace_private} != {priv}"
        for block in self.maps.blocks():
            m_shared, m_private = self.maps.mapped_bitmap(block)
            for side, bitmap in ((SHARED, m_shared), (PRIVATE, m_private)):
                backed = self.pools[side].pages.get(block, 0)
                assert bitmap & ~backed == 0, f"block {block}: mapped but unbacked"
                priv = self.private_bitmap(block, bitmap)
                assert priv == (bitmap if side else 0), f"block {block}: mapping != attribute"
        for gfn, _age in self.stale.items():
            side = not self.attrs.is_private(gfn)
            bit = 1 << (gfn & BLOCK_MASK)
            assert self.pools[side].resident(gfn >> BLOCK_PAGES_SHIFT, bit), f"stale {gfn} gone"
        if self.snp and not self.inplace:
            assert self.rmp.private == self.pools[PRIVATE].pages, "RMP-private != guest_memfd"
        assert sum(m.bit_count() for m in self.touched.values()) == self.touched_pages
