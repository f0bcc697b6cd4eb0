"""Limits: address ranges that would need absurd memory if the model were dense.

The model keeps state per touched 2 MiB block (bitmaps in dicts) and attributes as runs, so a
4 TiB guest_memfd slot, or slots spanning all 2^52 bytes of guest-physical space, cost memory
in proportion to the pages touched, never to the size of the slots. These are memory bounds
(RSS, entries of the model's maps), never time assertions.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
from scenario import K, M, attrs, host, map_gpa, memslot, npf, psc, table

from upmtrace.engine import replay
from upmtrace.engine.reference import Engine, iter_rows
from upmtrace.errors import UpmtraceError
from upmtrace.model import machine
from upmtrace.policy import PRESETS
from upmtrace.trace.io import read_trace, write_trace
from upmtrace.trace.schema import GPA_LIMIT, Platform

T = 1 << 40
SLOT = 4 * T  # one 4 TiB guest_memfd slot
FAULTS = 3000


def huge_trace_rows(seed: int = 0) -> list[dict]:
    """A 4 TiB guest_memfd slot marked private (as QEMU does), a second slot reaching the 2^52
    limit, and a few thousand faults, PSC entries, MapGPAs and host accesses scattered over
    both: touched pages are a few thousand, the slots span 2^52 bytes."""
    rng = random.Random(seed)
    top = GPA_LIMIT - SLOT
    rows = [memslot(0, 0, SLOT), attrs(0, SLOT, True), memslot(1, SLOT, top, True),
            attrs(SLOT, top, True)]
    for _ in range(FAULTS):
        gfn = rng.randrange(GPA_LIMIT >> 12) if rng.random() < 0.2 else rng.randrange(SLOT >> 12)
        rows.append(npf((gfn << 12) + rng.randrange(4096), rng.random() < 0.8,
                        vcpu=rng.randrange(8)))
    for req in range(200):
        block = rng.randrange(SLOT >> 21)
        rows.append(psc(block << 21, 2 * M, rng.choice(["shared", "private"]), req=req))
        rows.append(psc((block << 21) + 4 * K, 4 * K, "shared", req=req))
    for _ in range(100):
        rows.append(map_gpa(rng.randrange(SLOT >> 12) << 12, 64 * K, rng.random() < 0.5))
        rows.append(host(rng.randrange(GPA_LIMIT >> 12) << 12, 16 * K))
    rows += [npf(GPA_LIMIT - 4 * K, True), npf(GPA_LIMIT - 4 * K, False),
             host(GPA_LIMIT - 8 * K, 8 * K), memslot(1, 0, 0), memslot(0, 0, 0)]
    return rows


RSS_SCRIPT = """
import json, resource, sys
from upmtrace.engine import replay
from upmtrace.policy import PRESETS
from upmtrace.trace.io import read_trace

trace = read_trace(sys.argv[1])
exits = {}
for name, policy in PRESETS.items():
    for platform in ("snp", "tdx", "sw"):
        exits[f"{name}/{platform}"] = replay(trace, policy, platform=platform).get(
            "exits.vm_total")
print(json.dumps({"maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "exits": exits}))
"""


def test_a_4_tib_slot_and_2_52_bytes_of_slots_replay_in_small_memory(tmp_path):
    """Every preset on every platform, in a fresh process whose peak RSS is measured."""
    path = tmp_path / "huge.parquet"
    write_trace(table(*huge_trace_rows()), path)
    done = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(path)], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["maxrss_kib"] < 1 << 20, f"peak RSS {result['maxrss_kib']} KiB"
    assert all(n >= FAULTS for n in result["exits"].values()), result["exits"]


@pytest.mark.parametrize("platform", list(Platform))
@pytest.mark.parametrize("name", sorted(PRESETS))
def test_model_state_grows_with_touched_blocks_not_with_slot_size(name, platform):
    eng = Engine(PRESETS[name], platform)
    rows = huge_trace_rows(seed=1)[:-2]  # keep the slots: look at the state they hold
    eng.run(iter_rows(table(*rows)))
    m = eng.m
    bound = 2 * len(rows)  # a row touches at most a block or two in these traces
    sizes = {"shared pages": len(m.pools[0].pages), "private pages": len(m.pools[1].pages),
             "huge maps": len(m.maps.huge), "small shared maps": len(m.maps.small[0]),
             "small private maps": len(m.maps.small[1]), "rmp": len(m.rmp.private),
             "direct map": len(m.directmap.regions), "touched": len(m.touched),
             "attribute runs": len(m.attrs._starts)}
    assert max(sizes.values()) <= bound, sizes
    assert m.touched_pages <= 512 * bound


def test_a_huge_trace_read_from_a_file_touches_what_its_rows_touch(tmp_path):
    path = tmp_path / "huge.parquet"
    rows = huge_trace_rows(seed=2)
    write_trace(table(*rows), path)
    report = replay(read_trace(path), PRESETS["hugepool"]).report  # 2 MiB folios
    assert report["memory"]["touched_bytes"] <= 2 * len(rows) * 2 * M


# --- what is not sparse yet: handed to the engine's owner ---------------------------------------


class NotSparse(AssertionError):
    pass


def bounded(monkeypatch, cls, name: str, limit: int) -> None:
    """Make cls.name fail after `limit` calls: work in proportion to a range, not to state."""
    original = getattr(cls, name)
    calls = [0]

    def counted(*args, **kwargs):
        calls[0] += 1
        if calls[0] > limit:
            raise NotSparse(f"{cls.__name__}.{name} called more than {limit:,} times")
        return original(*args, **kwargs)

    monkeypatch.setattr(cls, name, counted)


def replay_or_refuse(rows: list[dict], policy: str, platform: str = "snp") -> None:
    """Either replays, or refuses with a clear UpmtraceError naming the limit."""
    try:
        replay(table(*rows), PRESETS[policy], platform=platform)
    except UpmtraceError as err:
        assert "limit" in str(err), str(err)


BIG = GPA_LIMIT - 4 * T  # a slot from 4 TiB to the 2^52 limit: 2^31 blocks


def test_aligned_2m_dealloc_of_a_huge_range_visits_only_resident_blocks(monkeypatch):
    bounded(monkeypatch, machine.Machine, "free_range", 10_000)
    replay_or_refuse([memslot(0, 4 * T, BIG), npf(4 * T, False),
                      map_gpa(4 * T, BIG, True)], "hugepool")


def test_prefault_of_a_huge_range_is_sparse_or_refused(monkeypatch):
    bounded(monkeypatch, machine.Machine, "_allocated", 100_000)
    replay_or_refuse([memslot(0, 4 * T, BIG, True), map_gpa(4 * T, BIG, True)], "prefault")


def test_host_access_of_a_huge_range_is_sparse_or_refused(monkeypatch):
    bounded(monkeypatch, machine.Machine, "_allocated", 100_000)
    replay_or_refuse([memslot(0, 4 * T, BIG, True), host(4 * T, BIG)], "eager")


def test_tdx_map_gpa_cuts_2_mib_chunks_by_spec():
    """TDX MapGPA: one exit and conversion per 2 MiB chunk. A 1 GiB MapGPA is 512 of them; this
    work grows with the range by definition (memory does not: the conversions are runs)."""
    report = replay(table(memslot(0, 0, 4 * T), map_gpa(0, 1 << 30, True)), platform="tdx")
    assert report.get("exits.userspace.KVM_EXIT_HYPERCALL") == 512


def test_info_on_slots_spanning_2_52_bytes(tmp_path):
    from upmtrace.trace.info import summarize

    path = Path(tmp_path) / "span.jsonl"
    write_trace(table(memslot(0, 0, SLOT), memslot(1, SLOT, GPA_LIMIT - SLOT)), path)
    summary = summarize(read_trace(path))
    assert summary["memslot_bytes"] == summary["gmem_bytes"] == GPA_LIMIT


def test_the_populate_limit_is_one_clear_line(tmp_path):
    from click.testing import CliRunner

    from upmtrace.cli import cli

    path = tmp_path / "huge.parquet"
    write_trace(table(memslot(0, 4 * T, 2 * T, True), host(4 * T, 2 * T)), path)
    result = CliRunner().invoke(cli, ["replay", str(path)])
    assert result.exit_code == 3
    assert result.output.strip() == (
        "Error: host_access of 0x20000000000 bytes at gpa 0x40000000000 would populate more "
        "than the model's limit of 1 TiB in one event")
