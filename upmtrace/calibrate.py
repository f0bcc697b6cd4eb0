"""`upmtrace calibrate`: fit the cost table to a recording's exit latencies (docs/recording.md).

Each timed VM exit of the trace (a latency on its row) is one sample: its latency against the
work the model says it did under `eager` (its exit, the userspace exit it caused, allocation,
RMP updates, mappings, conversions: the deltas of the cost counters over its event). An implicit
conversion is two npf rows in a recording (the fault, whose latency includes the VMM's
conversion, and the retried access) while the model does all of it on the first: the two are
paired (the vCPU's next npf row on the same page) and fitted as one sample. Userspace exits
carry no row: when every VM exit of the reason that causes them is timed on a row, their
recorded mean adds one equation each. Per exit reason, the sum of its samples is weighted
heavily, so that the fit reproduces each reason's recorded total.

Figures no timed exit exercises keep their defaults; figures used in fewer than MIN_SAMPLES
samples are held at their defaults; figures that every sample uses in the same proportion (only
their sum is determined) are fitted as one sum and split in the ratio of their defaults; a
figure that is a linear combination of others in this recording is held at its default. The
rest is a non-negative least-squares fit.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from upmtrace.attribution import WORK, inclusive, work
from upmtrace.costs import DEFAULTS, default_costs
from upmtrace.engine import replay
from upmtrace.engine.reference import Engine, batch_rows_of
from upmtrace.errors import InputError
from upmtrace.policy import PRESETS
from upmtrace.timing import HYPERCALL_EXIT, collect, row_reason
from upmtrace.trace.schema import PAGE_SHIFT, Platform

NAMES = tuple(DEFAULTS)  # vm_exit, userspace_exit, then WORK
MIN_SAMPLES = 10  # a figure seen in fewer timed exits is not fitted
RULE_SAMPLES, RULE_PCT = 100, 5.0  # the reproduction rule
WEIGHT = 30.0  # weight of a reason's total against one sample
MF, HC = "KVM_EXIT_MEMORY_FAULT", "KVM_EXIT_HYPERCALL"


class Tracer(Engine):
    """The reference loop, keeping each event's cost-counter deltas by row index."""

    def __init__(self, platform: Platform) -> None:
        super().__init__(PRESETS["eager"], platform)
        self.deltas: dict[int, np.ndarray] = {}
        self.current: int | None = None
        self.last = self.vector()

    def vector(self) -> np.ndarray:
        c = self.count
        vm = sum(c[f"exits.vm.{r}"] for r in ("npf", "vmgexit", "tdvmcall", "vmcall"))
        return np.array((vm, c[f"exits.userspace.{MF}"] + c[f"exits.userspace.{HC}"],
                         *work(self.m)), dtype=float)

    def psc(self, request) -> None:
        self.current = self.events - len(request)  # the request's first row
        super().psc(request)

    def event_done(self, _: None = None) -> None:
        super().event_done()
        now = self.vector()
        index = self.events - 1 if self.current is None else self.current
        self.deltas[index] = now - self.last
        self.last, self.current = now, None


@dataclass
class Sample:
    reason: str
    latency: int
    work: np.ndarray


@dataclass
class Fit:
    costs: dict[str, float]
    status: dict[str, str]  # name -> how it was obtained (for the TOML comments)
    samples: int
    notes: list[str] = field(default_factory=list)
    check: list[dict] = field(default_factory=list)


def samples_of(trace, platform: Platform, tracer: Tracer, notes: list[str]) -> list[Sample]:
    cols = trace.table.select(["kind", "vcpu", "gpa", "latency"]).to_pydict()
    kinds, vcpus, gpas, lats = cols["kind"], cols["vcpu"], cols["gpa"], cols["latency"]
    next_npf: dict[int, int] = {}  # row -> the same vCPU's next npf row
    last: dict[int, int] = {}
    for i in range(len(kinds) - 1, -1, -1):
        if kinds[i] == "npf":
            if vcpus[i] in last:
                next_npf[i] = last[vcpus[i]]
            last[vcpus[i]] = i
    out, used, avoided, unpaired = [], set(), 0, 0
    for i, (kind, lat) in enumerate(zip(kinds, lats, strict=True)):
        reason = row_reason(kind, platform)
        if lat is None or reason is None or i in used or i not in tracer.deltas:
            continue
        delta = tracer.deltas[i]
        if not delta[0]:
            avoided += 1  # a fault the model says would not happen: nothing to compare
            continue
        if kind == "npf" and delta[1]:  # a memory-fault exit: pair it with its retry
            j = next_npf.get(i)
            if j is None or lats[j] is None or gpas[j] >> PAGE_SHIFT != gpas[i] >> PAGE_SHIFT:
                unpaired += 1
                continue
            used.add(j)
            delta, lat = delta + tracer.deltas.get(j, 0), lat + lats[j]
        out.append(Sample(reason[1], lat, delta))
    if avoided:
        notes.append(f"{avoided} timed faults the model says would not happen were left out")
    if unpaired:
        notes.append(f"{unpaired} memory-fault exits without a timed retry were left out")
    return out


def calibrate(trace, platform: str | None = None) -> Fit:
    plat = Platform(platform or trace.platform)
    recorded = trace.recorded or {}
    collected = collect(trace, plat, recorded, events=False)
    if not collected.exits:
        raise InputError("the trace carries no exit latencies: nothing to calibrate "
                         "(import a log recorded with kvm_exit and kvm_entry)", path=trace.path)
    tracer = Tracer(plat)
    batches = trace.batches(262_144)
    tracer.run(row for batch in batches for row in batch_rows_of(batch))
    notes: list[str] = []
    samples = samples_of(trace, plat, tracer, notes)
    rows, target, weights, counts = [], [], [], np.zeros(len(NAMES))
    for s in samples:
        rows.append(s.work)
        target.append(s.latency)
        weights.append(1.0)
        counts += s.work != 0
    for reason in sorted({s.reason for s in samples}):
        mine = [s for s in samples if s.reason == reason]
        rows.append(sum(s.work for s in mine))
        target.append(sum(s.latency for s in mine))
        weights.append(WEIGHT / np.sqrt(len(mine)))
    rowless = ((recorded.get("latency") or {}).get("exits") or {}).get("vm") or {}
    ledger = tracer.ledger.counts()
    for user, parent in ((MF, "npf"), (HC, HYPERCALL_EXIT[plat])):
        dist, n = collected.exits.get(("userspace", user)), tracer.count[f"exits.userspace.{user}"]
        if dist is None or not dist.count or not n:
            continue
        if (rowless.get(parent) or {}).get("count"):
            notes.append(f"{user}: its recorded time includes exits of {parent} that have no "
                         "row (the model does not replay them): not used")
            continue
        spent = ledger.get(user, {})
        rows.append(np.array([0, n, *(spent.get(w, 0) for w in WORK)], dtype=float))
        target.append(dist.total * n / dist.count)
        weights.append(WEIGHT / np.sqrt(dist.count))
    fit = solve(np.array(rows), np.array(target, dtype=float), np.array(weights), counts,
                len(samples))
    fit.samples, fit.notes = len(samples), notes + fit.notes
    fitted = replay(trace, PRESETS["eager"], platform=plat.value, costs=fit.costs).report
    fit.check = reproduction(fitted, recorded)
    return fit


def solve(x: np.ndarray, y: np.ndarray, w: np.ndarray, counts: np.ndarray, n: int) -> Fit:
    """The weighted fit; the first n rows are the samples, the rest the reasons' totals."""
    defaults = default_costs()
    costs: dict[str, float] = {n: float(v) for n, v in defaults.items()}
    status: dict[str, str] = {}
    free = []
    for i, name in enumerate(NAMES):
        if not counts[i]:
            status[name] = "default: no timed exit in this trace does this"
        elif counts[i] < MIN_SAMPLES:
            status[name] = f"default: only {int(counts[i])} timed exits do this (fewer than " \
                           f"{MIN_SAMPLES})"
        else:
            free.append(i)
    groups = proportional(x, free)
    notes: list[str] = []
    while True:
        design = np.column_stack([x[:, g] @ np.array([defaults[NAMES[i]] for i in g])
                                  for g in groups]) if groups else np.zeros((len(y), 0))
        held = [i for i in range(len(NAMES)) if all(i not in g for g in groups)]
        rest = y - x[:, held] @ np.array([costs[NAMES[i]] for i in held])
        if not groups or np.linalg.matrix_rank(design * w[:, None]) == len(groups):
            break
        null = np.linalg.svd(design * w[:, None])[2][-1]
        drop = min((k for k in range(len(groups)) if abs(null[k]) > 1e-9),
                   key=lambda k: (counts[groups[k][0]], -k))
        for i in groups[drop]:
            status[NAMES[i]] = "default: in this trace it is a combination of other figures"
        groups.pop(drop)
    scale = nnls(design * w[:, None], rest * w) if groups else np.zeros(0)
    for g, s in zip(groups, scale, strict=True):
        for i in g:
            costs[NAMES[i]] = s * defaults[NAMES[i]]
    for g in groups:
        label = " + ".join(NAMES[i] for i in g)
        total = sum(costs[NAMES[i]] for i in g)
        resid = (y - x @ np.array([costs[c] for c in NAMES]))[:n][x[:n, g[0]] != 0]
        basis = f"{int(counts[g[0]])} timed exits, rms residual {np.sqrt(np.mean(resid**2)):.0f} ns"
        for i in g:
            status[NAMES[i]] = f"fitted: {basis}" if len(g) == 1 else \
                f"fitted as the sum {label} = {total:.0f} ({basis}): every exit that does one " \
                "does the others as often, so only the sum is determined; split in the ratio " \
                "of the defaults"
    return Fit(costs, status, 0, notes)


def proportional(x: np.ndarray, free: list[int]) -> list[list[int]]:
    """The free columns grouped where one is a constant multiple of another."""
    groups: list[list[int]] = []
    for i in free:
        for g in groups:
            a, b = x[:, g[0]], x[:, i]
            k = b[a != 0][0] / a[a != 0][0] if (a != 0).any() else 0
            if ((a != 0) == (b != 0)).all() and np.allclose(b, k * a, rtol=1e-9):
                g.append(i)
                break
        else:
            groups.append([i])
    return groups


def nnls(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """min |a x - b| subject to x >= 0 (Lawson and Hanson), columns scaled to unit norm."""
    norms = np.linalg.norm(a, axis=0)
    norms[norms == 0] = 1
    a = a / norms
    n = a.shape[1]
    x, passive = np.zeros(n), np.zeros(n, dtype=bool)
    tol = 1e-12 * max(1.0, float(np.abs(a.T @ b).max(initial=0)))
    for _ in range(3 * n + 10):
        grad = a.T @ (b - a @ x)
        if passive.all() or grad[~passive].max() <= tol:
            break
        passive[np.argmax(np.where(passive, -np.inf, grad))] = True
        while True:
            z = np.zeros(n)
            z[passive] = np.linalg.lstsq(a[:, passive], b, rcond=None)[0]
            if (z[passive] > 0).all():
                x = z
                break
            neg = passive & (z <= 0)
            alpha = np.min(x[neg] / (x[neg] - z[neg]))
            x = x + alpha * (z - x)
            passive &= x > tol
            x[~passive] = 0
    return x / norms


def reproduction(report: dict, recorded: dict | None) -> list[dict]:
    """Per exit reason: the recorded time of the exits the model replays beside the estimate.

    A VM exit's recorded latency includes the userspace exits it caused, so its estimate is its
    cost.by_exit plus that of the userspace exits nested in it (KVM_EXIT_MEMORY_FAULT in npf,
    KVM_EXIT_HYPERCALL in the platform's hypercall exit); exits timed without a row (recorded
    metadata) are exits the model does not replay and are left out of the VM reasons; a
    userspace reason whose parent has such exits cannot be compared. Estimates are scaled to the
    number of recorded samples (the model also counts exits the log cut)."""
    timing, by_exit = report.get("timing") or {}, report["cost"]["by_exit"]
    exits = report["exits"]
    plat = Platform(report["trace"]["platform"])
    parent = {MF: "npf", HC: HYPERCALL_EXIT[plat]}
    rowless = (((recorded or {}).get("latency") or {}).get("exits") or {}).get("vm") or {}
    out = []
    for group in ("vm", "userspace"):
        for reason, stats in (timing.get(group) or {}).items():
            count, total = stats["count"], stats["total_ns"]
            entry = {"group": group, "reason": reason, "model_exits": exits[group].get(reason, 0)}
            if group == "vm":
                extra = rowless.get(reason) or {}
                count, total = count - extra.get("count", 0), total - extra.get("total_ns", 0)
                estimate = inclusive(report, reason)
            else:
                estimate = by_exit.get(reason, 0)
                if (rowless.get(parent[reason]) or {}).get("count"):
                    entry["note"] = (f"includes {parent[reason]} exits without a row, which the "
                                     "model does not replay: not comparable")
            entry |= {"samples": count, "recorded_ns": total}
            if count and entry["model_exits"] and "note" not in entry:
                est = estimate * count / entry["model_exits"]
                entry |= {"estimated_ns": round(est),
                          "error_pct": round(100 * (est - total) / total, 2) if total else 0.0}
            out.append(entry)
    return out


def meets_rule(check: list[dict]) -> bool:
    return all(abs(e.get("error_pct", 0)) <= RULE_PCT for e in check
               if e["samples"] >= RULE_SAMPLES and "note" not in e)


def to_toml(fit: Fit, trace_path: str, sha256: str | None) -> str:
    """The cost file: every figure, each with where it comes from."""
    lines = ["# upmtrace cost table calibrated from a recording (upmtrace calibrate)",
             f"# trace: {trace_path}" + (f" (sha256 {sha256})" if sha256 else ""),
             f"# {fit.samples} timed exits fitted (implicit conversions paired with their "
             "retried access); ns per operation"]
    lines += [f"# note: {note}" for note in fit.notes]
    for name in NAMES:
        status = fit.status[name]
        value = round(fit.costs[name])
        if status.startswith("default"):
            status += f" (basis of the default: {DEFAULTS[name][2]})"
        lines.append(f"{name} = {value}  # {status}")
    return "\n".join(lines) + "\n"


def summary(fit: Fit, out: str) -> str:
    """What was fitted and the check per exit reason, as plain text."""
    lines = [f"{fit.samples} timed exits fitted; cost table written to "
             f"{'stdout' if out == '-' else out}"]
    for name in NAMES:
        state = fit.status[name].split(":")[0]
        lines.append(f"  {name:<18} {round(fit.costs[name]):>8} ns  {state}")
    lines += [f"note: {note}" for note in fit.notes]
    lines.append("replayed under eager with it (recorded time of the timed exits vs estimate):")
    for e in fit.check:
        if "estimated_ns" in e:
            rule = "" if e["samples"] < RULE_SAMPLES else \
                ("  ok" if abs(e["error_pct"]) <= RULE_PCT else f"  over {RULE_PCT:g} %")
            lines.append(f"  {e['reason']:<22} {e['samples']:>7} samples  recorded "
                         f"{e['recorded_ns']:>12,} ns  estimated {e['estimated_ns']:>12,} ns  "
                         f"{e['error_pct']:+.1f} %{rule}")
        else:
            lines.append(f"  {e['reason']:<22} {e['samples']:>7} samples  "
                         f"{e.get('note', 'nothing to compare')}")
    return "\n".join(lines) + "\n"
