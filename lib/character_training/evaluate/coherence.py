"""Pairwise coherence judge: which of two replies to the same prompt makes more sense.

The paper's section 3.3 asks an untrained judge which of two replies (e.g. the character-trained
model's and the system-prompted model's) is more coherent, and keeps a verdict only when it
survives swapping the two replies' positions. A judge with a position bias (it picks "the
first one" whatever it reads) then produces inconsistent pairs, which are dropped and counted
instead of being read as a preference. Win rates come with binomial standard errors over the
consistent comparisons, next to the share of comparisons that were inconsistent (a judge that
is mostly inconsistent has told us little, whatever its win rate says).

Two ways to ask, the same order-swap filter for both:

* ``logprob`` (default): forced choice. The judge's reply is scored as the single letter "A" and
  as "B" (`sampling.reply_logprobs` with ``include_end=False``: the letter as the start of a
  reply that could go on), and the likelier letter is the verdict. Nothing is parsed, so it
  works on any backend and any judge size, and it is cheap: two scoring calls per order.
  *Position calibration* (on by default): a small judge prefers one letter whatever it reads
  (SmolLM2 said "A" in every order, so every comparison was inconsistent and no win rate
  existed). Write the margin log p(A) - log p(B) of a comparison shown in order o as
  bias + s_o * d, with d the judge's preference for the first method and s_o = +1 for "ab",
  -1 for "ba". Every comparison is asked in both orders, so the mean margin over all asked
  rows is exactly the bias: the content terms cancel pair by pair. The calibrated verdict of
  an order is the sign of its margin minus that mean; the order-swap filter then still drops
  comparisons whose two orders disagree once the constant bias is gone (the judge's
  preference is smaller than its order noise). The offset (nats towards "A") and the raw,
  uncalibrated share of "A" verdicts are reported with the rates.
* ``generative``: the judge writes a short reason and a tagged verdict (A, B or NEITHER, the
  paper's INVALID for ties and out-of-character replies), sampled through `sampling.sample_chat`
  with a resumable log and parsed strictly; anything else counts as no verdict.

Pure pieces (`resolve_order_swaps`, `win_rates`, `parse_verdict`) are tested on scripted
verdicts; the two judge functions are thin I/O over the shared sampler.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DataError
from ..field_dict import FieldDict
from ..prompts import COHERENCE_ANSWER_TAGS, coherence_judge_messages
from ..sampling import SampleRequest, reply_logprobs, sample_chat
from ..store import append_jsonl, read_jsonl

ORDERS = ("ab", "ba")
"""``ab``: the first method's reply is shown as A; ``ba``: it is shown as B."""

CONSISTENT = "consistent"
INCONSISTENT = "inconsistent"
INVALID = "invalid"
INCOMPLETE = "incomplete"


@dataclass(frozen=True)
class Comparison:
    """Two methods' replies to one prompt, to be judged in both orders.

    id: unique and stable (it keys the judge's cache and log), e.g.
        ``"<persona>:<first>:<second>:<prompt_id>"``.
    group: what win rates are broken down by besides the pair (e.g. the persona).
    traits: the character both replies were meant to express (the constitution's traits).
    """

    id: str
    first: str
    second: str
    prompt: str
    first_response: str
    second_response: str
    traits: str
    group: str = ""
    prompt_id: str = ""

    def shown(self, order: str) -> tuple[str, str]:
        """(reply shown as A, reply shown as B) in ``order``."""
        _check_order(order)
        if order == "ab":
            return self.first_response, self.second_response
        return self.second_response, self.first_response

    def winner(self, order: str, choice: str | None) -> str | None:
        """The method whose reply was chosen, or None for no verdict."""
        _check_order(order)
        if choice is None:
            return None
        if choice not in ("A", "B"):
            raise DataError(f"choice {choice!r}: expected 'A', 'B' or None")
        shown_first = (order == "ab") == (choice == "A")
        return self.first if shown_first else self.second


def _check_order(order: str) -> None:
    if order not in ORDERS:
        raise DataError(f"order {order!r}: expected one of {ORDERS}")


@dataclass(frozen=True)
class Verdict(FieldDict):
    """The judge's answer for one comparison in one order: "A", "B" or None (no verdict)."""

    comparison_id: str
    order: str
    choice: str | None
    mode: str = "logprob"
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Outcome:
    """A comparison after the order swap: consistent (with its winner), inconsistent (the two
    orders chose different replies), invalid (an order gave no verdict) or incomplete (an order
    was never judged)."""

    comparison_id: str
    first: str
    second: str
    group: str
    status: str
    winner: str | None
    choices: tuple[str | None, str | None]
    declined: bool = False  # an order's judge answered NEITHER (out of character, or a tie)


def resolve_order_swaps(
    comparisons: Sequence[Comparison], verdicts: Iterable[Verdict]
) -> list[Outcome]:
    """One `Outcome` per comparison, keeping a winner only when both orders agree on the reply.

    Agreeing on the *reply* means choosing different letters: the reply that was A in one
    order is B in the other. A judge that always says "A" is therefore inconsistent on every
    comparison, and contributes nothing to the win rates.
    """
    by_key: dict[tuple[str, str], Verdict] = {}
    for verdict in verdicts:
        _check_order(verdict.order)
        by_key[(verdict.comparison_id, verdict.order)] = verdict
    outcomes = []
    for c in comparisons:
        found = [by_key.get((c.id, order)) for order in ORDERS]
        choices = tuple(v.choice if v is not None else None for v in found)
        if any(v is None for v in found):
            status, winner = INCOMPLETE, None
        elif any(choice is None for choice in choices):
            status, winner = INVALID, None
        else:
            winners = {c.winner(order, choice) for order, choice in zip(ORDERS, choices)}
            status = CONSISTENT if len(winners) == 1 else INCONSISTENT
            winner = winners.pop() if status == CONSISTENT else None
        declined = any(v is not None and v.detail.get("reason") == "neither" for v in found)
        outcomes.append(
            Outcome(c.id, c.first, c.second, c.group, status, winner, choices, declined)
        )
    return outcomes


@dataclass(frozen=True)
class WinRate(FieldDict):
    """How often ``first`` beat ``second`` among consistent comparisons, ± a binomial SE, with a
    Wilson 95% interval (``low``, ``high``): with few consistent verdicts the SE alone misleads,
    e.g. one win out of one has SE 0 while the interval is [0.21, 1].

    comparisons: all comparisons of the pair (and group); consistent / inconsistent / invalid /
    incomplete: their outcomes; inconsistent_share: inconsistent / (consistent + inconsistent),
    the judge's order sensitivity; chose_a_share: share of all single-order verdicts that picked
    position A (0.5 for a judge without position bias); out_of_character: comparisons removed
    because the generative judge answered NEITHER in an order (the paper's filter: a pair with a
    reply out of character, or a tie, has no winner; counted within ``invalid``).
    """

    first: str
    second: str
    group: str
    comparisons: int
    consistent: int
    inconsistent: int
    invalid: int
    incomplete: int
    wins_first: int
    win_rate: float
    se: float
    low: float
    high: float
    inconsistent_share: float
    chose_a_share: float
    out_of_character: int = 0


ALL_GROUPS = "all"


def win_rates(outcomes: Sequence[Outcome], by_group: bool = True) -> list[WinRate]:
    """Win rate of each pair's first method, overall (group "all") and, with ``by_group``,
    per group. NaN rate and SE where no comparison was consistent."""
    buckets: dict[tuple[str, str, str], list[Outcome]] = {}
    for o in outcomes:
        buckets.setdefault((o.first, o.second, ALL_GROUPS), []).append(o)
        if by_group and o.group and o.group != ALL_GROUPS:
            buckets.setdefault((o.first, o.second, o.group), []).append(o)
    rates = []
    for (first, second, group), items in buckets.items():
        count = {s: sum(o.status == s for o in items) for s in (CONSISTENT, INCONSISTENT)}
        wins = sum(o.status == CONSISTENT and o.winner == first for o in items)
        n = count[CONSISTENT]
        rate = wins / n if n else math.nan
        se = math.sqrt(rate * (1 - rate) / n) if n else math.nan
        low, high = wilson_interval(wins, n)
        judged = count[CONSISTENT] + count[INCONSISTENT]
        letters = [ch for o in items for ch in o.choices if ch is not None]
        rates.append(
            WinRate(
                first=first,
                second=second,
                group=group,
                comparisons=len(items),
                consistent=n,
                inconsistent=count[INCONSISTENT],
                invalid=sum(o.status == INVALID for o in items),
                incomplete=sum(o.status == INCOMPLETE for o in items),
                wins_first=wins,
                win_rate=rate,
                se=se,
                low=low,
                high=high,
                inconsistent_share=count[INCONSISTENT] / judged if judged else math.nan,
                chose_a_share=letters.count("A") / len(letters) if letters else math.nan,
                out_of_character=sum(o.declined for o in items),
            )
        )
    return rates


def wilson_interval(successes: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion, (NaN, NaN) without trials: scipy's
    ``binomtest(...).proportion_ci(method="wilson")``. Unlike rate ± z·SE it stays inside
    [0, 1] and does not collapse to a point at 0 or n successes."""
    if n <= 0:
        return math.nan, math.nan
    from scipy.stats import binomtest

    ci = binomtest(int(successes), int(n)).proportion_ci(confidence_level=level, method="wilson")
    return float(ci.low), float(ci.high)


# -- asking the judge ----------------------------------------------------------------------------
_ANSWER = re.compile(
    re.escape(COHERENCE_ANSWER_TAGS[0]) + r"\s*([A-Za-z]+)\s*" + re.escape(COHERENCE_ANSWER_TAGS[1])
)


def parse_verdict(text: str) -> tuple[str | None, str]:
    """(choice, reason) from a generative judge's reply: the last tagged answer decides.

    "A"/"B" (any case) are verdicts; "NEITHER" is the judge declining (a tie, or a reply out of
    character) and gives no verdict, as does a reply without a tagged answer or with another
    word in the tags. ``reason`` says which: "ok", "neither", "unparsed".
    """
    found = _ANSWER.findall(text or "")
    if not found:
        return None, "unparsed"
    answer = found[-1].upper()
    if answer in ("A", "B"):
        return answer, "ok"
    if answer == "NEITHER":
        return None, "neither"
    return None, "unparsed"


def _digest(judge: str, messages: Sequence[dict]) -> str:
    blob = json.dumps({"judge": judge, "messages": list(messages)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def position_offset(verdicts: Sequence[Verdict]) -> float:
    """The judge's position bias in nats towards "A": the mean of log p(A) - log p(B) over
    forced-choice verdicts. Unbiased for the bias only when every comparison is present in both
    orders (the content terms cancel pair by pair), which `judge_logprob` guarantees."""
    margins = [
        v.detail["logprob_a"] - v.detail["logprob_b"]
        for v in verdicts
        if math.isfinite(v.detail.get("logprob_a", math.nan))
        and math.isfinite(v.detail.get("logprob_b", math.nan))
    ]
    return sum(margins) / len(margins) if margins else 0.0


def calibrate_positions(verdicts: Sequence[Verdict]) -> list[Verdict]:
    """Forced-choice verdicts re-decided after removing the judge's constant position bias.

    Each verdict's choice becomes the sign of its margin minus `position_offset` (None on an
    exact tie); its detail keeps the raw choice and the offset used. See the module docstring
    for why the mean margin over both orders is the bias.
    """
    offset = position_offset(verdicts)
    out = []
    for v in verdicts:
        margin = v.detail["logprob_a"] - v.detail["logprob_b"] - offset
        choice = "A" if margin > 0 else "B" if margin < 0 else None
        detail = {**v.detail, "raw_choice": v.choice, "position_offset": offset}
        out.append(Verdict(v.comparison_id, v.order, choice, v.mode, detail))
    return out


def raw_choice_a_share(verdicts: Sequence[Verdict]) -> float:
    """Share of single-order verdicts that picked "A" before any calibration (0.5 = no bias)."""
    raw = [v.detail.get("raw_choice", v.choice) for v in verdicts]
    letters = [choice for choice in raw if choice is not None]
    return letters.count("A") / len(letters) if letters else math.nan


def bias_fields(verdicts: Sequence[Verdict], calibrated: bool) -> dict[str, float]:
    """What a win-rate record reports of the judge's letter bias: the offset removed (NaN when
    the verdicts were not calibrated) and the raw share of "A" verdicts."""
    return {
        "position_offset": position_offset(verdicts) if calibrated else math.nan,
        "raw_chose_a_share": raw_choice_a_share(verdicts),
    }


def judge_logprob(
    sampler: Any,
    renderer: Any,
    comparisons: Sequence[Comparison],
    *,
    judge: str,
    cache_path: Path | None = None,
    calibrate: bool = True,
) -> list[Verdict]:
    """Forced-choice verdicts for every comparison in both orders (see the module docstring);
    with ``calibrate`` the judge's position bias over these comparisons is removed first
    (`calibrate_positions`; the cache keeps raw scores, so the flag can change on a rerun).

    ``judge`` identifies the judge model in the cache: a row is reused only when the same judge
    saw the same messages, so a rerun scores only what is new. ``sampler`` may be a zero-argument
    callable that makes the client and ``renderer`` a renderer name; both are resolved only when
    something is left to score, so a fully cached rerun loads no model.
    """
    cached: dict[str, dict[str, Any]] = {}
    if cache_path is not None:
        cached = {row["key"]: row for row in read_jsonl(cache_path)}
    verdicts: dict[str, Verdict] = {}
    pending = []
    for c in comparisons:
        for order in ORDERS:
            messages = coherence_judge_messages(c.prompt, *c.shown(order), c.traits)
            key, digest = f"{c.id}:{order}:logprob", _digest(judge, messages)
            row = cached.get(key)
            if row is not None and row.get("digest") == digest:
                verdicts[key] = Verdict(c.id, order, row["choice"], "logprob", row["detail"])
            else:
                pending.append((key, digest, c, order, messages))
    if pending:
        if not hasattr(sampler, "compute_logprobs"):
            sampler = sampler()
        from ..backends import resolve_client
        from ..renderers import get_renderer

        sampler = resolve_client(sampler)
        if isinstance(renderer, str):
            renderer = get_renderer(renderer, sampler.get_tokenizer())
        items = [(m, letter) for *_, m in pending for letter in ("A", "B")]
        scores = reply_logprobs(
            sampler, renderer, items, include_end=False, desc="coherence judge (forced choice)"
        )
        for i, (key, digest, c, order, _) in enumerate(pending):
            lp_a, lp_b = scores[2 * i], scores[2 * i + 1]
            choice = "A" if lp_a > lp_b else "B" if lp_b > lp_a else None
            detail = {"logprob_a": lp_a, "logprob_b": lp_b}
            verdicts[key] = Verdict(c.id, order, choice, "logprob", detail)
            if cache_path is not None:
                append_jsonl(
                    cache_path, {"key": key, "digest": digest, "choice": choice, "detail": detail}
                )
    ordered = [verdicts[f"{c.id}:{order}:logprob"] for c in comparisons for order in ORDERS]
    return calibrate_positions(ordered) if calibrate else ordered


def judge_generative(
    sampler: Any,
    renderer: Any,
    comparisons: Sequence[Comparison],
    *,
    max_tokens: int,
    temperature: float,
    top_p: float,
    seed: int,
    log_path: Path | None = None,
) -> list[Verdict]:
    """Sampled, parsed verdicts for every comparison in both orders (resumable via the log)."""
    requests = [
        SampleRequest(
            key=f"{c.id}:{order}:generative",
            messages=coherence_judge_messages(c.prompt, *c.shown(order), c.traits, generative=True),
            meta={"comparison_id": c.id, "order": order},
        )
        for c in comparisons
        for order in ORDERS
    ]
    completions = sample_chat(
        sampler,
        renderer,
        requests,
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        log_path=log_path,
        desc="coherence judge (generative)",
    )
    verdicts = []
    for request in requests:
        completion = completions[request.key]
        choice, reason = parse_verdict(completion.text)
        verdicts.append(
            Verdict(
                request.meta["comparison_id"],
                request.meta["order"],
                choice,
                "generative",
                {"reason": reason, "complete": completion.complete, "text": completion.text},
            )
        )
    return verdicts


__all__ = [
    "ALL_GROUPS",
    "CONSISTENT",
    "INCOMPLETE",
    "INCONSISTENT",
    "INVALID",
    "ORDERS",
    "Comparison",
    "Outcome",
    "Verdict",
    "WinRate",
    "bias_fields",
    "calibrate_positions",
    "judge_generative",
    "judge_logprob",
    "parse_verdict",
    "position_offset",
    "raw_choice_a_share",
    "resolve_order_swaps",
    "wilson_interval",
    "win_rates",
]
