"""Stage 07's judge: which trait a reply shows, in each judge mode, with resumable logs.

The judge is always the untrained ``params.judge`` model. It reads the user prompt, a reply and
the two traits (listed in the match's own judge order) and names one:

* ``generative``: it writes the answer, parsed by `judge.parse_judgement`;
* ``logprob``: forced choice, the trait whose word it gives the higher log-probability;
* ``calibrated``: forced choice against its own leaning, the trait whose log-probability rose
  more over the scores it gives the same match with an *empty* reply (`prior_scores`), i.e.
  the sign of ``(s1 - s2) - (p1 - p2)``.

Logs live in ``judge/`` of the stage folder: the shared sampler's log for generative verdicts
and an append-only score log for forced choice, each named after the model's reply log and
the judge, and listed in ``index.json`` (`record_log`). A rerun reuses every logged verdict.

Judging reads a few settings of stage 07's ``Config`` (`JudgeSettings`); the stage passes its
``Config`` itself.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from ..config import EvalParams
from ..errors import DataError
from ..prompts import preference_judge_messages
from ..renderers import get_renderer
from ..sampling import SampleRequest, sample_chat
from ..stage_config import digest
from ..store import append_jsonl, read_jsonl
from . import elo as elo_math
from . import judge as judging
from .preference_matches import Match, bootstrap_seed, outcomes

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


def needs_forced_choice(modes: Sequence[str]) -> bool:
    """Whether the judge's word log-probabilities (and its empty-reply prior) are needed: the
    calibrated mode is built on the plain forced-choice scores."""
    return bool(set(FORCED_CHOICE_MODES) & set(modes))


def record_log(folder: Path, name: str, entry: Mapping[str, Any]) -> None:
    """Keep ``index.json`` saying which log file belongs to which model and settings."""
    path = folder / "index.json"
    index = json.loads(path.read_text()) if path.is_file() else {}
    if index.get(name) != dict(entry):
        index[name] = dict(entry)
        folder.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(index, indent=2, sort_keys=True))


def judge_replies(
    settings: JudgeSettings,
    judge_client: Callable[[], Any],
    label: str,
    response_log: str,
    matches: Sequence[Match],
    responses: Mapping[str, Any],
    folder: Path,
    prior: Mapping[str, tuple[float, float]] | None = None,
) -> dict[str, dict[str, Any]]:
    """The judge modes for one model's replies; returns match key -> verdict fields.

    ``response_log`` names the model's reply log (the verdict logs are named after it);
    ``prior`` (match id -> `prior_scores`) is needed for the ``calibrated`` mode.
    """
    evals = settings.evals
    out: dict[str, dict[str, Any]] = {m.key: {} for m in matches}
    conversations = {
        m.key: preference_judge_messages(
            m.prompt, responses[m.key].full_text, m.judge_first, m.judge_second
        )
        for m in matches
    }
    base_name = f"{label}-{digest({'judge': settings.judge, 'responses': response_log})}"
    if "generative" in evals.judge_modes:
        sampling = {
            "max_tokens": evals.judge_max_tokens,
            "temperature": evals.judge_temperature,
            "top_p": evals.judge_top_p,
            "top_k": -1,
            "seed": settings.seed,
        }
        name = f"{base_name}-generative.jsonl"
        record_log(
            folder / "judge", name, {"judge": settings.judge, "responses": response_log, **sampling}
        )
        verdicts = sample_chat(
            judge_client,
            settings.judge_renderer,
            [SampleRequest(key=m.key, messages=conversations[m.key]) for m in matches],
            **sampling,
            log_path=folder / "judge" / name,
            desc=f"07 judge (generative): {label}",
        )
        for m in matches:
            completion = verdicts[m.key]
            verdict = judging.parse_judgement(completion.full_text, m.first, m.second)
            out[m.key].update(
                generative_raw=completion.full_text,
                generative_complete=completion.complete,
                generative_choice=verdict.choice,
                generative_reason=verdict.reason,
            )
    if needs_forced_choice(evals.judge_modes):
        name = f"{base_name}-logprob.jsonl"
        record_log(folder / "judge", name, {"judge": settings.judge, "responses": response_log})
        scores = forced_choice_log(
            settings, judge_client, matches, conversations, folder / "judge" / name
        )
        for m in matches:
            lp_first, lp_second = scores[m.key]
            verdict = judging.forced_choice(lp_first, lp_second, m.judge_first, m.judge_second)
            out[m.key].update(
                logprob_judge_first=lp_first,
                logprob_judge_second=lp_second,
                logprob_choice=verdict.choice,
                logprob_reason=verdict.reason,
            )
            if prior is not None:
                p_first, p_second = prior[m.match_id]
                calibrated = judging.forced_choice(
                    lp_first - p_first, lp_second - p_second, m.judge_first, m.judge_second
                )
                out[m.key].update(
                    calibrated_prior_first=p_first,
                    calibrated_prior_second=p_second,
                    calibrated_choice=calibrated.choice,
                    calibrated_reason=calibrated.reason,
                )
    return out


def forced_choice_log(
    settings: JudgeSettings,
    judge_client: Callable[[], Any],
    matches: Sequence[Match],
    conversations: Mapping[str, list[dict[str, str]]],
    log_path: Path,
) -> dict[str, tuple[float, float]]:
    """Forced-choice scores, appended to ``log_path`` per chunk and reused on a rerun.

    A logged row is reused only when its digest (judge conversation and candidates) matches;
    any other row under the same key means the inputs changed and the log is refused.
    """
    digests = {
        m.key: digest(
            {"messages": conversations[m.key], "candidates": [m.judge_first, m.judge_second]}
        )
        for m in matches
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
    missing = [m for m in matches if m.key not in done]
    if missing:
        client = judge_client()
        renderer = get_renderer(settings.judge_renderer, client.get_tokenizer())
        for start in range(0, len(missing), SCORE_CHUNK):
            part = missing[start : start + SCORE_CHUNK]
            scores = judging.forced_choice_scores(
                client,
                renderer,
                [(conversations[m.key], m.judge_first, m.judge_second) for m in part],
                desc="07 judge (forced choice)" if start == 0 else None,
            )
            for m, (first, second) in zip(part, scores):
                append_jsonl(
                    log_path,
                    {"key": m.key, "digest": digests[m.key], "first": first, "second": second},
                )
                done[m.key] = (first, second)
    return done


def prior_scores(
    settings: JudgeSettings,
    judge_client: Callable[[], Any],
    matches: Sequence[Match],
    folder: Path,
) -> dict[str, tuple[float, float]]:
    """The judge's forced-choice scores with an empty reply, per match id: its leaning between
    the two words before reading anything.

    Conditions share their draws (pair, prompt, listing order), so one score pair per match id
    covers every condition and every model; the log is keyed by match and reused like the
    others.
    """
    firsts = [m for m in matches if m.condition == settings.evals.elo_conditions[0]]
    conversations = {
        m.key: preference_judge_messages(m.prompt, "", m.judge_first, m.judge_second)
        for m in firsts
    }
    name = f"prior-{digest({'judge': settings.judge})}-logprob.jsonl"
    record_log(folder / "judge", name, {"judge": settings.judge, "responses": "(empty)"})
    scores = forced_choice_log(
        settings, judge_client, firsts, conversations, folder / "judge" / name
    )
    return {m.match_id: scores[m.key] for m in firsts}


def prior_ratings(
    settings: JudgeSettings,
    matches: Sequence[Match],
    prior: Mapping[str, tuple[float, float]],
) -> elo_math.EloResult:
    """Elo of the judge's empty-reply forced choices: the ranking its word preferences alone
    would produce (stage 07 compares every model's table with it)."""
    records = []
    for m in matches:
        if m.condition != settings.evals.elo_conditions[0]:
            continue
        verdict = judging.forced_choice(*prior[m.match_id], m.judge_first, m.judge_second)
        records.append({"first": m.first, "second": m.second, "logprob_choice": verdict.choice})
    return elo_math.rate(
        outcomes(records, "logprob"),
        settings.traits,
        settings.evals.elo_bootstrap,
        bootstrap_seed(settings.seed, "judge_prior", "logprob"),
    )


def judge_report(records: Sequence[Mapping[str, Any]], modes: Sequence[str]) -> dict[str, Any]:
    """Parse rate and reasons, decided counts, agreement and position biases of the judge."""
    report: dict[str, Any] = {"verdicts": len(records)}
    for mode in modes:
        decided = sum(r.get(f"{mode}_choice") is not None for r in records)
        report[mode] = {
            "decided": decided,
            "reasons": judging.parse_counts(records, mode),
            "position_bias": judging.position_bias(records, mode).to_dict(),
            "offer_order_bias": judging.offer_order_bias(records, mode).to_dict(),
        }
    if "generative" in modes:
        report["parse_rate"] = report["generative"]["decided"] / len(records) if records else None
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
    "forced_choice_log",
    "judge_replies",
    "judge_report",
    "needs_forced_choice",
    "prior_ratings",
    "prior_scores",
    "record_log",
]
