"""Renderers of a check Outcome: `(outcome, width) -> str`. They format; they decide nothing.

The JUnit renderers also cover the runs that end without an outcome (a baseline written by
--update, an error such as a missing baseline), so that a CI upload step always finds a file.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections.abc import Callable
from fractions import Fraction

from rich import box
from rich.table import Table

from upmtrace.gate.check import Outcome, TraceDelta, Verdict
from upmtrace.report.table import rstrip, to_text
from upmtrace.units import human_bytes

SCHEMA_ID = "upmtrace.check.v1"
STATUS = {"ok": "ok", "improved": "improved", "within": "within tolerance",
          "regressed": "REGRESSED"}
STYLE = {"regressed": "bold red", "improved": "green"}  # as pytest colours failed and passed


def render_table(outcome: Outcome, width: int | None = 100, *, color: bool = False) -> str:
    t = Table(title=f"Guarded metrics (tolerance {percent(outcome.tolerance)})",
              title_justify="left")
    for col in ("metric", "baseline", "now", "delta", "status"):
        t.add_column(col, justify="left" if col in ("metric", "status") else "right",
                     no_wrap=True)
    for v in outcome.verdicts:
        t.add_row(v.metric, number(v.metric, v.baseline), number(v.metric, v.now), delta(v),
                  STATUS[v.status], style=STYLE.get(v.status))
    parts = [_head(outcome), t]
    if outcome.traces:
        parts.append(_traces_table(outcome.traces))
    parts.append(summary(outcome))
    return rstrip(to_text(*parts, width=width, color=color))


def _traces_table(traces: tuple[TraceDelta, ...]) -> Table:
    t = Table(title="Traces behind the regressions (those that grew)", title_justify="left",
              box=box.SIMPLE_HEAD)
    for col in ("metric", "trace", "baseline", "now", "delta"):
        t.add_column(col, justify="left" if col in ("metric", "trace") else "right",
                     no_wrap=True)
    for d in traces:
        t.add_row(d.metric, d.trace, "new" if d.baseline is None else number(d.metric, d.baseline),
                  number(d.metric, d.now), signed(d.metric, d.delta))
    return t


def _head(outcome: Outcome) -> str:
    lines = [f"check {outcome.trace} against {outcome.baseline}, policy {outcome.policy}"]
    if outcome.knob_changes:
        changes = ", ".join(f"{k} {_show(a)} -> {_show(b)}"
                            for k, (a, b) in outcome.knob_changes.items())
        lines.append(f"policy knobs changed since the baseline: {changes}")
    if outcome.trace_changed:
        lines.append("the trace changed since the baseline (accepted: --allow-trace-change)")
    return "\n".join(lines)


def summary(outcome: Outcome) -> str:
    bad, total = outcome.regressions, len(outcome.verdicts)
    if not bad:
        return f"no regression in {total} metrics"
    return (f"REGRESSION: {len(bad)} of {total} metrics grew beyond the "
            f"{percent(outcome.tolerance)} tolerance: {', '.join(v.metric for v in bad)}")


def render_json(outcome: Outcome, width: int | None = 100, **_) -> str:
    """The outcome as upmtrace.check.v1; values are the report's numbers (bytes stay bytes)."""
    doc = {"schema": SCHEMA_ID, "trace": outcome.trace, "baseline": outcome.baseline,
           "policy": outcome.policy, "tolerance": _number(outcome.tolerance),
           "trace_changed": outcome.trace_changed,
           "knob_changes": {k: {"baseline": a, "now": b}
                            for k, (a, b) in outcome.knob_changes.items()},
           "regressions": len(outcome.regressions),
           "verdicts": [{"metric": v.metric, "baseline": v.baseline, "now": v.now,
                         "delta": v.delta, "status": v.status} for v in outcome.verdicts],
           "traces": [{"metric": d.metric, "trace": d.trace, "baseline": d.baseline,
                       "now": d.now, "delta": d.delta} for d in outcome.traces]}
    return json.dumps(doc, indent=2) + "\n"


def render_junit(outcome: Outcome, width: int | None = 100, **_) -> str:
    """JUnit XML: one testcase per guarded metric, a failure for each regression."""
    root, suite = _suites(f"upmtrace check {outcome.trace}", len(outcome.verdicts),
                          failures=len(outcome.regressions))
    props = ET.SubElement(suite, "properties")
    for name, value in (("baseline", outcome.baseline), ("policy", outcome.policy),
                        ("tolerance", percent(outcome.tolerance))):
        ET.SubElement(props, "property", name=name, value=value)
    for v in outcome.verdicts:
        case = ET.SubElement(suite, "testcase", name=v.metric,
                             classname=f"upmtrace.check.{outcome.policy}")
        message = (f"{v.metric}: baseline {number(v.metric, v.baseline)}, now "
                   f"{number(v.metric, v.now)}, delta {delta(v)}: {STATUS[v.status]}")
        if v.status == "regressed":
            failure = ET.SubElement(case, "failure", message=message, type="regression")
            failure.text = f"{message}; tolerance {percent(outcome.tolerance)}"
            failure.text += "".join(f"\n  {d.trace}: {_trace_change(d)}"
                                    for d in outcome.traces if d.metric == v.metric)
        else:
            ET.SubElement(case, "system-out").text = message
    return _xml(root)


def junit_update(suite_name: str, message: str) -> str:
    """JUnit XML for `--update`: one passing testcase saying what was written."""
    root, suite = _suites(suite_name, 1)
    case = ET.SubElement(suite, "testcase", name="update baseline", classname="upmtrace.check")
    ET.SubElement(case, "system-out").text = message
    return _xml(root)


def junit_error(suite_name: str, message: str) -> str:
    """JUnit XML for a check that could not compare (missing or broken baseline, ...)."""
    root, suite = _suites(suite_name, 1, errors=1)
    case = ET.SubElement(suite, "testcase", name="check", classname="upmtrace.check")
    ET.SubElement(case, "error", message=message, type="error").text = message
    return _xml(root)


def _suites(name: str, tests: int, failures: int = 0, errors: int = 0):
    counts = {"tests": str(tests), "failures": str(failures), "errors": str(errors),
              "skipped": "0"}
    root = ET.Element("testsuites", name="upmtrace check", **counts)
    return root, ET.SubElement(root, "testsuite", name=name, **counts)


def _xml(root: ET.Element) -> str:
    ET.indent(root)
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"


def _trace_change(d: TraceDelta) -> str:
    was = "new" if d.baseline is None else number(d.metric, d.baseline)
    return f"{was} -> {number(d.metric, d.now)} ({signed(d.metric, d.delta)})"


def number(metric: str, value: int | float) -> str:
    """A value as the tables print it: byte counts human-readable, counts with separators."""
    if metric.endswith("_bytes"):
        return human_bytes(value)
    return f"{value:,}" if isinstance(value, int) else f"{value:.6g}"


def signed(metric: str, value: int | float) -> str:
    if value == 0:
        return "0"
    return ("+" if value > 0 else "-") + number(metric, abs(value))


def delta(v: Verdict) -> str:
    d = v.delta
    if d == 0:
        return "0"
    share = "new" if v.baseline == 0 else f"{100 * d / v.baseline:+.1f}%"
    return f"{signed(v.metric, d)} ({share})"


def percent(tolerance: Fraction) -> str:
    return f"{float(tolerance):g}%"


def _number(value: Fraction) -> int | float:
    return int(value) if value.denominator == 1 else float(value)


def _show(value: object) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


RENDERERS: dict[str, Callable[..., str]] = {
    "table": render_table, "json": render_json, "junit": render_junit,
}
