"""The command line: thin commands that parse options, call the library, render, exit."""

from __future__ import annotations

import sys
import traceback

import click

from upmtrace.errors import UpmtraceError

SIZE_SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """'1G', '512M', '4096', '2GiB' -> bytes."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = t[-1:] if t[-1:] in SIZE_SUFFIXES else ""
    number = t[: len(t) - len(unit)]
    try:
        value = int(number, 0) * SIZE_SUFFIXES[unit]
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a size (examples: 4096, 512M, 1G)") from None
    if value <= 0:
        raise click.BadParameter(f"{text!r} must be positive")
    return value


class SizeType(click.ParamType):
    name = "SIZE"

    def convert(self, value, param, ctx):
        return value if isinstance(value, int) else parse_size(value)


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


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="upmtrace")
@click.option("--debug", is_flag=True, help="Show a traceback with errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Replay confidential-VM page-state-change and #NPF traces under VMM/kernel policies."""
    ctx.obj = {"debug": debug}


PLATFORM = click.Choice(["snp", "tdx", "sw"])


# --- trace commands (info, synth) ---------------------------------------------------------


# --- replay commands (replay, compare, policies) ------------------------------------------


def main() -> None:
    cli(prog_name="upmtrace")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
