"""Building small traces by hand and checking every counter a replay produces."""

from __future__ import annotations

import os

import pyarrow as pa
from hypothesis import settings

from upmtrace.engine.reference import Engine, Result, iter_rows
from upmtrace.policy import PRESETS
from upmtrace.trace.schema import SCHEMA, Platform

K, M = 1 << 10, 1 << 20

# every integer counter of the report, by section, outside memory/cost/trace/policy
COUNTER_GROUPS = ("exits", "npf", "conversions", "psc", "gmem", "rmp", "directmap", "mappings",
                  "host_access", "populate", "vfio")


def examples(default: int) -> int:
    """A property test's example count: `default`, or the count of the profile UPMTRACE_FUZZ
    selects (tests/conftest.py: `long` runs many more, `mutation` a fixed few)."""
    return settings().max_examples if os.environ.get("UPMTRACE_FUZZ") else default


class Reach:
    """How many of a property's examples reached its end: `examples` is counted where an example
    starts, `replayed` where it got through the engine."""

    def __init__(self) -> None:
        self.examples = self.replayed = 0

    def run(self, prop) -> None:
        """Run the @given function `prop` (all its examples) and fail if fewer than 80 % of them
        got through: a generator that stopped making replayable traces would leave it vacuous.
        One test does both, so the count never depends on which tests ran before in the same
        process (pytest-xdist spreads tests over processes)."""
        self.examples = self.replayed = 0
        prop()
        assert self.examples >= 1 and self.replayed >= 0.8 * self.examples, vars(self)


def table(*rows: dict) -> pa.Table:
    full = [{name: None for name in SCHEMA.names} | {"ts": i} | row for i, row in enumerate(rows)]
    return pa.Table.from_pylist(full, schema=SCHEMA)


def memslot(slot: int, gpa: int, size: int, gmem: bool = True) -> dict:
    return {"kind": "memslot", "vcpu": -1, "slot": slot, "gpa": gpa, "size": size, "gmem": gmem}


def attrs(gpa: int, size: int, private: bool = True) -> dict:
    return {"kind": "set_attributes", "vcpu": -1, "gpa": gpa, "size": size, "private": private}


def npf(gpa: int, private: bool, vcpu: int = 0, write: bool = True) -> dict:
    return {"kind": "npf", "vcpu": vcpu, "gpa": gpa, "private": private, "write": write}


def psc(gpa: int, size: int, op: str, req: int = 1, vcpu: int = 0) -> dict:
    return {"kind": "psc", "vcpu": vcpu, "req": req, "gpa": gpa, "size": size, "op": op}


def map_gpa(gpa: int, size: int, private: bool, vcpu: int = 0) -> dict:
    return {"kind": "map_gpa", "vcpu": vcpu, "gpa": gpa, "size": size, "private": private}


def host(gpa: int, size: int, write: bool = True, agent: str = "virtio") -> dict:
    return {"kind": "host_access", "vcpu": -1, "gpa": gpa, "size": size, "write": write,
            "agent": agent}


def populate(gpa: int, size: int) -> dict:
    return {"kind": "populate", "vcpu": -1, "gpa": gpa, "size": size}


def engine(*rows: dict, policy: str = "eager", platform: str = "snp", **knobs) -> Engine:
    """Replay rows with invariants checked after every event; the Engine, for its state."""
    eng = Engine(PRESETS[policy].with_overrides(knobs), Platform(platform), paranoid=True)
    eng.run(iter_rows(table(*rows)))
    return eng


def replay(*rows: dict, policy: str = "eager", platform: str = "snp", **knobs) -> Result:
    eng = engine(*rows, policy=policy, platform=platform, **knobs)
    return Result(eng.report({"path": None, "sha256": None, "events": len(rows),
                              "platform": platform}, None, None))


def replay_rows(rows: list[dict], reference: bool, policy: str = "eager",
                platform: str = "snp", **knobs) -> Result:
    """Through upmtrace.replay: the row-by-row reference loop or the batch path."""
    from upmtrace.engine import replay as run

    return run(table(*rows), PRESETS[policy].with_overrides(knobs), platform=platform,
               reference=reference)


def counters(result: Result) -> dict[str, int]:
    """Every integer counter in COUNTER_GROUPS, flattened to dotted keys."""
    flat: dict[str, int] = {}

    def walk(prefix: str, node) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                walk(f"{prefix}{key}.", value)
            else:
                flat[f"{prefix}{key}"] = value

    for group in COUNTER_GROUPS:
        walk(f"{group}.", result.report[group])
    return flat


def expect(result: Result, **nonzero: int) -> None:
    """Every counter equals the given value (keys use __ for dots), all others are zero."""
    want = {key.replace("__", "."): value for key, value in nonzero.items()}
    got = counters(result)
    unknown = set(want) - set(got)
    assert not unknown, f"no such counters: {unknown}"
    expected = {key: want.get(key, 0) for key in got}
    assert got == expected, {k: (got[k], expected[k]) for k in got if got[k] != expected[k]}


def memory(result: Result) -> dict[str, int]:
    """Memory figures in 4 KiB pages (the ratio as is)."""
    mem = result.report["memory"]
    return {k.removesuffix("_bytes"): (v // 4096 if k.endswith("_bytes") else v)
            for k, v in mem.items()}
