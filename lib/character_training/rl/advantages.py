"""From verdicts to per-token advantages: matchups within a group, win rates, centring, KL.

A group is the ``evals.rl_group_size`` replies the policy gave to one prompt. Its replies play
pairwise matchups (every pair, or a seeded subset of ``rl.matchups_per_group``); a reply's
reward is its win rate over the matchups it played, and its advantage is that win rate minus
the group's mean (``rl.advantage: center``), or also divided by the group's standard deviation
(``std``). Centring only is the default because win rates already live on one scale for every
prompt; dividing by a small spread would blow up near-ties into full-size updates on the
prompts the judge cannot tell apart. The KL penalty to the starting policy is then folded into
each reply token's advantage (reward shaping, no reward-to-go).

Everything here is pure.
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Sequence

from ..errors import ConfigError, DataError


def draw_matchups(group_size: int, n: int, seed: int, key: str) -> list[tuple[int, int]]:
    """The pairs (i, j), i < j, a group plays: all of them when ``n`` is 0 or covers them all,
    else ``n`` drawn without replacement from a seed of (run seed, ``key``)."""
    every = [(i, j) for i in range(group_size) for j in range(i + 1, group_size)]
    if n <= 0 or n >= len(every):
        return every
    picked = random.Random(f"{seed}:rl-matchups:{key}").sample(every, n)
    return sorted(picked)


def group_win_rates(
    group_size: int, matchups: Sequence[tuple[int, int]], credits: Sequence[float]
) -> list[float]:
    """Each reply's mean credit over the matchups it played (as first: credit, as second:
    1 - credit); a reply that played none gets the mean of the others, i.e. no advantage."""
    if len(matchups) != len(credits):
        raise DataError(f"{len(matchups)} matchups but {len(credits)} verdicts")
    totals = [0.0] * group_size
    counts = [0] * group_size
    for (i, j), credit in zip(matchups, credits):
        totals[i] += credit
        totals[j] += 1.0 - credit
        counts[i] += 1
        counts[j] += 1
    rates = [t / c if c else math.nan for t, c in zip(totals, counts)]
    played = [r for r in rates if not math.isnan(r)]
    fill = statistics.fmean(played) if played else 0.5
    return [fill if math.isnan(r) else r for r in rates]


def group_advantages(win_rates: Sequence[float], mode: str, eps: float = 1e-6) -> list[float]:
    """``center``: win rate minus the group mean; ``std``: that divided by the group's
    (population) standard deviation, and all zeros when the spread is below ``eps``."""
    mean = statistics.fmean(win_rates)
    centred = [w - mean for w in win_rates]
    if mode == "center":
        return centred
    if mode == "std":
        std = statistics.pstdev(win_rates)
        return [c / std for c in centred] if std > eps else [0.0] * len(centred)
    raise ConfigError(f"rl.advantage={mode!r}: expected 'center' or 'std'")


def kl_shaped_advantages(
    advantage: float,
    policy_logprobs: Sequence[float],
    reference_logprobs: Sequence[float],
    kl_coef: float,
) -> list[float]:
    """Per reply token: ``advantage - kl_coef * (logp_policy - logp_ref)``."""
    if len(policy_logprobs) != len(reference_logprobs):
        raise DataError(
            f"policy and reference log-probs differ in length "
            f"({len(policy_logprobs)} vs {len(reference_logprobs)})"
        )
    return [advantage - kl_coef * (p - r) for p, r in zip(policy_logprobs, reference_logprobs)]
