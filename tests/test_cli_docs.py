"""Every command has help text and is documented in the README."""

from __future__ import annotations

from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from upmtrace.cli import cli

README = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")


def commands(group: click.Group, prefix: str = "upmtrace"):
    for name, command in sorted(group.commands.items()):
        yield f"{prefix} {name}", command
        if isinstance(command, click.Group):
            yield from commands(command, f"{prefix} {name}")


@pytest.mark.parametrize(("name", "command"), list(commands(cli)), ids=lambda x: str(x))
def test_command_has_help_and_is_in_the_readme(name, command):
    assert (command.help or "").strip(), f"{name} has no help text"
    assert f"`{name} " in README or f"\n{name} " in README, f"{name} is not in README.md"
    args = name.split()[1:] + ["--help"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0 and "Usage:" in result.output
