"""Prompt-level bootstrap intervals: a mean over groups of values, and a paired difference.

Several measures (adherence, robustness, RLAIF reply lengths) report shares and means of
replies, several replies per prompt. Replies to one prompt share that prompt's difficulty, so
an interval that resampled replies would be too narrow; these resample whole prompts (groups)
and report the 95% percentile interval. A difference between two models is bootstrapped with
the same prompt draws on both sides (paired), which cancels prompt difficulty instead of
adding two intervals' noise. Every interval is seeded, so a rerun gives the same bounds.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from ..errors import DataError


@dataclass(frozen=True)
class Estimate:
    """A point estimate with a percentile-bootstrap interval at ``level``."""

    value: float
    low: float
    high: float
    level: float = 0.95

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def _group_arrays(groups: Iterable[Sequence[float]]) -> tuple[np.ndarray, np.ndarray]:
    sums, counts = [], []
    for values in groups:
        values = np.asarray(values, dtype=np.float64)
        if len(values):
            sums.append(values.sum())
            counts.append(len(values))
    return np.array(sums), np.array(counts, dtype=np.float64)


def _interval(stats: np.ndarray, level: float) -> tuple[float, float]:
    tail = (1 - level) / 2
    low, high = np.quantile(stats, [tail, 1 - tail])
    return float(low), float(high)


def bootstrap_mean(
    groups: Iterable[Sequence[float]], n_resamples: int, seed: int, level: float = 0.95
) -> Estimate:
    """Mean over all values, with an interval that resamples whole groups (prompts).

    Each resample draws as many groups as there are, with replacement, and pools their values;
    the interval is the percentile interval of the pooled means. Values of one prompt share the
    prompt's difficulty, so resampling values instead would make the interval too narrow.
    Groups without values are ignored.
    """
    sums, counts = _group_arrays(groups)
    if not len(sums):
        raise DataError("bootstrap_mean: no values to average")
    rng = np.random.default_rng(seed)
    draw = rng.integers(0, len(sums), size=(n_resamples, len(sums)))
    stats = sums[draw].sum(axis=1) / counts[draw].sum(axis=1)
    return Estimate(float(sums.sum() / counts.sum()), *_interval(stats, level), level)


def paired_bootstrap_difference(
    a: Mapping[str, Sequence[float]],
    b: Mapping[str, Sequence[float]],
    n_resamples: int,
    seed: int,
    level: float = 0.95,
) -> tuple[Estimate, int]:
    """Mean of ``a`` minus mean of ``b`` over the prompts both have, and how many those are.

    Both sides are resampled with the *same* prompt draws, so a prompt that is hard for both
    models moves both means together and cancels in the difference.
    """
    common = [k for k in a if len(a[k]) and k in b and len(b[k])]
    if not common:
        raise DataError("paired_bootstrap_difference: the two sides share no prompt with values")
    sums_a, counts_a = _group_arrays(a[k] for k in common)
    sums_b, counts_b = _group_arrays(b[k] for k in common)
    rng = np.random.default_rng(seed)
    draw = rng.integers(0, len(common), size=(n_resamples, len(common)))
    stats = sums_a[draw].sum(axis=1) / counts_a[draw].sum(axis=1) - sums_b[draw].sum(
        axis=1
    ) / counts_b[draw].sum(axis=1)
    value = sums_a.sum() / counts_a.sum() - sums_b.sum() / counts_b.sum()
    return Estimate(float(value), *_interval(stats, level), level), len(common)
