"""Revealed-preference ratings: Elo in match order, bootstrap intervals, a Bradley–Terry check.

Pure functions over match outcomes; no model, no files. An outcome is ``(winner, loser)``, two
trait names, or ``None`` when the judge gave no usable verdict (that match is skipped, never
guessed). Outcomes are kept in *match order*, because Elo is order-dependent: each result moves
two ratings by ``k * (1 - expected)`` and later matches weigh more than early ones.

Why three estimates:

* **Elo** (initial 1000, K 32, logistic scale 400) is what the paper reports, so numbers stay
  comparable with it. It is an online estimator: with a fixed K its final ratings keep a
  noise floor that does not shrink with more matches, and they are pulled towards the mean
  (each update is zero-sum and small against a big gap). The paper reported it with no
  interval and no seed.
* **Bootstrap** (`bootstrap_elo`): each resample draws as many matches as there are, with
  replacement, in a fresh random order, and reruns Elo. The spread covers both sources of
  noise, which outcomes happened and the order they came in. Resample draws depend only on
  the seed and the number of matches, so two models judged on the same matches get the
  *same* draws: a difference of their ratings per resample is a paired bootstrap.
* **Bradley–Terry** (`bradley_terry`): the maximum-likelihood strengths of the model Elo
  approximates, ``P(i beats j) = sigmoid(theta_i - theta_j)``, order-free, with a small ridge
  so a trait that never played or never lost still gets a finite strength. Converted to the
  Elo scale (`bt_to_elo`), its Spearman correlation with Elo says whether the ordering is an
  artefact of match order.

The Elo and BT scales agree through ``theta = rating * ln(10) / scale``: an Elo gap of 400 is
odds of 10 to 1.

This module makes the per-trait table (`rate`) and per-trait paired changes
(`paired_differences`). The statistics a report leads with (the spread of the ratings beyond
the coin-flip floor, its change after training, rank agreement between models against its
reliability ceiling) are `elo_stats`'s, which carry their own noise floor.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import DataError

INITIAL = 1000.0
K_FACTOR = 32.0
SCALE = 400.0
DEFAULT_RIDGE = 0.1
"""Ridge on the BT log-strengths (natural-log units): a zero-mean Gaussian prior with standard
deviation ~3.2 (about 550 Elo points). It barely moves a trait with dozens of games, keeps a
trait with none at the mean, and holds an undefeated one to a few units instead of infinity
(with 0.01, a 7-0 record came out near 2,800 on the Elo scale in the tiny run)."""

Outcome = tuple[str, str] | None


# -- Elo -----------------------------------------------------------------------------------------
def expected_score(rating_a: float, rating_b: float, scale: float = SCALE) -> float:
    """Probability that ``a`` beats ``b`` under the Elo logistic curve."""
    return 1.0 / (1.0 + 10.0 ** ((rating_b - rating_a) / scale))


def update_elo(
    winner: float, loser: float, k: float = K_FACTOR, scale: float = SCALE
) -> tuple[float, float]:
    """Ratings after one decided match: the winner gains what the loser gives up."""
    delta = k * (1.0 - expected_score(winner, loser, scale))
    return winner + delta, loser - delta


def _check_outcomes(outcomes: Sequence[Outcome], traits: Sequence[str]) -> dict[str, int]:
    index = {t: i for i, t in enumerate(traits)}
    if len(index) != len(traits):
        raise DataError("elo: the trait list holds a trait twice")
    for number, outcome in enumerate(outcomes):
        if outcome is None:
            continue
        winner, loser = outcome
        if winner not in index or loser not in index:
            unknown = winner if winner not in index else loser
            raise DataError(f"elo: match {number} names {unknown!r}, which is not in the traits")
        if winner == loser:
            raise DataError(f"elo: match {number} is {winner!r} against itself")
    return index


def elo_ratings(
    outcomes: Sequence[Outcome],
    traits: Sequence[str],
    *,
    initial: float = INITIAL,
    k: float = K_FACTOR,
    scale: float = SCALE,
) -> dict[str, float]:
    """Elo rating of every trait after playing ``outcomes`` in order (None: skipped).

    Traits that never played keep ``initial``; the mean rating is always ``initial`` (every
    update is zero-sum).
    """
    _check_outcomes(outcomes, traits)
    ratings = {t: float(initial) for t in traits}
    for outcome in outcomes:
        if outcome is not None:
            winner, loser = outcome
            ratings[winner], ratings[loser] = update_elo(ratings[winner], ratings[loser], k, scale)
    return ratings


def _encode(outcomes: Sequence[Outcome], index: Mapping[str, int]) -> tuple[np.ndarray, ...]:
    winners = np.array([index[o[0]] if o else 0 for o in outcomes], dtype=np.int64)
    losers = np.array([index[o[1]] if o else 0 for o in outcomes], dtype=np.int64)
    valid = np.array([o is not None for o in outcomes], dtype=bool)
    return winners, losers, valid


def elo_batch(
    winners: np.ndarray,
    losers: np.ndarray,
    valid: np.ndarray,
    n_traits: int,
    *,
    initial: float = INITIAL,
    k: float = K_FACTOR,
    scale: float = SCALE,
) -> np.ndarray:
    """Elo for many match sequences at once: ``[R, n]`` index arrays -> ``[R, n_traits]``.

    Row ``r`` is exactly `elo_ratings` of the ``r``-th sequence (match ``t`` of every row is
    played together), so a bootstrap of R resamples costs ``n`` vector steps, not ``R * n``
    Python updates.
    """
    winners, losers, valid = (np.atleast_2d(np.asarray(a)) for a in (winners, losers, valid))
    n_rows, n_matches = winners.shape
    ratings = np.full((n_rows, n_traits), float(initial))
    rows = np.arange(n_rows)
    for t in range(n_matches):
        w, lo = winners[:, t], losers[:, t]
        expected = 1.0 / (1.0 + 10.0 ** ((ratings[rows, lo] - ratings[rows, w]) / scale))
        delta = np.where(valid[:, t], k * (1.0 - expected), 0.0)
        ratings[rows, w] += delta
        ratings[rows, lo] -= delta
    return ratings


# -- bootstrap -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class EloBootstrap:
    """Elo ratings of ``n_resamples`` bootstrap replicates: ``samples[r, i]`` is trait ``i``.

    ``draws`` holds the resampled match indices (``[R, n]``), so two bootstraps built with the
    same seed over the same number of matches can be checked to be paired.
    """

    traits: tuple[str, ...]
    samples: np.ndarray
    draws: np.ndarray
    level: float = 0.95

    def intervals(self) -> dict[str, tuple[float, float]]:
        """Percentile interval of every trait's rating."""
        low, high = percentile_interval(self.samples, self.level)
        return {t: (float(a), float(b)) for t, a, b in zip(self.traits, low, high)}

    def std(self) -> np.ndarray:
        """Standard deviation of the ratings across traits, per resample."""
        return self.samples.std(axis=1)


def percentile_interval(stats: np.ndarray, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Lower and upper percentile bounds along the first axis (the resamples)."""
    if not 0 < level < 1:
        raise DataError(f"interval level={level!r}: expected in (0, 1)")
    tail = (1 - level) / 2
    low, high = np.quantile(np.asarray(stats, dtype=np.float64), [tail, 1 - tail], axis=0)
    return low, high


def bootstrap_draws(n_matches: int, n_resamples: int, seed: int) -> np.ndarray:
    """``[n_resamples, n_matches]`` match indices: drawn with replacement, in random order.

    Independent uniform draws are already a random order, so one call resamples both which
    matches happened and the order they were played in. The draws depend on nothing but the
    arguments: every model judged on the same matches gets the same resamples (a paired
    bootstrap).
    """
    if n_resamples < 1:
        raise DataError(f"bootstrap: n_resamples={n_resamples!r}: expected >= 1")
    rng = np.random.default_rng(seed)
    return rng.integers(0, max(n_matches, 1), size=(n_resamples, n_matches))


def bootstrap_elo(
    outcomes: Sequence[Outcome],
    traits: Sequence[str],
    n_resamples: int,
    seed: int,
    *,
    level: float = 0.95,
) -> EloBootstrap:
    """Elo of ``n_resamples`` resamples of the matches (see `bootstrap_draws`), under the
    paper's rule (``INITIAL``, ``K_FACTOR``, ``SCALE``, as `elo_stats` assumes).

    Undecided matches (None) stay in the pool and are drawn like the others, so the number of
    decided games also varies between resamples, as it would between repeated experiments.
    """
    index = _check_outcomes(outcomes, traits)
    draws = bootstrap_draws(len(outcomes), n_resamples, seed)
    winners, losers, valid = _encode(outcomes, index)
    if not len(outcomes):
        samples = np.full((n_resamples, len(traits)), INITIAL)
    else:
        samples = elo_batch(winners[draws], losers[draws], valid[draws], len(traits))
    return EloBootstrap(tuple(traits), samples, draws, level)


# -- Bradley–Terry -------------------------------------------------------------------------------
def win_matrix(outcomes: Sequence[Outcome], traits: Sequence[str]) -> np.ndarray:
    """``W[i, j]``: how often trait ``i`` beat trait ``j``."""
    index = _check_outcomes(outcomes, traits)
    wins = np.zeros((len(traits), len(traits)))
    for outcome in outcomes:
        if outcome is not None:
            wins[index[outcome[0]], index[outcome[1]]] += 1
    return wins


def bradley_terry(
    outcomes: Sequence[Outcome], traits: Sequence[str], ridge: float = DEFAULT_RIDGE
) -> dict[str, float]:
    """Ridge-penalised maximum-likelihood BT log-strengths (natural log, mean zero).

    Minimises ``-sum W_ij log sigmoid(theta_i - theta_j) + ridge / 2 * |theta|^2``, a strictly
    convex problem for ``ridge > 0``: unique and finite even for a trait that never lost or
    never played (which sits at 0). The log-likelihood part is invariant to a common shift and
    its gradient sums to zero, so the optimum is centred by construction.
    """
    from scipy.optimize import minimize

    if ridge <= 0:
        raise DataError(f"bradley_terry: ridge={ridge!r}: expected > 0 (keeps strengths finite)")
    wins = win_matrix(outcomes, traits)
    games = wins + wins.T

    def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        gap = theta[:, None] - theta[None, :]
        log_p = -np.logaddexp(0.0, -gap)  # log sigmoid(theta_i - theta_j)
        p = np.exp(log_p)
        value = -(wins * log_p).sum() + 0.5 * ridge * theta @ theta
        # d/d theta_i: each game of i counts p_ij, each win of i counts -1
        grad = (games * p).sum(axis=1) - wins.sum(axis=1) + ridge * theta
        return float(value), grad

    start = np.zeros(len(traits))
    result = minimize(objective, start, jac=True, method="L-BFGS-B", options={"maxiter": 1000})
    theta = result.x - result.x.mean()
    return {t: float(v) for t, v in zip(traits, theta)}


def bt_to_elo(
    strengths: Mapping[str, float], initial: float = INITIAL, scale: float = SCALE
) -> dict[str, float]:
    """BT log-strengths on the Elo scale: ``initial + theta * scale / ln(10)``."""
    return {t: initial + v * scale / math.log(10) for t, v in strengths.items()}


# -- summaries -----------------------------------------------------------------------------------
def win_counts(outcomes: Sequence[Outcome], traits: Sequence[str]) -> dict[str, tuple[int, int]]:
    """Per trait: (wins, decided games)."""
    wins = win_matrix(outcomes, traits)
    return {
        t: (int(wins[i].sum()), int(wins[i].sum() + wins[:, i].sum())) for i, t in enumerate(traits)
    }


def spearman(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """Spearman's rho and its two-sided p-value (nan when either side is constant)."""
    from scipy.stats import spearmanr

    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) != len(b):
        raise DataError(f"spearman: {len(a)} values against {len(b)}")
    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return math.nan, math.nan
    result = spearmanr(a, b)
    return float(result.statistic), float(result.pvalue)


def null_std(
    outcomes: Sequence[Outcome],
    traits: Sequence[str],
    n_resamples: int,
    seed: int,
) -> np.ndarray:
    """Std of Elo across traits when every decided match is a coin flip, per replicate.

    Same pairs, same order, same undecided matches; only the winner is random. Elo with a
    fixed K never settles, so even a judge choosing at random spreads the ratings: this is
    that noise floor. A measured std inside the null's range shows no preference the matches
    can detect; the paper compared spreads with no such reference.
    """
    index = _check_outcomes(outcomes, traits)
    winners, losers, valid = _encode(outcomes, index)
    if not len(outcomes):
        return np.zeros(n_resamples)
    rng = np.random.default_rng(seed)
    flip = rng.random((n_resamples, len(outcomes))) < 0.5
    tile = np.broadcast_to
    shape = (n_resamples, len(outcomes))
    w, lo = tile(winners, shape), tile(losers, shape)
    samples = elo_batch(
        np.where(flip, lo, w), np.where(flip, w, lo), tile(valid, shape), len(traits)
    )
    return samples.std(axis=1)


@dataclass(frozen=True)
class EloResult:
    """Everything measured from one sequence of outcomes, for the per-trait table.

    rows: one per trait with ``trait, elo, ci_low, ci_high, bt, wins, games``; std: the
    standard deviation of the Elo ratings across traits (its noise-aware reading, the spread
    beyond the coin-flip floor with an interval, is `elo_stats.spread_beyond_noise`);
    null_std / null_std_high: mean and upper 95% point of the std when every verdict is a
    coin flip (`null_std`); elo_bt_spearman: rank agreement of Elo and BT; decided / matches:
    usable verdicts.
    """

    rows: list[dict]
    std: float
    elo_bt_spearman: float
    elo_bt_p: float
    decided: int
    matches: int
    bootstrap: EloBootstrap
    null_std: float = math.nan
    null_std_high: float = math.nan


def rate(
    outcomes: Sequence[Outcome],
    traits: Sequence[str],
    n_resamples: int,
    seed: int,
    *,
    level: float = 0.95,
    ridge: float = DEFAULT_RIDGE,
) -> EloResult:
    """Elo, its per-trait bootstrap intervals, BT and the win counts of one condition's matches,
    under the paper's rule (initial 1000, K 32, scale 400).

    No interval is given for the std itself: the percentile interval of the resampled std
    lies above its own estimate (resampling adds outcome noise), see `elo_stats`.
    """
    ratings = elo_ratings(outcomes, traits)
    boot = bootstrap_elo(outcomes, traits, n_resamples, seed, level=level)
    intervals = boot.intervals()
    bt = bt_to_elo(bradley_terry(outcomes, traits, ridge))
    counts = win_counts(outcomes, traits)
    rows = [
        {
            "trait": t,
            "elo": ratings[t],
            "ci_low": intervals[t][0],
            "ci_high": intervals[t][1],
            "bt": bt[t],
            "wins": counts[t][0],
            "games": counts[t][1],
        }
        for t in traits
    ]
    values = np.array([ratings[t] for t in traits])
    rho, p = spearman(values, [bt[t] for t in traits])
    null = null_std(outcomes, traits, n_resamples, seed + 1)
    return EloResult(
        rows=rows,
        std=float(values.std()),
        elo_bt_spearman=rho,
        elo_bt_p=p,
        decided=sum(o is not None for o in outcomes),
        matches=len(outcomes),
        bootstrap=boot,
        null_std=float(null.mean()),
        null_std_high=float(np.quantile(null, 0.95)),
    )


def _check_paired(after: EloBootstrap, before: EloBootstrap) -> None:
    if after.traits != before.traits:
        raise DataError("paired_differences: the two bootstraps rate different traits")
    if after.draws.shape != before.draws.shape or not np.array_equal(after.draws, before.draws):
        raise DataError(
            "paired_differences: the bootstraps used different resamples; build both with the "
            "same seed over the same matches"
        )


def paired_differences(after: EloBootstrap, before: EloBootstrap) -> dict[str, tuple[float, float]]:
    """Percentile interval of ``after - before`` per trait, resample by resample.

    Both must come from the same draws (same seed and number of matches: the same matches
    judged for two models), otherwise the pairing would be meaningless and this refuses.
    """
    _check_paired(after, before)
    low, high = percentile_interval(after.samples - before.samples, after.level)
    return {t: (float(a), float(b)) for t, a, b in zip(after.traits, low, high)}


__all__ = [
    "DEFAULT_RIDGE",
    "INITIAL",
    "K_FACTOR",
    "SCALE",
    "EloBootstrap",
    "EloResult",
    "Outcome",
    "bootstrap_draws",
    "bootstrap_elo",
    "bradley_terry",
    "bt_to_elo",
    "elo_batch",
    "elo_ratings",
    "expected_score",
    "null_std",
    "paired_differences",
    "percentile_interval",
    "rate",
    "spearman",
    "update_elo",
    "win_counts",
    "win_matrix",
]
