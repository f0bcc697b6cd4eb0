"""Trace validation (docs/format.md) via `upmtrace info`: exit 3, one exact line, no traceback."""

from __future__ import annotations

import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from upmtrace.cli import cli
from upmtrace.trace.io import IMPORT_HINT, from_rows, read_trace, write_trace
from upmtrace.trace.validate import validate

HEADER = "ts,kind,vcpu,gpa,size,private,write,slot,gmem,req,op,agent"
SLOT = "0,memslot,,0,1073741824,,,0,true,,,"  # a valid first row

# (name, file text, expected message after "Error: ")
CSV_CASES = [
    ("unknown_kind", [SLOT, "1,reboot,0,0,,,,,,,,"],
     "t.csv, row 2, column 'kind': unknown kind 'reboot' (expected one of memslot, "
     "set_attributes, npf, psc, map_gpa, host_access, populate)"),
    ("ts_null", [SLOT, ",npf,0,0,,true,,,,,,"], "t.csv, row 2, column 'ts': ts is missing"),
    ("kind_null", [SLOT, "1,,0,0,,true,,,,,,"], "t.csv, row 2, column 'kind': kind is missing"),
    ("required_null", [SLOT, "1,psc,0,0,4096,,,,,3,,"],
     "t.csv, row 2, column 'op': missing op (a psc event needs vcpu, req, gpa, size, op)"),
    ("npf_without_private", [SLOT, "1,npf,0,0,,,,,,,,"],
     "t.csv, row 2, column 'private': missing private (a npf event needs vcpu, gpa, private)"),
    ("zero_size", [SLOT, "1,host_access,-1,0,0,,,,,,,"],
     "t.csv, row 2, column 'size': size must be greater than 0"),
    ("negative_size", [SLOT, "1,map_gpa,0,0,-4096,true,,,,,,"],
     "t.csv, row 2, column 'size': size -4096 is negative"),
    ("memslot_gpa_unaligned", ["0,memslot,,4660,4096,,,0,,,,"],
     "t.csv, row 1, column 'gpa': gpa 0x1234 is not 4 KiB aligned"),
    ("set_attributes_gpa_unaligned", [SLOT, "1,set_attributes,,2049,4096,true,,,,,,"],
     "t.csv, row 2, column 'gpa': gpa 0x801 is not 4 KiB aligned"),
    ("psc_gpa_unaligned", [SLOT, "1,psc,0,4097,4096,,,,,1,private,"],
     "t.csv, row 2, column 'gpa': gpa 0x1001 is not 4 KiB aligned"),
    ("map_gpa_gpa_unaligned", [SLOT, "1,map_gpa,0,100,4096,true,,,,,,"],
     "t.csv, row 2, column 'gpa': gpa 0x64 is not 4 KiB aligned"),
    ("memslot_size_unaligned", ["0,memslot,,0,5000,,,0,,,,"],
     "t.csv, row 1, column 'size': size 5000 is not a multiple of 4 KiB"),
    ("psc_size_unaligned", [SLOT, "1,psc,0,0,2048,,,,,1,shared,"],
     "t.csv, row 2, column 'size': size 2048 is not a multiple of 4 KiB"),
    ("gpa_beyond_limit", [SLOT, "1,npf,0,4503599627370496,,true,,,,,,"],
     "t.csv, row 2, column 'gpa': gpa 0x10000000000000 is beyond the 52-bit guest physical "
     "address space"),
    ("range_beyond_limit", [SLOT, "1,set_attributes,,4503599627366400,8192,true,,,,,,"],
     "t.csv, row 2, column 'size': gpa 0xffffffffff000 + size 0x2000 ends beyond the 52-bit "
     "guest physical address space"),
    # no large size elsewhere in the file to hide these from the rule's whole-batch shortcut
    ("gpa_at_limit_alone", ["0,npf,0,4503599627370496,,true,,,,,,"],
     "t.csv, row 1, column 'gpa': gpa 0x10000000000000 is beyond the 52-bit guest physical "
     "address space"),
    ("host_access_one_byte_beyond", ["0,host_access,-1,4503599627370488,9,,,,,,,"],
     "t.csv, row 1, column 'size': gpa 0xffffffffffff8 + size 0x9 ends beyond the 52-bit "
     "guest physical address space"),
    ("psc_op", [SLOT, "1,psc,0,0,4096,,,,,1,encrypt,"],
     "t.csv, row 2, column 'op': unknown psc op 'encrypt' (expected one of private, shared, "
     "psmash, unsmash)"),
    ("vcpu_host_on_npf", [SLOT, "1,npf,-1,0,,true,,,,,,"],
     "t.csv, row 2, column 'vcpu': vcpu -1 is not a vCPU index (npf events come from a vCPU)"),
    ("vcpu_host_on_psc", [SLOT, "1,psc,-1,0,4096,,,,,-1,private,"],
     "t.csv, row 2, column 'vcpu': vcpu -1 is not a vCPU index (psc events come from a vCPU)"),
    ("vcpu_host_on_map_gpa", [SLOT, "1,map_gpa,-1,0,4096,true,,,,,,"],
     "t.csv, row 2, column 'vcpu': vcpu -1 is not a vCPU index (map_gpa events come from a "
     "vCPU)"),
    ("vcpu_host_on_every_row", ["0,memslot,-1,0,1073741824,,,0,true,,,", "1,npf,-1,0,,true,,,,,,"],
     "t.csv, row 2, column 'vcpu': vcpu -1 is not a vCPU index (npf events come from a vCPU)"),
    ("vcpu_below_host", [SLOT, "1,host_access,-2,0,8,,,,,,,"],
     "t.csv, row 2, column 'vcpu': vcpu -2 is negative (only -1, the host, is allowed)"),
    ("ts_backwards", [SLOT, "5,npf,0,0,,true,,,,,,", "5,npf,0,0,,true,,,,,,",
                      "4,npf,0,0,,true,,,,,,"],
     "t.csv, row 4, column 'ts': ts 4 goes backwards (previous event at 5)"),
    ("memslot_overlap", [SLOT, "1,memslot,,1069547520,8388608,,,1,true,,,"],
     "t.csv, row 2, column 'gpa': memslot 1 [0x3fc00000, 0x40400000) overlaps memslot 0 "
     "[0x0, 0x40000000)"),
    ("memslot_move_overlap", [SLOT, "1,memslot,,1073741824,4096,,,1,,,,",
                              "2,memslot,,0,1073745920,,,0,,,,"],
     "t.csv, row 3, column 'gpa': memslot 0 [0x0, 0x40001000) overlaps memslot 1 "
     "[0x40000000, 0x40001000)"),
    ("earliest_row_wins", [SLOT, "1,npf,0,0,,true,,,,,,", "2,host_access,-1,0,0,,,,,,,",
                           "1,psc,0,1,4096,,,,,1,bogus,"],
     "t.csv, row 3, column 'size': size must be greater than 0"),
    ("type_int", [SLOT, "1,npf,0,4k,,true,,,,,,"],
     "t.csv, row 2, column 'gpa': gpa '4k' is not a non-negative integer"),
    ("type_bool", [SLOT, "1,npf,0,0,,yes,,,,,,"],
     "t.csv, row 2, column 'private': private 'yes' is not true or false"),
    ("type_range", [SLOT, "1,npf,4294967296,0,,true,,,,,,"],
     "t.csv, row 2, column 'vcpu': vcpu 4294967296 is out of range for int32"),
]
VALID_CSV = [
    ("memslot_delete_and_reuse", [SLOT, "1,memslot,,0,0,,,0,,,,", "2,memslot,,0,4096,,,1,,,,"]),
    ("memslot_move_in_place", [SLOT, "1,memslot,,0,2147483648,,,0,true,,,"]),
    ("npf_unaligned_and_host_vcpu", [SLOT, "1,npf,3,4661,,false,,,,,,",
                                     "2,host_access,-1,4661,3,,true,,,,,virtio"]),
    ("ties_keep_order", [SLOT, "0,npf,0,0,,true,,,,,,"]),
    ("hex_cells", [SLOT, "1,set_attributes,,0x200000,0x1000,true,,,,,,"]),
]


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def run_info(name: str):
    return CliRunner().invoke(cli, ["info", name])


def assert_error(name: str, message: str) -> None:
    result = run_info(name)
    assert "Traceback" not in result.output
    assert result.stderr == f"Error: {message}\n"
    assert result.exit_code == 3, result.output


@pytest.mark.parametrize("lines,message", [c[1:] for c in CSV_CASES],
                         ids=[c[0] for c in CSV_CASES])
def test_csv_rule(tmp_path, lines, message):
    (tmp_path / "t.csv").write_text("\n".join([HEADER, *lines]) + "\n")
    assert_error("t.csv", message)


@pytest.mark.parametrize("lines", [c[1] for c in VALID_CSV], ids=[c[0] for c in VALID_CSV])
def test_csv_valid(tmp_path, lines):
    (tmp_path / "t.csv").write_text("\n".join([HEADER, *lines]) + "\n")
    result = run_info("t.csv")
    assert result.exit_code == 0, result.output


def _jsonl(tmp_path, *lines: str) -> None:
    (tmp_path / "t.jsonl").write_text("\n".join(lines) + "\n")


NPF = '{"ts": 1, "kind": "npf", "vcpu": 0, "gpa": 0, "private": true}'


def test_jsonl_line_that_is_not_json(tmp_path):
    _jsonl(tmp_path, NPF, "", NPF, '{"ts": 2, "kind": "npf",')
    assert_error("t.jsonl", "t.jsonl, row 4: not valid JSON (Expecting property name enclosed "
                            "in double quotes)")


def test_jsonl_line_that_is_not_an_object(tmp_path):
    _jsonl(tmp_path, NPF, "[1, 2]")
    assert_error("t.jsonl", "t.jsonl, row 2: not a JSON object")


def test_jsonl_rows_are_line_numbers(tmp_path):
    _jsonl(tmp_path, NPF, "", "   ", NPF.replace('"vcpu": 0', '"vcpu": -1'))
    assert_error("t.jsonl", "t.jsonl, row 4, column 'vcpu': vcpu -1 is not a vCPU index "
                            "(npf events come from a vCPU)")


def test_jsonl_value_of_another_type(tmp_path):
    _jsonl(tmp_path, NPF, NPF.replace('"gpa": 0', '"gpa": "4096"'))
    assert_error("t.jsonl", "t.jsonl, row 2, column 'gpa': gpa '4096' is not a non-negative "
                            "integer")


def test_jsonl_column_of_another_type(tmp_path):
    _jsonl(tmp_path, NPF.replace("true", "1"))
    assert_error("t.jsonl", "t.jsonl, row 1, column 'private': private 1 is not true or false")


def test_jsonl_fraction(tmp_path):
    _jsonl(tmp_path, NPF, NPF.replace('"gpa": 0', '"gpa": 4096.5'))
    assert_error("t.jsonl", "t.jsonl, row 2, column 'gpa': gpa 4096.5 is not a non-negative "
                            "integer")


def test_jsonl_unknown_column(tmp_path):
    _jsonl(tmp_path, NPF, NPF.replace("}", ', "cpu": 3}'))
    assert_error("t.jsonl", "t.jsonl, row 2, column 'cpu': unknown column (known: ts, kind, "
                            "vcpu, gpa, size, private, write, slot, gmem, req, op, agent, "
                            "latency)")


def test_csv_unknown_column(tmp_path):
    (tmp_path / "t.csv").write_text("ts,kind,colour\n0,npf,red\n")
    assert_error("t.csv", "t.csv, row 1, column 'colour': unknown column (known: ts, kind, "
                          "vcpu, gpa, size, private, write, slot, gmem, req, op, agent, "
                          "latency)")


@pytest.mark.parametrize("missing", ["ts", "kind"])
def test_missing_mandatory_column(tmp_path, missing):
    table = pa.table({"ts": [0], "kind": ["npf"], "vcpu": [0], "gpa": [0], "private": [True]})
    pq.write_table(table.drop_columns([missing]), tmp_path / "t.parquet")
    assert_error("t.parquet", f"t.parquet, column '{missing}': required column is missing")


def test_parquet_wrong_column_type(tmp_path):
    table = pa.table({"ts": [0, 1], "kind": ["npf", "npf"], "vcpu": [0, 0],
                      "gpa": ["0", "4096"], "private": [True, True]})
    pq.write_table(table, tmp_path / "t.parquet")
    assert_error("t.parquet", "t.parquet, row 1, column 'gpa': gpa '0' is not a non-negative "
                              "integer")


def test_parquet_value_that_does_not_fit(tmp_path):
    table = pa.table({"ts": [0, 1, 2], "kind": ["npf"] * 3, "vcpu": [0, 1, 2**40],
                      "gpa": [0, 0, 0], "private": [True] * 3})
    pq.write_table(table, tmp_path / "t.parquet")
    assert_error("t.parquet", "t.parquet, row 3, column 'vcpu': vcpu 1099511627776 is out of "
                              "range for int32")


def test_parquet_unknown_column(tmp_path):
    pq.write_table(pa.table({"ts": [0], "kind": ["npf"], "extra": [None]}),
                   tmp_path / "t.parquet")
    assert_error("t.parquet", "t.parquet, column 'extra': unknown column (known: ts, kind, "
                              "vcpu, gpa, size, private, write, slot, gmem, req, op, agent, "
                              "latency)")


def test_missing_file():
    assert_error("nope.parquet", "nope.parquet: no such file")


@pytest.mark.parametrize("name", ["t.parquet", "t.arrow", "t.jsonl", "t.csv"])
def test_empty_file(tmp_path, name):
    (tmp_path / name).write_bytes(b"")
    assert_error(name, f"{name}: file is empty")


def test_unknown_extension(tmp_path):
    (tmp_path / "t.txt").write_text("hello")
    assert_error("t.txt", "t.txt: unknown trace format '.txt' (supported: .parquet, .arrow, "
                          f".feather, .jsonl, .csv); {IMPORT_HINT}")


def test_directory(tmp_path):
    (tmp_path / "d.parquet").mkdir()
    assert_error("d.parquet", f"d.parquet: is a directory, not a trace file ({IMPORT_HINT})")


def _valid_bytes(tmp_path, name: str) -> bytes:
    write_trace(from_rows([{"ts": i, "kind": "npf", "vcpu": 0, "gpa": i * 4096,
                            "private": bool(i % 2)} for i in range(50)]), tmp_path / name)
    return (tmp_path / name).read_bytes()


def test_random_bytes_parquet(tmp_path):
    (tmp_path / "t.parquet").write_bytes(random.Random(1).randbytes(300))
    assert_error("t.parquet", "t.parquet: not a readable Parquet file (Could not open Parquet "
                              "input source 't.parquet': Parquet magic bytes not found in "
                              "footer. Either the file is corrupted or this is not a parquet "
                              "file.)")


@pytest.mark.parametrize("name", ["t.parquet", "t.arrow"])
def test_truncated_or_corrupted(tmp_path, name):
    """A file cut short has lost its footer: one line of exit 3. Bytes overwritten in place:
    one line of exit 3, or (the damage missed what is read) a read that gives a valid trace."""
    data = _valid_bytes(tmp_path, name)
    rng = random.Random(7)
    for attempt in range(40):
        cut = attempt % 2 == 1
        broken = bytearray(data[: rng.randrange(1, len(data))] if cut else data)
        for _ in range(rng.randint(1, 8)):
            broken[rng.randrange(len(broken))] = rng.randrange(256)
        (tmp_path / name).write_bytes(bytes(broken))
        result = run_info(name)
        assert "Traceback" not in result.output
        if cut or result.exit_code != 0:
            assert result.exit_code == 3, result.output
            assert result.stderr.startswith(f"Error: {name}")
            assert result.stderr.count("\n") == 1
        else:
            trace = read_trace(tmp_path / name)
            validate(trace.table)
            assert trace.events == trace.table.num_rows


def test_truncated_parquet_message(tmp_path):
    data = _valid_bytes(tmp_path, "t.parquet")
    (tmp_path / "t.parquet").write_bytes(data[: len(data) // 2])
    assert_error("t.parquet", "t.parquet: not a readable Parquet file (Could not open Parquet "
                              "input source 't.parquet': Parquet magic bytes not found in "
                              "footer. Either the file is corrupted or this is not a parquet "
                              "file.)")


def _with_metadata(tmp_path, metadata: dict[str, str]) -> None:
    table = from_rows([{"ts": 0, "kind": "npf", "vcpu": 0, "gpa": 0, "private": True}])
    pq.write_table(table.replace_schema_metadata(metadata), tmp_path / "t.parquet")


@pytest.mark.parametrize("metadata,message", [
    ({"upmtrace.format": "2"},
     "upmtrace.format is '2'; this upmtrace reads formats '1' and '1.1'"),
    ({"upmtrace.format": "1.0"},
     "upmtrace.format is '1.0'; this upmtrace reads formats '1' and '1.1'"),
    ({"upmtrace.platform": "arm"},
     "upmtrace.platform is 'arm' (expected one of snp, tdx, sw)"),
    ({"upmtrace.recorded": "[1, 2]"}, "upmtrace.recorded is not a JSON object"),
    ({"upmtrace.recorded": "{exits"}, "upmtrace.recorded is not a JSON object"),
], ids=["format", "format_1_0", "platform", "recorded_list", "recorded_not_json"])
def test_bad_metadata(tmp_path, metadata, message):
    _with_metadata(tmp_path, metadata)
    assert_error("t.parquet", f"t.parquet: {message}")


def test_metadata_defaults(tmp_path):
    _with_metadata(tmp_path, {"upmtrace.recorded": json.dumps({"exits": 1})})
    result = CliRunner().invoke(cli, ["info", "t.parquet", "--format", "json"])
    summary = json.loads(result.stdout)
    assert (summary["platform"], summary["recorded"]) == ("snp", {"exits": 1})


def test_jsonl_invalid_utf8_and_crlf(tmp_path):
    agent = '{"ts": 2, "kind": "host_access", "gpa": 0, "size": 8, "agent": "\xff"}'
    (tmp_path / "t.jsonl").write_bytes(b"\r\n".join([NPF.encode(), b"", agent.encode("latin-1")]))
    assert_error("t.jsonl", "t.jsonl, row 3, column 'agent': agent is not valid UTF-8")


def test_arrow_invalid_utf8(tmp_path):
    offsets = pa.py_buffer(bytes([0, 0, 0, 0, 3, 0, 0, 0, 4, 0, 0, 0]))
    bad = pa.Array.from_buffers(pa.string(), 2, [None, offsets, pa.py_buffer(b"vmm\xff")])
    table = pa.table({"ts": [0, 1], "kind": ["host_access"] * 2, "gpa": [0, 0], "size": [8, 8],
                      "agent": pa.DictionaryArray.from_arrays(pa.array([0, 1], pa.int8()), bad)})
    with pa.OSFile(str(tmp_path / "t.arrow"), "wb") as sink, \
            pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    assert_error("t.arrow", "t.arrow, row 2, column 'agent': agent is not valid UTF-8")


# --- latency (format 1.1) --------------------------------------------------------------------

LATENCY_MESSAGE = ("row 2, column 'latency': latency -5 is negative (nanoseconds from an exit "
                   "to the next entry)")


def test_csv_negative_latency(tmp_path):
    (tmp_path / "t.csv").write_text(f"{HEADER},latency\n{SLOT},\n1,npf,0,0,,true,,,,,,,-5\n")
    assert_error("t.csv", f"t.csv, {LATENCY_MESSAGE}")


def test_jsonl_negative_latency(tmp_path):
    _jsonl(tmp_path, '{"upmtrace": {"format": "1.1"}}', NPF,
           NPF.replace("}", ', "latency": -5}'))
    assert_error("t.jsonl", f"t.jsonl, row 3, {LATENCY_MESSAGE.removeprefix('row 2, ')}")


@pytest.mark.parametrize("name", ["t.parquet", "t.arrow"])
def test_binary_negative_latency(tmp_path, name):
    table = from_rows([{"ts": 0, "kind": "npf", "vcpu": 0, "gpa": 0, "private": True,
                        "latency": 10},
                       {"ts": 1, "kind": "npf", "vcpu": 0, "gpa": 0, "private": True,
                        "latency": -5}])
    if name.endswith(".parquet"):
        pq.write_table(table, tmp_path / name)
    else:
        with pa.OSFile(str(tmp_path / name), "wb") as sink, \
                pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
    assert_error(name, f"{name}, {LATENCY_MESSAGE}")


def test_csv_latency_of_another_type(tmp_path):
    (tmp_path / "t.csv").write_text(f"{HEADER},latency\n{SLOT},\n1,npf,0,0,,true,,,,,,,1.5\n")
    assert_error("t.csv", "t.csv, row 2, column 'latency': latency '1.5' is not an integer")


def test_latency_on_any_kind_and_zero_are_valid(tmp_path):
    _jsonl(tmp_path, '{"ts": 0, "kind": "memslot", "slot": 0, "gpa": 0, "size": 4096, '
                     '"latency": 0}', NPF.replace("}", ', "latency": 9223372036854775807}'))
    assert run_info("t.jsonl").exit_code == 0


# --- dictionaries in another order -----------------------------------------------------------

ORDERED = [
    {"ts": 0, "kind": "memslot", "slot": 0, "gpa": 0, "size": 1 << 30, "gmem": True},
    {"ts": 1, "kind": "set_attributes", "gpa": 0, "size": 1 << 30, "private": True},
    {"ts": 3, "kind": "npf", "vcpu": 0, "gpa": 0x200000, "private": True, "write": True},
    {"ts": 4, "kind": "psc", "vcpu": 0, "req": 1, "gpa": 0x200000, "size": 4096,
     "op": "shared"},
    {"ts": 4, "kind": "psc", "vcpu": 0, "req": 1, "gpa": 0x400000, "size": 0x200000,
     "op": "psmash"},
    {"ts": 5, "kind": "map_gpa", "vcpu": 1, "gpa": 0x600000, "size": 8192, "private": False},
    {"ts": 6, "kind": "host_access", "vcpu": -1, "gpa": 0x200000, "size": 64,
     "write": True, "agent": "virtio"},
    {"ts": 7, "kind": "host_access", "vcpu": -1, "gpa": 0x201000, "size": 64,
     "write": False, "agent": "vmm"},
    {"ts": 8, "kind": "psc", "vcpu": 0, "req": -1, "gpa": 0x200000, "size": 4096,
     "op": "private"},
]


def _reordered(rows: list[dict]) -> pa.Table:
    """`rows` with kind, op and agent dictionaries in reverse order of the canonical one (kind:
    populate first, memslot last), and an op dictionary entry no row uses."""
    table = from_rows(rows)
    for name, extra in (("kind", []), ("op", ["unused"]), ("agent", [])):
        column = table.column(name).combine_chunks()
        words = column.dictionary.to_pylist()
        reverse = extra + words[::-1]
        indices = pa.array([None if w is None else reverse.index(w)
                            for w in column.to_pylist()], pa.int8())
        table = table.set_column(table.schema.get_field_index(name), name,
                                 pa.DictionaryArray.from_arrays(indices, reverse))
    return table


def test_a_parquet_file_with_the_kind_dictionary_reversed_reads_and_replays(tmp_path,
                                                                            monkeypatch):
    from upmtrace.trace import io as trace_io
    from upmtrace.trace.io import read_trace

    table = _reordered(ORDERED)
    assert table.column("kind").chunk(0).dictionary.to_pylist()[0] == "populate"
    pq.write_table(table, tmp_path / "t.parquet")
    write_trace(from_rows(ORDERED), tmp_path / "c.parquet")
    assert read_trace(tmp_path / "t.parquet").table.equals(from_rows(ORDERED))
    with monkeypatch.context() as patch:
        patch.setattr(trace_io, "STREAM_ROWS", 3)  # the batch-by-batch path too
        streamed = read_trace(tmp_path / "t.parquet")
        assert streamed.loaded is None and streamed.table.equals(from_rows(ORDERED))
    reports = {}
    for name in ("t.parquet", "c.parquet"):
        result = CliRunner().invoke(cli, ["replay", name, "--format", "json"])
        assert result.exit_code == 0, result.output
        reports[name] = json.loads(result.stdout)
        del reports[name]["trace"]
    assert reports["t.parquet"] == reports["c.parquet"]
    summary = json.loads(CliRunner().invoke(cli, ["info", "t.parquet", "--format", "json"])
                         .stdout)
    assert summary["events_by_kind"] == {"memslot": 1, "set_attributes": 1, "npf": 1,
                                         "psc": 3, "map_gpa": 1, "host_access": 2,
                                         "populate": 0}


def test_validate_reads_codes_by_value_not_by_dictionary_position():
    """validate() itself on a SCHEMA table whose dictionaries are not in canonical order."""
    from upmtrace.errors import TraceError
    from upmtrace.trace.validate import validate

    validate(_reordered(ORDERED))
    bad = [dict(r) for r in ORDERED]
    bad[3]["gpa"] = 0x200800  # a psc entry, not 4 KiB aligned
    with pytest.raises(TraceError, match="row 4, column 'gpa': gpa 0x200800 is not 4 KiB"):
        validate(_reordered(bad))
    no_op = [dict(r) for r in ORDERED]
    no_op[4]["op"] = None
    with pytest.raises(TraceError, match="row 5, column 'op': missing op"):
        validate(_reordered(no_op))
    host_npf = [dict(r) for r in ORDERED]
    host_npf[2]["vcpu"] = -1
    with pytest.raises(TraceError, match="row 3, column 'vcpu': vcpu -1 is not a vCPU index "
                                         r"\(npf events"):
        validate(_reordered(host_npf))
