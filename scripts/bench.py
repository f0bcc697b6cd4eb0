#!/usr/bin/env python3
"""Replay throughput, compare cost, cold start and memory of upmtrace.

    python scripts/bench.py                 # everything below, results in bench-results.json
    python scripts/bench.py --quick         # three presets, one repeat, no 50M-event trace

Every measurement is a fresh process, timed whole from the outside (interpreter start, imports,
reading and validating the trace, replay, report), and each is the best of --repeat runs. Next
to each replay the pyarrow floor is measured in the same run, the two processes in turn: a
process that only starts Python and reads the same file with pyarrow.parquet.read_table.
`compare` and the one replay it is set against also run in turn. The ratio replay / floor is
what to compare across machines; on a loaded machine the absolute figures are not. Traces are
made with `upmtrace synth` (and a hand-built sparse trace) and cached under bench-cache/.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
UPMTRACE = [sys.executable, "-m", "upmtrace"]
PRESETS = ["eager", "lazy", "inplace", "hugepool", "sg", "prefault"]
COMPARED = ["eager", "lazy", "inplace", "hugepool"]
SPARSE_GUEST = 4 << 40  # a 4 TiB guest ...
SPARSE_TOUCHED = 2 << 30  # ... that touches 2 GiB
FLOOR = "import sys, pyarrow.parquet as pq; pq.read_table(sys.argv[1])"
RSS = r"""
import resource, subprocess, sys
done = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)
sys.exit(done.returncode)
"""


def timed(args: list[str], repeat: int) -> float:
    """Best wall time of `repeat` runs of a whole process."""
    return timed_pair(args, None, repeat)[0]


def timed_pair(first: list[str], second: list[str] | None, repeat: int) -> tuple[float, float]:
    """Best wall times of two processes run in turn, `repeat` times each: a ratio of the two
    is taken under the same load, not across a load change between two series."""
    best = [float("inf"), float("inf")]
    for _ in range(repeat):
        for i, args in enumerate((first, second)):
            if args is None:
                continue
            start = time.perf_counter()
            subprocess.run(args, check=True, stdout=subprocess.DEVNULL, cwd=ROOT)
            best[i] = min(best[i], time.perf_counter() - start)
    return best[0], best[1]


def peak_rss(args: list[str]) -> int:
    out = subprocess.run([sys.executable, "-c", RSS, *args], check=True, capture_output=True,
                         text=True, cwd=ROOT)
    return int(out.stdout)


def events_of(path: Path) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows


def synth(cache: Path, workload: str, memory: str) -> Path:
    path = cache / f"{workload}-{memory.lower()}.parquet"
    if not path.exists():
        subprocess.run([*UPMTRACE, "synth", workload, "--memory", memory, "--seed", "1",
                        "-o", str(path)], check=True, capture_output=True)
    return path


def sparse_trace(cache: Path) -> Path:
    """A 4 TiB guest_memfd guest, all private, that touches 2 GiB in scattered 2 MiB blocks."""
    path = cache / "sparse-4t.parquet"
    if path.exists():
        return path
    import numpy as np
    import pyarrow as pa

    from upmtrace.trace.io import write_trace
    from upmtrace.trace.schema import SCHEMA

    rng = np.random.default_rng(0)
    blocks = np.sort(rng.choice(SPARSE_GUEST >> 21, SPARSE_TOUCHED >> 21, replace=False))
    gfn = (blocks[:, None] * 512 + np.arange(512)).ravel()
    n = len(gfn) + 2
    cols = {name: pa.nulls(n, field.type) for name, field in zip(SCHEMA.names, SCHEMA,
                                                                  strict=True)}
    kinds = ["memslot", "set_attributes"] + ["npf"] * len(gfn)
    cols.update(
        ts=pa.array(np.arange(n, dtype=np.int64)),
        kind=pa.array(kinds).dictionary_encode(),
        vcpu=pa.array(np.r_[[-1, -1], np.zeros(len(gfn))].astype(np.int32)),
        gpa=pa.array(np.r_[[0, 0], gfn << 12].astype(np.uint64)),
        size=pa.array([SPARSE_GUEST, SPARSE_GUEST] + [None] * len(gfn), pa.uint64()),
        private=pa.array([None, True] + [True] * len(gfn), pa.bool_()),
        slot=pa.array([0] + [None] * (n - 1), pa.int32()),
        gmem=pa.array([True] + [None] * (n - 1), pa.bool_()),
    )
    write_trace(pa.table(cols), path, source="bench: 4 TiB guest touching 2 GiB")
    return path


def throughput(path: Path, presets: list[str], repeat: int) -> list[dict]:
    events = events_of(path)
    rows = []
    for preset in presets:
        floor, seconds = timed_pair(
            [sys.executable, "-c", FLOOR, str(path)],
            [*UPMTRACE, "replay", str(path), "--policy", preset, "--format", "json"], repeat)
        rows.append({"trace": path.stem, "preset": preset, "events": events, "seconds": seconds,
                     "mev_per_s": events / seconds / 1e6, "floor_seconds": floor,
                     "ratio_to_floor": seconds / floor})
        print(f"{path.stem:18} {preset:9} {events:>11,} ev  {seconds:6.2f} s  "
              f"{rows[-1]['mev_per_s']:5.2f} Mev/s  floor {floor:5.2f} s  "
              f"x{rows[-1]['ratio_to_floor']:4.1f} floor", flush=True)
    return rows


def compare_cost(path: Path, repeat: int) -> dict:
    many = [arg for p in COMPARED for arg in ("--policy", p)]
    n, one = timed_pair(
        [*UPMTRACE, "compare", str(path), *many, "--format", "json"],
        [*UPMTRACE, "replay", str(path), "--policy", COMPARED[0], "--format", "json"], repeat)
    print(f"compare of {len(COMPARED)} policies {n:.2f} s vs one replay {one:.2f} s: "
          f"x{n / one:.2f}  ({path.stem})", flush=True)
    return {"trace": path.stem, "policies": COMPARED, "compare_seconds": n,
            "replay_seconds": one, "ratio": n / one}


def cold_start(cache: Path, repeat: int) -> dict:
    small = cache / "small-1k.parquet"
    if not small.exists():
        import pyarrow.parquet as pq

        big = synth(cache, "snp-boot", "256M")
        pq.write_table(pq.read_table(big).slice(0, 1000), small)
    help_s = timed([*UPMTRACE, "--help"], repeat)
    replay_s = timed([*UPMTRACE, "replay", str(small), "--format", "json"], repeat)
    print(f"cold start: upmtrace --help {help_s:.2f} s, replay of 1k events {replay_s:.2f} s",
          flush=True)
    return {"help_seconds": help_s, "replay_1k_seconds": replay_s}


def memory(path: Path, label: str, preset: str = "eager") -> dict:
    rss = peak_rss([*UPMTRACE, "replay", str(path), "--policy", preset, "--format", "json"])
    print(f"{label:18} {preset:9} {events_of(path):>11,} ev  peak RSS {rss / (1 << 20):6.0f} MiB",
          flush=True)
    return {"trace": label, "preset": preset, "events": events_of(path),
            "rss_mib": rss / (1 << 20)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="three presets, one repeat, no 50M-event trace")
    parser.add_argument("--presets", nargs="+", choices=PRESETS, help="presets to replay under")
    parser.add_argument("--repeat", type=int, default=None, help="runs per figure (best kept)")
    parser.add_argument("--cache", type=Path, default=ROOT / "bench-cache")
    parser.add_argument("--json", type=Path, default=ROOT / "bench-results.json")
    args = parser.parse_args()
    args.cache.mkdir(exist_ok=True)
    presets = args.presets or (["eager", "lazy", "hugepool"] if args.quick else PRESETS)
    repeat = args.repeat or (1 if args.quick else 3)
    results: dict = {"cpu_count": os.cpu_count(), "load": os.getloadavg(), "repeat": repeat}
    print(f"== replay, whole process (best of {repeat}; load {os.getloadavg()[0]:.1f}) ==")
    results["throughput"] = []
    for workload in ("lazy-accept", "snp-boot"):
        path = synth(args.cache, workload, "16G")
        results["throughput"] += throughput(path, presets, repeat)
    print("== compare ==")
    results["compare"] = compare_cost(synth(args.cache, "lazy-accept", "16G"), repeat)
    print("== cold start ==")
    results["cold_start"] = cold_start(args.cache, repeat)
    print("== memory ==")
    results["memory"] = [memory(sparse_trace(args.cache), "sparse-4t (2 GiB)")]
    if not args.quick:
        results["memory"].append(memory(synth(args.cache, "snp-boot", "190G"), "snp-boot-190g"))
    print("== goals ==")
    results["goals"] = goals(results)
    results["ceiling"] = ceiling(results["throughput"])
    if not all(g["met"] for g in results["goals"] if g["goal"].startswith("replay")):
        print("== where a replay's time goes (cProfile, in one process) ==")
        results["profile"] = profile(synth(args.cache, "lazy-accept", "16G"))
    if not next(g for g in results["goals"] if g["goal"].startswith("compare"))["met"]:
        print("== where compare's time goes (CPU, in one process) ==")
        results["compare_profile"] = compare_profile(synth(args.cache, "lazy-accept", "16G"),
                                                     results["compare"])
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"results in {args.json}")


def goals(results: dict) -> list[dict]:
    """Each goal with the figure measured for it (the worst case) and whether it is met."""
    rates = [r["mev_per_s"] for r in results["throughput"]]
    ratios = [r["ratio_to_floor"] for r in results["throughput"]]
    cold = results["cold_start"]
    table = [
        ("replay >= 5 Mev/s, every trace and preset (slowest)", min(rates), 5.0, ">=",
         "Mev/s"),
        ("replay within 3x of the pyarrow floor (aim; worst)", max(ratios), 3.0, "<=", "x"),
        (f"compare of {len(COMPARED)} policies <= 2x one replay", results["compare"]["ratio"],
         2.0, "<=", "x"),
        ("cold start: upmtrace --help < 1 s", cold["help_seconds"], 1.0, "<", "s"),
        ("cold start: replay of 1k events < 1 s", cold["replay_1k_seconds"], 1.0, "<", "s"),
        *((f"peak RSS < 1 GiB: {m['trace']}", m["rss_mib"], 1024.0, "<", "MiB")
          for m in results["memory"]),
    ]
    out = []
    for goal, value, bound, op, unit in table:
        met = {">=": value >= bound, "<=": value <= bound, "<": value < bound}[op]
        out.append({"goal": goal, "measured": value, "unit": unit, "met": met})
        print(f"{'met  ' if met else 'SHORT'}  {goal:58} {value:8.2f} {unit}", flush=True)
    return out


def ceiling(throughput: list[dict]) -> dict:
    """The rate no replay can beat here: the slowest trace's fastest floor, as events/s."""
    floors: dict[str, dict] = {}  # the fastest floor of each trace
    for r in throughput:
        if r["trace"] not in floors or r["floor_seconds"] < floors[r["trace"]]["floor_seconds"]:
            floors[r["trace"]] = r
    slowest = min(floors.values(), key=lambda r: r["events"] / r["floor_seconds"])
    rate = slowest["events"] / slowest["floor_seconds"] / 1e6
    print(f"ceiling: a process that only reads {slowest['trace']} runs at {rate:.2f} Mev/s "
          f"({slowest['floor_seconds']:.2f} s); no replay of it can be faster here", flush=True)
    return {"trace": slowest["trace"], "mev_per_s": rate}


def profile(path: Path, top: int = 15) -> dict:
    """CPU time of reading (and validating) the trace vs the model, and the functions the
    model spends it in: the shortfall's profile."""
    import cProfile
    import pstats

    from upmtrace.engine import replay
    from upmtrace.policy import PRESETS as POLICIES
    from upmtrace.trace.io import read_trace

    start = time.process_time()
    table = read_trace(path).table  # read, type-checked and validated whole
    read = time.process_time() - start
    start = time.process_time()
    replay(table, POLICIES["eager"])
    model = time.process_time() - start
    events = table.num_rows
    print(f"{path.stem}, eager: reading and validating {read:.2f} s CPU, model {model:.2f} s "
          f"CPU ({model / events * 1e9:.0f} ns/event)")
    profiler = cProfile.Profile()
    profiler.runcall(replay, table, POLICIES["eager"])
    stats = pstats.Stats(profiler)
    rows = sorted(stats.stats.items(), key=lambda item: -item[1][2])[:top]  # by own time
    total = sum(v[2] for v in stats.stats.values())
    print(f"{'own s':>7} {'share':>6} {'calls':>9}  function")
    listed = []
    for (file, line, name), (_, calls, own, _cum, _) in rows:
        where = f"{Path(file).name}:{line}({name})"
        print(f"{own:7.3f} {own / total:6.1%} {calls:9,}  {where}")
        listed.append({"function": where, "own_seconds": own, "calls": calls})
    return {"trace": path.stem, "read_cpu_seconds": read, "model_cpu_seconds": model,
            "events": events, "top": listed}


def compare_profile(path: Path, measured: dict) -> dict:
    """compare's cost split into the work every policy shares (read, validate, decode: F) and
    each policy's own model (M_i), as CPU time in one process; the rest of a whole process
    (start, imports, report: S) is the one replay's wall time less its F and M_1.

    One replay is S + F + M_1 and compare is S + F + sum(M_i), so compare <= 2x one replay
    exactly when sum(M_i) - 2 M_1 <= S + F: the policies' models must fit in the shared work."""
    from upmtrace.engine import Engine
    from upmtrace.engine.fast import Decoded
    from upmtrace.policy import PRESETS as POLICIES
    from upmtrace.trace.io import read_trace
    from upmtrace.trace.schema import Platform

    start = time.process_time()
    trace = read_trace(path)
    decoded = [Decoded(batch) for batch in trace.batches()]
    shared = time.process_time() - start
    models = []
    for name in COMPARED:
        engine = Engine(POLICIES[name], Platform(trace.platform))
        start = time.process_time()
        for batch in decoded:
            batch.feed(engine)
        engine.finish()
        models.append(time.process_time() - start)
    rest = max(0.0, measured["replay_seconds"] - shared - models[0])
    need, have = sum(models) - 2 * models[0], rest + shared
    print(f"{path.stem}: shared F {shared:.2f} s (read, validate, decode), the rest of a "
          f"process S {rest:.2f} s;")
    print("  each policy's model M: " + ", ".join(
        f"{name} {m:.2f} s" for name, m in zip(COMPARED, models, strict=True)))
    print(f"  2x needs sum(M) - 2 M_1 <= S + F: {need:.2f} s vs {have:.2f} s; the models "
          f"would have to run {need / have if have else float('inf'):.2f}x faster")
    return {"trace": path.stem, "shared_cpu_seconds": shared, "rest_seconds": rest,
            "model_cpu_seconds": dict(zip(COMPARED, models, strict=True))}


if __name__ == "__main__":
    main()
