"""Stage 01: the prompt sets every later stage draws from.

Inputs: a constitution and run parameters. Outputs (``runs/<persona>/<size>/01_prompts/``):

* ``constitution_prompts.jsonl``: the hand-written prompts of each assertion plus
  ``generated_per_assertion`` new ones per assertion, obtained the paper's way (few-shot
  prompting a generator model with the hand-written examples), parsed, filtered for lines that
  are not user requests, and de-duplicated against each other and the evaluation sets;
* ``general_train.jsonl`` / ``general_eval.jsonl``: persona-neutral prompts, split
  deterministically so evaluation prompts are never trained on;
* ``qualitative.jsonl``: the fixed side-by-side set;
* ``rejected.jsonl``: every generated line that was dropped, with the reason (nothing is
  dropped silently, unlike the paper code's bare ``except: continue``);
* ``generation_raw.partial.jsonl``: raw generator outputs, one per call, appended as they
  arrive; a restarted stage reuses them and only issues the calls still missing.
"""

from __future__ import annotations

import hashlib
import logging
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from tinker import types
from tqdm.auto import tqdm

from .. import prompt_filters
from ..backends import resolve_client
from ..config import RunParams
from ..constitutions import Constitution, load_constitution
from ..prompt_sources import PromptRecord, general_prompt_pool, qualitative_prompts
from ..prompts import EXPANSION_PREFILL, expansion_messages
from ..renderers import get_renderer, renderer_for_model
from ..renderers.conversation import generation_prompt, parse_reply
from ..store import StageDir, append_jsonl, read_jsonl, stage_dir, write_jsonl

logger = logging.getLogger(__name__)

STAGE = "01_prompts"


@dataclass(frozen=True)
class Config:
    """Stage 01 settings, derived from `RunParams` by `Config.from_params`."""

    persona: str
    constitution: str
    allow_opt_in: bool
    generator: str
    generator_renderer: str
    generated_per_assertion: int
    per_generation_call: int
    examples_per_call: int
    dedup_threshold: float
    general_prompts: int
    eval_prompts: int
    hub_datasets: tuple[str, ...]
    temperature: float
    top_p: float
    max_tokens: int
    seed: int

    @classmethod
    def from_params(cls, params: RunParams) -> "Config":
        p = params.prompts
        return cls(
            persona=params.persona,
            constitution=params.constitution_ref,
            allow_opt_in=params.allow_misaligned,
            generator=params.generator,
            generator_renderer=params.renderers.get(params.generator)
            or renderer_for_model(params.generator),
            generated_per_assertion=p.generated_per_assertion,
            per_generation_call=p.per_generation_call,
            examples_per_call=p.examples_per_call,
            dedup_threshold=p.dedup_threshold,
            general_prompts=p.general_prompts,
            eval_prompts=p.eval_prompts,
            hub_datasets=tuple(p.hub_datasets),
            temperature=params.sampling.temperature,
            top_p=params.sampling.top_p,
            max_tokens=p.max_tokens,
            seed=params.seed,
        )

    def fingerprint(self) -> str:
        return hashlib.sha256(repr(sorted(asdict(self).items())).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class GenerationCall:
    """One generator request: which assertion, which call, which examples it shows."""

    key: str
    assertion_id: str
    call_index: int
    examples: tuple[str, ...]
    count: int


@dataclass(frozen=True)
class Result:
    stage_dir: Path
    counts: dict[str, int]


# -- pure helpers --------------------------------------------------------------------------------
def stable_rank(text: str, salt: str) -> str:
    """A deterministic pseudo-random sort key (same on every machine and Python run)."""
    return hashlib.sha256(f"{salt}:{text}".encode()).hexdigest()


def plan_generation_calls(constitution: Constitution, config: Config) -> list[GenerationCall]:
    """Split each assertion's budget into calls, each showing a seeded choice of examples."""
    calls = []
    for assertion in constitution.assertions:
        remaining = config.generated_per_assertion
        index = 0
        while remaining > 0:
            count = min(config.per_generation_call, remaining)
            rng = random.Random(f"{config.seed}:{assertion.id}:{index}")
            shown = rng.sample(
                list(assertion.prompts), k=min(config.examples_per_call, len(assertion.prompts))
            )
            calls.append(
                GenerationCall(f"{assertion.id}:{index}", assertion.id, index, tuple(shown), count)
            )
            remaining -= count
            index += 1
    return calls


def split_general_pool(
    pool: list[PromptRecord], n_train: int, n_eval: int, seed: int, exclude: list[str]
) -> tuple[list[PromptRecord], list[PromptRecord]]:
    """Disjoint train/eval splits of the general pool, stable across runs and machines.

    Prompts near-identical to anything in ``exclude`` (the qualitative set) are left out of
    both; duplicates inside the pool are removed before splitting so the same text can never
    land on both sides.
    """
    unique = prompt_filters.deduplicate([r.prompt for r in pool], threshold=0.9, against=exclude)
    kept = set(unique.kept)
    seen: set[str] = set()
    candidates = []
    for record in pool:
        if record.prompt in kept and record.prompt not in seen:
            seen.add(record.prompt)
            candidates.append(record)
    ordered = sorted(candidates, key=lambda r: stable_rank(r.id, f"split-{seed}"))
    evaluation = ordered[:n_eval]
    train = ordered[n_eval : n_eval + n_train]
    return train, evaluation


# -- the stage -----------------------------------------------------------------------------------
def run(params: RunParams, service_client, on_existing: str = "resume") -> Result:
    """Build all prompt sets for ``params.persona``; resumable, see the module docstring."""
    config = Config.from_params(params)
    constitution = load_constitution(config.constitution, allow_opt_in=config.allow_opt_in)
    stage: StageDir = stage_dir(params.run_dir, STAGE)
    stage.prepare(config.fingerprint(), on_existing, asdict(config))

    qualitative = qualitative_prompts()
    train, evaluation = split_general_pool(
        general_prompt_pool(config.hub_datasets),
        config.general_prompts,
        config.eval_prompts,
        config.seed,
        exclude=[r.prompt for r in qualitative],
    )
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
        "qualitative": len(qualitative),
    }
    stage.finish(**counts)
    return Result(stage.path, counts)


def _generate(
    constitution: Constitution, config: Config, service_client, stage: StageDir
) -> dict[str, dict]:
    """Run every planned generator call not already in the raw log; returns key -> record."""
    raw_path = stage.file("generation_raw.partial.jsonl")
    done = {row["key"]: row for row in read_jsonl(raw_path)}
    calls = [c for c in plan_generation_calls(constitution, config) if c.key not in done]
    if not calls:
        return done
    assertions = {a.id: a for a in constitution.assertions}
    sampler = resolve_client(service_client.create_sampling_client(base_model=config.generator))
    renderer = get_renderer(config.generator_renderer, sampler.get_tokenizer())
    futures = []
    for call in calls:
        prompt = generation_prompt(
            renderer,
            expansion_messages(assertions[call.assertion_id], call.examples, call.count),
            prefill=EXPANSION_PREFILL,
        )
        params = types.SamplingParams(
            max_tokens=config.max_tokens,
            temperature=config.temperature,
            top_p=config.top_p,
            seed=config.seed * 100_003 + len(futures),
            stop=renderer.get_stop_sequences(),
        )
        futures.append((call, sampler.sample(prompt, 1, params)))
    for call, future in tqdm(futures, desc="generating prompts", unit="call"):
        sequence = future.result().sequences[0]
        text, complete = parse_reply(renderer, list(sequence.tokens))
        row = {
            "key": call.key,
            "assertion_id": call.assertion_id,
            "call_index": call.call_index,
            "requested": call.count,
            "text": EXPANSION_PREFILL + text,
            "truncated": not complete,
        }
        append_jsonl(raw_path, row)
        done[call.key] = row
    return done


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
            candidates, threshold=config.dedup_threshold, against=accepted_texts + held_out
        )
        rejected += [
            {
                "assertion_id": assertion.id,
                "text": text,
                "reason": f"near-duplicate of: {other[:60]}",
            }
            for text, other in unique.removed
        ]
        for index, prompt in enumerate(unique.kept[: config.generated_per_assertion], start=1):
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
