"""The `check` baseline file: a replay report plus what it guards (schema upmtrace.baseline.v1).

    {"schema": "upmtrace.baseline.v1",
     "guard": {"metrics": ["exits.vm.npf", ...], "tolerance": 0},
     "report": { ...the replay report: trace.sha256, policy name and knobs, counters... }}

`guard.metrics` are dotted keys of numeric report leaves; `guard.tolerance` is a percentage.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

from upmtrace.engine.reference import SCHEMA_ID as REPORT_SCHEMA
from upmtrace.engine.reference import Result
from upmtrace.errors import InputError
from upmtrace.policy import Policy, PolicyError
from upmtrace.trace.schema import Platform

SCHEMA_ID = "upmtrace.baseline.v1"


@dataclass(frozen=True)
class Baseline:
    metrics: tuple[str, ...]
    tolerance: Fraction
    result: Result
    path: str | None = None

    @property
    def sha256(self) -> str | None:
        return self.result.report["trace"].get("sha256")

    @property
    def platform(self) -> str:
        return self.result.report["trace"]["platform"]

    def policy(self) -> Policy:
        """The policy the baseline was recorded under: its name and knobs."""
        try:
            return Policy(**self.result.report["policy"])
        except (TypeError, PolicyError) as err:
            raise InputError(f"baseline policy is not valid: {err}", path=self.path) from None

    def to_json(self) -> str:
        tolerance = self.tolerance
        doc = {"schema": SCHEMA_ID,
               "guard": {"metrics": list(self.metrics),
                         "tolerance": int(tolerance) if tolerance.denominator == 1
                         else float(tolerance)},
               "report": self.result.report}
        return json.dumps(doc, indent=2) + "\n"


def read_baseline(path: str | Path) -> Baseline:
    """Load and validate a baseline; every problem is one InputError naming the file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError("no such baseline (create it with --update)", path=str(path)) from None
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"cannot read baseline: {err}", path=str(path)) from None
    try:
        return parse_baseline(loads(text), str(path))
    except json.JSONDecodeError as err:
        raise InputError(f"baseline is not JSON: {err}", path=str(path)) from None
    except (ValueError, RecursionError) as err:  # a 5000-digit number, deep nesting
        raise InputError(f"baseline is not JSON: {str(err).split(';')[0]}",
                         path=str(path)) from None
    except InputError as err:
        raise InputError(str(err), path=str(path)) from None


def loads(text: str) -> Any:
    """json.loads without NaN, Infinity or numbers that overflow to infinity."""
    def finite(literal: str) -> float:
        value = float(literal)
        if not math.isfinite(value):
            raise InputError(f"baseline is not JSON: {literal} is not a finite number")
        return value

    def constant(name: str) -> float:
        raise InputError(f"baseline is not JSON: {name} is not a number")

    return json.loads(text, parse_float=finite, parse_constant=constant)


def parse_baseline(doc: Any, path: str | None = None) -> Baseline:
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA_ID:
        raise InputError(f"not a baseline: expected schema {SCHEMA_ID!r}")
    guard, report = doc.get("guard"), doc.get("report")
    if not isinstance(guard, dict) or not isinstance(report, dict):
        raise InputError("a baseline needs a 'guard' and a 'report' object")
    metrics, tolerance = guard.get("metrics"), guard.get("tolerance", 0)
    if (not isinstance(metrics, list) or not metrics
            or not all(isinstance(m, str) for m in metrics)):
        raise InputError("guard.metrics must be a non-empty list of report keys")
    if not is_percentage(tolerance):
        raise InputError("guard.tolerance must be a percentage >= 0")
    if report.get("schema") != REPORT_SCHEMA:
        raise InputError(f"baseline report: expected schema {REPORT_SCHEMA!r}")
    trace, policy = report.get("trace"), report.get("policy")
    if (not isinstance(trace, dict) or not isinstance(policy, dict)
            or not {"sha256", "platform"} <= trace.keys() or "name" not in policy):
        raise InputError("baseline report lacks trace.sha256, trace.platform or policy.name")
    if not isinstance(trace["sha256"], str) or trace["platform"] not in list(Platform):
        raise InputError(f"baseline report: trace.sha256 must be a string and trace.platform "
                         f"one of {', '.join(Platform)}")
    if not isinstance(policy["name"], str) or not policy["name"]:
        raise InputError("baseline report: policy.name must be a non-empty string")
    return Baseline(tuple(metrics), Fraction(str(tolerance)), Result(report), path)


def is_percentage(value: Any) -> bool:
    """A number >= 0 that is finite as a float (the reports print it as one)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False
