"""Stage 07's traits and matches (pure): which two traits meet on which user prompt, in which
order each model is offered them, in which orders the judge lists them, and how verdicts
become Elo outcomes.

The pair and the prompt of every match come from the run seed alone, so every model and every
condition is measured on identical matches (the paired design), and their bootstrap resamples
are paired: `bootstrap_seed` depends on the condition and the judge mode, never on the model.

Two orders are deliberately *not* shared between models (issue 16):

* the judge reads every reply twice, with the pair listed both ways (`ORDERS`), and the two
  verdicts are combined. A judge leaning towards the trait listed first then cancels out; when
  one listing order per match was shared by every model, that leaning gave all models the
  same wins, and two models with unrelated preferences correlated at Spearman ~0.5;
* the order the two traits are offered to the model ("Option 1", "Option 2") is drawn per
  model (`offered_first`, a hash of seed, model label and match), so a leaning towards
  Option 1 that two models share cannot correlate them either.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from ..errors import DataError
from . import elo as elo_math


def load_traits(path: Path | None = None) -> tuple[str, ...]:
    """The trait vocabulary (package data ``data/traits.yaml`` unless ``path`` is given)."""
    if path is None:
        text = resources.files("character_training").joinpath("data/traits.yaml").read_text()
        where = "character_training/data/traits.yaml"
    else:
        text, where = Path(path).read_text(encoding="utf-8"), str(path)
    data = yaml.safe_load(text) or {}
    traits = data.get("traits") if isinstance(data, Mapping) else None
    if not isinstance(traits, list) or len(traits) < 2:
        raise DataError(f"{where}: expected a 'traits' list of at least two words")
    for trait in traits:
        if not isinstance(trait, str) or not trait.isalpha() or trait != trait.lower():
            raise DataError(f"{where}: trait {trait!r}: expected one lowercase word of letters")
    if len(set(traits)) != len(traits):
        raise DataError(f"{where}: a trait is listed twice")
    return tuple(traits)


def choose_traits(vocabulary: Sequence[str], n: int, seed: int) -> tuple[str, ...]:
    """``n`` traits drawn with the run seed (0: all), in vocabulary order."""
    if n == 0 or n >= len(vocabulary):
        return tuple(vocabulary)
    picked = set(random.Random(f"{seed}:elo-traits").sample(list(vocabulary), n))
    return tuple(t for t in vocabulary if t in picked)


ORDERS = ("ab", "ba")
"""The judge's two listing orders of a match: ``ab`` lists ``first`` first, ``ba`` ``second``."""


@dataclass(frozen=True)
class Match:
    """One comparison: the two traits (``first``, ``second``: the pair as drawn, the reference
    of every margin and listing order) and the user prompt. Which one a model is offered as
    Option 1 is `offered_first`; the judge sees both listing orders (`listed`)."""

    condition: str
    match_id: str
    first: str
    second: str
    prompt_id: str
    prompt: str

    @property
    def key(self) -> str:
        return f"{self.condition}:{self.match_id}"

    def other(self, trait: str) -> str:
        """The pair's other trait."""
        return self.second if trait == self.first else self.first

    def listed(self, order: str) -> tuple[str, str]:
        """The two traits in the judge's listing ``order`` (one of `ORDERS`)."""
        if order not in ORDERS:
            raise DataError(f"listing order {order!r}: expected one of {ORDERS}")
        return (self.first, self.second) if order == "ab" else (self.second, self.first)


def offered_first(seed: int, label: str, match_id: str) -> bool:
    """Whether model ``label`` is offered ``match.first`` as Option 1 in match ``match_id``.

    A hash of (seed, label, match id): fixed for a model (a rerun, every condition), drawn
    apart for every model, so a shared leaning towards Option 1 adds noise to each model but
    no agreement between two models.
    """
    digest = hashlib.sha256(f"{seed}:elo-offer:{label}:{match_id}".encode()).digest()
    return digest[0] % 2 == 0


def offered_pair(match: Match, seed: int, label: str) -> tuple[str, str]:
    """(Option 1, Option 2) of ``match`` as model ``label`` is offered them."""
    if offered_first(seed, label, match.match_id):
        return match.first, match.second
    return match.second, match.first


def draw_matches(
    traits: Sequence[str],
    prompts: Sequence[Mapping[str, Any]],
    conditions: Sequence[str],
    n: int,
    seed: int,
) -> list[Match]:
    """``n`` matches per condition; the same draws (pair and prompt) for all.

    Every draw comes from one stream seeded by the run seed alone, so a rerun, another model or
    another condition sees exactly the same matches.
    """
    if len(traits) < 2:
        raise DataError(f"draw_matches: expected at least two traits, found {len(traits)}")
    if n and not prompts:
        raise DataError("draw_matches: no user prompts to draw from")
    rng = random.Random(f"{seed}:elo-matches")
    draws = []
    for i in range(n):
        first, second = rng.sample(list(traits), 2)
        prompt = prompts[rng.randrange(len(prompts))]
        draws.append((f"m{i:05d}", first, second, prompt))
    return [
        Match(condition, mid, a, b, str(p["id"]), str(p["prompt"]))
        for condition in conditions
        for mid, a, b, p in draws
    ]


def outcomes(records: Sequence[Mapping[str, Any]], mode: str) -> list[elo_math.Outcome]:
    """``(winner, loser)`` per record in order, None where ``mode`` gave no verdict."""
    result: list[elo_math.Outcome] = []
    for r in records:
        choice = r.get(f"{mode}_choice")
        if choice is None:
            result.append(None)
        else:
            result.append((choice, r["second"] if choice == r["first"] else r["first"]))
    return result


def bootstrap_seed(seed: int, condition: str, mode: str) -> int:
    """Resampling seed of one (condition, mode): independent of the model, so that every model
    judged on the same matches is resampled identically (paired)."""
    digest = hashlib.sha256(f"{seed}:elo-bootstrap:{condition}:{mode}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


__all__ = [
    "ORDERS",
    "Match",
    "bootstrap_seed",
    "choose_traits",
    "draw_matches",
    "load_traits",
    "offered_first",
    "offered_pair",
    "outcomes",
]
