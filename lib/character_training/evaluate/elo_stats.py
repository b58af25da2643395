"""Noise-aware statistics of Elo ratings: spread beyond the coin-flip floor, paired changes,
rank agreement with its ceiling. Vectorised over experiments so `calibrate` can check them.

Elo with a fixed K never settles: a judge choosing at random still spreads the ratings, and
two measurements of the *same* model agree only partly. The plain statistics therefore
invent effects (a spread that is all noise; a low rank correlation read as "training
reordered the preferences"). The estimators here carry their noise floor:

* **Spread beyond noise** (`spread_beyond_noise`): ``sqrt(max(s^2 - E[s0^2], 0))`` where ``s``
  is the std of the Elo ratings across traits and ``s0`` the std the same design gives when
  every decided match is a coin flip (same pairs, same order, same undecided matches). Its
  interval comes from a bootstrap over matches *centred on the estimate*: resampling matches
  adds a second layer of outcome noise, so the bootstrap distribution of ``s^2`` sits above
  ``s^2`` by about the noise floor (a plain percentile interval of the std then lies above its
  own estimate); only its spread is used. The interval is computed for ``s^2 - E[s0^2]`` and
  mapped through ``sqrt(max(., 0))``, so it covers the floored value whenever it covers the
  excess.
* **Paired changes** (`paired_spread_change`): ``s_after - s_before`` with the percentile
  interval of the same difference on the same resampled matches for both models (same draws):
  the resampling inflation is shared by the two and cancels, so here the plain percentile
  interval covers (checked in `calibrate`; the centred one undercovered, 0.89).
* **Rank agreement** (`paired_spearman`): Spearman's rho between two models' ratings with its
  paired-bootstrap percentile interval (it leans towards 0, the cautious side), beside each
  model's **split-half reliability** (`split_half_reliability`: the matches split at random
  into halves, Elo on each, rho
  between the halves averaged over splits, Spearman–Brown corrected to the full length). The
  product of the two reliabilities' square roots is the *ceiling*: the rho two measurements
  of unchanged preferences would show at this design; ``rho / ceiling`` is the disattenuated
  correlation.

Every function takes outcomes as arrays with a leading *experiment* axis ``E`` (a stage passes
``E = 1``; `calibrate` passes hundreds of simulated experiments at once): ``winners[E, M]``,
``losers[E, M]`` (trait indices) and ``valid[E, M]`` (False: no usable verdict, skipped).
Resampling draws depend only on the seed and the sizes, so two models judged on the same
matches get the same resamples.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np

from ..errors import DataError

INITIAL = 1000.0
K_FACTOR = 32.0
SCALE = 400.0
Z_975 = 1.959963984540054


@dataclass(frozen=True)
class Outcomes:
    """Match outcomes of ``E`` experiments over the same number of matches ``M``."""

    winners: np.ndarray  # [E, M] int
    losers: np.ndarray  # [E, M] int
    valid: np.ndarray  # [E, M] bool
    n_traits: int
    dtype: Any = np.float64  # of the ratings; simulations use float32 (`play`)

    def __post_init__(self) -> None:
        shapes = {np.shape(self.winners), np.shape(self.losers), np.shape(self.valid)}
        if len(shapes) != 1 or len(next(iter(shapes))) != 2:
            raise DataError(
                f"outcomes: winners, losers, valid must share one [E, M] shape: {shapes}"
            )

    @property
    def experiments(self) -> int:
        return int(np.shape(self.winners)[0])

    @property
    def matches(self) -> int:
        return int(np.shape(self.winners)[1])

    @classmethod
    def from_pairs(
        cls, outcomes: Sequence[tuple[str, str] | None], traits: Sequence[str]
    ) -> "Outcomes":
        """One experiment from ``(winner, loser)`` names (None: undecided)."""
        index = {t: i for i, t in enumerate(traits)}
        winners = [index[o[0]] if o else 0 for o in outcomes]
        losers = [index[o[1]] if o else 0 for o in outcomes]
        valid = [o is not None for o in outcomes]
        return cls(
            np.array([winners], dtype=np.int64),
            np.array([losers], dtype=np.int64),
            np.array([valid], dtype=bool),
            len(traits),
        )


ChunkFn = Callable[[int, int], tuple[np.ndarray, np.ndarray, np.ndarray]]
CHUNK = 256  # matches gathered at once: numpy's per-call overhead is paid per chunk, not per match
CHUNK_ELEMENTS = 1 << 22
"""Fewer matches per chunk where ``CHUNK`` of them over every row would pass this many slots
(`calibrate`'s 80,000 bootstrap rows: 50 matches, not 1.3 GB of temporaries per chunk). Up to
16,384 rows, a stage's sizes, chunks stay at ``CHUNK`` matches, so its seeded draws are
unchanged."""
LN10_OVER_SCALE = math.log(10.0) / SCALE
CACHE_BYTES = 1 << 21  # ratings played per block in `play`: a 2 MiB L2 cache (measured best)
PLAY_THREADS = min(2, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)
"""Threads `play` spreads its row blocks over (two cores: the machine this kit is sized for)."""


def play(
    n_rows: int, n_traits: int, n_steps: int, chunk: ChunkFn, dtype: Any = np.float64
) -> np.ndarray:
    """Elo ratings ``[n_rows, n_traits]`` of ``n_rows`` match sequences played side by side.

    ``chunk(t0, t1)`` gives matches ``t0 .. t1 - 1`` of every row as (winners, losers, valid),
    each ``[t1 - t0, n_rows]`` (``CHUNK`` matches at a time, fewer for many rows:
    `CHUNK_ELEMENTS`); an invalid match changes nothing. Row ``r`` equals
    `elo.elo_ratings` of its own sequence (initial 1000, K 32, scale 400) up to float
    rounding. Ratings live in one flat array indexed ``row * n_traits + trait`` (a flat gather
    is several times faster than 2-D fancy indexing); ``dtype`` float32 halves the memory
    traffic again for simulations, where 1e-4 Elo points do not matter.

    Speed (`calibrate` plays ~10^9 row-steps at the real presets' sizes): the flat indices
    and gains of a whole chunk are made at once; the rows are then played in blocks whose
    ratings fit in a core's cache (`CACHE_BYTES`), each block through all the chunk's steps,
    because a step's random gathers over every row's ratings (46 MB at 80,000 rows x 144
    traits) cost more than the arithmetic; the blocks are shared among `PLAY_THREADS`
    threads (each row's sequence is its own, so the result does not depend on them). Each
    step gathers the two ratings once, works in
    preallocated buffers and writes them back (a row's winner and loser are distinct slots),
    the same arithmetic in the same order as the plain update, so the ratings are bit for bit
    those of ``ratings[w] += d; ratings[l] -= d``.
    """
    ratings = np.full(n_rows * n_traits, INITIAL, dtype=dtype)
    base = np.arange(n_rows, dtype=np.int64) * n_traits
    k = dtype(K_FACTOR)
    block = max(256, CACHE_BYTES // (n_traits * np.dtype(dtype).itemsize))
    blocks = [(r0, min(r0 + block, n_rows)) for r0 in range(0, n_rows, block)]
    workers = min(len(blocks), PLAY_THREADS)
    pool = ThreadPoolExecutor(workers) if workers > 1 else None
    steps = max(1, min(CHUNK, CHUNK_ELEMENTS // max(n_rows, 1)))
    try:
        for t0 in range(0, n_steps, steps):
            t1 = min(t0 + steps, n_steps)
            winners, losers, valid = chunk(t0, t1)
            slots = (
                np.add(winners, base, dtype=np.int64),
                np.add(losers, base, dtype=np.int64),
                np.where(valid, k, dtype(0.0)),
            )
            if pool is None:
                for rows in blocks:
                    _play_rows(ratings, slots, rows)
            else:  # blocks are independent rows: numpy releases the GIL inside each call
                list(pool.map(partial(_play_rows, ratings, slots), blocks))
    finally:
        if pool is not None:
            pool.shutdown()
    return ratings.reshape(n_rows, n_traits)


def _play_rows(
    ratings: np.ndarray, slots: tuple[np.ndarray, np.ndarray, np.ndarray], rows: tuple[int, int]
) -> None:
    """Rows ``rows[0] .. rows[1] - 1`` of `play` through one chunk's steps, in place: ``slots``
    are the chunk's flat winner and loser indices and gains, ``[steps, n_rows]``."""
    r0, r1 = rows
    dtype = ratings.dtype.type
    one, c = dtype(1.0), dtype(LN10_OVER_SCALE)
    rating_w, rating_l, delta = (np.empty(r1 - r0, dtype=dtype) for _ in range(3))
    for iw, il, g in zip(*(s[:, r0:r1] for s in slots)):
        np.take(ratings, iw, out=rating_w)
        np.take(ratings, il, out=rating_l)
        np.subtract(rating_l, rating_w, out=delta)
        np.multiply(delta, c, out=delta)
        np.exp(delta, out=delta)
        np.add(one, delta, out=delta)
        np.divide(g, delta, out=delta)
        np.subtract(g, delta, out=delta)
        rating_w += delta
        rating_l -= delta
        ratings[iw] = rating_w
        ratings[il] = rating_l


def _repeated_columns(values: np.ndarray, t0: int, t1: int, times: int) -> np.ndarray:
    """``values[np.repeat(arange(E), times), t0:t1].T`` without 2-D fancy indexing."""
    return np.repeat(values[:, t0:t1].T, times, axis=1)


def elo(out: Outcomes) -> np.ndarray:
    """Elo ratings ``[E, n_traits]`` of every experiment, matches in their order."""
    return play(
        out.experiments,
        out.n_traits,
        out.matches,
        lambda t0, t1: (out.winners[:, t0:t1].T, out.losers[:, t0:t1].T, out.valid[:, t0:t1].T),
        out.dtype,
    )


def _resampled(tables: Sequence[Outcomes], n_boot: int, seed: int) -> list[np.ndarray]:
    """Elo of ``n_boot`` bootstrap resamples per experiment, the same draws for every table.

    Each resample draws ``M`` matches with replacement in random order (independent uniform
    draws are a random order); the draws are made step by step from one seeded stream, so
    memory stays at one match per row. Returns one ``[E, n_boot, n_traits]`` array per table.
    """
    first = tables[0]
    n_exp, n_matches = first.experiments, first.matches
    for table in tables[1:]:
        if (table.experiments, table.matches, table.n_traits) != (
            n_exp,
            n_matches,
            first.n_traits,
        ):
            raise DataError("paired bootstrap: the two models were judged on different matches")
    rng = np.random.default_rng(seed)
    rows = n_exp * n_boot
    # flat offsets of each row's experiment in every table's [E, M] arrays, tables side by side
    start = np.repeat(np.arange(n_exp, dtype=np.int64) * n_matches, n_boot)
    start = np.concatenate([start + i * n_exp * n_matches for i in range(len(tables))])
    # one int32 code per match, (winner * T + loser) * 2 + valid: one small array to gather from
    n_traits = first.n_traits
    code = np.concatenate(
        [
            ((np.ravel(tb.winners) * n_traits + np.ravel(tb.losers)) * 2 + np.ravel(tb.valid))
            for tb in tables
        ]
    ).astype(np.int32)

    def chunk(t0: int, t1: int):
        j = rng.integers(0, max(n_matches, 1), size=(t1 - t0, rows))
        drawn = np.take(code, np.tile(j, (1, len(tables))) + start)
        pair = drawn >> 1
        winners = pair // n_traits
        return winners, pair - winners * n_traits, (drawn & 1).astype(bool)

    ratings = play(rows * len(tables), first.n_traits, n_matches, chunk, first.dtype)
    return [
        ratings[i * rows : (i + 1) * rows].reshape(n_exp, n_boot, first.n_traits)
        for i in range(len(tables))
    ]


def coin_flip_std2(out: Outcomes, n_null: int, seed: int) -> np.ndarray:
    """``[E]``: mean squared Elo std when every decided match is a coin flip (same design)."""
    rng = np.random.default_rng(seed)
    n_exp = out.experiments

    def chunk(t0: int, t1: int):
        w = _repeated_columns(out.winners, t0, t1, n_null)
        lo = _repeated_columns(out.losers, t0, t1, n_null)
        f = rng.random(w.shape) < 0.5
        return np.where(f, lo, w), np.where(f, w, lo), _repeated_columns(out.valid, t0, t1, n_null)

    ratings = play(n_exp * n_null, out.n_traits, out.matches, chunk, out.dtype)
    return (ratings.std(axis=1) ** 2).reshape(n_exp, n_null).mean(axis=1)


def percentile_interval(
    replicates: np.ndarray, level: float = 0.95
) -> tuple[np.ndarray, np.ndarray]:
    """Central quantiles over the last axis (the resamples), NaN replicates ignored."""
    tail = (1 - level) / 2
    return np.nanquantile(replicates, tail, axis=-1), np.nanquantile(replicates, 1 - tail, axis=-1)


def centred_interval(
    estimate: np.ndarray, replicates: np.ndarray, level: float = 0.95
) -> tuple[np.ndarray, np.ndarray]:
    """``estimate`` plus the replicates' central quantiles taken around their own mean.

    Used where the bootstrap distribution is shifted by the resampling itself (extra outcome
    noise) but its width is right: the shift is removed, the shape kept. ``replicates`` has
    the resamples on its last axis; NaN replicates are ignored.
    """
    tail = (1 - level) / 2
    centre = np.nanmean(replicates, axis=-1)
    low = np.nanquantile(replicates, tail, axis=-1) - centre
    high = np.nanquantile(replicates, 1 - tail, axis=-1) - centre
    return estimate + low, estimate + high


@dataclass(frozen=True)
class Spread:
    """Per experiment: the raw std, the noise floor, and the spread beyond it with interval."""

    raw: np.ndarray  # std of Elo across traits
    noise: np.ndarray  # sqrt(E[s0^2]): the coin-flip floor
    beyond: np.ndarray  # sqrt(max(s^2 - noise^2, 0))
    low: np.ndarray
    high: np.ndarray
    excess: np.ndarray  # s^2 - noise^2 (unfloored), what the interval is built on


def _floored_sqrt(x: np.ndarray) -> np.ndarray:
    return np.sqrt(np.maximum(x, 0.0))


def spread_beyond_noise(
    out: Outcomes, n_boot: int, seed: int, n_null: int | None = None, level: float = 0.95
) -> Spread:
    """The Elo spread a model shows beyond what coin flips give on the same matches."""
    raw = elo(out).std(axis=1)
    noise2 = coin_flip_std2(out, n_null or n_boot, seed + 1)
    (boot,) = _resampled([out], n_boot, seed)
    excess = raw**2 - noise2
    low, high = centred_interval(excess, boot.std(axis=2) ** 2, level)
    return Spread(
        raw, np.sqrt(noise2), _floored_sqrt(excess), _floored_sqrt(low), _floored_sqrt(high), excess
    )


@dataclass(frozen=True)
class Change:
    """Per experiment: ``after - before`` of a statistic with its paired interval."""

    value: np.ndarray
    low: np.ndarray
    high: np.ndarray


def paired_spread_change(
    after: Outcomes, before: Outcomes, n_boot: int, seed: int, level: float = 0.95
) -> Change:
    """Change of the Elo std across traits, ``after - before``, on paired resamples."""
    value = elo(after).std(axis=1) - elo(before).std(axis=1)
    boot_after, boot_before = _resampled([after, before], n_boot, seed)
    low, high = percentile_interval(boot_after.std(axis=2) - boot_before.std(axis=2), level)
    return Change(value, low, high)


def _rank_rows(x: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata

    return rankdata(x, axis=-1)


def spearman_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman's rho along the last axis (NaN where either side is constant)."""
    ra, rb = _rank_rows(a), _rank_rows(b)
    ra = ra - ra.mean(axis=-1, keepdims=True)
    rb = rb - rb.mean(axis=-1, keepdims=True)
    norm = np.sqrt((ra**2).sum(axis=-1) * (rb**2).sum(axis=-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(norm > 0, (ra * rb).sum(axis=-1) / np.where(norm > 0, norm, 1.0), np.nan)


def split_half_reliability(out: Outcomes, n_splits: int, seed: int) -> np.ndarray:
    """``[E]``: Spearman–Brown corrected split-half reliability of the Elo ranking.

    The matches are split at random into two halves ``n_splits`` times; Elo is computed on
    each half (matches keep their order), rho between the halves is averaged over the splits
    (NaN rho left out) and the mean stepped up to the full length with ``2r / (1 + r)``.
    Stepping up each split's rho before averaging was unstable for rankings without signal: a
    split with rho -0.6 alone contributes -3. Halves that do not agree on average (mean rho
    <= 0, common for a ranking without signal: given the data, the halves' deviations share
    one total and lean against each other) give 0, no reliability, rather than a negative
    number the step-up formula was not made for; NaN only where no split gives a rho.
    """
    rng = np.random.default_rng(seed)
    n_exp, n_matches = out.experiments, out.matches
    in_first = rng.random((n_splits, n_matches)) < 0.5
    halves = []
    for side in (True, False):

        def chunk(t0: int, t1: int, side=side):
            keep = np.tile(in_first[:, t0:t1].T == side, (1, n_exp))
            return (
                _repeated_columns(out.winners, t0, t1, n_splits),
                _repeated_columns(out.losers, t0, t1, n_splits),
                _repeated_columns(out.valid, t0, t1, n_splits) & keep,
            )

        halves.append(play(n_exp * n_splits, out.n_traits, n_matches, chunk, out.dtype))
    r = spearman_rows(halves[0], halves[1]).reshape(n_exp, n_splits)
    counts = np.isfinite(r).sum(axis=1)
    mean_r = np.where(counts > 0, np.nansum(r, axis=1) / np.maximum(counts, 1), np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        stepped = 2 * mean_r / (1 + mean_r)
    return np.where(mean_r <= 0, 0.0, np.where(np.isfinite(stepped), stepped, np.nan))


@dataclass(frozen=True)
class RankAgreement:
    """Per experiment: rho between two models' ratings, its interval, and its ceiling."""

    rho: np.ndarray
    low: np.ndarray
    high: np.ndarray
    reliability_a: np.ndarray
    reliability_b: np.ndarray
    ceiling: np.ndarray  # sqrt(rel_a * rel_b): rho of two measurements of unchanged rankings
    disattenuated: np.ndarray  # rho / ceiling, clipped to [-1, 1]; NaN without a ceiling


def paired_spearman(
    a: Outcomes, b: Outcomes, n_boot: int, seed: int, n_splits: int = 20, level: float = 0.95
) -> RankAgreement:
    """Rank agreement of two models judged on the same matches, with its noise ceiling."""
    rho = spearman_rows(elo(a), elo(b))
    boot_a, boot_b = _resampled([a, b], n_boot, seed)
    low, high = percentile_interval(spearman_rows(boot_a, boot_b), level)
    rel_a = split_half_reliability(a, n_splits, seed + 2)
    rel_b = split_half_reliability(b, n_splits, seed + 2)
    with np.errstate(invalid="ignore"):
        ceiling = np.sqrt(np.where((rel_a > 0) & (rel_b > 0), rel_a * rel_b, np.nan))
        disattenuated = np.clip(rho / ceiling, -1, 1)
    return RankAgreement(rho, low, high, rel_a, rel_b, ceiling, disattenuated)


def as_float(x: np.ndarray) -> float:
    """The single experiment's value as a float (NaN stays NaN)."""
    value = float(np.asarray(x).reshape(-1)[0])
    return value if math.isfinite(value) else math.nan
