"""cost.by_exit: the estimate split by the exit that caused the work (docs/report.md)."""

from __future__ import annotations

from pathlib import Path

import pytest
from scenario import attrs, map_gpa, memslot, npf, psc, table

from upmtrace.costs import DEFAULTS, default_costs
from upmtrace.engine import replay
from upmtrace.policy import PRESETS
from upmtrace.trace.io import read_trace

TRACES = sorted((Path(__file__).parent.parent / "traces").glob("*.parquet"))
REASONS = {"npf", "vmgexit", "tdvmcall", "vmcall", "KVM_EXIT_MEMORY_FAULT",
           "KVM_EXIT_HYPERCALL", "none"}
M2 = 2 << 20

# one decimal digit per category: every by_exit value spells out what it counted
DIGITS = {"vm_exit": 1, "userspace_exit": 10, "attribute_call": 100, "page_allocated": 1_000,
          "page_freed": 10_000, "rmp_update_4k": 100_000, "directmap_split": 1_000_000,
          "mapping_4k": 10_000_000}


def digits() -> dict[str, int]:
    return {name: DIGITS.get(name, 0) for name in DEFAULTS}


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("path", TRACES, ids=lambda p: p.stem)
def test_by_exit_adds_up_to_the_total_on_both_paths(path, preset):
    trace = read_trace(path)
    fast = replay(trace, PRESETS[preset]).report["cost"]
    assert set(fast["by_exit"]) == REASONS
    assert sum(fast["by_exit"].values()) == fast["total_ns"]
    reference = replay(trace, PRESETS[preset], reference=True).report["cost"]
    assert reference["by_exit"] == fast["by_exit"]


def test_by_exit_adds_up_with_fractional_costs():
    trace = read_trace(TRACES[0])
    costs = {name: ns + 0.37 for name, ns in default_costs().items()}
    cost = replay(trace, PRESETS["lazy"], costs=costs).report["cost"]
    assert sum(cost["by_exit"].values()) == cost["total_ns"]


@pytest.mark.parametrize("reference", [False, True])
def test_the_attribution_rule(reference):
    """An implicit conversion: the conversion is the memory-fault exit's work, the mapping of
    the retried access the npf's; a PSC run's conversion is the hypercall exit's; the VMM's
    own marking is nobody's."""
    rows = table(memslot(0, 0, M2), attrs(0, M2, True),
                 npf(0x1000, True),  # allocate, RMP-private (splits the direct map), map
                 npf(0x1000, False),  # memory fault: convert (free, RMP back); retry: map
                 psc(0x2000, 0x1000, "shared"),  # vmgexit + hypercall exit: convert
                 map_gpa(0x3000, 0x1000, False))
    by_exit = replay(rows, PRESETS["eager"], platform="snp", costs=digits(),
                     reference=reference).report["cost"]["by_exit"]
    assert by_exit == {
        "npf": 3 * 1 + 2 * 1_000 + 100_000 + 1_000_000 + 2 * 10_000_000,
        "KVM_EXIT_MEMORY_FAULT": 10 + 100 + 10_000 + 100_000,
        "vmgexit": 2 * 1,  # the PSC request and the GHCB hypercall: their exits only
        "KVM_EXIT_HYPERCALL": 2 * (10 + 100),
        "tdvmcall": 0, "vmcall": 0,
        "none": 100,  # the attribute call of the set_attributes row
    }


def test_prefault_after_a_hypercall_is_the_hypercalls_work():
    rows = table(memslot(0, 0, M2), psc(0x2000, 0x1000, "private"))
    by_exit = replay(rows, PRESETS["prefault"], platform="snp",
                     costs=digits()).report["cost"]["by_exit"]
    # converting, then KVM_PRE_FAULT_MEMORY: allocate, RMP-private, split, map
    assert by_exit["KVM_EXIT_HYPERCALL"] == 10 + 100 + 1_000 + 100_000 + 1_000_000 + 10_000_000
    assert by_exit["npf"] == 0 and by_exit["vmgexit"] == 1
