"""Prompt-level bootstrap intervals (`evaluate.intervals`) and the "no measurement" verdict.

Bugs pinned here:

* an interval that resamples replies instead of prompts (too narrow when replies to one prompt
  agree: it covers the truth far less often than it claims);
* a difference of two models computed from two unpaired intervals (too wide);
* a hand-written bootstrap drifting from the library's: the interval must be scipy's BCa, and
  where BCa is undefined (no spread, NaN resamples) the fallback must say which it used;
* a failed instrument whose number still reaches a headline.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from character_training.errors import DataError
from character_training.evaluate.intervals import (
    MEASURED,
    NO_MEASUREMENT,
    Measurement,
    bootstrap_groups,
    bootstrap_mean,
    draw_counts,
    first_failure,
    jackknife_t_interval,
    paired_bootstrap_difference,
    withhold,
)
from scipy import stats


# -- against the library and by hand --------------------------------------------------------------
def test_one_value_per_prompt_gives_scipys_own_bca_interval():
    values = np.random.default_rng(1).gamma(2.0, size=30)  # skewed: BCa differs from percentile
    ours = bootstrap_mean([[v] for v in values], 1000, seed=5)
    theirs = stats.bootstrap(
        (values,), np.mean, n_resamples=1000, method="BCa", rng=np.random.default_rng(5)
    ).confidence_interval
    assert ours.method == "BCa"
    assert (ours.value, ours.low, ours.high) == pytest.approx(
        (values.mean(), theirs.low, theirs.high), rel=1e-12
    )
    percentile = stats.bootstrap(
        (values,), np.mean, n_resamples=1000, method="percentile", rng=np.random.default_rng(5)
    ).confidence_interval
    assert (ours.low, ours.high) != pytest.approx((percentile.low, percentile.high))


def test_grouped_values_give_scipys_paired_bca_interval_of_the_pooled_mean():
    """Prompts of unequal size: the point is the pooled mean (by hand: 5 of 10 replies), and
    the interval is scipy's BCa of the ratio of sums, resampling (sum, count) pairs together."""
    groups = [[1, 1], [0], [1, 0, 0], [], [1, 1, 0, 0]]  # the empty prompt is ignored
    estimate = bootstrap_mean(groups, 400, seed=0)
    assert estimate.value == pytest.approx(5 / 10)
    sums, counts = np.array([2.0, 0.0, 1.0, 2.0]), np.array([2.0, 1.0, 3.0, 4.0])
    theirs = stats.bootstrap(
        (sums, counts),
        lambda s, c, axis: s.sum(axis=axis) / c.sum(axis=axis),
        paired=True,
        vectorized=True,
        n_resamples=400,
        method="BCa",
        rng=np.random.default_rng(0),
    ).confidence_interval
    assert (estimate.low, estimate.high) == pytest.approx((theirs.low, theirs.high), rel=1e-12)


def test_draw_counts_count_each_prompt_per_resample():
    draws = np.array([[[0, 0, 2], [1, 2, 2]], [[2, 2, 2], [0, 1, 2]]])
    assert draw_counts(draws, 3).tolist() == [
        [[2, 0, 1], [0, 1, 2]],
        [[0, 0, 3], [1, 1, 1]],
    ]


def test_paired_difference_uses_only_shared_prompts():
    est, n = paired_bootstrap_difference(
        {"x": [1, 1], "y": [0], "only_a": [1]}, {"x": [0, 0], "y": [0], "only_b": [1]}, 200, 0
    )
    assert n == 2
    assert est.value == pytest.approx(2 / 3)
    with pytest.raises(DataError):
        paired_bootstrap_difference({"x": [1]}, {"y": [0]}, 10, 0)


def test_the_jackknife_t_interval_of_a_mean_is_scipys_one_sample_t_interval():
    values = np.random.default_rng(2).gamma(2.0, size=7)

    def mean(weights):
        return weights @ values / weights.sum(axis=1)

    ours = jackknife_t_interval(mean, len(values))
    theirs = stats.ttest_1samp(values, 0.0).confidence_interval(0.95)
    assert ours.method == "jackknife-t"
    assert ours.value == pytest.approx(values.mean())
    assert (ours.low, ours.high) == pytest.approx((theirs.low, theirs.high), rel=1e-12)


def test_the_jackknife_t_interval_without_spread_is_the_point():
    flat = jackknife_t_interval(lambda w: np.full(len(w), 0.25), 6)
    assert (flat.value, flat.low, flat.high, flat.method) == (0.25, 0.25, 0.25, "point")
    with pytest.raises(DataError, match="no groups"):
        jackknife_t_interval(lambda w: w.sum(axis=1), 0)


def test_bootstrap_is_seeded():
    groups = np.random.default_rng(0).binomial(1, 0.4, size=(30, 3))
    assert bootstrap_mean(groups, 500, 3) == bootstrap_mean(groups, 500, 3)
    assert bootstrap_mean(groups, 500, 3) != bootstrap_mean(groups, 500, 4)


# -- where BCa is undefined -----------------------------------------------------------------------
def test_no_spread_gives_the_point_and_says_so():
    same = bootstrap_mean([[1, 1], [1], [1, 1, 1]], 300, 0)  # the jackknife has no spread
    assert (same.value, same.low, same.high, same.method) == (1.0, 1.0, 1.0, "point")
    one = bootstrap_mean([[0, 1, 1]], 300, 0)  # one prompt: nothing to resample
    assert (one.low, one.high, one.method) == (2 / 3, 2 / 3, "point")
    with pytest.raises(DataError, match="no values"):
        bootstrap_mean([[], []], 10, 0)


def test_resamples_without_a_value_fall_back_to_the_percentile_interval_of_the_others():
    """A statistic undefined on some draws (here: prompt 0 not drawn) has no BCa interval; the
    fallback is the percentile interval over the draws that have a value."""
    values = np.array([3.0, 1.0, 4.0, 1.0, 5.0, 9.0])

    def mean_if_first_drawn(weights: np.ndarray) -> np.ndarray:
        out = (weights @ values) / weights.sum(axis=1)
        return np.where(weights[:, 0] > 0, out, np.nan)

    estimate = bootstrap_groups(mean_if_first_drawn, 6, 2000, seed=9)
    assert estimate.method == "percentile" and estimate.value == pytest.approx(values.mean())
    draws = np.random.default_rng(9).integers(0, 6, size=(2000, 6))  # scipy's draws
    finite = mean_if_first_drawn(draw_counts(draws, 6))
    finite = finite[np.isfinite(finite)]
    assert (estimate.low, estimate.high) == pytest.approx(
        tuple(np.quantile(finite, [0.025, 0.975]))
    )


# -- coverage on known truths --------------------------------------------------------------------
def test_the_interval_covers_a_known_share_at_the_nominal_rate_where_a_reply_level_one_does_not():
    """300 data sets of 40 prompts x 4 replies, Bernoulli(p_prompt) with p_prompt ~ Beta(1, 1.5)
    (share 0.4): replies to one prompt agree, so only a prompt-level interval keeps its 95%."""
    rng = np.random.default_rng(2024)
    truth = 1 / 2.5
    hits = reply_level_hits = 0
    for rep in range(300):
        replies = rng.binomial(1, rng.beta(1, 1.5, size=40)[:, None], size=(40, 4))
        estimate = bootstrap_mean(replies, n_resamples=500, seed=rep)
        hits += estimate.low <= truth <= estimate.high
        flat = replies.ravel()
        reply_level_hits += abs(flat.mean() - truth) <= 1.96 * flat.std(ddof=1) / math.sqrt(160)
    assert hits / 300 >= 0.93
    assert reply_level_hits / 300 <= 0.88


def test_paired_difference_covers_the_truth_and_beats_unpaired_intervals():
    """Prompt difficulty is shared by both models; the paired interval cancels it."""
    rng = np.random.default_rng(11)
    shift = 0.15
    truth = float(np.mean(np.minimum(1.0, rng.beta(2, 3, size=400_000) + shift))) - 0.4
    hits, paired_width, unpaired_width = 0, 0.0, 0.0
    for rep in range(200):
        difficulty = rng.beta(2, 3, size=50)
        a = rng.binomial(1, np.minimum(1.0, difficulty + shift)[:, None], size=(50, 2))
        b = rng.binomial(1, difficulty[:, None], size=(50, 2))
        estimate, n = paired_bootstrap_difference(dict(enumerate(a)), dict(enumerate(b)), 500, rep)
        assert n == 50
        hits += estimate.low <= truth <= estimate.high
        if rep < 40:
            paired_width += estimate.high - estimate.low
            ea, eb = bootstrap_mean(a, 500, rep), bootstrap_mean(b, 500, rep + 1)
            unpaired_width += math.hypot(ea.high - ea.low, eb.high - eb.low)
    assert hits / 200 >= 0.92
    assert paired_width < 0.9 * unpaired_width


# -- no measurement ------------------------------------------------------------------------------
def test_a_failed_measurement_needs_a_reason_and_prints_it():
    assert Measurement().measured and Measurement().text() == MEASURED
    failed = Measurement.failed("classifier AUC 0.55 [0.41, 0.69] includes 0.5")
    assert not failed.measured and failed.status == NO_MEASUREMENT
    assert failed.text() == "no measurement: classifier AUC 0.55 [0.41, 0.69] includes 0.5"
    assert failed.to_dict() == {"status": "no measurement", "reason": failed.reason}
    with pytest.raises(ValueError, match="reason"):
        Measurement(NO_MEASUREMENT)
    with pytest.raises(ValueError, match="expected"):
        Measurement("maybe")
    assert first_failure([Measurement(), failed, Measurement.failed("later")]) is failed
    assert first_failure([Measurement()]).measured


def test_withheld_headline_values_are_none_with_their_reason():
    headline = {"pairs": 12, "teacher_like_dpo": 0.4, "teacher_like_dpo_ci": [0.3, 0.5]}
    out = withhold(headline, {"teacher_like_dpo": "AUC", "teacher_like_dpo_ci": "AUC"})
    assert out == {
        "pairs": 12,
        "teacher_like_dpo": None,
        "teacher_like_dpo_ci": None,
        "no_measurement": {"teacher_like_dpo": "AUC", "teacher_like_dpo_ci": "AUC"},
    }
    assert headline["teacher_like_dpo"] == 0.4  # the input is not changed
    again = withhold(out, {"f1_dpo": "one class"})
    assert again["no_measurement"] == {**out["no_measurement"], "f1_dpo": "one class"}
    assert withhold(headline, {}) == headline and "no_measurement" not in withhold(headline, {})
