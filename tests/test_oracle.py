"""The engine against the naive oracle (tests/oracle.py): random valid traces, every counter.

Traces are valid by construction (slots live in disjoint zones, so moving one never overlaps
another; sizes and addresses are 4 KiB aligned; ts never goes back), so every example is
replayed by both; the test checks after its examples that they were. Knobs, kinds and platforms are
all drawn. `UPMTRACE_FUZZ=long` (tests/conftest.py) runs many more examples.
"""

from __future__ import annotations

import oracle
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scenario import K, M, Reach, counters, examples, replay, table
from tracegen import PLATFORMS, knobs_strategy, trace_rows

from upmtrace.engine import replay as engine_replay
from upmtrace.policy import PRESETS

# The engine models `vfio` and `populate` (docs/model.md): flip when it does, and the
# differential draws them too. Until then the oracle's rules for them are pinned by the
# scenario tests below only.
ENGINE_HAS_VFIO_POPULATE = "vfio" in PRESETS["eager"].to_json()
VFIO_MODES = ("none", "pin-all", "on-convert")

reached = Reach()


def engine_counters(rows: list[dict], platform: str, knobs: dict) -> dict[str, int]:
    result = replay(*rows, platform=platform, **knobs)
    flat = counters(result)
    mem = result.report["memory"]
    for key in ("peak_resident_bytes", "peak_shared_bytes", "peak_private_bytes",
                "peak_duplicate_bytes", "final_resident_bytes", "touched_bytes"):
        flat[f"memory.{key}"] = mem[key]
    for group in ("populate", "vfio"):
        for key, value in result.report.get(group, {}).items():
            flat[f"{group}.{key}"] = value
    return flat


def batch_counters(rows: list[dict], platform: str, knobs: dict) -> dict[str, int]:
    """The same counters from the batch path (upmtrace.engine.fast), replay()'s default."""
    report = engine_replay(table(*rows), PRESETS["eager"].with_overrides(knobs),
                           platform=platform).report
    flat: dict[str, int] = {}

    def walk(prefix: str, node) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                walk(f"{prefix}{key}.", value)
            elif isinstance(value, int):
                flat[f"{prefix}{key}"] = value

    for group in ("exits", "npf", "conversions", "psc", "memory", "gmem", "rmp", "directmap",
                  "mappings", "host_access", "populate", "vfio"):
        walk(f"{group}.", report.get(group, {}))
    return flat


def differences(rows: list[dict], platform: str, knobs: dict) -> dict:
    """Counters where the reference engine (paranoid) or the batch path differs from the
    oracle: {path: {key: (got, want)}}."""
    want = oracle.replay(table(*rows).to_pylist(), platform, knobs)
    found = {}
    for path, got in (("reference", engine_counters(rows, platform, knobs)),
                      ("batch", batch_counters(rows, platform, knobs))):
        diff = {key: (got.get(key), want[key]) for key in want if got.get(key) != want[key]
                and (ENGINE_HAS_VFIO_POPULATE or key.split(".")[0] not in ("populate", "vfio"))}
        if diff:
            found[path] = diff
    return found


@settings(max_examples=examples(150), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(platform=st.sampled_from(PLATFORMS),
       knobs=knobs_strategy(ENGINE_HAS_VFIO_POPULATE, VFIO_MODES),
       rows=trace_rows(ENGINE_HAS_VFIO_POPULATE))
def agrees_with_the_oracle(platform, knobs, rows):
    reached.examples += 1
    diff = differences(rows, platform, knobs)
    reached.replayed += 1
    assert not diff, f"engine vs oracle (got, want): {diff}"


@pytest.mark.hypothesis
def test_the_engine_agrees_with_the_oracle_on_every_counter():
    reached.run(agrees_with_the_oracle)


# --- the oracle's own rules, stated -----------------------------------------------------------

def o(*rows: dict, platform: str = "snp", **knobs) -> dict[str, int]:
    full = PRESETS["eager"].to_json() | {"vfio": "none"} | knobs
    return oracle.replay(table(*rows).to_pylist(), platform, full)


@pytest.mark.parametrize("rows, want", [
    # a 4 KiB private fault on a fresh private slot: one exit, one page, one 4 KiB RMP update
    ([{"kind": "memslot", "vcpu": -1, "slot": 0, "gpa": 0, "size": 2 * M, "gmem": True},
      {"kind": "set_attributes", "vcpu": -1, "gpa": 0, "size": 2 * M, "private": True},
      {"kind": "npf", "vcpu": 0, "gpa": 4 * K, "private": True}],
     {"exits.vm.npf": 1, "mappings.4k": 1, "rmp.updates_4k": 1, "directmap.splits": 1,
      "memory.peak_private_bytes": 4 * K, "conversions.set_attributes_calls": 1,
      "conversions.to_private_pages": 512}),
])
def test_oracle_rules(rows, want):
    got = o(*rows)
    assert {k: got[k] for k in want} == want


def populate(gpa: int, size: int) -> dict:
    return {"kind": "populate", "vcpu": -1, "gpa": gpa, "size": size}


SLOT4 = {"kind": "memslot", "vcpu": -1, "slot": 0, "gpa": 0, "size": 4 * M, "gmem": True}


def private(gpa: int, size: int) -> dict:
    return {"kind": "set_attributes", "vcpu": -1, "gpa": gpa, "size": size, "private": True}


def psc_row(gpa: int, size: int, op: str, req: int) -> dict:
    return {"kind": "psc", "vcpu": 0, "req": req, "gpa": gpa, "size": size, "op": op}


def nonzero(counters: dict[str, int]) -> dict[str, int]:
    return {key: value for key, value in counters.items() if value}


def test_oracle_populate_on_snp_leaves_4k_rmp_entries_that_keep_mappings_at_4k():
    """4 launch pages (4 KiB RMP updates, no folio); the first private fault then gives the
    block a folio (508 more pages, 4 KiB updates: the block is not wholly RMP-shared) and maps
    at 4 KiB although all 512 attributes are private: the block holds 4 KiB RMP entries."""
    got = o(SLOT4, private(0, 2 * M), populate(0, 16 * K),
            {"kind": "npf", "vcpu": 0, "gpa": 0, "private": True}, gmem_page="2m")
    assert nonzero(got) == {
        "exits.vm.npf": 1, "exits.vm_total": 1, "npf.recorded": 1,
        "conversions.set_attributes_calls": 1, "conversions.to_private_pages": 512,
        "rmp.updates_4k": 512, "directmap.splits": 1, "mappings.4k": 1, "populate.calls": 1,
        "populate.pages": 4, "memory.peak_resident_bytes": 2 * M,
        "memory.peak_private_bytes": 2 * M, "memory.final_resident_bytes": 2 * M,
        "memory.touched_bytes": 2 * M}


def test_oracle_populate_skips_shared_pages_and_pages_outside_guest_memfd():
    got = o(SLOT4, private(0, 2 * M), populate(2 * M - 8 * K, 16 * K), populate(64 * M, 4 * K))
    assert (got["populate.calls"], got["populate.pages"], got["populate.skipped_pages"]) == \
        (2, 2, 3)
    assert got["rmp.updates_4k"] == 2 and got["memory.final_resident_bytes"] == 8 * K


def test_oracle_populate_on_tdx_maps_the_pages_private():
    got = o(SLOT4, private(0, 2 * M), populate(0, 8 * K),
            {"kind": "npf", "vcpu": 0, "gpa": 0, "private": True}, platform="tdx")
    assert (got["mappings.4k"], got["npf.avoided"], got["exits.vm.npf"]) == (2, 1, 0)
    assert got["rmp.updates_4k"] == 0


def test_oracle_vfio_pin_all_keeps_both_copies_until_the_slot_goes():
    got = o(SLOT4, private(0, 4 * M), psc_row(0, 16 * K, "shared", 1),
            psc_row(0, 16 * K, "private", 2), {**SLOT4, "size": 0}, vfio="pin-all")
    assert (got["vfio.dma_map_calls"], got["vfio.dma_unmap_calls"]) == (1, 1)
    assert got["vfio.pinned_peak_bytes"] == got["memory.peak_shared_bytes"] == 4 * M
    assert got["vfio.pinned_final_bytes"] == got["memory.final_resident_bytes"] == 0


def test_oracle_vfio_on_convert_maps_what_is_shared_and_unmaps_it_on_private():
    got = o(SLOT4, private(0, 4 * M), psc_row(0, 16 * K, "shared", 1),
            psc_row(0, 16 * K, "private", 2), vfio="on-convert")
    assert (got["vfio.dma_map_calls"], got["vfio.dma_unmap_calls"]) == (1, 1)
    assert got["vfio.pinned_peak_bytes"] == got["memory.peak_shared_bytes"] == 16 * K
    assert got["vfio.pinned_final_bytes"] == got["memory.final_resident_bytes"] == 0


# --- the batch path's array lookups ----------------------------------------------------------

def scattered_npf_run(seed: int) -> list[dict]:
    """Two slots with a gap (one without guest_memfd), private attribute runs with edges inside
    blocks, then 300 npf rows on pages drawn around every edge: non-contiguous (more pieces than
    the batch path sweeps), mixed privacy, some outside any slot, some converting. Such a run
    goes through the batch path's vectorised lookups (AttributeMap.lookup, Memslots.lookup)."""
    import random

    rng = random.Random(seed)
    rows = [
        {"kind": "memslot", "vcpu": -1, "slot": 0, "gpa": 0, "size": 8 * M, "gmem": True},
        {"kind": "memslot", "vcpu": -1, "slot": 1, "gpa": 12 * M, "size": 4 * M,
         "gmem": False},
        private(2 * M, 2 * M),
        private(5 * M + 12 * K, 20 * K),
        private(7 * M - 4 * K, 4 * K),
    ]
    edges = [0, 2 * M, 4 * M, 5 * M + 12 * K, 5 * M + 32 * K, 7 * M - 4 * K, 8 * M, 12 * M,
             16 * M, 3 * M]
    gpas = [max(0, rng.choice(edges) + rng.randrange(-3, 3) * 4 * K) for _ in range(300)]
    for i, gpa in enumerate(gpas):
        rows.append({"kind": "npf", "vcpu": 0, "gpa": gpa,
                     "private": rng.random() < 0.5 if i % 7 else True})
    return rows


@pytest.mark.parametrize("platform", ["snp", "tdx", "sw"])
@pytest.mark.parametrize("policy", ["eager", "lazy", "hugepool", "inplace"])
@pytest.mark.parametrize("seed", [1, 2])
def test_scattered_npf_runs_through_the_batch_lookups_agree_with_the_oracle(platform, policy,
                                                                           seed):
    knobs = {k: v for k, v in PRESETS[policy].to_json().items() if k != "name"}
    diff = differences(scattered_npf_run(seed), platform, knobs)
    assert not diff, f"engine vs oracle (got, want): {diff}"


def test_the_scattered_run_goes_through_the_batch_lookups(monkeypatch):
    """The test above is only worth its name if the batch path really takes the lookups."""
    from upmtrace.model.attributes import AttributeMap
    from upmtrace.model.memslots import Memslots

    calls = {"attrs": 0, "slots": 0}
    attrs_lookup, slots_lookup = AttributeMap.lookup, Memslots.lookup

    def count(name, real):
        def wrapper(self, gfns):
            calls[name] += 1
            return real(self, gfns)
        return wrapper

    monkeypatch.setattr(AttributeMap, "lookup", count("attrs", attrs_lookup))
    monkeypatch.setattr(Memslots, "lookup", count("slots", slots_lookup))
    batch_counters(scattered_npf_run(1), "snp", {})
    assert calls["attrs"] >= 1 and calls["slots"] >= 1, calls
