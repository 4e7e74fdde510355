"""How far a figure moves by chance: intervals over seeds, and paired bootstrap differences against a baseline.

Two kinds of noise show in this project's tables, and each gets the interval that fits it:

- A figure measured once per seed (final loss, MMLU accuracy, perplexity, KL) varies with the seed. Its mean
  over the seeds gets Student's t interval (``over_seeds``); one seed gives no interval at all.
- Two rows scored on the same units (MMLU questions, perplexity windows) differ partly because of which
  units were drawn. Their difference gets a paired bootstrap interval over those units (``paired_difference``
  for a mean per unit, ``paired_pooled_difference`` for a figure pooled over units, such as perplexity:
  exp(sum of losses / sum of tokens)), the test Koehn (2004, "Statistical Significance Tests for Machine
  Translation Evaluation") made standard for comparing systems on one test set. A difference whose interval
  covers zero is within noise.

Both are scipy's (``scipy.stats.t``, ``scipy.stats.bootstrap`` with ``paired=True``, percentile intervals);
this module only says which applies to which figure and keeps the resampling seeded, so a table is the same
every time it is generated.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
RESAMPLES = 9_999
SEED = 0  # the bootstrap's own randomness: fixed, so regenerating a table gives the same intervals


@dataclass(frozen=True)
class SeedInterval:
    """The mean of a figure over seeds, and its interval (NaN bounds for a single seed: nothing to go on)."""

    mean: float
    low: float
    high: float
    seeds: int


@dataclass(frozen=True)
class PairedDifference:
    """``other - baseline`` on the same units, and the bootstrap interval of that difference."""

    difference: float
    low: float
    high: float
    units: int

    @property
    def within_noise(self) -> bool:
        """The interval covers zero: the units drawn could explain the difference."""
        return self.low <= 0.0 <= self.high


def over_seeds(values: Sequence[float], confidence: float = CONFIDENCE) -> SeedInterval:
    """Mean and Student's t interval of one figure measured once per seed."""
    values = np.asarray(values, dtype=float)
    if values.size == 0:
        raise ValueError("over_seeds: no values (a figure needs at least one seed)")
    mean = float(values.mean())
    if values.size == 1:
        return SeedInterval(mean, math.nan, math.nan, 1)
    half = stats.t.ppf((1 + confidence) / 2, values.size - 1) * values.std(ddof=1) / math.sqrt(values.size)
    return SeedInterval(mean, mean - half, mean + half, int(values.size))


def half_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> float:
    """Half the width of ``over_seeds``'s interval: what a table writes after "±" and a plot draws as its error
    bar; 0 for a single seed (nothing to go on, and the Seeds column says so)."""
    interval = over_seeds(values, confidence)
    return 0.0 if interval.seeds < 2 else (interval.high - interval.low) / 2


def paired_difference(
    baseline: Sequence[float], other: Sequence[float], confidence: float = CONFIDENCE
) -> PairedDifference:
    """Mean of ``other`` minus mean of ``baseline``, unit by unit (MMLU: 1.0 per correct question; KL: each
    window's mean), with a paired bootstrap interval over the units."""
    baseline, other = _paired(baseline, other)
    return _bootstrap((baseline, other), lambda b, o, axis: o.mean(axis=axis) - b.mean(axis=axis), confidence)


def paired_pooled_difference(
    baseline: tuple[Sequence[float], Sequence[float]],
    other: tuple[Sequence[float], Sequence[float]],
    pool: Callable[[np.ndarray, np.ndarray], np.ndarray] = lambda total, count: np.exp(total / count),
    confidence: float = CONFIDENCE,
) -> PairedDifference:
    """A figure pooled over units, ``pool(sum of values, sum of counts)``, for ``other`` minus ``baseline``.
    Each argument is (value per unit, count per unit) on the same units; the default pool is perplexity from
    each window's summed negative log-likelihood and its number of predicted tokens."""
    (base_total, base_count), (other_total, other_count) = (_paired(*baseline), _paired(*other))
    _paired(base_total, other_total)

    def statistic(bt, bc, ot, oc, axis):
        return pool(ot.sum(axis=axis), oc.sum(axis=axis)) - pool(bt.sum(axis=axis), bc.sum(axis=axis))

    return _bootstrap((base_total, base_count, other_total, other_count), statistic, confidence)


def _paired(first: Sequence[float], second: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    first, second = np.asarray(first, dtype=float), np.asarray(second, dtype=float)
    if first.shape != second.shape or first.ndim != 1 or first.size < 2:
        raise ValueError(
            f"a paired comparison needs the same units on both sides, at least 2: got {first.shape} and "
            f"{second.shape} (were both rows scored on the same questions or windows?)"
        )
    return first, second


def _bootstrap(samples: tuple[np.ndarray, ...], statistic, confidence: float) -> PairedDifference:
    observed = float(statistic(*samples, axis=-1))
    if all(np.all(s == s[0]) for s in samples):  # nothing varies between units: no resample can differ
        return PairedDifference(observed, observed, observed, samples[0].size)
    result = stats.bootstrap(
        samples,
        statistic,
        paired=True,
        vectorized=True,
        n_resamples=RESAMPLES,
        confidence_level=confidence,
        method="percentile",
        rng=np.random.default_rng(SEED),
    )
    interval = result.confidence_interval
    return PairedDifference(observed, float(interval.low), float(interval.high), samples[0].size)
