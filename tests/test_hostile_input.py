"""Every command faced with bad input: exit 3 (2 for usage), one exact `Error:` line
naming the file (row and column where they apply), no traceback, and every output file that
existed before the run byte-for-byte untouched, with no temporary file left beside it.

Each test runs in a folder holding a valid trace, a valid baseline and fleet baseline, and an
old file at every output path (-o/--output/--timeline/--junit/--update); a snapshot of the
whole folder before the run must equal the one after it.
"""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from scenario import K, M, attrs, host, memslot, npf, psc, table

from upmtrace.cli import cli
from upmtrace.costs import DEFAULTS
from upmtrace.policy import KNOBS
from upmtrace.trace.io import IMPORT_HINT, write_trace

HOSTILE = Path(__file__).parent / "fixtures" / "hostile"
GOOD = "good.parquet"
GOOD_ROWS = (memslot(0, 0, 4 * M), attrs(0, 4 * M), npf(0, True), psc(0, 8 * K, "shared"),
             npf(0, False), host(0, 8 * K))
COLUMNS = "ts, kind, vcpu, gpa, size, private, write, slot, gmem, req, op, agent, latency"
KNOB_NAMES = ", ".join(KNOBS)
CSV_HEADER = "ts,kind,vcpu,gpa,size,private,write,slot,gmem,req,op,agent"
CSV_SLOT = "0,memslot,,0,1073741824,,,0,true,,,"
NPF = '{"ts": 1, "kind": "npf", "vcpu": 0, "gpa": 0, "private": true}'
PARQUET_NOT_PARQUET = ("not a readable Parquet file (Could not open Parquet input source "
                       "'t.parquet': Parquet magic bytes not found in footer. Either the file is "
                       "corrupted or this is not a parquet file.)")
# files at every output path before each run; base.json and fleet.json are valid baselines
OLD_OUTPUTS = {"out.json": b"old report\n", "tl.csv": b"old timeline\n",
               "junit.xml": b"<old/>\n", "plot.png": b"old image", "res.parquet": b"old results",
               "out.parquet": b"old trace"}


# --- the folder and the one assertion -------------------------------------------------------


def invoke(args: list[str]):
    return CliRunner().invoke(cli, args)


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, bytes]:
    """A valid trace with its baseline (check --update) and fleet baseline, as bytes."""
    folder = tmp_path_factory.mktemp("assets")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        write_trace(table(*GOOD_ROWS), GOOD)
        assert invoke(["check", GOOD, "--baseline", "base.json", "--update"]).exit_code == 0
        assert invoke(["fleet", "check", GOOD, "--baseline", "fleet.json", "--update",
                       "--workers", "1"]).exit_code == 0
    return {p.name: p.read_bytes() for p in folder.iterdir()}


@pytest.fixture
def work(tmp_path, monkeypatch, assets) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", "100")
    for name, data in {**assets, **OLD_OUTPUTS}.items():
        (tmp_path / name).write_bytes(data)
    return tmp_path


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def fails(args: list[str], code: int, message: str, folder: Path) -> None:
    """The run exits `code` with `Error: message` as its one stderr line (its last one for a
    click usage error; a message ending in '...' is a prefix: pyarrow's own words follow),
    prints no traceback and leaves the folder exactly as it was."""
    before = snapshot(folder)
    result = invoke(args)
    assert result.exception is None or isinstance(result.exception, SystemExit), \
        repr(result.exception)
    assert "Traceback" not in result.output
    assert result.exit_code == code, result.output
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    if code == 2 and lines and lines[0].startswith("Usage:"):
        lines = lines[-1:]
    assert len(lines) == 1, result.stderr
    if message.endswith("..."):
        assert lines[0].startswith(f"Error: {message[:-3]}"), lines[0]
    else:
        assert lines[0] == f"Error: {message}"
    after = snapshot(folder)
    assert after.keys() == before.keys(), f"files added or removed: {after.keys() ^ before.keys()}"
    changed = [name for name in before if before[name] != after[name]]
    if "--junit" in args and code == 3:  # the JUnit file always tells CI what happened
        junit = args[args.index("--junit") + 1]
        assert junit in changed, changed
        error = ET.parse(folder / junit).find("testsuite/testcase/error")
        assert error is not None and error.get("message") == lines[0]
        changed.remove(junit)
    assert not changed, f"changed by a failing run: {changed}"
    assert not list(folder.glob(".*.tmp"))


# --- bad traces, under every command that reads one ------------------------------------------


def text(content: str) -> Callable[[Path], None]:
    return lambda path: path.write_text(content)


def raw(content: bytes) -> Callable[[Path], None]:
    return lambda path: path.write_bytes(content)


def csv(*lines: str) -> Callable[[Path], None]:
    return text("\n".join([CSV_HEADER, *lines]) + "\n")


def jsonl(*lines: str) -> Callable[[Path], None]:
    return text("\n".join(lines) + "\n")


def parquet_of(columns: dict, metadata: dict | None = None) -> Callable[[Path], None]:
    def make(path: Path) -> None:
        t = pa.table(columns)
        pq.write_table(t.replace_schema_metadata(metadata) if metadata else t, path)
    return make


def truncated(keep: float) -> Callable[[Path], None]:
    """A valid trace in the file's format, cut to `keep` of its length."""
    def make(path: Path) -> None:
        write_trace(table(*GOOD_ROWS), path)
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * keep)])
    return make


def arrow_with_kind(kind: str) -> Callable[[Path], None]:
    def make(path: Path) -> None:
        t = pa.table({"ts": [0, 1], "kind": ["memslot", kind], "slot": [0, None],
                      "gpa": [0, 0], "size": [4 * M, 4 * K]})
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, t.schema) as writer:
            writer.write_table(t)
    return make


@dataclass(frozen=True)
class Case:
    id: str
    name: str  # the trace file's name
    make: Callable[[Path], None] | None  # None: the file does not exist
    message: str


def npf_row(**change) -> str:
    return json.dumps({"ts": 2, "kind": "npf", "vcpu": 0, "gpa": 0, "private": True} | change)


TRACE_CASES = [
    Case("missing", "t.parquet", None, "t.parquet: no such file"),
    *[Case(f"empty-{s}", f"t.{s}", raw(b""), f"t.{s}: file is empty")
      for s in ("parquet", "arrow", "jsonl", "csv")],
    Case("directory", "d.parquet", lambda p: p.mkdir(),
         f"d.parquet: is a directory, not a trace file ({IMPORT_HINT})"),
    Case("unknown-suffix", "t.txt", text("hello\n"),
         "t.txt: unknown trace format '.txt' (supported: .parquet, .arrow, .feather, .jsonl, "
         f".csv); {IMPORT_HINT}"),
    Case("truncated-parquet", "t.parquet", truncated(0.5),
         f"t.parquet: {PARQUET_NOT_PARQUET}"),
    Case("random-bytes-parquet", "t.parquet", raw(bytes(range(256)) * 3),
         f"t.parquet: {PARQUET_NOT_PARQUET}"),
    Case("truncated-arrow", "t.arrow", truncated(0.5),
         "t.arrow: not a readable Arrow IPC file (..."),
    Case("corrupt-arrow-structure", "t.arrow",
         raw((HOSTILE / "negative-length-dictionary.arrow").read_bytes()),
         "t.arrow: not a readable Arrow IPC file (Column 1: In chunk 0: Invalid: Dictionary "
         "array invalid..."),
    Case("jsonl-not-json", "t.jsonl", jsonl(NPF, '{"ts": 2, "kind": "npf",'),
         "t.jsonl, row 2: not valid JSON (Expecting property name enclosed in double quotes)"),
    Case("jsonl-two-objects-on-a-line", "t.jsonl", jsonl(NPF, f"{NPF} {NPF}"),
         "t.jsonl, row 2: not valid JSON (Extra data)"),
    Case("jsonl-object-then-null", "t.jsonl", jsonl(f"{NPF} null"),
         "t.jsonl, row 1: not valid JSON (Extra data)"),
    Case("jsonl-not-an-object", "t.jsonl", jsonl(NPF, "", "[1, 2]"),
         "t.jsonl, row 3: not a JSON object"),
    Case("jsonl-binary-garbage", "t.jsonl", raw(NPF.encode() + b"\n\x00\xff\xfe\x80junk\n"),
         "t.jsonl, row 2: not valid UTF-8"),
    Case("jsonl-key-not-utf-8", "t.jsonl", raw(NPF.encode() + b'\n{"\x80": 0, "kind": "npf"}\n'),
         "t.jsonl, row 2: not valid UTF-8"),
    Case("jsonl-wrong-type", "t.jsonl", jsonl(NPF, npf_row(kind=5)),
         "t.jsonl, row 2, column 'kind': kind 5 is not a string"),
    Case("jsonl-unknown-column", "t.jsonl", jsonl(NPF, npf_row(cpu=3)),
         f"t.jsonl, row 2, column 'cpu': unknown column (known: {COLUMNS})"),
    Case("parquet-wrong-type", "t.parquet",
         parquet_of({"ts": [0, 1], "kind": ["npf"] * 2, "vcpu": [0, 0], "gpa": ["0", "4096"],
                     "private": [True, True]}),
         "t.parquet, row 1, column 'gpa': gpa '0' is not a non-negative integer"),
    Case("csv-wrong-type", "t.csv", csv(CSV_SLOT, "1,npf,0,0,,yes,,,,,,"),
         "t.csv, row 2, column 'private': private 'yes' is not true or false"),
    Case("csv-unknown-column-twice", "t.csv", text("ts,kind,shared,shared\n0,npf,1,2\n"),
         f"t.csv, row 1, column 'shared': unknown column (known: {COLUMNS})"),
    Case("csv-column-twice", "t.csv", text("ts,kind,gpa,gpa\n0,npf,1,2\n"),
         "t.csv, column 'gpa': column appears twice"),
    Case("csv-unknown-kind", "t.csv", csv(CSV_SLOT, "1,reboot,0,0,,,,,,,,"),
         "t.csv, row 2, column 'kind': unknown kind 'reboot' (expected one of memslot, "
         "set_attributes, npf, psc, map_gpa, host_access, populate)"),
    Case("arrow-unknown-kind", "t.arrow", arrow_with_kind("teleport"),
         "t.arrow, row 2, column 'kind': unknown kind 'teleport' (expected one of memslot, "
         "set_attributes, npf, psc, map_gpa, host_access, populate)"),
    Case("jsonl-negative-size", "t.jsonl",
         jsonl(NPF, '{"ts": 2, "kind": "map_gpa", "vcpu": 0, "gpa": 0, "size": -4096, '
                    '"private": true}'),
         "t.jsonl, row 2, column 'size': size -4096 is negative"),
    Case("jsonl-size-beyond-uint64", "t.jsonl",
         jsonl(NPF, f'{{"ts": 2, "kind": "host_access", "gpa": 0, "size": {1 << 64}}}'),
         f"t.jsonl, row 2, column 'size': size {1 << 64} is out of range for uint64"),
    Case("jsonl-gpa-uint64-max", "t.jsonl", jsonl(NPF, npf_row(gpa=(1 << 64) - 1)),
         "t.jsonl, row 2, column 'gpa': gpa 0xffffffffffffffff is beyond the 52-bit guest "
         "physical address space"),
    Case("jsonl-ts-beyond-int64", "t.jsonl", jsonl(NPF, npf_row(ts=1 << 63)),
         f"t.jsonl, row 2, column 'ts': ts {1 << 63} is out of range for int64"),
    Case("jsonl-5000-digit-number", "t.jsonl", jsonl(NPF, npf_row(gpa=0).replace(
        '"gpa": 0', '"gpa": ' + "9" * 5000)),
         "t.jsonl, row 2: not valid JSON (Exceeds the limit (4300 digits) for integer string "
         "conversion: value has 5000 digits)"),
    Case("jsonl-deep-nesting", "t.jsonl", jsonl(NPF, "[" * 100_000 + "]" * 100_000),
         "t.jsonl, row 2: not valid JSON (maximum recursion depth exceeded while decoding a "
         "JSON array from a unicode string)"),
    Case("jsonl-lone-surrogate", "t.jsonl",
         jsonl(NPF, '{"ts": 2, "kind": "host_access", "gpa": 0, "size": 8, '
                    '"agent": "\\ud800"}'),
         "t.jsonl, row 2, column 'agent': agent is not valid UTF-8"),
    Case("csv-memslot-beyond-52-bits", "t.csv", csv(f"0,memslot,,0,{1 << 62},,,0,true,,,"),
         "t.csv, row 1, column 'size': gpa 0x0 + size 0x4000000000000000 ends beyond the "
         "52-bit guest physical address space"),
    Case("csv-gpa-past-2^52", "t.csv", csv(CSV_SLOT, f"1,npf,0,{1 << 52},,true,,,,,,"),
         "t.csv, row 2, column 'gpa': gpa 0x10000000000000 is beyond the 52-bit guest "
         "physical address space"),
    Case("parquet-unaligned-memslot", "t.parquet",
         parquet_of({"ts": [0], "kind": ["memslot"], "slot": [0], "gpa": [0x1234],
                     "size": [4 * K]}),
         "t.parquet, row 1, column 'gpa': gpa 0x1234 is not 4 KiB aligned"),
    Case("csv-unaligned-psc-size", "t.csv", csv(CSV_SLOT, "1,psc,0,0,2048,,,,,1,shared,"),
         "t.csv, row 2, column 'size': size 2048 is not a multiple of 4 KiB"),
    Case("jsonl-ts-backwards", "t.jsonl", jsonl(npf_row(ts=5), npf_row(ts=5), npf_row(ts=4)),
         "t.jsonl, row 3, column 'ts': ts 4 goes backwards (previous event at 5)"),
    Case("parquet-recorded-not-counts", "t.parquet",
         parquet_of({"ts": [0], "kind": ["npf"], "vcpu": [0], "gpa": [0], "private": [True]},
                    {"upmtrace.recorded": '{"exits": {"vm": {"npf": "lots"}}}'}),
         't.parquet: upmtrace.recorded: exits.vm.npf is "lots", not a count (an integer >= 0) '
         "or an object of counts"),
    Case("parquet-recorded-deeply-nested", "t.parquet",
         parquet_of({"ts": [0], "kind": ["npf"], "vcpu": [0], "gpa": [0], "private": [True]},
                    {"upmtrace.recorded": "[" * 100_000}),
         "t.parquet: upmtrace.recorded is not a JSON object"),
    Case("parquet-format-2", "t.parquet",
         parquet_of({"ts": [0], "kind": ["npf"], "vcpu": [0], "gpa": [0], "private": [True]},
                    {"upmtrace.format": "2"}),
         "t.parquet: upmtrace.format is '2'; this upmtrace reads formats '1' and '1.1'"),
]

# command -> its arguments around the trace; every output option points at an old file
TRACE_COMMANDS = {
    "info": lambda t: ["info", t],
    "replay": lambda t: ["replay", t, "--output", "out.json", "--timeline", "tl.csv"],
    "compare": lambda t: ["compare", t, "--policy", "eager", "--policy", "lazy",
                          "--output", "out.json"],
    "check": lambda t: ["check", t, "--baseline", "base.json", "--junit", "junit.xml"],
    "check-update": lambda t: ["check", t, "--baseline", "base.json", "--update"],
    "plot": lambda t: ["plot", t, "--policy", "eager", "-o", "plot.png"],
}


@pytest.mark.parametrize("command", TRACE_COMMANDS, ids=list(TRACE_COMMANDS))
@pytest.mark.parametrize("case", TRACE_CASES, ids=[c.id for c in TRACE_CASES])
def test_bad_trace(work, case, command):
    if case.make is not None:
        case.make(work / case.name)
    fails(TRACE_COMMANDS[command](case.name), 3, case.message, work)


def test_a_bare_null_line_is_one_error_not_a_crash(work):
    """pyarrow's JSON reader dies with SIGSEGV on a first line `null`: run it in a process."""
    (work / "t.jsonl").write_text("null\n")
    before = snapshot(work)
    done = subprocess.run([sys.executable, "-m", "upmtrace", "replay", "t.jsonl", "--output",
                           "out.json"], capture_output=True, text=True, cwd=work, timeout=120)
    assert (done.returncode, done.stdout) == (3, "")
    assert done.stderr == "Error: t.jsonl, row 1: not a JSON object\n"
    assert snapshot(work) == before


def test_a_bad_row_deep_in_a_streamed_parquet_leaves_outputs_untouched(work, monkeypatch):
    """Long Parquet traces are validated batch by batch during the replay: the error still
    names the row, and comes before any output is written."""
    import upmtrace.trace.io as trace_io

    monkeypatch.setattr(trace_io, "STREAM_ROWS", 10)
    rows = [memslot(0, 0, 4 * M)] + [npf(i * 4 * K, True) for i in range(100)]
    rows[70] = npf(0x1001, True) | {"kind": "psc", "req": 1, "size": 4 * K, "op": "shared"}
    pq.write_table(table(*rows), work / "long.parquet", row_group_size=16)
    fails(["replay", "long.parquet", "--output", "out.json", "--timeline", "tl.csv"], 3,
          "long.parquet, row 71, column 'gpa': gpa 0x1001 is not 4 KiB aligned", work)


# --- fleet ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("args", "message"), [
    (["fleet", "missing.parquet", "--policy", "eager", "-o", "res.parquet"],
     "missing.parquet: no such file or folder"),
    (["fleet", GOOD, "--policy", "bad.toml", "-o", "res.parquet"],
     f"bad.toml: unknown policy knob 'bogus' (knobs: {KNOB_NAMES})"),
    (["fleet", "check", GOOD, "--baseline", "broken.json", "-o", "res.parquet", "--junit",
      "junit.xml"],
     "broken.json: fleet baseline is not JSON: Expecting value: line 1 column 1 (char 0)"),
    (["fleet", "check", "t.jsonl", "--baseline", "fleet.json", "-o", "res.parquet",
      "--junit", "junit.xml"],
     "1 of 1 pairs failed, so the fleet totals are incomplete; first: t.jsonl, row 2: not "
     "valid JSON (Expecting property name enclosed in double quotes) (policy eager)"),
    (["fleet", "check", GOOD, "--baseline", "fleet.json", "--update", "--policy", "bad.toml"],
     f"bad.toml: unknown policy knob 'bogus' (knobs: {KNOB_NAMES})"),
], ids=["missing-trace", "bad-policy", "corrupt-baseline", "bad-trace-check",
        "bad-policy-update"])
def test_fleet_bad_input(work, args, message):
    (work / "bad.toml").write_text("bogus = 1\n")
    (work / "broken.json").write_text("not json\n")
    (work / "t.jsonl").write_text(NPF + '\n{"ts": 2,\n')
    fails([*args, "--workers", "1"], 3, message, work)


def test_fleet_run_reports_a_bad_trace_as_a_failed_pair(work):
    """`fleet run` goes on past a trace it cannot read (a fleet of hundreds must not stop at
    one): exit 3, the failed pair named with file and row in the summary and in the results
    table it writes; no traceback."""
    (work / "t.jsonl").write_text(NPF + '\n{"ts": 2,\n')
    result = invoke(["fleet", "t.jsonl", "--policy", "eager", "--workers", "1",
                     "-o", "res.parquet"])
    assert result.exit_code == 3 and "Traceback" not in result.output
    assert "t.jsonl, row 2: not valid JSON" in result.stdout
    errors = pq.read_table(work / "res.parquet").column("error").to_pylist()
    assert errors == ["t.jsonl, row 2: not valid JSON (Expecting property name enclosed in "
                      "double quotes)"]
    assert not list(work.glob(".*.tmp"))


# --- policy and cost files -------------------------------------------------------------------

POLICY_CASES = [
    ("unknown-key", "name = 'mine'\nbogus = 1\n",
     f"p.toml: unknown policy knob 'bogus' (knobs: {KNOB_NAMES})"),
    ("bad-value", "dealloc = 'never'\n",
     "p.toml: policy knob 'dealloc' cannot be 'never' (one of eager, lazy, aligned-2m)"),
    ("negative-limit", "lazy_limit = -1\n",
     "p.toml: policy knob 'lazy_limit' cannot be -1 (a byte count >= 0)"),
    ("infinite-limit", "lazy_limit = inf\n",
     "p.toml: policy knob 'lazy_limit' cannot be inf (a byte count >= 0)"),
    ("name-not-a-string", "name = 3\n", "p.toml: 'name' must be a non-empty string"),
    ("binary-garbage", b"\x00\xff\xfe garbage",
     "p.toml: cannot read policy file: 'utf-8' codec can't decode byte 0xff in position 1: "
     "invalid start byte"),
    ("not-toml", "dealloc = \n", "p.toml: not valid TOML: Invalid value (at line 1, column 11)"),
    ("missing", None, "p.toml: no such policy file"),
]
POLICY_COMMANDS = {
    "replay": ["replay", GOOD, "--policy", "p.toml", "--output", "out.json", "--timeline",
               "tl.csv"],
    "compare": ["compare", GOOD, "--policy", "eager", "--policy", "p.toml", "--output",
                "out.json"],
    "check": ["check", GOOD, "--baseline", "base.json", "--policy", "p.toml", "--junit",
              "junit.xml"],
    "check-update": ["check", GOOD, "--baseline", "base.json", "--policy", "p.toml",
                     "--update"],
    "plot": ["plot", GOOD, "--policy", "p.toml", "-o", "plot.png"],
    "fleet": ["fleet", GOOD, "--policy", "p.toml", "-o", "res.parquet", "--workers", "1"],
}


@pytest.mark.parametrize("command", POLICY_COMMANDS, ids=list(POLICY_COMMANDS))
@pytest.mark.parametrize(("content", "message"), [c[1:] for c in POLICY_CASES],
                         ids=[c[0] for c in POLICY_CASES])
def test_bad_policy_file(work, command, content, message):
    if content is not None:
        path = work / "p.toml"
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    fails(POLICY_COMMANDS[command], 3, message, work)


COST_CASES = [
    ("unknown-category", "bogus = 1\n",
     f"c.toml: unknown cost category 'bogus' (categories: {', '.join(DEFAULTS)})"),
    ("negative", "vm_exit = -5\n", "c.toml: cost 'vm_exit' must be a number of ns >= 0"),
    ("not-a-number", "vm_exit = 'slow'\n", "c.toml: cost 'vm_exit' must be a number of ns >= 0"),
    ("missing", None, "c.toml: no such cost file"),
]


@pytest.mark.parametrize("command", ["replay", "compare", "check"])
@pytest.mark.parametrize(("content", "message"), [c[1:] for c in COST_CASES],
                         ids=[c[0] for c in COST_CASES])
def test_bad_cost_file(work, command, content, message):
    if content is not None:
        (work / "c.toml").write_text(content)
    args = {"replay": ["replay", GOOD, "--output", "out.json"],
            "compare": ["compare", GOOD, "--policy", "eager", "--policy", "lazy", "--output",
                        "out.json"],
            "check": ["check", GOOD, "--baseline", "base.json", "--junit", "junit.xml"]}
    fails([*args[command], "--costs", "c.toml"], 3, message, work)


@pytest.mark.parametrize("value", ["inf", "nan", "1e308"])
def test_non_finite_cost_is_one_error(work, value):
    (work / "c.toml").write_text(f"vm_exit = {value}\n")
    fails(["replay", GOOD, "--output", "out.json", "--costs", "c.toml"], 3,
          "c.toml: cost 'vm_exit' must be a number of ns >= 0 and at most 1e12", work)


@pytest.mark.parametrize(("option", "message"), [
    ("--policy", "deep.toml: not valid TOML: nested too deeply"),
    ("--costs", "deep.toml: not a valid cost table: nested too deeply"),
])
def test_deeply_nested_toml_is_one_error(work, option, message):
    (work / "deep.toml").write_text("a = " + "[" * 100_000 + "]" * 100_000 + "\n")
    fails(["replay", GOOD, option, "deep.toml", "--output", "out.json"], 3, message, work)


# --- baselines ------------------------------------------------------------------------------


def edited_baseline(change: Callable[[dict], None]) -> Callable[[Path, bytes], str]:
    def make(path: Path, good: bytes) -> str:
        doc = json.loads(good)
        change(doc)
        return json.dumps(doc)
    return make


def set_path(doc: dict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        doc = doc[part]
    doc[leaf] = value


BASELINE_CASES = [
    ("missing", None, "b.json: no such baseline (create it with --update)"),
    ("not-json", "{oops", "b.json: baseline is not JSON: Expecting property name enclosed in "
                          "double quotes: line 1 column 2 (char 1)"),
    ("binary-garbage", b"\xff\xfe\x00\x01",
     "b.json: cannot read baseline: 'utf-8' codec can't decode byte 0xff in position 0: "
     "invalid start byte"),
    ("deep-nesting", "[" * 100_000, "b.json: baseline is not JSON: maximum recursion depth "
                                    "exceeded while decoding a JSON array from a unicode string"),
    ("another-schema", '{"schema": "upmtrace.report.v1"}',
     "b.json: not a baseline: expected schema 'upmtrace.baseline.v1'"),
    ("nan-tolerance", lambda good: good.replace(b'"tolerance": 0', b'"tolerance": NaN'),
     "b.json: baseline is not JSON: NaN is not a number"),
    ("overflowing-number", lambda good: good.replace(b'"tolerance": 0', b'"tolerance": 1e400'),
     "b.json: baseline is not JSON: 1e400 is not a finite number"),
    ("huge-tolerance", lambda good: good.replace(b'"tolerance": 0',
                                                 b'"tolerance": 1' + b"0" * 400),
     "b.json: guard.tolerance must be a percentage >= 0"),
    ("negative-tolerance", lambda good: good.replace(b'"tolerance": 0', b'"tolerance": -1'),
     "b.json: guard.tolerance must be a percentage >= 0"),
    ("5000-digit-count", lambda good: good.replace(b'"vm_total": ', b'"vm_total": 9' + b"9" * 4999
                                                   + b', "x": ', 1),
     "b.json: baseline is not JSON: Exceeds the limit (4300 digits) for integer string "
     "conversion: value has 5000 digits"),
    ("platform-a-list", lambda good: good.replace(b'"platform": "snp"', b'"platform": ["snp"]'),
     "b.json: baseline report: trace.sha256 must be a string and trace.platform one of snp, "
     "tdx, sw"),
    ("no-metrics", lambda good: good.replace(b'"metrics": [', b'"metrics": [], "x": ['),
     "b.json: guard.metrics must be a non-empty list of report keys"),
    ("bad-policy-knob", lambda good: good.replace(b'"dealloc": "eager"', b'"dealloc": "never"'),
     "b.json: baseline policy is not valid: policy knob 'dealloc' cannot be 'never' (one of "
     "eager, lazy, aligned-2m)"),
    ("metric-missing-from-report", lambda good: good.replace(b'"exits.vm.npf"', b'"exits.vm.nope"'),
     "b.json: guarded metric 'exits.vm.nope' is not in the baseline's report"),
]


@pytest.mark.parametrize(("content", "message"), [c[1:] for c in BASELINE_CASES],
                         ids=[c[0] for c in BASELINE_CASES])
def test_corrupt_baseline(work, content, message):
    good = (work / "base.json").read_bytes()
    if callable(content):
        content = content(good)
        assert content != good
    if content is not None:
        path = work / "b.json"
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    fails(["check", GOOD, "--baseline", "b.json", "--junit", "junit.xml"], 3, message, work)


def test_a_corrupt_baseline_is_what_update_replaces(work):
    """--update is how a broken baseline is repaired: it is the one run that may write it."""
    (work / "b.json").write_text("{oops")
    result = invoke(["check", GOOD, "--baseline", "b.json", "--update"])
    assert result.exit_code == 0, result.output
    doc = json.loads((work / "b.json").read_text(encoding="utf-8"))
    assert doc["schema"] == "upmtrace.baseline.v1"


@pytest.mark.parametrize(("change", "message"), [
    (lambda good: good.replace(b'"tolerance": 0', b'"tolerance": NaN'),
     "fleet baseline is not JSON: NaN is not a number"),
    (lambda good: good.replace(b'"tolerance": 0', b'"tolerance": 1' + b"0" * 400),
     "not a valid fleet baseline: guard.tolerance must be a percentage >= 0"),
    (lambda good: b"[" * 100_000,
     "fleet baseline is not JSON: maximum recursion depth exceeded while decoding a JSON array "
     "from a unicode string"),
], ids=["nan-tolerance", "huge-tolerance", "deep-nesting"])
def test_corrupt_fleet_baseline(work, change, message):
    (work / "fb.json").write_bytes(change((work / "fleet.json").read_bytes()))
    fails(["fleet", "check", GOOD, "--baseline", "fb.json", "--workers", "1", "-o",
           "res.parquet", "--junit", "junit.xml"], 3, f"fb.json: {message}", work)


# --- import: logs -----------------------------------------------------------------------------

NOTHING = ("nothing to import: none of its {lines} lines is a usable event ({reasons}); "
           "expected ftrace / trace-cmd report / perf script text of kvm tracepoints or a QEMU "
           "-trace log")
FAULT = (" CPU 0/KVM-1234 [001] ..... 100.314706: kvm_page_fault: vcpu 0 rip 0xffffffff81000000 "
         "address 0x{gpa} error_code 0x400000006\n")

IMPORT_CASES = [
    ("missing", None, "log.txt: no such file"),
    ("directory", "dir", "log.txt: is a directory, not a log file"),
    ("empty", b"", "log.txt: " + NOTHING.format(lines=0, reasons="").replace(" ()", "")),
    ("binary-garbage", b"\x7fELF\x00\x01\xff\xfe" * 64 + b"\n\x00\x00\xff\n",
     "log.txt: " + NOTHING.format(lines=2, reasons="2 unrecognised line")),
    ("5000-digit-timestamp", FAULT.format(gpa="1000").replace("100.314706", "9" * 5000 + ".1"),
     "log.txt: " + NOTHING.format(lines=1, reasons="1 line with a number or date out of range")),
    ("impossible-date", "2024-13-45T99:99:99Z kvm_memory_fault start 0x1000 size 0x1000 "
                        "flags 0x8\n",
     "log.txt: " + NOTHING.format(lines=1, reasons="1 line with a number or date out of range")),
    ("address-past-2^52", FAULT.format(gpa="10000000000000"),
     "log.txt: " + NOTHING.format(lines=1, reasons="1 malformed kvm_page_fault line")),
    ("only-a-line-longer-than-1-MiB", "x" * (2 << 20) + "\n",
     "log.txt: " + NOTHING.format(lines=1, reasons="1 line longer than 1 MiB")),
]


@pytest.mark.parametrize("out", ["out.parquet", "out.jsonl"])
@pytest.mark.parametrize(("content", "message"), [c[1:] for c in IMPORT_CASES],
                         ids=[c[0] for c in IMPORT_CASES])
def test_bad_log(work, content, message, out):
    path = work / "log.txt"
    if content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    (work / "out.jsonl").write_bytes(b"old trace")
    fails(["import", "log.txt", "-o", out], 3, message, work)


def test_a_corrupt_compressed_log_that_yields_nothing(work):
    (work / "log.txt.gz").write_bytes(gzip.compress(b"")[:10] + b"\x00garbage")
    fails(["import", "log.txt.gz", "-o", "out.parquet"], 3,
          "log.txt.gz: " + NOTHING.format(lines=0, reasons="1 unreadable rest of file"), work)


# --- synth and usage errors -------------------------------------------------------------------

USAGE_CASES = [
    (["synth", "snp-boot", "--memory", "3M", "-o", "out.parquet"], 2,
     "--memory must be a multiple of 2 MiB between 256M and 256G, not 3145728 bytes"),
    (["synth", "snp-boot", "--vcpus", "0", "-o", "out.parquet"], 2,
     "Invalid value for '--vcpus': 0 is not in the range 1<=x<=512."),
    (["synth", "snp-boot", "--seed", "-1", "-o", "out.parquet"], 2,
     "Invalid value for '--seed': -1 is not in the range x>=0."),
    (["synth", "snp-boot", "-o", "out.txt"], 3,
     "out.txt: unknown trace format '.txt' (supported: .parquet, .arrow, .feather, .jsonl, "
     ".csv)"),
    (["synth", "snp-boot", "-o", "no/such/folder/t.parquet"], 3,
     "no/such/folder/t.parquet: cannot write (No such file or directory)"),
    (["replay", GOOD, "--timeline", "tl.txt", "--output", "out.json"], 2,
     "--timeline tl.txt: use a .parquet or .csv file"),
    (["replay", GOOD, "--set", "dealloc", "--output", "out.json"], 3,
     "--set 'dealloc': expected KEY=VALUE"),
    (["replay", GOOD, "--set", "lazy_limit=" + "9" * 5000, "--output", "out.json"], 3,
     f"policy knob 'lazy_limit' cannot be '{'9' * 5000}' (a byte count)"),
    (["replay", GOOD, "--platform", "arm", "--output", "out.json"], 2,
     "Invalid value for '--platform': 'arm' is not one of 'snp', 'tdx', 'sw'."),
    (["compare", GOOD, "--policy", "eager", "--output", "out.json"], 2,
     "compare needs at least two --policy options"),
    (["check", GOOD, "--baseline", "base.json", "--tolerance", "nan", "--junit", "junit.xml"],
     2, "Invalid value for '--tolerance': 'nan' is not a finite number"),
    (["check", GOOD, "--baseline", "base.json", "--tolerance", "inf", "--update"], 2,
     "Invalid value for '--tolerance': 'inf' is not a finite number"),
    (["check", GOOD, "--baseline", "base.json", "--metric", "nope", "--update"], 2,
     "--metric 'nope': no such key in the report (keys are dotted, e.g. exits.vm.npf or "
     "memory)"),
    (["import", "log.txt", "-o", "out.txt"], 2,
     "out.txt: unknown trace format (supported: .parquet, .arrow, .feather, .jsonl, .csv)"),
    (["import", "log.txt", "-o", "out.parquet", "--memslot", "0x1001:4096"], 2,
     "--memslot '0x1001:4096': GPA and SIZE must be 4 KiB aligned, SIZE positive, within 52 "
     "bits"),
    (["plot", GOOD, "--policy", "eager", "-o", "plot.gif"], 2,
     "-o plot.gif: use a .png or .svg file"),
    (["fleet", GOOD, "--policy", "eager", "-o", "res.txt", "--workers", "1"], 2,
     "-o res.txt: results are written as Parquet (name it *.parquet)"),
]
USAGE_IDS = ["synth-memory", "synth-vcpus", "synth-negative-seed", "synth-suffix",
             "synth-no-folder",
             "replay-timeline-suffix", "replay-set-no-value", "replay-set-5000-digits",
             "replay-platform", "compare-one-policy", "check-tolerance-nan",
             "check-tolerance-inf", "check-metric", "import-suffix", "import-memslot",
             "plot-suffix", "fleet-output-suffix"]


@pytest.mark.parametrize(("args", "code", "message"), USAGE_CASES, ids=USAGE_IDS)
def test_usage_and_output_errors(work, args, code, message):
    (work / "log.txt").write_text(FAULT.format(gpa="1000"))
    (work / "out.txt").write_bytes(b"old")
    (work / "tl.txt").write_bytes(b"old")
    fails(args, code, message, work)


# --- one line or row never costs unbounded work or memory -----------------------------------

HUGE_MAP_GPA = "kvm_hc_map_gpa_range gpa 0x0 size 0x8000000000000 attributes 0x11\n"


@pytest.mark.parametrize(("platform", "kinds"), [
    ("snp", {"memslot": 1, "set_attributes": 1, "psc": 1}),
    ("tdx", {"memslot": 1, "set_attributes": 1, "map_gpa": 1}),
    ("sw", {"memslot": 1, "set_attributes": 1, "map_gpa": 1})])
def test_a_2m_hinted_map_gpa_of_2_pow_51_bytes_stays_one_row(work, platform, kinds):
    """A 78-byte line asking for 2^51 bytes with the 2 MiB page-size hint: more 2 MiB entries
    than one GHCB request can hold, so it is kept as one range, never split 2 MiB by 2 MiB."""
    from upmtrace.trace.io import read_trace

    (work / "log.txt").write_text(HUGE_MAP_GPA)
    result = invoke(["import", "log.txt", "-o", "out.parquet", "--platform", platform])
    assert result.exit_code == 0, result.output
    rows = read_trace("out.parquet").table.to_pylist()
    assert {k: sum(r["kind"] == k for r in rows) for k in kinds} == kinds
    assert len(rows) == 3
    assert rows[-1]["gpa"] == 0 and rows[-1]["size"] == 1 << 51


def test_out_of_memory_is_one_error_line_and_exit_3(work, monkeypatch):
    from upmtrace.trace.importers import qemu

    def exhausted(*_args):
        raise MemoryError

    monkeypatch.setattr(qemu, "psc_entries", exhausted)
    (work / "log.txt").write_text(HUGE_MAP_GPA)
    fails(["import", "log.txt", "-o", "out.parquet"], 3,
          "out of memory (an input too large for this machine)", work)


def test_text_inputs_are_read_as_utf_8_under_an_ascii_locale(tmp_path):
    """Policy, cost and baseline files are UTF-8 whatever the locale: under LC_ALL=C without
    Python's UTF-8 mode, a non-ASCII policy name and comments still read, and the baseline
    written from it is read back."""
    write_trace(table(*GOOD_ROWS), tmp_path / GOOD)
    (tmp_path / "p.toml").write_bytes('# « lazy », pas « eager »\nname = "paresseux-é"\n'
                                      'dealloc = "lazy"\n'.encode())
    (tmp_path / "c.toml").write_bytes("# ns, mesurés\nvm_exit = 1200\n".encode())
    env = {"PATH": "/usr/bin:/bin", "LC_ALL": "C", "PYTHONUTF8": "0", "COLUMNS": "100"}
    for args in (["check", GOOD, "--baseline", "base.json", "--policy", "p.toml", "--costs",
                  "c.toml", "--update"],
                 ["check", GOOD, "--baseline", "base.json", "--policy", "p.toml", "--costs",
                  "c.toml"]):
        done = subprocess.run([sys.executable, "-m", "upmtrace", *args], cwd=tmp_path, env=env,
                              capture_output=True)
        assert done.returncode == 0, done.stderr.decode(errors="replace")
    baseline = json.loads((tmp_path / "base.json").read_text(encoding="utf-8"))
    assert baseline["report"]["policy"]["name"] == "paresseux-é"


def test_a_tdx_map_gpa_of_2_pow_51_bytes_is_one_error_not_a_billion_chunks(work):
    """KVM cuts a TDX MapGPA into 2 MiB chunks, one conversion each: 2^30 of them would run for
    hours, so a MapGPA beyond the model's 1 TiB limit for one event is refused."""
    (work / "log.txt").write_text(HUGE_MAP_GPA)
    assert invoke(["import", "log.txt", "-o", "tdx.parquet", "--platform", "tdx"]).exit_code == 0
    fails(["replay", "tdx.parquet", "--output", "out.json"], 3,
          "map_gpa of 0x8000000000000 bytes at gpa 0x0 would make more 2 MiB chunks than the "
          "model's limit of 1 TiB in one event", work)
