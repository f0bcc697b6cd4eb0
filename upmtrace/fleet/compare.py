"""One trace replayed under several policies, side by side (the `compare` command's library)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from upmtrace.engine import Result, replay, replay_many
from upmtrace.errors import UsageError
from upmtrace.fleet.executors import LocalExecutor
from upmtrace.policy import Policy, check_distinct

SCHEMA_ID = "upmtrace.compare.v1"
# Starting a worker costs ~0.4 s (a fresh interpreter importing pyarrow); the engine replays
# ~60k events/s, so below this a process pool only adds time.
PARALLEL_MIN_EVENTS = 50_000


@dataclass(frozen=True)
class Comparison:
    """The reports of one trace under several policies, in the order the policies were given."""

    results: tuple[Result, ...]

    @property
    def trace(self) -> dict[str, Any]:
        return self.results[0].report["trace"]

    @property
    def names(self) -> list[str]:
        return [r.report["policy"]["name"] for r in self.results]

    def to_json(self) -> str:
        doc = {"schema": SCHEMA_ID, "trace": self.trace,
               "results": [r.report for r in self.results]}
        return json.dumps(doc, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Comparison:
        return cls(tuple(Result(report) for report in json.loads(text)["results"]))


def default_workers(policies: int, events: int) -> int:
    """One process per policy, up to the CPU count; 1 (in-process) when that gains nothing."""
    if events < PARALLEL_MIN_EVENTS:
        return 1
    return max(1, min(policies, os.cpu_count() or 1))


def compare(trace, policies: list[Policy], *, platform: str | None = None,
            costs: dict[str, int] | None = None, workers: int | None = None) -> Comparison:
    """Replay `trace` under every policy; results in policy order.

    By default in this process, in one pass over the trace that feeds every policy
    (replay_many); `workers` > 1 replays the policies in that many processes instead. An
    error of any replay (an invalid event) is raised as it was.
    """
    check_policies(policies)
    if workers is None or workers <= 1:
        return Comparison(tuple(replay_many(trace, policies, platform=platform, costs=costs)))
    jobs = [(trace, policy, platform, costs) for policy in policies]
    results: list[Result | None] = [None] * len(jobs)
    for index, outcome in LocalExecutor(workers).run(_replay, jobs):
        if outcome.error is not None:
            raise outcome.error
        results[index] = outcome.value
    return Comparison(tuple(results))


def _replay(trace, policy: Policy, platform: str | None, costs: dict[str, int] | None) -> Result:
    return replay(trace, policy, platform=platform, costs=costs)


def _events(trace) -> int:
    return trace.num_rows if isinstance(trace, pa.Table) else trace.events


def check_policies(policies: list[Policy]) -> None:
    if len(policies) < 2:
        raise UsageError("compare needs at least two --policy options")
    check_distinct(policies, "compare's columns are named by policy")
