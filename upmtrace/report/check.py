"""Renderers of a check Outcome: `(outcome, width) -> str`. They format; they decide nothing."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Callable
from fractions import Fraction

from rich.table import Table

from upmtrace.gate.check import Outcome, Verdict
from upmtrace.report.compare import rstrip
from upmtrace.report.table import to_text

STATUS = {"ok": "ok", "improved": "improved", "within": "within tolerance",
          "regressed": "REGRESSED"}


def render_table(outcome: Outcome, width: int = 100) -> str:
    t = Table(title=f"Guarded metrics (tolerance {percent(outcome.tolerance)})",
              title_justify="left")
    for col in ("metric", "baseline", "now", "delta", "status"):
        t.add_column(col, justify="left" if col in ("metric", "status") else "right")
    for v in outcome.verdicts:
        regressed = v.status == "regressed"
        t.add_row(v.metric, number(v.baseline), number(v.now), delta(v), STATUS[v.status],
                  style="bold red" if regressed else None)
    return rstrip(to_text(_head(outcome), t, summary(outcome), width=width))


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


def render_junit(outcome: Outcome, width: int = 100) -> str:
    """JUnit XML: one testcase per guarded metric, a failure for each regression."""
    counts = {"tests": str(len(outcome.verdicts)), "failures": str(len(outcome.regressions)),
              "errors": "0", "skipped": "0"}
    root = ET.Element("testsuites", name="upmtrace check", **counts)
    suite = ET.SubElement(root, "testsuite", name=f"upmtrace check {outcome.trace}", **counts)
    props = ET.SubElement(suite, "properties")
    for name, value in (("baseline", outcome.baseline), ("policy", outcome.policy),
                        ("tolerance", percent(outcome.tolerance))):
        ET.SubElement(props, "property", name=name, value=value)
    for v in outcome.verdicts:
        case = ET.SubElement(suite, "testcase", name=v.metric,
                             classname=f"upmtrace.check.{outcome.policy}")
        message = (f"{v.metric}: baseline {number(v.baseline)}, now {number(v.now)}, "
                   f"delta {delta(v)}: {STATUS[v.status]}")
        if v.status == "regressed":
            failure = ET.SubElement(case, "failure", message=message, type="regression")
            failure.text = f"{message}; tolerance {percent(outcome.tolerance)}"
        else:
            ET.SubElement(case, "system-out").text = message
    ET.indent(root)
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"


def number(value: int | float) -> str:
    return f"{value:,}" if isinstance(value, int) else f"{value:.6g}"


def delta(v: Verdict) -> str:
    d = v.delta
    if d == 0:
        return "0"
    text = f"+{number(d)}" if d > 0 else number(d)
    share = "new" if v.baseline == 0 else f"{100 * d / v.baseline:+.1f}%"
    return f"{text} ({share})"


def percent(tolerance: Fraction) -> str:
    return f"{float(tolerance):g}%"


def _show(value: object) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


RENDERERS: dict[str, Callable[[Outcome, int], str]] = {
    "table": render_table, "junit": render_junit,
}
