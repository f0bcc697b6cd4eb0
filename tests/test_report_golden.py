"""Golden files for the replay, compare and check renderers, at fixed widths (100; replay also 80)
and as rendered off a terminal (width None: each table as wide as it needs).

A renderer change shows up as a diff of tests/golden/*. To accept it, regenerate on purpose and
review the diff:  UPDATE_GOLDEN=1 pytest tests/test_report_golden.py
"""

from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path

import pytest
from scenario import table
from test_cli_compare import ROWS

from upmtrace.engine import Result, replay
from upmtrace.fleet.compare import compare
from upmtrace.gate.check import Outcome, TraceDelta, Verdict, status
from upmtrace.policy import PRESETS
from upmtrace.report import check as check_report
from upmtrace.report import compare as compare_report
from upmtrace.report import table as replay_report

GOLDEN = Path(__file__).parent / "golden"
WIDTH = 100


def assert_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("UPDATE_GOLDEN") == "1":
        path.write_text(text)
    assert path.exists(), f"{path} is missing: run with UPDATE_GOLDEN=1 to create it"
    assert text == path.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def comparison():
    return compare(table(*ROWS), [PRESETS["eager"], PRESETS["lazy"]], workers=1)


@pytest.fixture(scope="module")
def replayed():
    """A lazy replay, with recorded counts as an imported trace carries them."""
    report = replay(table(*ROWS), PRESETS["lazy"]).report
    recorded = {"exits": {"userspace": {"KVM_EXIT_HYPERCALL": 2},
                          "vm": {"npf": 4, "vmgexit": 2, "vmcall": 1}}}
    trace = {**report["trace"], "path": "dma.parquet"}
    return Result({**report, "trace": trace, "recorded": recorded})


@pytest.fixture(scope="module")
def outcome():
    tolerance = Fraction(10)
    values = [("exits.userspace.KVM_EXIT_HYPERCALL", 2, 3), ("exits.userspace_total", 2, 3),
              ("exits.vm.npf", 100, 108), ("exits.vm.vmgexit", 5, 4),
              ("exits.userspace.KVM_EXIT_MEMORY_FAULT", 0, 1), ("exits.vm_total", 105, 112),
              ("memory.peak_resident_bytes", 8192, 8192), ("memory.ratio_to_touched", 1.5, 1.25)]
    verdicts = tuple(Verdict(key, old, new, status(old, new, tolerance))
                     for key, old, new in values)
    return Outcome(verdicts, tolerance, "eager", "baseline.json", "t.parquet",
                   trace_changed=True, knob_changes={"exits": ("coalesce", "per-entry")})


def test_compare_table(comparison):
    assert_golden("compare_table.txt", compare_report.render_table(comparison, WIDTH))


def test_compare_csv(comparison):
    assert_golden("compare.csv", compare_report.render_csv(comparison, WIDTH))


def test_check_table(outcome):
    assert_golden("check_table.txt", check_report.render_table(outcome, WIDTH))


def test_check_junit(outcome):
    assert_golden("check_junit.xml", check_report.render_junit(outcome, WIDTH))


@pytest.mark.parametrize("width", [100, 80])
def test_replay_table(replayed, width):
    assert_golden(f"replay_table_{width}.txt", replay_report.render(replayed, width))


def test_replay_table_without_recorded_counts(replayed):
    plain = Result({**replayed.report, "recorded": {}})
    assert_golden("replay_table_plain_80.txt", replay_report.render(plain, 80))


def test_compare_four_policies_off_a_terminal():
    policies = [PRESETS["eager"], PRESETS["lazy"], PRESETS["sg"],
                PRESETS["hugepool"].with_sets(("lazy_limit=1T",))]
    comparison = compare(table(*ROWS), policies, workers=1)
    text = compare_report.render_table(comparison, None)
    assert "…" not in text
    assert_golden("compare_table_4_plain.txt", text)


def test_replay_tdx_off_a_terminal():
    report = replay(table(*ROWS), PRESETS["eager"], platform="tdx").report
    assert_golden("replay_table_tdx_plain.txt", replay_report.render(Result(report), None))


def test_fleet_check_table_and_junit(outcome):
    fleet = Outcome(
        tuple(Verdict(f"eager:{v.metric}", v.baseline, v.now, v.status)
              for v in outcome.verdicts[:3]), outcome.tolerance, "eager", "fleet.json",
        "a fleet of 3 traces",
        traces=(TraceDelta("eager:exits.userspace.KVM_EXIT_HYPERCALL", "traces/b.parquet", 0, 1),
                TraceDelta("eager:exits.userspace_total", "traces/b.parquet", 0, 1),
                TraceDelta("eager:exits.userspace_total", "traces/new.parquet", None, 1)))
    assert_golden("fleet_check_table_plain.txt", check_report.render_table(fleet, None))
    assert_golden("fleet_check_junit.xml", check_report.render_junit(fleet))
