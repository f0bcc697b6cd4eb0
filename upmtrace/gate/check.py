"""The CI gate behind `upmtrace check`: which guarded metrics regressed against a baseline.

A metric regresses when it grows beyond the tolerance: now > baseline * (1 + tolerance/100),
computed exactly (a metric that was 0 and is now above 0 regresses at any tolerance).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Literal

from upmtrace.atomic import write_text
from upmtrace.engine import Result, replay
from upmtrace.errors import InputError, UpmtraceError, UsageError
from upmtrace.gate.baseline import Baseline, read_baseline
from upmtrace.policy import PRESETS, Policy, load_policy, parse_overrides
from upmtrace.trace.io import read_trace

DEFAULT_METRICS = ("exits",)  # every key under exits: userspace and VM, totals included

Watch = Callable[[Any], AbstractContextManager]  # trace -> a context giving the trace to replay
Status = Literal["ok", "improved", "within", "regressed"]


@dataclass(frozen=True)
class GateOptions:
    """The options `check` and `fleet check` share, resolved once."""

    baseline: str
    overrides: tuple[str, ...] = ()  # --set KEY=VALUE items
    costs: dict[str, int] | None = None
    platform: str | None = None
    tolerance: Fraction | None = None  # None: the baseline's
    metrics: tuple[str, ...] = ()  # empty: the baseline's
    allow_trace_change: bool = False


@dataclass(frozen=True)
class Request(GateOptions):
    """The `check` options."""

    policy_spec: str | None = None


@dataclass(frozen=True)
class Verdict:
    metric: str
    baseline: int | float
    now: int | float
    status: Status

    @property
    def delta(self) -> int | float:
        return self.now - self.baseline


@dataclass(frozen=True)
class TraceDelta:
    """One fleet trace's share of a regressed total: its value then (None: not in the
    baseline) and now."""

    metric: str  # the verdict's metric: "policy:key"
    trace: str
    baseline: int | None
    now: int

    @property
    def delta(self) -> int:
        return self.now - (self.baseline or 0)


@dataclass(frozen=True)
class Outcome:
    """A check: one verdict per guarded metric, and what was compared."""

    verdicts: tuple[Verdict, ...]
    tolerance: Fraction
    policy: str
    baseline: str
    trace: str
    trace_changed: bool = False
    knob_changes: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    traces: tuple[TraceDelta, ...] = ()  # fleet check: the traces behind each regression

    @property
    def regressions(self) -> list[Verdict]:
        return [v for v in self.verdicts if v.status == "regressed"]


# --- the comparison (pure) ----------------------------------------------------------------


def status(old: int | float, new: int | float, tolerance: Fraction) -> Status:
    if exact(new) * 100 > exact(old) * (100 + tolerance):
        return "regressed"
    if new == old:
        return "ok"
    return "improved" if new < old else "within"


def exact(value: int | float) -> Fraction:
    """A report number as the decimal it is written as (0.55 is 55/100, not the float)."""
    return Fraction(value) if isinstance(value, int) else Fraction(repr(value))


def evaluate(baseline: Result, now: Result, metrics: tuple[str, ...],
             tolerance: Fraction) -> tuple[Verdict, ...]:
    verdicts = []
    for key in metrics:
        old, new = number(baseline, key, "the baseline"), number(now, key, "this replay")
        verdicts.append(Verdict(key, old, new, status(old, new, tolerance)))
    return tuple(verdicts)


def number(result: Result, key: str, where: str) -> int | float:
    try:
        value = result.get(key)
    except (KeyError, TypeError):
        raise InputError(f"guarded metric {key!r} is not in {where}'s report") from None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InputError(f"guarded metric {key!r} is not a number in {where}'s report")
    return value


def expand_metrics(report: dict, keys: tuple[str, ...]) -> tuple[str, ...]:
    """--metric keys to numeric leaves: a section ('exits', 'memory') stands for all under it."""
    leaves: list[str] = []
    for key in keys:
        try:
            node = Result(report).get(key)
        except (KeyError, TypeError):
            raise UsageError(f"--metric {key!r}: no such key in the report "
                             "(keys are dotted, e.g. exits.vm.npf or memory)") from None
        found = _leaves(node, key)
        if not found:
            raise UsageError(f"--metric {key!r}: not a number in the report")
        leaves += [k for k in found if k not in leaves]
    return tuple(leaves)


def _leaves(node: Any, key: str) -> list[str]:
    if isinstance(node, dict):
        return [leaf for k, v in node.items() for leaf in _leaves(v, f"{key}.{k}")]
    return [] if isinstance(node, bool) or not isinstance(node, int | float) else [key]


# --- the command (reads the baseline and the trace, replays) ------------------------------


def check(trace_path: str, request: Request, watch: Watch = nullcontext) -> Outcome:
    """Replay the trace as the baseline was and compare the guarded metrics.

    `watch(trace)` wraps the replay (the CLI's progress bar)."""
    base = read_baseline(request.baseline)
    trace = read_trace(trace_path)
    changed = trace.sha256 != base.sha256
    if changed and not request.allow_trace_change:
        raise UpmtraceError(
            f"{trace_path}: sha256 {trace.sha256[:12]} is not the baseline's "
            f"{str(base.sha256)[:12]} ({request.baseline}); pass --allow-trace-change to accept "
            "a new trace, or --update to re-baseline")
    platform = request.platform or trace.platform.value
    if platform != base.platform:
        raise UpmtraceError(f"{trace_path}: platform {platform} is not the baseline's "
                            f"{base.platform} ({request.baseline}); pass --platform "
                            f"{base.platform}, or --update to re-baseline")
    policy = _policy(request, base)
    with watch(trace) as watched:
        result = replay(watched, policy, platform=platform, costs=request.costs)
    metrics = (expand_metrics(result.report, request.metrics) if request.metrics
               else base.metrics)
    tolerance = base.tolerance if request.tolerance is None else request.tolerance
    before = base.result.report["policy"]
    knobs = {k: (before.get(k), v) for k, v in policy.knobs().items() if before.get(k) != v}
    try:
        verdicts = evaluate(base.result, result, metrics, tolerance)
    except InputError as err:
        raise InputError(str(err), path=request.baseline) from None
    return Outcome(verdicts, tolerance, policy.name, request.baseline, trace_path, changed, knobs)


def _policy(request: Request, base: Baseline) -> Policy:
    """The guarded policy; --set edits its knobs and keeps its name, like an edited TOML file."""
    edits = parse_overrides(request.overrides)
    if request.policy_spec is None:
        return base.policy().with_overrides(edits)
    policy = load_policy(request.policy_spec)
    expected = base.result.report["policy"]["name"]
    if policy.name != expected:
        raise UpmtraceError(
            f"--policy {policy.name!r} is not the baseline's policy {expected!r} "
            f"({request.baseline}); compare policies with `upmtrace compare`, or --update to "
            "re-baseline")
    return policy.with_overrides(edits)


def update(trace_path: str, request: Request, watch: Watch = nullcontext) -> Baseline:
    """Replay and write the baseline atomically; an existing one lends its policy and guard."""
    try:
        old: Baseline | None = read_baseline(request.baseline)
    except InputError:
        old = None  # missing or broken: --update is how it gets replaced
    if request.policy_spec is not None:
        policy = load_policy(request.policy_spec, request.overrides)
    else:
        policy = (old.policy() if old else PRESETS["eager"]).with_sets(request.overrides)
    with watch(read_trace(trace_path)) as trace:
        result = replay(trace, policy, platform=request.platform, costs=request.costs)
    wanted = request.metrics or (old.metrics if old else DEFAULT_METRICS)
    tolerance = request.tolerance if request.tolerance is not None else (
        old.tolerance if old else Fraction(0))
    baseline = Baseline(expand_metrics(result.report, wanted), tolerance, result,
                        request.baseline)
    write_text(request.baseline, baseline.to_json(), make_parents=True)
    return baseline
