#!/usr/bin/env python3
"""Replay throughput, scaling and memory of upmtrace (the targets of the performance issue).

    python scripts/bench.py                 # everything below, results in bench-results.json
    python scripts/bench.py --quick         # 16G sizes only, three presets, no 50M trace

Every measurement runs in a fresh Python process, so peak RSS is that replay's alone. Traces are
made with `upmtrace synth` (and a hand-built sparse trace) and cached under bench-cache/.
Reported per trace: replay time (read_trace + replay, as `upmtrace replay` spends it, after
the interpreter has started and imported upmtrace), events per second, the ratio to the pyarrow
floor (the time pyarrow.parquet.read_table needs just to read the same file, measured in the
same run), and the peak RSS of the replaying process.
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
PRESETS = ["eager", "lazy", "inplace", "hugepool", "sg", "prefault"]
SPARSE_GUEST = 4 << 40  # a 4 TiB guest ...
SPARSE_TOUCHED = 2 << 30  # ... that touches 2 GiB

CHILD = r"""
import json, resource, sys, time
what, path, preset = sys.argv[1:4]
import pyarrow.parquet as pq
from upmtrace.replay import replay
from upmtrace.policy import PRESETS
from upmtrace.trace.io import read_trace
start = time.perf_counter()  # after the imports: the interpreter's start is not the replay's
if what == "floor":
    events = pq.read_table(path).num_rows
else:
    trace = read_trace(path)
    replay(trace, PRESETS[preset])
    events = trace.events
seconds = time.perf_counter() - start
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"seconds": seconds, "events": events, "rss": rss}))
"""


def child(what: str, path: Path, preset: str = "-") -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, what, str(path), preset], check=True,
                         capture_output=True, text=True, cwd=ROOT)
    return json.loads(out.stdout)


def synth(cache: Path, workload: str, memory: str) -> Path:
    path = cache / f"{workload}-{memory.lower()}.parquet"
    if not path.exists():
        subprocess.run(["upmtrace", "synth", workload, "--memory", memory, "-o", str(path)],
                       check=True, capture_output=True)
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


def measure(path: Path, presets: list[str], label: str) -> list[dict]:
    floor = child("floor", path)
    rows = []
    for preset in presets:
        run = child("replay", path, preset)
        rows.append({"trace": label, "preset": preset, "events": run["events"],
                     "seconds": run["seconds"], "mev_per_s": run["events"] / run["seconds"] / 1e6,
                     "floor_seconds": floor["seconds"],
                     "ratio_to_floor": run["seconds"] / floor["seconds"],
                     "rss_mib": run["rss"] / (1 << 20)})
        print(f"{label:18} {preset:9} {run['events']:>11,} ev  {run['seconds']:7.2f} s  "
              f"{rows[-1]['mev_per_s']:5.2f} Mev/s  x{rows[-1]['ratio_to_floor']:5.1f} floor  "
              f"{rows[-1]['rss_mib']:7.0f} MiB", flush=True)
    return rows


def compare_time(path: Path) -> dict:
    start = time.perf_counter()
    subprocess.run(["upmtrace", "compare", str(path), "--policy", "eager", "--policy", "lazy",
                    "--format", "json"], check=True, capture_output=True)
    pair = time.perf_counter() - start
    start = time.perf_counter()
    subprocess.run(["upmtrace", "replay", str(path), "--format", "json"], check=True,
                   capture_output=True)
    one = time.perf_counter() - start
    print(f"compare eager+lazy {pair:.2f} s vs one replay {one:.2f} s: x{pair / one:.2f}")
    return {"trace": path.name, "compare_2_seconds": pair, "replay_1_seconds": one,
            "ratio": pair / one}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="16G only, three presets")
    parser.add_argument("--cache", type=Path, default=ROOT / "bench-cache")
    parser.add_argument("--json", type=Path, default=ROOT / "bench-results.json")
    args = parser.parse_args()
    args.cache.mkdir(exist_ok=True)
    presets = ["eager", "lazy", "hugepool"] if args.quick else PRESETS
    sizes = ["16G"] if args.quick else ["16G", "64G"]
    results: dict = {"cpu_count": os.cpu_count(), "throughput": [], "linearity": [],
                     "memory": [], "compare": None}
    print("== throughput (read_trace + replay) ==")
    for workload in ("snp-boot", "lazy-accept"):
        for size in sizes:
            path = synth(args.cache, workload, size)
            results["throughput"] += measure(path, presets, f"{workload}-{size.lower()}")
    print("== linearity (snp-boot, eager) ==")
    for size in (["4G", "38G"] if args.quick else ["4G", "38G", "190G"]):
        path = synth(args.cache, "snp-boot", size)
        results["linearity"] += measure(path, ["eager"], f"snp-boot-{size.lower()}")
    base = results["linearity"][0]
    for row in results["linearity"]:
        row["ns_per_event"] = row["seconds"] / row["events"] * 1e9
        row["vs_smallest"] = row["ns_per_event"] / (base["seconds"] / base["events"] * 1e9)
        print(f"{row['trace']:18} {row['ns_per_event']:6.0f} ns/event  "
              f"x{row['vs_smallest']:.2f} of the smallest")
    print("== memory: a 4 TiB guest touching 2 GiB ==")
    results["memory"] += measure(sparse_trace(args.cache), ["eager", "lazy"], "sparse-4t")
    print("== compare: 2 policies ==")
    results["compare"] = compare_time(synth(args.cache, "snp-boot", "16G"))
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"results in {args.json}")


if __name__ == "__main__":
    main()
