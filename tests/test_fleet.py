"""upmtrace fleet: pairs from files/globs/folders, the worker row, executors, summary, gate."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from scenario import K, M, attrs, memslot, npf, table

from upmtrace.cli import cli
from upmtrace.engine import replay
from upmtrace.errors import InputError
from upmtrace.fleet.executors import LocalExecutor
from upmtrace.fleet.pairs import (
    METRICS,
    RESULT_SCHEMA,
    Fleet,
    _groups,
    find_traces,
    flatten,
    replay_trace,
    run,
)
from upmtrace.fleet.summary import summarize
from upmtrace.policy import PRESETS
from upmtrace.trace.io import IMPORT_HINT, read_trace, write_trace

SIZES = (1, 2, 4, 10)  # pages each trace first touches private, then shared


def flips(n: int) -> list[dict]:
    """n pages, each faulted private (maps and allocates it) and then shared: per page one
    KVM_EXIT_MEMORY_FAULT and three VM exits (private fault, shared fault, retry); eager frees
    the private copy at the conversion (peak n pages, no duplicate), lazy keeps it (peak 2n
    pages, n duplicate). All pages lie in block 0: one direct-map split per trace."""
    rows = [memslot(0, 0, 4 * M), attrs(0, 4 * M)]
    for i in range(n):
        rows += [npf(i * 4 * K, True), npf(i * 4 * K, False)]
    return rows


def solo(path: str, preset: str) -> dict:
    """The row of one trace replayed under one preset alone."""
    return replay_trace(path, [PRESETS[preset].to_json()], None, None)[0]


@pytest.fixture
def fleet_dir(tmp_path) -> Path:
    folder = tmp_path / "traces"
    folder.mkdir()
    for n in SIZES:
        write_trace(table(*flips(n)), folder / f"flip-{n:02}.parquet")
    return folder


@pytest.fixture
def corrupt(fleet_dir) -> Path:
    bad = fleet_dir / "corrupt.parquet"
    bad.write_bytes(b"PAR1 this is not a parquet file")
    return bad


def run_cli(*args: str):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert "Traceback" not in result.output
    return result


def error_line(result) -> str:
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    return lines[0]


# --- pairs ---------------------------------------------------------------------------------


def test_a_folder_means_its_trace_files_sorted(tmp_path):
    for name in ("b.csv", "a.parquet", "c.jsonl", "d.feather", "e.arrow", "notes.txt",
                 ".hidden.parquet"):
        (tmp_path / name).write_text("x")
    (tmp_path / "sub.parquet").mkdir()
    names = [Path(p).name for p in find_traces([str(tmp_path)])]
    assert names == ["a.parquet", "b.csv", "c.jsonl", "d.feather", "e.arrow"]


def test_globs_files_and_folders_are_merged_once_and_sorted(fleet_dir):
    found = find_traces([str(fleet_dir / "flip-1*.parquet"), str(fleet_dir),
                         str(fleet_dir / "flip-01.parquet")])
    assert [Path(p).name for p in found] == [f"flip-{n:02}.parquet" for n in SIZES]
    assert find_traces([str(fleet_dir / "**" / "flip-0[12].parquet")]) == [
        str(fleet_dir / "flip-01.parquet"), str(fleet_dir / "flip-02.parquet")]


def test_the_results_file_is_never_a_trace(fleet_dir):
    out = fleet_dir / "results.parquet"
    out.write_text("x")
    assert str(out) not in find_traces([str(fleet_dir)], exclude=[str(out)])


@pytest.mark.parametrize(("arg", "message"), [
    ("missing", "missing: no such file or folder"),
    ("empty", "empty: folder holds no trace files (*.parquet, *.arrow, *.feather, *.jsonl, "
              "*.csv)"),
    ("*.nothing", "no trace file matches '*.nothing'"),
    ("notes.txt", "notes.txt: not a trace file name (expected *.parquet, *.arrow, *.feather, "
                  f"*.jsonl, *.csv); {IMPORT_HINT}"),
])
def test_naming_no_trace_is_an_input_error(tmp_path, monkeypatch, arg, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(InputError) as err:
        find_traces([arg])
    assert str(err.value).startswith(message)


# --- the worker ----------------------------------------------------------------------------


def test_a_row_is_the_flattened_report_on_the_declared_columns(fleet_dir):
    path = str(fleet_dir / "flip-04.parquet")
    row = solo(path, "lazy")
    assert list(row) == RESULT_SCHEMA.names
    report = dict(flatten(replay(read_trace(path), PRESETS["lazy"]).report))
    assert {m: row[m] for m in METRICS} == {m: report[m] for m in METRICS}
    assert row["trace.path"] == path and row["trace.sha256"] == report["trace.sha256"]
    assert row["policy.name"] == "lazy" and row["policy.dealloc"] == "lazy"
    assert row["exits.vm.npf"] == 12 and row["cost.by_category.vm_exit"] == 24_000
    assert row["error"] is None and row["recorded"] == "{}"


def test_a_corrupt_trace_is_a_row_with_its_error(corrupt):
    row = solo(str(corrupt), "eager")
    assert row["error"].startswith(f"{corrupt}: not a readable Parquet file (")
    assert "\n" not in row["error"]
    assert row["trace.path"] == str(corrupt) and row["policy.name"] == "eager"
    assert all(row[m] is None for m in METRICS) and row["trace.sha256"] is None


def test_a_url_is_read_through_pyarrow(fleet_dir):
    path = fleet_dir / "flip-02.parquet"
    url = path.as_uri()
    row = solo(url, "eager")
    plain = solo(str(path), "eager")
    assert row["trace.path"] == url and row["error"] is None
    assert {k: v for k, v in row.items() if k != "trace.path"} == {
        k: v for k, v in plain.items() if k != "trace.path"}
    missing = solo(url.replace("flip-02", "gone"), "eager")
    assert missing["error"].startswith(url.replace("flip-02", "gone") + ": cannot open (")


def test_column_types_do_not_depend_on_failures(tmp_path, corrupt):
    eager = (PRESETS["eager"],)
    only_failed = run(Fleet((str(corrupt),), eager), LocalExecutor(1))
    fine = run(Fleet((str(corrupt.parent / "flip-01.parquet"),), eager), LocalExecutor(1))
    assert only_failed.schema == fine.schema == RESULT_SCHEMA


def test_one_pass_per_trace_gives_each_policy_its_own_replays_row(fleet_dir, monkeypatch):
    """With one worker, each trace is read and decoded once for all its policies
    (replay_many), and every row is the row of that policy's own replay."""
    package = sys.modules["upmtrace.engine"]
    many, passes = package.replay_many, []

    def counting(trace, policies, **kwargs):
        passes.append([p.name for p in policies])
        return many(trace, policies, **kwargs)

    monkeypatch.setattr(package, "replay_many", counting)
    policies = (PRESETS["eager"], PRESETS["lazy"], PRESETS["hugepool"])
    traces = tuple(str(fleet_dir / f"flip-{n:02}.parquet") for n in (1, 4))
    table = run(Fleet(traces, policies), LocalExecutor(1))
    assert passes == [["eager", "lazy", "hugepool"]] * 2
    monkeypatch.setattr(package, "replay_many", many)
    for row in table.to_pylist():
        alone = solo(row["trace.path"], row["policy.name"])
        assert row == alone


def test_a_trace_that_fails_fails_every_policy_of_its_pass(corrupt):
    table = run(Fleet((str(corrupt),), (PRESETS["eager"], PRESETS["lazy"])), LocalExecutor(1))
    rows = table.to_pylist()
    assert [r["policy.name"] for r in rows] == ["eager", "lazy"]
    assert all(r["error"].startswith(f"{corrupt}: not a readable Parquet file (") for r in rows)


@pytest.mark.parametrize("traces, policies, workers, groups", [
    (1, 4, 2, [[0, 1], [2, 3]]),  # one trace, two workers: two passes of two policies
    (1, 3, 2, [[0], [1, 2]]),
    (3, 4, 2, [[0, 1, 2, 3]]),  # enough traces to keep the workers busy: one pass each
    (1, 1, 8, [[0]]),
    (2, 5, 8, [[0], [1], [2], [3, 4]]),  # four jobs per trace: one per worker
])
def test_policies_are_split_only_as_far_as_the_workers_need(traces, policies, workers, groups):
    assert _groups(traces, policies, workers) == groups


# --- the summary ---------------------------------------------------------------------------


def test_summary_percentiles_on_a_fleet_with_known_answers(fleet_dir):
    policies = (PRESETS["eager"], PRESETS["lazy"])
    traces = tuple(find_traces([str(fleet_dir)]))
    summary = summarize(run(Fleet(traces, policies), LocalExecutor(1)), policies)
    eager, lazy = summary.policies
    # per trace of n pages: userspace n, VM 3n, resident n pages (lazy 2n), duplicate 0
    # (lazy n), one split. n = 1, 2, 4, 10; linear percentile: p50 between the 2nd and 3rd
    # value, p95 at 0.85 of the way from the 3rd to the 4th.
    page = 4096
    assert eager.stats == {
        "exits.userspace_total": {"total": 17, "p50": 3.0, "p95": 9.1, "max": 10},
        "exits.vm_total": {"total": 51, "p50": 9.0, "p95": 27.3, "max": 30},
        "memory.peak_resident_bytes": {"total": 17 * page, "p50": 3.0 * page,
                                       "p95": 9.1 * page, "max": 10 * page},
        "memory.peak_duplicate_bytes": {"total": 0, "p50": 0.0, "p95": 0.0, "max": 0},
        "directmap.splits": {"total": 4, "p50": 1.0, "p95": 1.0, "max": 1},
    }
    assert lazy.stats["memory.peak_resident_bytes"] == {
        "total": 34 * page, "p50": 6.0 * page, "p95": 18.2 * page, "max": 20 * page}
    assert lazy.stats["memory.peak_duplicate_bytes"] == eager.stats[
        "memory.peak_resident_bytes"]
    assert eager.delta is None
    assert lazy.delta["memory.peak_resident_bytes"] == {
        "total": 17 * page, "p50": 3.0 * page, "p95": 9.1 * page, "max": 10 * page}
    assert lazy.delta["exits.vm_total"] == {"total": 0, "p50": 0.0, "p95": 0.0, "max": 0}
    assert (eager.traces, eager.failed, eager.totals["exits.vm.npf"]) == (4, 0, 51)
    assert eager.totals["cost.by_category.userspace_exit"] == 17 * 10_000
    assert (summary.traces, summary.pairs, summary.failures) == (4, 8, ())


# --- the command ---------------------------------------------------------------------------


def test_fleet_prints_the_summary_and_writes_sorted_results(fleet_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # short relative paths: the text never wraps a long temp path
    out = tmp_path / "r.parquet"
    result = run_cli("fleet", "traces", "--policy", "eager", "--policy", "lazy", "-o",
                     "r.parquet", "--workers", "1")
    assert result.exit_code == 0, result.output
    assert "Fleet: 4 traces x 2 policies = 8 pairs, 0 failed; results in r.parquet" in (
        result.output)
    assert "policy lazy (4 of 4 traces replayed): dealloc=lazy (otherwise as eager)" in (
        result.output)
    assert "method 'linear'" in result.output
    rows = pq.read_table(out).to_pylist()
    assert [(Path(r["trace.path"]).name, r["policy.name"]) for r in rows] == [
        (f"flip-{n:02}.parquet", p) for n in SIZES for p in ("eager", "lazy")]
    assert Path(rows[0]["trace.path"]).resolve() == (fleet_dir / "flip-01.parquet").resolve()


def test_fleet_run_is_the_default_subcommand(fleet_dir):
    short = run_cli("fleet", fleet_dir, "--policy", "eager", "--format", "json", "--workers", "1")
    long = run_cli("fleet", "run", fleet_dir, "--policy", "eager", "--format", "json",
                   "--workers", "1")
    assert short.exit_code == long.exit_code == 0
    assert short.output == long.output
    assert json.loads(short.output)["schema"] == "upmtrace.fleet.v1"
    helped = run_cli("fleet", "--help")
    assert "run" in helped.output and "check" in helped.output


def test_a_failed_pair_is_a_row_and_exit_3(fleet_dir, corrupt, tmp_path):
    out = tmp_path / "r.parquet"
    result = run_cli("fleet", fleet_dir, "--policy", "eager", "--policy", "lazy", "-o", out,
                     "--workers", "2")
    assert result.exit_code == 3, result.output
    assert "10 pairs, 2 failed" in result.output
    assert "policy eager (4 of 5 traces replayed)" in result.output
    assert "Failed pairs (2)" in result.output  # the messages: from the rows and the JSON
    rows = pq.read_table(out).to_pylist()
    failed = [r for r in rows if r["error"] is not None]
    assert [(r["trace.path"], r["policy.name"]) for r in failed] == [
        (str(corrupt), "eager"), (str(corrupt), "lazy")]
    assert all(r["exits.vm_total"] is None for r in failed)
    assert all("not a readable Parquet file" in r["error"] for r in failed)
    assert sorted(r["exits.vm_total"] for r in rows if r["error"] is None) == [
        3, 3, 6, 6, 12, 12, 30, 30]
    summary = json.loads(run_cli("fleet", fleet_dir, "--policy", "eager", "--format", "json",
                                 "--workers", "1").output)
    assert summary["failed"] == 1 and summary["failures"][0]["trace"] == str(corrupt)
    assert summary["policies"][0]["stats"]["exits.vm_total"]["total"] == 51


@pytest.mark.parametrize(("args", "code", "line"), [
    (["--executor", "local", "--scheduler", "tcp://127.0.0.1:8786"], 2,
     "Error: --scheduler needs --executor dask"),
    (["--scheduler", "tcp://127.0.0.1:8786", "--workers", "2"], 2,
     "Error: --workers starts local workers; an existing cluster (--scheduler) has its own"),
    (["-o", "r.csv"], 2, "Error: -o r.csv: results are written as Parquet (name it *.parquet)"),
    (["-o", "nowhere/r.parquet"], 3,
     "Error: nowhere/r.parquet: cannot write (No such file or directory)"),  # as every output
    (["--policy", "eager"], 2, "Error: policy 'eager' given twice: result rows are keyed by "
                               "policy name (copy the TOML file under another name to vary "
                               "its knobs)"),
    (["--policy", "nosuch"], 2, "Error: unknown policy 'nosuch': not a preset (eager, lazy, "
                                "inplace, hugepool, sg, prefault) and no such TOML file"),
])
def test_bad_options_are_one_line(fleet_dir, monkeypatch, args, code, line):
    monkeypatch.chdir(fleet_dir.parent)
    result = run_cli("fleet", "traces", "--policy", "eager", *args)
    assert result.exit_code == code, result.output
    assert error_line(result) == line


def test_bad_traces_are_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run_cli("fleet", "nope", "--policy", "eager")
    assert (result.exit_code, error_line(result)) == (3, "Error: nope: no such file or folder")


def test_dask_missing_is_a_usage_error(fleet_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "distributed", None)  # import distributed -> ImportError
    result = run_cli("fleet", fleet_dir, "--policy", "eager", "--executor", "dask")
    assert result.exit_code == 2
    assert error_line(result) == ("Error: --executor dask needs Dask: "
                                  "pip install 'upmtrace[dask]'")


def test_the_core_does_not_import_dask():
    code = ("import sys, upmtrace, upmtrace.cli, upmtrace.fleet.pairs, upmtrace.fleet.summary, "
            "upmtrace.fleet.compare, upmtrace.gate.fleet, upmtrace.report.fleet; "
            "assert not {'dask', 'distributed'} & set(sys.modules), 'dask imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


# --- Dask ----------------------------------------------------------------------------------


@pytest.fixture
def small_fleet(tmp_path) -> Path:
    folder = tmp_path / "small"
    folder.mkdir()
    for n in (1, 4):
        write_trace(table(*flips(n)), folder / f"flip-{n}.parquet")
    (folder / "corrupt.parquet").write_bytes(b"not parquet")
    return folder


def require_distributed():
    """dask[distributed] is in the [test] extra: a run without it must fail, not skip."""
    try:
        import distributed
    except ImportError as err:
        pytest.fail(f"dask[distributed] is missing ({err}): pip install -e '.[test]'")
    return distributed


def test_local_and_dask_give_byte_identical_results(small_fleet, tmp_path):
    require_distributed()
    outputs = {}
    for name, executor in (("local", ["--workers", "2"]),
                           ("dask", ["--executor", "dask", "--workers", "2"])):
        out = tmp_path / f"{name}.parquet"
        result = run_cli("fleet", small_fleet, "--policy", "eager", "--policy", "lazy",
                         "-o", out, "--format", "json", *executor)
        assert result.exit_code == 3, result.output  # the corrupt trace
        outputs[name] = (out.read_bytes(), {**json.loads(result.output), "results": None})
    assert outputs["local"] == outputs["dask"]
    assert outputs["dask"][1]["failed"] == 2


def test_fleet_joins_an_existing_cluster(small_fleet, tmp_path):
    distributed = require_distributed()
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster:
        result = run_cli("fleet", small_fleet / "flip-*.parquet", "--policy", "eager",
                         "--policy", "lazy", "-o", tmp_path / "c.parquet",
                         "--scheduler", cluster.scheduler_address)
    assert result.exit_code == 0, result.output
    local = run_cli("fleet", small_fleet / "flip-*.parquet", "--policy", "eager",
                    "--policy", "lazy", "-o", tmp_path / "l.parquet", "--workers", "1")
    assert (tmp_path / "c.parquet").read_bytes() == (tmp_path / "l.parquet").read_bytes()
    assert local.output.replace("l.parquet", "c.parquet") == result.output


# --- fleet check ---------------------------------------------------------------------------


def test_fleet_check_gates_the_totals(fleet_dir, tmp_path):
    base = tmp_path / "fleet.json"
    written = run_cli("fleet", "check", fleet_dir, "--baseline", base, "--update",
                      "--policy", "eager", "--policy", "lazy", "--workers", "1")
    assert written.exit_code == 0, written.output
    assert written.output == (f"wrote {base}: 4 traces, policies eager, lazy, 8 guarded totals "
                              "each, tolerance 0%\n")
    doc = json.loads(base.read_text(encoding="utf-8"))
    assert doc["schema"] == "upmtrace.fleet-baseline.v1"
    assert doc["totals"]["eager"]["exits.vm_total"] == 51
    assert [t["path"] for t in doc["traces"]] == [str(fleet_dir / f"flip-{n:02}.parquet")
                                                  for n in SIZES]

    ok = run_cli("fleet", "check", fleet_dir, "--baseline", base, "--workers", "1")
    assert ok.exit_code == 0, ok.output
    assert "no regression in 16 metrics" in ok.output

    grown = run_cli("fleet", "check", fleet_dir, "--baseline", base, "--workers", "1",
                    "--set", "dealloc=lazy", "--metric", "memory.peak_resident_bytes")
    assert grown.exit_code == 1, grown.output
    assert "policy knobs changed since the baseline: eager.dealloc eager -> lazy" in grown.output
    assert "REGRESSION: 1 of 2 metrics grew beyond the 0% tolerance: " \
           "eager:memory.peak_resident_bytes" in grown.output


def test_fleet_check_refuses_another_fleet_or_a_failed_pair(fleet_dir, tmp_path):
    base = tmp_path / "fleet.json"
    run_cli("fleet", "check", fleet_dir / "flip-0*.parquet", "--baseline", base, "--update",
            "--workers", "1")
    more = run_cli("fleet", "check", fleet_dir, "--baseline", base, "--workers", "1")
    assert more.exit_code == 3
    assert error_line(more) == (f"Error: the fleet is not the baseline's (1 traces new, 0 gone; "
                                f"{base}); pass --allow-trace-change to accept it, or --update "
                                "to re-baseline")
    accepted = run_cli("fleet", "check", fleet_dir, "--baseline", base, "--workers", "1",
                       "--allow-trace-change")
    assert accepted.exit_code == 1  # flip-10 adds its exits to the totals
    (fleet_dir / "corrupt.parquet").write_bytes(b"nope")
    broken = run_cli("fleet", "check", fleet_dir, "--baseline", base, "--workers", "1")
    assert broken.exit_code == 3
    assert error_line(broken).startswith("Error: 1 of 5 pairs failed, so the fleet totals are "
                                         f"incomplete; first: {fleet_dir / 'corrupt.parquet'}:")
    missing = run_cli("fleet", "check", fleet_dir, "--baseline", tmp_path / "none.json")
    assert error_line(missing) == (f"Error: {tmp_path / 'none.json'}: no such fleet baseline "
                                   "(create it with --update)")


def test_every_numeric_report_key_is_a_result_column(fleet_dir):
    """A key the report gains must become a column (and so a total, and a sweep objective)."""
    report = replay(read_trace(fleet_dir / "flip-02.parquet"), PRESETS["eager"]).report
    per_run = ("schema", "trace.", "policy.", "recorded.", "timing.", "cost.by_exit.",
               "cost.estimate")
    numeric = {k for k, v in flatten(report) if isinstance(v, int | float)
               and not isinstance(v, bool) and not k.startswith(per_run)}
    assert numeric - set(METRICS) == set()
