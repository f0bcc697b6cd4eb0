"""Scaling benchmark of `upmtrace fleet`: one fleet on 1 and 2 local workers and a Dask cluster.

    python scripts/bench_fleet.py [--traces 64] [--memory 256M] [--repeat 3] [--cache DIR]

The fleet is N synthetic traces (workloads in turn: snp-boot, lazy-accept, dma-churn, tdx-boot,
implicit; seeds 0..N-1) replayed under eager and lazy. Traces are made once and cached (default
bench-cache/ in the repository, git-ignored). Each run is timed end to end as the command runs
it: pool or LocalCluster start, every pair, shutdown; the best of --repeat runs is kept. The
three result tables must be byte-identical. Prints a table, then the same figures as JSON.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq

from upmtrace.fleet.executors import DaskExecutor, Executor, LocalExecutor
from upmtrace.fleet.pairs import Fleet, find_traces, run
from upmtrace.policy import PRESETS
from upmtrace.trace.io import write_trace
from upmtrace.trace.synth import WORKLOADS, format_size, synthesize
from upmtrace.units import parse_bytes

ROOT = Path(__file__).resolve().parent.parent


def make_fleet(folder: Path, count: int, memory: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = list(WORKLOADS)
    for seed in range(count):
        name = names[seed % len(names)]
        path = folder / f"{seed:03}-{name}.parquet"
        if not path.exists():
            made = synthesize(name, memory=memory, vcpus=4, seed=seed)
            write_trace(made.table, path, platform=made.platform, source=made.source)
    return find_traces([str(folder)])


def timed(fleet: Fleet, executor: Executor, repeat: int) -> tuple[float, bytes]:
    best, data = float("inf"), b""
    for _ in range(repeat):
        start = time.perf_counter()
        table = run(fleet, executor)
        best = min(best, time.perf_counter() - start)
        buf = io.BytesIO()
        pq.write_table(table, buf)
        data = buf.getvalue()
        assert table.filter(table["error"].is_valid()).num_rows == 0, "a pair failed"
    return best, data


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--traces", type=int, default=64)
    parser.add_argument("--memory", default="256M")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--cache", type=Path, default=ROOT / "bench-cache")
    args = parser.parse_args()
    memory = parse_bytes(args.memory)
    folder = args.cache / f"fleet-{args.traces}x{format_size(memory)}"
    traces = make_fleet(folder, args.traces, memory)
    fleet = Fleet(tuple(traces), (PRESETS["eager"], PRESETS["lazy"]))
    setups: list[tuple[str, int, Executor]] = [
        ("local", 1, LocalExecutor(1)), ("local", 2, LocalExecutor(2)),
        ("dask LocalCluster", 2, DaskExecutor(None, 2)),
    ]
    load = [round(os.getloadavg()[0], 2)]  # other work on the machine skews the figures
    rows, outputs = [], set()
    for name, workers, executor in setups:
        seconds, data = timed(fleet, executor, args.repeat)
        outputs.add(data)
        rows.append({"executor": name, "workers": workers, "seconds": round(seconds, 2),
                     "pairs_per_s": round(len(fleet.pairs()) / seconds, 1)})
    for row in rows:
        row["speedup"] = round(rows[0]["seconds"] / row["seconds"], 2)
    doc = {"traces": len(traces), "pairs": len(fleet.pairs()), "memory": args.memory,
           "events": sum(pq.read_metadata(t).num_rows for t in traces),
           "repeat": args.repeat, "cpus": os.cpu_count(), "python": platform.python_version(),
           "load_average_1m": {"before": load[0], "after": round(os.getloadavg()[0], 2)},
           "identical_results": len(outputs) == 1, "runs": rows}
    print(f"{doc['traces']} traces x 2 policies = {doc['pairs']} pairs, {doc['events']:,} "
          f"events per policy, {doc['cpus']} CPUs, best of {args.repeat}, load average "
          f"{doc['load_average_1m']['before']} -> {doc['load_average_1m']['after']}")
    print(f"{'executor':<18} {'workers':>7} {'seconds':>8} {'pairs/s':>8} {'speed-up':>8}")
    for r in rows:
        print(f"{r['executor']:<18} {r['workers']:>7} {r['seconds']:>8.2f} "
              f"{r['pairs_per_s']:>8.1f} {r['speedup']:>7.2f}x")
    print(f"results byte-identical: {'yes' if doc['identical_results'] else 'NO'}")
    print(json.dumps(doc, indent=2))
    return 0 if doc["identical_results"] else 1


if __name__ == "__main__":
    sys.exit(main())
