"""Stage 09's preference signals as comparators, their cached verdicts, and their accuracy.

Two signals answer "which of these two replies fits the character better"
(`evaluate.preference_model` explains how each is asked and scored): the prompted judge (the
untrained ``judge`` model with the whole constitution) and the trained preference model (its
LoRA on the judge's base, with the constitution's one-line summary). Verdicts are cached per
signal and texts (`judge_cached`), so a resumed run, or a probe that repeats a comparison,
never asks again. `signal_accuracy` is the held-out table notebook 09 shows first: a signal
near 0.5 gives RL nothing but noise to climb.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..constitutions import Constitution
from ..evaluate.intervals import bootstrap_mean
from ..evaluate.preference_model import (
    Comparator,
    ForcedChoiceComparator,
    Judgement,
    Matchup,
    PMExample,
    pairwise_accuracy,
)
from ..sampler_setup import model_sampler
from ..stage_config import digest
from ..store import Checkpoint, append_jsonl, portable_path, read_jsonl
from .settings import RLAIFSettings


def signal_comparator(
    config: RLAIFSettings,
    service: Any,
    constitution: Constitution,
    preference_model: Checkpoint | None = None,
    run_dir: Path | None = None,
    desc: str | None = None,
) -> ForcedChoiceComparator:
    """A signal on the judge's chat format: without ``preference_model``, the prompted judge
    (the untrained ``judge`` model with the whole constitution, hard verdicts); with it, the
    trained preference model (its LoRA on the judge's base with the constitution's summary,
    soft verdicts), named after its sampler path as the run in ``run_dir`` records it, so a
    copied run reuses its cache."""
    if preference_model is None:
        sampler_path = None
        character, identity = constitution.traits_text, f"judge:{config.judge}"
    elif run_dir is None:
        raise ValueError("the preference model's signal needs run_dir (it names its cache)")
    else:
        sampler_path = preference_model.sampler_path
        character = constitution.description
        identity = f"pm:{portable_path(run_dir, sampler_path)}"
    return ForcedChoiceComparator(
        model_sampler(service, config.judge, sampler_path),
        config.judge_renderer,
        character,
        identity=identity,
        soft=preference_model is not None,
        desc=desc,
    )


def judge_cached(
    comparator: Comparator, matchups: Sequence[Matchup], path: Path
) -> list[Judgement]:
    """Verdicts for ``matchups``, reusing rows of ``path`` made by the same signal on the same
    texts (digest of identity, prompt and both replies); new ones are appended."""
    digests = {m.key: digest({"signal": comparator.identity, **asdict(m)}) for m in matchups}
    done: dict[str, Judgement] = {}
    for row in read_jsonl(path):
        key = row.get("key")
        if key in digests and row.get("digest") == digests[key]:
            done[key] = Judgement(key, float(row["credit"]), row.get("detail") or {})
    missing = [m for m in matchups if m.key not in done]
    if missing:
        for judgement in comparator(missing):
            append_jsonl(
                path,
                {
                    "key": judgement.key,
                    "digest": digests[judgement.key],
                    "credit": judgement.credit,
                    "detail": dict(judgement.detail),
                },
            )
            done[judgement.key] = judgement
    return [done[m.key] for m in matchups]


def signal_accuracy(
    comparators: Mapping[str, Comparator],
    examples: Sequence[PMExample],
    cache_path: Path,
    bootstrap: int,
    seed: int,
) -> list[dict[str, Any]]:
    """Held-out pairwise accuracy of each signal, per source and overall, with 95% intervals
    that resample prompts. Every held-out comparison is asked in both orders (a signal that
    always answers "A" scores 0.5)."""
    heldout = [e for e in examples if e.split == "heldout"]
    rows = []
    for name, comparator in comparators.items():
        judgements = judge_cached(
            comparator,
            [e.matchup() for e in heldout],
            cache_path.with_name(f"{name}-heldout.jsonl"),
        )
        credit = {j.key: j.credit for j in judgements}
        for source in [*dict.fromkeys(e.source for e in heldout), "all"]:
            part = [e for e in heldout if source in ("all", e.source)]
            if not part:
                continue
            groups: dict[str, list[float]] = {}
            for e in part:
                groups.setdefault(e.prompt_id, []).append(float(credit[e.id] > 0.5))
            estimate = bootstrap_mean(groups.values(), bootstrap, seed)
            rows.append(
                {
                    "signal": name,
                    "source": source,
                    **pairwise_accuracy(part, judgements),
                    "low": estimate.low,
                    "high": estimate.high,
                }
            )
    return rows
