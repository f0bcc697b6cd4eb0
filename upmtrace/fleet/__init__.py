"""Replaying traces under many policies: the executors and what runs on them.

pairs    every (trace, policy) pair of many traces, the worker's result row, the executors
compare  one trace under several policies, side by side
"""
