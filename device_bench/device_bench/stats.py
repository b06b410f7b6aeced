"""Summary statistics of repeated measurements, from the standard library's ``statistics``.

No numpy: the GGUF path must run with the standard library only, on Python 3.8 and newer.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence


def mean(values: Sequence[float]) -> float:
    """Arithmetic mean; 0.0 for an empty sequence."""
    return statistics.fmean(values) if values else 0.0


def std(values: Sequence[float]) -> float:
    """Sample standard deviation (n - 1), as llama-bench reports it; 0.0 for fewer than two values."""
    return statistics.stdev(values) if len(values) >= 2 else 0.0


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (``q`` a whole number within 0..100); 0.0 for an empty sequence.

    Linear interpolation between ranks: numpy's default method, the standard library's ``inclusive`` quantiles.
    """
    if not 0.0 <= q <= 100.0 or q != int(q):
        raise ValueError(f"percentile must be a whole number within 0..100, got {q}")
    if not values:
        return 0.0
    if len(values) == 1 or q in (0, 100):  # statistics.quantiles needs two values, and gives the cut points only
        return min(values) if q == 0 else max(values) if q == 100 else float(values[0])
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]
