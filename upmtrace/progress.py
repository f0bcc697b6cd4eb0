"""A progress bar over replayed events, on a terminal, for long traces; nothing otherwise.

The engine prints nothing and knows nothing of this: `tracked(trace, advance)` hands it a trace
whose record batches report their rows to `advance` as the engine consumes them.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

MIN_EVENTS = 200_000  # shorter replays take a second or two: no bar
SLOW_MIN_EVENTS = 2_000  # under --paranoid a few thousand events take seconds

Advance = Callable[[int], None]


def _ignore(_events: int) -> None:
    pass


@contextmanager
def progress(total: int, description: str = "replaying", *, console=None,
             min_events: int = MIN_EVENTS) -> Iterator[Advance]:
    """Yields `advance(events)`; draws a bar on stderr only when it is a terminal (or on the
    given rich Console) and `total` is at least `min_events`. The bar is removed at the end."""
    if total < min_events or (console is None and not sys.stderr.isatty()):
        yield _ignore
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("events"), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console or Console(stderr=True), transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda events: bar.advance(task, events)


class Tracked:
    """A Trace whose `batches()` report each batch's rows to `advance` once it is consumed.

    Everything else is the wrapped trace's (upmtrace.trace.io.Trace).
    """

    def __init__(self, trace, advance: Advance) -> None:
        self._trace, self._advance = trace, advance

    def __getattr__(self, name: str):
        return getattr(self._trace, name)

    def batches(self, *args, **kwargs):
        for batch in self._trace.batches(*args, **kwargs):
            yield batch
            self._advance(batch.num_rows)


def tracked(trace, advance: Advance):
    """`trace` itself when there is nothing to report to, else a Tracked view of it."""
    return trace if advance is _ignore else Tracked(trace, advance)


@contextmanager
def watched(trace, *, times: int = 1, slow: bool = False) -> Iterator:
    """`trace` with a bar over `times` replays of it; `slow` (--paranoid, which checks every
    invariant after every event) shows the bar for far shorter traces."""
    with progress(trace.events * times, min_events=SLOW_MIN_EVENTS if slow else MIN_EVENTS) \
            as advance:
        yield tracked(trace, advance)


class Pairs:
    """`done/total pairs` on stderr, redrawn as fleet rows arrive, when stderr is a terminal."""

    def __init__(self, total: int | None, echo: Callable[[str], None]) -> None:
        self.total, self.done, self.failed = total, 0, 0
        self.echo, self.shown = echo, sys.stderr.isatty()

    def __call__(self, row: dict) -> None:
        self.done += 1
        self.failed += row["error"] is not None
        if self.shown:
            of = f"/{self.total}" if self.total else ""
            self.echo(f"\r{self.done}{of} pairs replayed, {self.failed} failed")

    def __enter__(self) -> Pairs:
        return self

    def __exit__(self, *exc) -> None:
        if self.shown and self.done:
            self.echo("\n")
