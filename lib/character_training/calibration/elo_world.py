"""Simulated revealed-preference experiments (stage 07) with a known truth.

A *world* draws the matches of ``E`` experiments at once: for each, ``M`` trait pairs (the
order they are offered to the model), and the order the judge sees them in. Two scripted models
choose a trait per match from their true utilities (plus a leaning towards the trait offered
first); a scripted judge reads each reply and gives a forced-choice margin made of a signal
(which trait the reply shows), a position bias (towards the trait listed first), a taste for
some trait words, and noise. The protocol decides how verdicts are read: ``single`` asks once
in the match's listing order (what stage 07 did before: every model shares that order), and
``both`` asks in both orders and sums the margins, which cancels the position bias.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..evaluate.elo_stats import Outcomes


@dataclass(frozen=True)
class Judge:
    """Forced-choice margins in nats: ``signal`` towards the trait the reply shows,
    ``position`` towards the trait listed first, ``taste`` times a per-trait word taste (drawn
    once per experiment, std 1), ``noise`` std of Gaussian noise per verdict."""

    signal: float = 1.0
    position: float = 0.0
    taste: float = 0.0
    noise: float = 1.0


@dataclass(frozen=True)
class Design:
    traits: int
    matches: int


@dataclass(frozen=True)
class Matches:
    first: np.ndarray  # [E, M] trait offered first to the model
    second: np.ndarray  # [E, M]
    judge_first_is_first: np.ndarray  # [E, M] bool: the judge sees `first` listed first
    taste: np.ndarray  # [E, T] the judge's word taste per trait


def draw_matches(design: Design, experiments: int, rng: np.random.Generator) -> Matches:
    """Random distinct pairs per match, a random judge listing order, a random word taste."""
    t, m = design.traits, design.matches
    first = rng.integers(0, t, size=(experiments, m), dtype=np.int32)
    offset = rng.integers(1, t, size=(experiments, m), dtype=np.int32)
    second = (first + offset) % t
    return Matches(
        first,
        second,
        rng.random((experiments, m), dtype=np.float32) < 0.5,
        rng.standard_normal((experiments, t)),
    )


def _per_match(values: np.ndarray, traits: np.ndarray) -> np.ndarray:
    """``values[e, traits[e, m]]`` for every experiment e and match m, by one flat gather
    (2-D fancy indexing costs several times more at millions of matches)."""
    offsets = np.arange(values.shape[0], dtype=np.int64)[:, None] * values.shape[1]
    return np.take(values.ravel(), traits + offsets)


def utilities(spread: float, experiments: int, traits: int, rng: np.random.Generator) -> np.ndarray:
    """True utilities in nats: N(0, spread^2) per trait, centred per experiment."""
    u = rng.standard_normal((experiments, traits)) * spread
    return u - u.mean(axis=1, keepdims=True)


def related(
    base: np.ndarray, correlation: float, spread: float, rng: np.random.Generator
) -> np.ndarray:
    """Utilities whose correlation with ``base`` over these traits is ``correlation`` (exactly,
    per row) and whose std is ``spread``.

    Exact, not only in the population: with 144 traits two independent draws correlate at
    about +-0.08 by chance, and 5,000 matches measure that realised correlation well, so an
    interval excluding 0 there is a correct finding, not a false positive (the 9b preset's
    "unrelated" models were rejected 29% of the time, with the interval covering the
    realised truth 96% of the time). The random part is made orthogonal to ``base``.
    """
    z = rng.standard_normal(base.shape)
    z -= z.mean(axis=1, keepdims=True)
    scale = base.std(axis=1, keepdims=True)
    unit = np.where(scale > 0, base / np.where(scale > 0, scale, 1.0), 0.0)
    z -= (z * unit).mean(axis=1, keepdims=True) * unit  # unit has mean 0 and variance 1
    z /= np.maximum(z.std(axis=1, keepdims=True), 1e-12)
    u = correlation * unit + np.sqrt(max(1 - correlation**2, 0.0)) * z
    return u * spread


def judge_margins(
    matches: Matches,
    u: np.ndarray,
    judge: Judge,
    rng: np.random.Generator,
    offer_bias: float = 0.0,
    taste_slope: float = 1.0,
    protocol: str = "both",
    with_prior: bool = True,
) -> tuple[np.ndarray, np.ndarray | None]:
    """One model's forced-choice margins towards the first-offered trait, and the judge's prior.

    The model chooses per match from its utilities (plus ``offer_bias`` towards the trait
    offered first). After the reply, the judge's taste for the two words survives at
    ``taste_slope`` times its strength on an empty reply. ``both``: the margins of the two
    listing orders are summed (position bias cancels); ``single``: one order, the match's.
    The prior is the same judge on an empty reply, read the same way but without the
    per-verdict noise: that noise stands for how the judge reads different replies, and stage
    07 reads the prior from the word log-probabilities after one fixed empty reply, the same
    numbers for every match of a pair and order. (With noise in the prior too, the fitted
    slope is attenuated and a leaning at 1.5x its strength left a 31-point spread in at the 9b
    preset's sizes: 42-45% false positives.) None without ``with_prior``.
    """
    f32 = np.float32  # float32 throughout: ~10^8 draws per simulated point at 5,000 matches
    a, b = matches.first, matches.second
    utility, word_taste = u.astype(f32), matches.taste.astype(f32)
    gap = _per_match(utility, a) - _per_match(utility, b) + f32(offer_bias)
    chose_a = rng.random(a.shape, dtype=f32) < 1 / (1 + np.exp(-gap))
    taste_gap = f32(judge.taste) * (_per_match(word_taste, a) - _per_match(word_taste, b))
    shows = np.where(chose_a, f32(judge.signal), f32(-judge.signal))

    def one_order(
        a_listed_first: np.ndarray, content: np.ndarray, slope: float, noisy: bool = True
    ) -> np.ndarray:
        position = np.where(a_listed_first, f32(judge.position), f32(-judge.position))
        out = content + position + f32(slope) * taste_gap
        return out + f32(judge.noise) * rng.standard_normal(a.shape, dtype=f32) if noisy else out

    orders = {
        "single": [matches.judge_first_is_first],
        "both": [np.ones_like(chose_a), np.zeros_like(chose_a)],
    }
    if protocol not in orders:
        raise ValueError(f"protocol={protocol!r}: expected single or both")
    margin = sum(one_order(o, shows, taste_slope) for o in orders[protocol])
    if not with_prior:
        return margin, None
    prior = sum(one_order(o, np.zeros_like(shows), 1.0, False) for o in orders[protocol])
    return margin, prior


def outcomes_from_margins(matches: Matches, margins: np.ndarray, n_traits: int) -> Outcomes:
    """Verdicts: the first-offered trait wins where its margin is positive."""
    a, b = matches.first, matches.second
    a_wins = margins > 0
    # float32 ratings: a simulation needs thousands of experiments, not 1e-4 Elo points
    return Outcomes(
        np.where(a_wins, a, b), np.where(a_wins, b, a), np.ones_like(a_wins), n_traits, np.float32
    )


def play_model(
    matches: Matches,
    u: np.ndarray,
    judge: Judge,
    protocol: str,
    rng: np.random.Generator,
    offer_bias: float = 0.0,
) -> Outcomes:
    """One model's outcomes on ``matches``: its choices, then the judge's verdicts."""
    margins, _ = judge_margins(matches, u, judge, rng, offer_bias, 1.0, protocol, False)
    return outcomes_from_margins(matches, margins, u.shape[1])
