"""Coverage-guided fuzzing of the trace readers and the log importer, with atheris (libFuzzer).

    pip install atheris          # not a dependency of upmtrace
    python scripts/fuzz_readers.py -atheris_runs=200000 -max_len=8192 corpus/
    python scripts/fuzz_readers.py --seed-corpus corpus/   # write seeds first (then run above)

The first byte of an input picks the target: read_trace on a .parquet, .arrow, .jsonl or .csv
file, or import_logs (detected, ftrace or qemu format; snp, tdx or sw) into .parquet or .jsonl;
the rest is the file's content. The only exception allowed out is UpmtraceError, and it must be
one line naming the file; a trace that reads must be on SCHEMA and valid, and is replayed with
every invariant checked after every event when its ranges are small; an import that succeeds
must write a trace that reads. Anything else is a crash: atheris stops and saves the input.
"""

from __future__ import annotations

import atexit
import shutil
import sys
import tempfile
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["upmtrace"], enable_loader_override=False):
    from upmtrace.engine import replay
    from upmtrace.errors import UpmtraceError
    from upmtrace.policy import PRESETS
    from upmtrace.trace.importers import Options, import_logs
    from upmtrace.trace.io import SCHEMA, read_trace, write_trace
    from upmtrace.trace.schema import Platform
    from upmtrace.trace.validate import validate

SUFFIXES = (".parquet", ".arrow", ".jsonl", ".csv")
IMPORTS = [(fmt, platform, out) for fmt in (None, "ftrace", "qemu") for platform in Platform
           for out in (".parquet", ".jsonl")]
RANGE_BUDGET = 256 << 20  # larger conversions are the engine's documented limits
FOLDER = Path(tempfile.mkdtemp(prefix="upmtrace-fuzz-", dir="/dev/shm"
                               if Path("/dev/shm").is_dir() else None))


def check_trace(path: Path) -> None:
    try:
        trace = read_trace(path)
    except UpmtraceError as err:
        message = str(err)
        if not message.startswith(str(path)) or "\n" in message:
            raise AssertionError(f"not one line naming the file: {message!r}") from err
        return
    if not trace.table.schema.equals(SCHEMA):
        raise AssertionError(f"schema {trace.table.schema}")
    validate(trace.table)
    kinds, sizes = trace.table.column("kind").to_pylist(), trace.table.column("size").to_pylist()
    work = sum(s or 0 for k, s in zip(kinds, sizes, strict=True)
               if k not in ("memslot", "set_attributes"))
    if work <= RANGE_BUDGET:
        replay(trace, PRESETS["eager"], paranoid=True)


def check_import(data: bytes, choice: int) -> None:
    fmt, platform, suffix = IMPORTS[choice % len(IMPORTS)]
    log, out = FOLDER / "log.txt", FOLDER / f"out{suffix}"
    log.write_bytes(data)
    out.write_bytes(b"old")
    try:
        import_logs([str(log)], str(out), Options(fmt=fmt, platform=platform))
    except UpmtraceError as err:
        if "\n" in str(err) or out.read_bytes() != b"old":
            raise AssertionError(f"unclean failure: {err!r}") from err
        return
    check_trace(out)


def one_input(data: bytes) -> None:
    if not data:
        return
    choice, body = data[0], data[1:]
    if choice < 128:
        path = FOLDER / f"t{SUFFIXES[choice % len(SUFFIXES)]}"
        path.write_bytes(body)
        check_trace(path)
    else:
        check_import(body, choice)


def write_seeds(folder: Path) -> None:
    """Valid traces in every format and the importer fixtures, each under its target byte."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from scenario import K, M, attrs, host, map_gpa, memslot, npf, psc, table

    folder.mkdir(parents=True, exist_ok=True)
    rows = table(memslot(0, 0, 64 * M), attrs(0, 64 * M), npf(0x1234, True), npf(0x2000, False),
                 psc(0x200000, 2 * M, "shared", req=3), psc(0x5000, 4 * K, "private", req=-1),
                 map_gpa(0x600000, 8 * K, False), host(0x3000, 10))
    for i, suffix in enumerate(SUFFIXES):
        path = FOLDER / f"seed{suffix}"
        write_trace(rows, path, recorded={"exits": {"vm": {"npf": 2}}})
        (folder / f"trace{suffix}").write_bytes(bytes([i]) + path.read_bytes())
    fixtures = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "import"
    for log in sorted(fixtures.iterdir()):
        (folder / f"log-{log.name}").write_bytes(bytes([128]) + log.read_bytes())


def main() -> None:
    atexit.register(shutil.rmtree, FOLDER, ignore_errors=True)
    if sys.argv[1:2] == ["--seed-corpus"]:
        write_seeds(Path(sys.argv[2]))
        return
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
