"""Determinism: the same inputs give byte-identical JSON across runs, across Python hash
seeds (fresh processes with different PYTHONHASHSEED) and across record-batch sizes; written
traces and baselines are byte-identical too."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scenario import table
from test_engine_properties import event, flatten, policies, slot_row, valid_slots

from upmtrace.engine import replay
from upmtrace.policy import PRESETS
from upmtrace.trace.io import write_trace
from upmtrace.trace.schema import Platform
from upmtrace.trace.synth import synthesize

FIXTURES = Path(__file__).parent / "fixtures" / "import"
HASH_SEEDS = ("0", "1", "4242")
# (rows of the trace, record-batch size): size 1 and 7 never take the batch fast path (runs of
# fewer than 64 faults), 64 and 1000 cut its runs at odd places; the default takes it whole
BATCHES = ((2_000, 1), (8_000, 7), (8_000, 64), (8_000, 1000))
# each workload under a policy that exercises what it stresses (the fast path, stale-copy
# ages, folio splits, PSMASH, in-place conversion, prefault)
WORKLOADS = {"snp-boot": "hugepool", "lazy-accept": "lazy", "dma-churn": "eager",
             "tdx-boot": "sg", "implicit": "inplace"}


@pytest.fixture(scope="module")
def workloads() -> dict:
    return {name: synthesize(name, memory=256 << 20, vcpus=2, seed=3) for name in WORKLOADS}


def longest_npf_run(t) -> int:
    kinds, best, run = t.column("kind").to_pylist(), 0, 0
    for kind in kinds:
        run = run + 1 if kind == "npf" else 0
        best = max(best, run)
    return best


def same_at_every_batch_size(t, policy, platform) -> None:
    for rows, batch in BATCHES:
        part = t.slice(0, rows)
        expected = replay(part, policy, platform=platform).to_json()
        assert replay(part, policy, platform=platform).to_json() == expected  # run to run
        got = replay(part, policy, platform=platform, batch_rows=batch).to_json()
        assert got == expected, f"{rows} rows, batch_rows={batch}"
    reference = replay(t.slice(0, rows), policy, platform=platform, reference=True).to_json()
    assert reference == expected


@pytest.mark.parametrize("name", WORKLOADS)
def test_the_report_is_the_same_bytes_at_every_batch_size(workloads, name):
    synth = workloads[name]
    assert longest_npf_run(synth.table.slice(0, BATCHES[-1][0])) >= 64  # the fast path runs
    same_at_every_batch_size(synth.table, PRESETS[WORKLOADS[name]], synth.platform)


def test_prefault_is_the_same_bytes_at_every_batch_size(workloads):
    same_at_every_batch_size(workloads["lazy-accept"].table, PRESETS["prefault"], "snp")


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(slot_row, min_size=1, max_size=3), st.lists(event, max_size=30), policies,
       st.sampled_from(list(Platform)), st.integers(1, 9))
def test_random_traces_are_batch_size_and_path_independent(slots, events, policy, platform,
                                                           rows):
    t = table(*valid_slots([*slots, *flatten(events)]))
    expected = replay(t, policy, platform=platform).to_json()
    assert replay(t, policy, platform=platform, batch_rows=rows).to_json() == expected
    assert replay(t, policy, platform=platform, reference=True).to_json() == expected
    assert replay(t, policy, platform=platform, paranoid=True).to_json() == expected


# --- fresh processes, different hash seeds ----------------------------------------------------


def run_with_seed(seed: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONHASHSEED": seed, "COLUMNS": "100"}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def churn(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("churn")
    synth = synthesize("dma-churn", memory=256 << 20, vcpus=4, seed=5)
    write_trace(synth.table, folder / "t.parquet", platform=synth.platform, source=synth.source)
    return folder


@pytest.mark.parametrize("policy", ["lazy", "hugepool"])
def test_replay_json_is_the_same_bytes_under_every_hash_seed(churn, policy):
    outputs = set()
    for seed in HASH_SEEDS:
        done = run_with_seed(seed, [sys.executable, "-m", "upmtrace", "replay", "t.parquet",
                                    "--policy", policy, "--format", "json"], churn)
        assert done.returncode == 0, done.stderr
        outputs.add(done.stdout)
    assert len(outputs) == 1
    assert json.loads(outputs.pop())["policy"]["name"] == policy


EVERY_OUTPUT = r"""
import hashlib, json, pathlib, sys
from click.testing import CliRunner
from upmtrace.cli import cli

log = sys.argv[1]
texts = {}
def run(*args):
    result = CliRunner().invoke(cli, list(args))
    assert result.exit_code in (0, 1), result.output
    texts[" ".join(args)] = result.stdout
for suffix in ("parquet", "arrow", "jsonl", "csv"):
    run("synth", "implicit", "--memory", "256M", "--vcpus", "3", "-o", f"s.{suffix}")
run("import", log, "-o", "i.parquet")
run("info", "s.parquet", "--format", "json")
run("compare", "s.parquet", "--policy", "eager", "--policy", "lazy", "--policy", "inplace",
    "--format", "json")
run("compare", "i.parquet", "--policy", "eager", "--policy", "sg", "--format", "csv")
run("check", "s.jsonl", "--baseline", "b.json", "--update", "--metric", "memory")
run("check", "s.csv", "--baseline", "b.json", "--junit", "j.xml", "--allow-trace-change")
run("replay", "i.parquet", "--timeline", "tl.csv", "--timeline-rows", "50")
files = {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
         for p in sorted(pathlib.Path().iterdir())}
print(json.dumps({"stdout": texts, "files": files}, indent=1))
"""


def test_every_output_is_the_same_bytes_under_every_hash_seed(tmp_path):
    """Written traces, imports, baselines, JUnit, timelines and every JSON/CSV on stdout."""
    seen = []
    for seed in HASH_SEEDS[:2]:
        folder = tmp_path / seed
        folder.mkdir()
        done = run_with_seed(seed, [sys.executable, "-c", EVERY_OUTPUT,
                                    str(FIXTURES / "snp-ftrace.txt")], folder)
        assert done.returncode == 0, done.stderr
        seen.append(json.loads(done.stdout))
    assert seen[0] == seen[1]
    assert len(seen[0]["files"]) == 8
