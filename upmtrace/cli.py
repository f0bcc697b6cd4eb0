"""The command line: thin commands that parse options, call the library, render, exit."""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import sys
import traceback
from typing import NamedTuple

import click

from upmtrace.atomic import Out, check_outputs, size_of, trace_binary
from upmtrace.errors import UpmtraceError

INTERRUPTED = 128 + signal.SIGINT  # 130; SIGTERM is 143 (main)


def parse_size(text: str) -> int:
    """'1G', '512M', '4096', '2GiB' -> bytes, as a click parameter (units.parse_bytes)."""
    from upmtrace.units import parse_bytes

    t = text.strip()
    try:
        value = parse_bytes(t.removeprefix("-"))
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a size (examples: 4096, 512M, 1G)") from None
    if t.startswith("-") or value <= 0:
        raise click.BadParameter(f"{text!r} must be positive")
    return value


class SizeType(click.ParamType):
    name = "SIZE"

    def convert(self, value, param, ctx):
        return value if isinstance(value, int) else parse_size(value)


class Percentage(click.FloatRange):
    """A percentage: a finite float >= 0 (FloatRange lets nan and inf through)."""

    name = "PCT"

    def __init__(self) -> None:
        super().__init__(min=0)

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


class Group(click.Group):
    """Turns every UpmtraceError into one 'Error: ...' line and its exit status."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except UpmtraceError as err:
            if ctx.obj and ctx.obj.get("debug"):
                traceback.print_exc()
            click.echo(f"Error: {err}", err=True)
            ctx.exit(err.exit_code)
        except KeyboardInterrupt:  # never 1, which is `check`'s "regression"
            click.echo("Interrupted", err=True)
            ctx.exit(INTERRUPTED)
        except MemoryError:
            if ctx.obj and ctx.obj.get("debug"):
                traceback.print_exc()
            click.echo("Error: out of memory (an input too large for this machine)", err=True)
            ctx.exit(3)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="upmtrace")
@click.option("--debug", is_flag=True, help="Show a traceback with errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Replay confidential-VM page-state-change and #NPF traces under VMM/kernel policies."""
    ctx.obj = {"debug": debug}


PLATFORM = click.Choice(["snp", "tdx", "sw"])


def _debug(ctx: click.Context, _param, value: bool) -> None:
    if value and ctx.find_root().obj is not None:
        ctx.find_root().obj["debug"] = True


DEBUG = click.Option(["--debug"], is_flag=True, expose_value=False, callback=_debug,
                     help="Show a traceback with errors (also accepted before the command).")


# --- where output goes -----------------------------------------------------------------------


class Screen(NamedTuple):
    """How a table is drawn: a terminal's width and colours, or (None) as wide as it needs."""

    width: int | None
    color: bool


def screen(stream=None) -> Screen:
    """A terminal: its width, colour unless NO_COLOR is set. Anything else (a CI log, a file, a
    pipe): tables as wide as they need, never cut or wrapped, and no colour."""
    import shutil

    if not (stream or sys.stdout).isatty():
        return Screen(None, False)
    return Screen(shutil.get_terminal_size().columns, not os.environ.get("NO_COLOR"))


FILE = Screen(None, False)  # what a report written to --output is drawn for


def say(text: str, aside: bool) -> None:
    """The command's own text (a table, `wrote ...`): on standard error when `aside` (an
    output took standard output)."""
    click.echo(text if text.endswith("\n") else text + "\n", nl=False, err=aside)


def deliver(render, output: str | None, aside: bool) -> None:
    """A report rendered for where it goes (--output, or the screen or stream it is printed
    on; `aside`: standard error, since an output took standard output), then written there."""
    shown = FILE if output else screen(sys.stderr if aside else None)
    text = render(shown.width, shown.color)
    if output is None and aside:
        say(text, aside)
    else:
        emit(text, output)


def emit(text: str, output: str | None) -> None:
    """The report: printed, or written to --output (atomically; `-` is standard output)."""
    if output is None:
        click.echo(text, nl=False)
    else:
        from upmtrace.atomic import write_text

        write_text(output, text)


# --- trace commands (info, synth) ---------------------------------------------------------


@cli.command()
@click.argument("trace", metavar="TRACE")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table",
              show_default=True, help="Output format.")
@click.option("--platform", type=PLATFORM, default=None,
              help="Override the trace's platform (default: its metadata, else snp).")
@click.option("-o", "--output", default=None, metavar="FILE",
              help="Write the summary to FILE (atomically) instead of stdout.")
def info(trace: str, fmt: str, platform: str | None, output: str | None) -> None:
    """Show what TRACE holds: events by kind, vCPUs, time span, memslots, platform.

    TRACE is a .parquet, .arrow/.feather, .jsonl or .csv file; it is validated first.
    """
    from upmtrace.report.info import RENDERERS
    from upmtrace.trace.info import summarize
    from upmtrace.trace.io import read_trace

    check_outputs(Out(output, "--output"))
    summary = summarize(read_trace(trace, platform=platform))
    emit(RENDERERS[fmt](summary, (screen() if output is None else FILE).width), output)


def _synth_help() -> str:
    from upmtrace.trace.synth import WORKLOADS

    lines = "\n".join(f"  {w.name:<12} {w.summary} ({w.platform})" for w in WORKLOADS.values())
    return ("Write a deterministic synthetic trace of WORKLOAD to OUT (format by extension).\n\n"
            "The same options give the same file, byte for byte. Workloads:\n\n\b\n" + lines)


def _workload_names() -> list[str]:
    from upmtrace.trace.synth import WORKLOADS

    return list(WORKLOADS)


@cli.command(help=_synth_help())
@click.argument("workload", type=click.Choice(_workload_names()), metavar="WORKLOAD")
@click.option("-o", "--output", "out", required=True, metavar="FILE",
              help="Trace file to write (.parquet, .arrow/.feather, .jsonl, .csv; - for "
                   "Parquet on standard output).")
@click.option("--memory", type=SizeType(), default="1G", show_default=True,
              help="Guest memory (multiple of 2M, 256M..256G).")
@click.option("--vcpus", type=click.IntRange(1, 512), default=4, show_default=True,
              help="Number of vCPUs.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Random seed (an integer >= 0).")
@click.option("--platform", type=PLATFORM, default=None,
              help="Platform recorded in the trace (default: the workload's).")
def synth(workload: str, out: str, memory: int, vcpus: int, seed: int,
          platform: str | None) -> None:
    from upmtrace.trace.io import write_trace
    from upmtrace.trace.synth import synthesize

    aside = check_outputs(Out(out, "-o", trace_binary(out)))
    result = synthesize(workload, memory=memory, vcpus=vcpus, seed=seed, platform=platform)
    write_trace(result.table, out, platform=result.platform, source=result.source)
    say(f"{result.table.num_rows} rows written to {out}{size_of(out)}", aside)


@cli.command("import")
@click.argument("logs", nargs=-1, required=True, metavar="LOG...")
@click.option("-o", "--output", "out", required=True, metavar="FILE",
              help="Trace file to write (.parquet is streamed; .arrow/.feather, .jsonl and .csv "
                   "are built in memory; - for Parquet on standard output).")
@click.option("--from", "fmt", type=click.Choice(["ftrace", "qemu"]), default=None,
              help="Log format: ftrace (ftrace text, trace-cmd report, perf script) or qemu "
                   "(-trace log). Default: detected per file.")
@click.option("--platform", type=PLATFORM, default=None,
              help="Platform of the recorded guest (default: snp).")
@click.option("--memslot", "memslots", multiple=True, metavar="GPA:SIZE[:gmem]",
              help="A memslot to add when the log registers none (repeatable); `:gmem` gives it "
                   "a guest_memfd. Default: one guest_memfd slot over the GPAs the log touches.")
@click.option("--initial-attributes", type=click.Choice(["private", "shared"]),
              default="private", show_default=True,
              help="Attributes of a guest_memfd slot at creation (QEMU marks them private).")
@click.option("--shared-bit", type=click.Choice(["47", "51"]), default="47", show_default=True,
              help="TDX: the GPA bit of a shared access (51 with 5-level EPT).")
def import_cmd(logs: tuple[str, ...], out: str, fmt: str | None, platform: str | None,
               memslots: tuple[str, ...], initial_attributes: str, shared_bit: str) -> None:
    """Convert recordings (kvm tracepoints as text, or a QEMU -trace log) into a trace OUT.

    Logs are read as a stream, in the order given. Guest demands (faults, page-state changes,
    MapGPA) become events; exits and attribute changes the host made in reply are kept as
    recorded counts in the trace's metadata, which the replay report carries (`recorded`)
    beside the model's. Lines that cannot be used are counted by reason; exit 3 only when no
    line is usable.
    """
    from upmtrace.trace.importers import Options, import_logs, parse_memslot
    from upmtrace.trace.importers.summary import render
    from upmtrace.trace.schema import Platform

    options = Options(fmt=fmt, platform=Platform(platform or "snp"),
                      memslots=tuple(parse_memslot(m) for m in memslots),
                      initial_private=initial_attributes == "private",
                      shared_bit=int(shared_bit))
    aside = check_outputs(Out(out, "-o", trace_binary(out)))
    say(render(import_logs(logs, out, options)), aside)


@cli.command()
@click.option("-o", "--output", "out", required=True, type=click.Path(dir_okay=False),
              help="Text log to write (atomically), the input of `upmtrace import`.")
@click.option("--pid", type=click.IntRange(1), default=None,
              help="Record only this VMM process (every thread); default: all of KVM.")
@click.option("--duration", type=click.FloatRange(min=0, min_open=True), default=None,
              metavar="SECONDS", help="Record for this long (default: until Ctrl-C).")
@click.option("--tool", type=click.Choice(["trace-cmd", "perf"]), default="trace-cmd",
              show_default=True, help="The recorder to run.")
@click.option("--dry-run", is_flag=True,
              help="Print the exact commands and the QEMU -trace options instead of running.")
def record(out: str, pid: int | None, duration: float | None, tool: str, dry_run: bool) -> None:
    """Record a running VM's kvm tracepoints into the text log `import` reads.

    Enables every tracepoint the importer reads (kvm_exit and kvm_entry included, for exit
    latencies), runs trace-cmd record (or perf record), then writes its text form (trace-cmd
    report / perf script). Needs root. Ctrl-C ends the recording and still writes the log
    (exit 0). Tracefs is looked for at /sys/kernel/tracing unless UPMTRACE_TRACEFS names it.
    """
    from upmtrace.trace import record as recorder
    from upmtrace.units import human_bytes

    request = recorder.Request(out, tool, pid, duration)
    if dry_run:
        click.echo(recorder.recipe(request, recorder.plan(request)), nl=False)
        return
    check_outputs(Out(out, "-o"))  # before the recording, not after it
    outcome = recorder.record(request, notify=lambda text: click.echo(text, err=True))
    stopped = "; recording stopped by Ctrl-C" if outcome.interrupted else ""
    click.echo(f"wrote {out} ({human_bytes(outcome.bytes)}){stopped}", err=True)


@cli.command()
@click.argument("trace", metavar="TRACE")
@click.option("-o", "--output", "out", required=True, type=click.Path(dir_okay=False),
              help="Cost table to write (TOML, atomically; - for stdout); load it with --costs.")
@click.option("--platform", type=PLATFORM, default=None,
              help="Override the trace's platform (default: its metadata, else snp).")
def calibrate(trace: str, out: str, platform: str | None) -> None:
    """Fit the cost table to TRACE's recorded exit latencies.

    Replays TRACE under eager and fits the per-operation costs so that the estimate per exit
    reason (cost.by_exit) reproduces the recorded time (timing); prints the check per reason.
    """
    from upmtrace.atomic import write_text
    from upmtrace.calibrate import calibrate as fit_costs
    from upmtrace.calibrate import summary, to_toml
    from upmtrace.trace.io import read_trace

    loaded = read_trace(trace, platform=platform)
    fit = fit_costs(loaded, platform)
    text = to_toml(fit, trace, loaded.sha256)
    if out == "-":
        click.echo(text, nl=False)
    else:
        write_text(out, text)
    click.echo(summary(fit, out), err=True, nl=False)


# --- replay commands (replay, compare, policies) ------------------------------------------


def policy_options(f):
    """--policy/--set/--costs, shared by every command that replays."""
    f = click.option("--costs", "costs_file", type=click.Path(dir_okay=False), default=None,
                     help="TOML file of `category = ns` overriding the cost table.")(f)
    f = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                     help="Override one policy knob (repeatable), e.g. --set dealloc=lazy.")(f)
    return f


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
            _write_junit_update(junit, f"upmtrace check {trace}", note)
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


def _write_junit_update(junit: str | None, suite: str, note: str) -> None:
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


# --- fleet (run, check) --------------------------------------------------------------------


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


def _fleet_setup(traces, output, executor, scheduler, workers, *others: Out):
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
    paths, runner, aside = _fleet_setup(traces, output, executor, scheduler, workers)
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
        paths, runner, aside = _fleet_setup(
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
        _write_junit_update(junit, suite, note)
        say(note, aside)
        return
    report_outcome(outcome, fmt, None, junit, aside)
    ctx.exit(1 if outcome.regressions else 0)


# --- sweep ---------------------------------------------------------------------------------


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
    paths, runner, aside = _fleet_setup(traces, output, executor, scheduler, workers,
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


def _add_debug(group: click.Group) -> None:
    """--debug after the command's name too (`upmtrace replay T --debug`)."""
    for command in group.commands.values():
        if isinstance(command, click.Group):
            _add_debug(command)
        else:
            command.params.append(DEBUG)


_add_debug(cli)


def main() -> None:
    signal.signal(signal.SIGTERM, _terminated)
    cli(prog_name="upmtrace")


def _terminated(signum: int, _frame) -> None:
    """SIGTERM (a CI job's timeout, kill) unwinds like Ctrl-C: temporary outputs are removed."""
    raise SystemExit(128 + signum)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
