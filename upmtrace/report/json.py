"""The report (docs/report.md) as JSON: deterministic, the same bytes for the same replay."""

from __future__ import annotations

from upmtrace.engine.reference import Result


def render(result: Result, width: int | None = 100, **_) -> str:
    return result.to_json()
