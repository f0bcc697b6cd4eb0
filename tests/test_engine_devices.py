"""Scenario tests for launch-time population, the RMP under inplace, and VFIO DMA mappings:
a handful of events each, with every counter the model must produce."""

from __future__ import annotations

import pytest
from scenario import (
    K,
    M,
    attrs,
    engine,
    expect,
    host,
    memory,
    memslot,
    npf,
    populate,
    psc,
    replay,
    replay_rows,
)

SLOT = memslot(0, 0, 4 * M)  # two 2 MiB blocks, guest_memfd
PRIVATE_SLOT = (SLOT, attrs(0, 4 * M))  # as QEMU creates it: all private


# --- launch-time population (kvm_gmem_populate) ----------------------------------------------

LAUNCH = [
    memslot(0, 0, 4 * M), memslot(1, 8 * M, 2 * M, gmem=False),
    attrs(0, 2 * M),  # block 0 private, block 1 shared
    populate(0, 16 * K),  # gfn 0-3: four single 4 KiB pages, RMP-private
    populate(0, 8 * K),  # already resident: nothing to do
    populate(2 * M - 4 * K, 8 * K),  # gfn 511 populated; gfn 512 is shared: skipped
    populate(8 * M, 4 * K),  # a slot without guest_memfd: skipped
    populate(64 * M, 4 * K),  # no slot: skipped
]


@pytest.mark.parametrize("reference", [True, False])
def test_populate_on_snp_makes_4k_rmp_entries_and_maps_nothing(reference):
    r = replay_rows([*LAUNCH, npf(0, True)], reference)
    expect(r, exits__vm__npf=1, exits__vm_total=1, npf__recorded=1,
           conversions__set_attributes_calls=1, conversions__to_private_pages=512,
           rmp__updates_4k=5, directmap__splits=1, mappings__4k=1,
           populate__calls=5, populate__pages=5, populate__skipped_pages=3)
    mem = memory(r)
    assert (mem["peak_private"], mem["peak_shared"], mem["touched"]) == (5, 0, 5)
    assert (mem["pages_allocated"], mem["final_resident"]) == (5, 5)


def test_populate_on_tdx_maps_the_pages_so_the_first_access_is_avoided():
    r = replay(*LAUNCH, npf(0, True), npf(16 * K, True), platform="tdx")
    expect(r, exits__vm__npf=1, exits__vm_total=1, npf__recorded=2, npf__avoided=1,
           conversions__set_attributes_calls=1, conversions__to_private_pages=512,
           mappings__4k=6, populate__calls=5, populate__pages=5, populate__skipped_pages=3)
    mem = memory(r)
    assert (mem["peak_private"], mem["pages_allocated"]) == (6, 6)


def test_populate_on_sw_maps_nothing():
    r = replay(*LAUNCH, npf(0, True), platform="sw")
    expect(r, exits__vm__npf=1, exits__vm_total=1, npf__recorded=1,
           conversions__set_attributes_calls=1, conversions__to_private_pages=512,
           mappings__4k=1, populate__calls=5, populate__pages=5, populate__skipped_pages=3)
    assert memory(r)["peak_private"] == 5


def test_populate_allocates_single_pages_even_with_2m_folios_and_keeps_the_block_at_4k():
    r = replay(*PRIVATE_SLOT, populate(0, 4 * K),
               npf(4 * K, True),  # the block gets its folio; its RMP entries stay 4 KiB
               npf(2 * M, True),  # block 1, never populated: 2 MiB folio, entry and mapping
               policy="hugepool")
    expect(r, exits__vm__npf=2, exits__vm_total=2, npf__recorded=2,
           conversions__set_attributes_calls=1, conversions__to_private_pages=1024,
           rmp__updates_4k=512, rmp__updates_2m=1, directmap__splits=1,
           mappings__4k=1, mappings__2m=1, populate__calls=1, populate__pages=1)
    mem = memory(r)
    assert (mem["peak_private"], mem["pages_allocated"]) == (1024, 1024)


def test_a_populated_block_maps_2m_again_after_a_new_2m_rmp_update():
    r = replay(*PRIVATE_SLOT, populate(0, 4 * K),
               psc(0, 2 * M, "shared", req=1),  # frees gfn 0: a 4 KiB update back
               psc(0, 2 * M, "private", req=2),
               npf(0, True),  # a fresh 2 MiB folio in a wholly shared block: 2 MiB entry
               gmem_page="2m")
    expect(r, exits__userspace__KVM_EXIT_HYPERCALL=2, exits__userspace_total=2,
           exits__vm__npf=1, exits__vm__vmgexit=2, exits__vm_total=3, npf__recorded=1,
           conversions__set_attributes_calls=3, conversions__to_private_pages=1536,
           conversions__to_shared_pages=512, psc__requests=2, psc__entries=2,
           rmp__updates_4k=2, rmp__updates_2m=1, directmap__splits=1, mappings__2m=1,
           populate__calls=1, populate__pages=1)


def test_populate_with_inplace_backing_on_snp():
    r = replay(*PRIVATE_SLOT, populate(0, 8 * K), npf(0, True), host(0, 4 * K),
               policy="inplace")
    expect(r, exits__vm__npf=1, exits__vm_total=1, npf__recorded=1,
           conversions__set_attributes_calls=1, conversions__to_private_pages=1024,
           rmp__updates_4k=2, directmap__splits=1, mappings__4k=1,
           host_access__pages=1, host_access__faults=1,
           populate__calls=1, populate__pages=2)
    mem = memory(r)
    assert (mem["peak_private"], mem["peak_shared"], mem["peak_duplicate"]) == (2, 0, 0)


@pytest.mark.parametrize(("mode", "splits"), [("split", 1), ("unmap", 1), ("none", 0)])
def test_populate_has_the_direct_map_effects_of_a_4k_update(mode, splits):
    r = replay(*PRIVATE_SLOT, populate(0, 4 * K), populate(2 * M, 4 * K), directmap=mode)
    assert (r.get("rmp.updates_4k"), r.get("directmap.splits")) == (2, 2 * splits)


# --- inplace and the RMP ---------------------------------------------------------------------

def test_inplace_set_attributes_leaves_the_rmp_and_a_conversion_to_shared_updates_it_back():
    rows = [*PRIVATE_SLOT, npf(0, True),  # R0 allocated, RMP-private when mapped
            attrs(0, 4 * K, private=False)]  # the attribute flips; the RMP entry stays
    eng = engine(*rows, policy="inplace")
    assert eng.m.rmp.private == {0: 0b1} and eng.m.rmp.updates_4k == 1
    rows.append(psc(0, 8 * K, "shared"))  # gfn 0 keeps its attribute, yet goes back
    r = replay(*rows, policy="inplace")
    expect(r, exits__userspace__KVM_EXIT_HYPERCALL=1, exits__userspace_total=1,
           exits__vm__npf=1, exits__vm__vmgexit=1, exits__vm_total=2, npf__recorded=1,
           conversions__set_attributes_calls=3, conversions__to_private_pages=1024,
           conversions__to_shared_pages=2, psc__requests=1, psc__entries=1,
           rmp__updates_4k=2, directmap__splits=1, mappings__4k=1)
    eng = engine(*rows, policy="inplace")
    assert eng.m.rmp.private == {}
    mem = memory(r)
    assert (mem["final_resident"], mem["peak_private"], mem["pages_freed"]) == (1, 1, 0)


# --- vfio: an assigned device's DMA mappings -------------------------------------------------

def test_vfio_pin_all_maps_and_pins_every_slot_whole_and_keeps_both_copies():
    r = replay(*PRIVATE_SLOT, npf(0, True),  # P0
               psc(0, 8 * K, "shared", req=1),  # P0 freed (RMP back); S0, S1 pinned, resident
               psc(0, 8 * K, "private", req=2),  # eager discard of S0, S1 fails: pinned
               npf(0, True),  # P0 again: both copies of gfn 0
               vfio="pin-all")
    expect(r, exits__userspace__KVM_EXIT_HYPERCALL=2, exits__userspace_total=2,
           exits__vm__npf=2, exits__vm__vmgexit=2, exits__vm_total=4, npf__recorded=2,
           conversions__set_attributes_calls=3, conversions__to_private_pages=1026,
           conversions__to_shared_pages=2, psc__requests=2, psc__entries=2,
           rmp__updates_4k=3, directmap__splits=1, mappings__4k=2,
           vfio__dma_map_calls=1, vfio__pinned_peak_bytes=4 * M, vfio__pinned_final_bytes=4 * M,
           vfio__pages_pinned=1024)
    mem = memory(r)
    assert (mem["peak_shared"], mem["peak_private"], mem["peak_resident"]) == (1024, 1, 1025)
    assert (mem["peak_duplicate"], mem["final_resident"], mem["touched"]) == (1, 1025, 1024)
    assert (mem["pages_allocated"], mem["pages_freed"]) == (1026, 1)


def test_vfio_pin_all_allocates_2m_folios_where_shared_pages_are_2m():
    rows = [SLOT, memslot(1, 5 * M, 2 * M),  # slot 1 crosses blocks 2 and 3: single pages
            npf(0, False)]  # the pinned folio maps 2 MiB at once
    eng = engine(*rows, vfio="pin-all", shared_page="2m")
    assert {b: int(f) for b, f in eng.m.pools[False].folios.items()} == {0: 1, 1: 1}
    r = replay(*rows, vfio="pin-all", shared_page="2m")
    expect(r, exits__vm__npf=1, exits__vm_total=1, npf__recorded=1, mappings__2m=1,
           vfio__dma_map_calls=2, vfio__pinned_peak_bytes=6 * M, vfio__pinned_final_bytes=6 * M,
           vfio__pages_pinned=1536)
    assert memory(r)["pages_allocated"] == 1536


def test_vfio_pinned_copies_are_never_stale_so_lazy_reclaim_leaves_them():
    rows = [*PRIVATE_SLOT, psc(0, 8 * K, "private")]  # the shared copies are left behind
    pinned = engine(*rows, policy="lazy", lazy_limit=4 * K, vfio="pin-all")
    assert pinned.m.stale == {} and pinned.m.pools[False].count == 1024
    assert pinned.count["memory.pages_freed"] == 0
    unpinned = engine(SLOT, host(0, 8 * K), attrs(0, 4 * M), psc(0, 8 * K, "private"),
                      policy="lazy", lazy_limit=4 * K)
    assert unpinned.m.stale == {1: 1} and unpinned.count["memory.pages_freed"] == 1


def test_vfio_moving_and_deleting_a_slot_unmaps_and_unpins_it_before_freeing():
    r = replay(SLOT, memslot(0, 8 * M, 2 * M), memslot(0, 8 * M, 0), vfio="pin-all")
    expect(r, vfio__dma_map_calls=2, vfio__dma_unmap_calls=2, vfio__pinned_peak_bytes=4 * M,
           vfio__pages_pinned=1536)
    mem = memory(r)
    assert (mem["peak_resident"], mem["final_resident"], mem["touched"]) == (1024, 0, 1536)
    assert (mem["pages_allocated"], mem["pages_freed"]) == (1536, 1536)


def test_vfio_on_convert_maps_what_is_shared_and_follows_conversions():
    r = replay(SLOT, memslot(1, 8 * M, 2 * M, gmem=False),  # slot 1 (no guest_memfd): pinned
               attrs(0, 4 * M),  # nothing of slot 0 is pinned: no unmap call
               npf(0, True),  # P0
               psc(0, 16 * K, "shared", req=1),  # map call: S0-S3 allocated, pinned; P0 freed
               npf(0, False),
               psc(0, 8 * K, "private", req=2),  # unmap call, unpin S0, S1, then eager frees them
               psc(0, 16 * K, "shared", req=3),  # S0, S1 not pinned: map call, allocated again
               attrs(8 * K, 8 * K),  # a set_attributes row unmaps (S2, S3 kept: no discard)
               attrs(8 * K, 8 * K, private=False),  # and maps again: pinned, no allocation
               psc(0, 16 * K, "shared", req=4),  # all shared and pinned already: no call
               vfio="on-convert")
    expect(r, exits__userspace__KVM_EXIT_HYPERCALL=4, exits__userspace_total=4,
           exits__vm__npf=2, exits__vm__vmgexit=4, exits__vm_total=6, npf__recorded=2,
           conversions__set_attributes_calls=7, conversions__to_private_pages=1028,
           conversions__to_shared_pages=8, psc__requests=4, psc__entries=4,
           rmp__updates_4k=2, directmap__splits=1, mappings__4k=2,
           vfio__dma_map_calls=4, vfio__dma_unmap_calls=2, vfio__pinned_peak_bytes=516 * 4 * K,
           vfio__pinned_final_bytes=516 * 4 * K, vfio__pages_pinned=520)
    mem = memory(r)
    assert (mem["peak_shared"], mem["peak_private"], mem["peak_resident"]) == (516, 1, 516)
    assert (mem["peak_duplicate"], mem["final_resident"], mem["touched"]) == (0, 516, 516)
    assert (mem["pages_allocated"], mem["pages_freed"]) == (519, 3)


def test_vfio_on_convert_follows_an_implicit_conversion():
    r = replay(*PRIVATE_SLOT, npf(0, False), vfio="on-convert")
    expect(r, exits__userspace__KVM_EXIT_MEMORY_FAULT=1, exits__userspace_total=1,
           exits__vm__npf=2, exits__vm_total=2, npf__recorded=1, conversions__implicit=1,
           conversions__set_attributes_calls=2, conversions__to_private_pages=1024,
           conversions__to_shared_pages=1, mappings__4k=1, vfio__dma_map_calls=1,
           vfio__pinned_peak_bytes=4 * K, vfio__pinned_final_bytes=4 * K, vfio__pages_pinned=1)
    assert memory(r)["pages_allocated"] == 1


# --- mutants of machine.py ----------------------------------------------------------------------

def test_vfio_pinning_shared_copies_leaves_the_private_copies_stale():
    """Only a pinned shared copy is never stale: the private copies of pinned pages converted
    to shared are stale, and reclaimed over the limit (one page: P0 goes, P1 stays)."""
    eng = engine(*PRIVATE_SLOT, npf(0, True), npf(4 * K, True), psc(0, 8 * K, "shared"),
                 policy="lazy", lazy_limit=4 * K, vfio="pin-all")
    assert eng.m.stale == {1: 1} and eng.m.pools[True].pages == {0: 0b10}
    assert eng.count["memory.pages_freed"] == 1


def test_inplace_a_2m_private_mapping_makes_all_its_pages_rmp_private_at_4k():
    """512 updates at 4 KiB when the block is mapped 2 MiB, one back for gfn 0."""
    r = replay(*PRIVATE_SLOT, npf(0, True), psc(0, 4 * K, "shared"), policy="inplace",
               gmem_page="2m")
    expect(r, exits__userspace__KVM_EXIT_HYPERCALL=1, exits__userspace_total=1,
           exits__vm__npf=1, exits__vm__vmgexit=1, exits__vm_total=2, npf__recorded=1,
           conversions__set_attributes_calls=2, conversions__to_private_pages=1024,
           conversions__to_shared_pages=1, psc__requests=1, psc__entries=1,
           rmp__updates_4k=513, directmap__splits=1, mappings__2m=1)
