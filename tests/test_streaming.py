"""Long Parquet traces are read batch by batch: same reports, same errors, bounded memory."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from scenario import K, M, attrs, host, memslot, npf, psc, table

import upmtrace.trace.io as io
from upmtrace.cli import cli
from upmtrace.engine import replay
from upmtrace.policy import PRESETS
from upmtrace.timeline import Timeline
from upmtrace.trace.io import read_trace, write_trace

ROWS = [memslot(0, 0, 4 * M), attrs(0, 4 * M),
        *(npf(g * 4 * K, g % 7 != 0) for g in range(300)),
        psc(0, 64 * K, "shared"), host(0, 16 * K), memslot(1, 8 * M, 2 * M),
        *(npf(8 * M + g * 4 * K, False) for g in range(100))]


@pytest.fixture
def streamed(monkeypatch):
    monkeypatch.setattr(io, "STREAM_ROWS", 10)


def write_rows(path, rows, row_group=50):
    t = table(*rows)
    pq.write_table(t.replace_schema_metadata({"upmtrace.format": "1"}), path,
                   row_group_size=row_group)
    return path


def test_streamed_trace_replays_like_a_loaded_one(tmp_path, monkeypatch):
    path = write_rows(tmp_path / "t.parquet", ROWS)
    loaded = read_trace(path)
    monkeypatch.setattr(io, "STREAM_ROWS", 10)
    streamed = read_trace(path)
    assert loaded.loaded is not None and streamed.loaded is None
    assert streamed.events == len(ROWS) and streamed.sha256 == loaded.sha256
    assert streamed.ts_span() == loaded.ts_span() == (0, len(ROWS) - 1)
    for policy in ("eager", "lazy", "hugepool"):
        for batch_rows in (7, 64, 65_536):
            assert (replay(streamed, PRESETS[policy], batch_rows=batch_rows).to_json()
                    == replay(loaded, PRESETS[policy]).to_json())
    a, b = Timeline.over(loaded, 20), Timeline.over(streamed, 20)
    replay(loaded, timeline=a)
    replay(streamed, timeline=b)
    assert a.samples == b.samples


def test_streamed_table_materialises(tmp_path, streamed):
    path = write_rows(tmp_path / "t.parquet", ROWS)
    trace = read_trace(path)
    assert trace.loaded is None  # streamed, then materialised on demand: the rows written
    assert trace.table.to_pylist() == table(*ROWS).to_pylist()


@pytest.mark.parametrize(("rows", "message"), [
    # ts goes backwards exactly at a record-batch boundary (batches of 7 in this test)
    ([*ROWS[:7], {**npf(0, True), "ts": 2}],
     "row 8, column 'ts': ts 2 goes backwards (previous event at 6)"),
    # a slot overlapping one registered in an earlier batch
    ([*ROWS[:20], memslot(2, 2 * M, 4 * M)],
     "row 21, column 'gpa': memslot 2 [0x200000, 0x600000) overlaps memslot 0 [0x0, 0x400000)"),
    ([*ROWS[:30], psc(0x1234, 4 * K, "shared")],
     "row 31, column 'gpa': gpa 0x1234 is not 4 KiB aligned"),
])
def test_errors_in_later_batches_name_the_row(tmp_path, monkeypatch, rows, message):
    monkeypatch.setattr(io, "STREAM_ROWS", 10)
    path = write_rows(tmp_path / "bad.parquet", rows)
    monkeypatch.setattr(io.Trace, "batches", _small_batches(io.Trace.batches))
    out = tmp_path / "report.json"
    out.write_text("precious")
    result = CliRunner().invoke(cli, ["replay", str(path), "--format", "json", "--output",
                                      str(out)])
    assert result.exit_code == 3
    assert result.output.strip() == f"Error: {path}, {message}"
    assert out.read_text(encoding="utf-8") == "precious"


def _small_batches(batches):
    def seven(self, rows=65_536):
        return batches(self, 7)
    return seven


def test_bad_schema_is_caught_before_streaming(tmp_path, streamed):
    path = tmp_path / "t.parquet"
    t = table(*ROWS[:20]).append_column("colour", pa.array(["red"] * 20))
    pq.write_table(t, path)
    with pytest.raises(io.TraceError, match="column 'colour': unknown column"):
        read_trace(path)
    write_trace(table(*ROWS), tmp_path / "ok.parquet")
    assert read_trace(tmp_path / "ok.parquet").loaded is None
