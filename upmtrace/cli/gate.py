"""The CI gate on one trace: check, and its JUnit report."""

from __future__ import annotations

import click

from upmtrace.atomic import Out, check_outputs
from upmtrace.cli.base import (
    PLATFORM,
    Percentage,
    cli,
    deliver,
    policy_options,
    say,
)
from upmtrace.errors import UpmtraceError


@cli.command()
@click.argument("trace", metavar="TRACE")
@click.option("--baseline", required=True, metavar="FILE",
              help="The baseline JSON file (written by --update; its folder is created).")
@click.option("--policy", "policy_spec", default=None,
              help="The baseline's policy, possibly with edited knobs (default: the policy "
                   "recorded in the baseline).")
@policy_options
@click.option("--platform", type=PLATFORM, default=None,
              help="Override the trace's platform (default: its metadata, else snp).")
@click.option("--tolerance", type=Percentage(), default=None, metavar="PCT",
              help="Allowed growth in percent (default: the baseline's, else 0).")
@click.option("--metric", "metrics", multiple=True, metavar="KEY",
              help="A report key to guard, or a section such as `memory` (repeatable; "
                   "default: the baseline's, else every key under `exits`).")
@click.option("--allow-trace-change", is_flag=True,
              help="Accept a trace whose sha256 differs from the baseline's.")
@click.option("--update", is_flag=True,
              help="Replay and (re)write the baseline instead of checking against it.")
@click.option("--junit", default=None, metavar="FILE",
              help="Also write a JUnit XML file, whatever the outcome: one testcase per guarded "
                   "metric, or one error (missing baseline, ...), or the update.")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table",
              show_default=True, help="Output format; json is upmtrace.check.v1.")
@click.option("-o", "--output", default=None, metavar="FILE",
              help="Write the outcome to FILE (atomically) instead of stdout.")
@click.pass_context
def check(ctx: click.Context, trace: str, baseline: str, policy_spec: str | None,
          overrides: tuple[str, ...], costs_file: str | None, platform: str | None,
          tolerance: float | None, metrics: tuple[str, ...], allow_trace_change: bool,
          update: bool, junit: str | None, fmt: str, output: str | None) -> None:
    """CI gate: exit 1 when a guarded metric of TRACE grew beyond the tolerance over BASELINE.

    Exit 0 when nothing regressed, 1 on a regression, 3 when the baseline is missing or broken,
    the trace's sha256 differs from the baseline's (unless --allow-trace-change) or --policy
    names another policy than the baseline's (use `compare` for that).
    """
    from fractions import Fraction

    from upmtrace.costs import load_costs
    from upmtrace.gate import check as gate
    from upmtrace.progress import watched

    aside = check_outputs(Out(baseline if update else None, "--baseline", parents=True),
                          Out(junit, "--junit", parents=True), Out(output, "--output"))
    with junit_always(junit, f"upmtrace check {trace}"):
        request = gate.Request(
            baseline, policy_spec=policy_spec, overrides=overrides,
            costs=load_costs(costs_file) if costs_file else None, platform=platform,
            tolerance=None if tolerance is None else Fraction(str(tolerance)), metrics=metrics,
            allow_trace_change=allow_trace_change)
        if update:
            written = gate.update(trace, request, watched)
            note = (f"wrote {baseline}: policy {written.result.report['policy']['name']}, "
                    f"{len(written.metrics)} guarded metrics, tolerance "
                    f"{float(written.tolerance):g}%")
            write_junit_update(junit, f"upmtrace check {trace}", note)
            say(note, aside)
            return
        outcome = gate.check(trace, request, watched)
    report_outcome(outcome, fmt, output, junit, aside)
    ctx.exit(1 if outcome.regressions else 0)


def report_outcome(outcome, fmt: str, output: str | None, junit: str | None,
                   aside: bool) -> None:
    """A gate's outcome: the report (stdout, or --output), and the JUnit file."""
    from upmtrace.atomic import write_text
    from upmtrace.report.check import RENDERERS

    if junit:
        write_text(junit, RENDERERS["junit"](outcome), make_parents=True)
    deliver(lambda width, color: RENDERERS[fmt](outcome, width, color=color), output, aside)


def write_junit_update(junit: str | None, suite: str, note: str) -> None:
    if junit:
        from upmtrace.atomic import write_text
        from upmtrace.report.check import junit_update

        write_text(junit, junit_update(suite, note), make_parents=True)


class junit_always:  # noqa: N801 - used as a context manager, like contextlib's
    """An error inside (missing or broken baseline, changed trace) is also written to the
    JUnit file, as an error testcase, before it is reported: CI always finds the file."""

    def __init__(self, junit: str | None, suite: str) -> None:
        self.junit, self.suite = junit, suite

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, err, _tb) -> None:
        if self.junit and isinstance(err, UpmtraceError):
            from upmtrace.atomic import write_text
            from upmtrace.report.check import junit_error

            try:
                write_text(self.junit, junit_error(self.suite, f"Error: {err}"),
                           make_parents=True)
            except UpmtraceError:
                pass  # the JUnit file itself cannot be written: the first error says enough
