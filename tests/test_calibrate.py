"""calibrate on a generated log built from a known per-operation cost table: what it recovers,
what it names as undetermined, the 5 % reproduction rule, and the loop through --costs."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from gen_ftrace_log import MODEL_TABLE, Costs, generate

from upmtrace.calibrate import RULE_PCT, RULE_SAMPLES, calibrate, meets_rule, reproduction
from upmtrace.cli import cli
from upmtrace.costs import load_costs
from upmtrace.trace.io import read_trace

SUMS = {("userspace_exit", "attribute_call"), ("page_allocated", "mapping_4k")}
ALONE = ("vm_exit", "rmp_update_4k", "directmap_split")
NOT_IN_LOG = ("page_freed", "rmp_update_2m", "psmash", "directmap_restore", "mapping_2m",
              "vfio_dma_map", "vfio_dma_unmap", "vfio_pinned_page")


def run(*args: str):
    return CliRunner().invoke(cli, list(args))


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """12 vCPUs (11 timed direct-map splits), jitter of up to 4 x 40 ns on every step."""
    tmp = tmp_path_factory.mktemp("cal")
    log = tmp / "kvm.log"
    log.write_text(generate(12, 20, Costs.from_table(MODEL_TABLE, jitter=40)).text())
    result = run("import", str(log), "-o", str(tmp / "trace.parquet"), "--platform", "snp")
    assert result.exit_code == 0, result.output
    return tmp / "trace.parquet"


@pytest.fixture(scope="module")
def fit(recorded):
    return calibrate(read_trace(recorded))


def test_recovers_every_constant_the_log_determines(fit):
    for name in ALONE:
        assert fit.status[name].startswith("fitted:"), name
        assert fit.costs[name] == pytest.approx(MODEL_TABLE[name], rel=0.10), name
    for pair in SUMS:
        for name in pair:
            assert fit.status[name].startswith(f"fitted as the sum {' + '.join(pair)}"), name
        got = sum(fit.costs[n] for n in pair)
        assert got == pytest.approx(sum(MODEL_TABLE[n] for n in pair), rel=0.10), pair


def test_names_what_the_log_does_not_determine(fit):
    for name in NOT_IN_LOG:
        assert fit.status[name].startswith("default: no timed exit"), name
    # a sum is split in the ratio of the defaults: the split is a choice, and says so
    assert "split in the ratio of the defaults" in fit.status["userspace_exit"]
    assert fit.costs["userspace_exit"] / fit.costs["attribute_call"] == pytest.approx(2.0)


def test_meets_the_reproduction_rule(fit):
    checked = {e["reason"]: e for e in fit.check if "estimated_ns" in e}
    assert {"npf", "vmgexit", "KVM_EXIT_MEMORY_FAULT"} <= set(checked)
    assert all(checked[r]["samples"] >= RULE_SAMPLES for r in checked)
    assert all(abs(e["error_pct"]) <= RULE_PCT for e in checked.values())
    assert meets_rule(fit.check)
    # the GHCB requests have no row: their userspace time is not the model's to reproduce
    hypercall = next(e for e in fit.check if e["reason"] == "KVM_EXIT_HYPERCALL")
    assert "not comparable" in hypercall["note"]


def test_an_implicit_conversion_is_fitted_as_fault_plus_retry(recorded, fit):
    # 12 vCPUs x 20 rounds of 3 plain faults, one implicit pair, one MSR PSC and one MapGPA;
    # vCPU 0's last fault and vCPU 3's last PSC were cut by the end of the log
    assert fit.samples == 12 * 20 * 6


def test_without_latencies_it_refuses(tmp_path):
    trace = "traces/snp-boot-1g.parquet"
    out = tmp_path / "costs.toml"
    result = run("calibrate", trace, "-o", str(out))
    assert result.exit_code == 3
    assert result.output.count("Error:") == 1 and "no exit latencies" in result.output
    assert "Traceback" not in result.output and not out.exists()


def test_the_written_table_round_trips_through_costs(recorded, fit, tmp_path):
    out = tmp_path / "costs.toml"
    result = run("calibrate", str(recorded), "-o", str(out))
    assert result.exit_code == 0, result.output
    assert load_costs(out) == {name: round(ns) for name, ns in fit.costs.items()}
    text = out.read_text(encoding="utf-8")
    assert f"sha256 {read_trace(recorded).sha256}" in text
    assert "# fitted: " in text and "rms residual" in text
    stdout = run("calibrate", str(recorded), "-o", "-")
    assert stdout.exit_code == 0 and stdout.stdout == text


def test_the_loop_import_calibrate_replay_compare(recorded, tmp_path):
    costs = tmp_path / "costs.toml"
    assert run("calibrate", str(recorded), "-o", str(costs)).exit_code == 0
    result = run("replay", str(recorded), "--costs", str(costs), "--format", "json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert sum(report["cost"]["by_exit"].values()) == report["cost"]["total_ns"]
    check = reproduction(report, read_trace(recorded).recorded)
    assert meets_rule(check)
    assert sum(1 for e in check if e["samples"] >= RULE_SAMPLES and "error_pct" in e) == 3
    result = run("compare", str(recorded), "--policy", "eager", "--policy", "prefault",
                 "--costs", str(costs), "--format", "json")
    assert result.exit_code == 0, result.output
    eager, prefault = json.loads(result.stdout)["results"]
    assert eager["cost"] == report["cost"]
    assert prefault["cost"]["by_exit"] != eager["cost"]["by_exit"]
