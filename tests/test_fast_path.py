"""The batch path (upmtrace.engine.fast) and the row-by-row reference give identical reports."""

from __future__ import annotations

from pathlib import Path

import pytest
from gen_ftrace_log import Costs, generate
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scenario import K, M, attrs, host, memslot, npf, populate, psc, table
from test_engine_properties import policies, valid_slots
from test_latency import imported

from upmtrace.engine import fast, replay, replay_many
from upmtrace.model.attributes import AttributeMap
from upmtrace.policy import KNOBS, PRESETS
from upmtrace.timeline import Timeline
from upmtrace.trace.io import read_trace
from upmtrace.trace.synth import WORKLOADS, synthesize

SAMPLES = sorted(Path(__file__).parent.parent.joinpath("traces").glob("*.parquet"))

gfn = st.integers(0, 4 * M // (4 * K) - 1)
fault_run = st.lists(st.builds(lambda g, p: npf(g * 4 * K + 8, p), gfn, st.booleans()),
                     min_size=1, max_size=60)
page_sweep = st.builds(lambda start, n, p: [npf((start + i) * 4 * K, p) for i in range(n)],
                       gfn, st.integers(1, 700), st.booleans())
other = st.one_of(
    st.builds(attrs, gfn.map(lambda g: g * 4 * K), st.integers(1, 600).map(lambda n: n * 4 * K),
              st.booleans()),
    st.builds(lambda g, n, op: [psc(g * 4 * K, n * 4 * K, op, req=9)], gfn, st.integers(1, 8),
              st.sampled_from(["private", "shared"])),
    st.builds(lambda b, op: [psc(b * 2 * M, 2 * M, op, req=5)], st.integers(0, 1),
              st.sampled_from(["private", "shared", "psmash"])),
    st.builds(host, gfn.map(lambda g: g * 4 * K), st.integers(1, 4).map(lambda n: n * 4 * K)),
    st.builds(populate, gfn.map(lambda g: g * 4 * K), st.integers(1, 600).map(lambda n: n * 4 * K)),
    st.builds(memslot, st.integers(0, 2), st.integers(0, 2).map(lambda b: b * 2 * M),
              st.integers(0, 3).map(lambda n: n * M), st.booleans()),
)
slot_rows = st.lists(st.builds(lambda s, start, n, gmem: memslot(s, start * M, n * M, gmem),
                               st.integers(0, 2), st.integers(0, 3), st.integers(1, 4),
                               st.booleans()), min_size=1, max_size=2)


def flatten(parts):
    rows = []
    for part in parts:
        rows.extend(part if isinstance(part, list) else [part])
    return rows


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(slot_rows, st.lists(st.one_of(fault_run, page_sweep, other), max_size=12), policies,
       st.sampled_from(["snp", "tdx", "sw"]), st.integers(1, 5), st.integers(1, 9))
def test_batch_path_matches_reference(monkeypatch_module, slots, parts, policy, platform,
                                      min_run, chunk):
    monkeypatch_module.setattr(fast, "MIN_RUN", min_run)
    monkeypatch_module.setattr(fast, "CHUNK", chunk * 64)
    t = table(*valid_slots([*slots, attrs(0, 8 * M), *flatten(parts)]))
    ref = replay(t, policy, platform=platform, reference=True).to_json()
    assert replay(t, policy, platform=platform, batch_rows=97).to_json() == ref
    assert replay(t, policy, platform=platform).to_json() == ref


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@pytest.mark.parametrize("vfio", KNOBS["vfio"][0])
@pytest.mark.parametrize("workload", sorted(WORKLOADS))
def test_every_workload_under_every_preset(workload, vfio):
    """The shipped samples' workloads, synthesised at 256 MiB to keep the suite quick."""
    synth = synthesize(workload, memory=256 * M, vcpus=2, seed=1, platform=None)
    for preset in PRESETS.values():
        policy = preset.with_overrides({"vfio": vfio})
        ref = replay(synth.table, policy, platform=synth.platform, reference=True).to_json()
        assert replay(synth.table, policy, platform=synth.platform).to_json() == ref, policy.name


def test_timeline_is_the_same_on_both_paths():
    trace = read_trace(SAMPLES[0])
    a, b = Timeline.over(trace.table, 50), Timeline.over(trace.table, 50)
    replay(trace, PRESETS["lazy"], timeline=a, reference=True)
    replay(trace, PRESETS["lazy"], timeline=b)
    assert a.samples == b.samples and len(a.samples) > 10


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(slot_rows, st.lists(st.one_of(fault_run, page_sweep, other), max_size=12), policies,
       st.sampled_from(["snp", "tdx", "sw"]), st.integers(1, 4))
def test_short_runs_swept_in_pieces_match_reference(monkeypatch_module, slots, parts, policy,
                                                    platform, pieces):
    """Every npf run taken by the short path (contiguous pieces swept a block at a time) or, with
    few pieces allowed, by the chunk path's general grouping."""
    monkeypatch_module.setattr(fast, "MIN_RUN", 10_000)
    monkeypatch_module.setattr(fast, "MAX_PIECES", pieces)
    t = table(*valid_slots([*slots, attrs(0, 8 * M), *flatten(parts)]))
    ref = replay(t, policy, platform=platform, reference=True).to_json()
    assert replay(t, policy, platform=platform, batch_rows=97).to_json() == ref
    monkeypatch_module.setattr(fast, "MIN_RUN", 1)
    assert replay(t, policy, platform=platform).to_json() == ref


@pytest.mark.parametrize("workload", ["lazy-accept", "dma-churn", "tdx-boot"])
def test_replay_many_gives_each_policy_its_own_replay(workload):
    """One pass over the trace feeding every engine: the same reports as separate replays,
    also with batches cut small and under vfio."""
    synth = synthesize(workload, memory=256 * M, vcpus=2, seed=2, platform=None)
    policies = [*PRESETS.values(), PRESETS["lazy"].with_overrides({"vfio": "on-convert"})]
    policies = [p for i, p in enumerate(policies) if p not in policies[:i]]
    alone = [replay(synth.table, p, platform=synth.platform).to_json() for p in policies]
    together = replay_many(synth.table, policies, platform=synth.platform, batch_rows=1000)
    assert [r.to_json() for r in together] == alone


@given(st.lists(st.tuples(st.integers(0, 2048), st.integers(1, 700), st.booleans()),
                max_size=12), st.integers(0, 2048), st.integers(1, 512))
def test_block_bitmap_is_the_private_runs_as_bits(ranges, base, pages):
    attrs = AttributeMap()
    for g0, n, private in ranges:
        attrs.set_range(g0, g0 + n, private)
    bits = sum(1 << (g - base) for g in range(base, base + pages) if attrs.is_private(g))
    assert attrs.block_bitmap(base, pages) == bits


def test_replay_many_carries_the_recorded_timing_to_every_policy(tmp_path):
    trace, _ = imported(tmp_path, generate(vcpus=3, rounds=6, costs=Costs(jitter=130)))
    policies = [PRESETS["eager"], PRESETS["lazy"], PRESETS["inplace"]]
    together = replay_many(trace, policies)
    assert "timing" in together[0].report
    assert [r.to_json() for r in together] == [replay(trace, p).to_json() for p in policies]


def test_the_package_keeps_replay_and_result_at_its_top_level():
    """upmtrace.replay is the function, whatever was imported before (no subpackage of that
    name shadows it); the engine's modules are upmtrace.engine.reference and .fast."""
    import upmtrace
    import upmtrace.engine.fast  # noqa: F401  (importing submodules changes nothing)
    from upmtrace.engine import reference

    assert upmtrace.replay is replay and upmtrace.Result is reference.Result
    assert upmtrace.replay_many is replay_many and fast.run_batches
    assert upmtrace.PRESETS is PRESETS


def test_the_cli_starts_without_pyarrow_or_numpy():
    """`upmtrace --help` stays fast to start: the CLI imports the engine only when a command
    needs it."""
    import subprocess
    import sys

    code = ("import sys, upmtrace.cli; "
            "print(sorted(m for m in ('pyarrow', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out == "[]\n"
