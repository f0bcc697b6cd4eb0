"""Synthetic workloads: valid, deterministic, scaled, and true to the guest behaviour they model."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from upmtrace.cli import cli
from upmtrace.trace.io import read_trace, write_trace
from upmtrace.trace.schema import BLOCK_SIZE, MSR_REQ, PAGE_SIZE, SCHEMA
from upmtrace.trace.synth import WORKLOADS, synthesize
from upmtrace.trace.synth.launch import KERNEL_BYTES, KERNEL_GPA, SNP_LAUNCH, TDX_LAUNCH
from upmtrace.trace.synth.layout import (
    DEVICES,
    FIRMWARE_GPA,
    FIRMWARE_SIZE,
    HIGH_RAM_BASE,
    RING_PAGES,
    boot_accepted_bytes,
    swiotlb_bytes,
)

ROOT = Path(__file__).resolve().parent.parent
MiB, GiB = 1 << 20, 1 << 30


def columns(table: pa.Table) -> dict[str, np.ndarray]:
    """Every column as numpy; dictionary columns decoded to str (None for null)."""
    out = {}
    for name in table.column_names:
        col = table.column(name).combine_chunks()
        if pa.types.is_dictionary(col.type):
            col = col.dictionary_decode()
        out[name] = np.array(col.to_pylist(), dtype=object) if col.null_count or \
            pa.types.is_string(col.type) else col.to_numpy(zero_copy_only=False)
    return out


def requests(c: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Row indices of each GHCB PSC request (consecutive psc rows sharing vcpu and req)."""
    at = np.flatnonzero((c["kind"] == "psc") & (c["req"] != MSR_REQ))
    if len(at) == 0:
        return []
    key = np.stack([at, c["vcpu"][at].astype(np.int64), c["req"][at].astype(np.int64)], axis=1)
    cut = np.flatnonzero((np.diff(key[:, 0]) != 1) | np.any(np.diff(key[:, 1:], axis=0), 1))
    return np.split(at, cut + 1)


@pytest.fixture(scope="module")
def synths() -> dict[str, dict[str, np.ndarray]]:
    return {name: columns(synthesize(name, memory=1 * GiB, vcpus=3, seed=7).table)
            for name in WORKLOADS}


# --- every workload ------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(WORKLOADS))
def test_every_workload_writes_a_valid_trace(name, tmp_path):
    result = synthesize(name, memory=512 * MiB, vcpus=2, seed=1)
    assert result.table.schema.equals(SCHEMA)
    path = tmp_path / f"{name}.parquet"
    write_trace(result.table, path, platform=result.platform, source=result.source)
    trace = read_trace(path)
    assert trace.events == result.table.num_rows > 0
    assert trace.platform == WORKLOADS[name].platform
    assert trace.source == (f"upmtrace synth {name} --memory 512M --vcpus 2 --seed 1 "
                            f"--platform {trace.platform}")


@pytest.mark.parametrize("name", list(WORKLOADS))
def test_same_seed_same_bytes_other_seed_other_bytes(name, tmp_path):
    def make(seed: int, out: str) -> bytes:
        result = synthesize(name, memory=256 * MiB, vcpus=2, seed=seed)
        write_trace(result.table, tmp_path / out, platform=result.platform, source=result.source)
        return (tmp_path / out).read_bytes()

    first = make(3, "a.parquet")
    assert make(3, "b.parquet") == first
    assert make(4, "c.parquet") != first


@pytest.mark.parametrize("name", list(WORKLOADS))
def test_more_memory_more_rows(name):
    rows = [synthesize(name, memory=m, vcpus=4, seed=0).table.num_rows for m in (GiB, 2 * GiB)]
    assert rows[1] > rows[0]


@pytest.mark.parametrize("name", list(WORKLOADS))
def test_ghcb_requests_are_well_formed(name, synths):
    c = synths[name]
    assert np.all(np.diff(c["ts"]) >= 0)
    last_id: dict[int, int] = {}
    for rows in requests(c):
        assert len(rows) <= 64
        assert len(set(c["op"][rows])) == 1
        size, gpa = c["size"][rows].astype(np.int64), c["gpa"][rows].astype(np.int64)
        assert set(size) <= {PAGE_SIZE, BLOCK_SIZE}
        assert np.all(gpa[size == BLOCK_SIZE] % BLOCK_SIZE == 0)
        vcpu, req = int(c["vcpu"][rows[0]]), int(c["req"][rows[0]])
        assert req == last_id.get(vcpu, -1) + 1  # ids count up per vCPU in replay order
        last_id[vcpu] = req


def test_every_workload_has_a_builder():
    from upmtrace.trace.synth.workloads import BUILDERS

    assert list(BUILDERS) == list(WORKLOADS)


def test_platform_override():
    assert synthesize("snp-boot", memory=256 * MiB, platform="sw").platform == "sw"
    assert synthesize("tdx-boot", memory=256 * MiB).platform == "tdx"


@pytest.mark.parametrize("memory", [100 * MiB, 3 * MiB + 1 * GiB, 512 * GiB])
def test_memory_outside_the_range_is_a_usage_error(memory):
    from upmtrace.errors import UsageError

    with pytest.raises(UsageError, match="--memory must be a multiple of 2 MiB"):
        synthesize("snp-boot", memory=memory)


@settings(max_examples=8, deadline=None)
@given(name=st.sampled_from(list(WORKLOADS)), vcpus=st.integers(1, 64),
       seed=st.integers(0, 2**32), memory=st.sampled_from([256 * MiB, 2 * GiB + 2 * MiB]))
def test_any_parameters_give_ordered_requests_of_at_most_64_entries(name, vcpus, seed, memory):
    c = columns(synthesize(name, memory=memory, vcpus=vcpus, seed=seed).table)
    assert np.all(np.diff(c["ts"]) >= 0)
    assert all(len(rows) <= 64 for rows in requests(c))
    assert set(c["vcpu"]) <= set(range(-1, vcpus))


@pytest.mark.parametrize("name", list(WORKLOADS))
def test_every_fault_happens_under_upstream_behaviour(name):
    """Replayed under the eager preset (upstream KVM + QEMU), no recorded fault is avoided,
    unresolvable or MMIO, and no PSC request is invalid: the trace is what such a guest does."""
    from upmtrace.engine import replay
    from upmtrace.policy import load_policy

    result = synthesize(name, memory=256 * MiB, vcpus=2, seed=0)
    report = replay(result.table, load_policy("eager"), platform=result.platform).report
    assert report["npf"]["recorded"] > 0
    assert (report["npf"]["avoided"], report["npf"]["unresolvable"], report["npf"]["mmio"],
            report["psc"]["invalid"]) == (0, 0, 0, 0)


# --- snp-boot --------------------------------------------------------------------------------


@pytest.mark.parametrize(("memory", "expected"), [
    (256 * MiB, 64 * MiB), (1 * GiB, 64 * MiB), (2 * GiB, 124 * MiB), (4 * GiB, 246 * MiB),
    (16 * GiB, 984 * MiB), (64 * GiB, 1 * GiB)])
def test_swiotlb_is_6_percent_clamped_and_2m_rounded(memory, expected):
    assert swiotlb_bytes(memory) == expected


def test_snp_boot_memslots_are_qemu_like_and_marked_private():
    c = columns(synthesize("snp-boot", memory=3 * GiB, vcpus=2, seed=0).table)
    slots = c["kind"] == "memslot"
    got = sorted(zip(c["slot"][slots], c["gpa"][slots], c["size"][slots], c["gmem"][slots],
                     strict=True))
    assert got == [(0, 0, 2 * GiB, True), (1, HIGH_RAM_BASE, 1 * GiB, True),
                   (2, FIRMWARE_GPA, FIRMWARE_SIZE, True)]  # pc.bios on guest_memfd
    marks = c["kind"] == "set_attributes"
    slots = [(0, 2 * GiB, True), (FIRMWARE_GPA, FIRMWARE_SIZE, True),
             (HIGH_RAM_BASE, 1 * GiB, True)]
    launch = [(gpa, size, True) for gpa, size in SNP_LAUNCH]  # before each launch update
    assert sorted(zip(c["gpa"][marks], c["size"][marks], c["private"][marks],
                      strict=True)) == sorted(slots + launch)
    assert np.all(c["vcpu"][marks] == -1)


def test_snp_boot_shares_ghcb_by_msr_and_swiotlb_by_ghcb_requests():
    vcpus, memory = 3, 2 * GiB
    c = columns(synthesize("snp-boot", memory=memory, vcpus=vcpus, seed=0).table)
    msr = (c["kind"] == "psc") & (c["req"] == MSR_REQ)
    assert set(c["op"][msr]) == {"shared"} and set(c["size"][msr]) == {PAGE_SIZE}
    assert msr.sum() == 2 * vcpus + 1  # GHCB and steal time per vCPU, one kvmclock page
    assert len(set(c["gpa"][msr])) == msr.sum()
    shared = [r for r in requests(c) if c["op"][r[0]] == "shared"]
    swiotlb_rows = np.concatenate(shared)
    # SWIOTLB, then the virtio rings (4 KiB entries) at driver probe
    assert c["size"][swiotlb_rows].sum() == swiotlb_bytes(memory) + DEVICES * RING_PAGES * 4096
    # every RAM page not shared before the touch phase is faulted private exactly once
    # (pages the launch populated too: on SNP populating maps nothing)
    ram = (c["gpa"] < FIRMWARE_GPA) | (c["gpa"] >= HIGH_RAM_BASE)
    private = c["gpa"][(c["kind"] == "npf") & (c["private"] == True) & ram]  # noqa: E712
    assert len(private) == len(set(private)) == (memory // PAGE_SIZE
                                                 - swiotlb_bytes(memory) // PAGE_SIZE
                                                 - (2 * vcpus + 1))
    host = c["agent"][c["kind"] == "host_access"]
    assert {"virtio", "kvmclock", "ghcb"} <= set(host)


def test_snp_boot_accepts_with_psc_to_private_before_touching(synths):
    c = synths["snp-boot"]
    accept = [r for r in requests(c) if c["op"][r[0]] == "private"]
    assert accept
    for rows in accept:
        pages = sum(int(s) // PAGE_SIZE for s in c["size"][rows])
        after = np.arange(rows[-1] + 1, rows[-1] + 1 + pages)
        assert np.all(c["kind"][after] == "npf") and np.all(c["private"][after] == True)  # noqa: E712
        assert np.all(c["vcpu"][after] == c["vcpu"][rows[0]])


# --- lazy-accept -----------------------------------------------------------------------------


def test_lazy_accept_takes_4m_chunks_each_followed_by_1024_private_faults(synths):
    c = synths["lazy-accept"]
    boot = boot_accepted_bytes(GiB)
    chunks = [r for r in requests(c) if len(r) == 2 and c["op"][r[0]] == "private"
              and c["gpa"][r[0]] >= boot]  # (at boot, a 2-page run between launch pages)
    assert len(chunks) > 10
    for rows in chunks:
        gpa = int(c["gpa"][rows[0]])
        assert list(c["size"][rows]) == [BLOCK_SIZE, BLOCK_SIZE]
        assert int(c["gpa"][rows[1]]) == gpa + BLOCK_SIZE and gpa % (4 * MiB) == 0
        assert gpa >= boot
        after = np.arange(rows[-1] + 1, rows[-1] + 1025)
        assert np.all(c["kind"][after] == "npf") and np.all(c["private"][after] == True)  # noqa: E712
        assert np.all(c["vcpu"][after] == c["vcpu"][rows[0]])
        assert list(c["gpa"][after]) == list(range(gpa, gpa + 4 * MiB, PAGE_SIZE))
    starts = [int(c["gpa"][r[0]]) for r in chunks]
    assert starts == sorted(starts) and starts[0] == boot  # address order, from the boot edge
    touched = len(set(c["gpa"][(c["kind"] == "npf") & (c["private"] == True)]))  # noqa: E712
    assert 0.5 <= touched * PAGE_SIZE / GiB <= 0.9 + 4 * MiB / GiB


def test_lazy_accept_interleaves_dma_with_acceptance(synths):
    c = synths["lazy-accept"]
    chunk_rows = [r[0] for r in requests(c) if len(r) == 2]
    virtio = np.flatnonzero(c["agent"] == "virtio")
    assert virtio[0] < chunk_rows[-1] and virtio[-1] > chunk_rows[0]


# --- dma-churn, tdx-boot, implicit ----------------------------------------------------------


def test_dma_churn_shares_each_buffer_then_takes_it_back(synths):
    c = synths["dma-churn"]
    runtime = requests(c)[-2000:]  # the trace ends with buffer cycles: (shared, private) pairs
    pairs = list(zip(runtime[0::2], runtime[1::2], strict=True))
    for shared, private in pairs:
        assert c["op"][shared[0]] == "shared" and c["op"][private[0]] == "private"
        assert list(c["gpa"][shared]) == list(c["gpa"][private])
        assert set(c["size"][shared]) == {PAGE_SIZE} and len(shared) <= 64
        between = np.arange(shared[-1] + 1, private[0])
        assert set(c["kind"][between]) == {"npf", "host_access"}
        assert set(c["agent"][between][c["kind"][between] == "host_access"]) == {"virtio"}
    places = [int(c["gpa"][s[0]]) for s, _ in pairs]
    assert len(set(places)) < 0.6 * len(places)  # places are reused often


def test_dma_churn_doubles_memory_only_when_freeing_lazily():
    from upmtrace.engine import replay
    from upmtrace.policy import load_policy

    table = synthesize("dma-churn", memory=256 * MiB, vcpus=2, seed=0).table
    duplicate = {name: replay(table, load_policy(name)).report["memory"]["peak_duplicate_bytes"]
                 for name in ("eager", "lazy")}
    assert duplicate["eager"] == 0 < duplicate["lazy"]


def test_tdx_boot_uses_map_gpa(synths):
    c = synths["tdx-boot"]
    assert "psc" not in set(c["kind"])
    maps = c["kind"] == "map_gpa"
    assert np.any(maps & (c["private"] == True))  # noqa: E712  (some back to private)
    assert c["size"][maps].max() == swiotlb_bytes(GiB)  # SWIOTLB in one big request
    assert (c["kind"] == "npf").sum() > GiB // PAGE_SIZE  # every page accepted, then DMA


def test_tdx_boot_trace_says_tdx(tmp_path):
    result = synthesize("tdx-boot", memory=256 * MiB)
    write_trace(result.table, tmp_path / "t.parquet", platform=result.platform)
    assert read_trace(tmp_path / "t.parquet").platform == "tdx"


def test_implicit_flips_by_touching_only(synths):
    c = synths["implicit"]
    assert not {"psc", "map_gpa"} & set(c["kind"])
    npf = np.flatnonzero(c["kind"] == "npf")
    attr: dict[int, bool] = {}  # no PSC: only the set_attributes marking and the faults
    flips = {True: 0, False: 0}
    for i in npf:
        gpa, private = int(c["gpa"][i]), bool(c["private"][i])
        if attr.get(gpa, True) != private:  # all RAM starts private (QEMU's marking)
            flips[private] += 1
        attr[gpa] = private
    assert flips[False] > 1000 and flips[True] > 1000


# --- the command and the shipped samples ---------------------------------------------------


def test_synth_command_writes_and_reports(tmp_path):
    out = tmp_path / "boot.jsonl"
    result = CliRunner().invoke(cli, ["synth", "snp-boot", "-o", str(out), "--memory", "256M",
                                      "--vcpus", "2", "--seed", "9"])
    assert result.exit_code == 0, result.output
    rows = synthesize("snp-boot", memory=256 * MiB, vcpus=2, seed=9).table.num_rows
    assert re.fullmatch(rf"{rows} rows written to {re.escape(str(out))} \(\d+\.\d [KM]iB\)\n",
                        result.output)
    assert read_trace(out).events == rows


def test_synth_command_rejects_bad_arguments(tmp_path):
    out = str(tmp_path / "x.parquet")
    runner = CliRunner()
    bad_memory = runner.invoke(cli, ["synth", "snp-boot", "-o", out, "--memory", "100M"])
    assert bad_memory.exit_code == 2
    assert bad_memory.output.startswith("Error: --memory must be a multiple of 2 MiB")
    assert runner.invoke(cli, ["synth", "no-such", "-o", out]).exit_code == 2
    assert runner.invoke(cli, ["synth", "snp-boot"]).exit_code == 2  # -o is required


def test_synth_help_lists_every_workload():
    result = CliRunner().invoke(cli, ["synth", "--help"])
    assert result.exit_code == 0
    for workload in WORKLOADS.values():
        assert f"{workload.name}" in result.output and workload.summary in result.output


def sample_commands() -> list[list[str]]:
    script = (ROOT / "scripts" / "make_samples.sh").read_text(encoding="utf-8")
    return [shlex.split(line)[1:] for line in script.splitlines()
            if line.startswith("upmtrace synth ")]


def test_make_samples_covers_every_workload_and_sample():
    made = {args[args.index("-o") + 1] for args in sample_commands()}
    assert made == {f"traces/{name}-1g.parquet" for name in WORKLOADS}
    readme = (ROOT / "traces" / "README.md").read_text(encoding="utf-8")
    assert all(Path(m).name in readme for m in made)


@pytest.mark.parametrize("args", sample_commands(), ids=lambda a: a[1])
def test_shipped_samples_are_what_make_samples_makes(args, tmp_path):
    shipped = ROOT / args[args.index("-o") + 1]
    args = list(args)
    args[args.index("-o") + 1] = str(tmp_path / shipped.name)
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert (tmp_path / shipped.name).read_bytes() == shipped.read_bytes()
    assert shipped.stat().st_size < 5 * MiB


def test_merge_interleaves_whole_groups_by_key():
    from upmtrace.trace.schema import Kind
    from upmtrace.trace.synth.rows import Phase, Script, merge, rows

    a = Phase(np.array([0.0, 1.0, 2.0])).add(rows(Kind.NPF, np.arange(6), vcpu=0, private=True),
                                              np.array([2, 3, 1]))
    b = Phase(np.array([0.5, 0.5, 9.0])).add(rows(Kind.NPF, np.arange(100, 103), vcpu=1,
                                                  private=False), np.array([1, 0, 2]))
    table = Script().add(merge(a, b)).table()
    assert [g >> 12 for g in table.column("gpa").to_pylist()] == [0, 1, 100, 2, 3, 4, 5, 101, 102]


# --- the launch: populate before the first vCPU event ----------------------------------------

LAUNCHED = {"snp-boot": SNP_LAUNCH, "lazy-accept": SNP_LAUNCH, "tdx-boot": TDX_LAUNCH}


def _pages(ranges) -> set[int]:
    return {p for gpa, size in ranges for p in range(gpa >> 12, (gpa + size) >> 12)}


@pytest.mark.parametrize("name", list(WORKLOADS))
@pytest.mark.parametrize("memory", [256 * MiB, 3 * GiB, 8 * GiB])
def test_boot_workloads_populate_valid_pages_before_the_first_vcpu_event(name, memory):
    """Every populated page lies in a guest_memfd slot registered and set private before it is
    populated, and every populate row comes before the first vCPU event; whatever the guest's
    size, the firmware region just below 4 GiB is a slot of its own, not RAM."""
    table = synthesize(name, memory=memory, vcpus=2, seed=3).table
    kind = table.column("kind").cast(pa.string())
    at = pc.indices_nonzero(pc.equal(kind, "populate")).to_pylist()
    populate = [(r["gpa"], r["size"]) for r in table.take(pa.array(at, pa.int64())).to_pylist()]
    assert populate == list(LAUNCHED.get(name, ()))
    if not populate:  # dma-churn and implicit: the firmware is a flash slot, no launch
        slots = table.filter(pc.equal(kind, "memslot")).column("gmem").to_pylist()
        assert slots[-1] is False
        return
    first_vcpu = pc.indices_nonzero(pc.greater_equal(table.column("vcpu"), 0))[0].as_py()
    assert max(at) < first_vcpu
    slots, private = [], set()
    for r in table.slice(0, first_vcpu).to_pylist():  # the launch, not the millions after
        if r["kind"] == "memslot":
            assert not any(r["gpa"] < g + s and g < r["gpa"] + r["size"] for g, s, _ in slots)
            slots.append((r["gpa"], r["size"], r["gmem"]))
        elif r["kind"] == "set_attributes" and r["private"]:
            private |= _pages([(r["gpa"], r["size"])])
        elif r["kind"] == "populate":
            pages = _pages([(r["gpa"], r["size"])])
            assert pages <= private
            assert all(any(g <= p << 12 < g + s and gmem for g, s, gmem in slots)
                       for p in pages)
    assert (FIRMWARE_GPA, FIRMWARE_SIZE, True) in slots


def test_snp_launch_is_ovmf_at_the_top_of_4g_and_a_kernel_low():
    ovmf, kernel, *metadata = SNP_LAUNCH
    assert ovmf == (FIRMWARE_GPA, FIRMWARE_SIZE) and sum(ovmf) == 4 * GiB
    assert kernel == (KERNEL_GPA, KERNEL_BYTES) == (1 * MiB, 6 * MiB)
    assert all(8 * MiB <= gpa and gpa + size <= 9 * MiB for gpa, size in metadata)
    assert not _pages([kernel]) & _pages(metadata)


def test_tdx_launch_is_tdvf_firmware_volumes_at_the_top_and_hob_low():
    bfv, cfv, *low = TDX_LAUNCH
    assert sum(bfv) == 4 * GiB and cfv[0] == FIRMWARE_GPA and sum(cfv) == bfv[0]
    assert all(8 * MiB <= gpa and gpa + size <= 9 * MiB for gpa, size in low)


@pytest.mark.parametrize("name", ["snp-boot", "lazy-accept", "tdx-boot"])
def test_launched_pages_are_not_accepted_again(name, synths):
    c = synths[name]
    launched = _pages(LAUNCHED[name])
    accepted = c["kind"] == "psc"
    psc_pages = _pages(zip(c["gpa"][accepted].astype(int), c["size"][accepted].astype(int),
                           strict=True))
    assert not psc_pages & launched
    faults = c["gpa"][c["kind"] == "npf"].astype(int) >> 12
    touched = [int(p) for p in faults if p in launched]
    if name == "tdx-boot":  # in the Secure EPT: the guest does not fault on them
        assert touched == []
    else:  # SNP: nothing is mapped; the kernel and metadata pages fault once each
        low = {p for p in launched if p < FIRMWARE_GPA >> 12}
        assert sorted(p for p in touched if p in low) == sorted(low)


def test_info_shows_the_launch(tmp_path):
    import json

    result = synthesize("snp-boot", memory=256 * MiB, vcpus=2, seed=0)
    path = tmp_path / "t.parquet"
    write_trace(result.table, path, platform=result.platform, source=result.source)
    info = json.loads(CliRunner().invoke(cli, ["info", str(path), "--format", "json"]).stdout)
    assert info["events_by_kind"]["populate"] == len(SNP_LAUNCH)
    assert info["populate_bytes"] == sum(size for _, size in SNP_LAUNCH)


@pytest.mark.parametrize("suffix", [".parquet", ".arrow", ".feather", ".jsonl", ".csv"])
def test_synth_then_replay_keeps_the_platform_in_every_format(tmp_path, suffix):
    """`synth tdx-boot -o t.csv` then `replay t.csv` replays as tdx: no writer drops it."""
    import json

    out = str(tmp_path / f"t{suffix}")
    runner = CliRunner()
    made = runner.invoke(cli, ["synth", "tdx-boot", "--memory", "256M", "--vcpus", "1",
                               "-o", out])
    assert made.exit_code == 0, made.output
    result = runner.invoke(cli, ["replay", out, "--format", "json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["trace"]["platform"] == "tdx"
    assert report["populate"]["calls"] == len(TDX_LAUNCH)
    assert read_trace(out).source.startswith("upmtrace synth tdx-boot --memory 256M")
