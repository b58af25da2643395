"""The calibration loop: false-positive rate, coverage and detectable effect of one statistic.

A `Case` is a headline statistic with a simulator: ``simulate(effect, reps, rng)`` runs
``reps`` independent simulated experiments at a known true ``effect`` (0 is "nothing there")
through the project's own estimator and returns, per experiment, the estimate, its 95%
interval and the truth the interval should cover (`Trial`). `calibrate_case` then measures:

* **false-positive rate**: at effect 0, the share of experiments whose interval excludes the
  null value (or whose verdict claims an effect), to compare with the nominal 5%;
* **coverage**: the share of intervals that contain the truth, at effect 0 and at the
  detectable effect; the lower of the two is reported. An experiment where the instrument
  reports "no measurement" (no interval) is not a false positive and has no interval to
  cover; how often that happens at no effect is reported as ``no_measurement_rate``;
* **detectable effect**: the true effect (in the statistic's own unit) found with 80% power,
  from the null run's standard error (``(1.96 + 0.84) * SE``, the usual normal
  approximation), then checked: the experiments are rerun at that effect and the measured
  power is reported beside it (one correction step when it is far from 0.8).

Both rates carry their Monte Carlo standard error (`mc_se`): with ``reps`` experiments a rate
is only known to ``sqrt(p (1 - p) / reps)``.

The truth of an experiment is what the statistic estimates at this design *given* the
experiment's true preferences (a Monte-Carlo mean over fresh replicates when it has no closed
form), so coverage is about the interval, not about a model that differs from the design.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.stats import norm

POWER = 0.8
Z_ALPHA = float(norm.ppf(0.975))
Z_POWER = float(norm.ppf(POWER))


@dataclass(frozen=True)
class Trial:
    """Per simulated experiment: estimate, interval, truth (NaN interval: no measurement), and
    for a verdict (RLAIF's "reward hacking") whether it was called."""

    estimate: np.ndarray
    low: np.ndarray
    high: np.ndarray
    truth: np.ndarray
    claims: np.ndarray | None = None  # a verdict statistic: where it claims an effect

    @classmethod
    def truth_only(cls, truth: np.ndarray) -> Trial:
        """A search run's trial (``intervals`` False): the truth alone, no estimates."""
        nan = np.full_like(truth, np.nan)
        return cls(nan, nan, nan, truth)

    @classmethod
    def of(cls, estimates: Sequence[Any], truth: np.ndarray, value: str = "value") -> Trial:
        """One experiment per estimate: its ``value`` (or the attribute named), ``low`` and
        ``high``."""
        return cls(
            np.array([getattr(e, value) for e in estimates]),
            np.array([e.low for e in estimates]),
            np.array([e.high for e in estimates]),
            truth,
        )

    def measured(self) -> np.ndarray:
        return np.isfinite(self.low) & np.isfinite(self.high)

    def excludes(self, value: float) -> np.ndarray:
        """Where the experiment claims an effect: its verdict, else its interval excluding
        ``value``."""
        if self.claims is not None:
            return self.claims
        return self.measured() & ((self.low > value) | (self.high < value))

    def covers(self) -> np.ndarray:
        """Per *measured* experiment: the interval contains the truth."""
        m = self.measured()
        return (self.low[m] <= self.truth[m]) & (self.truth[m] <= self.high[m])


@dataclass(frozen=True)
class Case:
    """A headline statistic and how to simulate it.

    ``simulate(knob, reps, rng, intervals)`` takes the simulator's own *knob* (for the Elo
    spread change: how much wider
    the trained model's utilities are, in nats), 0 meaning no effect; the effect reported is
    the mean truth in the statistic's unit. The truth must grow with the knob within
    ``knob_range``, which is where the detectable effect is searched; with ``intervals``
    False only the truth is needed (the search), so the estimator's bootstrap is skipped.
    """

    statistic: str
    unit: str
    null_value: float
    simulate: Callable[[float, int, np.random.Generator, bool], Trial]
    knob_range: tuple[float, float]
    note: str = ""


@dataclass(frozen=True)
class Row:
    statistic: str
    false_positive_rate: float
    coverage: float
    detectable_effect: float
    power_at_detectable: float
    unit: str
    reps: int
    no_measurement_rate: float = 0.0
    note: str = ""
    false_positive_mc_se: float = math.nan  # Monte Carlo standard error of the rate
    coverage_mc_se: float = math.nan

    def as_dict(self) -> dict[str, object]:
        return {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in vars(self).items()
        }


def _rate(mask: np.ndarray) -> float:
    return float(np.mean(mask)) if mask.size else math.nan


def mc_se(rate: float, n: int) -> float:
    """Monte Carlo standard error of a rate measured on ``n`` simulated experiments,
    ``sqrt(p (1 - p) / n)``: at 200 experiments a coverage of 0.95 is known to about +-0.015,
    so 0.92 is 2 standard errors off; rerun with more ``--reps`` before calling it real."""
    if n <= 0 or not math.isfinite(rate):
        return math.nan
    return math.sqrt(rate * (1 - rate) / n)


def _mean_truth(trial: Trial) -> float:
    finite = trial.truth[np.isfinite(trial.truth)]
    return float(finite.mean()) if finite.size else math.nan


def _knob_for(case: Case, target: float, reps: int, rng: np.random.Generator) -> float:
    """The knob whose mean truth is ``target``: a few cheap bisection steps on small trials."""
    low, high = case.knob_range
    for _ in range(6):
        mid = 0.5 * (low + high)
        trial = case.simulate(mid, max(reps // 4, 16), rng, False)
        effect = _mean_truth(trial) - case.null_value
        if not math.isfinite(effect):
            break
        if effect < target:
            low = mid
        else:
            high = mid
    return 0.5 * (low + high)


def calibrate_case(case: Case, reps: int, seed: int) -> Row:
    """Simulate ``case`` at no effect and at its detectable effect; one table row."""
    rng = np.random.default_rng(seed)
    null = case.simulate(0.0, reps, rng, True)
    fpr = _rate(null.excludes(case.null_value))
    fpr_se = mc_se(fpr, reps)
    coverage = _rate(null.covers())
    coverage_se = mc_se(coverage, null.covers().size)
    measured = null.measured()
    unmeasured = 1.0 - _rate(measured)
    if not measured.any():
        return Row(
            case.statistic,
            fpr,
            coverage,
            math.nan,
            math.nan,
            case.unit,
            reps,
            unmeasured,
            case.note,
            fpr_se,
            coverage_se,
        )
    se = float(np.mean((null.high - null.low)[measured])) / (2 * Z_ALPHA)
    target = (Z_ALPHA + Z_POWER) * se
    knob = _knob_for(case, target, reps, rng)
    alt = case.simulate(knob, reps, rng, True)
    power = _rate(alt.excludes(case.null_value))
    if 0 < power < 1 and abs(power - POWER) > 0.1:  # one normal-approximation correction
        z = float(norm.ppf(power)) + Z_ALPHA
        if z > 0:
            knob = _knob_for(case, target * (Z_ALPHA + Z_POWER) / z, reps, rng)
            alt = case.simulate(knob, reps, rng, True)
            power = _rate(alt.excludes(case.null_value))
    if _rate(alt.covers()) < coverage:
        coverage = _rate(alt.covers())
        coverage_se = mc_se(coverage, alt.covers().size)
    effect = _mean_truth(alt) - case.null_value
    note = case.note
    if power < POWER - 0.1 and knob >= case.knob_range[1] * 0.98:
        note = "; ".join(
            n
            for n in (
                case.note,
                f"80% power not reached: the largest simulated effect ({effect:.3g} "
                f"{case.unit}) is found with power {power:.2f}",
            )
            if n
        )
        effect = math.inf
    return Row(
        case.statistic,
        fpr,
        coverage,
        effect,
        power,
        case.unit,
        reps,
        unmeasured,
        note,
        fpr_se,
        coverage_se,
    )
