"""Random well-formed traces keep every model invariant after every event, under every policy."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scenario import K, M, attrs, host, map_gpa, memslot, npf, populate, psc, table

from upmtrace.engine import replay
from upmtrace.engine.reference import Engine, iter_rows
from upmtrace.policy import KNOBS, PRESETS, Policy
from upmtrace.trace.schema import Platform

SPAN = 8 * M  # guest-physical space the random events live in
page = st.integers(0, SPAN // (4 * K) - 1).map(lambda g: g * 4 * K)
pages = st.integers(1, 1100).map(lambda n: n * 4 * K)

slot_row = st.builds(lambda s, start, n, gmem: memslot(s, start * 2 * M, n * M, gmem),
                     st.integers(0, 2), st.integers(0, 3), st.integers(0, 3), st.booleans())
event = st.one_of(
    st.builds(attrs, page, pages, st.booleans()),
    st.builds(npf, page.map(lambda a: a + 0x10), st.booleans(), st.integers(0, 1)),
    st.builds(map_gpa, page, pages, st.booleans()),
    st.builds(host, page, pages),
    st.builds(populate, page, pages),
    st.lists(st.builds(psc, st.one_of(page, st.integers(0, 3).map(lambda b: b * 2 * M)),
                       st.sampled_from([4 * K, 8 * K, 2 * M]),
                       st.sampled_from(["private", "shared", "psmash", "unsmash"]),
                       st.just(7), st.integers(0, 1)),
             min_size=1, max_size=5),
)


def flatten(events):
    rows = []
    for e in events:
        rows.extend(e if isinstance(e, list) else [e])
    return rows


def valid_slots(rows):
    """Drop slot rows that would overlap a live slot (an input error, tested elsewhere)."""
    live: dict[int, tuple[int, int]] = {}
    kept = []
    for row in rows:
        if row["kind"] == "memslot":
            lo, hi = row["gpa"], row["gpa"] + row["size"]
            others = [span for slot, span in live.items() if slot != row["slot"]]
            if row["size"] and any(lo < e and s < hi for s, e in others):
                continue  # dropped whole: the slot it would have moved stays where it is
            live.pop(row["slot"], None)
            if row["size"]:
                live[row["slot"]] = (lo, hi)
        kept.append(row)
    return kept


policies = st.builds(
    lambda base, dealloc, limit, gmem, shared, dm, prefault, vfio: PRESETS[base].with_overrides(
        {"dealloc": dealloc, "lazy_limit": limit, "gmem_page": gmem, "shared_page": shared,
         "directmap": dm, "prefault": prefault, "vfio": vfio}),
    st.sampled_from(sorted(PRESETS)), st.sampled_from(KNOBS["dealloc"][0]),
    st.sampled_from([0, 4 * K, 64 * K]), st.sampled_from(["4k", "2m"]),
    st.sampled_from(["4k", "2m"]), st.sampled_from(KNOBS["directmap"][0]), st.booleans(),
    st.sampled_from(KNOBS["vfio"][0]))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(slot_row, min_size=1, max_size=3), st.lists(event, max_size=25), policies,
       st.sampled_from(list(Platform)))
def test_invariants_hold_after_every_event(slots, events, policy, platform):
    rows = valid_slots([*slots, *flatten(events)])
    eng = Engine(policy, platform, paranoid=True)  # check_invariants() after every event
    eng.run(iter_rows(table(*rows)))
    report = eng.report({}, None, None)
    assert report["exits"]["vm"]["npf"] >= report["npf"]["recorded"] - report["npf"]["avoided"]
    mem = report["memory"]
    assert mem["peak_resident_bytes"] <= mem["touched_bytes"] * 2
    assert mem["final_resident_bytes"] <= mem["peak_resident_bytes"]


@settings(max_examples=30, deadline=None)
@given(st.lists(slot_row, min_size=1, max_size=2), st.lists(event, max_size=20),
       st.integers(1, 7))
def test_replay_is_deterministic_and_batch_size_independent(slots, events, batch):
    t = table(*valid_slots([*slots, *flatten(events)]))
    one = replay(t, PRESETS["lazy"]).to_json()
    assert replay(t, PRESETS["lazy"], batch_rows=batch).to_json() == one


def test_every_preset_reports_every_section_6_key():
    t = table(memslot(0, 0, 4 * M), attrs(0, 4 * M), npf(0, True), psc(0, 8 * K, "shared"),
              map_gpa(0, 4 * K, True), host(0, 4 * K))
    for name, policy in PRESETS.items():
        report = json.loads(replay(t, policy).to_json())
        assert report["schema"] == "upmtrace.report.v1"
        assert report["policy"] == {"name": name, **policy.knobs()}
        for key in ("userspace.KVM_EXIT_MEMORY_FAULT", "userspace.KVM_EXIT_HYPERCALL",
                    "vm.npf", "vm.vmgexit", "vm.tdvmcall", "vm.vmcall"):
            node = report["exits"]
            for part in key.split("."):
                node = node[part]
            assert isinstance(node, int)
        assert set(report["memory"]) >= {
            "peak_resident_bytes", "peak_shared_bytes", "peak_private_bytes",
            "peak_duplicate_bytes", "final_resident_bytes", "touched_bytes", "ratio_to_touched"}
        assert isinstance(report["memory"]["ratio_to_touched"], float)
        assert all(isinstance(report["populate"][k], int)
                   for k in ("calls", "pages", "skipped_pages"))
        assert all(isinstance(report["vfio"][k], int) for k in (
            "dma_map_calls", "dma_unmap_calls", "pinned_peak_bytes", "pinned_final_bytes"))
        assert policy.vfio == "none"  # no preset has an assigned device
        assert set(report["cost"]) >= {"total_ns", "by_category"}
        assert isinstance(Policy(**policy.to_json()), Policy)


class StaleShadow:
    """The definition of a stale copy (lazy dealloc), recomputed page by page beside a Machine.

    A conversion to p leaves every resident copy on the other side of its range stale with the
    conversion's age (an already-stale copy keeps its age; a copy pinned for DMA is not stale:
    it cannot be discarded); a page whose attribute changes to p has its copy on side p live
    again (set_attributes rows included); a freed copy is no longer stale; when a conversion
    added stale copies and they exceed lazy_limit, the oldest (lowest age, then lowest gfn) are
    freed.
    """

    def __init__(self, eng: Engine) -> None:
        self.m = m = eng.m
        self.stale: dict[tuple[bool, int], int] = {}  # (side, gfn) -> age
        self.age = 0
        self.set_attributes, self.convert = m.set_attributes, m.convert
        m.set_attributes, m.convert = self.on_set_attributes, self.on_convert

    def resident(self, side: bool, gfn: int) -> bool:
        return self.m.pools[side].resident(gfn >> 9, 1 << (gfn & 511))

    def pinned(self, side: bool, gfn: int) -> bool:
        """After the conversion's DMA unmap: only a shared copy can be pinned."""
        return side is False and self.m.vfio.bitmap(gfn >> 9) >> (gfn & 511) & 1 == 1

    def on_set_attributes(self, g0: int, g1: int, private: bool) -> None:
        before = [self.m.attrs.is_private(g) for g in range(g0, g1)]
        self.set_attributes(g0, g1, private)
        for g, was in zip(range(g0, g1), before, strict=True):
            if was != private:
                self.stale.pop((private, g), None)

    def on_convert(self, g0: int, g1: int, private: bool, explicit: bool) -> None:
        self.age += 1
        old = not private
        left = [g for g in range(g0, g1) if self.resident(old, g)]
        self.convert(g0, g1, private, explicit)
        left = [g for g in left if not self.pinned(old, g)]  # pinned when dealloc ran
        if not (self.m.lazy and not self.m.inplace):
            return
        added = False
        for g in left:
            if (old, g) not in self.stale:
                self.stale[old, g] = self.age
                added = True
        limit = self.m.policy.lazy_limit >> 12
        while added and limit and len(self.stale) > limit:
            key = min(self.stale, key=lambda k: (self.stale[k], k[1]))
            del self.stale[key]
            assert not self.resident(*key), f"oldest stale copy {key} was not reclaimed"
        self.check()

    def check(self) -> None:
        self.stale = {k: a for k, a in self.stale.items() if self.resident(*k)}
        model = {(not self.m.attrs.is_private(g), g): a for g, a in self.m.stale.items()}
        assert model == self.stale


lazy_policies = st.builds(
    lambda limit, gmem, shared, prefault, vfio: PRESETS["lazy"].with_overrides(
        {"lazy_limit": limit, "gmem_page": gmem, "shared_page": shared, "prefault": prefault,
         "vfio": vfio}),
    st.sampled_from([0, 4 * K, 8 * K, 64 * K]), st.sampled_from(["4k", "2m"]),
    st.sampled_from(["4k", "2m"]), st.booleans(), st.sampled_from(KNOBS["vfio"][0]))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(slot_row, min_size=1, max_size=3), st.lists(event, max_size=25), lazy_policies,
       st.sampled_from(list(Platform)))
def test_stale_copies_follow_their_definition_after_every_event(slots, events, policy, platform):
    eng = Engine(policy, platform, paranoid=True)
    shadow = StaleShadow(eng)
    for row in iter_rows(table(*valid_slots([*slots, *flatten(events)]))):
        eng.feed(row)
        shadow.check()
    eng.finish()
    shadow.check()
