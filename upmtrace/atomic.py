"""Outputs are written to a temporary file beside the target, then renamed over it."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from upmtrace.errors import UpmtraceError


def temp_name(path: str | os.PathLike, kind: str = "") -> Path:
    """A fresh hidden name beside `path`: .NAME.<random>[.kind].tmp"""
    target = Path(path)
    return target.with_name(f".{target.name}.{secrets.token_hex(4)}{kind}.tmp")


def write_atomic(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Call write(f) on a temporary file, then rename it to path; nothing is left on failure.

    An interrupt (Ctrl-C, or SIGTERM once the CLI has turned it into SystemExit) is a failure
    too: the temporary file is removed and the target keeps its old bytes.
    """
    temp = temp_name(path)
    created = False
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        created = True
        with open(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException as err:
        if created:
            temp.unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise UpmtraceError(f"{path}: cannot write ({err.strerror or err})") from None
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    write_atomic(path, lambda f: f.write(text.encode()))
