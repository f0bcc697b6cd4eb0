"""read_trace / write_trace / from_rows: every format round-trips, writes are atomic."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from upmtrace.errors import TraceError, UpmtraceError
from upmtrace.trace import io as trace_io
from upmtrace.trace.io import from_rows, read_trace, write_trace
from upmtrace.trace.schema import GPA_LIMIT, PAGE_SIZE, SCHEMA, Kind, Platform, PscOp

GIB = 1 << 30
ROWS = [
    {"ts": 0, "kind": "memslot", "slot": 0, "gpa": 0, "size": GIB, "gmem": True},
    {"ts": 10, "kind": "set_attributes", "gpa": 0, "size": GIB, "private": True},
    {"ts": 20, "kind": "npf", "vcpu": 0, "gpa": 0x1234, "private": False, "write": True},
    {"ts": 30, "kind": "psc", "vcpu": 1, "req": 7, "gpa": 0x200000, "size": 0x200000,
     "op": "shared"},
    {"ts": 30, "kind": "psc", "vcpu": 1, "req": -1, "gpa": 0x1000, "size": 0x1000,
     "op": "psmash"},
    {"ts": 40, "kind": "map_gpa", "vcpu": 2, "gpa": 0, "size": 0x500000, "private": True},
    {"ts": 50, "kind": "host_access", "vcpu": -1, "gpa": 0x3000, "size": 8, "write": False,
     "agent": 'vir"tio, \u00e9'},
    {"ts": 60, "kind": "memslot", "slot": 0, "gpa": 0, "size": 0},
]
EXTENSIONS = [".parquet", ".arrow", ".feather", ".jsonl", ".csv"]
WITH_METADATA = {".parquet", ".arrow", ".feather"}


@pytest.fixture
def table() -> pa.Table:
    return from_rows(ROWS)


def test_from_rows_is_exactly_schema(table):
    assert table.schema == SCHEMA
    assert table.num_rows == len(ROWS)
    assert table.column("kind").chunk(0).dictionary.to_pylist() == list(Kind)
    assert table.column("op").chunk(0).dictionary.to_pylist() == list(PscOp)


def test_from_rows_rejects_unknown_key():
    with pytest.raises(TraceError, match="column 'colour': unknown column"):
        from_rows([{"ts": 0, "kind": "npf", "colour": 1}])


@pytest.mark.parametrize("ext", EXTENSIONS)
def test_round_trip(tmp_path, table, ext):
    path = tmp_path / f"t{ext}"
    write_trace(table, path, platform="tdx", source="unit test", recorded={"exits": {"npf": 3}})
    trace = read_trace(path)
    assert trace.table.equals(table)
    assert trace.table.schema == SCHEMA
    assert trace.events == len(ROWS)
    assert trace.path == str(path)
    assert len(trace.sha256) == 64
    if ext in WITH_METADATA:
        assert (trace.platform, trace.source, trace.recorded) == (
            Platform.TDX, "unit test", {"exits": {"npf": 3}})
    else:
        assert (trace.platform, trace.source, trace.recorded) == (Platform.SNP, None, None)


@pytest.mark.parametrize("ext", EXTENSIONS)
def test_platform_argument_overrides_metadata(tmp_path, table, ext):
    path = tmp_path / f"t{ext}"
    write_trace(table, path, platform="tdx")
    assert read_trace(path, platform="sw").platform is Platform.SW


def test_sha256_is_of_the_file_bytes(tmp_path, table):
    import hashlib

    path = tmp_path / "t.parquet"
    write_trace(table, path)
    assert read_trace(path).sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_parquet_is_byte_deterministic(tmp_path, table):
    write_trace(table, tmp_path / "a.parquet", source="s", recorded={"b": 1, "a": 2})
    write_trace(table, tmp_path / "b.parquet", source="s", recorded={"a": 2, "b": 1})
    assert (tmp_path / "a.parquet").read_bytes() == (tmp_path / "b.parquet").read_bytes()


def test_parquet_uses_zstd(tmp_path, table):
    write_trace(table, tmp_path / "t.parquet")
    meta = pq.ParquetFile(tmp_path / "t.parquet").metadata
    assert meta.row_group(0).column(0).compression == "ZSTD"


def test_jsonl_omits_nulls_and_csv_leaves_cells_empty(tmp_path, table):
    write_trace(table.slice(0, 1), tmp_path / "t.jsonl")
    write_trace(table.slice(0, 1), tmp_path / "t.csv")
    assert (tmp_path / "t.jsonl").read_text(encoding="utf-8") == (
        '{"ts":0,"kind":"memslot","gpa":0,"size":1073741824,"slot":0,"gmem":true}\n')
    assert (tmp_path / "t.csv").read_text(encoding="utf-8").splitlines()[1] == (
        '0,"memslot",,0,1073741824,,,0,true,,,')


def test_write_accepts_a_subset_of_columns(tmp_path):
    partial = pa.table({"ts": [0, 1], "kind": ["npf", "npf"], "vcpu": [0, 1],
                        "gpa": [0, 4096], "private": [True, False]})
    write_trace(partial, tmp_path / "t.parquet")
    trace = read_trace(tmp_path / "t.parquet")
    assert trace.table.equals(from_rows(partial.to_pylist()))


def test_reads_arrow_stream_and_several_row_groups(tmp_path, table):
    with pa.OSFile(str(tmp_path / "s.arrow"), "wb") as sink, \
            pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=3)
    pq.write_table(table, tmp_path / "g.parquet", row_group_size=3)
    assert read_trace(tmp_path / "s.arrow").table.equals(table)
    assert read_trace(tmp_path / "g.parquet").table.equals(table)


def test_reads_plain_strings_and_jsonl_blank_lines(tmp_path, table):
    plain = pa.table({n: table.column(n).cast(SCHEMA.field(n).type.value_type)
                      if pa.types.is_dictionary(SCHEMA.field(n).type) else table.column(n)
                      for n in SCHEMA.names})
    pq.write_table(plain, tmp_path / "p.parquet")
    assert read_trace(tmp_path / "p.parquet").table.equals(table)
    write_trace(table, tmp_path / "t.jsonl")
    lines = (tmp_path / "t.jsonl").read_text(encoding="utf-8").splitlines()
    (tmp_path / "b.jsonl").write_text("\n\n".join(lines) + "\n\n")
    assert read_trace(tmp_path / "b.jsonl").table.equals(table)


def _failing_writer(table, f, metadata):
    f.write(b"partial garbage")
    raise RuntimeError("disk on fire")


def test_failed_write_leaves_existing_file_untouched(tmp_path, table, monkeypatch):
    path = tmp_path / "t.parquet"
    path.write_bytes(b"precious")
    monkeypatch.setitem(trace_io.WRITERS, "parquet", _failing_writer)
    with pytest.raises(RuntimeError, match="disk on fire"):
        write_trace(table, path)
    assert path.read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.parquet"]


def test_write_to_missing_directory_is_one_error(tmp_path, table):
    with pytest.raises(UpmtraceError, match=r"cannot write \(No such file or directory\)"):
        write_trace(table, tmp_path / "no" / "t.parquet")


def test_write_rejects_unknown_extension(tmp_path, table):
    with pytest.raises(TraceError, match=r"unknown trace format '\.txt'"):
        write_trace(table, tmp_path / "t.txt")


# --- hypothesis: any well-typed valid trace round-trips -------------------------------------

_agents = st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=8)
_flag = st.none() | st.booleans()
_page = st.integers(0, (GPA_LIMIT >> 12) - 1024).map(lambda p: p * PAGE_SIZE)
_pages = st.integers(1, 512).map(lambda n: n * PAGE_SIZE)


@st.composite
def _event(draw, index: int) -> dict:
    kind = draw(st.sampled_from([k for k in Kind if k is not Kind.MEMSLOT]) | st.just("slot"))
    vcpu = draw(st.integers(0, 2**31 - 1))
    base = {"write": draw(_flag), "gmem": draw(_flag)}
    if kind == "slot":  # disjoint: one GiB per row, slot id = row
        return {"kind": "memslot", "slot": index, "gpa": index * GIB,
                "size": draw(st.sampled_from([0, PAGE_SIZE, GIB])), "gmem": draw(_flag)}
    if kind is Kind.NPF:
        return base | {"kind": kind, "vcpu": vcpu, "gpa": draw(st.integers(0, GPA_LIMIT - 1)),
                       "private": draw(st.booleans())}
    if kind is Kind.PSC:
        return base | {"kind": kind, "vcpu": vcpu, "req": draw(st.integers(-1, 2**63 - 1)),
                       "gpa": draw(_page), "size": draw(_pages),
                       "op": draw(st.sampled_from(list(PscOp)))}
    if kind is Kind.HOST_ACCESS:
        return base | {"kind": kind, "vcpu": draw(st.sampled_from([-1, None, vcpu])),
                       "gpa": draw(_page), "size": draw(st.integers(1, 8192)),
                       "agent": draw(st.none() | _agents)}
    return base | {"kind": kind, "vcpu": vcpu, "gpa": draw(_page), "size": draw(_pages),
                   "private": draw(st.booleans())}


@st.composite
def _tables(draw) -> pa.Table:
    n = draw(st.integers(1, 25))
    ts = sorted(draw(st.lists(st.integers(-(2**62), 2**62), min_size=n, max_size=n)))
    return from_rows([{"ts": t} | draw(_event(i)) for i, t in enumerate(ts)])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(table=_tables(), source=st.none() | st.text(max_size=20))
def test_hypothesis_round_trip(table, source):
    with tempfile.TemporaryDirectory() as tmp:
        for ext in (".parquet", ".jsonl"):
            path = Path(tmp) / f"t{ext}"
            write_trace(table, path, platform="sw", source=source)
            trace = read_trace(path)
            assert trace.table.equals(table), ext
            if ext == ".parquet":
                assert (trace.platform, trace.source) == (Platform.SW, source)
