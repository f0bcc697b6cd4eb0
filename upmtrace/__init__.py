"""upmtrace: replay confidential-VM memory conversion traces under VMM/kernel policies."""

from upmtrace.policy import PRESETS, Policy, load_policy
from upmtrace.replay import Result, replay

__version__ = "0.1.0"
__all__ = ["PRESETS", "Policy", "Result", "load_policy", "replay", "__version__"]
