"""Stage 07's judge: which trait a reply shows, in each judge mode, with resumable logs.

The judge is always the untrained ``params.judge`` model. It reads the user prompt, a reply and
the two traits, and names one. Every reply is judged **twice**, with the pair listed both ways
(`preference_matches.ORDERS`), and the two verdicts are combined, so a judge leaning towards
whatever is listed first cannot hand every model the same wins (issue 16):

* ``generative``: it writes the answer, parsed by `judge.parse_judgement`, once per order; two
  agreeing answers are the verdict, disagreeing ones are no verdict (``order_inconsistent``,
  reported as the judge's position-bias rate), an unparsed one is no verdict (``unparsed``);
* ``logprob``: forced choice. The margin towards ``match.first`` is the log-probability of its
  word minus the other's, summed over the two orders (a position bias adds the same amount to
  the first-listed word in each order, so it cancels); the verdict is its sign;
* ``calibrated``: forced choice against the judge's own leaning between the two words. Its
  *prior* is the same both-order margin after an *empty* reply (`prior_scores`). Over one
  model's matches of one condition, the margin is regressed on the prior through the origin
  and only the fitted part is removed (`judge_prior.remove_fitted_prior`); the verdict is the
  sign of what is left. The earlier version subtracted the prior one for one (slope 1), which
  invents preferences against the judge's taste when the leaning survives a reply at half
  strength. The fitted slope is recorded per record (``calibrated_slope``).

Logs live in ``judge/`` of the stage folder: the shared sampler's log for generative verdicts
and an append-only score log for forced choice, keyed by match key and listing order
(``adopt:m00003:ba``), each named after the model's reply log and the judge, and listed in
``index.json`` (`record_log`). A rerun reuses every logged verdict.

Judging reads a few settings of stage 07's ``Config`` (`JudgeSettings`); the stage passes its
``Config`` itself.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..config import EvalParams
from ..errors import DataError
from ..prompts import preference_judge_messages
from ..renderers import get_renderer
from ..sampling import SampleRequest, sample_chat
from ..stage_config import digest
from ..store import append_jsonl, read_jsonl
from . import elo as elo_math
from . import judge as judging
from .judge_prior import remove_fitted_prior
from .preference_matches import ORDERS, Match, bootstrap_seed, outcomes

FORCED_CHOICE_MODES = ("logprob", "calibrated")
SCORE_CHUNK = 64  # forced-choice conversations scored (and logged) per call


class JudgeSettings(Protocol):
    """What judging reads of stage 07's ``Config``: the judge and its chat format, the ``evals``
    section (judge modes and sampling, conditions, bootstrap), the seed and the traits."""

    @property
    def judge(self) -> str: ...

    @property
    def judge_renderer(self) -> str: ...

    @property
    def evals(self) -> EvalParams: ...

    @property
    def seed(self) -> int: ...

    @property
    def traits(self) -> tuple[str, ...]: ...


@dataclass(frozen=True)
class ScoreItem:
    """One forced-choice conversation: its log key, the judge's messages and the two trait
    words in the order the messages list them."""

    key: str
    messages: list[dict[str, str]]
    listed: tuple[str, str]


def needs_forced_choice(modes: Sequence[str]) -> bool:
    """Whether the judge's word log-probabilities (and its empty-reply prior) are needed: the
    calibrated mode is built on the plain forced-choice scores."""
    return bool(set(FORCED_CHOICE_MODES) & set(modes))


def single_order_mode(mode: str) -> str:
    """The mode whose single-order verdicts describe ``mode``'s judge: the calibrated mode
    reads the plain forced-choice scores, so their position bias is its own."""
    return "logprob" if mode == "calibrated" else mode


def record_log(folder: Path, name: str, entry: Mapping[str, Any]) -> None:
    """Keep ``index.json`` saying which log file belongs to which model and settings."""
    path = folder / "index.json"
    index = json.loads(path.read_text()) if path.is_file() else {}
    if index.get(name) != dict(entry):
        index[name] = dict(entry)
        folder.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(index, indent=2, sort_keys=True))


def order_key(match: Match, order: str) -> str:
    """The log key of one listing order of a match."""
    return f"{match.key}:{order}"


def _conversations(
    matches: Sequence[Match], reply_of: Callable[[Match], str]
) -> dict[str, ScoreItem]:
    """The judge's conversation of every (match, listing order), by `order_key`."""
    items = {}
    for m in matches:
        for order in ORDERS:
            listed = m.listed(order)
            key = order_key(m, order)
            items[key] = ScoreItem(
                key, preference_judge_messages(m.prompt, reply_of(m), *listed), listed
            )
    return items


def _margins(m: Match, scores: Mapping[str, tuple[float, float]]) -> tuple[dict[str, float], float]:
    """Per listing order the log-probability margin towards ``m.first`` (its word minus the
    other's), and their sum: the both-order margin in which a position bias cancels."""
    per_order = {}
    for order in ORDERS:
        listed_first, listed_second = scores[order_key(m, order)]
        gap = listed_first - listed_second
        per_order[order] = gap if order == "ab" else -gap
    return per_order, sum(per_order.values())


def judge_replies(
    settings: JudgeSettings,
    judge_client: Callable[[], Any],
    label: str,
    response_log: str,
    matches: Sequence[Match],
    responses: Mapping[str, Any],
    folder: Path,
    prior: Mapping[str, float] | None = None,
) -> dict[str, dict[str, Any]]:
    """The judge modes for one model's replies, both listing orders; match key -> fields.

    ``response_log`` names the model's reply log (the verdict logs are named after it);
    ``prior`` (match id -> both-order empty-reply margin, `prior_scores`) is needed for the
    ``calibrated`` mode, which is fitted per condition over ``matches``.
    """
    evals = settings.evals
    out: dict[str, dict[str, Any]] = {m.key: {} for m in matches}
    items = _conversations(matches, lambda m: responses[m.key].full_text)
    base_name = f"{label}-{digest({'judge': settings.judge, 'responses': response_log})}"
    if "generative" in evals.judge_modes:
        name = f"{base_name}-generative.jsonl"
        answers = _generative(
            settings, judge_client, label, response_log, items, folder / "judge" / name
        )
        _read_generative(matches, answers, out)
    if needs_forced_choice(evals.judge_modes):
        name = f"{base_name}-logprob.jsonl"
        record_log(folder / "judge", name, {"judge": settings.judge, "responses": response_log})
        scores = forced_choice_log(
            settings, judge_client, list(items.values()), folder / "judge" / name
        )
        for m in matches:
            per_order, margin = _margins(m, scores)
            fields: dict[str, Any] = {}
            for order, gap in per_order.items():
                single = judging.forced_choice(gap, 0.0, m.first, m.second)
                fields[f"logprob_{order}_margin"] = gap
                fields[f"logprob_{order}_choice"] = single.choice
            verdict = judging.forced_choice(margin, 0.0, m.first, m.second)
            out[m.key].update(
                fields,
                logprob_margin=margin,
                logprob_choice=verdict.choice,
                logprob_reason=verdict.reason,
            )
        if "calibrated" in evals.judge_modes:
            if prior is None:
                raise DataError("judge_replies: the calibrated mode needs the judge's prior")
            _calibrate(matches, out, prior)
    return out


def _generative(
    settings: JudgeSettings,
    judge_client: Callable[[], Any],
    label: str,
    response_log: str,
    items: Mapping[str, ScoreItem],
    log_path: Path,
) -> dict[str, Any]:
    """Sampled answers to every (match, listing order), logged and resumable, by key."""
    evals = settings.evals
    sampling = {
        "max_tokens": evals.judge_max_tokens,
        "temperature": evals.judge_temperature,
        "top_p": evals.judge_top_p,
        "top_k": -1,
        "seed": settings.seed,
    }
    entry = {"judge": settings.judge, "responses": response_log, **sampling}
    record_log(log_path.parent, log_path.name, entry)
    return sample_chat(
        judge_client,
        settings.judge_renderer,
        [SampleRequest(key=item.key, messages=item.messages) for item in items.values()],
        **sampling,
        log_path=log_path,
        desc=f"07 judge (generative): {label}",
    )


def _read_generative(
    matches: Sequence[Match], answers: Mapping[str, Any], out: dict[str, dict[str, Any]]
) -> None:
    """Each order's answer parsed, and the two combined (`judge.combine_orders`)."""
    for m in matches:
        verdicts = {}
        for order in ORDERS:
            completion = answers[order_key(m, order)]
            verdict = judging.parse_judgement(completion.full_text, m.first, m.second)
            verdicts[order] = verdict
            out[m.key].update(
                {
                    f"generative_{order}_raw": completion.full_text,
                    f"generative_{order}_complete": completion.complete,
                    f"generative_{order}_choice": verdict.choice,
                    f"generative_{order}_reason": verdict.reason,
                }
            )
        combined = judging.combine_orders(verdicts["ab"], verdicts["ba"])
        out[m.key].update(generative_choice=combined.choice, generative_reason=combined.reason)


def _calibrate(
    matches: Sequence[Match], out: dict[str, dict[str, Any]], prior: Mapping[str, float]
) -> None:
    """The calibrated verdicts of one model: per condition, the both-order margins minus the
    fitted part of the judge's prior (`judge_prior.remove_fitted_prior`)."""
    conditions = list(dict.fromkeys(m.condition for m in matches))
    for condition in conditions:
        chosen = [m for m in matches if m.condition == condition]
        margins = np.array([out[m.key]["logprob_margin"] for m in chosen], dtype=float)
        priors = np.array([prior[m.match_id] for m in chosen], dtype=float)
        usable = np.isfinite(margins) & np.isfinite(priors)
        calibrated = np.full_like(margins, np.nan)
        calibrated[usable], fitted = remove_fitted_prior(margins[usable], priors[usable])
        slope = float(fitted) if math.isfinite(float(fitted)) else None  # None: nothing removed
        for m, margin, p in zip(chosen, calibrated, priors):
            verdict = judging.forced_choice(float(margin), 0.0, m.first, m.second)
            out[m.key].update(
                calibrated_prior=float(p),
                calibrated_margin=float(margin),
                calibrated_slope=slope,
                calibrated_choice=verdict.choice,
                calibrated_reason=verdict.reason,
            )


def forced_choice_log(
    settings: JudgeSettings,
    judge_client: Callable[[], Any],
    items: Sequence[ScoreItem],
    log_path: Path,
    desc: str = "07 judge (forced choice)",
) -> dict[str, tuple[float, float]]:
    """Forced-choice scores of the two listed words per item, appended to ``log_path`` per
    chunk and reused on a rerun; key -> (score of ``listed[0]``, score of ``listed[1]``).

    A logged row is reused only when its digest (judge conversation and candidates) matches;
    any other row under the same key means the inputs changed and the log is refused.
    """
    digests = {
        item.key: digest({"messages": item.messages, "candidates": list(item.listed)})
        for item in items
    }
    done: dict[str, tuple[float, float]] = {}
    for row in read_jsonl(log_path):
        key = row.get("key")
        if key not in digests:
            continue
        if row.get("digest") != digests[key]:
            raise DataError(
                f"{log_path}: the logged scores for {key!r} were made from a different judge "
                "prompt; delete the log or use a new stage folder"
            )
        done[key] = (float(row["first"]), float(row["second"]))
    missing = [item for item in items if item.key not in done]
    if missing:
        client = judge_client()
        renderer = get_renderer(settings.judge_renderer, client.get_tokenizer())
        for start in range(0, len(missing), SCORE_CHUNK):
            part = missing[start : start + SCORE_CHUNK]
            scores = judging.forced_choice_scores(
                client,
                renderer,
                [(item.messages, *item.listed) for item in part],
                desc=desc if start == 0 else None,
            )
            for item, (first, second) in zip(part, scores):
                append_jsonl(
                    log_path,
                    {
                        "key": item.key,
                        "digest": digests[item.key],
                        "first": first,
                        "second": second,
                    },
                )
                done[item.key] = (first, second)
    return done


def prior_scores(
    settings: JudgeSettings,
    judge_client: Callable[[], Any],
    matches: Sequence[Match],
    folder: Path,
) -> dict[str, float]:
    """The judge's both-order forced-choice margin towards ``first`` with an empty reply, per
    match id: its leaning between the two words before reading anything.

    Conditions share their draws (pair and prompt), so one margin per match id covers every
    condition and every model; the log is keyed by match and order and reused like the others.
    """
    firsts = [m for m in matches if m.condition == settings.evals.elo_conditions[0]]
    items = _conversations(firsts, lambda m: "")
    name = f"prior-{digest({'judge': settings.judge})}-logprob.jsonl"
    record_log(folder / "judge", name, {"judge": settings.judge, "responses": "(empty)"})
    scores = forced_choice_log(
        settings,
        judge_client,
        list(items.values()),
        folder / "judge" / name,
        desc="07 judge prior (empty replies)",
    )
    return {m.match_id: _margins(m, scores)[1] for m in firsts}


def prior_ratings(
    settings: JudgeSettings,
    matches: Sequence[Match],
    prior: Mapping[str, float],
) -> elo_math.EloResult:
    """Elo of the judge's empty-reply forced choices: the ranking its word preferences alone
    would produce (stage 07 compares every model's table with it)."""
    records = []
    for m in matches:
        if m.condition != settings.evals.elo_conditions[0]:
            continue
        verdict = judging.forced_choice(prior[m.match_id], 0.0, m.first, m.second)
        records.append({"first": m.first, "second": m.second, "logprob_choice": verdict.choice})
    return elo_math.rate(
        outcomes(records, "logprob"),
        settings.traits,
        settings.evals.elo_bootstrap,
        bootstrap_seed(settings.seed, "judge_prior", "logprob"),
    )


def judge_report(records: Sequence[Mapping[str, Any]], modes: Sequence[str]) -> dict[str, Any]:
    """Per mode: decided verdicts and their reasons, the judge's position bias (single-order
    verdicts naming the trait listed first), how often the two orders disagree, the model's
    leaning towards Option 1; the generative parse rate (single answers) and mode agreement.

    The calibrated mode has no single-order verdicts: its position bias and order
    inconsistency are those of the forced-choice scores it reads (`single_order_mode`).
    """
    report: dict[str, Any] = {"verdicts": len(records)}
    for mode in modes:
        decided = sum(r.get(f"{mode}_choice") is not None for r in records)
        single = single_order_mode(mode)
        report[mode] = {
            "decided": decided,
            "decided_share": decided / len(records) if records else math.nan,
            "reasons": judging.parse_counts(records, mode),
            "position_bias": judging.position_bias(records, single).to_dict(),
            "order_inconsistent": judging.order_inconsistency(records, single).to_dict(),
            "offer_order_bias": judging.offer_order_bias(records, mode).to_dict(),
        }
    if "generative" in modes:
        answers: dict[str, int] = {}
        for order in ORDERS:
            for reason, count in judging.parse_counts(records, f"generative_{order}").items():
                answers[reason] = answers.get(reason, 0) + count
        report["generative"]["answer_reasons"] = answers
        report["parse_rate"] = judging.parse_rate(records) if records else None
    else:
        report["parse_rate"] = None
    if set(modes) >= {"generative", "logprob"}:
        report["mode_agreement"] = judging.mode_agreement(
            records, "generative", "logprob"
        ).to_dict()
    return report


__all__ = [
    "FORCED_CHOICE_MODES",
    "JudgeSettings",
    "ScoreItem",
    "forced_choice_log",
    "judge_replies",
    "judge_report",
    "needs_forced_choice",
    "order_key",
    "prior_ratings",
    "prior_scores",
    "record_log",
    "single_order_mode",
]
