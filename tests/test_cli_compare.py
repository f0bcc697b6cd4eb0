"""The compare command: one trace, several policies, side by side."""

from __future__ import annotations

import json
import re

import pytest
from click.testing import CliRunner
from scenario import K, M, attrs, host, memslot, npf, psc, table

from upmtrace.cli import cli
from upmtrace.fleet.compare import compare
from upmtrace.policy import PRESETS
from upmtrace.trace.io import read_trace, write_trace

# eager frees the old copy at every conversion, lazy keeps it: more memory, fewer RMP updates.
# The second PSC request has two non-contiguous entries: two exits coalesced, one batched (sg).
ROWS = (memslot(0, 0, 4 * M), attrs(0, 4 * M), npf(0, True), npf(4 * K, True),
        psc(0, 8 * K, "shared", req=1), npf(0, False), host(0, 8 * K),
        psc(0, 4 * K, "private", req=2), psc(8 * K, 4 * K, "private", req=2), npf(0, True))


@pytest.fixture
def trace(tmp_path):
    path = tmp_path / "t.parquet"
    write_trace(table(*ROWS), path)
    return str(path)


def run(*args):
    result = CliRunner().invoke(cli, list(args))
    assert "Traceback" not in result.output
    return result


def row(output: str, key: str) -> list[str]:
    """The cells of the table row for a metric key."""
    (line,) = [line for line in output.splitlines() if line.strip().startswith(key + " ")]
    return re.split(r"\s{2,}", line.strip())


def test_table_shows_values_deltas_and_the_best_marker(trace):
    result = run("compare", trace, "--policy", "eager", "--policy", "lazy", "--policy", "sg")
    assert result.exit_code == 0, result.output
    out = result.output
    assert "policy lazy: dealloc=lazy (otherwise as eager)" in out
    assert "policy sg: exits=batched (otherwise as eager)" in out
    # columns: metric, eager, lazy, Δ lazy, Δ%, sg, Δ sg, Δ%
    assert row(out, "memory.peak_duplicate_bytes") == [
        "memory.peak_duplicate_bytes", "0 B *", "8.0 KiB", "+8.0 KiB", "new", "0 B *", "0",
        "0.0%"]
    assert row(out, "memory.peak_resident_bytes") == [
        "memory.peak_resident_bytes", "8.0 KiB *", "16.0 KiB", "+8.0 KiB", "+100.0%",
        "8.0 KiB *", "0", "0.0%"]
    assert row(out, "rmp.updates_4k") == [
        "rmp.updates_4k", "5", "2 *", "-3", "-60.0%", "5", "0", "0.0%"]
    assert row(out, "exits.userspace.KVM_EXIT_HYPERCALL") == [
        "exits.userspace.KVM_EXIT_HYPERCALL", "3", "3", "0", "0.0%", "2 *", "-1", "-33.3%"]
    assert row(out, "cost.total_ns") == [
        "cost.total_ns", "93.70 us", "88.80 us", "-4.90 us", "-5.2%", "83.70 us *", "-10.00 us",
        "-10.7%"]
    # a row where every policy agrees marks nothing
    assert row(out, "exits.vm.npf") == ["exits.vm.npf", "4", "4", "0", "0.0%", "4", "0", "0.0%"]


def test_ties_for_the_lowest_value_are_all_marked(trace):
    out = run("compare", trace, "--policy", "lazy", "--policy", "eager", "--policy", "sg").output
    assert row(out, "memory.peak_duplicate_bytes") == [
        "memory.peak_duplicate_bytes", "8.0 KiB", "0 B *", "-8.0 KiB", "-100.0%", "0 B *",
        "-8.0 KiB", "-100.0%"]


def test_json_holds_every_report_exactly_as_replay_does(trace):
    result = run("compare", trace, "--policy", "eager", "--policy", "lazy", "--format", "json")
    assert result.exit_code == 0
    doc = json.loads(result.output)
    assert set(doc) == {"schema", "trace", "results"}
    assert doc["schema"] == "upmtrace.compare.v1"
    assert doc["trace"] == {"path": trace, "sha256": read_trace(trace).sha256, "events": 10,
                            "platform": "snp"}
    for report, name in zip(doc["results"], ("eager", "lazy"), strict=True):
        alone = json.loads(run("replay", trace, "--policy", name, "--format", "json").output)
        assert report == alone
    assert [r["memory"]["peak_duplicate_bytes"] for r in doc["results"]] == [0, 8192]


def test_csv_has_a_row_per_key_and_a_column_per_policy(trace):
    result = run("compare", trace, "--policy", "eager", "--policy", "lazy", "--format", "csv")
    assert result.exit_code == 0
    lines = result.output.splitlines()
    assert lines[0] == "metric,eager,lazy"
    for line in ("policy.dealloc,eager,lazy", "policy.prefault,false,false",
                 "exits.userspace.KVM_EXIT_HYPERCALL,3,3", "exits.vm_total,6,6",
                 "memory.peak_duplicate_bytes,0,8192", "memory.ratio_to_touched,1.0,2.0",
                 "rmp.updates_4k,5,2", "cost.total_ns,93700,88800",
                 "cost.by_category.page_freed,900,0"):
        assert line in lines
    assert not any(line.startswith(("schema,", "trace.")) for line in lines)


def test_set_applies_to_every_policy_and_output_is_written(trace, tmp_path):
    out = tmp_path / "c.json"
    result = run("compare", trace, "--policy", "eager", "--policy", "lazy", "--set",
                 "exits=per-entry", "--format", "json", "--output", str(out))
    assert result.exit_code == 0 and result.output == ""
    results = json.loads(out.read_text(encoding="utf-8"))["results"]
    assert [r["policy"]["exits"] for r in results] == ["per-entry", "per-entry"]
    assert [r["exits"]["userspace"]["KVM_EXIT_HYPERCALL"] for r in results] == [3, 3]


@pytest.mark.parametrize(("args", "message"), [
    (["--policy", "eager"], "Error: compare needs at least two --policy options"),
    (["--policy", "eager", "--policy", "eager"],
     "Error: policy 'eager' given twice: compare's columns are named by policy (copy the TOML "
     "file under another name to vary its knobs)"),
])
def test_fewer_than_two_distinct_policies_is_a_usage_error(trace, args, message):
    result = run("compare", trace, *args)
    assert result.exit_code == 2
    assert result.output.strip() == message


def test_no_policy_at_all_is_a_usage_error(trace):
    result = run("compare", trace)
    assert result.exit_code == 2
    assert "Missing option '--policy'" in result.output


def test_a_mistyped_policy_is_exit_2_and_a_missing_trace_exit_3(trace, tmp_path):
    assert run("compare", trace, "--policy", "eager", "--policy", "nope").exit_code == 2
    missing = run("compare", str(tmp_path / "none.parquet"), "--policy", "eager", "--policy",
                  "lazy")
    assert missing.exit_code == 3 and missing.output.startswith("Error: ")


def test_process_pool_gives_the_same_bytes_in_policy_order(trace):
    loaded = read_trace(trace)
    policies = [PRESETS[name] for name in ("sg", "eager", "lazy")]
    pooled = compare(loaded, policies, workers=2)
    inline = compare(loaded, policies, workers=1)
    assert pooled.names == ["sg", "eager", "lazy"]
    assert pooled.to_json() == inline.to_json()


def test_pinned_memory_rows_appear_when_a_policy_has_a_device(trace, tmp_path):
    assert "vfio." not in run("compare", trace, "--policy", "eager", "--policy", "lazy").output
    path = tmp_path / "pinned.toml"
    path.write_text('vfio = "pin-all"\n')
    result = run("compare", trace, "--policy", "eager", "--policy", str(path))
    assert result.exit_code == 0, result.output
    assert row(result.output, "vfio.pinned_peak_bytes")[1:3] == ["0 B *", "4.0 MiB"]
    assert row(result.output, "vfio.dma_map_calls")[1:3] == ["0 *", "1"]
