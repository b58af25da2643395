"""Calibration cases of stage 07's headline statistics on simulated revealed preferences.

Every world carries the nuisances the review found: a judge that leans towards the trait
listed first, a judge with a taste for some words, and a model that leans towards the trait
offered first. Verdicts are read as stage 07 reads them (both listing orders, margins summed).
"""

from __future__ import annotations

import numpy as np

from ..evaluate import elo_stats
from ..evaluate.judge_prior import PRIOR_CORRELATION_LIMIT, remove_fitted_prior
from .elo_world import (
    Design,
    Judge,
    Matches,
    draw_matches,
    judge_margins,
    outcomes_from_margins,
    play_model,
    related,
    utilities,
)
from .harness import Case, Trial

NUISANCE_JUDGE = Judge(signal=1.5, position=1.0, taste=0.3, noise=1.0)
OFFER_BIAS = 0.3  # the model's leaning (nats) towards the trait offered first
BASE_SPREAD = 0.5  # std of the base model's true utilities (nats)
TRUTH_REPLICATES = 24  # fresh experiments per simulated one to get its conditional truth
# The detectable-effect search (``intervals`` False) needs only the *mean* truth over its
# experiments, which fewer replicates estimate as well (the mean of a mean): 4x less work there.
SEARCH_REPLICATES = 6


def _replicates(intervals: bool) -> int:
    return TRUTH_REPLICATES if intervals else SEARCH_REPLICATES


def _pair(design: Design, judge: Judge, u_after, u_before, rng, protocol: str = "both"):
    """Two models on the same matches (pairs and judge), each offered the two traits in its
    own random order, as stage 07 does (`preference_matches.offered_first`, per model): a
    shared order would let the models' leaning towards the first-offered trait make unrelated
    preferences look alike."""
    matches = draw_matches(design, u_after.shape[0], rng)
    swap = rng.random(matches.first.shape, dtype=np.float32) < 0.5
    reordered = Matches(
        np.where(swap, matches.second, matches.first),
        np.where(swap, matches.first, matches.second),
        matches.judge_first_is_first,
        matches.taste,
    )
    return (
        play_model(matches, u_after, judge, protocol, rng, OFFER_BIAS),
        play_model(reordered, u_before, judge, protocol, rng, OFFER_BIAS),
    )


def _replicated(u: np.ndarray, replicates: int = TRUTH_REPLICATES) -> np.ndarray:
    return np.repeat(u, replicates, axis=0)


def _per_experiment_mean(values: np.ndarray, experiments: int) -> np.ndarray:
    values = values.reshape(experiments, -1)  # [E, replicates]
    finite = np.isfinite(values)
    return np.where(
        finite.any(axis=1),
        np.where(finite, values, 0.0).sum(axis=1) / np.maximum(finite.sum(axis=1), 1),
        np.nan,
    )


def spread_change_case(design: Design, n_boot: int, judge: Judge = NUISANCE_JUDGE) -> Case:
    """Elo spread change final - base; knob: the trained utilities are (1 + knob) times wider,
    same ranking. No effect: the same preferences measured twice."""

    def simulate(knob: float, reps: int, rng: np.random.Generator, intervals: bool) -> Trial:
        u_before = utilities(BASE_SPREAD, reps, design.traits, rng)
        u_after = u_before * (1.0 + knob)
        n = _replicates(intervals)
        a, b = _pair(design, judge, _replicated(u_after, n), _replicated(u_before, n), rng)
        truth = _per_experiment_mean(
            elo_stats.elo(a).std(axis=1) - elo_stats.elo(b).std(axis=1), reps
        )
        if not intervals:
            return Trial.truth_only(truth)
        after, before = _pair(design, judge, u_after, u_before, rng)
        change = elo_stats.paired_spread_change(after, before, n_boot, int(rng.integers(1 << 31)))
        return Trial(change.value, change.low, change.high, truth)

    return Case("Elo spread change (final - base)", "Elo points", 0.0, simulate, (0.0, 4.0))


def spearman_case(design: Design, n_boot: int, judge: Judge = NUISANCE_JUDGE) -> Case:
    """Spearman between base and final Elo; knob: correlation of their true utilities. No
    effect: unrelated preferences (with the judge's position bias and the model's offer
    bias, which made unrelated models look alike when every model shared one order)."""

    def simulate(knob: float, reps: int, rng: np.random.Generator, intervals: bool) -> Trial:
        u_before = utilities(BASE_SPREAD * 2, reps, design.traits, rng)
        u_after = related(u_before, knob, BASE_SPREAD * 2, rng)
        n = _replicates(intervals)
        a, b = _pair(design, judge, _replicated(u_after, n), _replicated(u_before, n), rng)
        truth = _per_experiment_mean(
            elo_stats.spearman_rows(elo_stats.elo(a), elo_stats.elo(b)), reps
        )
        if not intervals:
            return Trial.truth_only(truth)
        after, before = _pair(design, judge, u_after, u_before, rng)
        agreement = elo_stats.paired_spearman(
            after, before, n_boot, int(rng.integers(1 << 31)), n_splits=4
        )
        return Trial(agreement.rho, agreement.low, agreement.high, truth)

    return Case("Spearman vs base", "rho", 0.0, simulate, (0.0, 1.0))


def _true_spread(outcomes: elo_stats.Outcomes, reps: int, rng: np.random.Generator) -> np.ndarray:
    """Per experiment: the Elo spread beyond the coin-flip floor over its many replicated
    match sets (the truth an interval is checked against)."""
    s2 = _per_experiment_mean(elo_stats.elo(outcomes).std(axis=1) ** 2, reps)
    n2 = _per_experiment_mean(
        elo_stats.coin_flip_std2(outcomes, 1, int(rng.integers(1 << 31))), reps
    )
    return np.sqrt(np.maximum(s2 - n2, 0.0))


def spread_case(design: Design, n_boot: int, judge: Judge = NUISANCE_JUDGE) -> Case:
    """One model's Elo spread beyond the coin-flip floor; knob: std of its utilities (nats)."""

    def simulate(knob: float, reps: int, rng: np.random.Generator, intervals: bool) -> Trial:
        u = utilities(knob, reps, design.traits, rng)
        many = _replicated(u, _replicates(intervals))
        matches = draw_matches(design, many.shape[0], rng)
        many = play_model(matches, many, judge, "both", rng, OFFER_BIAS)
        truth = _true_spread(many, reps, rng)
        if not intervals:
            return Trial.truth_only(truth)
        outcomes = play_model(draw_matches(design, reps, rng), u, judge, "both", rng, OFFER_BIAS)
        spread = elo_stats.spread_beyond_noise(outcomes, n_boot, int(rng.integers(1 << 31)))
        return Trial(spread.beyond, spread.low, spread.high, truth)

    return Case("Elo spread beyond noise (one model)", "Elo points", 0.0, simulate, (0.0, 3.0))


TASTE_JUDGE = Judge(signal=1.5, position=1.0, taste=1.0, noise=1.0)


def _calibrated_outcomes(matches, u, judge, rng, slope, mode):
    margins, prior = judge_margins(matches, u, judge, rng, OFFER_BIAS, slope)
    if mode == "fitted":
        margins, _ = remove_fitted_prior(margins, prior)
    elif mode == "slope1":
        margins = margins - prior
    return outcomes_from_margins(matches, margins, u.shape[1]), prior


def _prior_flags(matches, outcomes: elo_stats.Outcomes, prior: np.ndarray) -> np.ndarray:
    """Per experiment: the ranking correlates with the judge's prior ranking beyond the limit."""
    prior_outcomes = outcomes_from_margins(matches, prior, outcomes.n_traits)
    rho = elo_stats.spearman_rows(elo_stats.elo(outcomes), elo_stats.elo(prior_outcomes))
    return np.abs(np.nan_to_num(rho)) > PRIOR_CORRELATION_LIMIT


def calibrated_spread_case(
    design: Design, n_boot: int, slope: float, mode: str = "fitted", judge: Judge = TASTE_JUDGE
) -> Case:
    """One model's spread beyond noise read through a prior-calibrated judge whose leaning
    survives a reply at ``slope`` times its empty-reply strength; knob: utility std (nats).
    ``mode``: "fitted" (stage 07's calibrated mode: fitted slope), "slope1" (the retired
    one-for-one subtraction) or "plain" (no calibration). A ranking explained by the prior
    (|rho| > 0.7) is "no measurement", as the stage reports it."""

    def simulate(knob: float, reps: int, rng: np.random.Generator, intervals: bool) -> Trial:
        u = utilities(knob, reps, design.traits, rng)
        many = _replicated(u, _replicates(intervals))
        matches = draw_matches(design, many.shape[0], rng)
        outcomes, _ = _calibrated_outcomes(matches, many, judge, rng, slope, mode)
        truth = _true_spread(outcomes, reps, rng)
        if not intervals:
            return Trial.truth_only(truth)
        matches = draw_matches(design, reps, rng)
        outcomes, prior = _calibrated_outcomes(matches, u, judge, rng, slope, mode)
        spread = elo_stats.spread_beyond_noise(outcomes, n_boot, int(rng.integers(1 << 31)))
        flagged = _prior_flags(matches, outcomes, prior)
        low = np.where(flagged, np.nan, spread.low)
        high = np.where(flagged, np.nan, spread.high)
        return Trial(spread.beyond, low, high, truth)

    label = {"fitted": "fitted slope", "slope1": "slope-1 subtraction", "plain": "no calibration"}
    return Case(
        f"Elo spread beyond noise, judge leaning x{slope:g} ({label[mode]})",
        "Elo points",
        0.0,
        simulate,
        (0.0, 3.0),
    )
