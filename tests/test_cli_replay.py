"""The replay and policies commands, as a user runs them."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from scenario import K, M, attrs, host, memslot, npf, psc, table

from upmtrace.cli import cli
from upmtrace.policy import KNOBS, PRESETS
from upmtrace.trace.io import write_trace


@pytest.fixture
def trace(tmp_path):
    path = tmp_path / "t.parquet"
    write_trace(table(memslot(0, 0, 4 * M), attrs(0, 4 * M), npf(0, True),
                      psc(0, 8 * K, "shared"), npf(0, False), host(0, 8 * K)), path)
    return str(path)


def run(*args):
    result = CliRunner().invoke(cli, list(args))
    assert "Traceback" not in result.output
    return result


def test_replay_json_is_the_section_6_report_and_deterministic(trace):
    first, second = run("replay", trace, "--format", "json"), run("replay", trace, "--format",
                                                                   "json")
    assert first.exit_code == 0 and first.output == second.output
    report = json.loads(first.output)
    assert report["schema"] == "upmtrace.report.v1"
    assert report["trace"]["events"] == 6 and len(report["trace"]["sha256"]) == 64
    assert report["exits"]["userspace"]["KVM_EXIT_HYPERCALL"] == 1
    assert report["policy"]["name"] == "eager"


def test_replay_table_names_the_policy_and_exit_reasons(trace):
    result = run("replay", trace, "--policy", "lazy")
    assert result.exit_code == 0
    assert "policy lazy" in result.output and "KVM_EXIT_HYPERCALL" in result.output
    assert "Total Samples" not in result.output  # VM and userspace exits are not added up
    assert [cells(line)[0] for line in result.output.splitlines()
            if line.startswith("│") and ("exits" in line or "total" in line)] == [
        "VM exits", "total", "Userspace exits", "total"]


def test_set_overrides_a_knob_and_output_is_written(trace, tmp_path):
    out = tmp_path / "r.json"
    result = run("replay", trace, "--set", "dealloc=lazy", "--set", "lazy_limit=1M",
                 "--format", "json", "--output", str(out))
    assert result.exit_code == 0 and result.output == ""
    policy = json.loads(out.read_text(encoding="utf-8"))["policy"]
    assert (policy["name"], policy["dealloc"], policy["lazy_limit"]) == (
        "eager+dealloc=lazy+lazy_limit=1M", "lazy", 1 << 20)


def test_policy_from_toml_takes_its_stem_and_eager_defaults(trace, tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text('exits = "batched"\ngmem_page = "2m"\n')
    report = json.loads(run("replay", trace, "--policy", str(path), "--format", "json").output)
    assert report["policy"] == {**PRESETS["eager"].to_json(), "name": "mine",
                                "exits": "batched", "gmem_page": "2m"}


@pytest.mark.parametrize(("args", "message"), [
    (["--set", "foo=1"], "Error: unknown policy knob 'foo' (knobs: " + ", ".join(KNOBS) + ")"),
    (["--set", "dealloc=sometimes"],
     "Error: policy knob 'dealloc' cannot be 'sometimes' (one of eager, lazy, aligned-2m)"),
    (["--set", "dealloc"], "Error: --set 'dealloc': expected KEY=VALUE"),
    (["--set", "prefault=maybe"],
     "Error: policy knob 'prefault' cannot be 'maybe' (true or false)"),
])
def test_bad_policy_is_one_line_and_exit_3(trace, args, message):
    result = run("replay", trace, *args)
    assert result.exit_code == 3
    assert result.output.strip() == message


@pytest.mark.parametrize(("spec", "message"), [
    ("nope", "Error: unknown policy 'nope': not a preset "
             "(eager, lazy, inplace, hugepool, sg, prefault) and no such TOML file"),
    ("eagre", "Error: unknown policy 'eagre': not a preset "
              "(eager, lazy, inplace, hugepool, sg, prefault) and no such TOML file; "
              "did you mean 'eager'?"),
    ("lazzy+prefault=true", "Error: unknown policy 'lazzy': not a preset "
     "(eager, lazy, inplace, hugepool, sg, prefault) and no such TOML file; did you mean 'lazy'?"),
])
def test_a_mistyped_preset_is_a_usage_error_with_a_suggestion(trace, spec, message):
    result = run("replay", trace, "--policy", spec)
    assert result.exit_code == 2
    assert result.output.strip() == message


def test_a_policy_spec_applies_its_overrides_and_is_named_as_written(trace):
    report = json.loads(run("replay", trace, "--policy", "eager+prefault=true+gmem_page=2m",
                            "--set", "lazy_limit=64M", "--format", "json").output)
    assert report["policy"] == {**PRESETS["eager"].to_json(),
                                "name": "eager+prefault=true+gmem_page=2m+lazy_limit=64M",
                                "prefault": True, "gmem_page": "2m", "lazy_limit": 64 << 20}


def test_a_set_override_is_part_of_the_name(trace):
    report = json.loads(run("replay", trace, "--set", "dealloc = lazy", "--format", "json").output)
    assert report["policy"]["name"] == "eager+dealloc=lazy"
    assert report["policy"]["dealloc"] == "lazy"


def test_a_spec_override_that_is_not_key_value_is_exit_3(trace):
    result = run("replay", trace, "--policy", "eager+prefault")
    assert result.exit_code == 3
    assert result.output.strip() == "Error: --set 'prefault': expected KEY=VALUE"


def test_bad_toml_policy(trace, tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('dealloc = "eager"\nturbo = true\n')
    result = run("replay", trace, "--policy", str(path))
    assert result.exit_code == 3
    assert result.output.strip() == (f"Error: {path}: unknown policy knob 'turbo' (knobs: "
                                     + ", ".join(KNOBS) + ")")


def test_costs_file_overrides_a_category(trace, tmp_path):
    costs = tmp_path / "costs.toml"
    costs.write_text("userspace_exit = 1\n")
    base = json.loads(run("replay", trace, "--format", "json").output)["cost"]
    cheap = json.loads(run("replay", trace, "--format", "json", "--costs", str(costs)).output)
    assert cheap["cost"]["by_category"]["userspace_exit"] == 1
    assert cheap["cost"]["total_ns"] < base["total_ns"]
    costs.write_text("warp = 3\n")
    assert run("replay", trace, "--costs", str(costs)).exit_code == 3


def test_paranoid_replay_passes(trace):
    assert run("replay", trace, "--paranoid").exit_code == 0


def test_policies_lists_every_preset_and_knob():
    result = run("policies")
    assert result.exit_code == 0
    for name in [*PRESETS, *KNOBS]:
        assert name in result.output


def test_replay_shows_recorded_versus_model(tmp_path):
    path = tmp_path / "rec.parquet"
    recorded = {"exits": {"userspace": {"KVM_EXIT_HYPERCALL": 3}, "vm": {"npf": 2}}}
    write_trace(table(memslot(0, 0, 4 * M), npf(0, True), psc(0, 8 * K, "shared")), path,
                recorded=recorded)
    report = json.loads(run("replay", str(path), "--format", "json").output)
    assert report["recorded"] == recorded
    lines = run("replay", str(path)).output.splitlines()
    assert any("Recorded" in line and "Diff" in line for line in lines)
    hypercall = next(line for line in lines if "KVM_EXIT_HYPERCALL" in line)
    assert hypercall.split("│")[-3].strip() == "3" and hypercall.split("│")[-2].strip() == "-2"
    npf_line = next(line for line in lines if "│   npf " in line)
    assert npf_line.split("│")[-2].strip() == "+0"


def test_total_is_compared_over_the_recorded_levels_only(tmp_path):
    path = tmp_path / "rec.parquet"
    recorded = {"exits": {"userspace": {"KVM_EXIT_HYPERCALL": 1}}}  # a QEMU log: no VM exits
    write_trace(table(memslot(0, 0, 4 * M), npf(0, True), psc(0, 8 * K, "shared")), path,
                recorded=recorded)
    vm_total, user_total = [cells(line) for line in run("replay", str(path)).output.splitlines()
                            if "│   total" in line]
    # model: 3 VM exits, 2 userspace; the recording counted 1 userspace exit and no VM exit
    assert vm_total == ["total", "3", "100.00%", "6.00 us", "-", "-"]
    assert user_total[:2] == ["total", "2"] and user_total[-2:] == ["1", "+1"]


def cells(line: str) -> list[str]:
    return [c.strip() for c in line.split("│")[1:-1]]


def test_vfio_pinned_memory_shows_in_the_table_and_json(trace, monkeypatch, tmp_path):
    monkeypatch.setenv("COLUMNS", "160")
    result = run("replay", trace, "--set", "vfio=pin-all")
    assert result.exit_code == 0
    assert "peak pinned (VFIO)" in result.output and "VFIO DMA map / unmap calls" in result.output
    assert "peak pinned" not in run("replay", trace).output  # no device: no rows
    path = tmp_path / "dev.toml"
    path.write_text('vfio = "on-convert"\n')
    report = json.loads(run("replay", trace, "--policy", str(path), "--format", "json").output)
    assert report["policy"]["vfio"] == "on-convert"
    assert report["vfio"]["dma_map_calls"] == 1 and report["vfio"]["pinned_final_bytes"] == 8 * K
    bad = run("replay", trace, "--set", "vfio=some")
    assert (bad.exit_code, bad.output.strip()) == (3, "Error: policy knob 'vfio' cannot be "
                                                      "'some' (one of none, pin-all, on-convert)")
