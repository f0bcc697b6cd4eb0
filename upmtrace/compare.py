"""One trace replayed under several policies, side by side (the `compare` command's library)."""

from __future__ import annotations

import json
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

from upmtrace.errors import UsageError
from upmtrace.policy import Policy, check_distinct
from upmtrace.replay import Result, replay, replay_many

SCHEMA_ID = "upmtrace.compare.v1"


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


def compare(trace, policies: list[Policy], *, platform: str | None = None,
            costs: dict[str, int] | None = None, workers: int | None = None) -> Comparison:
    """Replay `trace` under every policy; results in policy order.

    By default in this process, in one pass over the trace that feeds every policy
    (replay_many); `workers` > 1 replays the policies in that many processes instead.
    """
    check_policies(policies)
    if workers is None or workers <= 1:
        return Comparison(tuple(replay_many(trace, policies, platform=platform, costs=costs)))
    # spawn: a clean interpreter per worker, never a fork of a process running Arrow threads
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        futures = [pool.submit(replay, trace, p, platform=platform, costs=costs)
                   for p in policies]
        return Comparison(tuple(f.result() for f in futures))


def check_policies(policies: list[Policy]) -> None:
    if len(policies) < 2:
        raise UsageError("compare needs at least two --policy options")
    check_distinct(policies, "compare's columns are named by policy")
