"""Scenario tests at the edges of the model's rules: each pins exact counters that a one-line
change to upmtrace/model/ would alter (found by the oracle differential and by mutation testing,
scripts/mutation.sh)."""

from __future__ import annotations

import pytest
from scenario import (
    K,
    M,
    attrs,
    engine,
    expect,
    host,
    map_gpa,
    memory,
    memslot,
    npf,
    populate,
    psc,
    replay,
)

from upmtrace.errors import InputError
from upmtrace.model import machine
from upmtrace.model.attributes import AttributeMap
from upmtrace.model.bits import FULL, block_spans, blocks_in
from upmtrace.model.directmap import DirectMap, Region
from upmtrace.model.mappings import Mappings
from upmtrace.model.memslots import Memslots, Slot
from upmtrace.model.pool import Folio, Pool
from upmtrace.model.rmp import Rmp
from upmtrace.model.vfio import Vfio

SLOT = memslot(0, 0, 4 * M)  # two 2 MiB blocks, guest_memfd
PRIVATE_SLOT = (SLOT, attrs(0, 4 * M))  # as QEMU creates it: all private


# --- found by the oracle differential (tests/test_oracle.py) --------------------------------

def test_a_stale_copy_stays_stale_when_only_other_pages_change_attribute():
    """Lazy dealloc, limit 4 pages. A shared conversion of 16 pages that are already shared
    leaves their private copies stale (12 reclaimed at once, 4 left). A set_attributes row over
    them changes one other page (297): the 4 private copies are still stale (none was converted
    back), so the next stale copy (page 251) pushes the oldest of them (page 246) out."""
    r = replay(SLOT, npf(297 * 4 * K, True), psc(234 * 4 * K, 64 * K, "shared"),
               attrs(0, 2 * M, False), psc(251 * 4 * K, 4 * K, "shared", req=-1),
               policy="lazy", lazy_limit=16 * K, gmem_page="2m", prefault=True)
    expect(r, exits__userspace__KVM_EXIT_MEMORY_FAULT=1, exits__userspace__KVM_EXIT_HYPERCALL=2,
           exits__userspace_total=3, exits__vm__npf=4, exits__vm__vmgexit=2, exits__vm_total=6,
           npf__recorded=1, conversions__implicit=1, conversions__set_attributes_calls=4,
           conversions__to_private_pages=1, conversions__to_shared_pages=1, psc__requests=2,
           psc__entries=2, gmem__folio_splits=1, rmp__updates_4k=13, rmp__updates_2m=1,
           rmp__psmash=1, directmap__splits=1, mappings__4k=18)
    mem = memory(r)
    assert (mem["peak_resident"], mem["final_resident"], mem["pages_freed"]) == (516, 516, 13)


# --- 2 MiB mappings: the edges of the rules ----------------------------------------------------

def test_a_block_private_but_for_its_last_page_maps_at_4k():
    """The uniformity check covers all 512 pages: page 511 shared keeps page 0 at 4 KiB (its
    2 MiB RMP entry is then PSMASHed, as for any 4 KiB private mapping in it)."""
    r = replay(SLOT, attrs(0, 2 * M - 4 * K), npf(0, True), gmem_page="2m")
    expect(r, exits__vm__npf=3, exits__vm_total=3, npf__recorded=1,
           conversions__set_attributes_calls=1, conversions__to_private_pages=511,
           rmp__updates_2m=1, rmp__psmash=1, mappings__4k=1)


def test_a_block_private_up_to_its_last_page_maps_at_2m():
    """A private run ending exactly at the block's end (and the slot's) makes it uniform."""
    r = replay(SLOT, attrs(0, 2 * M), npf(0, True), npf(2 * M - 4 * K, True), gmem_page="2m")
    expect(r, exits__vm__npf=1, exits__vm_total=1, npf__recorded=2, npf__avoided=1,
           conversions__set_attributes_calls=1, conversions__to_private_pages=512,
           rmp__updates_2m=1, mappings__2m=1)


def test_a_shared_block_just_below_a_private_run_maps_at_2m():
    """A private run starting exactly at the next block leaves this block uniformly shared."""
    r = replay(SLOT, attrs(2 * M, 2 * M), npf(0, False), npf(2 * M - 4 * K, False),
               shared_page="2m")
    expect(r, exits__vm__npf=1, exits__vm_total=1, npf__recorded=2, npf__avoided=1,
           conversions__set_attributes_calls=1, conversions__to_private_pages=512,
           mappings__2m=1)


def test_a_psmash_on_mapping_zaps_every_mapping_of_the_block():
    """A 2 MiB RMP entry, then mixed attributes (no dealloc: set_attributes frees nothing); page
    511 mapped shared; a private fault on page 0 PSMASHes the entry and zaps the whole block,
    so the shared access to page 511 faults again instead of being avoided."""
    r = replay(*PRIVATE_SLOT, npf(0, True), attrs(2 * M - 4 * K, 4 * K, False),
               npf(2 * M - 4 * K, False), npf(0, True), npf(2 * M - 4 * K, False),
               gmem_page="2m")
    expect(r, exits__vm__npf=6, exits__vm_total=6, npf__recorded=4,
           conversions__set_attributes_calls=2, conversions__to_private_pages=1024,
           conversions__to_shared_pages=1, rmp__updates_2m=1, rmp__psmash=1,
           mappings__2m=1, mappings__4k=3)


# --- the RMP's 2 MiB entries over a block's life (found by mutation testing) ------------------

def test_a_block_freed_whole_and_reallocated_gets_a_new_2m_rmp_entry_and_maps_at_2m():
    """PSMASHed when page 1 is freed, then freed whole: its next folio is allocated while the
    block is wholly RMP-shared, so it takes one 2 MiB update and maps at 2 MiB again."""
    r = replay(*PRIVATE_SLOT, npf(0, True), psc(4 * K, 4 * K, "shared"),
               psc(0, 2 * M, "shared", req=2), psc(0, 2 * M, "private", req=3), npf(0, True),
               gmem_page="2m")
    expect(r, exits__userspace__KVM_EXIT_HYPERCALL=3, exits__userspace_total=3,
           exits__vm__npf=2, exits__vm__vmgexit=3, exits__vm_total=5, npf__recorded=2,
           conversions__set_attributes_calls=4, conversions__to_private_pages=1536,
           conversions__to_shared_pages=512, psc__requests=3, psc__entries=3,
           gmem__folio_splits=1, rmp__updates_4k=512, rmp__updates_2m=2, rmp__psmash=1,
           directmap__splits=1, mappings__2m=2)


def test_a_psmashed_block_maps_at_4k_even_once_its_attributes_are_uniform_again():
    r = replay(*PRIVATE_SLOT, npf(0, True), npf(2 * M, True),
               attrs(2 * M - 4 * K, 4 * K, False), npf(0, True),  # PSMASH on mapping
               attrs(2 * M - 4 * K, 4 * K, True), npf(4 * K, True),  # uniform: still 4 KiB
               psc(2 * M + 4 * K, 4 * K, "shared"),  # PSMASH on freeing, in block 1
               gmem_page="2m")
    expect(r, exits__userspace__KVM_EXIT_HYPERCALL=1, exits__userspace_total=1,
           exits__vm__npf=6, exits__vm__vmgexit=1, exits__vm_total=7, npf__recorded=4,
           conversions__set_attributes_calls=4, conversions__to_private_pages=1025,
           conversions__to_shared_pages=2, psc__requests=1, psc__entries=1,
           gmem__folio_splits=1, rmp__updates_4k=1, rmp__updates_2m=2, rmp__psmash=2,
           directmap__splits=1, mappings__4k=2, mappings__2m=2)


@pytest.mark.parametrize("directmap", ["split", "unmap"])
def test_inplace_freeing_pages_the_guest_never_took_private_touches_no_rmp(directmap):
    r = replay(SLOT, host(0, 8 * K), memslot(0, 0, 0), policy="inplace", directmap=directmap)
    expect(r, host_access__pages=2)
    assert (memory(r)["peak_resident"], memory(r)["final_resident"]) == (2, 0)


def test_unmap_restores_a_region_only_once_its_last_private_page_is_freed_every_time():
    """Block 1, directmap=unmap: two private pages split the region once; freeing the first
    leaves it split (a third private page splits nothing), freeing the others restores it; a
    private page again splits it again, and freeing it restores it again."""
    r = replay(*PRIVATE_SLOT, npf(2 * M, True), npf(2 * M + 4 * K, True),
               psc(2 * M, 4 * K, "shared"), npf(2 * M + 8 * K, True),
               psc(2 * M + 4 * K, 8 * K, "shared", req=2),
               npf(2 * M, True), psc(2 * M, 4 * K, "shared", req=3), directmap="unmap")
    expect(r, exits__userspace__KVM_EXIT_MEMORY_FAULT=1, exits__userspace__KVM_EXIT_HYPERCALL=3,
           exits__userspace_total=4, exits__vm__npf=5, exits__vm__vmgexit=3, exits__vm_total=8,
           npf__recorded=4, conversions__implicit=1, conversions__set_attributes_calls=5,
           conversions__to_private_pages=1025, conversions__to_shared_pages=4,
           psc__requests=3, psc__entries=3, rmp__updates_4k=8, directmap__splits=2,
           directmap__restores=2, mappings__4k=4)


def test_split_counts_each_region_once_and_never_restores():
    r = replay(*PRIVATE_SLOT, npf(0, True), npf(4 * K, True), npf(2 * M, True),
               psc(0, 8 * K, "shared"), npf(0, True))
    assert (r.get("directmap.splits"), r.get("directmap.restores")) == (2, 0)


def test_prefault_of_private_pages_uses_the_gmem_page_size_not_the_shared_one():
    """gmem_page 4k, shared_page 2m: prefaulting 4 private pages allocates 4 single pages."""
    r = replay(*PRIVATE_SLOT, psc(0, 16 * K, "private"), policy="prefault", shared_page="2m")
    assert r.get("mappings.4k") == 4 and r.get("mappings.2m") == 0
    assert (memory(r)["peak_private"], memory(r)["peak_shared"]) == (4, 0)


# --- mutants of machine.py: the populate limit --------------------------------------------------

T = 1 << 40
OVER = ("0x20000000000 bytes at gpa 0x40000000000 would populate more than the model's limit of "
        "1 TiB in one event")


@pytest.mark.parametrize("rows, knobs, what", [
    ((memslot(0, 4 * T, 2 * T), populate(4 * T, 2 * T)), {}, "populate"),
    ((memslot(0, 4 * T, 2 * T), map_gpa(4 * T, 2 * T, True)), {"prefault": True}, "prefault"),
    ((memslot(0, 4 * T, 2 * T),), {"vfio": "pin-all"}, "vfio DMA map"),
    ((memslot(0, 4 * T, 2 * T), map_gpa(4 * T, 2 * T, False)), {"vfio": "on-convert"},
     "vfio DMA map"),
])
def test_an_event_over_the_populate_limit_is_refused_with_its_size_and_address(rows, knobs, what):
    """A 2 TiB slot at 4 TiB: the event names itself, its size and address in bytes."""
    with pytest.raises(InputError) as refused:
        replay(*rows, **knobs)
    assert str(refused.value) == f"{what} of {OVER}"


def test_the_populate_limit_is_inclusive(monkeypatch):
    """Exactly the limit populates (lowered here: populating 1 TiB takes seconds), one page more
    is refused."""
    monkeypatch.setattr(machine, "POPULATE_LIMIT_PAGES", 4)
    r = replay(memslot(0, 2 * M, 2 * M), attrs(2 * M, 2 * M), populate(2 * M, 16 * K))
    assert r.get("populate.pages") == 4
    with pytest.raises(InputError) as refused:
        replay(memslot(0, 2 * M, 2 * M), attrs(2 * M, 2 * M), populate(2 * M, 20 * K))
    assert str(refused.value) == ("populate of 0x5000 bytes at gpa 0x200000 would populate more "
                                  "than the model's limit of 1 TiB in one event")


# --- mutants of machine.py: the invariant checker (every scenario replays with it) -------------

def broken_pinned_stale(m) -> None:
    m.stale[1] = 1  # S1 is pinned: it cannot be a stale copy


def broken_mapping(m) -> None:
    m.maps.small[1][1] = 1  # P512 mapped, not resident


@pytest.mark.parametrize("rows, knobs, corrupt, message", [
    ((*PRIVATE_SLOT, psc(0, 8 * K, "private")), {"policy": "lazy", "vfio": "pin-all"},
     broken_pinned_stale, "stale shared copy 1 is pinned"),
    (PRIVATE_SLOT, {}, broken_mapping, "block 1: mapped but unbacked"),
    (PRIVATE_SLOT, {}, lambda m: m.count.update({"npf.recorded": -1}),
     "a counter went negative"),
    ((*PRIVATE_SLOT, npf(0, True)), {}, lambda m: m.rmp.private.update({0: 0b11}),
     "RMP-private != guest_memfd"),
    (PRIVATE_SLOT, {}, lambda m: m.pools[0].pages.update({5: 0}), "shared: empty bitmap kept"),
    (PRIVATE_SLOT, {}, lambda m: m.pools[1].pages.update({5: 0}), "private: empty bitmap kept"),
])
def test_the_invariant_checker_catches_a_broken_state(rows, knobs, corrupt, message):
    m = engine(*rows, **knobs).m
    m.check_invariants()
    corrupt(m)
    with pytest.raises(AssertionError) as caught:
        m.check_invariants()
    assert str(caught.value) == message

# --- mutants of pool/mappings/attributes/memslots/vfio/rmp/directmap/bits (mutation testing) --
# The parts' self-checks (run after every event in paranoid mode): each test builds a part in a
# valid state, checks it passes, then corrupts one field at a time and expects the check to fail
# with its message.

def _fails(check, match: str | None = None, error: type[Exception] = AssertionError) -> None:
    with pytest.raises(error, match=match):
        check()


def test_pool_self_check_catches_a_wrong_count_an_empty_bitmap_and_a_bad_folio():
    pool = Pool("private")
    pool.add_folio(0)
    pool.add_folio(1)
    assert pool.remove(1, 1) == (1, True)  # block 1: a split folio, 511 pages
    pool.add(2, 0b11)  # block 2: single pages, no folio
    pool.check_invariants()
    pool.count += 1
    _fails(pool.check_invariants, "private")
    pool.count -= 1
    pool.pages[3] = 0
    _fails(pool.check_invariants, "private: empty bitmap kept")
    del pool.pages[3]
    pool.folios[5] = Folio.SPLIT
    _fails(pool.check_invariants, "private: folio of block 5 without pages")
    del pool.folios[5]
    pool.pages[0] &= ~1
    pool.count -= 1
    _fails(pool.check_invariants, "private: intact folio 0 not full")


def test_pool_remove_returns_what_it_freed_and_whether_an_intact_folio_split():
    pool = Pool("shared")
    assert pool.remove(7, FULL) == (0, False)  # nothing resident there
    assert pool.count == 0 and not pool.pages
    pool.add_folio(0)
    gone, split = pool.remove(0, 0b110)
    assert (gone, split) == (0b110, True) and split is True
    assert pool.folio(0) is Folio.SPLIT and pool.count == 510
    gone, split = pool.remove(0, 0b111)  # only page 0 of those is still resident
    assert gone == 1 and split is False
    assert pool.folio(0) is Folio.SPLIT
    pool.add(1, 0b1)
    assert pool.remove(1, 0b10) == (0, False)  # no resident page of the mask
    assert pool.resident(1, 1) and not pool.resident(1, 2) and not pool.resident(9, 1)


def test_mappings_self_check_catches_double_maps_and_stale_4k_entries():
    maps = Mappings()
    maps.map_small(0, 0b01, False)
    maps.map_small(0, 0b10, True)  # block 0: both sides, disjoint
    maps.map_small(1, 1, False)
    maps.map_small(2, 4, True)
    maps.map_huge(3, True)
    maps.check_invariants()
    for corrupt, match in ((lambda: maps.small[1].__setitem__(0, 0b11), "block 0 mapped twice"),
                           (lambda: maps.small[0].__setitem__(3, 1), "^3$"),
                           (lambda: maps.small[1].__setitem__(3, 1), "^3$"),
                           (lambda: maps.small[0].__setitem__(7, 0), None),
                           (lambda: maps.small[1].__setitem__(7, 0), None)):
        saved = (dict(maps.small[0]), dict(maps.small[1]))
        corrupt()
        _fails(maps.check_invariants, match)
        for side, table in zip(maps.small, saved, strict=True):
            side.clear()
            side.update(table)
        maps.check_invariants()


def test_attribute_map_self_check_catches_empty_touching_and_unpaired_runs():
    attrs = AttributeMap()
    attrs.set_range(0, 5, True)
    attrs.set_range(10, 20, True)
    attrs.check_invariants()
    attrs._ends[0] = 0
    _fails(attrs.check_invariants, "empty private run 0..0")
    attrs._ends[0] = 10
    _fails(attrs.check_invariants, "^private runs overlap or touch unmerged$")
    attrs._ends[0] = 5
    attrs._starts.append(30)
    _fails(attrs.check_invariants, "zip", ValueError)


def test_memslots_self_check_catches_overlaps_empty_slots_and_a_tree_out_of_step():
    slots = Memslots()
    slots.add(Slot(1, 512, 1024, True))  # added above the other: the check sorts by start
    slots.add(Slot(0, 0, 512, False))  # adjacent, not overlapping
    slots.check_invariants()
    bad = Slot(2, 1000, 2000, True)
    slots._by_id[2] = bad  # only in the id map
    _fails(slots.check_invariants)
    slots._tree.addi(bad.start, bad.end, bad)
    _fails(slots.check_invariants, "memslots 1 and 2 overlap")
    slots.remove(2)
    slots.remove(1)
    slots.check_invariants()
    slots._by_id[3] = Slot(3, 100, 200, True)
    slots._tree.addi(100, 200, slots._by_id[3])
    _fails(slots.check_invariants, "memslots 0 and 3 overlap")  # one pair, adjacent in order
    slots.remove(3)
    empty = Slot(4, 4096, 4096, True)
    slots._by_id[4] = empty
    slots._tree.addi(4096, 4097, empty)
    _fails(slots.check_invariants)


def test_vfio_self_check_catches_pins_without_vfio_empty_bitmaps_counts_and_unbacked_pins():
    resident = {0: FULL}
    vfio = Vfio("pin-all")
    vfio.pin(0, 0b101)
    vfio.check_invariants(resident)
    vfio.pinned[4] = 0
    _fails(lambda: vfio.check_invariants(resident), "^vfio: empty bitmap kept$")
    del vfio.pinned[4]
    vfio.count += 1
    _fails(lambda: vfio.check_invariants(resident), "^vfio count$")
    vfio.count -= 1
    vfio.pin(1, 1)  # block 1 holds no resident page
    _fails(lambda: vfio.check_invariants(resident), "block 1: pinned but not resident")
    none = Vfio("none")
    none.check_invariants({})
    none.pin(0, 1)
    _fails(lambda: none.check_invariants(resident), "^pinned pages without vfio$")


def test_vfio_pin_counts_only_the_pages_it_newly_pins():
    vfio = Vfio("pin-all")
    assert vfio.pin(0, 0b11) == 2
    assert vfio.pin(0, 0b11) == 0
    assert vfio.pin(0, 0b110) == 1
    assert (vfio.count, vfio.pages_pinned, vfio.bitmap(0), vfio.bitmap(1)) == (3, 3, 0b111, 0)


def test_rmp_self_check_catches_a_partial_2m_entry_a_smashed_2m_entry_and_an_empty_bitmap():
    rmp = Rmp()
    rmp.make_private_2m(0)
    rmp.make_private_4k(1, 0b1)
    rmp.check_invariants()
    rmp.private[0] = FULL >> 1
    _fails(rmp.check_invariants, "2 MiB RMP entry 0 not wholly private")
    rmp.private[0] = FULL
    rmp.smashed.add(0)
    _fails(rmp.check_invariants)
    rmp.smashed.discard(0)
    rmp.private[2] = 0
    _fails(rmp.check_invariants)


def test_rmp_make_shared_returns_its_4k_updates_and_whether_it_freed_a_2m_entry():
    rmp = Rmp()
    assert rmp.private_bitmap(0) == 0 and rmp.private_bitmap(0) is not None
    assert rmp.make_shared(0, FULL) == (0, False)  # nothing private there
    rmp.make_private_2m(0)
    assert rmp.make_shared(0, FULL) == (0, True)  # one 2 MiB update, no 4 KiB one
    assert (rmp.updates_4k, rmp.updates_2m, rmp.private_bitmap(0)) == (0, 2, 0)


def test_directmap_self_check_catches_regions_without_private_pages_and_splits_under_none():
    unmap = DirectMap("unmap")
    unmap.on_rmp_update(0, True, False, 1)
    unmap.check_invariants({0: 1})
    _fails(lambda: unmap.check_invariants({}), "region 0 unmapped with no private page")
    split = DirectMap("split")
    split.on_rmp_update(0, True, False, 1)
    split.on_rmp_update(0, False, False, 0)  # split never restores: a region, no private page
    split.check_invariants({})
    none = DirectMap("none")
    none.on_rmp_update(0, True, False, 1)
    none.check_invariants({})
    none.splits = 1
    _fails(lambda: none.check_invariants({}))
    none.splits, none.regions[0] = 0, Region.SPLIT
    _fails(lambda: none.check_invariants({}))


def test_directmap_unmap_region_states_over_a_blocks_life():
    """INTACT (absent) -> SPLIT on a 4 KiB private update; REMOVED on a 2 MiB one; a 4 KiB
    free in a REMOVED region maps the freed pages back at 4 KiB (SPLIT); the last private page
    gone restores the region."""
    dm = DirectMap("unmap")
    dm.on_rmp_update(0, True, False, 1)
    dm.on_rmp_update(1, True, True, FULL)
    assert dm.regions == {0: Region.SPLIT, 1: Region.REMOVED} and dm.splits == 1
    dm.on_rmp_update(1, False, False, FULL >> 1)
    assert dm.regions[1] is Region.SPLIT
    dm.on_rmp_update(2, True, True, FULL)
    dm.on_rmp_update(2, False, True, 0)  # the 2 MiB entry freed whole
    dm.on_rmp_update(0, False, False, 0)
    assert dm.regions == {1: Region.SPLIT} and (dm.splits, dm.restores) == (1, 2)
    dm.on_rmp_update(3, True, True, FULL)
    dm.on_rmp_update(3, False, True, 1)  # a 2 MiB update that leaves a page (not a real one)
    assert dm.regions[3] is Region.REMOVED
    split = DirectMap("split")
    split.on_rmp_update(0, True, False, 1)
    assert split.regions == {0: Region.SPLIT}


def test_machine_self_check_catches_a_stale_copy_that_is_gone_or_pinned():
    """A stale copy lies on the side opposite the attribute, resident, and never pinned when
    it is shared (a pinned page cannot be discarded, so it is not counted as stale)."""
    m = engine(SLOT, vfio="pin-all").m  # the slot's shared side allocated and pinned
    m.check_invariants()
    m.stale[0] = 0  # gfn 0, shared: its stale copy would be private, and there is none
    _fails(m.check_invariants, "stale 0 gone")
    m.attrs.set_range(0, 1, True)  # now its stale copy is the shared page, pinned
    _fails(m.check_invariants, "stale shared copy 0 is pinned")


def test_a_dma_map_over_two_slots_past_the_limit_names_the_lower_one():
    """vfio=on-convert: a shared marking over two guest_memfd slots of just over 1 TiB each maps
    them slot by slot in address order; the first (at gpa 0) is refused."""
    tib = 1 << 40
    rows = (memslot(0, 0, tib + 4 * K), memslot(1, 2 * tib, tib + 20 * K),
            attrs(0, 4 * tib, private=False))
    with pytest.raises(InputError, match=r"vfio DMA map of 0x10000001000 bytes at gpa 0x0 "):
        replay(*rows, vfio="on-convert")


def test_machine_self_check_catches_an_unbacked_mapping_in_each_table():
    m = engine(SLOT).m
    m.check_invariants()
    for table in (m.maps.huge, *m.maps.small):
        table[1] = True if table is m.maps.huge else 1
        _fails(m.check_invariants, "block 1: mapped but unbacked")
        del table[1]
    m.check_invariants()


def test_attribute_block_bitmap_of_a_block_inside_one_private_run_is_the_full_block():
    attrs_ = AttributeMap()
    attrs_.set_range(0, 1024, True)
    assert attrs_.block_bitmap(512, 512) == FULL
    assert attrs_.block_bitmap(1024, 512) == 0


def test_memslots_refuse_a_slot_over_a_live_one_even_when_neither_end_falls_inside_it():
    slots = Memslots()
    slots.add(Slot(1, 100, 200, True))
    with pytest.raises(ValueError, match="^memslot 2 overlaps a live memslot$"):
        slots.add(Slot(2, 0, 512, True))
    slots.add(Slot(3, 200, 512, True))  # adjacent: accepted
    assert [s.id for s in slots.overlapping(0, 1 << 20)] == [1, 3]


@pytest.mark.parametrize("present", [{0: 1, 5: 1}, dict.fromkeys(range(700), 1)],
                         ids=["sparse", "dense"])
def test_blocks_in_gives_the_present_blocks_of_a_range_with_their_masks(present):
    """Either walk (the range's blocks, or the present ones) gives block_spans' answer."""
    ranges = [(0, 0), (3, 3), (1, 600 * 512), (0, 1024), (0, 1025), (513, 1024), (512, 2048),
              (700, 5 * 512 + 1), (5 * 512, 5 * 512 + 511), (10, 6 * 512 - 1), (0, 5 * 512)]
    for g0, g1 in ranges:
        want = [(b, m) for b, m in block_spans(g0, g1) if b in present] if g1 > g0 else []
        assert list(blocks_in(g0, g1, present)) == want, (g0, g1)
    assert list(blocks_in(1, 600 * 512, {0: 1, 5: 1})) == [(0, FULL - 1), (5, FULL)]
    assert list(blocks_in(700, 5 * 512 + 1, {0: 1, 5: 1})) == [(5, 1)]
