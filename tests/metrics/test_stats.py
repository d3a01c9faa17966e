"""mipo.metrics.stats against small cases computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mipo.metrics.stats import (
    EXACT_SIGN_FLIP_MAX_N,
    bootstrap_ci,
    mcnemar_exact,
    mean_stderr,
    paired_comparison,
    paired_stderr,
    sign_flip_p_value,
)


def test_paired_stderr_by_hand():
    # d = (1, 2, 3, 6): mean 3, sample variance (4 + 1 + 0 + 9) / 3 = 14/3, stderr sqrt(14/3 / 4)
    assert paired_stderr([1, 2, 3, 6]) == pytest.approx(math.sqrt(14 / 12))
    assert mean_stderr([1, 2, 3, 6]) == pytest.approx((3.0, math.sqrt(14 / 12)))
    assert math.isnan(paired_stderr([5.0]))


def test_paired_stderr_is_smaller_than_unpaired_for_correlated_models():
    base = np.array([1.0, 5.0, 9.0, 2.0, 7.0])
    trained = base + np.array([0.5, 0.4, 0.6, 0.5, 0.5])
    unpaired = math.hypot(mean_stderr(base)[1], mean_stderr(trained)[1])
    assert paired_stderr(trained - base) < 0.1 * unpaired


@pytest.mark.parametrize(
    ("treated", "control", "expected"),
    [
        # b = 3 (treated right, control wrong), c = 0: p = 2 * C(3,0) / 2^3 = 0.25
        ([1, 1, 1, 0], [0, 0, 0, 0], 0.25),
        # b = 1, c = 1: p = min(1, 2 * (C(2,0) + C(2,1)) / 4) = 1
        ([1, 0, 1], [0, 1, 1], 1.0),
        # b = 5, c = 1: p = 2 * (C(6,0) + C(6,1)) / 64 = 14/64
        ([1, 1, 1, 1, 1, 0, 1, 0], [0, 0, 0, 0, 0, 1, 1, 0], 14 / 64),
        # b = 0, c = 10: p = 2 / 1024
        ([0] * 10, [1] * 10, 2 / 1024),
        # no discordant pairs
        ([1, 0, 1], [1, 0, 1], 1.0),
    ],
)
def test_mcnemar_exact_by_hand(treated, control, expected):
    assert mcnemar_exact(treated, control) == pytest.approx(expected)
    assert mcnemar_exact(control, treated) == pytest.approx(expected)  # two-sided: symmetric


def test_sign_flip_exact_by_hand():
    # d = (1, 2, 3): 8 sign assignments, |means| = 6/3, 4/3 (flip 1), 2/3 (flip 2), 0 (flip 3),
    # and their negatives; |mean| >= 2 only for all + and all -: p = 2/8
    assert sign_flip_p_value([1.0, 2.0, 3.0]) == pytest.approx(0.25)
    # d = (1, -1): means 0, 1, -1, 0 -> observed 0, every assignment is as extreme: p = 1
    assert sign_flip_p_value([1.0, -1.0]) == pytest.approx(1.0)
    # d = (1, 1, 1, 1, 1): only the two constant assignments reach |mean| = 1: 2/32
    assert sign_flip_p_value([1.0] * 5) == pytest.approx(2 / 32)


def test_sign_flip_sampled_agrees_with_exact_and_is_seeded():
    rng = np.random.default_rng(3)
    d = rng.normal(0.3, 1.0, size=EXACT_SIGN_FLIP_MAX_N)
    exact = sign_flip_p_value(d)
    d_big = np.concatenate([d, d])  # n above the exact limit: sampled
    sampled = sign_flip_p_value(d_big, resamples=20_000, seed=1)
    assert sampled == sign_flip_p_value(d_big, resamples=20_000, seed=1)
    assert 0 < sampled <= 1 and sampled < exact  # twice the data, the same effect: more significant
    # a large clear effect: the smallest attainable p, 1 / (1 + resamples)
    assert sign_flip_p_value(np.full(40, 2.0), resamples=999, seed=0) == pytest.approx(1 / 1000)


def test_bootstrap_ci_by_hand_and_seeded():
    assert bootstrap_ci([2.0, 2.0, 2.0], resamples=100) == (2.0, 2.0)  # no spread: a point
    # d = (0, 1): each resample's mean is 0, 0.5 or 1 with probability 1/4, 1/2, 1/4, so the 2.5%
    # and 97.5% quantiles are 0 and 1
    assert bootstrap_ci([0.0, 1.0], resamples=10_000, seed=0) == (0.0, 1.0)
    d = np.random.default_rng(0).normal(1.0, 2.0, size=400)
    lo, hi = bootstrap_ci(d, resamples=4000, seed=7)
    assert (lo, hi) == bootstrap_ci(d, resamples=4000, seed=7)
    assert (lo, hi) != bootstrap_ci(d, resamples=4000, seed=8)
    # the normal interval mean +- 1.96 se, to within a tenth of its half-width
    mean, se = mean_stderr(d)
    assert lo == pytest.approx(mean - 1.96 * se, abs=0.1 * 1.96 * se)
    assert hi == pytest.approx(mean + 1.96 * se, abs=0.1 * 1.96 * se)


def test_paired_comparison_record():
    treated, control = [1, 1, 1, 0], [0, 0, 0, 0]
    record = paired_comparison(treated, control, binary=True, resamples=2000, seed=0).record()
    assert record["mean"] == 0.75 and record["p_value"] == pytest.approx(0.25) and record["test"] == "mcnemar_exact"
    assert record["stderr"] == pytest.approx(paired_stderr([1, 1, 1, 0]))
    assert record["ci95"][0] <= 0.75 <= record["ci95"][1] and record["n"] == 4
    real = paired_comparison([3.0, 4.0, 5.0], [2.0, 2.0, 2.0]).record()
    assert real["mean"] == 2.0 and real["p_value"] == pytest.approx(0.25) and real["test"] == "sign_flip"
    with pytest.raises(ValueError, match="same prompts"):
        paired_comparison([1.0, 2.0], [1.0])
