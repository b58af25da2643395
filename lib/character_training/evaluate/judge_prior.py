"""Removing a forced-choice judge's own leaning between two trait words, by a fitted slope.

A forced-choice judge scores the two trait words after reading a reply. Part of its margin is
not about the reply at all: the judge prefers some words, whatever it read (its *prior*,
measured by scoring the same two words after an empty reply). Stage 07's first "calibrated"
mode subtracted that prior one for one, which assumes the leaning survives reading a reply
unchanged (slope 1). When it survives at half strength, subtracting all of it pushes every
ranking *against* the judge's taste and invents preferences (Elo spread ~77 against a null 95th
percentile of ~65, ranking correlated -0.85 with the prior, in the review's simulation).

Here the slope is estimated: across the matches of one model, the margin after the reply is
regressed on the prior margin through the origin (both are antisymmetric in the two words, so
no intercept), and only that fitted part is removed. Slope 0 removes nothing, slope 1 what the
old mode removed, 1.5 more. The regression cannot tell the judge's taste from a model whose
real preferences follow the same words: that part of a real preference is removed too, which
is why the calibrated mode is reported beside the plain one, and why a ranking that correlates
strongly with the prior (|rho| > 0.7, either sign) is reported as "no measurement".

Margins here are *both-order sums* towards one trait (order-swap position bias already
cancelled), as stage 07 computes them.
"""

from __future__ import annotations

import math

import numpy as np

PRIOR_CORRELATION_LIMIT = 0.7
"""|Spearman| between a model's Elo and the judge-prior Elo above which the ranking is taken as
explained by the judge's taste (issue 16: flag either direction)."""


def fit_prior_slope(margins: np.ndarray, prior: np.ndarray) -> np.ndarray:
    """Least-squares slope through the origin of ``margins`` on ``prior`` along the last axis.

    NaN where the prior is all zero. Works on one model (1-D) or many experiments (2-D).
    """
    margins, prior = np.asarray(margins, float), np.asarray(prior, float)
    denominator = (prior * prior).sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, (margins * prior).sum(axis=-1) / denominator, np.nan)


def remove_fitted_prior(margins: np.ndarray, prior: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``margins - slope * prior`` with the slope fitted per row; returns (margins, slope).

    A row whose slope cannot be fitted keeps its margins (nothing to remove).
    """
    slope = fit_prior_slope(margins, prior)
    usable = np.where(np.isfinite(slope), slope, 0.0)
    return np.asarray(margins, float) - usable[..., None] * np.asarray(prior, float), slope


def explained_by_prior(rho: float) -> bool:
    """True when a ranking's Spearman with the judge's prior ranking is beyond the limit."""
    return math.isfinite(rho) and abs(rho) > PRIOR_CORRELATION_LIMIT
