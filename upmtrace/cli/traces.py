"""Commands on trace files: info, synth, import, record, calibrate."""

from __future__ import annotations

import click

from upmtrace.atomic import Out, check_outputs, size_of, trace_binary
from upmtrace.cli.base import (
    FILE,
    PLATFORM,
    SizeType,
    cli,
    emit,
    say,
    screen,
)


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
