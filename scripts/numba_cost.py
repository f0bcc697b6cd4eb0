#!/usr/bin/env python3
"""What a numba-compiled model would pay before its first event, in a fresh process.

    python -m venv /tmp/nb && /tmp/nb/bin/pip install numba
    /tmp/nb/bin/python scripts/numba_cost.py            # best of 3 fresh processes

numba is not a dependency of upmtrace; this measures the fixed cost that decided against it
(README, Performance): the import after numpy, and the first call of a one-loop kernel compiled
with cache=True whose cache is already on disk (a second run of the same process).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

KERNEL = textwrap.dedent("""
    import time
    import numpy as np
    start = time.perf_counter()
    from numba import njit
    imported = time.perf_counter()

    @njit(cache=True)
    def touch(gfns, private, state):
        changed = 0
        for i in range(gfns.shape[0]):
            block = gfns[i] >> 9
            if state[block] != private[i]:
                state[block] = private[i]
                changed += 1
        return changed

    touch(np.arange(1000, dtype=np.int64), np.ones(1000, dtype=np.int8),
          np.zeros(2, dtype=np.int8))
    print(imported - start, time.perf_counter() - imported)
""")


def main() -> None:
    if importlib.util.find_spec("numba") is None:
        sys.exit("numba is not installed in this interpreter (see the docstring)")
    with tempfile.TemporaryDirectory() as folder:
        script = Path(folder) / "kernel.py"
        script.write_text(KERNEL)
        subprocess.run([sys.executable, str(script)], check=True, capture_output=True)  # cache
        runs = [tuple(map(float, subprocess.run([sys.executable, str(script)], check=True,
                                                capture_output=True, text=True).stdout.split()))
                for _ in range(3)]
    imported, first_call = min(r[0] for r in runs), min(r[1] for r in runs)
    print(f"import numba (after numpy): {imported:.2f} s; first call of a cached kernel: "
          f"{first_call:.2f} s; fixed cost {imported + first_call:.2f} s")


if __name__ == "__main__":
    main()
