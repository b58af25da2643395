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

Every reply is judged twice, with the two traits listed both ways, and the two verdicts are
combined (`combine_orders` for the generative mode; stage 07 sums the two orders' margins for
forced choice), so a judge's leaning towards the trait listed first cancels instead of giving
every model the same wins. The bookkeeping reads records with one verdict per order
(``<mode>_ab_choice``: ``first`` listed first; ``<mode>_ba_choice``: ``second`` listed first)
and the combined one (``<mode>_choice``): `position_bias` is the share of single-order verdicts
naming the trait listed first (0.5 for a judge without position bias, whatever the model
prefers), `order_inconsistency` the share of matches whose two orders disagree.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import DataError
from ..field_dict import FieldDict
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


ORDER_INCONSISTENT = "order_inconsistent"
UNPARSED = "unparsed"


def combine_orders(ab: Verdict, ba: Verdict) -> Verdict:
    """One generative verdict from the two listing orders of a match.

    Both orders name the same trait: that trait. They name different traits: no verdict
    (``order_inconsistent``: the listing order decided, not the reply; its rate is the judge's
    position bias). Either answer unparsed: no verdict (``unparsed``).
    """
    if not (ab.decided and ba.decided):
        return Verdict(None, UNPARSED)
    if ab.choice != ba.choice:
        return Verdict(None, ORDER_INCONSISTENT)
    return Verdict(ab.choice, "ok")


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
class Proportion(FieldDict):
    """A share with its exact (Clopper–Pearson) 95% interval and a two-sided test of 0.5."""

    successes: int
    trials: int
    value: float
    low: float
    high: float
    p_value: float


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
    """Share of ``mode``'s single-order verdicts that name the trait the judge saw first.

    Records carry ``first``, ``second``, ``<mode>_ab_choice`` (``first`` listed first) and
    ``<mode>_ba_choice`` (``second`` listed first). Every match is asked in both orders, so a
    judge without position bias sits at 0.5 whatever the model under test prefers.
    """
    listed_first, decided = 0, 0
    for r in records:
        for order, first_listed in (("ab", r["first"]), ("ba", r["second"])):
            choice = r.get(f"{mode}_{order}_choice")
            if choice is not None:
                decided += 1
                listed_first += choice == first_listed
    return proportion(listed_first, decided)


def order_inconsistency(records: Sequence[Mapping[str, Any]], mode: str) -> Proportion:
    """Share of matches, among those decided in both listing orders, whose two verdicts name
    different traits: how often the listing order, not the reply, decided the judge."""
    both = [r for r in records if r.get(f"{mode}_ab_choice") and r.get(f"{mode}_ba_choice")]
    differ = sum(r[f"{mode}_ab_choice"] != r[f"{mode}_ba_choice"] for r in both)
    return proportion(differ, len(both))


def offer_order_bias(records: Sequence[Mapping[str, Any]], mode: str) -> Proportion:
    """Share of ``mode``'s combined verdicts naming the trait offered to the model as Option 1.

    Records carry ``offered_first``. The offered order is drawn per model and match; a value
    far from 0.5 means the model (or the judge reading it) favours "Option 1", not a trait.
    """
    decided = [r for r in records if r.get(f"{mode}_choice")]
    first = sum(r[f"{mode}_choice"] == r["offered_first"] for r in decided)
    return proportion(first, len(decided))


def mode_agreement(records: Sequence[Mapping[str, Any]], a: str, b: str) -> Proportion:
    """Share of matches where modes ``a`` and ``b`` both decided and chose the same trait."""
    both = [r for r in records if r.get(f"{a}_choice") and r.get(f"{b}_choice")]
    same = sum(r[f"{a}_choice"] == r[f"{b}_choice"] for r in both)
    return proportion(same, len(both))


def parse_rate(records: Sequence[Mapping[str, Any]], mode: str = "generative") -> float:
    """Share of single-order answers of ``mode`` the parser read (nan without answers)."""
    reasons = [r.get(f"{mode}_{order}_reason") for r in records for order in ("ab", "ba")]
    reasons = [reason for reason in reasons if reason is not None]
    return sum(reason == "ok" for reason in reasons) / len(reasons) if reasons else math.nan


def parse_counts(records: Sequence[Mapping[str, Any]], field: str = "generative") -> dict[str, int]:
    """How many records had each ``<field>_reason`` (``ok`` = decided); ``field`` is a mode
    (combined verdicts) or a mode and order (``generative_ab``: single answers)."""
    counts: dict[str, int] = {}
    for record in records:
        reason = record.get(f"{field}_reason")
        if reason is not None:
            counts[reason] = counts.get(reason, 0) + 1
    return counts


__all__ = [
    "ORDER_INCONSISTENT",
    "PARSE_REASONS",
    "UNPARSED",
    "Proportion",
    "Verdict",
    "combine_orders",
    "forced_choice",
    "forced_choice_scores",
    "mode_agreement",
    "offer_order_bias",
    "order_inconsistency",
    "parse_counts",
    "parse_judgement",
    "parse_rate",
    "position_bias",
    "proportion",
]
