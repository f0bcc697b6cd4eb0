"""The Pareto frontier of points where lower is better on every objective.

Point a dominates point b when a is at most b on every objective and below b on at least one.
The frontier is the points no other point dominates. Equal points never dominate each other, so
equal points are on the frontier together, or off it together. Every point off the frontier is
dominated by some point on it (dominance is transitive and the set is finite).
"""

from __future__ import annotations

from collections.abc import Sequence

Point = Sequence[float]


def dominates(a: Point, b: Point) -> bool:
    """a <= b on every objective and a < b on at least one."""
    return all(x <= y for x, y in zip(a, b, strict=True)) and any(
        x < y for x, y in zip(a, b, strict=True))


def frontier(points: Sequence[Point]) -> list[int | None]:
    """Per point: None when it is on the frontier, else the index of the first point (in input
    order) on the frontier that dominates it."""
    on = [not any(dominates(other, point) for other in points) for point in points]
    keepers = [i for i, yes in enumerate(on) if yes]
    return [None if on[i] else next(j for j in keepers if dominates(points[j], point))
            for i, point in enumerate(points)]
