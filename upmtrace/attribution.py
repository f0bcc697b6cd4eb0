"""Which exit caused which work: the report's `cost.by_exit` (docs/report.md, "Estimated cost").

The engine names a cause before each piece of work (`Ledger.switch`); the ledger charges the
work counters that moved since the last switch to the cause that was current. The rule:

- an npf's mapping, the allocation and RMP updates it needs, and any PSMASH it takes: `npf`;
- the conversion a memory-fault exit makes the VMM do (the attribute call, the zap, freeing the
  old copy, VFIO mappings that follow it): `KVM_EXIT_MEMORY_FAULT`; the retried access that then
  maps the page is an npf again;
- a PSC run or a MapGPA chunk: the conversion (and a prefault after it) is the VMM's answer to
  `KVM_EXIT_HYPERCALL`; the VM exit that carried the request (vmgexit, tdvmcall, vmcall) costs
  its exit only;
- set_attributes rows, host accesses, populate and memslot changes: `none`.

Exit costs themselves go to their own reason: `vm_exit` times exits.vm[reason], `userspace_exit`
times exits.userspace[reason].
"""

from __future__ import annotations

from operator import add, sub

from upmtrace.costs import DEFAULTS

NONE = "none"
VM_REASONS = ("npf", "vmgexit", "tdvmcall", "vmcall")
USERSPACE_REASONS = ("KVM_EXIT_MEMORY_FAULT", "KVM_EXIT_HYPERCALL")
EXIT_CATEGORIES = ("vm_exit", "userspace_exit")
WORK = tuple(name for name in DEFAULTS if name not in EXIT_CATEGORIES)  # cost categories of work


def nested(platform: str) -> dict[str, tuple[str, ...]]:
    """The userspace exits a VM exit reason's recorded latency includes (it runs to the vCPU's
    next entry): memory faults come from npf, hypercall exits from the platform's hypercall."""
    hypercall = {"snp": "vmgexit", "tdx": "tdvmcall", "sw": "vmcall"}[platform]
    return {"npf": ("KVM_EXIT_MEMORY_FAULT",), hypercall: ("KVM_EXIT_HYPERCALL",)}


def inclusive(report: dict, reason: str) -> int:
    """cost.by_exit of a VM exit reason with that of the userspace exits nested in it: the
    estimate to set beside its recorded time."""
    by_exit = report["cost"]["by_exit"]
    inner = nested(report["trace"]["platform"]).get(reason, ())
    return by_exit.get(reason, 0) + sum(by_exit.get(u, 0) for u in inner)


def work(m) -> tuple[int, ...]:
    """The machine's work counters now, in WORK order."""
    c, rmp, dm, vfio = m.count, m.rmp, m.directmap, m.vfio
    return (c["conversions.set_attributes_calls"], c["memory.pages_allocated"],
            c["memory.pages_freed"], rmp.updates_4k, rmp.updates_2m, rmp.psmash, dm.splits,
            dm.restores, c["mappings.4k"], c["mappings.2m"], vfio.map_calls, vfio.unmap_calls,
            vfio.pages_pinned)


assert WORK == ("attribute_call", "page_allocated", "page_freed", "rmp_update_4k",
                "rmp_update_2m", "psmash", "directmap_split", "directmap_restore", "mapping_4k",
                "mapping_2m", "vfio_dma_map", "vfio_dma_unmap", "vfio_pinned_page")


class Ledger:
    """Work counters charged to the cause that was current when they moved."""

    def __init__(self, machine) -> None:
        self.m = machine
        self.cause = NONE
        self.last = work(machine)
        self.by_cause: dict[str, list[int]] = {}

    def switch(self, cause: str) -> None:
        if cause is self.cause:
            return
        self.settle()
        self.cause = cause

    def settle(self) -> None:
        """Charge what moved since the last switch to the current cause."""
        now = work(self.m)
        if now != self.last:
            moved = map(sub, now, self.last)
            acc = self.by_cause.get(self.cause)
            self.by_cause[self.cause] = list(map(add, acc, moved) if acc else moved)
            self.last = now

    def counts(self) -> dict[str, dict[str, int]]:
        """{cause: {category: count}} of everything charged so far."""
        self.settle()
        return {cause: dict(zip(WORK, acc, strict=True)) for cause, acc in self.by_cause.items()}


def by_exit(vm: dict[str, int], userspace: dict[str, int], counts: dict[str, dict[str, int]],
            costs: dict[str, float], by_category: dict[str, int]) -> dict[str, int]:
    """ns per exit reason (and `none`); each category's rounded total is shared out by largest
    remainder, so the values add up to cost.total_ns exactly."""
    keys = (*VM_REASONS, *USERSPACE_REASONS, NONE)
    out = dict.fromkeys(keys, 0)
    for name in DEFAULTS:
        if name in EXIT_CATEGORIES:
            amounts = vm if name == "vm_exit" else userspace
        else:
            amounts = {cause: counts.get(cause, {}).get(name, 0) for cause in keys}
        for reason, ns in apportion(by_category[name], costs[name], amounts).items():
            out[reason] += ns
    return out


def apportion(total: int, cost: float, amounts: dict[str, int]) -> dict[str, int]:
    """Integer shares of `total` in proportion to cost * amount (largest remainder)."""
    exact = {k: cost * n for k, n in amounts.items() if n}
    if not exact:
        return {}
    shares = {k: int(v) for k, v in exact.items()}
    left = total - sum(shares.values())
    for k in sorted(exact, key=lambda k: shares[k] - exact[k])[:max(0, left)]:
        shares[k] += 1
    return shares
