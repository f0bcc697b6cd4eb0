"""Hypothesis profiles. `UPMTRACE_FUZZ=long pytest tests/test_fuzz.py` runs the fuzzers (and every
property test without its own example count) for UPMTRACE_FUZZ_EXAMPLES examples each (default
20000), without deadlines; `UPMTRACE_FUZZ=mutation` (scripts/mutation.sh) a small, fixed set of
examples (derandomized), the same for every mutant; the default run keeps each fuzzer's small,
bounded budget. scenario.examples(n) gives a property test its count under these profiles."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, Phase, settings

LONG = os.environ.get("UPMTRACE_FUZZ") == "long"

settings.register_profile(
    "long", max_examples=int(os.environ.get("UPMTRACE_FUZZ_EXAMPLES", "20000")), deadline=None,
    suppress_health_check=list(HealthCheck))
settings.register_profile(
    "mutation", max_examples=int(os.environ.get("UPMTRACE_FUZZ_EXAMPLES", "40")), deadline=None,
    derandomize=True, database=None, suppress_health_check=list(HealthCheck),
    phases=(Phase.explicit, Phase.reuse, Phase.generate))  # a mutant fails fast: no shrinking
if os.environ.get("UPMTRACE_FUZZ") in ("long", "mutation"):
    settings.load_profile(os.environ["UPMTRACE_FUZZ"])


MAX_WORKERS = 8  # past this the slowest single tests (about 17 s) bound the suite anyway


def pytest_xdist_auto_num_workers(config) -> int | None:
    """`-n auto` (pyproject addopts): one worker per CPU this process may run on, at most
    MAX_WORKERS, rather than pytest-xdist's count of the host's physical cores, which in a
    container can be many more than the container may use. PYTEST_XDIST_AUTO_NUM_WORKERS, if
    set, is left to pytest-xdist."""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return None
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # no sched_getaffinity (macOS)
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, MAX_WORKERS))


@pytest.fixture(autouse=True)
def _generous_terminal_width(monkeypatch):
    """Every test renders at a fixed, generous width, whatever the terminal running it (a test
    that needs another width sets COLUMNS itself)."""
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.delenv("LINES", raising=False)
