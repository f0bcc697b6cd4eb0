"""The simulated machine of docs/model.md: state and the operations events are made of.

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
from upmtrace.model.vfio import Vfio
from upmtrace.policy import Policy
from upmtrace.trace.schema import PAGES_PER_BLOCK, Platform

SHARED, PRIVATE = False, True
POPULATE_LIMIT_PAGES = 1 << 28  # 1 TiB of 4 KiB pages
BLOCK_MASK = PAGES_PER_BLOCK - 1


class Machine:
    def __init__(self, policy: Policy, platform: Platform) -> None:
        self.policy = policy
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
        self.vfio = Vfio(policy.vfio)
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
            self._dma_unmap([(old.start, old.end)])
            for side in (SHARED, PRIVATE):
                self.free_range(side, old.start, old.end)
        if npages:
            slot = Slot(slot_id, start, start + npages, gmem)
            self.slots.add(slot)
            mode = self.vfio.mode
            if mode == "pin-all" or (mode == "on-convert" and not gmem):
                self._dma_map_slot(slot)

    # --- vfio: DMA mappings of an assigned device -----------------------------------------------

    def _dma_map_slot(self, slot: Slot) -> None:
        """VFIO_IOMMU_MAP_DMA of a whole slot: its shared side allocated (folios where the
        shared page size is 2m) and pinned."""
        self.vfio.map_calls += 1
        self.check_populate_limit("vfio DMA map", slot.start, slot.end, [slot])
        pool, huge = self.pools[SHARED], self._page_size_2m(SHARED, slot)
        for block, mask in block_spans(slot.start, slot.end):
            if huge and slot.holds_block(block) and pool.folio(block) is Folio.NONE:
                self._allocated(SHARED, block, pool.add_folio(block))
            else:
                self.populate(SHARED, block, mask)
            self._pin(block, mask)

    def _pin(self, block: int, mask: int) -> None:
        if self.vfio.pin(block, mask):
            self.grew = True  # the pinned peak is taken with the memory figures

    def _dma_unmap(self, spans: list[tuple[int, int]]) -> None:
        """VFIO_IOMMU_UNMAP_DMA of the spans (one call) if any page of them is pinned."""
        if self.vfio.pinned and any(self.vfio.pinned_in(lo, hi) for lo, hi in spans):
            self.vfio.unmap_calls += 1
            for lo, hi in spans:
                self.vfio.unpin(lo, hi)

    def _dma_follow(self, g0: int, g1: int, private: bool) -> None:
        """vfio=on-convert: the VMM's DMA mappings of guest_memfd slots follow the attribute."""
        if self.vfio.mode != "on-convert":
            return
        spans = [(max(g0, s.start), min(g1, s.end))
                 for s in self.slots.overlapping(g0, g1) if s.gmem]
        if private:
            self._dma_unmap(spans)
            return
        if sum(self.vfio.pinned_in(lo, hi) for lo, hi in spans) == sum(hi - lo for lo, hi in spans):
            return  # already mapped (nothing to map, or QEMU's "already shared")
        self.vfio.map_calls += 1
        for lo, hi in spans:
            self.check_populate_limit("vfio DMA map", lo, hi, self.slots.overlapping(lo, hi))
            for block, mask in block_spans(lo, hi):
                shared = mask & ~self.private_bitmap(block, mask)
                if shared:
                    self.populate(SHARED, block, shared)
                    self._pin(block, shared)

    # --- attributes and conversion ----------------------------------------------------------

    def set_attributes(self, g0: int, g1: int, private: bool) -> None:
        """One KVM_SET_MEMORY_ATTRIBUTES call; zaps when anything changed."""
        self.count["conversions.set_attributes_calls"] += 1
        changed = self.attrs.set_range(g0, g1, private)
        if not changed:
            return
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
        if self.lazy:
            self._revive(changed, private)

    def set_attributes_row(self, g0: int, g1: int, private: bool) -> None:
        """The VMM marking memory on its own (QEMU at slot creation): no exit, nothing freed."""
        self.set_attributes(g0, g1, private)
        self._dma_follow(g0, g1, private)

    def convert(self, g0: int, g1: int, private: bool, explicit: bool) -> None:
        """A VMM conversion: set attributes, follow with DMA mappings, free the old side's copy
        by policy, prefault."""
        self.set_attributes(g0, g1, private)
        self._dma_follow(g0, g1, private)
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
        pinned = self.vfio.pinned if side is SHARED else {}  # pinned: never reclaimed
        for b, m in blocks_in(g0, g1, pages):
            base = b << BLOCK_PAGES_SHIFT
            for i in iter_bits(pages[b] & m & ~pinned.get(b, 0)):
                gfn = base + i
                if gfn not in self.stale:
                    self.stale[gfn] = age
                    self.stale_order.append((age, gfn))
                    added = True
        return added

    def _revive(self, changed: list[tuple[int, int]], side: bool) -> None:
        """The pages whose attribute just changed to `side`: their copy there is live again
        (reused without allocation). A stale copy always lies on the side opposite the
        attribute, so `stale` keyed by gfn names one copy; pages whose attribute did not change
        keep the stale entry of their other copy, and its age."""
        if not self.stale:
            return
        pages = self.pools[side].pages
        for lo, hi in changed:
            for b, m in blocks_in(lo, hi, pages):
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
        pinned = self.vfio.pinned if side is SHARED or self.inplace else {}
        for b, m in list(blocks_in(g0, g1, pool.pages)):
            gone, split = pool.remove(b, m & ~pinned.get(b, 0))  # discarding a pinned page fails
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
            if self.stale:  # only copies on the side opposite the attribute can be stale
                attr_private = self.private_bitmap(b, gone)
                base = b << BLOCK_PAGES_SHIFT
                for i in iter_bits(gone & (~attr_private if side else attr_private)):
                    self.stale.pop(base + i, None)
            if self.snp and (side is PRIVATE or self.inplace):
                self._rmp_shared(b, gone)

    def private_bitmap(self, block: int, mask: int) -> int:
        """Bitmap of the gfns of mask (in block) whose attribute is private."""
        return self.attrs.block_bitmap(block << BLOCK_PAGES_SHIFT, PAGES_PER_BLOCK) & mask

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

    def populate_private(self, g0: int, g1: int) -> None:
        """kvm_gmem_populate over [g0, g1) (launch images): private pages of guest_memfd slots
        not yet resident become single 4 KiB pages; other pages are refused and skipped."""
        slots = [s for s in self.slots.overlapping(g0, g1) if s.gmem]
        self.check_populate_limit("populate", g0, g1, slots)
        eligible = 0
        for slot in slots:
            for block, mask in block_spans(max(g0, slot.start), min(g1, slot.end)):
                private = self.private_bitmap(block, mask)
                eligible += private.bit_count()
                new = self.pools[PRIVATE].add(block, private)
                if new:
                    self._populated(block, new)
        self.count["populate.skipped_pages"] += (g1 - g0) - eligible

    def _populated(self, block: int, new: int) -> None:
        self._allocated(PRIVATE, block, new)
        self.count["populate.pages"] += new.bit_count()
        if self.snp and self.rmp.make_private_launch(block, new):
            self.directmap.on_rmp_update(block, True, False, self.rmp.private_bitmap(block))
        elif self.tdx:  # added to the Secure EPT: mapped private at 4 KiB
            self.maps.map_small(block, new, PRIVATE)
            self.count["mappings.4k"] += new.bit_count()

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
            pinned = self.vfio.bitmap(gfn >> BLOCK_PAGES_SHIFT) & bit
            assert side is PRIVATE or not pinned, f"stale shared copy {gfn} is pinned"
        if self.snp and not self.inplace:
            assert self.rmp.private == self.pools[PRIVATE].pages, "RMP-private != guest_memfd"
        assert sum(m.bit_count() for m in self.touched.values()) == self.touched_pages
        self.vfio.check_invariants(self.pools[SHARED].pages)
