"""The command group, its error handling, shared option types, and where output goes."""

from __future__ import annotations

import math
import os
import signal
import sys
import traceback
from typing import NamedTuple

import click

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


def policy_options(f):
    """--policy/--set/--costs, shared by every command that replays."""
    f = click.option("--costs", "costs_file", type=click.Path(dir_okay=False), default=None,
                     help="TOML file of `category = ns` overriding the cost table.")(f)
    f = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                     help="Override one policy knob (repeatable), e.g. --set dealloc=lazy.")(f)
    return f
