"""Prompt-level bootstrap intervals, and the verdict of an instrument that could not measure.

Several measures (adherence, robustness, RLAIF reply lengths) report shares and means of
replies, several replies per prompt. Replies to one prompt share that prompt's difficulty, so
an interval that resampled replies would be too narrow; these resample whole prompts (groups).
A difference between two models is bootstrapped with the same prompt draws on both sides
(paired), which cancels prompt difficulty instead of adding two intervals' noise.

The resampling and the interval are scipy's (`scipy.stats.bootstrap`, bias-corrected and
accelerated, BCa): the unit of resampling is a prompt's index, and every statistic here is a
function of how often each prompt was drawn (`bootstrap_groups`), so the same code serves a
pooled mean, a paired difference, an AUC (`teacher_classifier.auc_interval`) and a macro F1
(`robustness.bootstrap_macro_f1`). BCa corrects the percentile interval's bias and skew (a
share near 0 or 1, a macro F1 bounded above). Where BCa is undefined the interval falls back
and `Estimate.method` says so: "percentile" when the jackknife has no spread or some resamples
give no value (BCa's acceleration or bias correction is then undefined), "point" when every
resample gives the same value or there is a single prompt (nothing to resample). Every
interval is seeded, so a rerun gives the same bounds.

`Measurement` is the other half of a number: whether the instrument behind it could measure at
all. A classifier at chance gives a number that reads as "no effect"; the reports, headline
JSON and summary show "no measurement" with the reason instead (`withhold`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ..errors import DataError

MEASURED = "measured"
NO_MEASUREMENT = "no measurement"


@dataclass(frozen=True)
class Estimate:
    """A point estimate with an interval at ``level``; ``method`` is how the interval was
    made: "BCa", "percentile" (BCa undefined), "t" or "jackknife-t" (few prompts, see
    `SMALL_SAMPLE`) or "point" (no spread to resample)."""

    value: float
    low: float
    high: float
    level: float = 0.95
    method: str = "BCa"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def text(self, digits: int = 2) -> str:
        """``0.55 [0.41, 0.69]``: the value and its interval, for one-line reasons."""
        return f"{self.value:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"


# -- the bootstrap over groups -------------------------------------------------------------------
Statistic = Callable[[np.ndarray], np.ndarray]
"""Maps draw counts of shape (resamples, groups) to one value per resample, shape (resamples,)."""


def draw_counts(indices: np.ndarray, n_groups: int) -> np.ndarray:
    """How often each group appears in each resample: (..., k) drawn indices -> (..., n_groups)
    counts, as float64 (one `bincount` over all resamples at once)."""
    indices = np.asarray(indices, dtype=np.int64)
    lead, k = indices.shape[:-1], indices.shape[-1]
    flat = indices.reshape(-1, k)
    offsets = n_groups * np.arange(len(flat), dtype=np.int64)[:, None]
    counts = np.bincount((flat + offsets).ravel(), minlength=len(flat) * n_groups)
    return counts.reshape(*lead, n_groups).astype(np.float64)


def bootstrap_groups(
    statistic: Statistic, n_groups: int, n_resamples: int, seed: int, level: float = 0.95
) -> Estimate:
    """``statistic`` on all groups, with a BCa interval that resamples whole groups (prompts).

    ``statistic(weights)`` takes a (resamples, n_groups) array of how often each group was
    drawn and returns one value per row; the point value is its value with every group drawn
    once. scipy draws the resamples (``rng`` seeded with ``seed``) and its jackknife leaves one
    group out at a time. Fallbacks, recorded in ``method``: a single group gives the point as
    its interval ("point"); when BCa is undefined (all jackknife values equal, or resamples
    whose statistic is NaN, e.g. an AUC on a draw without a student reply) the percentile
    interval of the finite resampled values ("percentile"), which is the point when they are
    all equal ("point").
    """
    from scipy.stats import bootstrap

    if n_groups < 1:
        raise DataError("bootstrap: no groups to resample")
    if n_resamples < 1:
        raise DataError(f"bootstrap: n_resamples={n_resamples!r}, expected >= 1")

    def on_indices(indices: np.ndarray, axis: int = -1) -> np.ndarray:
        weights = draw_counts(indices, n_groups)
        flat = weights.reshape(-1, n_groups)
        return np.asarray(statistic(flat), dtype=np.float64).reshape(weights.shape[:-1])

    value = float(statistic(np.ones((1, n_groups)))[0])
    if n_groups == 1:
        return Estimate(value, value, value, level, "point")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy's DegenerateDataWarning; the fallback handles it
        with np.errstate(divide="ignore", invalid="ignore"):
            result = bootstrap(
                (np.arange(n_groups),),
                on_indices,
                n_resamples=n_resamples,
                vectorized=True,
                axis=-1,
                confidence_level=level,
                method="BCa",
                rng=np.random.default_rng(seed),
            )
    low, high = float(result.confidence_interval.low), float(result.confidence_interval.high)
    stats = np.asarray(result.bootstrap_distribution, dtype=np.float64)
    if math.isfinite(low) and math.isfinite(high) and np.isfinite(stats).all():
        return Estimate(value, low, high, level, "BCa")
    finite = stats[np.isfinite(stats)]
    if not len(finite) or np.ptp(finite) == 0:
        return Estimate(value, value, value, level, "point")
    tail = (1 - level) / 2
    low, high = np.quantile(finite, [tail, 1 - tail])
    return Estimate(value, float(low), float(high), level, "percentile")


def _group_arrays(groups: Iterable[Sequence[float]]) -> tuple[np.ndarray, np.ndarray]:
    sums, counts = [], []
    for values in groups:
        values = np.asarray(values, dtype=np.float64)
        if len(values):
            sums.append(values.sum())
            counts.append(len(values))
    return np.array(sums), np.array(counts, dtype=np.float64)


def bootstrap_mean(
    groups: Iterable[Sequence[float]], n_resamples: int, seed: int, level: float = 0.95
) -> Estimate:
    """Mean over all values, with a BCa interval that resamples whole groups (prompts).

    The statistic is the pooled mean of the drawn groups' values (a ratio of sums, so a group
    weighs by its number of values; with equal group sizes it is the mean of the per-prompt
    means). Values of one prompt share the prompt's difficulty, so resampling values instead
    would make the interval too narrow. Groups without values are ignored. When every value is
    the same, every resample gives it and the interval is that point (``method`` "point").
    """
    sums, counts = _group_arrays(groups)
    if not len(sums):
        raise DataError("bootstrap_mean: no values to average")

    def pooled_mean(weights: np.ndarray) -> np.ndarray:
        return (weights @ sums) / (weights @ counts)

    return bootstrap_groups(pooled_mean, len(sums), n_resamples, seed, level)


SMALL_SAMPLE = 30
"""Below this many paired prompts a difference gets a Student-t interval instead of BCa (on the
per-prompt differences of a mean, `paired_bootstrap_difference`; from the jackknife standard
error of a macro F1 difference, `jackknife_t_interval`): `calibrate` measured BCa's
false-positive rate at 0.12 on 14 prompts with one binary reply each (t: 0.07), and its
coverage of the F1 difference on 6 prompts at 0.86, while both hold their level from 30
prompts up."""


def paired_bootstrap_difference(
    a: Mapping[str, Sequence[float]],
    b: Mapping[str, Sequence[float]],
    n_resamples: int,
    seed: int,
    level: float = 0.95,
) -> tuple[Estimate, int]:
    """Mean of ``a`` minus mean of ``b`` over the prompts both have, and how many those are.

    Both sides are resampled with the *same* prompt draws (one BCa bootstrap over the shared
    prompts), so a prompt that is hard for both models moves both means together and cancels
    in the difference. With fewer than `SMALL_SAMPLE` prompts the interval is Student's t on
    the per-prompt differences of means (method "t"), which keeps its level there where BCa
    does not.
    """
    common = [k for k in a if len(a[k]) and k in b and len(b[k])]
    if not common:
        raise DataError("paired_bootstrap_difference: the two sides share no prompt with values")
    sums_a, counts_a = _group_arrays(a[k] for k in common)
    sums_b, counts_b = _group_arrays(b[k] for k in common)

    def difference(weights: np.ndarray) -> np.ndarray:
        return (weights @ sums_a) / (weights @ counts_a) - (weights @ sums_b) / (weights @ counts_b)

    if 2 <= len(common) < SMALL_SAMPLE:
        return _t_interval(sums_a / counts_a - sums_b / counts_b, difference, level), len(common)
    return bootstrap_groups(difference, len(common), n_resamples, seed, level), len(common)


def jackknife_t_interval(statistic: Statistic, n_groups: int, level: float = 0.95) -> Estimate:
    """``statistic`` on all groups with a Student-t interval from its leave-one-group-out
    (jackknife) standard error, on ``n_groups - 1`` degrees of freedom (method "jackknife-t").

    For statistics that are not a mean of per-prompt values (a macro F1 and its paired
    difference) on few prompts, where BCa is too narrow: on 6 held-out prompts its interval
    of the F1 difference covered 0.84-0.87 (`calibrate`), the jackknife-t one 0.93-0.97. The
    jackknife variance of a smooth statistic is about unbiased and errs high, and the t
    quantile pays for estimating it from few prompts. For a mean of one value per prompt it
    is exactly the one-sample t interval. Leave-one-out values that are NaN are left out; with
    fewer than two left, or no spread, the interval is the point ("point").
    """
    from scipy.stats import t

    if n_groups < 1:
        raise DataError("jackknife: no groups to leave out")
    value = float(statistic(np.ones((1, n_groups)))[0])
    if n_groups == 1:
        return Estimate(value, value, value, level, "point")
    with np.errstate(divide="ignore", invalid="ignore"):
        left_out = np.asarray(statistic(1.0 - np.eye(n_groups)), dtype=np.float64)
    left_out = left_out[np.isfinite(left_out)]
    n = len(left_out)
    spread = float(np.sum((left_out - left_out.mean()) ** 2)) if n >= 2 else 0.0
    if spread == 0 or not math.isfinite(value):
        return Estimate(value, value, value, level, "point")
    half = float(t.ppf((1 + level) / 2, n - 1)) * math.sqrt((n - 1) / n * spread)
    return Estimate(value, value - half, value + half, level, "jackknife-t")


def _t_interval(per_prompt: np.ndarray, statistic: Statistic, level: float) -> Estimate:
    """The pooled point value with a Student-t interval from the per-prompt values' spread."""
    from scipy.stats import t

    value = float(statistic(np.ones((1, len(per_prompt))))[0])
    spread = float(np.std(per_prompt, ddof=1))
    if spread == 0:
        return Estimate(value, value, value, level, "point")
    half = float(t.ppf((1 + level) / 2, len(per_prompt) - 1)) * spread / np.sqrt(len(per_prompt))
    return Estimate(value, value - half, value + half, level, "t")


# -- instruments that cannot measure -------------------------------------------------------------
@dataclass(frozen=True)
class Measurement:
    """Whether an instrument could measure: ``status`` is "measured" or "no measurement", and
    ``reason`` one line saying why not (e.g. "classifier AUC 0.55 [0.41, 0.69] includes 0.5: it
    cannot tell the teacher's replies from the student's"). Reports keep the raw numbers next
    to it for diagnosis; headline values derived from a failed instrument become None
    (`withhold`)."""

    status: str = MEASURED
    reason: str = ""

    def __post_init__(self) -> None:
        if self.status not in (MEASURED, NO_MEASUREMENT):
            raise ValueError(f"status {self.status!r}: expected {MEASURED!r} or {NO_MEASUREMENT!r}")
        if self.status == NO_MEASUREMENT and not self.reason:
            raise ValueError("a failed measurement needs its reason")

    @classmethod
    def failed(cls, reason: str) -> "Measurement":
        return cls(NO_MEASUREMENT, reason)

    @property
    def measured(self) -> bool:
        return self.status == MEASURED

    def to_dict(self) -> dict[str, str]:
        return {"status": self.status, "reason": self.reason}

    def text(self) -> str:
        """``measured`` or ``no measurement: <reason>``."""
        return self.status if self.measured else f"{self.status}: {self.reason}"


def first_failure(checks: Iterable[Measurement]) -> Measurement:
    """The first failed check, or "measured" when every check passed."""
    for check in checks:
        if not check.measured:
            return check
    return Measurement()


def withhold(headline: Mapping[str, Any], reasons: Mapping[str, str]) -> dict[str, Any]:
    """``headline`` with every key of ``reasons`` set to None and listed, with its reason,
    under ``no_measurement`` (merged with one already there).

    The convention of every headline JSON: a value derived from an instrument that could not
    measure is None, never a number that reads as "no effect", and
    ``headline["no_measurement"][key]`` says why.
    """
    out = dict(headline)
    if not reasons:
        return out
    listed = dict(out.get("no_measurement") or {})
    for key, reason in reasons.items():
        out[key] = None
        listed[key] = reason
    out["no_measurement"] = listed
    return out
