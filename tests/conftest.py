"""Hypothesis profiles. `UPMTRACE_FUZZ=long pytest tests/test_fuzz.py` runs the fuzzers (and every
property test without its own example count) for UPMTRACE_FUZZ_EXAMPLES examples each (default
20000), without deadlines; the default run keeps each fuzzer's small, bounded budget."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

LONG = os.environ.get("UPMTRACE_FUZZ") == "long"

settings.register_profile(
    "long", max_examples=int(os.environ.get("UPMTRACE_FUZZ_EXAMPLES", "20000")), deadline=None,
    suppress_health_check=list(HealthCheck))
if LONG:
    settings.load_profile("long")
