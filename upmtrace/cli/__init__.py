"""The command line: thin commands that parse options, call the library, render, exit.

base.py holds the `upmtrace` group, its error handling and where output goes; each other module
adds one group of commands to it: traces.py (info, synth, import, record, calibrate),
replaying.py (replay, policies, compare, plot), gate.py (check), fleet.py (fleet run, fleet
check), sweep.py. Nothing here imports pyarrow or numpy until a command runs.
"""

from __future__ import annotations

import signal

import click

from upmtrace.cli import fleet, gate, replaying, sweep, traces  # noqa: F401  (they add commands)
from upmtrace.cli.base import DEBUG, cli

__all__ = ["cli", "main"]


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

