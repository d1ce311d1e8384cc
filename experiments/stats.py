"""Statistics over seeds for the comparison tables: estimates with confidence intervals, paired differences.

* :func:`estimate`: mean, sample standard deviation (ddof=1) and a two-sided
  Student-t confidence interval of the mean (95 % by default).
* :func:`paired_difference`: method A minus method B over the seeds both ran
  (same seeds, so the same data order and initial state), the interval of the
  mean difference and the two-sided paired t-test p-value.

Fewer than two values leave the spread, interval and p-value undefined (None),
as no interval can be drawn from one seed.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Mapping, Sequence

from scipy import stats as scipy_stats

CONFIDENCE = 0.95
ALPHA = 0.05


@dataclasses.dataclass(frozen=True)
class Estimate:
    """A mean over ``n`` values with its sample std and confidence interval (None below two values)."""

    n: int
    mean: float
    std: float | None
    low: float | None
    high: float | None

    @property
    def half_width(self) -> float | None:
        """Half the interval's width (the '±' of 'mean ± h')."""
        return None if self.low is None else (self.high - self.low) / 2


def estimate(values: Sequence[float], confidence: float = CONFIDENCE) -> Estimate:
    """Mean, sample std and the Student-t ``confidence`` interval of the mean of ``values``."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("no values to estimate from")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence {confidence} is not in (0, 1)")
    mean = statistics.fmean(values)
    if len(values) < 2:
        return Estimate(1, mean, None, None, None)
    std = statistics.stdev(values)
    t = float(scipy_stats.t.ppf((1 + confidence) / 2, df=len(values) - 1))
    half = t * std / math.sqrt(len(values))
    return Estimate(len(values), mean, std, mean - half, mean + half)


@dataclasses.dataclass(frozen=True)
class PairedDifference:
    """A minus B over paired seeds: the estimate of the mean difference and the paired t-test p-value."""

    seeds: tuple[int, ...]
    difference: Estimate
    p_value: float | None

    def significant(self, alpha: float = ALPHA) -> bool:
        """Whether the difference is significant at level ``alpha`` (never with fewer than two pairs)."""
        return self.p_value is not None and self.p_value < alpha


def paired_difference(a: Mapping[int, float], b: Mapping[int, float],
                      confidence: float = CONFIDENCE) -> PairedDifference:
    """``a[seed] - b[seed]`` over the seeds both have: mean, interval and two-sided paired t-test p-value.

    Identical differences (zero spread) give p = 1 when they are all 0 and p = 0 otherwise: the test's
    statistic is then 0/0 or infinite.
    """
    seeds = tuple(sorted(set(a) & set(b)))
    if not seeds:
        raise ValueError(f"no seed in common: {sorted(a)} against {sorted(b)}")
    differences = [float(a[s]) - float(b[s]) for s in seeds]
    result = estimate(differences, confidence)
    if len(seeds) < 2:
        return PairedDifference(seeds, result, None)
    if result.std == 0:
        return PairedDifference(seeds, result, 1.0 if result.mean == 0 else 0.0)
    t = result.mean / (result.std / math.sqrt(len(seeds)))
    p = 2 * float(scipy_stats.t.sf(abs(t), df=len(seeds) - 1))
    return PairedDifference(seeds, result, p)


def format_estimate(value: Estimate, digits: int = 2) -> str:
    """'92.00 ± 1.24' (the interval's half width), or '92.00' from one value."""
    if value.half_width is None:
        return f"{value.mean:.{digits}f}"
    return f"{value.mean:.{digits}f} ± {value.half_width:.{digits}f}"


def format_difference(value: PairedDifference, digits: int = 2, alpha: float = ALPHA) -> str:
    """'+1.20 [0.40, 2.00] p=0.012', with ' n.s.' when not significant at ``alpha`` (or from one pair)."""
    d = value.difference
    text = f"{d.mean:+.{digits}f}"
    if d.low is not None:
        text += f" [{d.low:+.{digits}f}, {d.high:+.{digits}f}] p={value.p_value:.2g}"
    return text if value.significant(alpha) else text + " n.s."
