"""Stage 01: the prompt sets every later stage draws from.

Inputs: a constitution and run parameters. Outputs (``runs/<persona>/<size>/01_prompts/``):

* ``constitution_prompts.jsonl``: the hand-written prompts of each assertion plus
  ``generated_per_assertion`` new ones per assertion, obtained the paper's way (few-shot
  prompting a generator model with the hand-written examples), parsed, filtered for lines that
  are not user requests, and de-duplicated against each other and the evaluation sets;
* ``general_train.jsonl`` / ``general_eval.jsonl``: persona-neutral prompts, split
  deterministically so evaluation prompts are never trained on. A pool too small for the
  requested sizes stops the stage with one line, or, with ``prompts.allow_smaller_pool``,
  shrinks both splits proportionally and records the warning in the manifest; the pool actually
  used (per-source counts, content hash) is part of ``config.json`` and the fingerprint;
* ``qualitative.jsonl``: the fixed side-by-side set;
* ``rejected.jsonl``: every generated line that was dropped, with the reason (nothing is
  dropped silently, unlike the paper code's bare ``except: continue``);
* ``generation_raw.partial.jsonl``: raw generator outputs, one per call, written by the shared
  sampler (`character_training.sampling.sample_chat`) as they arrive; a restarted stage reuses
  them and only issues the calls still missing. Each call's seed derives from the run seed and
  the call's key (``<assertion_id>:<call_index>``), so a resumed run generates exactly what an
  uninterrupted one would have.
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .. import prompt_filters
from ..config import PromptParams, RunParams, SamplingParams
from ..constitutions import Constitution, load_constitution
from ..errors import ConfigError
from ..prompt_sources import (
    PromptRecord,
    describe_pool,
    general_prompt_pool,
    qualitative_prompts,
)
from ..prompts import EXPANSION_PREFILL, expansion_messages
from ..sampler_setup import SAMPLING_PREFIXES, sampler_settings
from ..sampling import SampleRequest, sample_chat
from ..stage_config import StageConfig
from ..store import StageDir, stage_dir, write_jsonl

logger = logging.getLogger(__name__)

STAGE = "01_prompts"


@dataclass(frozen=True)
class Config(StageConfig):
    """Stage 01 settings: the ``prompts`` section (see `config.PromptParams`), the ``sampling``
    section, the generator and its chat format, the constitution and the seed.

    ``general_pool`` is what the general pool actually held (`prompt_sources.describe_pool`:
    per-source counts and a content hash). It is part of the fingerprint because the same
    parameters can yield another pool (a hub set reachable on one day, replaced by the offline
    fallback the next).
    """

    prompts: PromptParams
    sampling: SamplingParams
    constitution_ref: str
    allow_misaligned: bool
    generator: str
    generator_renderer: str
    seed: int
    general_pool: Mapping[str, Any] = field(default_factory=dict)

    SECTION_PREFIXES = {"sampling": SAMPLING_PREFIXES}  # the budget is prompts.max_tokens


@dataclass(frozen=True)
class GenerationCall:
    """One generator request: which assertion, which call, which examples it shows."""

    key: str
    assertion_id: str
    call_index: int
    examples: tuple[str, ...]
    count: int


@dataclass(frozen=True)
class GeneralSplit:
    """The general pool split into train and eval prompts.

    available: distinct prompts left after de-duplication and excluding the qualitative set.
    warning: non-empty when the requested sizes did not fit and were shrunk.
    """

    train: list[PromptRecord]
    evaluation: list[PromptRecord]
    available: int
    warning: str = ""


@dataclass(frozen=True)
class Result:
    """Where the stage wrote, its row counts, and warnings a reader must see (also in the
    manifest): a shrunk general pool, a hub data set replaced by the offline pool."""

    stage_dir: Path
    counts: dict[str, int]
    warnings: list[str] = field(default_factory=list)


# -- pure helpers --------------------------------------------------------------------------------
def stable_rank(text: str, salt: str) -> str:
    """A deterministic pseudo-random sort key (same on every machine and Python run)."""
    return hashlib.sha256(f"{salt}:{text}".encode()).hexdigest()


def plan_generation_calls(constitution: Constitution, config: Config) -> list[GenerationCall]:
    """Split each assertion's budget into calls, each showing a seeded choice of examples."""
    calls = []
    settings = config.prompts
    for assertion in constitution.assertions:
        remaining = settings.generated_per_assertion
        index = 0
        while remaining > 0:
            count = min(settings.per_generation_call, remaining)
            rng = random.Random(f"{config.seed}:{assertion.id}:{index}")
            shown = rng.sample(
                list(assertion.prompts), k=min(settings.examples_per_call, len(assertion.prompts))
            )
            calls.append(
                GenerationCall(f"{assertion.id}:{index}", assertion.id, index, tuple(shown), count)
            )
            remaining -= count
            index += 1
    return calls


def fit_split_sizes(
    available: int, n_train: int, n_eval: int, allow_smaller: bool, sources: str = ""
) -> tuple[int, int, str]:
    """Train and eval sizes that fit ``available`` prompts, and a warning if they were shrunk.

    Asking for more than the pool holds is an error by default (a large preset once trained on
    15 general prompts without a word); with ``allow_smaller`` both sizes shrink in proportion.
    """
    wanted = n_train + n_eval
    if available >= wanted:
        return n_train, n_eval, ""
    numbers = (
        f"prompts.general_prompts={n_train} + prompts.eval_prompts={n_eval} = {wanted} general "
        f"prompts requested, but the pool holds {available} after de-duplication{sources}"
    )
    if not allow_smaller:
        raise ConfigError(
            f"{numbers}: lower them, add prompts.hub_datasets (e.g. [lima]), or set "
            "prompts.allow_smaller_pool=true to shrink both proportionally"
        )
    train = round(available * n_train / wanted)
    evaluation = available - train
    return (
        train,
        evaluation,
        f"{numbers}; shrunk to {train} train + {evaluation} eval (prompts.allow_smaller_pool)",
    )


def split_general_pool(
    pool: list[PromptRecord],
    n_train: int,
    n_eval: int,
    seed: int,
    exclude: list[str],
    allow_smaller: bool = False,
) -> GeneralSplit:
    """Disjoint train/eval splits of the general pool, stable across runs and machines.

    Prompts near-identical to anything in ``exclude`` (the qualitative set) are left out of
    both; duplicates inside the pool are removed before splitting so the same text can never
    land on both sides. Sizes that do not fit follow `fit_split_sizes`.
    """
    candidates = prompt_filters.distinct_records(
        pool, lambda r: r.prompt, threshold=0.9, against=exclude
    )
    per_source: dict[str, int] = {}
    for record in candidates:
        per_source[record.source] = per_source.get(record.source, 0) + 1
    sources = " (" + ", ".join(f"{k} {v}" for k, v in per_source.items()) + ")"
    n_train, n_eval, warning = fit_split_sizes(
        len(candidates), n_train, n_eval, allow_smaller, sources if candidates else ""
    )
    ordered = sorted(candidates, key=lambda r: stable_rank(r.id, f"split-{seed}"))
    evaluation = ordered[:n_eval]
    train = ordered[n_eval : n_eval + n_train]
    return GeneralSplit(train, evaluation, len(candidates), warning)


# -- the stage -----------------------------------------------------------------------------------
def run(params: RunParams, service_client, on_existing: str = "resume") -> Result:
    """Build all prompt sets for ``params.persona``; resumable, see the module docstring."""
    config = Config.from_params(params)
    settings = config.prompts
    constitution = load_constitution(config.constitution_ref, allow_opt_in=config.allow_misaligned)
    qualitative = qualitative_prompts()
    pool = general_prompt_pool(
        settings.hub_datasets, offline_fallback=settings.hub_offline_fallback
    )
    pool_info = describe_pool(pool, settings.hub_datasets)
    split = split_general_pool(
        pool,
        settings.general_prompts,
        settings.eval_prompts,
        config.seed,
        exclude=[r.prompt for r in qualitative],
        allow_smaller=settings.allow_smaller_pool,
    )  # before the folder is touched: a pool that is too small stops here
    warnings = [
        f"hub dataset {name} contributed no prompts (unreachable, prompts.hub_offline_fallback "
        "is on); the general pool holds offline prompts only"
        for name in settings.hub_datasets
        if pool_info["sources"].get(name, 0) == 0
    ] + ([split.warning] if split.warning else [])
    for warning in warnings:
        logger.warning("%s", warning)

    config = replace(config, general_pool=pool_info)
    stage: StageDir = stage_dir(params.run_dir, STAGE)
    stage.prepare(config.fingerprint(), on_existing, config.as_dict())
    stage.write_manifest(general_pool=pool_info, warnings=warnings)
    train, evaluation = split.train, split.evaluation
    write_jsonl(stage.file("general_train.jsonl"), (r.to_dict() for r in train))
    write_jsonl(stage.file("general_eval.jsonl"), (r.to_dict() for r in evaluation))
    write_jsonl(stage.file("qualitative.jsonl"), (r.to_dict() for r in qualitative))

    raw = _generate(constitution, config, service_client, stage)
    records, rejected = _assemble(
        constitution, config, raw, held_out=[r.prompt for r in evaluation + qualitative]
    )
    write_jsonl(stage.file("constitution_prompts.jsonl"), records)
    write_jsonl(stage.file("rejected.jsonl"), rejected)
    counts = {
        "hand_written": sum(r["source"] == "hand-written" for r in records),
        "generated_kept": sum(r["source"] == "generated" for r in records),
        "generated_rejected": len(rejected),
        "generator_calls": len(raw),
        "general_train": len(train),
        "general_eval": len(evaluation),
        "general_available": split.available,
        "qualitative": len(qualitative),
    }
    stage.finish(**counts)
    return Result(stage.path, counts, warnings)


def _generate(
    constitution: Constitution, config: Config, service_client, stage: StageDir
) -> dict[str, dict]:
    """Every planned generator call, through the shared sampler; returns key -> raw record.

    The sampling client is only created when the log lacks some call, so a finished stage
    re-executed for its report loads no model.
    """
    assertions = {a.id: a for a in constitution.assertions}
    requests = [
        SampleRequest(
            key=call.key,
            messages=expansion_messages(assertions[call.assertion_id], call.examples, call.count),
            prefill=EXPANSION_PREFILL,
            meta={
                "assertion_id": call.assertion_id,
                "call_index": call.call_index,
                "requested": call.count,
            },
        )
        for call in plan_generation_calls(constitution, config)
    ]
    completions = sample_chat(
        lambda: service_client.create_sampling_client(base_model=config.generator),
        config.generator_renderer,
        requests,
        **sampler_settings(config.sampling, config.prompts.max_tokens, config.seed),
        log_path=stage.file("generation_raw.partial.jsonl"),
        desc="generating prompts",
    )
    return {
        key: {
            **completion.meta,
            "key": key,
            "text": completion.full_text,  # the numbered list, including its prefilled "1."
            "truncated": not completion.complete,
        }
        for key, completion in completions.items()
    }


def _assemble(
    constitution: Constitution, config: Config, raw: dict[str, dict], held_out: list[str]
) -> tuple[list[dict], list[dict]]:
    """Hand-written + parsed, filtered, de-duplicated generated prompts, with stable ids."""
    records: list[dict] = []
    rejected: list[dict] = []
    accepted_texts: list[str] = []
    for assertion in constitution.assertions:
        for index, prompt in enumerate(assertion.prompts, start=1):
            records.append(
                {
                    "id": f"{constitution.name}-{assertion.id}-h{index}",
                    "persona": constitution.name,
                    "assertion_id": assertion.id,
                    "source": "hand-written",
                    "prompt": prompt,
                }
            )
            accepted_texts.append(prompt)
    for assertion in constitution.assertions:
        rows = sorted(
            (r for r in raw.values() if r["assertion_id"] == assertion.id),
            key=lambda r: r["call_index"],
        )
        candidates: list[str] = []
        for row in rows:
            parsed = prompt_filters.parse_generated_prompts(row["text"], truncated=row["truncated"])
            rejected += [
                {"assertion_id": assertion.id, "text": text, "reason": reason}
                for text, reason in parsed.dropped
            ]
            kept, bad = prompt_filters.filter_requests(parsed.prompts)
            rejected += [
                {"assertion_id": assertion.id, "text": text, "reason": reason}
                for text, reason in bad
            ]
            candidates += list(kept)
        unique = prompt_filters.deduplicate(
            candidates, threshold=config.prompts.dedup_threshold, against=accepted_texts + held_out
        )
        rejected += [
            {
                "assertion_id": assertion.id,
                "text": text,
                "reason": f"near-duplicate of: {other[:60]}",
            }
            for text, other in unique.removed
        ]
        for index, prompt in enumerate(
            unique.kept[: config.prompts.generated_per_assertion], start=1
        ):
            records.append(
                {
                    "id": f"{constitution.name}-{assertion.id}-g{index:03d}",
                    "persona": constitution.name,
                    "assertion_id": assertion.id,
                    "source": "generated",
                    "prompt": prompt,
                }
            )
            accepted_texts.append(prompt)
    return records, rejected
