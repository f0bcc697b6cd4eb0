"""upmtrace: replay confidential-VM memory conversion traces under VMM/kernel policies."""

__version__ = "0.1.0"
