"""The cost table: estimated nanoseconds per operation (docs/model.md, "Cost").

Every figure is an order-of-magnitude estimate for a current x86 server, not a measurement of
any machine; the report labels the total an estimate. Override any of them with a TOML file of
`category = ns` lines (`--costs FILE`).
"""

from __future__ import annotations

import math
import tomllib
from pathlib import Path

from upmtrace.errors import InputError

MAX_NS = 1e12  # one operation costing more than 1000 s is a typo, not a cost

# category -> (ns per operation, counter it multiplies, basis)
DEFAULTS: dict[str, tuple[int, str, str]] = {
    "vm_exit": (2_000, "exits.vm_total",
                "VM exit + re-entry: ~1 us on plain VMX/SVM; SEV-ES/SNP and TDX save and "
                "restore encrypted state through the VMSA/TDX module, so twice that"),
    "userspace_exit": (10_000, "exits.userspace_total",
                       "KVM_RUN returning to the VMM and the VMM re-entering: two ioctl "
                       "transitions plus VMM dispatch, several microseconds"),
    "attribute_call": (5_000, "conversions.set_attributes_calls",
                       "KVM_SET_MEMORY_ATTRIBUTES: ioctl, xarray store, MMU invalidation and "
                       "TLB flush of the range"),
    "page_allocated": (1_000, "memory.pages_allocated",
                       "allocating and zeroing a 4 KiB page: clear_page at ~10 GB/s is 0.4 us, "
                       "plus allocator and fault-in"),
    "page_freed": (300, "memory.pages_freed",
                   "MADV_DONTNEED / fallocate(PUNCH_HOLE) share per 4 KiB page"),
    "rmp_update_4k": (1_000, "rmp.updates_4k",
                      "RMPUPDATE of one 4 KiB entry, with the cache flush of the page"),
    "rmp_update_2m": (2_000, "rmp.updates_2m", "RMPUPDATE of one 2 MiB entry"),
    "psmash": (1_000, "rmp.psmash", "PSMASH of a 2 MiB RMP entry into 512 4 KiB entries"),
    "directmap_split": (20_000, "directmap.splits",
                        "set_memory_4k(): a page-table page, the split and a TLB shootdown "
                        "on every CPU"),
    "directmap_restore": (20_000, "directmap.restores",
                          "restoring a 2 MiB direct mapping, with its TLB shootdown"),
    "mapping_4k": (200, "mappings.4k", "installing one 4 KiB NPT/EPT entry"),
    "mapping_2m": (300, "mappings.2m", "installing one 2 MiB NPT/EPT entry"),
    "vfio_dma_map": (5_000, "vfio.dma_map_calls",
                     "VFIO_IOMMU_MAP_DMA ioctl: the vfio_dma range bookkeeping and IOMMU domain "
                     "walk, a few microseconds before any page is pinned"),
    "vfio_dma_unmap": (10_000, "vfio.dma_unmap_calls",
                       "VFIO_IOMMU_UNMAP_DMA ioctl: IOMMU page-table teardown and a synchronous "
                       "IOTLB invalidation, about twice a map call"),
    "vfio_pinned_page": (250, "vfio.pages_pinned",
                         "pinning one 4 KiB page for DMA: pin_user_pages reference and locked-"
                         "memory accounting plus one IOMMU PTE (contiguous runs are batched)"),
}


def default_costs() -> dict[str, int]:
    return {name: ns for name, (ns, _counter, _basis) in DEFAULTS.items()}


def load_costs(path: str | Path) -> dict[str, int]:
    """Defaults overridden by a TOML file of `category = ns`."""
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError("no such cost file", path=str(path)) from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise InputError(f"not a valid cost table: {err}", path=str(path)) from None
    except RecursionError:
        raise InputError("not a valid cost table: nested too deeply", path=str(path)) from None
    costs = default_costs()
    for key, value in data.items():
        if key not in DEFAULTS:
            raise InputError(f"unknown cost category {key!r} (categories: {', '.join(DEFAULTS)})",
                             path=str(path))
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise InputError(f"cost {key!r} must be a number of ns >= 0", path=str(path))
        if not math.isfinite(value) or value > MAX_NS:
            raise InputError(f"cost {key!r} must be a number of ns >= 0 and at most 1e12",
                             path=str(path))
        costs[key] = value
    return costs


def estimate(counters: dict[str, int], costs: dict[str, int]) -> tuple[int, dict[str, int]]:
    """(total ns, ns by category) for the counters of a report."""
    by_category = {name: round(costs[name] * counters.get(counter, 0))
                   for name, (_ns, counter, _basis) in DEFAULTS.items()}
    return sum(by_category.values()), by_category
