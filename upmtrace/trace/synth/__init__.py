"""Deterministic synthetic workloads (`upmtrace synth`).

`synthesize(name, memory=..., vcpus=..., seed=..., platform=...)` returns a `Synth` whose table
conforms to the trace schema, rows in replay order. The same arguments give the same table, and
so the same file bytes. Every column is generated with numpy, never row by row.

This module only describes the workloads (the CLI lists them at import time); numpy and the
generators are imported when `synthesize` runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from upmtrace.errors import UsageError

if TYPE_CHECKING:
    import pyarrow as pa

__all__ = ["WORKLOADS", "Synth", "Workload", "format_size", "synthesize"]


@dataclass(frozen=True)
class Workload:
    name: str
    summary: str  # one line for --help; the generator is workloads.BUILDERS[name]
    platform: str = "snp"  # a Platform value (plain str: schema.py imports pyarrow)
    lazy_boot: bool = False  # only max(256 MiB, memory/16) is accepted at boot
    launch: bool = False  # the VMM populates firmware (and kernel) before the guest runs


@dataclass(frozen=True)
class Synth:
    table: pa.Table
    platform: str
    source: str


WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        Workload("snp-boot", "SNP boot: launch, RAM accepted, GHCB/SWIOTLB shared, DMA",
                 launch=True),
        Workload("lazy-accept", "SNP lazy acceptance: PSC + 1024 faults per 4 MiB",
                 lazy_boot=True, launch=True),
        Workload("dma-churn", "SNP driver sharing each DMA buffer and taking it back",
                 lazy_boot=True),
        Workload("tdx-boot", "TDX boot: TDVF launch, accept faults, MapGPA-shared SWIOTLB, DMA",
                 platform="tdx", launch=True),
        Workload("implicit", "flips by touching with the other C-bit, no PSC",
                 lazy_boot=True),
    )
}


def format_size(size: int) -> str:
    """Bytes as the shortest exact '1G' / '512M' / '4096' string."""
    for unit, shift in (("T", 40), ("G", 30), ("M", 20), ("K", 10)):
        if size and size % (1 << shift) == 0:
            return f"{size >> shift}{unit}"
    return str(size)


def synthesize(name: str, *, memory: int, vcpus: int = 4, seed: int = 0,
               platform: str | None = None) -> Synth:
    """Generate workload `name` for a guest of `memory` bytes and `vcpus` vCPUs."""
    workload = WORKLOADS.get(name)
    if workload is None:
        raise UsageError(f"unknown workload {name!r} (choose from {', '.join(WORKLOADS)})")
    import numpy as np

    from upmtrace.trace.schema import Platform
    from upmtrace.trace.synth.events import Ctx
    from upmtrace.trace.synth.layout import boot_accepted_bytes, make_layout
    from upmtrace.trace.synth.workloads import BUILDERS

    platform = Platform(platform or workload.platform).value
    rng = np.random.default_rng(seed)
    boot = boot_accepted_bytes(memory) if workload.lazy_boot else memory
    launch = workload.platform if workload.launch else None  # the guest's own platform
    ctx = Ctx(make_layout(memory, vcpus, boot, rng, launch), rng)
    table = BUILDERS[name](ctx).table()
    source = (f"upmtrace synth {name} --memory {format_size(memory)} --vcpus {vcpus} "
              f"--seed {seed} --platform {platform}")
    return Synth(table, platform, source)
