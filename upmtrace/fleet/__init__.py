"""Replaying traces under many policies: the executors and what runs on them.

executors  where replays run: in this process, a local process pool, a Dask cluster
pairs      every (trace, policy) pair of many traces: finding traces, the worker's result row
summary    a fleet's per-policy totals and spread
compare    one trace under several policies, side by side
frontier   the Pareto frontier of points (pure)
sweep      a knob grid on a base policy, replayed as a fleet, ranked on the frontier
"""
