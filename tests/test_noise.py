"""The noise statistics (analysis/noise.py) against cases whose answer is known in closed form."""

import math

import numpy as np
import pytest

from analysis.noise import over_seeds, paired_difference, paired_pooled_difference


def test_the_seed_interval_is_students_t():
    # 1, 2, 3: mean 2, sample sd 1, t(0.975, 2 degrees of freedom) = 4.3027
    interval = over_seeds([1.0, 2.0, 3.0])
    assert interval.mean == 2.0 and interval.seeds == 3
    assert interval.high - 2.0 == pytest.approx(4.302653 / math.sqrt(3), rel=1e-5)
    assert interval.low == pytest.approx(4.0 - interval.high)


def test_one_seed_has_no_interval():
    interval = over_seeds([0.25])
    assert interval.mean == 0.25 and math.isnan(interval.low) and math.isnan(interval.high)


def test_the_paired_bootstrap_matches_the_normal_interval_of_a_mean_difference():
    """Per-unit differences with standard deviation 1 over 4,000 units: the 95% interval of their mean is
    about 1.96 / sqrt(4000) either side of the observed difference."""
    rng = np.random.default_rng(1)
    baseline = rng.normal(size=4000)
    other = baseline + 0.3 + rng.normal(size=4000)
    result = paired_difference(baseline, other)
    half_width = (result.high - result.low) / 2
    expected = 1.959964 * np.std(other - baseline, ddof=1) / math.sqrt(4000)
    assert half_width == pytest.approx(expected, rel=0.05)
    assert result.difference == pytest.approx(np.mean(other - baseline))
    assert not result.within_noise


def test_pairing_is_what_narrows_the_interval():
    """Two systems that agree on most questions: the paired interval is much narrower than the spread of
    either system's accuracy, which is what an unpaired comparison would have to beat."""
    rng = np.random.default_rng(2)
    baseline = (rng.random(2000) < 0.6).astype(float)
    other = baseline.copy()
    flipped = rng.choice(2000, size=40, replace=False)
    other[flipped] = 1.0 - other[flipped]
    result = paired_difference(baseline, other)
    unpaired_half_width = 1.96 * math.sqrt(2 * 0.6 * 0.4 / 2000)
    assert (result.high - result.low) / 2 < unpaired_half_width / 3


def test_a_constant_difference_has_a_zero_width_interval_and_equal_systems_are_within_noise():
    baseline = np.arange(10, dtype=float)
    shifted = paired_difference(baseline, baseline + 0.5)
    assert (shifted.low, shifted.difference, shifted.high) == pytest.approx((0.5, 0.5, 0.5))
    rng = np.random.default_rng(3)
    answers = (rng.random(500) < 0.5).astype(float)
    assert paired_difference(answers, rng.permutation(answers)).within_noise


def test_a_pooled_perplexity_difference_is_exp_of_summed_losses_over_summed_tokens():
    tokens = np.array([100.0, 200.0, 50.0, 150.0])
    base_nll = np.array([230.0, 470.0, 110.0, 350.0])
    other_nll = base_nll * 1.1
    result = paired_pooled_difference((base_nll, tokens), (other_nll, tokens))
    expected = math.exp(other_nll.sum() / tokens.sum()) - math.exp(base_nll.sum() / tokens.sum())
    assert result.difference == pytest.approx(expected)
    assert result.low <= expected <= result.high and not result.within_noise


def test_rows_scored_on_other_units_are_refused_in_one_line():
    with pytest.raises(ValueError, match="same units on both sides"):
        paired_difference([1.0, 0.0, 1.0], [1.0, 0.0])


def test_a_figure_equal_over_seeds_shows_no_interval():
    """Storage is the same for every seed: 116,413,376 bytes scaled to MB read "116.4 ± 0.0" before, from the
    float rounding of the mean."""
    import pandas as pd

    from analysis.tables.grouping import cell
    from experiments.harness.record import Status

    runs = pd.DataFrame({"status": [Status.OK.value] * 3, "weight_bytes": [116413376] * 3})
    assert cell(runs, "weight_bytes", scale=1e-6) == "116.4"
    runs["weight_bytes"] = [1.0, 2.0, 3.0]
    assert cell(runs, "weight_bytes").startswith("2.0 ± ")
