"""upmtrace sweep: the knob grid, duplicates replayed once, ranking, outputs, many traces, Dask."""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from scenario import K, M, attrs, memslot, npf, psc, table
from test_sweep_frontier import brute_dominates

from upmtrace.cli import cli
from upmtrace.engine import replay
from upmtrace.fleet.pairs import flatten
from upmtrace.policy import load_policy
from upmtrace.trace.io import read_trace, write_trace

OBJECTIVES = ("memory.peak_resident_bytes", "exits.total", "cost.total_ns")


def churn(n: int) -> list[dict]:
    """n pages faulted private, converted to shared (PSC), faulted shared, converted back and
    faulted private again: dealloc, gmem_page and prefault each move memory, exits or cost."""
    rows = [memslot(0, 0, 8 * M), attrs(0, 8 * M)]
    for i in range(n):
        gpa = i * 16 * K
        rows += [npf(gpa, True), psc(gpa, 4 * K, "shared", req=2 * i + 1), npf(gpa, False),
                 psc(gpa, 4 * K, "private", req=2 * i + 2), npf(gpa, True)]
    return rows


@pytest.fixture
def trace(tmp_path) -> Path:
    path = tmp_path / "churn.parquet"
    write_trace(table(*churn(6)), path)
    return path


@pytest.fixture
def folder(tmp_path) -> Path:
    where = tmp_path / "traces"
    where.mkdir()
    for n in (2, 5, 9):
        write_trace(table(*churn(n)), where / f"churn-{n}.parquet")
    return where


def run_cli(*args) -> object:
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert "Traceback" not in result.output, result.output
    return result


def sweep_json(*args) -> dict:
    result = run_cli("sweep", *args, "--format", "json", "--workers", "1")
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def error_line(result) -> str:
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    return lines[0]


def value(report: dict, key: str) -> int:
    flat = dict(flatten(report))
    if key == "exits.total":
        return flat["exits.vm_total"] + flat["exits.userspace_total"]
    return flat[key]


# --- the grid ------------------------------------------------------------------------------


def test_every_combination_is_named_by_its_spec_in_vary_order(trace):
    doc = sweep_json(trace, "--vary", "prefault=false,true", "--vary", "gmem_page=4k,2m")
    assert doc["schema"] == "upmtrace.sweep.v1"
    assert doc["combinations"] == 4 and doc["policies"] == 4
    assert sorted(r["name"] for r in doc["ranked"]) == sorted(
        f"eager+prefault={p}+gmem_page={g}" for p in ("false", "true") for g in ("4k", "2m"))
    # the base's knobs are one of the combinations: that combination is the base
    assert doc["base"] == "eager+prefault=false+gmem_page=4k"
    assert [r["base"] for r in doc["ranked"]].count(True) == 1
    for r in doc["ranked"]:
        p = r["policy"]
        assert r["name"] == f"eager+prefault={str(p['prefault']).lower()}+gmem_page=" \
                            f"{p['gmem_page']}"


def test_each_policy_is_its_own_replay(trace):
    doc = sweep_json(trace, "--vary", "dealloc=eager,lazy", "--vary", "gmem_page=4k,2m",
                     "--policy", "eager", "--set", "prefault=true")
    loaded = read_trace(trace)
    for r in doc["ranked"]:
        assert r["name"].startswith("eager+prefault=true+dealloc=")
        report = replay(loaded, load_policy(r["name"])).report
        assert r["objectives"] == {k: value(report, k) for k in OBJECTIVES}
        assert r["totals"]["exits.vm.npf"] == report["exits"]["vm"]["npf"]


@pytest.fixture
def replays(monkeypatch) -> list[str]:
    """The policy of every replay the workers ran (in this process: --workers 1)."""
    names: list[str] = []
    package = sys.modules["upmtrace.engine"]
    one, many = package.replay, package.replay_many

    def counting(trace, policy, **kwargs):
        names.append(policy.name)
        return one(trace, policy, **kwargs)

    def counting_many(trace, policies, **kwargs):
        names.extend(policy.name for policy in policies)
        return many(trace, policies, **kwargs)

    monkeypatch.setattr(package, "replay", counting)
    monkeypatch.setattr(package, "replay_many", counting_many)
    return names


def test_combinations_that_are_the_same_policy_replay_once(trace, replays):
    # lazy_limit 0 and 0M are the same value; lazy+dealloc=lazy+lazy_limit=0 is the base
    doc = sweep_json(trace, "--policy", "lazy", "--vary", "dealloc=lazy,eager",
                     "--vary", "lazy_limit=0,0M")
    assert doc["combinations"] == 4
    assert replays == ["lazy+dealloc=lazy+lazy_limit=0", "lazy+dealloc=eager+lazy_limit=0"]
    assert [r["name"] for r in doc["ranked"]] != [] and doc["policies"] == 2
    assert doc["base"] == "lazy+dealloc=lazy+lazy_limit=0"


def test_the_base_replays_too_when_no_combination_is_it(trace, replays):
    doc = sweep_json(trace, "--vary", "prefault=true", "--vary", "gmem_page=2m")
    assert replays == ["eager", "eager+prefault=true+gmem_page=2m"]
    assert doc["base"] == "eager" and doc["combinations"] == 1 and doc["policies"] == 2


def test_a_size_knob_takes_sizes(trace, tmp_path):
    out = tmp_path / "r.parquet"
    result = run_cli("sweep", trace, "--policy", "lazy", "--vary", "lazy_limit=0,64M,256M",
                     "--workers", "1", "-o", out)
    assert result.exit_code == 0, result.output
    rows = pq.read_table(out).to_pylist()
    assert [(r["policy.name"], r["policy.lazy_limit"]) for r in rows] == [
        ("lazy+lazy_limit=0", 0), ("lazy+lazy_limit=64M", 64 << 20),
        ("lazy+lazy_limit=256M", 256 << 20)]


@pytest.mark.parametrize(("args", "line"), [
    ([], "Error: sweep needs at least one --vary KNOB=V1,V2[,...]"),
    (["--vary", "dealloc"], "Error: --vary 'dealloc': expected KNOB=V1,V2[,...]"),
    (["--vary", "=eager"], "Error: --vary '=eager': expected KNOB=V1,V2[,...]"),
    (["--vary", "dealloc="], "Error: --vary 'dealloc=': no values (expected KNOB=V1,V2[,...])"),
    (["--vary", "dealloc=eager,,lazy"],
     "Error: --vary 'dealloc=eager,,lazy': an empty value between commas"),
    (["--vary", "colour=red,blue"],
     "Error: --vary 'colour=red,blue': unknown policy knob 'colour' (knobs: dealloc, "
     "lazy_limit, backing, exits, directmap, gmem_page, shared_page, prefault, vfio)"),
    (["--vary", "dealloc=eager,fast"],
     "Error: --vary 'dealloc=eager,fast': policy knob 'dealloc' cannot be 'fast' (one of "
     "eager, lazy, aligned-2m)"),
    (["--vary", "prefault=maybe"],
     "Error: --vary 'prefault=maybe': policy knob 'prefault' cannot be 'maybe' (true or false)"),
    (["--vary", "lazy_limit=0,lots"],
     "Error: --vary 'lazy_limit=0,lots': policy knob 'lazy_limit' cannot be 'lots' (a byte "
     "count)"),
    (["--vary", "gmem_page=4k", "--vary", "gmem_page=2m"],
     "Error: --vary gmem_page given twice (list its values in one --vary gmem_page=V1,V2)"),
    (["--vary", "prefault=true", "--objective", "memory.nothing"],
     "Error: --objective 'memory.nothing': not a numeric report key (for example "
     "memory.peak_resident_bytes, exits.total, cost.total_ns, memory.peak_duplicate_bytes)"),
    (["--vary", "prefault=true", "--objective", "policy.dealloc"],
     "Error: --objective 'policy.dealloc': not a numeric report key (for example "
     "memory.peak_resident_bytes, exits.total, cost.total_ns, memory.peak_duplicate_bytes)"),
    (["--vary", "prefault=true", "--objective", "exits.total", "--objective", "exits.total"],
     "Error: --objective exits.total given twice"),
    (["--vary", "prefault=true", "--plot", "p.pdf"],
     "Error: --plot p.pdf: use a .png or .svg file"),
    (["--vary", "prefault=true", "-o", "r.csv"],
     "Error: -o r.csv: results are written as Parquet (name it *.parquet)"),
    (["--vary", "prefault=true", "--policy", "eagre"],
     "Error: unknown policy 'eagre': not a preset (eager, lazy, inplace, hugepool, sg, "
     "prefault) and no such TOML file; did you mean 'eager'?"),
])
def test_bad_options_are_one_line_usage_errors(trace, monkeypatch, replays, args, line):
    monkeypatch.chdir(trace.parent)
    result = run_cli("sweep", trace.name, *args)
    assert (result.exit_code, error_line(result)) == (2, line)
    assert replays == []


# --- ranking -------------------------------------------------------------------------------


GRID = ("--vary", "dealloc=eager,lazy,aligned-2m", "--vary", "gmem_page=4k,2m",
        "--vary", "prefault=false,true")


def test_the_frontier_is_what_no_policy_beats_and_is_listed_first(trace):
    doc = sweep_json(trace, *GRID)
    ranked = doc["ranked"]
    points = {r["name"]: tuple(r["objectives"][k] for k in OBJECTIVES) for r in ranked}
    for r in ranked:
        beaten = [n for n, p in points.items() if brute_dominates(p, points[r["name"]])]
        assert r["on_frontier"] == (not beaten)
        if beaten:
            assert r["dominated_by"] in beaten
            assert next(x for x in ranked if x["name"] == r["dominated_by"])["on_frontier"]
    flags = [r["on_frontier"] for r in ranked]
    assert flags == sorted(flags, reverse=True) and True in flags and False in flags
    base = next(r for r in ranked if r["base"])["objectives"]
    for r in ranked:
        assert r["delta"] == {k: r["objectives"][k] - base[k] for k in OBJECTIVES}


def test_the_table_shows_the_frontier_then_the_dominated_with_their_dominator(trace):
    doc = sweep_json(trace, *GRID)
    result = run_cli("sweep", trace, *GRID, "--workers", "1")
    assert result.exit_code == 0, result.output
    text = result.output
    assert "12 combinations of dealloc (eager, lazy, aligned-2m) x gmem_page (4k, 2m) x " \
           "prefault (false, true) on eager: 12 policies replayed" in text
    frontier = [r for r in doc["ranked"] if r["on_frontier"]]
    dominated = [r for r in doc["ranked"] if not r["on_frontier"]]
    assert f"Frontier ({len(frontier)})" in text and f"Dominated ({len(dominated)})" in text
    assert text.index("Frontier (") < text.index("Dominated (")
    number = {r["name"]: i for i, r in enumerate(doc["ranked"], 1)}
    for r in doc["ranked"]:
        line = next(line for line in text.splitlines()
                    if line.split()[1:2] == [r["name"]])
        assert line.split()[0] == str(number[r["name"]])
        if not r["on_frontier"]:
            assert line.split()[-1] == str(number[r["dominated_by"]])
    assert f"{doc['base']} (base)" in text


def test_vfio_is_a_knob_like_any_other(trace):
    doc = sweep_json(trace, "--vary", "vfio=none,pin-all,on-convert", "--vary",
                     "prefault=false,true", "--objective", "vfio.pinned_peak_bytes",
                     "--objective", "exits.total")
    pinned = {(r["policy"]["vfio"], r["policy"]["prefault"]): r["objectives"][
        "vfio.pinned_peak_bytes"] for r in doc["ranked"]}
    assert doc["policies"] == 6 and {n for n, _ in pinned} == {"none", "pin-all", "on-convert"}
    # nothing pinned without a device; pinning every slot whole pins the most
    assert pinned["none", False] == pinned["none", True] == 0
    assert pinned["pin-all", False] > pinned["on-convert", False] > 0
    points = {r["name"]: tuple(r["objectives"].values()) for r in doc["ranked"]}
    for r in doc["ranked"]:
        assert r["on_frontier"] == (not any(brute_dominates(p, points[r["name"]])
                                            for p in points.values()))
    assert "eager+vfio=pin-all+prefault=true" in points


def test_objectives_replace_the_defaults(trace):
    doc = sweep_json(trace, *GRID, "--objective", "memory.peak_duplicate_bytes",
                     "--objective", "directmap.splits")
    assert doc["objectives"] == ["memory.peak_duplicate_bytes", "directmap.splits"]
    points = {r["name"]: (r["totals"]["memory.peak_duplicate_bytes"],
                          r["totals"]["directmap.splits"]) for r in doc["ranked"]}
    for r in doc["ranked"]:
        assert r["on_frontier"] == (not any(brute_dominates(p, points[r["name"]])
                                            for p in points.values()))


# --- outputs -------------------------------------------------------------------------------


def test_results_are_one_row_per_policy_and_csv_follows_the_table(trace, tmp_path):
    out = tmp_path / "r.parquet"
    result = run_cli("sweep", trace, *GRID, "--workers", "1", "-o", out, "--format", "csv")
    assert result.exit_code == 0, result.output
    results = pq.read_table(out)
    assert results.schema.metadata[b"upmtrace.results"] == b"upmtrace.sweep-results.v1"
    rows = results.to_pylist()
    assert len(rows) == 12 and len({r["policy.name"] for r in rows}) == 12
    doc = sweep_json(trace, *GRID)
    by_name = {r["name"]: r for r in doc["ranked"]}
    for row in rows:
        r = by_name[row["policy.name"]]
        assert row["on_frontier"] == r["on_frontier"] and row["base"] == r["base"]
        assert row["dominated_by"] == r["dominated_by"]
        assert row["policy.dealloc"] == r["policy"]["dealloc"]
        assert row["policy.prefault"] is r["policy"]["prefault"]
        assert {k: row[k] for k in OBJECTIVES} == r["objectives"]
        assert row["frontier_traces"] == ([str(trace)] if r["on_frontier"] else [])
    lines = list(csv.reader(io.StringIO(result.output)))
    assert lines[0] == ["policy", "dealloc", "gmem_page", "prefault", "base", "on_frontier",
                        "dominated_by", *OBJECTIVES, *(f"delta.{k}" for k in OBJECTIVES),
                        "frontier_traces"]
    assert [line[0] for line in lines[1:]] == [r["name"] for r in doc["ranked"]]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp left


def test_the_plot_is_a_png_with_many_colours(trace, tmp_path):
    import numpy as np
    from matplotlib.image import imread

    out = tmp_path / "p.png"
    result = run_cli("sweep", trace, *GRID, "--workers", "1", "--plot", out)
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = imread(out)
    assert pixels.shape[0] > 400 and pixels.shape[1] > 600
    colours = np.unique(pixels.reshape(-1, pixels.shape[-1]), axis=0)
    assert len(colours) > 200  # the colour bar alone has hundreds


def test_the_svg_plot_labels_every_frontier_policy_and_marks_the_base(trace, tmp_path):
    import xml.etree.ElementTree as ET

    out = tmp_path / "p.svg"
    result = run_cli("sweep", trace, *GRID, "--workers", "1", "--plot", out)
    assert result.exit_code == 0, result.output
    svg = out.read_text(encoding="utf-8")
    root = ET.fromstring(svg)
    ids = {e.get("id") for e in root.iter() if e.get("id")}
    doc = sweep_json(trace, *GRID)
    for i, r in enumerate(doc["ranked"], 1):
        # the legend's text, kept as a comment beside its glyphs
        assert (f"<!-- #{i} {r['name']} -->" in svg) == r["on_frontier"]
    assert {"frontier", "base", "policies"} <= ids
    assert f"base: {doc['base']}" in svg


# --- many traces ---------------------------------------------------------------------------


def test_many_traces_rank_by_totals_with_per_trace_frontiers(folder):
    doc = sweep_json(folder, *GRID)
    paths = sorted(str(p) for p in folder.iterdir())
    assert [t["path"] for t in doc["traces"]] == paths
    reports = {(p, r["name"]): replay(read_trace(p), load_policy(r["name"])).report
               for p in paths for r in doc["ranked"]}
    for r in doc["ranked"]:
        assert r["objectives"] == {k: sum(value(reports[p, r["name"]], k) for p in paths)
                                   for k in OBJECTIVES}
    for p in paths:
        points = {r["name"]: tuple(value(reports[p, r["name"]], k) for k in OBJECTIVES)
                  for r in doc["ranked"]}
        for r in doc["ranked"]:
            on = not any(brute_dominates(q, points[r["name"]]) for q in points.values())
            assert (p in r["frontier_traces"]) == on
    table = run_cli("sweep", folder, *GRID, "--workers", "1").output
    assert "Sweep of 3 traces" in table and "on the" in table and " of 3 traces" in table


def test_a_corrupt_trace_in_a_multi_trace_sweep_is_exit_3_naming_it(folder, tmp_path):
    bad = folder / "corrupt.parquet"
    bad.write_bytes(b"PAR1 not parquet")
    out = tmp_path / "r.parquet"
    result = run_cli("sweep", folder, "--vary", "prefault=false,true", "--workers", "2",
                     "-o", out)
    assert result.exit_code == 3
    line = error_line(result)
    assert line.startswith(f"Error: 2 of 8 pairs failed, so the sweep's totals are incomplete; "
                           f"first: {bad}: not a readable Parquet file (")
    assert not out.exists()


# --- executors -----------------------------------------------------------------------------


def test_local_and_dask_results_are_byte_identical(folder, tmp_path, monkeypatch):
    pytest.importorskip("distributed")
    monkeypatch.chdir(tmp_path)
    outputs = {}
    for name, executor in (("local", ["--workers", "2"]),
                           ("dask", ["--executor", "dask", "--workers", "2"])):
        os.mkdir(name)
        result = run_cli("sweep", folder, "--vary", "dealloc=eager,lazy", "--vary",
                         "prefault=false,true", "-o", f"{name}/r.parquet", "--format", "json",
                         *executor)
        assert result.exit_code == 0, result.output
        outputs[name] = (Path(name, "r.parquet").read_bytes(),
                         result.output.replace(f"{name}/r.parquet", "R"))
    assert outputs["local"] == outputs["dask"]
    assert "dask-scratch-space" not in os.listdir(tmp_path)


def test_costs_reach_every_replay(trace, tmp_path):
    table = tmp_path / "costs.toml"
    table.write_text("vm_exit = 0\nuserspace_exit = 0\n")
    plain = sweep_json(trace, "--vary", "prefault=false,true")
    free_exits = sweep_json(trace, "--vary", "prefault=false,true", "--costs", table)
    for a, b in zip(plain["ranked"], free_exits["ranked"], strict=True):
        by = a["totals"]
        assert b["totals"]["cost.total_ns"] == by["cost.total_ns"] - (
            by["cost.by_category.vm_exit"] + by["cost.by_category.userspace_exit"])
