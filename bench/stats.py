"""Percentiles for the benchmarks' reports."""

from __future__ import annotations

import math
from collections.abc import Sequence


def nearest_rank(ordered: Sequence[float], fraction: float) -> float:
    """The nearest-rank percentile of an ascending sequence: the smallest value with at least
    `fraction` of the values at or below it (p99 of 100 values is the 99th, not the maximum)."""
    if not ordered:
        raise ValueError("no values")
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]
