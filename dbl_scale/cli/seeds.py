"""Spread over seeds: mean and standard deviation, and the 95% Student's t interval of a paired
difference (what the demo prints beside its single run, and the method tables report)."""
from __future__ import annotations

import math
import statistics

# Student's t 0.975 quantiles by degrees of freedom
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
        10: 2.228, 12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}


def t975(df: int) -> float:
    """The quantile for `df` degrees of freedom (the next smaller tabulated one; 1.96 beyond 30)."""
    return 1.96 if df > 30 else T975[max(k for k in T975 if k <= df)]


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (nan for one value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan


def paired_interval(values: list[float], baseline: list[float]) -> tuple[float, float]:
    """Mean of the per-seed differences and the half-width of its 95% interval (nan for one seed)."""
    diffs = [v - b for v, b in zip(values, baseline)]
    mean, std = mean_std(diffs)
    return mean, t975(len(diffs) - 1) * std / math.sqrt(len(diffs)) if len(diffs) > 1 else math.nan
