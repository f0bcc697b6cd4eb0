"""Many traces: fleet run, fleet check."""

from __future__ import annotations

import sys

import click

from upmtrace.atomic import Out, check_outputs
from upmtrace.cli.base import (
    PLATFORM,
    Percentage,
    cli,
    policy_options,
    say,
    screen,
)
from upmtrace.cli.gate import junit_always, report_outcome, write_junit_update


class DefaultGroup(click.Group):
    """A group whose arguments go to its `run` command unless they begin with a command name."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ctx.help_option_names:
            args = ["run", *args]
        return super().parse_args(ctx, args)


def fleet_options(f):
    """TRACES..., --platform, -o and the executor options, shared by `fleet run`/`fleet check`."""
    for option in reversed((
        click.argument("traces", nargs=-1, required=True, metavar="TRACES..."),
        click.option("--platform", type=PLATFORM, default=None,
                     help="Override every trace's platform (default: each trace's metadata)."),
        click.option("-o", "--output", default=None, metavar="FILE",
                     help="Write the results table to FILE.parquet (fleet: one row per pair; "
                          "sweep: one per policy; - for standard output, the summary then "
                          "goes to standard error)."),
        click.option("--executor", type=click.Choice(["local", "dask"]), default=None,
                     help="local: a process pool (the default); dask: a Dask cluster "
                          "(needs pip install 'upmtrace[dask]')."),
        click.option("--scheduler", metavar="ADDRESS", default=None,
                     help="Join the Dask cluster at ADDRESS (tcp://host:8786) instead of "
                          "starting a LocalCluster; implies --executor dask."),
        click.option("--workers", type=click.IntRange(1), default=None,
                     help="Local processes, or LocalCluster workers (default: one per core)."),
    )):
        f = option(f)
    return f


def fleet_setup(traces, output, executor, scheduler, workers, *others: Out):
    """(trace paths, executor, aside), every option checked before anything is replayed;
    aside: an output is standard output, so the summary goes to standard error."""
    from upmtrace.fleet import pairs as lib
    from upmtrace.fleet.executors import make_executor

    runner = make_executor(executor or ("dask" if scheduler else "local"),
                               scheduler=scheduler, workers=workers)
    if output and output != "-":
        lib.check_output(output)
    aside = check_outputs(Out(output, "-o", "Parquet"), *others)
    found = lib.find_traces(traces, exclude=[output] if output and output != "-" else [])
    return found, runner, aside


def pairs(total: int | None):
    """The fleet's `done/total pairs` line on a terminal's stderr."""
    from upmtrace.progress import Pairs

    return Pairs(total, lambda text: click.echo(text, err=True, nl=False))


@cli.group(cls=DefaultGroup)
def fleet() -> None:
    """Replay many traces under several policies, on a process pool or a Dask cluster.

    `upmtrace fleet TRACES... --policy A [--policy B]` is short for `upmtrace fleet run ...`;
    `upmtrace fleet check TRACES... --baseline FILE` is the CI gate on the fleet's totals.
    """


@fleet.command("run")
@click.option("--policy", "policy_specs", multiple=True, required=True,
              help="A preset or a TOML file of knobs (repeatable); deltas are against the first.")
@policy_options
@fleet_options
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table",
              show_default=True, help="Summary format; json is upmtrace.fleet.v1.")
@click.pass_context
def fleet_run(ctx: click.Context, policy_specs: tuple[str, ...], overrides: tuple[str, ...],
              costs_file: str | None, traces: tuple[str, ...], platform: str | None,
              output: str | None, executor: str | None, scheduler: str | None,
              workers: int | None, fmt: str) -> None:
    """Replay every (trace, policy) pair once; summarize each policy over the fleet.

    TRACES are trace files, globs (quoted) or folders (every *.parquet, *.arrow, *.feather,
    *.jsonl, *.csv in it). Workers read the traces themselves. Exit 3 if any pair failed (the
    summary lists it), else 0.
    """
    from upmtrace.costs import load_costs
    from upmtrace.fleet import pairs as lib
    from upmtrace.fleet.summary import summarize
    from upmtrace.policy import load_policy
    from upmtrace.report.fleet import RENDERERS

    policies = tuple(load_policy(spec, overrides) for spec in policy_specs)
    lib.check_policies(policies)
    costs = load_costs(costs_file) if costs_file else None
    paths, runner, aside = fleet_setup(traces, output, executor, scheduler, workers)
    request = lib.Fleet(tuple(paths), policies, platform, costs)
    with pairs(len(request.pairs())) as progress:
        table = lib.run(request, runner, on_row=progress)
    if output:
        lib.write_results(table, output)
    summary = summarize(table, policies, output)
    say(RENDERERS[fmt](summary, screen(sys.stderr if aside else None).width), aside)
    ctx.exit(3 if summary.failures else 0)


@fleet.command("check")
@click.option("--baseline", required=True, metavar="FILE",
              help="The fleet baseline JSON file (written by --update; its folder is created).")
@click.option("--policy", "policy_specs", multiple=True,
              help="Policies to check, each one of the baseline's (default: all of them).")
@policy_options
@fleet_options
@click.option("--tolerance", type=Percentage(), default=None, metavar="PCT",
              help="Allowed growth of a total in percent (default: the baseline's, else 0).")
@click.option("--metric", "metrics", multiple=True, metavar="KEY",
              help="A total to guard, or a section such as `memory` (repeatable; default: "
                   "the baseline's, else every key under `exits`).")
@click.option("--allow-trace-change", is_flag=True,
              help="Accept traces whose sha256 set differs from the baseline's.")
@click.option("--update", is_flag=True, help="Replay and (re)write the baseline.")
@click.option("--junit", default=None, metavar="FILE",
              help="Also write a JUnit XML file, whatever the outcome: one testcase per policy "
                   "and guarded total (a regression names its traces), or one error, or the "
                   "update.")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table",
              show_default=True, help="Outcome format; json is upmtrace.check.v1.")
@click.pass_context
def fleet_check(ctx: click.Context, baseline: str, policy_specs: tuple[str, ...],
                overrides: tuple[str, ...], costs_file: str | None, traces: tuple[str, ...],
                platform: str | None, output: str | None, executor: str | None,
                scheduler: str | None, workers: int | None, tolerance: float | None,
                metrics: tuple[str, ...], allow_trace_change: bool, update: bool,
                junit: str | None, fmt: str) -> None:
    """CI gate: exit 1 when a guarded fleet total of a policy grew beyond the tolerance.

    Totals are sums over the fleet's traces, per policy. Exit 0 when nothing regressed, 1 on a
    regression, 3 when a pair failed, the baseline is missing or broken, or the traces' sha256s
    differ from the baseline's (unless --allow-trace-change).
    """
    from fractions import Fraction

    from upmtrace.costs import load_costs
    from upmtrace.fleet.pairs import write_results
    from upmtrace.gate import fleet as gate

    suite = f"upmtrace fleet check {baseline}"
    with junit_always(junit, suite):
        request = gate.Request(
            baseline, policy_specs=policy_specs, overrides=overrides,
            costs=load_costs(costs_file) if costs_file else None, platform=platform,
            tolerance=None if tolerance is None else Fraction(str(tolerance)), metrics=metrics,
            allow_trace_change=allow_trace_change)
        paths, runner, aside = fleet_setup(
            traces, output, executor, scheduler, workers,
            Out(baseline if update else None, "--baseline", parents=True),
            Out(junit, "--junit", parents=True))
        with pairs(None) as progress:
            if update:
                written, table = gate.update(paths, request, runner, progress)
            else:
                outcome, table = gate.check(paths, request, runner, progress)
        if output:
            write_results(table, output)
    if update:
        note = (f"wrote {baseline}: {len(written.traces)} traces, policies "
                f"{', '.join(p.name for p in written.policies)}, {len(written.metrics)} "
                f"guarded totals each, tolerance {float(written.tolerance):g}%")
        write_junit_update(junit, suite, note)
        say(note, aside)
        return
    report_outcome(outcome, fmt, None, junit, aside)
    ctx.exit(1 if outcome.regressions else 0)
