"""The Pareto frontier against a brute-force dominance check on random result tables."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from upmtrace.fleet.frontier import dominates, frontier


def brute_dominates(a, b) -> bool:
    """a beats b: no objective worse, at least one strictly better (written out by hand)."""
    not_worse = True
    better = False
    for x, y in zip(a, b, strict=True):
        if x > y:
            not_worse = False
        if x < y:
            better = True
    return not_worse and better


def check(points) -> None:
    result = frontier(points)
    assert len(result) == len(points)
    for i, p in enumerate(points):
        beaten_by = [j for j, q in enumerate(points) if brute_dominates(q, p)]
        if not beaten_by:
            assert result[i] is None, (i, points)
        else:
            j = result[i]
            assert j is not None and j in beaten_by, (i, j, points)
            assert result[j] is None  # the named dominator is itself on the frontier
            # the first frontier point (input order) that dominates it
            assert j == min(k for k in beaten_by if result[k] is None)
    assert any(r is None for r in result) or not points


# small value ranges so that ties and equal rows are frequent
tables = st.integers(1, 4).flatmap(lambda k: st.lists(
    st.tuples(*[st.integers(0, 3)] * k), min_size=1, max_size=9))


@given(tables)
def test_frontier_matches_brute_force(points):
    check(points)


@given(st.integers(1, 4).flatmap(lambda k: st.tuples(*[st.integers(0, 3)] * k)),
       st.integers(2, 5))
def test_equal_policies_are_on_the_frontier_together(point, copies):
    assert frontier([point] * copies) == [None] * copies
    worse = tuple(v + 1 for v in point)
    assert frontier([worse, *([point] * copies)]) == [1, *([None] * copies)]


@given(st.lists(st.floats(-1e12, 1e12, allow_nan=False), min_size=1, max_size=5))
def test_a_single_policy_is_the_frontier(point):
    assert frontier([point]) == [None]


def test_ties_on_one_objective_are_decided_by_the_others():
    # same memory: the one with fewer exits wins; same everything but cost: the cheaper wins
    assert frontier([(1, 5, 9), (1, 4, 9), (1, 4, 8), (0, 9, 9)]) == [2, 2, None, None]


def test_a_trade_off_keeps_both_and_dominance_is_strict():
    assert frontier([(1, 2), (2, 1)]) == [None, None]
    assert not dominates((1, 1), (1, 1))
    assert dominates((1, 1), (1, 2)) and not dominates((1, 2), (1, 1))


def test_every_ordering_of_a_chain_names_its_top():
    chain = [(3, 3), (2, 2), (1, 1)]
    for order in itertools.permutations(chain):
        result = frontier(list(order))
        top = order.index((1, 1))
        assert result == [None if i == top else top for i in range(3)]
