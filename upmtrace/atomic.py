"""Where an output goes, and how it is written so that nothing is lost.

`-` is standard output. A path that exists and is not a regular file (a device such as
/dev/null, a FIFO) is written in place. A symbolic link is followed: its target is replaced and
the link stays a link. A regular file (or a new one) is written to a temporary file beside it,
then renamed over it, so an interrupted run leaves the old file whole and no temporary file.
`check_output` answers, before any work is done, whether a path can be written at all.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
import sys
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, NamedTuple

from upmtrace.errors import UpmtraceError, UsageError

STDOUT = "-"


def temp_name(path: str | os.PathLike, kind: str = "") -> Path:
    """A fresh hidden name beside `path`: .NAME.<random>[.kind].tmp"""
    target = Path(path)
    return target.with_name(f".{target.name}.{secrets.token_hex(4)}{kind}.tmp")


def target_of(path: str | os.PathLike) -> Path:
    """The file a write to `path` lands in: a symbolic link's target, followed to the end."""
    return Path(os.path.realpath(path))


def is_special(path: str | os.PathLike) -> bool:
    """True for `-` and for an existing path that is not a regular file (device, FIFO)."""
    if str(path) == STDOUT:
        return True
    try:
        return not stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def scratch_beside(path: str | os.PathLike, kind: str) -> Path:
    """A temporary name for work files of an output: beside its target when the target is (or
    will be) a regular file, else in the system's temporary folder (never in /dev)."""
    import tempfile

    if is_special(path):
        return temp_name(Path(tempfile.gettempdir()) / "upmtrace-output", kind)
    return temp_name(target_of(path), kind)


def check_output(path: str | os.PathLike, option: str, *, binary: str | None = None,
                 make_parents: bool = False) -> None:
    """Fail, before any work is done, when `path` cannot be written: the same one line that
    writing it would end with (exit 3). Nothing is created.

    `binary` names the format when the output is not text: it may go to `-` only when standard
    output is not a terminal (a usage error otherwise). `make_parents`: missing folders will be
    created (write_atomic's `make_parents`), so only the nearest existing one must be writable.
    """
    name = str(path)
    if name == STDOUT:
        if binary and sys.stdout.isatty():
            raise UsageError(f"{option} -: {binary} is binary; redirect standard output to a "
                             "file or a pipe, or name a file")
        return
    target = target_of(path)
    if target.is_dir():
        raise UpmtraceError(f"{name}: cannot write ({os.strerror(errno.EISDIR)})")
    if target.exists() and not target.is_file():
        writable = os.access(target, os.W_OK)
    else:
        folder = target.parent
        while make_parents and not folder.exists() and folder != folder.parent:
            folder = folder.parent
        if not folder.is_dir():
            raise UpmtraceError(f"{name}: cannot write ({os.strerror(errno.ENOENT)})")
        writable = os.access(folder, os.W_OK | os.X_OK)
    if not writable:
        raise UpmtraceError(f"{name}: cannot write ({os.strerror(errno.EACCES)})")


class Out(NamedTuple):
    """An output option: its path (None: not given), its name, the binary format it writes
    (None: text) and whether missing folders are created."""

    path: str | None
    option: str
    binary: str | None = None
    parents: bool = False


def check_outputs(*outputs: Out) -> bool:
    """Check every output before any work; True when one of them is `-` (standard output),
    and the command's own text then goes to standard error."""
    to_stdout = [o.option for o in outputs if o.path == STDOUT]
    if len(to_stdout) > 1:
        raise UsageError(f"{' and '.join(to_stdout)} both name standard output (-); name a "
                         "file for all but one")
    for o in outputs:
        if o.path is not None:
            check_output(o.path, o.option, binary=o.binary, make_parents=o.parents)
    return bool(to_stdout)


def trace_binary(path: str) -> str | None:
    """The binary format a trace written to `path` takes (`-` is Parquet); None for text."""
    suffix = os.path.splitext(path)[1].lower()
    if path == "-" or suffix == ".parquet":
        return "Parquet"
    return "Arrow IPC" if suffix in (".arrow", ".feather") else None


def size_of(path: str) -> str:
    """' (12.0 MiB)' for a regular file; '' for standard output, a device or a FIFO."""
    from upmtrace.units import human_bytes

    try:
        info = os.stat(path)
    except OSError:
        return ""
    return f" ({human_bytes(info.st_size)})" if stat.S_ISREG(info.st_mode) else ""


def write_atomic(path: str | os.PathLike, write: Callable[[BinaryIO], None], *,
                 make_parents: bool = False) -> None:
    """Call write(f) on what `path` names (see the module's docstring); nothing is left behind
    on failure.

    An interrupt (Ctrl-C, or SIGTERM once the CLI has turned it into SystemExit) is a failure
    too: the temporary file is removed and the target keeps its old bytes.
    """
    if str(path) == STDOUT:
        _write_stdout(write)
        return
    target = target_of(path)
    try:
        mode = os.stat(target).st_mode
    except OSError:
        mode = None
    if mode is not None and not stat.S_ISREG(mode):
        _write_in_place(path, target, write)
        return
    if make_parents:
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UpmtraceError(f"{path}: cannot write ({err.strerror or err})") from None
    _replace(path, target, write, None if mode is None else stat.S_IMODE(mode))


def _replace(path, target: Path, write: Callable[[BinaryIO], None], mode: int | None) -> None:
    temp = temp_name(target)
    created = False
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        created = True
        if mode is not None:
            os.fchmod(fd, mode)  # the replaced file keeps its permissions
        with open(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, target)
    except BaseException as err:
        if created:
            temp.unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise UpmtraceError(f"{path}: cannot write ({err.strerror or err})") from None
        raise


def _write_in_place(path, target: Path, write: Callable[[BinaryIO], None]) -> None:
    """A device or FIFO: opened for writing as it is, never replaced or truncated away."""
    try:
        with open(target, "wb") as f:
            write(f)
    except OSError as err:
        raise UpmtraceError(f"{path}: cannot write ({err.strerror or err})") from None


def _write_stdout(write: Callable[[BinaryIO], None]) -> None:
    sys.stdout.flush()
    out = sys.stdout.buffer
    write(out)
    out.flush()


def write_text(path: str | os.PathLike, text: str, *, make_parents: bool = False) -> None:
    write_atomic(path, lambda f: f.write(text.encode()), make_parents=make_parents)
