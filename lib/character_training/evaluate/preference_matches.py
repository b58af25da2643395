"""Stage 07's traits and matches (pure): which two traits are offered, on which user prompt,
in which order the judge lists them, and how verdicts become Elo outcomes.

Every draw comes from the run seed alone, so every model and every condition is measured on
identical matches, and their bootstrap resamples are paired: `bootstrap_seed` depends on the
condition and the judge mode, never on the model.
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


@dataclass(frozen=True)
class Match:
    """One comparison: the two traits as offered (``first`` is Option 1), the user prompt, and
    the trait the judge sees listed first (drawn independently)."""

    condition: str
    match_id: str
    first: str
    second: str
    prompt_id: str
    prompt: str
    judge_first: str

    @property
    def key(self) -> str:
        return f"{self.condition}:{self.match_id}"

    @property
    def judge_second(self) -> str:
        return self.second if self.judge_first == self.first else self.first


def draw_matches(
    traits: Sequence[str],
    prompts: Sequence[Mapping[str, Any]],
    conditions: Sequence[str],
    n: int,
    seed: int,
) -> list[Match]:
    """``n`` matches per condition; the same draws (pair, order, prompt, judge order) for all.

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
        judge_first = first if rng.random() < 0.5 else second
        draws.append((f"m{i:05d}", first, second, prompt, judge_first))
    return [
        Match(condition, mid, a, b, str(p["id"]), str(p["prompt"]), jf)
        for condition in conditions
        for mid, a, b, p, jf in draws
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
    "Match",
    "bootstrap_seed",
    "choose_traits",
    "draw_matches",
    "load_traits",
    "outcomes",
]
