"""Write a deterministic SNP host ftrace log (trace-cmd report -t layout) of interleaved vCPUs
whose every operation takes a known time, and say what an import must find in it.

    python tests/gen_ftrace_log.py -o kvm.log [--vcpus 4] [--rounds 30] [--jitter 0]

Each vCPU thread ("CPU n/KVM") runs the same cycle of operations, one after another, its
timeline offset from the others so that lines interleave:

- npf: a private access to a private page: kvm_exit npf, kvm_page_fault, kvm_entry.
- implicit: a shared access to a private page: kvm_exit npf, kvm_page_fault, kvm_userspace_exit
  `error (14)` (the memory fault), the VMM's kvm_vm_set_mem_attributes, kvm_entry; then the
  retried access: kvm_exit npf, kvm_page_fault, kvm_entry (two npf rows, two latencies).
- psc: an MSR-protocol Page State Change to shared: kvm_exit vmgexit,
  kvm_vmgexit_msr_protocol_enter, kvm_userspace_exit KVM_EXIT_HYPERCALL, attributes, kvm_entry.
- ghcb_psc: a GHCB Page State Change (entries in guest memory, so no row): kvm_exit vmgexit,
  kvm_vmgexit_enter exit_reason 80000010, kvm_userspace_exit KVM_EXIT_HYPERCALL, kvm_entry.
- map_gpa: a GHCB hypercall KVM_HC_MAP_GPA_RANGE: kvm_exit vmgexit, kvm_vmgexit_enter
  exit_reason 81, kvm_hypercall nr 0xc, kvm_userspace_exit KVM_EXIT_HYPERCALL, kvm_entry.
- interrupt and hlt: exits the model does not cover: kvm_exit, kvm_entry.

Every vCPU's first line is its first kvm_entry (no exit before it); vCPU 1 starts inside a fault
(a kvm_page_fault whose kvm_exit the log missed); at the end vCPU 0 is inside an npf, vCPU 2 in a
hlt and vCPU 3 in an MSR-protocol PSC whose userspace exit is still open: none of these gets a
latency, and the import counts them as unmatched.

`generate()` returns the lines and the truth: every row the import makes (ts, kind, vCPU,
latency), every paired latency by exit reason and by vCPU, the unmatched counts, and the
per-operation durations (`Costs`) the log was built from.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from dataclasses import dataclass, field

NS = 1
US = 1000
T0 = 5_000_000_000_000  # 5000 s: the first line's raw time (ns)
PAGE = 4096
GHCB_PSC = "80000010"
GHCB_HYPERCALL = "81"


@dataclass(frozen=True)
class Costs:
    """Nanoseconds of each step; jitter adds (k * jitter) for k = 0..4, in a fixed pattern."""

    npf: int = 2_300  # kvm_exit npf to kvm_entry, fault handled in KVM
    fault_kernel: int = 1_700  # implicit: kvm_exit npf to kvm_userspace_exit
    fault_user: int = 9_100  # implicit: kvm_userspace_exit (memory fault) to kvm_entry
    retry: int = 2_900  # implicit: the retried access's kvm_exit npf to kvm_entry
    psc_kernel: int = 1_200  # vmgexit to kvm_userspace_exit (MSR-protocol PSC)
    psc_user: int = 12_400  # kvm_userspace_exit (hypercall) to kvm_entry
    ghcb_kernel: int = 1_500
    ghcb_user: int = 21_000
    map_kernel: int = 1_900
    map_user: int = 15_800
    interrupt: int = 800
    hlt: int = 48_000
    gap: int = 3_000  # guest time between two exits
    jitter: int = 0
    split: int = 0  # added to a private fault that is the first RMP update of its 2 MiB region

    @classmethod
    def from_table(cls, t: dict[str, int], jitter: int = 0) -> Costs:
        """Step times made of per-operation costs (upmtrace's cost categories) the way the
        model does the work: a private fault allocates, RMP-updates and maps a page; the VMM's
        answer to a memory fault, a PSC or a MapGPA of a fresh page is one userspace exit and
        one attribute call; the retried access allocates and maps a shared page."""
        exit_, convert = t["vm_exit"], t["userspace_exit"] + t["attribute_call"]
        return cls(npf=exit_ + t["page_allocated"] + t["rmp_update_4k"] + t["mapping_4k"],
                   fault_kernel=exit_, fault_user=convert,
                   retry=exit_ + t["page_allocated"] + t["mapping_4k"],
                   psc_kernel=exit_, psc_user=convert, map_kernel=exit_, map_user=convert,
                   ghcb_kernel=exit_, ghcb_user=convert + 4_000, split=t["directmap_split"],
                   jitter=jitter)


# a host unlike the defaults of upmtrace's cost table: what `calibrate` should find
MODEL_TABLE = {"vm_exit": 1_400, "userspace_exit": 6_200, "attribute_call": 3_100,
               "page_allocated": 700, "rmp_update_4k": 850, "mapping_4k": 180,
               "directmap_split": 16_000}

CYCLE = ("npf", "implicit", "psc", "npf", "ghcb_psc", "interrupt", "map_gpa", "hlt", "npf")


@dataclass
class Generated:
    lines: list[str] = field(default_factory=list)
    rows: list[tuple[int, str, int, int | None]] = field(default_factory=list)  # ts from T0
    exits: dict[tuple[str, str], list[int]] = field(default_factory=lambda: defaultdict(list))
    by_vcpu: dict[tuple[int, str, str], list[int]] = field(
        default_factory=lambda: defaultdict(list))
    unmatched: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    costs: Costs = field(default_factory=Costs)

    def text(self) -> str:
        return "".join(line + "\n" for line in self.lines)


class VCpu:
    """One vCPU thread's lines, in its own time order."""

    def __init__(self, index: int, out: Generated, costs: Costs) -> None:
        self.index, self.out, self.costs = index, out, costs
        self.events: list[tuple[int, str, str]] = []  # (ts, event, payload)
        self.next_page = 0x10000 * (index + 1)  # gfn
        self.step = 0
        self.regions: set[int] = set()  # 2 MiB regions with a private page

    def jitter(self) -> int:
        self.step += 1
        return ((self.step * 7 + self.index * 3) % 5) * self.costs.jitter

    def add(self, ts: int, event: str, payload: str) -> None:
        self.events.append((ts, event, payload))

    def page(self) -> int:
        self.next_page += 1
        return self.next_page * PAGE

    def paired(self, group: str, reason: str, latency: int) -> None:
        self.out.exits[(group, reason)].append(latency)
        self.out.by_vcpu[(self.index, group, reason)].append(latency)

    def row(self, ts: int, kind: str, latency: int | None) -> None:
        self.out.rows.append((ts - T0, kind, self.index, latency))

    def exit(self, ts: int, reason: str) -> None:
        self.add(ts, "kvm_exit", f"vcpu {self.index} reason {reason} rip 0xffffffff81000000 "
                 "info1 0x0000000000000000 info2 0x0000000000000000 intr_info 0x00000000 "
                 "error_code 0x00000000")

    def entry(self, ts: int) -> None:
        self.add(ts, "kvm_entry", f"vcpu {self.index}, rip 0xffffffff81000000")

    def fault(self, ts: int, gpa: int, private: bool, latency: int | None) -> None:
        code = 0x500000004 if private else 0x100000004  # bit 34: encrypted; bit 32: final
        self.add(ts, "kvm_page_fault", f"vcpu {self.index} rip 0xffffffff81000000 address "
                 f"0x{gpa:016x} error_code 0x{code:x}")
        self.row(ts, "npf", latency)

    def userspace(self, ts: int, memory_fault: bool) -> None:
        self.add(ts, "kvm_userspace_exit", "reason error (14)" if memory_fault
                 else "reason KVM_EXIT_HYPERCALL (3)")

    def attributes(self, ts: int, gpa: int, private: bool) -> None:
        self.add(ts + 100, "kvm_vm_set_mem_attributes",
                 f"0x{gpa >> 12:014x} -- 0x{(gpa >> 12) + 1:014x} [0x{8 if private else 0:x}]")

    # --- operations: each returns the time it ends ------------------------------------------

    def npf(self, t: int) -> int:
        latency = self.costs.npf + self.jitter()
        gpa = self.page()
        if gpa >> 21 not in self.regions:  # the first private page of its 2 MiB region
            self.regions.add(gpa >> 21)
            latency += self.costs.split
        self.exit(t, "npf")
        self.fault(t + 200, gpa, True, latency)
        self.entry(t + latency)
        self.paired("vm", "npf", latency)
        return t + latency

    def implicit(self, t: int) -> int:
        c = self.costs
        kernel, user, retry = c.fault_kernel + self.jitter(), c.fault_user + self.jitter(), \
            c.retry + self.jitter()
        gpa = self.page()
        self.exit(t, "npf")
        self.fault(t + 200, gpa, False, kernel + user)
        self.userspace(t + kernel, True)
        self.attributes(t + kernel, gpa, False)
        self.entry(t + kernel + user)
        self.paired("vm", "npf", kernel + user)
        self.paired("userspace", "KVM_EXIT_MEMORY_FAULT", user)
        t2 = t + kernel + user + c.gap
        self.exit(t2, "npf")
        self.fault(t2 + 200, gpa, False, retry)
        self.entry(t2 + retry)
        self.paired("vm", "npf", retry)
        return t2 + retry

    def psc(self, t: int, open_at_end: bool = False) -> int:
        c = self.costs
        kernel, user = c.psc_kernel + self.jitter(), c.psc_user + self.jitter()
        gpa = self.page()
        self.exit(t, "vmgexit")
        msr = (2 << 52) | gpa | 0x014
        self.add(t + 100, "kvm_vmgexit_msr_protocol_enter", f"vcpu {self.index}, ghcb_gpa "
                 f"{msr:016x}")
        self.row(t + 100, "psc", None if open_at_end else kernel + user)
        self.userspace(t + kernel, False)
        if open_at_end:
            self.out.unmatched["vm.vmgexit"] += 1
            self.out.unmatched["userspace.KVM_EXIT_HYPERCALL"] += 1
            return t + kernel
        self.attributes(t + kernel, gpa, False)
        self.entry(t + kernel + user)
        self.paired("vm", "vmgexit", kernel + user)
        self.paired("userspace", "KVM_EXIT_HYPERCALL", user)
        return t + kernel + user

    def ghcb_psc(self, t: int) -> int:
        c = self.costs
        kernel, user = c.ghcb_kernel + self.jitter(), c.ghcb_user + self.jitter()
        self.exit(t, "vmgexit")
        self.add(t + 100, "kvm_vmgexit_enter", f"vcpu {self.index}, exit_reason {GHCB_PSC}, "
                 "exit_info1 0, exit_info2 0")
        self.userspace(t + kernel, False)
        self.entry(t + kernel + user)
        self.paired("vm", "vmgexit", kernel + user)
        self.paired("userspace", "KVM_EXIT_HYPERCALL", user)
        return t + kernel + user

    def map_gpa(self, t: int) -> int:
        c = self.costs
        kernel, user = c.map_kernel + self.jitter(), c.map_user + self.jitter()
        gpa = self.page()
        self.exit(t, "vmgexit")
        self.add(t + 100, "kvm_vmgexit_enter", f"vcpu {self.index}, exit_reason "
                 f"{GHCB_HYPERCALL}, exit_info1 0, exit_info2 0")
        self.add(t + 200, "kvm_hypercall", f"nr 0xc a0 0x{gpa:x} a1 0x1 a2 0x0 a3 0x0")
        self.row(t + 200, "map_gpa", kernel + user)
        self.userspace(t + kernel, False)
        self.entry(t + kernel + user)
        self.paired("vm", "vmgexit", kernel + user)
        self.paired("userspace", "KVM_EXIT_HYPERCALL", user)
        return t + kernel + user

    def simple(self, t: int, reason: str, cost: int) -> int:
        latency = cost + self.jitter()
        self.exit(t, reason)
        self.entry(t + latency)
        self.paired("vm_other", reason, latency)
        return t + latency

    def interrupt(self, t: int) -> int:
        return self.simple(t, "interrupt", self.costs.interrupt)

    def hlt(self, t: int) -> int:
        return self.simple(t, "hlt", self.costs.hlt)


def generate(vcpus: int = 4, rounds: int = 30, costs: Costs | None = None) -> Generated:
    """The log and its truth (see the module docstring); vcpus >= 4."""
    costs = costs or Costs()
    out = Generated(costs=costs)
    cpus = [VCpu(i, out, costs) for i in range(vcpus)]
    for cpu in cpus:
        t = T0 + cpu.index * 1_100
        if cpu.index == 1:  # the log begins inside a fault: no kvm_exit, so no latency
            gpa = cpu.page()
            cpu.regions.add(gpa >> 21)
            cpu.fault(t, gpa, True, None)
            t += 400
        cpu.entry(t)  # the first KVM_RUN (or the end of an exit the log missed)
        out.unmatched["entries_without_exit"] += 1
        t += costs.gap
        for _ in range(rounds):
            for op in CYCLE:
                t = getattr(cpu, op)(t) + costs.gap
        if cpu.index == 0:  # inside an npf when the log ends
            cpu.exit(t, "npf")
            cpu.fault(t + 200, cpu.page(), True, None)
            out.unmatched["vm.npf"] += 1
        elif cpu.index == 2:
            cpu.exit(t, "hlt")
            out.unmatched["vm_other.hlt"] += 1
        elif cpu.index == 3:
            cpu.psc(t, open_at_end=True)
    merged = sorted((ts, cpu.index, n, event, payload) for cpu in cpus
                    for n, (ts, event, payload) in enumerate(cpu.events))
    out.lines = ["# tracer: nop", "#"] + [line(*item) for item in merged]
    out.rows.sort(key=lambda r: (r[0], r[2]))
    return out


def line(ts: int, vcpu: int, _n: int, event: str, payload: str) -> str:
    flags = "d...." if event in ("kvm_exit", "kvm_entry") else "....."
    comm = f"CPU {vcpu}/KVM-{7300 + vcpu}"
    return (f"{comm:>24} [{10 + vcpu:03d}] {flags} {ts // 10**9}.{ts % 10**9:09d}: "
            f"{event}: {payload}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-o", "--output", required=True)
    parser.add_argument("--vcpus", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--jitter", type=int, default=0, help="ns added in a fixed pattern")
    parser.add_argument("--model-costs", action="store_true",
                        help="build the step times from MODEL_TABLE, a per-operation cost table "
                             "(Costs.from_table), so that calibrate can recover it")
    args = parser.parse_args()
    costs = Costs.from_table(MODEL_TABLE, args.jitter) if args.model_costs \
        else Costs(jitter=args.jitter)
    generated = generate(max(4, args.vcpus), args.rounds, costs)
    with open(args.output, "w") as f:
        f.write(generated.text())


if __name__ == "__main__":
    main()
