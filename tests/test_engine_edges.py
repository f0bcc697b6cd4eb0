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
