"""Random well-formed traces keep every model invariant after every event, under every policy."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scenario import K, M, attrs, host, map_gpa, memslot, npf, psc, table

from upmtrace.engine import Engine, iter_rows, replay
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
    lambda base, dealloc, limit, gmem, shared, dm, prefault: PRESETS[base].with_overrides(
        {"dealloc": dealloc, "lazy_limit": limit, "gmem_page": gmem, "shared_page": shared,
         "directmap": dm, "prefault": prefault}),
    st.sampled_from(sorted(PRESETS)), st.sampled_from(KNOBS["dealloc"][0]),
    st.sampled_from([0, 4 * K, 64 * K]), st.sampled_from(["4k", "2m"]),
    st.sampled_from(["4k", "2m"]), st.sampled_from(KNOBS["directmap"][0]), st.booleans())


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
        assert set(report["cost"]) >= {"total_ns", "by_category"}
        assert isinstance(Policy(**policy.to_json()), Policy)
