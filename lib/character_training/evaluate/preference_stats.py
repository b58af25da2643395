"""Stage 07's headline statistics, and whether its instrument could measure at all.

The per-trait table stays `elo.rate` (the paper's Elo, comparable with it). What a report leads
with is computed here with `elo_stats` on the same outcomes, each statistic beside its noise
floor (issue 16):

* per (model, condition, judge mode), `model_statistics`: the raw std of the Elo ratings across
  traits, the coin-flip floor the same matches give (``noise_floor``), the **spread beyond
  noise** with an interval that covers at its nominal rate (floored at 0: a model with no
  preference sits at 0, not at the ~30 Elo points coin flips give), and the split-half
  **reliability** of the ranking (Spearman–Brown corrected);
* per two models judged on the same matches, `pair_statistics`: the paired change of the std
  and Spearman's rho with its paired interval, beside both reliabilities, the **ceiling**
  ``sqrt(rel_a * rel_b)`` (the rho two measurements of unchanged preferences would show) and
  the disattenuated rho. A rho of 0.75 means "unchanged" when the ceiling is 0.75.

`check_measurement` says when a number must not be read at all ("no measurement", with a
one-line reason): the generative judge parsed fewer than `MIN_PARSE_RATE` of its answers; fewer
than `MIN_DECIDED_SHARE` of the matches got a verdict (with both listing orders asked, that
means the orders disagreed on most: the judge's position bias decided, not the reply); or, in
a forced-choice mode, the ranking correlates with the judge's empty-reply prior beyond
`judge_prior.PRIOR_CORRELATION_LIMIT` in either direction (it reflects which words the judge
likes, or the calibration's over-correction of that).

Every bootstrap seed depends on the condition and mode only (`preference_matches.
bootstrap_seed`), never on the model: two models judged on the same matches get the same
resamples, so their differences are paired.
"""

from __future__ import annotations

import math
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from . import elo as elo_math
from . import elo_stats
from .intervals import Measurement, first_failure
from .judge_prior import PRIOR_CORRELATION_LIMIT, explained_by_prior
from .preference_judging import FORCED_CHOICE_MODES

MIN_PARSE_RATE = 0.5
"""Share of the generative judge's single answers the strict parser must read; below it, the
generative verdicts are mostly missing and what is left is a selected minority."""

MIN_DECIDED_SHARE = 0.2
"""Share of matches that must get a verdict. Forced choice decides nearly every match; the
generative mode loses a match to an unparsed answer or to the two listing orders naming
different traits. Below a fifth, the verdicts left are those where the judge happened to agree
with itself: too few, and not a random sample of the matches."""

RELIABILITY_SPLITS = 20
"""Random half-splits of the matches averaged for the split-half reliability."""


def check_measurement(
    mode: str,
    decided: int,
    matches: int,
    parse_rate: float = math.nan,
    order_inconsistent: float = math.nan,
    prior_spearman: float = math.nan,
) -> Measurement:
    """Whether one (model, condition, mode)'s ranking measures the model; else why not."""
    if mode == "generative" and math.isfinite(parse_rate) and parse_rate < MIN_PARSE_RATE:
        return Measurement.failed(
            f"the generative judge's answers parsed {parse_rate:.0%} of the time "
            f"(below {MIN_PARSE_RATE:.0%})"
        )
    share = decided / matches if matches else 0.0
    if share < MIN_DECIDED_SHARE:
        why = (
            f"; the two listing orders disagreed on {order_inconsistent:.0%} of the matches "
            "where both were read (the judge's position bias decided, not the reply)"
            if math.isfinite(order_inconsistent)
            else ""
        )
        return Measurement.failed(
            f"only {share:.0%} of the matches got a verdict (below {MIN_DECIDED_SHARE:.0%}){why}"
        )
    if mode in FORCED_CHOICE_MODES and explained_by_prior(prior_spearman):
        return Measurement.failed(
            f"the ranking follows the judge's empty-reply prior (Spearman {prior_spearman:+.2f}, "
            f"|rho| > {PRIOR_CORRELATION_LIMIT}): it reflects the judge's taste in words, "
            "not the model's choices"
        )
    return Measurement()


def _value(x: Any) -> float:
    return elo_stats.as_float(x)


@contextmanager
def _quiet():
    """Statistics of a table with no decided match are NaN, not warnings in a report."""
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


@dataclass(frozen=True)
class ModelStatistics:
    """The headline statistics of one (model, condition, judge mode); see the module docstring.

    ``std`` is the raw std of the Elo ratings across traits, ``noise_floor`` the root mean
    square std of coin flips on the same matches, ``beyond_noise`` ``sqrt(max(std^2 -
    noise_floor^2, 0))`` with its interval (``beyond_low``, ``beyond_high``); ``reliability`` the
    split-half reliability of the ranking; ``parse_rate`` (generative), ``order_inconsistent``
    (share of matches whose two listing orders disagreed), ``prior_spearman`` (rho with the
    judge's prior ranking; it decides "no measurement" in a forced-choice mode only) and
    ``prior_slope`` (calibrated: the fitted slope) describe the judge; ``measurement`` says
    whether the numbers may be read.
    """

    model: str
    condition: str
    mode: str
    matches: int
    decided: int
    std: float
    noise_floor: float
    beyond_noise: float
    beyond_low: float
    beyond_high: float
    reliability: float
    parse_rate: float = math.nan
    order_inconsistent: float = math.nan
    prior_spearman: float = math.nan
    prior_slope: float = math.nan
    measurement: Measurement = field(default_factory=Measurement)

    @property
    def decided_share(self) -> float:
        return self.decided / self.matches if self.matches else math.nan

    def row(self) -> dict[str, Any]:
        """A flat record: every field, ``decided_share``, ``status`` and ``reason``."""
        out = {k: v for k, v in asdict(self).items() if k != "measurement"}
        return {**out, "decided_share": self.decided_share, **self.measurement.to_dict()}


def model_statistics(
    model: str,
    condition: str,
    mode: str,
    outcomes: elo_stats.Outcomes,
    n_boot: int,
    seed: int,
    *,
    parse_rate: float = math.nan,
    order_inconsistent: float = math.nan,
    prior_spearman: float = math.nan,
    prior_slope: float = math.nan,
) -> ModelStatistics:
    """Spread beyond noise, reliability and the measurement check of one model's outcomes."""
    with _quiet():
        spread = elo_stats.spread_beyond_noise(outcomes, n_boot, seed)
        reliability = elo_stats.split_half_reliability(outcomes, RELIABILITY_SPLITS, seed + 2)
    decided = int(outcomes.valid.sum())
    return ModelStatistics(
        model=model,
        condition=condition,
        mode=mode,
        matches=outcomes.matches,
        decided=decided,
        std=_value(spread.raw),
        noise_floor=_value(spread.noise),
        beyond_noise=_value(spread.beyond),
        beyond_low=_value(spread.low),
        beyond_high=_value(spread.high),
        reliability=_value(reliability),
        parse_rate=parse_rate,
        order_inconsistent=order_inconsistent,
        prior_spearman=prior_spearman,
        prior_slope=prior_slope,
        measurement=check_measurement(
            mode, decided, outcomes.matches, parse_rate, order_inconsistent, prior_spearman
        ),
    )


@dataclass(frozen=True)
class PairStatistics:
    """Two models judged on the same matches (``b`` after ``a``: ``std_change`` is b - a).

    ``spearman`` with its paired interval (``ci_low``, ``ci_high``) and p-value, both models'
    reliabilities, the ``ceiling`` sqrt(rel_a * rel_b) and ``disattenuated`` rho / ceiling;
    ``measurement`` fails when either model's does (its reason names the model).
    """

    condition: str
    mode: str
    a: str
    b: str
    std_change: float
    change_low: float
    change_high: float
    spearman: float
    ci_low: float
    ci_high: float
    p_value: float
    reliability_a: float
    reliability_b: float
    ceiling: float
    disattenuated: float
    measurement: Measurement = field(default_factory=Measurement)
    agreement: Measurement = field(default_factory=Measurement)

    def row(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k not in ("measurement", "agreement")}
        spearman = {
            "spearman_status": self.agreement.status,
            "spearman_reason": self.agreement.reason,
        }
        return {**out, **self.measurement.to_dict(), **spearman}


def agreement_check(rho_low: float, ceiling: float) -> Measurement:
    """Whether the two rankings' Spearman can be read as agreement of the models' preferences.

    Two rankings whose only shared part is the models' preferences cannot correlate above the
    ceiling their own split-half reliabilities set. When the whole interval lies above it, the
    rankings share something the reliabilities do not see: the same judge reading the same
    trait pairs and prompts (its taste for some trait words), not the models. Such a rho says
    nothing about what training did, whatever its p-value.
    """
    if math.isfinite(rho_low) and math.isfinite(ceiling) and rho_low > ceiling:
        return Measurement.failed(
            f"Spearman's interval (low {rho_low:.2f}) lies above the ceiling {ceiling:.2f} "
            "that the models' own split-half reliabilities allow: the rankings agree through "
            "the shared judge and matches, not through the models' preferences"
        )
    return Measurement()


def pair_statistics(
    a: ModelStatistics,
    b: ModelStatistics,
    outcomes_a: elo_stats.Outcomes,
    outcomes_b: elo_stats.Outcomes,
    n_boot: int,
    seed: int,
) -> PairStatistics:
    """Paired spread change (b - a) and rank agreement of two models with its ceiling."""
    with _quiet():
        change = elo_stats.paired_spread_change(outcomes_b, outcomes_a, n_boot, seed)
        agreement = elo_stats.paired_spearman(
            outcomes_a, outcomes_b, n_boot, seed, n_splits=RELIABILITY_SPLITS
        )
        ratings_a, ratings_b = elo_stats.elo(outcomes_a)[0], elo_stats.elo(outcomes_b)[0]
        _, p_value = elo_math.spearman(ratings_a, ratings_b)
    failed = [
        Measurement.failed(f"{stats.model}: {stats.measurement.reason}")
        for stats in (a, b)
        if not stats.measurement.measured
    ]
    return PairStatistics(
        condition=a.condition,
        mode=a.mode,
        a=a.model,
        b=b.model,
        std_change=_value(change.value),
        change_low=_value(change.low),
        change_high=_value(change.high),
        spearman=_value(agreement.rho),
        ci_low=_value(agreement.low),
        ci_high=_value(agreement.high),
        p_value=p_value,
        reliability_a=_value(agreement.reliability_a),
        reliability_b=_value(agreement.reliability_b),
        ceiling=_value(agreement.ceiling),
        disattenuated=_value(agreement.disattenuated),
        measurement=first_failure(failed),
        agreement=agreement_check(_value(agreement.low), _value(agreement.ceiling)),
    )


__all__ = [
    "agreement_check",
    "MIN_DECIDED_SHARE",
    "MIN_PARSE_RATE",
    "RELIABILITY_SPLITS",
    "ModelStatistics",
    "PairStatistics",
    "check_measurement",
    "model_statistics",
    "pair_statistics",
]
