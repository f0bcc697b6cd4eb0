"""Fuzzing: random bytes at every trace reader and at the importer, random well-typed
tables through validation into the engine with every invariant checked after every event.
Only the clean UpmtraceError may come out; what is accepted must be a valid trace.

The default run is bounded (a few seconds); `UPMTRACE_FUZZ=long` (tests/conftest.py) runs each
fuzzer for UPMTRACE_FUZZ_EXAMPLES examples. scripts/fuzz_readers.py is the atheris harness.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pyarrow as pa
import pytest
from conftest import LONG
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scenario import K, M, Reach, attrs, host, map_gpa, memslot, npf, psc, table
from tracegen import trace_rows

from upmtrace.engine import replay
from upmtrace.errors import TraceError, UpmtraceError
from upmtrace.policy import KNOBS, PRESETS
from upmtrace.trace.cast import conform
from upmtrace.trace.importers import Options, import_logs
from upmtrace.trace.io import SCHEMA, read_trace, write_trace
from upmtrace.trace.schema import GPA_LIMIT, Platform
from upmtrace.trace.validate import validate

FIXTURES = Path(__file__).parent / "fixtures" / "import"
SEED_ROWS = (memslot(0, 0, 64 * M), attrs(0, 64 * M), npf(0x1234, True), npf(0x2000, False),
             psc(0x200000, 2 * M, "shared", req=3), psc(0x400000, 4 * K, "psmash", req=3),
             psc(0x5000, 4 * K, "private", req=-1, vcpu=2), map_gpa(0x600000, 8 * K, False),
             host(0x3000, 10, agent="virtio"), memslot(1, 64 * M, 2 * M, False),
             memslot(1, 0, 0))
LOG_LINES = [line for path in sorted(FIXTURES.iterdir())
             for line in path.read_bytes().splitlines(keepends=True)]
# the bounded work per example: traces whose conversions or host accesses span more than this
# are the engine's known limits (tests/test_limits.py), not what the fuzzers look for
RANGE_BUDGET = 256 * M


def fuzz(examples: int):
    """A fuzzer's settings: `examples` by default, the long profile's under UPMTRACE_FUZZ=long."""
    if LONG:
        return settings(deadline=None)
    return settings(max_examples=examples, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def valid_bytes(suffix: str) -> bytes:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"seed{suffix}"
        write_trace(table(*SEED_ROWS), path, recorded={"exits": {"vm": {"npf": 2}}})
        return path.read_bytes()


SEEDS = {suffix: valid_bytes(suffix) for suffix in (".parquet", ".arrow", ".jsonl", ".csv")}


@st.composite
def mutated(draw, seed: bytes) -> bytes:
    """`seed` with a few bytes flipped, inserted or deleted, or cut short."""
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 8))):
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "cut"]))
        if op == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            data[at] = draw(st.sampled_from(b"\x00\xff-9{}[]\",\n\r:e.xT"))
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=24))
        elif op == "delete":
            del data[at:at + draw(st.integers(1, 16))]
        else:
            del data[at:]
    return bytes(data)


def small_enough(trace) -> bool:
    t = trace.table
    kinds, sizes = t.column("kind").to_pylist(), t.column("size").to_pylist()
    return sum(s or 0 for k, s in zip(kinds, sizes, strict=True)
               if k not in ("memslot", "set_attributes")) <= RANGE_BUDGET


def read_or_refuse(path: Path) -> None:
    """read_trace either refuses with one line naming the file, or gives a valid trace."""
    try:
        trace = read_trace(path)
    except UpmtraceError as err:
        message = str(err)
        assert message.startswith(str(path)) and "\n" not in message, message
        return
    assert trace.table.schema.equals(SCHEMA)
    validate(trace.table)
    if small_enough(trace):
        replay(trace, PRESETS["eager"], paranoid=True)


@pytest.mark.parametrize("suffix", list(SEEDS))
@fuzz(60)
@given(data=st.data())
def test_random_bytes_at_the_trace_readers(suffix, data):
    content = data.draw(st.one_of(st.binary(max_size=2048), mutated(SEEDS[suffix])))
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"t{suffix}"
        path.write_bytes(content)
        read_or_refuse(path)


CELLS = ["", "0", "1", "-1", "4096", "0x1000", "2097152", str(GPA_LIMIT), str(1 << 64), "1e3",
         "true", "false", "TRUE", "npf", "psc", "memslot", "private", "shared", '"a,b"', '"\n"',
         "\x00", "\u00e9", " 7"]


@fuzz(60)
@given(st.lists(st.sampled_from([*SCHEMA.names, "shared", "", "ts "]), min_size=1, max_size=14),
       st.lists(st.lists(st.sampled_from(CELLS), min_size=1, max_size=14), max_size=6))
def test_random_csv_headers_and_cells(header, rows):
    """Duplicate, unknown and missing columns, ragged rows, quoted newlines, odd numbers."""
    lines = [",".join(header), *(",".join(row) for row in rows)]
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "t.csv"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        read_or_refuse(path)


@st.composite
def log_bytes(draw) -> bytes:
    lines = draw(st.lists(st.sampled_from(LOG_LINES), min_size=1, max_size=20))
    text = b"".join(lines)
    return draw(st.one_of(st.just(text), mutated(text), st.binary(max_size=1024)))


@fuzz(60)
@given(log_bytes(), st.sampled_from(list(Platform)), st.sampled_from([None, "ftrace", "qemu"]),
       st.sampled_from([".parquet", ".jsonl"]))
def test_random_bytes_at_the_importer(content, platform, fmt, suffix):
    """An import either writes a valid trace, or fails cleanly leaving the old output whole."""
    with tempfile.TemporaryDirectory() as folder:
        log, out = Path(folder) / "log.txt", Path(folder) / f"out{suffix}"
        log.write_bytes(content)
        out.write_bytes(b"old")
        try:
            import_logs([str(log)], str(out), Options(fmt=fmt, platform=platform))
        except UpmtraceError as err:
            assert "\n" not in str(err)
            assert out.read_bytes() == b"old"
        else:
            read_or_refuse(out)
            assert read_trace(out).events > 0
        assert sorted(p.name for p in Path(folder).iterdir()) == ["log.txt", out.name]


# --- well-typed tables: validation, then the engine, paranoid ---------------------------------

EDGES = [0, 1, 4095, 4 * K, 2 * M - 4 * K, 2 * M, 2 * M + 4 * K, 1 << 40, GPA_LIMIT - 2 * M,
         GPA_LIMIT - 4 * K, GPA_LIMIT, 1 << 63, (1 << 64) - 1]
address = st.one_of(st.sampled_from(EDGES), st.integers(0, (1 << 64) - 1),
                    st.integers(0, 4096).map(lambda n: n * 4 * K),
                    st.integers(0, 1 << 20).map(lambda n: n * 2 * M))
small_size = st.one_of(st.sampled_from([0, 1, 4 * K, 8 * K, 2 * M, 2 * M + 4 * K]),
                       st.integers(1, 64).map(lambda n: n * 4 * K))
any_size = st.one_of(small_size, address)
int32 = st.sampled_from([-(1 << 31), -2, -1, 0, 1, 2, 7, (1 << 31) - 1])
flag = st.sampled_from([True, False, None])
KINDS = ("memslot", "set_attributes", "npf", "psc", "map_gpa", "host_access")


@st.composite
def well_typed_row(draw) -> dict:
    """A row of SCHEMA's types: mostly the kind's own columns, sometimes nulls and strays."""
    kind = draw(st.sampled_from([*KINDS, "bogus"]))
    row = {"kind": kind, "vcpu": draw(int32), "gpa": draw(address),
           "size": draw(any_size if kind in ("memslot", "set_attributes") else small_size),
           "private": draw(flag), "write": draw(flag), "slot": draw(int32), "gmem": draw(flag),
           "req": draw(st.sampled_from([-1, 0, 1, 2, (1 << 63) - 1])),
           "op": draw(st.sampled_from(["private", "shared", "psmash", "unsmash", "encrypt",
                                       None])),
           "agent": draw(st.sampled_from(["vmm", "virtio", "", None])),
           "latency": draw(st.sampled_from([None, 0, 1500, -1]))}
    for name in draw(st.lists(st.sampled_from(list(row)), max_size=2)):
        row[name] = None  # a required column left empty
    return row


@st.composite
def well_typed_table(draw) -> pa.Table:
    rows = draw(st.lists(well_typed_row(), min_size=1, max_size=25))
    ts = 0
    for row in rows:
        ts += draw(st.sampled_from([0, 1, 1000, -1]))
        row["ts"] = ts
    plain = {f.name: f.type.value_type if pa.types.is_dictionary(f.type) else f.type
             for f in SCHEMA}
    return conform(pa.table({name: pa.array([r[name] for r in rows], type)
                             for name, type in plain.items()}))


reached = {"well-typed": Reach(), "spread": Reach()}  # each engine fuzzer's reach


@st.composite
def mostly_valid_table(draw) -> pa.Table:
    """A valid trace by construction (tests/tracegen.py), with one cell of one row replaced by a
    random well-typed value one time in ten: the validator sees both, the engine mostly."""
    rows = draw(trace_rows(False))
    if draw(st.integers(0, 9)) == 0:
        stray = draw(well_typed_row())
        row = draw(st.sampled_from(rows))
        name = draw(st.sampled_from(sorted(stray)))
        row[name] = stray[name]
    return conform(table(*rows))


@fuzz(60)
@given(well_typed_table(), st.sampled_from(list(Platform)))
def test_random_well_typed_tables_are_refused_in_one_line_or_replay(t, platform):
    """Mostly invalid: the validator's refusals, each naming a row and a column."""
    try:
        validate(t)
    except TraceError as err:
        assert "\n" not in str(err) and err.row is not None and err.column is not None
        return
    replay(t, PRESETS["eager"], platform=platform, paranoid=True)


@fuzz(150)
@given(mostly_valid_table(), st.sampled_from(sorted(PRESETS)), st.sampled_from(["4k", "2m"]),
       st.sampled_from(KNOBS["directmap"][0]), st.sampled_from(list(Platform)))
def well_typed_tables_are_refused_or_keep_every_invariant(t, name, gmem_page, directmap,
                                                         platform):
    reached["well-typed"].examples += 1
    try:
        validate(t)
    except TraceError as err:
        assert "\n" not in str(err) and err.row is not None and err.column is not None
        return
    policy = PRESETS[name].with_overrides({"gmem_page": gmem_page, "directmap": directmap})
    paranoid = replay(t, policy, platform=platform, paranoid=True)  # invariants, every event
    assert replay(t, policy, platform=platform).to_json() == paranoid.to_json()
    report = paranoid.report
    assert report["npf"]["recorded"] == t.column("kind").to_pylist().count("npf")
    assert report["memory"]["final_resident_bytes"] <= report["memory"]["peak_resident_bytes"]
    reached["well-typed"].replayed += 1


@pytest.mark.hypothesis
def test_well_typed_tables_are_refused_or_keep_every_invariant():
    reached["well-typed"].run(well_typed_tables_are_refused_or_keep_every_invariant)


def spread_row(i: int, kind: str, block: int, page: int, private: bool) -> dict:
    gpa = (block << 21) + (page << 12)
    op = "private" if private else "shared"
    if kind == "memslot":  # between slot 0's end (2^40) and slot 1 (2^48): no overlap
        gap = (1 << 48) - (1 << 40) >> 21
        return memslot(3, (1 << 40) + (block % gap << 21), 2 * M, private)
    if kind == "npf":
        return npf(gpa, private)
    if kind == "psc":
        return psc(block << 21, 2 * M if page % 2 else 4 * K, op, req=i)
    if kind == "map_gpa":
        return map_gpa(gpa, 8 * K if gpa + 8 * K <= GPA_LIMIT else 4 * K, private)
    if kind == "host_access":
        return host(gpa, 4 * K)
    return attrs(block << 21, 2 * M, private)


@fuzz(100)
@given(st.lists(st.tuples(st.sampled_from(["memslot", "npf", "psc", "map_gpa", "host_access",
                                           "set_attributes"]),
                          st.integers(0, (GPA_LIMIT >> 21) - 1), st.integers(0, 511),
                          st.booleans()), min_size=1, max_size=30),
       st.sampled_from(sorted(PRESETS)), st.sampled_from(list(Platform)))
def events_spread_over_52_bits_keep_every_invariant(events, name, platform):
    """Valid traces whose pages lie anywhere in the 52-bit space, around a few huge slots."""
    rows = [memslot(0, 0, 1 << 40), attrs(0, 1 << 40), memslot(1, 1 << 48, 1 << 48, False),
            memslot(2, GPA_LIMIT - (1 << 44), 1 << 44), attrs(GPA_LIMIT - (1 << 44), 1 << 44)]
    rows += [spread_row(i, *e) for i, e in enumerate(events)]
    t = conform(table(*rows))  # the canonical kind and op dictionaries, as a reader gives
    reached["spread"].examples += 1
    validate(t)  # valid by construction
    replay(t, PRESETS[name], platform=platform, paranoid=True)
    reached["spread"].replayed += 1


@pytest.mark.hypothesis
def test_events_spread_over_52_bits_keep_every_invariant():
    reached["spread"].run(events_spread_over_52_bits_keep_every_invariant)
