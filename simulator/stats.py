"""Output analysis for what-if experiments: confidence intervals over replications, paired
differences under common random numbers, and batch means for one long run.

Where it sits: after the model. :mod:`simulator.experiment` runs replications and hands their per-run
figures here. The distributions come from SciPy (Student's t), never from hand-written tables.

Method (e.g. Law, *Simulation Modeling and Analysis*, 5th ed., sections 9.4 and 10.2):

- **Replications.** n independent runs (independent random-number streams) give n i.i.d. estimates
  X_1..X_n; the 100(1-alpha)% confidence interval of their mean is
  mean +- t_{n-1, 1-alpha/2} * s / sqrt(n).
- **Paired differences.** Two design points run with the same streams for replication i
  (common random numbers) give D_i = X_i - Y_i; the interval above applied to the D_i is the
  interval of the difference. Positive correlation between X_i and Y_i makes it narrower than the
  unpaired (Welch) interval of two independent samples, which is given for comparison.
- **Batch means.** One long run's series, after the warm-up is dropped, is cut into b equal batches;
  the batch means are treated as b roughly independent observations (valid when batches are long
  against the series' autocorrelation; the lag-1 correlation of the batch means is reported so it
  can be checked).
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from scipy import stats as _scipy_stats

__all__ = ["Interval", "batch_means", "mean_interval", "paired_difference", "welch_difference"]


@dataclass(frozen=True)
class Interval:
    """A mean with its confidence interval over ``n`` observations."""

    n: int
    mean: float
    sd: float
    half_width: float
    confidence: float

    @property
    def low(self) -> float:
        return self.mean - self.half_width

    @property
    def high(self) -> float:
        return self.mean + self.half_width

    def covers(self, value: float) -> bool:
        return self.low <= value <= self.high

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ci_low": self.low, "ci_high": self.high}


def _t(confidence: float, df: float) -> float:
    return float(_scipy_stats.t.ppf(0.5 + confidence / 2, df))


def mean_interval(values: Sequence[float], confidence: float = 0.95) -> Interval:
    """Student-t interval of the mean of i.i.d. ``values``; with one value the half-width is infinite."""
    if not values:
        raise ValueError("no values")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    n = len(values)
    mean = statistics.fmean(values)
    if n == 1:
        return Interval(1, mean, math.nan, math.inf, confidence)
    sd = statistics.stdev(values)
    return Interval(n, mean, sd, _t(confidence, n - 1) * sd / math.sqrt(n), confidence)


def paired_difference(x: Sequence[float], y: Sequence[float], confidence: float = 0.95) -> Interval:
    """Interval of mean(x - y) from pairs (x_i, y_i) run with the same random numbers."""
    if len(x) != len(y):
        raise ValueError(f"paired samples need equal lengths, got {len(x)} and {len(y)}")
    return mean_interval([a - b for a, b in zip(x, y, strict=True)], confidence)


def welch_difference(x: Sequence[float], y: Sequence[float], confidence: float = 0.95) -> Interval:
    """Interval of mean(x) - mean(y) treating the samples as independent (Welch-Satterthwaite df)."""
    if len(x) < 2 or len(y) < 2:
        raise ValueError("each sample needs at least two values")
    vx, vy = statistics.variance(x) / len(x), statistics.variance(y) / len(y)
    se = math.sqrt(vx + vy)
    df = (vx + vy) ** 2 / (vx**2 / (len(x) - 1) + vy**2 / (len(y) - 1)) if se > 0 else len(x) + len(y) - 2
    diff = statistics.fmean(x) - statistics.fmean(y)
    return Interval(min(len(x), len(y)), diff, se * math.sqrt(min(len(x), len(y))), _t(confidence, df) * se, confidence)


@dataclass(frozen=True)
class BatchMeans:
    """The batch-means interval of one run's series, and the lag-1 correlation of the batch means."""

    interval: Interval
    batches: int
    batch_size: int
    dropped: int
    lag1: float


def batch_means(series: Sequence[float], batches: int = 20, warmup: int = 0, confidence: float = 0.95) -> BatchMeans:
    """Batch-means interval of the mean of ``series`` after dropping its first ``warmup`` values.

    The rest is cut into ``batches`` batches of equal size (a remainder at the end is dropped too).
    """
    if batches < 2:
        raise ValueError(f"need at least 2 batches, got {batches}")
    kept = list(series[warmup:])
    size = len(kept) // batches
    if size < 1:
        raise ValueError(f"{len(kept)} values after the warm-up cannot make {batches} batches")
    means = [statistics.fmean(kept[i * size : (i + 1) * size]) for i in range(batches)]
    centred = [m - statistics.fmean(means) for m in means]
    var = sum(c * c for c in centred)
    lag1 = sum(a * b for a, b in itertools.pairwise(centred)) / var if var > 0 else 0.0
    return BatchMeans(mean_interval(means, confidence), batches, size, warmup + len(kept) - batches * size, lag1)
