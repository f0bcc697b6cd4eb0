"""Commands that replay one trace: replay, policies, compare, plot."""

from __future__ import annotations

import click

from upmtrace.atomic import Out, check_outputs
from upmtrace.cli.base import (
    FILE,
    PLATFORM,
    cli,
    deliver,
    emit,
    policy_options,
    say,
    screen,
)


@cli.command()
@click.argument("trace", metavar="TRACE")
@click.option("--policy", "policy_spec", default="eager", show_default=True,
              help="A preset (see `upmtrace policies`) or a TOML file of knobs.")
@policy_options
@click.option("--platform", type=PLATFORM, default=None,
              help="Override the trace's platform (default: its metadata, else snp).")
@click.option("--format", "fmt", type=click.Choice(["table", "json", "csv"]), default="table",
              show_default=True, help="Output format; json is the report of docs/report.md, "
                                      "csv its keys as key,value rows.")
@click.option("-o", "--output", default=None, metavar="FILE",
              help="Write the report to FILE (atomically) instead of stdout.")
@click.option("--timeline", default=None, metavar="FILE",
              help="Also write counters sampled over the trace's time to FILE (.parquet|.csv; - "
                   "for CSV on standard output).")
@click.option("--timeline-rows", type=click.IntRange(1), default=1000, show_default=True,
              help="At most this many timeline samples; the last is the final state.")
@click.option("--paranoid", is_flag=True, help="Check every model invariant after every event.")
@click.option("--by-vcpu", is_flag=True,
              help="Break events and recorded exit time down per vCPU (JSON: by_vcpu).")
def replay(trace: str, policy_spec: str, overrides: tuple[str, ...], costs_file: str | None,
           platform: str | None, fmt: str, output: str | None, timeline: str | None,
           timeline_rows: int, paranoid: bool, by_vcpu: bool) -> None:
    """Replay TRACE under a policy and report exits, memory and direct-map cost."""
    from upmtrace.costs import load_costs
    from upmtrace.engine import replay as run
    from upmtrace.policy import load_policy
    from upmtrace.progress import watched
    from upmtrace.report import RENDERERS
    from upmtrace.timeline import Timeline, check_path, is_parquet
    from upmtrace.trace.io import read_trace

    policy = load_policy(policy_spec, overrides)
    costs = load_costs(costs_file) if costs_file else None
    if timeline:
        check_path(timeline)
    aside = check_outputs(Out(output, "--output"), Out(
        timeline, "--timeline", "Parquet" if timeline and is_parquet(timeline) else None))
    loaded = read_trace(trace, platform=platform)
    sampler = Timeline.over(loaded, timeline_rows) if timeline else None
    with watched(loaded, slow=paranoid) as events:
        result = run(events, policy, costs=costs, paranoid=paranoid, timeline=sampler,
                     by_vcpu=by_vcpu)
    if sampler:
        sampler.write(timeline)
    deliver(lambda width, color: RENDERERS[fmt](result, width, color=color), output, aside)


@cli.command()
def policies() -> None:
    """List the policy presets, every knob with its meaning, and the cost table."""
    from upmtrace.policy import KNOBS, PRESET_NOTES, PRESETS
    from upmtrace.report.table import policies_table

    click.echo(policies_table(PRESETS, PRESET_NOTES, KNOBS, screen().width), nl=False)


@cli.command()
@click.argument("trace", metavar="TRACE")
@click.option("--policy", "policy_specs", multiple=True, required=True,
              help="A preset or a TOML file of knobs; at least two. The first is the reference "
                   "for the deltas.")
@policy_options
@click.option("--platform", type=PLATFORM, default=None,
              help="Override the trace's platform (default: its metadata, else snp).")
@click.option("--format", "fmt", type=click.Choice(["table", "json", "csv"]), default="table",
              show_default=True, help="Output format; json holds every report (docs/report.md).")
@click.option("-o", "--output", default=None, metavar="FILE",
              help="Write the comparison to FILE (atomically) instead of stdout.")
def compare(trace: str, policy_specs: tuple[str, ...], overrides: tuple[str, ...],
            costs_file: str | None, platform: str | None, fmt: str, output: str | None) -> None:
    """Replay TRACE under several policies and show them side by side, with deltas.

    The trace is read and decoded once, in one pass that feeds every policy. --set applies to
    every policy. In the table the lowest value of each row is marked with `*`.
    """
    from upmtrace.costs import load_costs
    from upmtrace.fleet.compare import check_policies
    from upmtrace.fleet.compare import compare as run
    from upmtrace.policy import load_policy
    from upmtrace.progress import watched
    from upmtrace.report.compare import RENDERERS
    from upmtrace.trace.io import read_trace

    policies = [load_policy(spec, overrides) for spec in policy_specs]
    check_policies(policies)
    costs = load_costs(costs_file) if costs_file else None
    check_outputs(Out(output, "--output"))
    loaded = read_trace(trace)
    with watched(loaded) as events:  # one pass over the trace feeds every policy
        comparison = run(events, policies, platform=platform, costs=costs)
    shown = FILE if output else screen()
    emit(RENDERERS[fmt](comparison, shown.width, color=shown.color), output)


@cli.command()
@click.argument("trace", metavar="TRACE")
@click.option("--policy", "policy_specs", multiple=True, required=True,
              help="A preset or a TOML file of knobs (repeatable); one colour each.")
@policy_options
@click.option("--platform", type=PLATFORM, default=None,
              help="Override the trace's platform (default: its metadata, else snp).")
@click.option("-o", "--output", required=True, metavar="FILE",
              help="Image to write (atomically): .png or .svg (- for PNG on standard output).")
@click.option("--timeline-rows", type=click.IntRange(2), default=1000, show_default=True,
              help="Samples per curve.")
def plot(trace: str, policy_specs: tuple[str, ...], overrides: tuple[str, ...],
         costs_file: str | None, platform: str | None, output: str, timeline_rows: int) -> None:
    """Draw memory, exits and estimated cost over TRACE's time, one curve per policy.

    Three panels share the time axis: resident and duplicate memory, cumulative exits, and the
    cumulative estimated cost, so that what a policy saves and what it pays show side by side.
    """
    from upmtrace.atomic import write_atomic
    from upmtrace.costs import load_costs
    from upmtrace.engine import replay as run
    from upmtrace.policy import check_distinct, load_policy
    from upmtrace.progress import progress, tracked
    from upmtrace.report.plot import Series, format_of, render
    from upmtrace.timeline import Timeline
    from upmtrace.trace.io import read_trace

    fmt = "png" if output == "-" else format_of(output)
    policies = [load_policy(spec, overrides) for spec in policy_specs]
    check_distinct(policies, "the plot's curves are named by policy")
    costs = load_costs(costs_file) if costs_file else None
    aside = check_outputs(Out(output, "-o", "PNG" if fmt == "png" else None))
    loaded = read_trace(trace, platform=platform)
    series = []
    with progress(loaded.events * len(policies)) as advance:
        for policy in policies:
            sampler = Timeline.over(loaded, timeline_rows)
            result = run(tracked(loaded, advance), policy, costs=costs, timeline=sampler)
            series.append(Series(policy.name, sampler.table(), result.report))
    r = series[0].report["trace"]
    title = f"{trace}: {r['events']:,} events, platform {r['platform']}"
    image = render(series, fmt, title=title, costs=costs)
    write_atomic(output, lambda f: f.write(image))
    say(f"wrote {output} ({', '.join(p.name for p in policies)})", aside)
