"""The revealed-preference judge: which of two traits did a reply express?

Two modes, so that neither a parser nor a single decoding decides the result alone:

* **generative**: the judge writes an answer (the paper's way: temperature 0.1) and
  `parse_judgement` reads it *strictly*. Only the bare trait word counts, in any case, with
  optional quotes, markdown emphasis, trailing punctuation or an ``Answer:`` label. An answer
  naming both traits, neither, or one trait inside a sentence is unparseable: it is counted
  with its reason and never guessed, since a lenient parser (first trait mentioned, say)
  would turn "not formal but casual" into a vote for *formal*.
* **forced choice** (`forced_choice_scores`): the judge's log-probabilities of the two trait
  words as the start of its reply, from ``compute_logprobs`` through the shared
  `sampling.reply_logprobs` (``include_end=False``: the judge may go on after the word). There
  is nothing to parse and every match gets a verdict, on any backend. The trait vocabulary
  has no word that is a prefix of another (checked by the tests), so neither candidate's score
  contains the other's.

How often the two modes agree on the matches where both decided is reported next to the
results: low agreement means the verdicts are mostly the judge's noise.

The judge prompt lists the two traits in a random order per match (recorded); `position_bias`
measures how often a verdict names the trait listed first, which is 0.5 for a judge without
position bias whatever the model under test prefers.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from ..errors import DataError
from ..prompts import REASONING_CLOSE, REASONING_OPEN
from ..sampling import reply_logprobs

PARSE_REASONS = ("ok", "empty", "both", "neither", "extra_text", "unclosed_reasoning")
"""Why a generative verdict was (not) read: ``ok``; ``empty`` answer; ``both`` traits named;
``neither`` named; ``extra_text`` (one trait named, inside other words); ``unclosed_reasoning``
(a reasoning block that never ended, usually cut off by the token budget)."""

_EDGE = " \t\r\n\"'`*_~.,;:!?()[]{}<>“”‘’«»"
_LABEL = re.compile(r"^(?:final\s+)?(?:answer|trait|verdict)\s*[:=\-–—]\s*", re.IGNORECASE)
_REASONING = re.compile(re.escape(REASONING_OPEN) + r".*?" + re.escape(REASONING_CLOSE), re.DOTALL)


@dataclass(frozen=True)
class Verdict:
    """A judge's decision: the trait chosen (None when there is none) and why."""

    choice: str | None
    reason: str

    @property
    def decided(self) -> bool:
        return self.choice is not None


def _core(text: str) -> str:
    """The answer without decoration: edge punctuation, an ``Answer:`` label, emphasis."""
    core = text.strip(_EDGE)
    core = _LABEL.sub("", core)
    return core.strip(_EDGE)


def parse_judgement(text: str, first: str, second: str) -> Verdict:
    """Read a generative judge's answer strictly (see the module docstring).

    A closed reasoning block (``<think>...</think>``) is dropped first; an unclosed one is
    unparseable. Matching is case-insensitive on the whole answer.
    """
    if first.lower() == second.lower():
        raise DataError(f"parse_judgement: the two candidates are the same trait {first!r}")
    if not isinstance(text, str):
        return Verdict(None, "empty")
    body = _REASONING.sub("", text)
    if REASONING_OPEN in body:
        return Verdict(None, "unclosed_reasoning")
    body = body.replace(REASONING_CLOSE, "")
    if not body.strip(_EDGE):
        return Verdict(None, "empty")
    answer = _core(body).lower()
    for trait in (first, second):
        if answer == trait.lower():
            return Verdict(trait, "ok")
    lowered = body.lower()
    named = [t for t in (first, second) if re.search(rf"\b{re.escape(t.lower())}\b", lowered)]
    if len(named) == 2:
        return Verdict(None, "both")
    if not named:
        return Verdict(None, "neither")
    return Verdict(None, "extra_text")


def forced_choice(score_first: float, score_second: float, first: str, second: str) -> Verdict:
    """The trait with the higher log-probability; an exact tie is no verdict."""
    if not (math.isfinite(score_first) and math.isfinite(score_second)):
        return Verdict(None, "not_finite")
    if score_first == score_second:
        return Verdict(None, "tie")
    return Verdict(first if score_first > score_second else second, "ok")


def forced_choice_scores(
    sampler: Any,
    renderer: Any,
    items: Sequence[tuple[Sequence[Mapping[str, Any]], str, str]],
    desc: str | None = None,
) -> list[tuple[float, float]]:
    """Log-probabilities of the two candidate words as the judge's reply, per item.

    ``items`` are ``(judge messages, first, second)``. The words are scored exactly as listed
    in the prompt (lowercase), as a prefix of the reply. All calls go out before any is read.
    """
    flat = [(messages, word) for messages, a, b in items for word in (a, b)]
    scores = reply_logprobs(sampler, renderer, flat, include_end=False, desc=desc)
    return [(scores[2 * i], scores[2 * i + 1]) for i in range(len(items))]


# -- bookkeeping ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Proportion:
    """A share with its exact (Clopper–Pearson) 95% interval and a two-sided test of 0.5."""

    successes: int
    trials: int
    value: float
    low: float
    high: float
    p_value: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def proportion(successes: int, trials: int, level: float = 0.95) -> Proportion:
    """``successes / trials`` with an exact binomial interval (nan when there are no trials)."""
    if trials == 0:
        return Proportion(0, 0, math.nan, math.nan, math.nan, math.nan)
    from scipy.stats import binomtest

    test = binomtest(successes, trials, 0.5)
    ci = test.proportion_ci(confidence_level=level, method="exact")
    return Proportion(
        successes, trials, successes / trials, float(ci.low), float(ci.high), float(test.pvalue)
    )


def position_bias(records: Sequence[Mapping[str, Any]], mode: str) -> Proportion:
    """Share of ``mode``'s verdicts that name the trait the judge saw first.

    Records carry ``judge_first`` and ``<mode>_choice``. Which trait is listed first is drawn at
    random per match, independently of the model's reply, so an unbiased judge sits at 0.5.
    """
    decided = [r for r in records if r.get(f"{mode}_choice")]
    first = sum(r[f"{mode}_choice"] == r["judge_first"] for r in decided)
    return proportion(first, len(decided))


def offer_order_bias(records: Sequence[Mapping[str, Any]], mode: str) -> Proportion:
    """Share of ``mode``'s verdicts naming the trait offered first to the model under test.

    The pair's order in the model's system prompt is random too; a value far from 0.5 means
    the model (or the judge reading it) favours "Option 1", not a trait.
    """
    decided = [r for r in records if r.get(f"{mode}_choice")]
    first = sum(r[f"{mode}_choice"] == r["first"] for r in decided)
    return proportion(first, len(decided))


def mode_agreement(records: Sequence[Mapping[str, Any]], a: str, b: str) -> Proportion:
    """Share of matches where modes ``a`` and ``b`` both decided and chose the same trait."""
    both = [r for r in records if r.get(f"{a}_choice") and r.get(f"{b}_choice")]
    same = sum(r[f"{a}_choice"] == r[f"{b}_choice"] for r in both)
    return proportion(same, len(both))


def parse_counts(records: Sequence[Mapping[str, Any]], mode: str = "generative") -> dict[str, int]:
    """How many verdicts of ``mode`` had each reason (``ok`` = decided)."""
    counts: dict[str, int] = {}
    for record in records:
        reason = record.get(f"{mode}_reason")
        if reason is not None:
            counts[reason] = counts.get(reason, 0) + 1
    return counts


__all__ = [
    "PARSE_REASONS",
    "Proportion",
    "Verdict",
    "forced_choice",
    "forced_choice_scores",
    "mode_agreement",
    "offer_order_bias",
    "parse_counts",
    "parse_judgement",
    "position_bias",
    "proportion",
]
