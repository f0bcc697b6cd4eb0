"""Exit latencies: each kvm_exit paired with the next kvm_entry of the same vCPU thread.

This is how `perf kvm stat` measures an exit. Lines of different vCPUs interleave; pairing is per
thread (a vCPU is one thread; numbering vCPUs by thread also keeps two VMs in one log apart).

- A VM exit's latency runs from its kvm_exit to the thread's next kvm_entry, so it includes any
  userspace exit it caused. It is stored on the first row the exit produced (the npf row of a
  fault, the psc row of an MSR-protocol request, the map_gpa row of a hypercall); an exit that
  produced no row (hlt, interrupt, msr, io, a GHCB request whose entries are in guest memory...)
  goes to the recorded distributions (`recorded.latency`), never dropped.
- A userspace exit's latency runs from its kvm_userspace_exit to the thread's next kvm_entry (or
  to its next kvm_userspace_exit, when KVM_RUN returned again without entering, e.g. `restart`):
  it is the time the VMM held the vCPU. Userspace exits have no rows: their latencies go to the
  recorded distributions, by exit name.
- Not guessed: an exit (VM or userspace) still waiting for its entry when the log ends, or
  followed by another kvm_exit of the same thread (its entry was lost), is counted in
  `exits_unmatched` by reason; a kvm_entry with no kvm_exit before it (the log began while
  the vCPU was out of the guest, or its first KVM_RUN) is counted as
  `exits_unmatched.entries_without_exit`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from upmtrace.trace.importers.common import RowSink
from upmtrace.trace.latency import Distribution

Reason = tuple[str, str]  # (group, name): ("vm", "npf"), ("vm_other", "hlt"), ("userspace", ...)


@dataclass
class Thread:
    vcpu: int
    exit_ts: int | None = None
    reason: Reason | None = None
    row: list | None = None
    user_ts: int | None = None
    user: Reason | None = None


class Pairing:
    """Per-thread exit state, the recorded distributions and the unmatched counts."""

    def __init__(self, sink: RowSink, recorded: Counter[str]) -> None:
        self.sink = sink
        self.recorded = recorded
        self.threads: dict[str, Thread] = {}
        self.exits: dict[Reason, Distribution] = {}  # latencies not stored on a row
        self.by_vcpu: dict[tuple[int, str, str], Distribution] = {}
        self.paired = 0
        self.released = 0  # rows written before their entry came (latency lost)

    def thread(self, tid: str, vcpu: int) -> Thread:
        state = self.threads.get(tid)
        if state is None:
            state = self.threads[tid] = Thread(vcpu)
        return state

    def vcpu(self, tid: str) -> int | None:
        """The vCPU a thread's kvm_exit/kvm_entry lines named, if any."""
        state = self.threads.get(tid)
        return None if state is None else state.vcpu

    def exit(self, tid: str, ts: int, vcpu: int, reason: Reason) -> None:
        state = self.thread(tid, vcpu)
        self.unmatched(state)
        state.vcpu, state.exit_ts, state.reason = vcpu, ts, reason

    def claims(self, tid: str) -> bool:
        """Whether the thread's next row is the first its current exit produced (the row that
        carries the exit's latency: it waits for the entry)."""
        state = self.threads.get(tid)
        return state is not None and state.exit_ts is not None and state.row is None

    def row(self, tid: str, row: list) -> None:
        """The row claimed by the thread's current exit."""
        self.threads[tid].row = row

    def userspace(self, tid: str, ts: int, vcpu: int, reason: Reason) -> None:
        state = self.thread(tid, vcpu)
        if state.user is not None:  # KVM_RUN returned again without entering the guest
            self.record(state.user, state.vcpu, ts - state.user_ts)
        state.user_ts, state.user = ts, reason

    def entry(self, tid: str, ts: int, vcpu: int) -> None:
        state = self.thread(tid, vcpu)
        state.vcpu = vcpu
        if state.user is not None:
            self.record(state.user, vcpu, ts - state.user_ts)
            state.user = state.user_ts = None
        if state.exit_ts is None:
            self.recorded["exits_unmatched.entries_without_exit"] += 1
            return
        latency = ts - state.exit_ts
        self.paired += 1
        if state.row is None:
            self.record(state.reason, vcpu, latency)
        elif not self.sink.resolve(state.row, latency):
            self.released += 1
        state.exit_ts = state.reason = state.row = None

    def record(self, reason: Reason, vcpu: int, latency: int) -> None:
        dist = self.exits.get(reason)
        if dist is None:
            dist = self.exits[reason] = Distribution()
        dist.add(latency)
        key = (vcpu, *reason)
        per_vcpu = self.by_vcpu.get(key)
        if per_vcpu is None:
            per_vcpu = self.by_vcpu[key] = Distribution()
        per_vcpu.add(latency)

    def unmatched(self, state: Thread) -> None:
        """Count the thread's open exits as unmatched (their rows keep no latency)."""
        if state.exit_ts is not None:
            self.recorded[f"exits_unmatched.{state.reason[0]}.{state.reason[1]}"] += 1
            if state.row is not None:
                self.sink.resolve(state.row, None)
        if state.user is not None:
            self.recorded[f"exits_unmatched.{state.user[0]}.{state.user[1]}"] += 1
        state.exit_ts = state.reason = state.row = state.user = state.user_ts = None

    def end(self) -> None:
        """The end of a log: every open exit is unmatched."""
        for state in self.threads.values():
            self.unmatched(state)
        self.threads.clear()

    def tree(self) -> dict:
        """The recorded `latency` object: distributions by reason, summaries by vCPU."""
        if not self.exits:
            return {}
        exits: dict = {}
        for (group, name), dist in sorted(self.exits.items()):
            exits.setdefault(group, {})[name] = dist.to_json()
        by_vcpu: dict = {}
        for (vcpu, group, name), dist in sorted(self.by_vcpu.items()):
            by_vcpu.setdefault(str(vcpu), {}).setdefault(group, {})[name] = dist.summary()
        return {"exits": exits, "by_vcpu": by_vcpu}
