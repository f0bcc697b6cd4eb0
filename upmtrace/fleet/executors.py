"""Where replays run: in this process, a local process pool (spawn), or a Dask cluster.

An executor calls `task(*job)` for every job and yields `(job index, Outcome)` as each ends, in
completion order; callers put the outcomes back in job order, so every executor gives the same
bytes. A task must be a module-level function and its arguments picklable. Dask is imported
only by its executor, and its workers keep their scratch files in a temporary folder.
"""

from __future__ import annotations

import multiprocessing
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, Protocol

from upmtrace.errors import UpmtraceError, UsageError

DASK_HINT = "pip install 'upmtrace[dask]'"

Task = Callable[..., Any]
Job = tuple[Any, ...]  # a task's positional arguments


@dataclass(frozen=True)
class Outcome:
    """What a task returned, or why it gave nothing (it raised, or its worker died)."""

    value: Any = None
    error: BaseException | None = None
    where: str = "worker"  # who failed: "worker" (a local process) or "dask task"

    def describe(self) -> str:
        return f"{self.where} failed: {self.error!r}"


class Executor(Protocol):
    """Runs task(*job) for every job somewhere; yields (job index, Outcome) as each ends."""

    def run(self, task: Task, jobs: Sequence[Job]) -> Iterator[tuple[int, Outcome]]: ...


def in_process(task: Task, jobs: Sequence[Job]) -> Iterator[tuple[int, Outcome]]:
    for index, job in enumerate(jobs):
        try:
            yield index, Outcome(task(*job))
        except Exception as err:
            yield index, Outcome(error=err)


@dataclass(frozen=True)
class LocalExecutor:
    """A process pool (spawn) of `workers` processes; 1 worker runs in this process."""

    workers: int

    def run(self, task: Task, jobs: Sequence[Job]) -> Iterator[tuple[int, Outcome]]:
        if self.workers <= 1 or len(jobs) <= 1:
            yield from in_process(task, jobs)
            return
        # spawn: a clean interpreter per worker, never a fork of a process running Arrow threads
        context = multiprocessing.get_context("spawn")
        pool = ProcessPoolExecutor(min(self.workers, len(jobs)), mp_context=context)
        try:
            futures = {pool.submit(task, *job): i for i, job in enumerate(jobs)}
            for future in as_completed(futures):
                try:
                    yield futures[future], Outcome(future.result())
                except Exception as err:  # the task raised, or its process died
                    yield futures[future], Outcome(error=err)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


@dataclass(frozen=True)
class DaskExecutor:
    """dask.distributed: join the cluster at `scheduler`, else start a LocalCluster."""

    scheduler: str | None = None
    workers: int = 1

    def run(self, task: Task, jobs: Sequence[Job]) -> Iterator[tuple[int, Outcome]]:
        distributed = require_dask()
        with ExitStack() as stack:
            client = self._client(distributed, stack)
            futures = [client.submit(task, *job, pure=False) for job in jobs]
            index = {future.key: i for i, future in enumerate(futures)}
            for future in distributed.as_completed(futures):
                try:
                    yield index[future.key], Outcome(future.result(), where="dask task")
                except Exception as err:  # KilledWorker, a worker without upmtrace, ...
                    yield index[future.key], Outcome(error=err, where="dask task")
                future.release()

    def _client(self, distributed, stack: ExitStack):
        if self.scheduler is None:
            scratch = stack.enter_context(tempfile.TemporaryDirectory(prefix="upmtrace-dask-"))
            cluster = stack.enter_context(distributed.LocalCluster(
                n_workers=self.workers, threads_per_worker=1, processes=True,
                dashboard_address=None, local_directory=scratch))
            return stack.enter_context(distributed.Client(cluster))
        try:
            client = distributed.Client(self.scheduler, timeout="10s")
        except (OSError, TimeoutError, ValueError) as err:
            raise UpmtraceError(f"cannot reach the Dask scheduler {self.scheduler}: "
                                f"{one_line(str(err), 200)}") from None
        return stack.enter_context(client)


def require_dask():
    """The distributed module, or a UsageError telling how to install it."""
    try:
        import distributed
    except ImportError:
        raise UsageError(f"--executor dask needs Dask: {DASK_HINT}") from None
    return distributed


def make_executor(name: str, *, scheduler: str | None, workers: int | None) -> Executor:
    if name == "local" and scheduler is not None:
        raise UsageError("--scheduler needs --executor dask")
    if scheduler is not None and workers is not None:
        raise UsageError("--workers starts local workers; an existing cluster (--scheduler) "
                         "has its own")
    count = workers or os.cpu_count() or 1
    if name == "dask":
        require_dask()
        return DaskExecutor(scheduler, count)
    return LocalExecutor(count)


def one_line(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
