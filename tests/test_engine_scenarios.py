"""Scenario tests: a handful of events each, with every counter the model must produce."""

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
    psc,
    replay,
    replay_rows,
)

SLOT = memslot(0, 0, 4 * M)  # two 2 MiB blocks, guest_memfd
PRIVATE_SLOT = (SLOT, attrs(0, 4 * M))  # as QEMU creates it: all private


def test_implicit_conversion_both_ways_with_retries_and_an_avoided_fault():
    r = replay(SLOT, npf(0x1000, True), npf(0x1000, True), npf(0x1000, False))
    expect(r, exits__userspace__KVM_EXIT_MEMORY_FAULT=2, exits__userspace_total=2,
           exits__vm__npf=4, exits__vm_total=4,
           npf__recorded=3, npf__avoided=1,
           conversions__implicit=2, conversions__set_attributes_calls=2,
           conversions__to_private_pages=1, conversions__to_shared_pages=1,
           rmp__updates_4k=2, directmap__splits=1, mappings__4k=2)
    mem = memory(r)
    assert (mem["peak_resident"], mem["peak_shared"], mem["peak_private"]) == (1, 1, 1)
    assert (mem["peak_duplicate"], mem["final_resident"], mem["touched"]) == (0, 1, 1)
    assert (mem["pages_allocated"], mem["pages_freed"]) == (2, 1)
    assert mem["ratio_to_touched"] == 1.0


def test_fault_outside_every_slot():
    r = replay(SLOT, npf(64 * M, True), npf(64 * M + 0x123, False))
    expect(r, exits__userspace__KVM_EXIT_MEMORY_FAULT=1, exits__userspace_total=1,
           exits__vm__npf=2, exits__vm_total=2, npf__recorded=2, npf__unresolvable=1,
           npf__mmio=1)


def test_private_fault_in_a_slot_without_guest_memfd_is_unresolvable():
    r = replay(memslot(1, 8 * M, 2 * M, gmem=False), npf(8 * M, True), npf(8 * M, False))
    expect(r, exits__userspace__KVM_EXIT_MEMORY_FAULT=1, exits__userspace_total=1,
           exits__vm__npf=2, exits__vm_total=2, npf__recorded=2, npf__unresolvable=1,
           mappings__4k=1)


# entries: runs A=[1,2] B=[3] C=[4] D=[5] E=[6] | psmash | F=[8] | invalid 2 MiB entry | ignored
PSC_REQUEST = [
    psc(0x000000, 4 * K, "private"),
    psc(0x001000, 4 * K, "private"),  # contiguous, same op: run A continues
    psc(0x003000, 4 * K, "private"),  # gap: run B
    psc(0x004000, 4 * K, "shared"),  # op change: run C
    psc(0x1FF000, 4 * K, "shared"),  # gap: run D
    psc(0x200000, 2 * M, "shared"),  # contiguous, size class changes: run E
    psc(0x400000, 4 * K, "psmash"),  # skipped, breaks the run
    psc(0x400000, 2 * M, "shared"),  # would extend E but for the psmash: run F
    psc(0x601000, 2 * M, "private"),  # misaligned 2 MiB entry: ends the request
    psc(0x700000, 4 * K, "private"),  # never processed
]


@pytest.mark.parametrize(("mode", "exits", "calls"),
                         [("coalesce", 6, 6), ("per-entry", 7, 7), ("batched", 1, 6)])
def test_psc_runs_under_each_exit_mode(mode, exits, calls):
    r = replay(memslot(0, 0, 8 * M), *PSC_REQUEST, exits=mode)
    expect(r, exits__userspace__KVM_EXIT_HYPERCALL=exits, exits__userspace_total=exits,
           exits__vm__vmgexit=1, exits__vm_total=1,
           conversions__set_attributes_calls=calls, conversions__to_private_pages=3,
           psc__requests=1, psc__entries=10, psc__skipped=1, psc__invalid=1)


def test_psc_requests_are_split_by_vcpu_and_request_id():
    r = replay(SLOT, psc(0, 4 * K, "private", req=1), psc(4 * K, 4 * K, "private", req=2),
               psc(8 * K, 4 * K, "private", req=2, vcpu=1), psc(12 * K, 4 * K, "private", req=2,
                                                              vcpu=1))
    expect(r, exits__userspace__KVM_EXIT_HYPERCALL=3, exits__userspace_total=3,
           exits__vm__vmgexit=3, exits__vm_total=3, conversions__set_attributes_calls=3,
           conversions__to_private_pages=4, psc__requests=3, psc__entries=4)


def test_batched_request_with_nothing_convertible_makes_no_exit():
    r = replay(SLOT, psc(0, 4 * K, "psmash"), psc(0, 2 * M, "unsmash"), exits="batched")
    expect(r, exits__vm__vmgexit=1, exits__vm_total=1, psc__requests=1, psc__entries=2,
           psc__skipped=2)


def test_msr_protocol_requests_are_one_page_each():
    r = replay(SLOT, psc(0x5000, 4 * K, "shared", req=-1), psc(0x6000, 4 * K, "private", req=-1),
               psc(0x7000, 4 * K, "psmash", req=-1))
    expect(r, exits__userspace__KVM_EXIT_HYPERCALL=2, exits__userspace_total=2,
           exits__vm__vmgexit=3, exits__vm_total=3, conversions__set_attributes_calls=2,
           conversions__to_private_pages=1, psc__requests=3, psc__entries=3, psc__skipped=1)


@pytest.mark.parametrize(("gpa", "size", "mode", "exits"), [
    (0, 5 * M, "coalesce", 3),  # 2 + 2 + 1 MiB
    (0x1000, 2 * M, "coalesce", 1),  # chunks are cut from the start gpa, not at 2 MiB lines
    (0, 5 * M, "per-entry", 3),
    (0, 5 * M, "batched", 1),
])
def test_tdx_map_gpa_chunks(gpa, size, mode, exits):
    r = replay(memslot(0, 0, 16 * M), map_gpa(gpa, size, True), platform="tdx", exits=mode)
    expect(r, exits__userspace__KVM_EXIT_HYPERCALL=exits, exits__userspace_total=exits,
           exits__vm__tdvmcall=1, exits__vm_total=1, conversions__set_attributes_calls=exits,
           conversions__to_private_pages=size // (4 * K))


def test_map_gpa_on_snp_is_one_vmgexit_and_one_exit():
    """An SNP guest cannot execute VMMCALL: the hypercall reaches KVM through the GHCB."""
    r = replay(memslot(0, 0, 16 * M), map_gpa(0, 5 * M, True))
    expect(r, exits__userspace__KVM_EXIT_HYPERCALL=1, exits__userspace_total=1,
           exits__vm__vmgexit=1, exits__vm_total=1, conversions__set_attributes_calls=1,
           conversions__to_private_pages=5 * M // (4 * K))


def test_map_gpa_on_sw_is_one_vmcall_and_one_exit():
    r = replay(memslot(0, 0, 16 * M), map_gpa(0, 5 * M, True), platform="sw")
    expect(r, exits__userspace__KVM_EXIT_HYPERCALL=1, exits__userspace_total=1,
           exits__vm__vmcall=1, exits__vm_total=1, conversions__set_attributes_calls=1,
           conversions__to_private_pages=5 * M // (4 * K))


def test_sw_platform_takes_privacy_from_the_attribute():
    r = replay(*PRIVATE_SLOT, npf(0, False), npf(0x200000, True), platform="sw")
    expect(r, exits__vm__npf=2, exits__vm_total=2, npf__recorded=2, mappings__4k=2,
           conversions__set_attributes_calls=1, conversions__to_private_pages=1024)
    assert memory(r)["peak_private"] == 2


def test_tdx_private_mappings_stay_4k_even_with_2m_folios():
    r = replay(*PRIVATE_SLOT, npf(0, True), npf(4 * K, True), platform="tdx", gmem_page="2m")
    expect(r, exits__vm__npf=2, exits__vm_total=2, npf__recorded=2, mappings__4k=2,
           conversions__set_attributes_calls=1, conversions__to_private_pages=1024)


# --- dealloc policies ------------------------------------------------------------------------

ROUND_TRIP = [
    *PRIVATE_SLOT,
    *(npf(g * 4 * K, True) for g in range(4)),
    psc(0, 16 * K, "shared", req=1),
    *(npf(g * 4 * K, False) for g in range(4)),
    psc(0, 16 * K, "private", req=2),
    *(npf(g * 4 * K, True) for g in range(4)),
]
ROUND_TRIP_EXITS = dict(exits__userspace__KVM_EXIT_HYPERCALL=2, exits__userspace_total=2,
                        exits__vm__npf=12, exits__vm__vmgexit=2, exits__vm_total=14,
                        npf__recorded=12, conversions__set_attributes_calls=3,
                        conversions__to_private_pages=1028, conversions__to_shared_pages=4,
                        psc__requests=2, psc__entries=2, directmap__splits=1, mappings__4k=12)


def test_eager_frees_the_old_copy_at_once():
    r = replay(*ROUND_TRIP)
    expect(r, **ROUND_TRIP_EXITS, rmp__updates_4k=12)
    assert memory(r) | {"ratio_to_touched": 1.0} == memory(r)
    mem = memory(r)
    assert (mem["peak_resident"], mem["peak_duplicate"], mem["final_resident"]) == (4, 0, 4)
    assert (mem["touched"], mem["pages_allocated"], mem["pages_freed"]) == (4, 12, 8)


def test_lazy_keeps_both_copies_and_reuses_the_old_one_without_allocating():
    r = replay(*ROUND_TRIP, policy="lazy")
    expect(r, **ROUND_TRIP_EXITS, rmp__updates_4k=4)
    mem = memory(r)
    assert (mem["peak_resident"], mem["peak_duplicate"], mem["final_resident"]) == (8, 4, 8)
    assert (mem["touched"], mem["pages_allocated"], mem["pages_freed"]) == (4, 8, 0)
    assert mem["ratio_to_touched"] == 2.0


def test_aligned_2m_frees_only_whole_blocks():
    partial = replay(*ROUND_TRIP, dealloc="aligned-2m")
    assert memory(partial)["peak_duplicate"] == 4 and memory(partial)["pages_freed"] == 0
    whole = replay(*PRIVATE_SLOT, npf(0, True), npf(2 * M, True),
                   psc(0, 4 * M, "shared"), dealloc="aligned-2m")
    crossing = replay(*PRIVATE_SLOT, npf(0, True), npf(2 * M, True),
                      psc(4 * K, 4 * M - 4 * K, "shared"), dealloc="aligned-2m")
    assert memory(whole)["final_resident"] == 0
    assert memory(crossing)["final_resident"] == 1  # block 0 is not wholly inside the range


def test_lazy_limit_reclaims_oldest_first():
    rows = [*PRIVATE_SLOT, *(npf(g * 4 * K, True) for g in range(4)),
            psc(0, 8 * K, "shared", req=1),  # stale: gfn 0, 1 (age 1) = the limit
            psc(8 * K, 8 * K, "shared", req=2)]  # stale: gfn 2, 3 (age 2) -> reclaim 0, 1
    eng = engine(*rows, policy="lazy", lazy_limit=8 * K)
    assert eng.m.pools[True].pages == {0: 0b1100}
    assert sorted(eng.m.stale) == [2, 3]
    assert eng.count["memory.pages_freed"] == 2
    unlimited = engine(*rows, policy="lazy")
    assert unlimited.m.pools[True].pages == {0: 0b1111}


def test_lazy_marking_a_stale_copy_again_keeps_its_age():
    rows = [*PRIVATE_SLOT, *(npf(g * 4 * K, True) for g in range(3)),
            psc(0, 4 * K, "shared", req=1),  # gfn 0 stale, age 1
            psc(4 * K, 4 * K, "shared", req=2),  # gfn 1 stale, age 2
            psc(0, 4 * K, "shared", req=3),  # gfn 0 again: keeps age 1
            psc(8 * K, 4 * K, "shared", req=4)]  # gfn 2 stale; limit 2 pages: reclaim gfn 0
    eng = engine(*rows, policy="lazy", lazy_limit=8 * K)
    assert eng.m.pools[True].pages == {0: 0b110}


def test_host_population_is_not_stale():
    eng = engine(*PRIVATE_SLOT, npf(0, True), host(0, 4 * K), policy="lazy", lazy_limit=4 * K)
    assert eng.m.stale == {}
    assert eng.count["host_access.stale"] == 1 and eng.m.duplicate == 1


# --- in-place conversion ---------------------------------------------------------------------

def test_inplace_converts_without_a_second_copy():
    r = replay(*PRIVATE_SLOT, npf(0, True), psc(0, 4 * K, "shared"), npf(0, False),
               host(4 * K, 8 * K), policy="inplace")
    expect(r, exits__userspace__KVM_EXIT_HYPERCALL=1, exits__userspace_total=1,
           exits__vm__npf=2, exits__vm__vmgexit=1, exits__vm_total=3, npf__recorded=2,
           conversions__set_attributes_calls=2, conversions__to_private_pages=1024,
           conversions__to_shared_pages=1, psc__requests=1, psc__entries=1,
           rmp__updates_4k=2, directmap__splits=1, mappings__4k=2,
           host_access__pages=2, host_access__faults=2)
    mem = memory(r)
    assert (mem["peak_resident"], mem["peak_shared"], mem["peak_private"]) == (1, 1, 1)
    assert (mem["peak_duplicate"], mem["pages_allocated"], mem["pages_freed"]) == (0, 1, 0)


# --- mapping levels, folios, RMP -------------------------------------------------------------

def test_2m_mapping_needs_a_uniform_block_inside_the_slot():
    r = replay(SLOT, memslot(1, 5 * M, 2 * M),
               npf(0, False), npf(5 * 4 * K, False),  # 2 MiB mapping, then avoided
               psc(2 * M + 88 * 4 * K, 4 * K, "private"),  # block 1 now mixed
               npf(2 * M, False),  # folio allocated, mapping 4 KiB
               npf(5 * M, False),  # slot 1 crosses blocks: single page, 4 KiB
               shared_page="2m")
    expect(r, exits__userspace__KVM_EXIT_HYPERCALL=1, exits__userspace_total=1,
           exits__vm__npf=3, exits__vm__vmgexit=1, exits__vm_total=4, npf__recorded=4,
           npf__avoided=1, conversions__set_attributes_calls=1, conversions__to_private_pages=1,
           psc__requests=1, psc__entries=1, mappings__2m=1, mappings__4k=2)
    assert memory(r)["peak_shared"] == 512 + 512 + 1


def test_2m_folio_2m_rmp_entry_then_psmash_on_a_mixed_block():
    r = replay(*PRIVATE_SLOT, npf(0, True), psc(4 * K, 4 * K, "shared"), npf(8 * K, True),
               policy="hugepool")
    expect(r, exits__userspace__KVM_EXIT_HYPERCALL=1, exits__userspace_total=1,
           exits__vm__npf=4, exits__vm__vmgexit=1, exits__vm_total=5, npf__recorded=2,
           conversions__set_attributes_calls=2, conversions__to_private_pages=1024,
           conversions__to_shared_pages=1, psc__requests=1, psc__entries=1,
           rmp__updates_2m=1, rmp__psmash=1, mappings__2m=1, mappings__4k=1)
    assert memory(r)["peak_private"] == 512


def test_freeing_part_of_a_2m_folio_splits_it_and_psmashes():
    r = replay(*PRIVATE_SLOT, npf(0, True), psc(4 * K, 4 * K, "shared"), npf(8 * K, True),
               gmem_page="2m")
    expect(r, exits__userspace__KVM_EXIT_HYPERCALL=1, exits__userspace_total=1,
           exits__vm__npf=2, exits__vm__vmgexit=1, exits__vm_total=3, npf__recorded=2,
           conversions__set_attributes_calls=2, conversions__to_private_pages=1024,
           conversions__to_shared_pages=1, psc__requests=1, psc__entries=1,
           gmem__folio_splits=1, rmp__updates_2m=1, rmp__psmash=1, rmp__updates_4k=1,
           directmap__splits=1, mappings__2m=1, mappings__4k=1)
    assert memory(r)["final_resident"] == 511


@pytest.mark.parametrize(("mode", "splits", "restores"),
                         [("split", 1, 0), ("unmap", 2, 1), ("none", 0, 0)])
def test_directmap_split_versus_unmap_and_restore(mode, splits, restores):
    r = replay(*PRIVATE_SLOT, npf(0, True), psc(0, 4 * K, "shared"), npf(4 * K, True),
               directmap=mode)
    assert (r.get("directmap.splits"), r.get("directmap.restores")) == (splits, restores)
    assert r.get("rmp.updates_4k") == 3


def test_unmap_removes_a_whole_region_on_a_2m_update_and_restores_it():
    r = replay(*PRIVATE_SLOT, npf(0, True), psc(0, 2 * M, "shared"), gmem_page="2m",
               directmap="unmap")
    assert (r.get("rmp.updates_2m"), r.get("directmap.splits"),
            r.get("directmap.restores")) == (2, 0, 1)


def test_directmap_is_snp_only():
    r = replay(*PRIVATE_SLOT, npf(0, True), platform="tdx")
    assert (r.get("rmp.updates_4k"), r.get("directmap.splits")) == (0, 0)


# --- host access -----------------------------------------------------------------------------

def test_host_access_to_private_pages_reaches_a_stale_copy():
    r = replay(*PRIVATE_SLOT, npf(0, True), host(0, 8 * K), host(64 * M, 4 * K),
               host(3 * M + 0x800, 4 * K))  # unaligned: touches two pages
    expect(r, exits__vm__npf=1, exits__vm_total=1, npf__recorded=1,
           conversions__set_attributes_calls=1, conversions__to_private_pages=1024,
           rmp__updates_4k=1, directmap__splits=1, mappings__4k=1,
           host_access__pages=5, host_access__stale=4)
    mem = memory(r)
    assert (mem["peak_shared"], mem["peak_duplicate"], mem["touched"]) == (4, 1, 4)


def test_host_access_populates_missing_shared_pages():
    r = replay(SLOT, host(0, 8 * K), host(0, 8 * K))
    expect(r, host_access__pages=4)
    assert memory(r)["peak_shared"] == 2 and memory(r)["pages_allocated"] == 2


# --- prefault --------------------------------------------------------------------------------

def test_prefault_turns_later_faults_into_avoided_ones():
    rows = [SLOT, psc(0, 16 * K, "private"), *(npf(g * 4 * K, True) for g in range(4))]
    r = replay(*rows, policy="prefault")
    expect(r, exits__userspace__KVM_EXIT_HYPERCALL=1, exits__userspace_total=1,
           exits__vm__vmgexit=1, exits__vm_total=1, npf__recorded=4, npf__avoided=4,
           conversions__set_attributes_calls=1, conversions__to_private_pages=4,
           psc__requests=1, psc__entries=1, rmp__updates_4k=4, directmap__splits=1,
           mappings__4k=4)
    plain = replay(*rows)
    assert plain.get("exits.vm.npf") == 4 and plain.get("npf.avoided") == 0


def test_prefault_skips_private_pages_outside_guest_memfd():
    r = replay(memslot(1, 0, 2 * M, gmem=False), psc(0, 16 * K, "private"), policy="prefault")
    assert r.get("mappings.4k") == 0 and memory(r)["peak_resident"] == 0


# --- memslots --------------------------------------------------------------------------------

def test_deleting_a_slot_zaps_and_frees_both_copies():
    r = replay(*PRIVATE_SLOT, npf(0, True), host(0, 4 * K), memslot(0, 0, 0), npf(0, True))
    mem = memory(r)
    assert (mem["peak_resident"], mem["final_resident"]) == (2, 0)
    assert r.get("npf.unresolvable") == 1  # the slot is gone
    assert r.get("rmp.updates_4k") == 2


def test_moving_a_slot_frees_its_old_pages():
    r = replay(SLOT, npf(0, False), memslot(0, 8 * M, 4 * M), npf(8 * M, False))
    mem = memory(r)
    assert (mem["peak_resident"], mem["final_resident"], mem["touched"]) == (1, 1, 2)


# --- lazy reclaim: a stale copy keeps its age while its page's attribute does not change ----

LAZY_REPRO = [
    memslot(0, 0, 2 * M),
    npf(4 * K, True),  # gfn 1 private: P1
    psc(4 * K, 4 * K, "shared", req=-1),  # P1 stale (age 2)
    host(4 * K, 4 * K),  # S1 populated by the host: live, not stale
]


def test_lazy_conversion_keeps_the_age_of_a_page_whose_attribute_did_not_change():
    rows = [*LAZY_REPRO,
            npf(0, True),  # gfn 0 private: P0
            psc(0, 8 * K, "shared"),  # P0 stale (age 4); gfn 1 unchanged: P1 keeps age 2
            npf(0, True)]  # P0 live again; P1 was reclaimed (the oldest) at the psc
    for reference in (True, False):
        r = replay_rows(rows, reference, policy="lazy", lazy_limit=4 * K)
        expect(r, exits__userspace__KVM_EXIT_MEMORY_FAULT=3,
               exits__userspace__KVM_EXIT_HYPERCALL=2, exits__userspace_total=5,
               exits__vm__npf=6, exits__vm__vmgexit=2, exits__vm_total=8, npf__recorded=3,
               conversions__implicit=3, conversions__set_attributes_calls=5,
               conversions__to_private_pages=3, conversions__to_shared_pages=2,
               psc__requests=2, psc__entries=2, rmp__updates_4k=3, directmap__splits=1,
               mappings__4k=3, host_access__pages=1)
        mem = memory(r)
        assert (mem["final_resident"], mem["peak_resident"], mem["touched"]) == (2, 3, 2)
        assert (mem["pages_allocated"], mem["pages_freed"]) == (3, 1)
    eng = engine(*rows, policy="lazy", lazy_limit=4 * K)
    assert eng.m.pools[True].pages == {0: 0b01} and eng.m.pools[False].pages == {0: 0b10}
    assert eng.m.stale == {}


def test_lazy_set_attributes_keeps_the_stale_copy_of_a_page_it_does_not_change():
    rows = [*LAZY_REPRO,
            npf(0, True),  # gfn 0 private: P0
            attrs(0, 8 * K, private=False),  # gfn 0 shared again (P0 kept, not stale);
                                             # gfn 1 unchanged: P1 stays stale, age 2
            npf(8 * K, True),  # gfn 2 private: P2
            psc(8 * K, 4 * K, "shared", req=3)]  # P2 stale: over the limit, P1 (older) goes
    for reference in (True, False):
        r = replay_rows(rows, reference, policy="lazy", lazy_limit=4 * K)
        expect(r, exits__userspace__KVM_EXIT_MEMORY_FAULT=3,
               exits__userspace__KVM_EXIT_HYPERCALL=2, exits__userspace_total=5,
               exits__vm__npf=6, exits__vm__vmgexit=2, exits__vm_total=8, npf__recorded=3,
               conversions__implicit=3, conversions__set_attributes_calls=6,
               conversions__to_private_pages=3, conversions__to_shared_pages=3,
               psc__requests=2, psc__entries=2, rmp__updates_4k=4, directmap__splits=1,
               mappings__4k=3, host_access__pages=1)
        mem = memory(r)
        assert (mem["final_resident"], mem["peak_resident"], mem["touched"]) == (3, 4, 3)
        assert (mem["pages_allocated"], mem["pages_freed"]) == (4, 1)
    eng = engine(*rows, policy="lazy", lazy_limit=4 * K)
    assert eng.m.pools[True].pages == {0: 0b101} and eng.m.pools[False].pages == {0: 0b010}
    assert eng.m.stale == {2: 5}  # age: the fifth conversion


def test_lazy_set_attributes_that_changes_a_page_back_revives_its_stale_copy():
    eng = engine(*LAZY_REPRO, attrs(4 * K, 4 * K), policy="lazy", lazy_limit=4 * K)
    assert eng.m.stale == {}  # P1 is live again; S1 is not marked (set_attributes frees nothing)
    assert eng.m.pools[True].pages == {0: 0b10} and eng.m.pools[False].pages == {0: 0b10}


# --- mutants of machine.py: stale copies, freeing, prefault ------------------------------------

def test_lazy_stale_copies_in_a_block_past_the_first_are_revived_reclaimed_and_freed():
    """Block 1 (gfn 513-515), lazy, limit one page. Host accesses populate shared copies of
    private pages, which are live, not stale: making such a page shared, or deleting the slot,
    finds no stale entry for it. A stale copy revived by a set_attributes row is no longer
    stale, so the next stale copy reclaims nothing and S514 is still there for the host."""
    g = 2 * M  # gfn 512
    r = replay(SLOT,
               npf(g + 4 * K, True),  # P513
               psc(g + 4 * K, 4 * K, "shared", req=1),  # P513 stale
               host(g + 4 * K, 4 * K),  # S513
               npf(g + 8 * K, True),  # P514
               host(g + 8 * K, 4 * K),  # S514: live, not stale
               psc(g + 8 * K, 4 * K, "shared", req=2),  # P514 stale: P513 (older) reclaimed
               attrs(g + 8 * K, 4 * K),  # P514 revived: nothing stale
               npf(g + 12 * K, True),  # P515
               psc(g + 12 * K, 4 * K, "shared", req=3),  # P515 stale: within the limit
               host(g + 8 * K, 4 * K),  # S514 still resident: nothing to populate
               memslot(0, 0, 0),
               policy="lazy", lazy_limit=4 * K)
    expect(r, exits__userspace__KVM_EXIT_MEMORY_FAULT=3, exits__userspace__KVM_EXIT_HYPERCALL=3,
           exits__userspace_total=6, exits__vm__npf=6, exits__vm__vmgexit=3, exits__vm_total=9,
           npf__recorded=3, conversions__implicit=3, conversions__set_attributes_calls=7,
           conversions__to_private_pages=4, conversions__to_shared_pages=3, psc__requests=3,
           psc__entries=3, rmp__updates_4k=6, directmap__splits=1, mappings__4k=3,
           host_access__pages=3, host_access__stale=2)
    mem = memory(r)
    assert (mem["pages_allocated"], mem["pages_freed"], mem["final_resident"]) == (5, 5, 0)


def test_lazy_reclaim_skips_the_entry_of_a_copy_revived_since():
    """Lazy, limit one page: P0's stale entry stays first in line after P0 is converted back;
    when P2 goes stale, reclaim passes it and frees P1, the oldest stale copy."""
    eng = engine(*PRIVATE_SLOT, *(npf(g * 4 * K, True) for g in range(3)),
                 psc(0, 4 * K, "shared", req=1),  # P0 stale
                 psc(0, 4 * K, "private", req=2),  # P0 live again
                 psc(4 * K, 4 * K, "shared", req=3),  # P1 stale
                 psc(8 * K, 4 * K, "shared", req=4),  # P2 stale: over the limit, P1 freed
                 policy="lazy", lazy_limit=4 * K)
    assert eng.m.pools[True].pages == {0: 0b101} and sorted(eng.m.stale) == [2]
    assert eng.count["memory.pages_freed"] == 1


def test_eager_freeing_passes_a_block_with_nothing_to_free_and_counts_every_folio_split():
    r = replay(SLOT, npf(0, True), npf(600 * 4 * K, True),
               map_gpa(4 * K, 4 * M - 4 * K, False))  # block 0 frees nothing; P600 freed
    assert memory(r)["pages_freed"] == 1 and memory(r)["final_resident"] == 1
    r = replay(*PRIVATE_SLOT, npf(0, True), npf(2 * M, True), psc(4 * K, 4 * K, "shared"),
               psc(2 * M + 4 * K, 4 * K, "shared", req=2), gmem_page="2m")
    expect(r, exits__userspace__KVM_EXIT_HYPERCALL=2, exits__userspace_total=2,
           exits__vm__npf=2, exits__vm__vmgexit=2, exits__vm_total=4, npf__recorded=2,
           conversions__set_attributes_calls=3, conversions__to_private_pages=1024,
           conversions__to_shared_pages=2, psc__requests=2, psc__entries=2,
           gmem__folio_splits=2, rmp__updates_4k=2, rmp__updates_2m=2, rmp__psmash=2,
           directmap__splits=2, mappings__2m=2)


def test_freeing_a_shared_copy_leaves_the_rmp_alone():
    """P0 is RMP-private; the host populates S0; converting gfn 0 to private (already
    private) frees S0, a shared page: no RMP update."""
    r = replay(*PRIVATE_SLOT, npf(0, True), host(0, 4 * K), psc(0, 4 * K, "private"))
    expect(r, exits__userspace__KVM_EXIT_HYPERCALL=1, exits__userspace_total=1,
           exits__vm__npf=1, exits__vm__vmgexit=1, exits__vm_total=2, npf__recorded=1,
           conversions__set_attributes_calls=2, conversions__to_private_pages=1024,
           psc__requests=1, psc__entries=1, rmp__updates_4k=1, directmap__splits=1,
           mappings__4k=1, host_access__pages=1, host_access__stale=1)
    assert (memory(r)["pages_freed"], memory(r)["final_resident"]) == (1, 1)


def test_prefault_goes_on_past_a_block_already_mapped_or_mapped_2m():
    r = replay(*PRIVATE_SLOT, npf(2 * M - 4 * K, True),
               map_gpa(2 * M - 4 * K, 8 * K, True),  # gfn 511 mapped already: 512 mapped
               policy="prefault")
    expect(r, exits__userspace__KVM_EXIT_HYPERCALL=1, exits__userspace_total=1,
           exits__vm__npf=1, exits__vm__vmgexit=1, exits__vm_total=2, npf__recorded=1,
           conversions__set_attributes_calls=2, conversions__to_private_pages=1024,
           rmp__updates_4k=2, directmap__splits=2, mappings__4k=2)
    r = replay(*PRIVATE_SLOT, map_gpa(0, 4 * M, True), policy="prefault", gmem_page="2m")
    expect(r, exits__userspace__KVM_EXIT_HYPERCALL=1, exits__userspace_total=1,
           exits__vm__vmgexit=1, exits__vm_total=1, conversions__set_attributes_calls=2,
           conversions__to_private_pages=1024, rmp__updates_2m=2, mappings__2m=2)


def test_prefault_into_a_split_folio_allocates_only_the_pages_it_maps():
    """gmem_page 2m: P2 and P10 freed split the folio; prefaulting gfn 0-3 allocates P2 only,
    and the folio stays split (freeing P2 again is no new split)."""
    r = replay(*PRIVATE_SLOT, npf(0, True), psc(8 * K, 4 * K, "shared", req=1),
               psc(40 * K, 4 * K, "shared", req=2), psc(0, 16 * K, "private", req=3),
               psc(8 * K, 4 * K, "shared", req=4), policy="prefault", gmem_page="2m")
    expect(r, exits__userspace__KVM_EXIT_HYPERCALL=4, exits__userspace_total=4,
           exits__vm__npf=1, exits__vm__vmgexit=4, exits__vm_total=5, npf__recorded=1,
           conversions__set_attributes_calls=5, conversions__to_private_pages=1025,
           conversions__to_shared_pages=3, psc__requests=4, psc__entries=4,
           gmem__folio_splits=1, rmp__updates_4k=4, rmp__updates_2m=1, rmp__psmash=1,
           directmap__splits=1, mappings__4k=7, mappings__2m=1)
    mem = memory(r)  # the folio, S2, S10, P2, S2 again; P2, P10, S2, P2 freed
    assert (mem["pages_allocated"], mem["pages_freed"], mem["final_resident"]) == (516, 4, 512)

# --- mutants of pool/mappings/attributes/memslots/vfio/rmp/directmap/bits (mutation testing) --

def test_a_2m_shared_mapping_replaces_the_blocks_4k_shared_mappings():
    """Shared pages 2m: page 0 maps at 4 KiB while page 1 is private; once page 1 is shared
    again (a zap of page 1 only), page 2 maps the block at 2 MiB, which takes page 0's 4 KiB
    mapping with it. Page 2 made private zaps the 2 MiB mapping whole: page 0 faults again."""
    r = replay(SLOT, attrs(4 * K, 4 * K), npf(0, False), attrs(4 * K, 4 * K, False),
               npf(8 * K, False), attrs(8 * K, 4 * K), npf(0, False), shared_page="2m")
    expect(r, exits__vm__npf=3, exits__vm_total=3, npf__recorded=3,
           conversions__set_attributes_calls=3, conversions__to_private_pages=2,
           conversions__to_shared_pages=1, mappings__4k=2, mappings__2m=1)


def test_a_2m_private_mapping_replaces_the_blocks_4k_private_mappings_inplace():
    """Inplace, guest_memfd pages 2m: page 0 maps private at 4 KiB while the rest of the block
    is shared; once the rest is private too (zapping pages 1..511 only), page 1 maps the block
    at 2 MiB, taking page 0's 4 KiB mapping with it. Page 2 made shared zaps it whole: page 0
    faults again."""
    r = replay(SLOT, attrs(0, 4 * K), npf(0, True), attrs(4 * K, 2 * M - 4 * K),
               npf(4 * K, True), attrs(8 * K, 4 * K, False), npf(0, True),
               policy="inplace", gmem_page="2m")
    expect(r, exits__vm__npf=3, exits__vm_total=3, npf__recorded=3,
           conversions__set_attributes_calls=3, conversions__to_private_pages=512,
           conversions__to_shared_pages=1, rmp__updates_4k=512, directmap__splits=1,
           mappings__4k=2, mappings__2m=1)


def test_a_shared_block_just_above_a_private_run_maps_at_2m():
    """A private run ending exactly at this block's first page leaves it uniformly shared."""
    r = replay(SLOT, attrs(0, 2 * M), npf(2 * M, False), npf(4 * M - 4 * K, False),
               shared_page="2m")
    expect(r, exits__vm__npf=1, exits__vm_total=1, npf__recorded=2, npf__avoided=1,
           conversions__set_attributes_calls=1, conversions__to_private_pages=512,
           mappings__2m=1)


def test_a_host_access_across_two_memslots_populates_both():
    r = replay(memslot(0, 0, 2 * M, gmem=False), memslot(1, 2 * M, 2 * M),
               host(2 * M - 8 * K, 16 * K))
    expect(r, host_access__pages=4)
    assert memory(r)["peak_shared"] == 4


def test_the_batch_path_finds_no_private_gfn_when_no_attribute_is_private():
    """A run of npf rows long enough for the batch path, no private attribute anywhere, one
    fault outside every slot (so the fast sweep gives up and looks attributes up per row)."""
    rows = [SLOT, *(npf(i * 4 * K, False) for i in range(70)), npf(64 * M, False)]
    for reference in (True, False):
        r = replay_rows(rows, reference)
        expect(r, exits__vm__npf=71, exits__vm_total=71, npf__recorded=71, npf__mmio=1,
               mappings__4k=70)


def test_marking_shared_the_pages_just_after_a_private_run_changes_and_zaps_nothing():
    """Page 0 private, page 1 shared and mapped: marking page 1 shared again is no change, so
    its mapping stays and the second access is avoided."""
    r = replay(SLOT, attrs(0, 4 * K), npf(4 * K, False), attrs(4 * K, 4 * K, False),
               npf(4 * K, False))
    expect(r, exits__vm__npf=1, exits__vm_total=1, npf__recorded=2, npf__avoided=1,
           conversions__set_attributes_calls=2, conversions__to_private_pages=1, mappings__4k=1)


def test_the_blocks_of_a_memslot_above_gpa_0_map_at_2m():
    r = replay(memslot(0, 2 * M, 4 * M), attrs(2 * M, 4 * M), npf(2 * M, True),
               npf(4 * M + 4 * K, True), gmem_page="2m")
    expect(r, exits__vm__npf=2, exits__vm_total=2, npf__recorded=2,
           conversions__set_attributes_calls=1, conversions__to_private_pages=1024,
           rmp__updates_2m=2, mappings__2m=2)


@pytest.mark.parametrize("slots", [[], [memslot(0, 0, 2 * M), memslot(0, 0, 0)]],
                         ids=["no-memslot-ever", "memslot-deleted"])
def test_the_batch_path_with_no_live_memslot(slots):
    rows = [*slots, *(npf(i * 4 * K, i % 2 == 0) for i in range(70))]
    for reference in (True, False):
        r = replay_rows(rows, reference)
        expect(r, exits__userspace__KVM_EXIT_MEMORY_FAULT=35, exits__userspace_total=35,
               exits__vm__npf=70, exits__vm_total=70, npf__recorded=70, npf__unresolvable=35,
               npf__mmio=35)
