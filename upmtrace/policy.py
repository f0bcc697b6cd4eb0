"""VMM/kernel policies: the knobs, the presets, TOML files, policy specs and --set overrides."""

from __future__ import annotations

import dataclasses
import difflib
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from upmtrace.errors import PolicyError, UsageError

# knob -> (allowed values or type, meaning)
KNOBS: dict[str, tuple[Any, str]] = {
    "dealloc": (
        ("eager", "lazy", "aligned-2m"),
        "when the now-unused copy of a converted page is freed: at once (QEMU, libkrun); never, "
        "until lazy_limit forces reclaim; only in whole 2 MiB-aligned blocks",
    ),
    "lazy_limit": (int, "with lazy: stale copies above this many bytes are freed oldest first "
                        "(0 = unlimited)"),
    "backing": (("separate", "inplace"),
                "two pools, or one guest_memfd pool converted in place (no second copy)"),
    "exits": (
        ("coalesce", "per-entry", "batched"),
        "how a PSC request reaches userspace: one exit per run of contiguous same-op entries "
        "(upstream), one per entry, or one per request carrying a scatter-gather list",
    ),
    "directmap": (
        ("split", "unmap", "none"),
        "SNP host direct map: split a 2 MiB mapping on any 4 KiB RMP update and never restore "
        "(upstream); remove private pages and restore a region once none is left; not modelled",
    ),
    "gmem_page": (("4k", "2m"), "folio size of private (guest_memfd) allocations"),
    "shared_page": (("4k", "2m"), "page size of shared allocations (THP)"),
    "prefault": (bool, "after an explicit conversion, pre-map the range "
                       "(KVM_PRE_FAULT_MEMORY, QEMU >= 10.1)"),
    "vfio": (
        ("none", "pin-all", "on-convert"),
        "an assigned device DMA-maps guest memory through VFIO: not modelled; every slot's "
        "whole shared range mapped and pinned at registration (cloud-hypervisor before its "
        "fix); only what is shared, following conversions (QEMU's RamDiscardManager)",
    ),
}


def check_knob(key: str, value: Any) -> None:
    if key not in KNOBS:
        raise PolicyError(f"unknown policy knob {key!r} (knobs: {', '.join(KNOBS)})")
    allowed = KNOBS[key][0]
    if allowed is bool:
        ok = isinstance(value, bool)
    elif allowed is int:
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
    else:
        ok = value in allowed
    if not ok:
        raise PolicyError(f"policy knob {key!r} cannot be {value!r} ({describe_values(key)})")


def describe_values(key: str) -> str:
    allowed = KNOBS[key][0]
    if allowed is bool:
        return "true or false"
    if allowed is int:
        return "a byte count >= 0"
    return "one of " + ", ".join(allowed)


@dataclass(frozen=True)
class Policy:
    """One VMM/kernel configuration. Defaults are the `eager` preset: upstream Linux + QEMU."""

    name: str = "eager"
    dealloc: str = "eager"
    lazy_limit: int = 0
    backing: str = "separate"
    exits: str = "coalesce"
    directmap: str = "split"
    gmem_page: str = "4k"
    shared_page: str = "4k"
    prefault: bool = False
    vfio: str = "none"

    def __post_init__(self) -> None:
        for key in KNOBS:
            check_knob(key, getattr(self, key))

    def knobs(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in KNOBS}

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, **self.knobs()}

    def with_overrides(self, overrides: dict[str, Any]) -> Policy:
        """This policy with typed knob values (its name unchanged)."""
        return dataclasses.replace(self, **overrides)

    def with_sets(self, items: Sequence[str]) -> Policy:
        """This policy with `KEY=VALUE` overrides, named by appending `+KEY=VALUE` for each."""
        if not items:
            return self
        written = [_written(item) for item in items]
        return dataclasses.replace(self, name=self.name + "".join("+" + w for w in written),
                                   **parse_overrides(written))


PRESETS: dict[str, Policy] = {
    "eager": Policy(name="eager"),
    "lazy": Policy(name="lazy", dealloc="lazy"),
    "inplace": Policy(name="inplace", backing="inplace"),
    "hugepool": Policy(name="hugepool", gmem_page="2m", dealloc="aligned-2m"),
    "sg": Policy(name="sg", exits="batched"),
    "prefault": Policy(name="prefault", prefault=True),
}

PRESET_NOTES = {
    "eager": "upstream Linux + QEMU: free the old copy at once, coalesced PSC exits, "
             "split direct map, 4 KiB pages, no prefault",
    "lazy": "never free the old copy (alioth-like); reuse it on converting back",
    "inplace": "one guest_memfd pool converted in place (guest_memfd mmap series)",
    "hugepool": "2 MiB guest_memfd folios, freed only in whole 2 MiB blocks",
    "sg": "one userspace exit per PSC request carrying a scatter-gather list",
    "prefault": "eager plus KVM_PRE_FAULT_MEMORY after each explicit conversion (QEMU >= 10.1)",
}


def parse_value(key: str, text: str) -> Any:
    """A --set value from the command line, typed by its knob."""
    if key not in KNOBS:
        raise PolicyError(f"unknown policy knob {key!r} (knobs: {', '.join(KNOBS)})")
    allowed = KNOBS[key][0]
    if allowed is bool:
        lowered = text.strip().lower()
        if lowered in ("true", "1", "yes", "on"):
            return True
        if lowered in ("false", "0", "no", "off"):
            return False
        raise PolicyError(f"policy knob {key!r} cannot be {text!r} (true or false)")
    if allowed is int:
        from upmtrace.units import parse_bytes

        try:
            return parse_bytes(text)
        except ValueError:
            raise PolicyError(f"policy knob {key!r} cannot be {text!r} (a byte count)") from None
    return text.strip()


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise PolicyError(f"--set {item!r}: expected KEY=VALUE")
        key = key.strip()
        overrides[key] = parse_value(key, value)
    return overrides


def _written(item: str) -> str:
    """An override as it goes into a policy's name: `KEY=VALUE`, spaces around either trimmed."""
    key, sep, value = item.partition("=")
    if not sep:
        raise PolicyError(f"--set {item!r}: expected KEY=VALUE")
    return f"{key.strip()}={value.strip()}"


def split_spec(spec: str) -> tuple[str, list[str]]:
    """`BASE+KEY=VALUE+...` -> (BASE, ["KEY=VALUE", ...]); BASE is a preset or a TOML path.

    A path may itself contain `+`: the longest `+`-joined prefix that is a preset or an existing
    file is the base, and everything after it must be overrides.
    """
    parts = spec.split("+")
    for end in range(len(parts), 0, -1):
        base = "+".join(parts[:end])
        if base in PRESETS or Path(base).is_file():
            return base, parts[end:]
    return parts[0], parts[1:]


def load_policy(spec: str, sets: Sequence[str] = ()) -> Policy:
    """A policy spec (a preset or a TOML file, then `+KEY=VALUE` overrides), then --set ones.

    The policy's name is the spec as written with the --set overrides appended the same way,
    so two different policies never share a name.
    """
    base, items = split_spec(spec)
    if base in PRESETS:
        policy = PRESETS[base]
    elif base.endswith(".toml") or Path(base).exists():
        policy = load_toml(Path(base))
    else:
        close = difflib.get_close_matches(base, PRESETS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise UsageError(f"unknown policy {base!r}: not a preset ({', '.join(PRESETS)}) and no "
                         f"such TOML file{hint}")
    return policy.with_sets([*items, *sets])


def load_toml(path: Path) -> Policy:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PolicyError("no such policy file", path=str(path)) from None
    except (OSError, UnicodeDecodeError) as err:
        raise PolicyError(f"cannot read policy file: {err}", path=str(path)) from None
    except tomllib.TOMLDecodeError as err:
        raise PolicyError(f"not valid TOML: {err}", path=str(path)) from None
    except RecursionError:
        raise PolicyError("not valid TOML: nested too deeply", path=str(path)) from None
    name = data.pop("name", path.stem)
    if not isinstance(name, str) or not name:
        raise PolicyError("'name' must be a non-empty string", path=str(path))
    for key, value in data.items():
        if key not in KNOBS:
            raise PolicyError(f"unknown policy knob {key!r} (knobs: {', '.join(KNOBS)})",
                              path=str(path))
        try:
            check_knob(key, value)
        except PolicyError as err:
            raise PolicyError(str(err), path=str(path)) from None
    return Policy(name=name, **data)


def check_distinct(policies, keyed: str) -> None:
    """Policy names key a report's columns or rows: the same name twice is a usage error."""
    names = [p.name for p in policies]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise UsageError(f"policy {twice[0]!r} given twice: {keyed} (copy the TOML file under "
                         "another name to vary its knobs)")
