"""upmtrace: replay confidential-VM memory conversion traces under VMM/kernel policies.

The library's entry points are imported on first use, so that `import upmtrace.cli` (and with
it `upmtrace --help`) does not load pyarrow and numpy.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_HOME = {"PRESETS": "upmtrace.policy", "Policy": "upmtrace.policy",
         "load_policy": "upmtrace.policy", "Result": "upmtrace.engine",
         "replay": "upmtrace.engine", "replay_many": "upmtrace.engine"}
__all__ = ["PRESETS", "Policy", "Result", "__version__", "load_policy", "replay", "replay_many"]

if TYPE_CHECKING:
    from upmtrace.engine import Result, replay, replay_many
    from upmtrace.policy import PRESETS, Policy, load_policy


def __getattr__(name: str):
    if name not in _HOME:
        raise AttributeError(f"module 'upmtrace' has no attribute {name!r}")
    value = getattr(import_module(_HOME[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOME))
