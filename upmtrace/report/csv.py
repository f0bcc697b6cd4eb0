"""The replay report (docs/report.md) as CSV: one `key,value` row per dotted key."""

from __future__ import annotations

import csv
import io
from typing import Any

from upmtrace.engine.reference import Result


def render(result: Result, width: int | None = 100, **_) -> str:
    buf = io.StringIO()
    out = csv.writer(buf, lineterminator="\n")
    out.writerow(["key", "value"])
    for key, value in flatten(result.report):
        out.writerow([key, "" if value is None else show(value)])
    return buf.getvalue()


def flatten(node: dict, prefix: str = "") -> list[tuple[str, Any]]:
    items: list[tuple[str, Any]] = []
    for key, value in node.items():
        if isinstance(value, dict):
            items += flatten(value, f"{prefix}{key}.")
        else:
            items.append((f"{prefix}{key}", value))
    return items


def show(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)
