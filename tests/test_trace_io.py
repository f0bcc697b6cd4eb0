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
    assert (trace.platform, trace.source, trace.recorded) == (
        Platform.TDX, "unit test", {"exits": {"npf": 3}})


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
        '{"upmtrace":{"format":"1","platform":"snp"}}\n'
        '{"ts":0,"kind":"memslot","gpa":0,"size":1073741824,"slot":0,"gmem":true}\n')
    assert (tmp_path / "t.csv").read_text(encoding="utf-8").splitlines() == [
        "# upmtrace.format=1", "# upmtrace.platform=snp",
        '"ts","kind","vcpu","gpa","size","private","write","slot","gmem","req","op","agent",'
        '"latency"',
        '0,"memslot",,0,1073741824,,,0,true,,,,']


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
    write_trace(table, tmp_path / "t.jsonl", platform="tdx")
    lines = (tmp_path / "t.jsonl").read_text(encoding="utf-8").splitlines()
    (tmp_path / "b.jsonl").write_text("\n\n" + "\n\n".join(lines) + "\n\n", encoding="utf-8")
    blank = read_trace(tmp_path / "b.jsonl")
    assert blank.table.equals(table)
    assert blank.platform is Platform.TDX


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


# --- format 1.1: latency, populate, and the version a writer stores -------------------------

LAUNCH = [
    {"ts": 0, "kind": "memslot", "slot": 0, "gpa": 0, "size": GIB, "gmem": True},
    {"ts": 5, "kind": "set_attributes", "gpa": 0, "size": GIB, "private": True},
    {"ts": 10, "kind": "populate", "gpa": 0x100000, "size": 0x600000},
    {"ts": 20, "kind": "npf", "vcpu": 0, "gpa": 0x1234, "private": True, "latency": 1500},
    {"ts": 30, "kind": "npf", "vcpu": 1, "gpa": 0x5000, "private": False, "latency": 0},
    {"ts": 40, "kind": "npf", "vcpu": 1, "gpa": 0x6000, "private": False},
]


def _stored_metadata(path: Path) -> dict[str, str]:
    """The upmtrace.* keys as the file itself holds them, read without upmtrace's readers."""
    import json

    if path.suffix == ".parquet":
        raw = pq.read_schema(path).metadata
    elif path.suffix in (".arrow", ".feather"):
        raw = pa.ipc.open_file(pa.memory_map(str(path))).schema.metadata
    elif path.suffix == ".jsonl":
        body = json.loads(path.read_text(encoding="utf-8").splitlines()[0])["upmtrace"]
        return {f"upmtrace.{k}": v if isinstance(v, str) else json.dumps(v, sort_keys=True)
                for k, v in body.items()}
    else:
        text = path.read_text(encoding="utf-8")
        lines = [line[2:] for line in text.splitlines() if line.startswith("# ")]
        return dict(line.split("=", 1) for line in lines)
    return {k.decode(): v.decode() for k, v in raw.items() if k.startswith(b"upmtrace.")}


@pytest.mark.parametrize("ext", EXTENSIONS)
@pytest.mark.parametrize("rows,version", [
    (ROWS, "1"),
    (LAUNCH, "1.1"),
    ([r for r in LAUNCH if r["kind"] != "populate"], "1.1"),  # latency values alone
    ([{k: v for k, v in r.items() if k != "latency"} for r in LAUNCH], "1.1"),  # populate alone
    ([r | {"latency": None} for r in ROWS], "1"),  # an all-null latency column is format 1
], ids=["plain", "both", "latency", "populate", "null_latency"])
def test_format_version_follows_the_content(tmp_path, ext, rows, version):
    path = tmp_path / f"t{ext}"
    write_trace(from_rows(rows), path)
    assert _stored_metadata(path)["upmtrace.format"] == version
    assert read_trace(path).table.equals(from_rows(rows))


@pytest.mark.parametrize("ext", EXTENSIONS)
def test_latency_round_trips(tmp_path, ext):
    path = tmp_path / f"t{ext}"
    write_trace(from_rows(LAUNCH), path)
    latency = read_trace(path).table.column("latency").to_pylist()
    assert latency == [None, None, None, 1500, 0, None]


def test_latency_is_the_last_schema_column():
    assert SCHEMA.names[-1] == "latency"
    assert SCHEMA.field("latency").type == pa.int64() and SCHEMA.field("latency").nullable


def test_format_1_files_without_a_latency_column_still_read(tmp_path):
    """Files as format 1.0 writers made them: no latency column, no JSONL/CSV metadata."""
    old = from_rows(ROWS).drop_columns(["latency"])
    pq.write_table(old.replace_schema_metadata({"upmtrace.format": "1",
                                                "upmtrace.platform": "sw"}),
                   tmp_path / "t.parquet")
    with pa.OSFile(str(tmp_path / "t.arrow"), "wb") as sink, \
            pa.ipc.new_file(sink, old.schema) as writer:
        writer.write_table(old)
    write_trace(from_rows(ROWS), tmp_path / "new.csv")
    write_trace(from_rows(ROWS), tmp_path / "new.jsonl")
    csv_lines = (tmp_path / "new.csv").read_text(encoding="utf-8").splitlines()[2:]  # no comments
    csv_lines[0] = csv_lines[0].removesuffix(',"latency"')
    (tmp_path / "t.csv").write_text("\n".join(line.removesuffix(",") if i else line
                                              for i, line in enumerate(csv_lines)) + "\n",
                                    encoding="utf-8")
    (tmp_path / "t.jsonl").write_text(
        "\n".join((tmp_path / "new.jsonl").read_text(encoding="utf-8").splitlines()[1:]) + "\n",
        encoding="utf-8")
    for name in ("t.parquet", "t.arrow", "t.csv", "t.jsonl"):
        trace = read_trace(tmp_path / name)
        assert trace.table.equals(from_rows(ROWS)), name
        expected = Platform.SW if name == "t.parquet" else Platform.SNP
        assert (trace.platform, trace.source, trace.recorded) == (expected, None, None), name


# --- metadata in every format ----------------------------------------------------------------

SOURCES = [None, "upmtrace synth snp-boot --memory 1G", "a=b; c", 'qemu "log"',
           "  padded  ", "two\nlines\r\n", "tab\there", "# not a comment", "\u00e9\u4e2d\U0001f600",
           ""]
RECORDED = [None, {}, {"exits": {"userspace": {"KVM_EXIT_MEMORY_FAULT": 12},
                                 "userspace_total": 12},
                       "conversions": {"set_attributes_calls": 3}}]


@pytest.mark.parametrize("ext", EXTENSIONS)
@pytest.mark.parametrize("platform", list(Platform))
def test_metadata_round_trips_for_every_platform(tmp_path, ext, platform):
    path = tmp_path / f"t{ext}"
    write_trace(from_rows(LAUNCH), path, platform=platform.value, source="s",
                recorded=RECORDED[2])
    trace = read_trace(path)
    assert (trace.platform, trace.source, trace.recorded) == (platform, "s", RECORDED[2])


@pytest.mark.parametrize("ext", EXTENSIONS)
@pytest.mark.parametrize("source", SOURCES, ids=range(len(SOURCES)))
@pytest.mark.parametrize("recorded", RECORDED, ids=["none", "empty", "nested"])
def test_metadata_round_trips_exactly(tmp_path, ext, source, recorded):
    path = tmp_path / f"t{ext}"
    write_trace(from_rows(ROWS), path, platform="tdx", source=source, recorded=recorded)
    trace = read_trace(path)
    assert (trace.platform, trace.source, trace.recorded) == (Platform.TDX, source, recorded)
    assert trace.table.equals(from_rows(ROWS))


@pytest.mark.parametrize("ext", [".jsonl", ".csv"])
def test_text_formats_keep_metadata_where_the_format_says(tmp_path, ext):
    path = tmp_path / f"t{ext}"
    write_trace(from_rows(ROWS), path, platform="sw", source="x",
                recorded={"exits": {"vm": {"npf": 2}}})
    lines = path.read_text(encoding="utf-8").splitlines()
    if ext == ".jsonl":
        assert lines[0] == ('{"upmtrace":{"format":"1","platform":"sw","source":"x",'
                            '"recorded":{"exits":{"vm":{"npf":2}}}}}')
    else:
        assert lines[:4] == ["# upmtrace.format=1", "# upmtrace.platform=sw",
                             "# upmtrace.source=x",
                             '# upmtrace.recorded={"exits": {"vm": {"npf": 2}}}']


@pytest.mark.parametrize("ext", [".jsonl", ".csv"])
def test_an_empty_trace_keeps_its_metadata(tmp_path, ext):
    path = tmp_path / f"t{ext}"
    write_trace(from_rows([]), path, platform="tdx", source="nothing yet")
    trace = read_trace(path)
    assert (trace.events, trace.platform, trace.source) == (0, Platform.TDX, "nothing yet")


def test_hand_written_metadata_is_read(tmp_path):
    npf = '{"ts": 0, "kind": "npf", "vcpu": 0, "gpa": 0, "private": true}'
    (tmp_path / "t.jsonl").write_text(
        '\n{ "upmtrace" : {"format": 1.1, "platform": "tdx", "source": null,'
        ' "recorded": "{\\"exits\\": 2}"} }\n' + npf + "\n")
    trace = read_trace(tmp_path / "t.jsonl")
    assert (trace.platform, trace.source, trace.recorded, trace.events) == (
        Platform.TDX, None, {"exits": 2}, 1)
    (tmp_path / "t.csv").write_text(
        "# exported by a script\n#upmtrace.platform = sw \n# upmtrace.format=1.1\n"
        "ts,kind,vcpu,gpa,private\n0,npf,0,0,true\n")
    trace = read_trace(tmp_path / "t.csv")
    assert (trace.platform, trace.source, trace.events) == (Platform.SW, None, 1)


def test_a_csv_row_error_counts_data_rows_after_the_comments(tmp_path):
    (tmp_path / "t.csv").write_text("# upmtrace.platform=tdx\nts,kind,vcpu,gpa,private\n"
                                    "0,npf,0,0,true\n1,npf,0,0,maybe\n")
    with pytest.raises(TraceError, match=r"t\.csv, row 2, column 'private'"):
        read_trace(tmp_path / "t.csv")


def test_a_jsonl_row_error_names_the_file_line(tmp_path):
    (tmp_path / "t.jsonl").write_text('{"upmtrace": {"platform": "tdx"}}\n'
                                      '{"ts": 0, "kind": "npf", "vcpu": 0, "gpa": 0, '
                                      '"private": true}\n{"ts": 1, "kind": "nfp"}\n')
    with pytest.raises(TraceError, match=r"t\.jsonl, row 3, column 'kind': unknown kind 'nfp'"):
        read_trace(tmp_path / "t.jsonl")


def test_a_metadata_line_after_the_first_is_an_unknown_column(tmp_path):
    (tmp_path / "t.jsonl").write_text('{"ts": 0, "kind": "npf", "vcpu": 0, "gpa": 0, '
                                      '"private": true}\n{"upmtrace": {"platform": "tdx"}}\n')
    with pytest.raises(TraceError, match=r"row 2, column 'upmtrace': unknown column"):
        read_trace(tmp_path / "t.jsonl")


@pytest.mark.parametrize("text,message", [
    ('{"upmtrace": {"format": "2"}}\n',
     r"/t\.jsonl: upmtrace\.format is '2'; this upmtrace reads formats '1' and '1\.1'$"),
    ('{"upmtrace": {"platform": "arm"}}\n', r"/t\.jsonl: upmtrace\.platform is 'arm'"),
    ('{"upmtrace": {"platform": 3}}\n',
     r"/t\.jsonl, row 1, column 'upmtrace': upmtrace\.platform must be a string$"),
    ('{"upmtrace": [1]}\n', r"/t\.jsonl, row 1, column 'upmtrace': the metadata line must be"),
    ('{"upmtrace": {"recorded": {"exits": -1}}}\n',
     r"/t\.jsonl: upmtrace\.recorded: exits is -1, not a count"),
])
def test_bad_jsonl_metadata_is_one_error(tmp_path, text, message):
    npf = '{"ts": 0, "kind": "npf", "vcpu": 0, "gpa": 0, "private": true}\n'
    (tmp_path / "t.jsonl").write_text(text + npf)
    with pytest.raises(TraceError, match=message):
        read_trace(tmp_path / "t.jsonl")


def test_bad_csv_format_is_one_error(tmp_path):
    (tmp_path / "t.csv").write_text("# upmtrace.format=1.2\nts,kind\n")
    with pytest.raises(TraceError, match=r"/t\.csv: upmtrace\.format is '1\.2'; this upmtrace "
                                         r"reads formats '1' and '1\.1'$"):
        read_trace(tmp_path / "t.csv")


# --- hypothesis: metadata and latency in the text formats -----------------------------------

@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(table=_tables(), source=st.none() | st.text(st.characters(exclude_categories=("Cs",)),
                                                  max_size=20),
       platform=st.sampled_from(list(Platform)),
       latency=st.lists(st.none() | st.integers(0, 2**63 - 1), min_size=25, max_size=25))
def test_hypothesis_metadata_round_trip(table, source, platform, latency):
    table = table.set_column(SCHEMA.get_field_index("latency"), SCHEMA.field("latency"),
                             pa.array(latency[:table.num_rows], pa.int64()))
    with tempfile.TemporaryDirectory() as tmp:
        for ext in (".jsonl", ".csv", ".arrow"):
            path = Path(tmp) / f"t{ext}"
            write_trace(table, path, platform=platform.value, source=source)
            trace = read_trace(path)
            assert trace.table.equals(table), ext
            assert (trace.platform, trace.source) == (platform, source), ext


@pytest.mark.parametrize("name,data,message", [
    ("t.csv", b"#\xff\nts,kind\n", r"/t\.csv: a comment line is not valid UTF-8$"),
    ("t.csv", b"# upmtrace.platform=tdx\n", r"/t\.csv: not a readable CSV file \(Empty CSV"),
    ("t.csv", b"#" * (1 << 20) + b"\nts,kind\n", r"/t\.csv: a comment line longer than 1 MiB$"),
])
def test_hostile_metadata_lines_are_one_error(tmp_path, name, data, message):
    (tmp_path / name).write_bytes(data)
    with pytest.raises(TraceError, match=message):
        read_trace(tmp_path / name)


def test_odd_jsonl_metadata_keys_are_ignored(tmp_path):
    (tmp_path / "t.jsonl").write_text('{"upmtrace": {"\\ud800": "\\udc00", "platform": "tdx", '
                                      '"colour": "red"}}\n')
    trace = read_trace(tmp_path / "t.jsonl")
    assert (trace.platform, trace.events) == (Platform.TDX, 0)
