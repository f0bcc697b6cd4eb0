"""The CI gate: `check` (one trace against a baseline report) and `fleet check` (fleet totals).

baseline.py reads and writes the baseline file, check.py decides which guarded metrics of one
replay regressed, fleet.py applies the same rule to a fleet's totals per policy. Rendering the
outcome (table, JUnit) is report/check.py's job.
"""
