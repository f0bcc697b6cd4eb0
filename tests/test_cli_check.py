"""The check command: the CI gate (docs/cli.md), against a baseline written by --update."""

from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET
from fractions import Fraction

import pytest
from click.testing import CliRunner
from scenario import K, M, attrs, memslot, npf, psc, table

from upmtrace.cli import cli
from upmtrace.gate.check import expand_metrics, status
from upmtrace.trace.io import read_trace, write_trace

# One PSC request with a run of two contiguous entries: one exit coalesced, two per entry.
ROWS = (memslot(0, 0, 4 * M), attrs(0, 4 * M), npf(0, True), psc(0, 4 * K, "shared"),
        psc(4 * K, 4 * K, "shared"), npf(0, False))
EXIT_KEYS = ["exits.userspace.KVM_EXIT_MEMORY_FAULT", "exits.userspace.KVM_EXIT_HYPERCALL",
             "exits.userspace_total", "exits.vm.npf", "exits.vm.vmgexit", "exits.vm.tdvmcall",
             "exits.vm.vmcall", "exits.vm_total"]


@pytest.fixture
def trace(tmp_path):
    path = tmp_path / "t.parquet"
    write_trace(table(*ROWS), path)
    return str(path)


@pytest.fixture
def baseline(tmp_path, trace):
    path = tmp_path / "baseline.json"
    assert run("check", trace, "--baseline", str(path), "--update").exit_code == 0
    return str(path)


def run(*args):
    result = CliRunner().invoke(cli, list(args))
    assert "Traceback" not in result.output
    return result


def edit(path: str, change) -> None:
    doc = json.loads(open(path, encoding="utf-8").read())
    change(doc)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(doc, f)


def test_update_writes_the_baseline_format(tmp_path, trace):
    path = tmp_path / "b.json"
    result = run("check", trace, "--baseline", str(path), "--update")
    assert result.exit_code == 0
    assert result.output == f"wrote {path}: policy eager, 8 guarded metrics, tolerance 0%\n"
    doc = json.loads(path.read_text(encoding="utf-8"))
    assert set(doc) == {"schema", "guard", "report"}
    assert doc["schema"] == "upmtrace.baseline.v1"
    assert doc["guard"] == {"metrics": EXIT_KEYS, "tolerance": 0}
    assert doc["report"]["trace"]["sha256"] == read_trace(trace).sha256
    assert doc["report"]["policy"]["name"] == "eager"
    assert doc["report"]["exits"]["userspace"]["KVM_EXIT_HYPERCALL"] == 1


def test_check_against_its_own_baseline_passes(trace, baseline):
    result = run("check", trace, "--baseline", baseline)
    assert result.exit_code == 0
    assert result.output.splitlines()[-1] == "no regression in 8 metrics"
    assert "exits.vm.npf" in result.output and "REGRESSED" not in result.output


def test_a_knob_change_that_adds_exits_fails(trace, baseline):
    result = run("check", trace, "--baseline", baseline, "--set", "exits=per-entry")
    assert result.exit_code == 1
    out = result.output
    assert "policy knobs changed since the baseline: exits coalesce -> per-entry" in out
    hypercall = next(line for line in out.splitlines() if "KVM_EXIT_HYPERCALL" in line)
    assert [cell.strip() for cell in hypercall.split("│")[1:-1]] == [
        "exits.userspace.KVM_EXIT_HYPERCALL", "1", "2", "+1 (+100.0%)", "REGRESSED"]
    assert out.splitlines()[-1] == ("REGRESSION: 2 of 8 metrics grew beyond the 0% tolerance: "
                                    "exits.userspace.KVM_EXIT_HYPERCALL, exits.userspace_total")


def test_a_baseline_with_fewer_exits_fails(trace, baseline):
    edit(baseline, lambda d: d["report"]["exits"]["vm"].update(npf=1))  # now 2
    result = run("check", trace, "--baseline", baseline)
    assert result.exit_code == 1
    assert "exits.vm.npf" in result.output.splitlines()[-1]
    edit(baseline, lambda d: d["report"]["exits"]["vm"].update(npf=9))
    result = run("check", trace, "--baseline", baseline)
    assert result.exit_code == 0 and "improved" in result.output


@pytest.mark.parametrize(("tolerance", "code"), [("100", 0), ("99.9", 1), ("0", 1)])
def test_tolerance_bounds_the_growth(trace, baseline, tolerance, code):
    # KVM_EXIT_HYPERCALL and userspace_total grow 1 -> 2 (+100%) under per-entry
    result = run("check", trace, "--baseline", baseline, "--set", "exits=per-entry",
                 "--tolerance", tolerance)
    assert result.exit_code == code
    if code == 0:
        assert "within tolerance" in result.output


def test_the_baselines_tolerance_applies_without_the_option(tmp_path, trace):
    path = str(tmp_path / "b.json")
    run("check", trace, "--baseline", path, "--update", "--tolerance", "100")
    assert json.loads(open(path, encoding="utf-8").read())["guard"]["tolerance"] == 100
    assert run("check", trace, "--baseline", path, "--set", "exits=per-entry").exit_code == 0


def test_zero_to_nonzero_regresses_at_any_tolerance(trace, baseline):
    edit(baseline, lambda d: d["report"]["exits"]["userspace"].update(KVM_EXIT_HYPERCALL=0))
    result = run("check", trace, "--baseline", baseline, "--tolerance", "1000000")
    assert result.exit_code == 1
    assert "+1 (new)" in result.output


@pytest.mark.parametrize(("content", "message"), [
    (None, "no such baseline (create it with --update)"),
    ("{not json", "baseline is not JSON: Expecting property name enclosed in double quotes: "
                  "line 1 column 2 (char 1)"),
    ('{"schema": "upmtrace.report.v1"}', "not a baseline: expected schema "
                                         "'upmtrace.baseline.v1'"),
    ('{"schema": "upmtrace.baseline.v1", "guard": {"metrics": []}, "report": {}}',
     "guard.metrics must be a non-empty list of report keys"),
])
def test_a_missing_or_corrupt_baseline_is_exit_3(tmp_path, trace, content, message):
    path = tmp_path / "b.json"
    if content is not None:
        path.write_text(content)
    result = run("check", trace, "--baseline", str(path))
    assert result.exit_code == 3
    assert result.output == f"Error: {path}: {message}\n"


def test_another_trace_is_exit_3_unless_allowed(tmp_path, trace, baseline):
    same_exits = tmp_path / "same.parquet"
    write_trace(table(*ROWS, memslot(1, 64 * M, 2 * M, gmem=False)), same_exits)
    more_exits = tmp_path / "more.parquet"
    write_trace(table(*ROWS, npf(8 * K, False)), more_exits)
    result = run("check", str(same_exits), "--baseline", baseline)
    assert result.exit_code == 3
    assert result.output.startswith(f"Error: {same_exits}: sha256 ")
    assert "pass --allow-trace-change to accept a new trace" in result.output
    allowed = run("check", str(same_exits), "--baseline", baseline, "--allow-trace-change")
    assert allowed.exit_code == 0
    assert "the trace changed since the baseline" in allowed.output
    more = run("check", str(more_exits), "--baseline", baseline, "--allow-trace-change")
    assert more.exit_code == 1


def test_another_policy_name_is_exit_3(trace, baseline):
    result = run("check", trace, "--baseline", baseline, "--policy", "lazy")
    assert result.exit_code == 3
    assert result.output == (f"Error: --policy 'lazy' is not the baseline's policy 'eager' "
                             f"({baseline}); compare policies with `upmtrace compare`, or "
                             "--update to re-baseline\n")
    assert run("check", trace, "--baseline", baseline, "--policy", "eager").exit_code == 0


def test_a_toml_policy_of_the_same_name_with_other_knobs_is_compared(tmp_path, trace):
    policy = tmp_path / "mine.toml"
    policy.write_text('exits = "coalesce"\n')
    path = str(tmp_path / "b.json")
    assert run("check", trace, "--baseline", path, "--policy", str(policy),
               "--update").exit_code == 0
    policy.write_text('exits = "per-entry"\n')
    result = run("check", trace, "--baseline", path, "--policy", str(policy), "--format", "json")
    assert result.exit_code == 1 and json.loads(result.output)["policy"] == "mine"
    # without --policy the baseline's recorded knobs are used, not the edited file
    assert run("check", trace, "--baseline", path).exit_code == 0


def test_without_policy_the_baselines_policy_replays(tmp_path, trace):
    path = str(tmp_path / "b.json")
    run("check", trace, "--baseline", path, "--update", "--policy", "sg", "--set",
        "dealloc=lazy")
    result = run("check", trace, "--baseline", path, "--format", "json")
    assert result.exit_code == 0 and json.loads(result.output)["policy"] == "sg+dealloc=lazy"
    # --update without --policy keeps the baseline's policy (its name includes the override)
    run("check", trace, "--baseline", path, "--update")
    policy = json.loads(open(path, encoding="utf-8").read())["report"]["policy"]
    assert (policy["name"], policy["exits"], policy["dealloc"]) == (
        "sg+dealloc=lazy", "batched", "lazy")


def test_platform_other_than_the_baselines_is_exit_3(trace, baseline):
    result = run("check", trace, "--baseline", baseline, "--platform", "tdx")
    assert result.exit_code == 3
    assert "platform tdx is not the baseline's snp" in result.output


def test_metric_options_choose_and_expand_what_is_guarded(tmp_path, trace):
    path = str(tmp_path / "b.json")
    run("check", trace, "--baseline", path, "--update", "--metric", "exits.vm_total",
        "--metric", "memory", "--metric", "exits.vm_total")
    metrics = json.loads(open(path, encoding="utf-8").read())["guard"]["metrics"]
    assert metrics[0] == "exits.vm_total" and "memory.ratio_to_touched" in metrics
    assert len(metrics) == len(set(metrics)) == 10
    result = run("check", trace, "--baseline", path, "--metric", "exits.userspace_total")
    assert result.output.splitlines()[-1] == "no regression in 1 metrics"
    bad = run("check", trace, "--baseline", path, "--metric", "exits.nope")
    assert bad.exit_code == 2
    assert bad.output == ("Error: --metric 'exits.nope': no such key in the report (keys are "
                          "dotted, e.g. exits.vm.npf or memory)\n")
    assert run("check", trace, "--baseline", path, "--metric", "policy.name").exit_code == 2


def test_junit_has_one_testcase_per_metric_and_a_failure_per_regression(tmp_path, trace,
                                                                         baseline):
    junit = tmp_path / "junit.xml"
    result = run("check", trace, "--baseline", baseline, "--set", "exits=per-entry",
                 "--junit", str(junit))
    assert result.exit_code == 1
    root = ET.parse(junit).getroot()
    cases = root.findall("./testsuite/testcase")
    failed = [c.get("name") for c in cases if c.find("failure") is not None]
    assert [c.get("name") for c in cases] == EXIT_KEYS
    assert failed == ["exits.userspace.KVM_EXIT_HYPERCALL", "exits.userspace_total"]
    assert (root.get("tests"), root.get("failures")) == ("8", "2")
    run("check", trace, "--baseline", baseline, "--junit", str(junit))
    assert ET.parse(junit).getroot().get("failures") == "0"


def test_update_replaces_atomically_and_leaves_no_temp_files(tmp_path, trace, baseline,
                                                             monkeypatch):
    before = os.stat(baseline).st_ino
    assert run("check", trace, "--baseline", baseline, "--update", "--set",
               "exits=per-entry").exit_code == 0
    assert os.stat(baseline).st_ino != before  # a new file renamed over the old one
    assert sorted(os.listdir(tmp_path)) == ["baseline.json", "t.parquet"]
    written = open(baseline, encoding="utf-8").read()

    def fail(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", fail)
    result = run("check", trace, "--baseline", baseline, "--update")
    assert result.exit_code == 3
    assert result.output == f"Error: {baseline}: cannot write (No space left on device)\n"
    assert open(baseline, encoding="utf-8").read() == written
    assert sorted(os.listdir(tmp_path)) == ["baseline.json", "t.parquet"]


def test_update_replaces_a_corrupt_baseline(tmp_path, trace):
    path = tmp_path / "b.json"
    path.write_text("garbage")
    assert run("check", trace, "--baseline", str(path), "--update").exit_code == 0
    assert run("check", trace, "--baseline", str(path)).exit_code == 0


def test_status_is_exact_at_the_tolerance_boundary():
    assert status(3, 3, Fraction(0)) == "ok"
    assert status(3, 2, Fraction(0)) == "improved"
    assert status(1000, 1001, Fraction(1, 10)) == "within"
    assert status(1000, 1002, Fraction(1, 10)) == "regressed"
    assert status(0, 1, Fraction(10**9)) == "regressed"
    assert status(0.5, 0.55, Fraction(10)) == "within"


def test_expand_metrics_takes_sections_and_skips_non_numbers():
    report = {"exits": {"vm": {"npf": 1}, "vm_total": 1}, "cost": {"estimate": True, "t": 2}}
    assert expand_metrics(report, ("exits", "cost")) == ("exits.vm.npf", "exits.vm_total",
                                                          "cost.t")
