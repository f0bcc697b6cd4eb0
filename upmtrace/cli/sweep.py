"""A knob grid on many traces: sweep."""

from __future__ import annotations

import dataclasses
import sys

import click

from upmtrace.atomic import Out
from upmtrace.cli.base import (
    cli,
    policy_options,
    say,
    screen,
)
from upmtrace.cli.fleet import fleet_options, fleet_setup, pairs


@cli.command()
@click.option("--vary", "varies", multiple=True, metavar="KNOB=V1,V2[,...]",
              help="A knob and the values to try (repeatable, one per knob); a size knob "
                   "takes sizes, e.g. lazy_limit=0,64M,256M.")
@click.option("--policy", "policy_spec", default="eager", show_default=True,
              help="The base policy the knobs vary on: a preset, a TOML file or a spec "
                   "BASE+KEY=VALUE; deltas are against it.")
@policy_options
@fleet_options
@click.option("--plot", type=click.Path(dir_okay=False), default=None,
              help="Also draw memory against exits, cost as colour, the frontier joined "
                   "(.png or .svg).")
@click.option("--format", "fmt", type=click.Choice(["table", "json", "csv"]), default="table",
              show_default=True, help="Output format; json is upmtrace.sweep.v1.")
@click.option("--objective", "objectives", multiple=True, metavar="KEY",
              help="A numeric report key to minimise (repeatable; replaces the default "
                   "memory.peak_resident_bytes, exits.total, cost.total_ns).")
def sweep(varies: tuple[str, ...], policy_spec: str, overrides: tuple[str, ...],
          costs_file: str | None, traces: tuple[str, ...], platform: str | None,
          output: str | None, executor: str | None, scheduler: str | None,
          workers: int | None, plot: str | None, fmt: str,
          objectives: tuple[str, ...]) -> None:
    """Replay TRACES under every combination of the varied knobs; show the Pareto frontier.

    Each combination is the base policy with the varied knobs set, named by its spec
    (eager+gmem_page=2m+prefault=true); combinations that are the same policy replay once.
    The frontier is the policies no other policy beats on every objective at once; the table
    lists it first, with deltas against the base, then the dominated ones and which frontier
    policy dominates each. With several traces (or a folder) policies are ranked by their
    totals over all traces. A trace that fails to replay is exit 3.
    """
    from upmtrace.atomic import write_atomic
    from upmtrace.costs import load_costs
    from upmtrace.fleet import sweep as lib
    from upmtrace.policy import load_policy
    from upmtrace.report.plot import format_of
    from upmtrace.report.sweep import RENDERERS
    from upmtrace.report.sweep_plot import render

    grid = lib.make_grid(load_policy(policy_spec, overrides), lib.parse_varies(varies))
    goals = lib.check_objectives(objectives)
    plot_fmt = ("png" if plot == "-" else format_of(plot, "--plot")) if plot else None
    costs = load_costs(costs_file) if costs_file else None
    paths, runner, aside = fleet_setup(traces, output, executor, scheduler, workers,
                                        Out(plot, "--plot", "PNG" if plot_fmt == "png" else None))
    request = lib.Sweep(tuple(paths), grid, goals, platform, costs)
    with pairs(len(paths) * len(grid.policies)) as progress:
        ranking = lib.run_sweep(request, runner, on_row=progress)
    if output:
        lib.write_results(ranking, output)
        ranking = dataclasses.replace(ranking, results=output)
    if plot:
        image = render(ranking, plot_fmt, title=f"Sweep of {', '.join(paths)}"
                       if len(paths) <= 2 else f"Sweep of {len(paths)} traces")
        write_atomic(plot, lambda f: f.write(image))
    say(RENDERERS[fmt](ranking, screen(sys.stderr if aside else None).width), aside)
