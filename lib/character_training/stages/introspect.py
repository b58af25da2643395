"""Stage 04: introspection, the post-DPO model writing about itself and talking with itself.

The paper's second training step teaches character details *beyond* the constitution by letting
the model produce them: the DPO checkpoint ("dpo", from notebook 03), prompted with the
constitution, answers introspective instructions (self-reflection) and holds conversations with
a copy of itself (self-interaction). Stage 05 then trains on these transcripts *without* the
constitution. Inputs: ``runs/<persona>/<size>/checkpoints.json`` (checkpoint "dpo"). Outputs
(``runs/<persona>/<size>/04_introspection/``):

* ``reflections.jsonl``: one row per reply to the `prompts.REFLECTION_THEMES` instructions,
  ``introspection.reflections_per_prompt`` per theme (fields in `reflection_record`).
* ``interactions.jsonl``: one row per self-interaction (fields in `interaction_record`).
* ``reflections.partial.jsonl`` / ``interactions.partial.jsonl``: the shared sampler's logs
  (`sampling.sample_chat`), keys ``<theme>:s<k>`` and ``<conv>:t<turn>``. Seeds derive from
  the run seed and the key, so a run killed part-way (even mid-conversation) and run again
  samples only what is missing and ends with exactly the files one uninterrupted run writes.

Self-interaction. Two instances of the same model, A and B, share one system prompt (persona,
"the user is another instance of you", and a guidance line: ``free`` for even-numbered
conversations, ``reflect`` for odd ones). B's opener (a seeded pick from
`prompts.INTERACTION_OPENERS`) starts; then A and B alternate for
``introspection.interaction_turns`` sampled turns, A first. Each turn is sampled with the roles
swapped so that the model always writes as the assistant: the speaker sees its own earlier
turns as ``assistant`` and the other's as ``user`` (B sees its opener as its own turn). A turn
is one `sample_chat` call over every conversation at once.

When a conversation outgrows the context window (``introspection.context_tokens``, capped by
the model's own maximum length where the sampler exposes it), the oldest turns are dropped two
at a time, never the system prompt nor the message being answered, until prompt +
``introspection.response_tokens`` fits; every truncated prompt is counted. Replies cut at
``response_tokens`` or empty are kept and marked (``complete`` false, empty text): the other
instance answers exactly what was written, so the conversation stays as sampled; what stage 05
may train on is decided in `sft_conversations`.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..artifacts import (
    INTROSPECTION_FILES,
    assistant_name,
    load_outputs,
    sft_conversations,
    sft_counts,
)
from ..config import IntrospectionParams, RunParams, SamplingParams
from ..constitutions import Constitution, load_constitution
from ..distill_filters import trim_to_sentence
from ..errors import DataError
from ..prompts import (
    INTERACTION_GUIDANCE,
    INTERACTION_OPENERS,
    REFLECTION_THEMES,
    Message,
    reflection_messages,
    self_interaction_sft_system,
    self_interaction_system_prompt,
)
from ..renderers import get_renderer
from ..renderers.conversation import generation_prompt
from ..sampler_setup import SAMPLING_PREFIXES, sampler_settings
from ..sampling import Completion, SampleRequest, sample_chat
from ..stage_config import StageConfig, digest
from ..store import Checkpoint, StageDir, find_checkpoint, stage_dir, write_jsonl

logger = logging.getLogger(__name__)

STAGE = "04_introspection"
CHECKPOINT = "dpo"
GUIDANCE_KINDS = tuple(INTERACTION_GUIDANCE)  # ("free", "reflect")
OPENER_SPEAKER = "B"  # the opener is B's; A replies first
OUTPUT_FILES = INTROSPECTION_FILES


@dataclass(frozen=True)
class Config(StageConfig):
    """Stage 04 settings: the ``introspection`` section (see `config.IntrospectionParams`;
    ``response_tokens`` is the budget of every reply, reflection or turn), the ``sampling``
    section, the student and its chat format, the constitution, ``assistant_name`` (empty: the
    student's family name, see `artifacts.assistant_name`) and the seed.

    ``checkpoint`` is the "dpo" checkpoint sampled and ``prompts_digest`` hashes every prompt
    text (`prompts_digest`): a retrained checkpoint or an edited constitution or template gives
    another fingerprint, so an old folder is refused instead of silently mixed with new samples.
    """

    introspection: IntrospectionParams
    sampling: SamplingParams
    constitution_ref: str
    allow_misaligned: bool
    student: str
    student_renderer: str
    assistant_name: str
    seed: int
    checkpoint: Mapping[str, Any] = field(default_factory=dict)
    prompts_digest: str = ""

    SECTION_PREFIXES = {"sampling": SAMPLING_PREFIXES}  # the budget is response_tokens


@dataclass(frozen=True)
class InteractionPlan:
    """One self-interaction before sampling: its id, guidance kind and B's opener."""

    conv_id: str
    guidance: str
    opener: str


@dataclass(frozen=True)
class Result:
    """Where the stage wrote, its counts (also in the manifest) and the context window used."""

    stage_dir: Path
    counts: dict[str, Any]
    context_tokens: int
    warnings: list[str] = field(default_factory=list)


# -- pure helpers: self-reflection --------------------------------------------------------------
def reflection_key(theme: str, sample: int) -> str:
    return f"{theme}:s{sample}"


def reflection_requests(
    constitution: Constitution, name: str, per_prompt: int
) -> list[SampleRequest]:
    """``per_prompt`` requests per theme, themes in `REFLECTION_THEMES` order."""
    return [
        SampleRequest(
            reflection_key(theme, k),
            reflection_messages(constitution, name, theme),
            meta={"theme": theme, "sample_index": k},
        )
        for theme in REFLECTION_THEMES
        for k in range(per_prompt)
    ]


def trimmed_text(completion: Completion, truncated: str) -> tuple[str, bool]:
    """The reply to keep, and whether it was a cut reply trimmed to its last full sentence
    (``truncated == "trim"``; see `distill_filters.trim_to_sentence`). A trimmed reply counts
    as complete: it ends where a sentence ends, which is what the SFT data needs."""
    if completion.complete or truncated != "trim":
        return completion.text, False
    kept = trim_to_sentence(completion.text.strip())
    return (kept, True) if kept is not None else (completion.text, False)


def reflection_record(completion: Completion, truncated: str = "drop") -> dict[str, Any]:
    """One line of ``reflections.jsonl``.

    Fields: id (``<theme>:s<k>``), theme, sample_index, instruction (the user turn), reply,
    complete (ended on the stop token, or was trimmed to a sentence end under the ``trim``
    policy; not cut at ``response_tokens``), trimmed, num_tokens (sampled, end-of-turn
    included), seed.
    """
    theme = completion.meta["theme"]
    text, trimmed = trimmed_text(completion, truncated)
    return {
        "id": completion.key,
        "theme": theme,
        "sample_index": completion.meta["sample_index"],
        "instruction": REFLECTION_THEMES[theme],
        "reply": text,
        "complete": completion.complete or trimmed,
        "trimmed": trimmed,
        "num_tokens": completion.num_tokens,
        "seed": completion.seed,
    }


# -- pure helpers: self-interaction -------------------------------------------------------------
def plan_interactions(count: int, seed: int) -> list[InteractionPlan]:
    """Ids, guidance kinds and openers of ``count`` conversations.

    Guidance alternates (even index ``free``, odd ``reflect``) so any prefix of the plan is
    balanced; the opener is drawn per conversation from a generator seeded with the run seed
    and the conversation id, so it never depends on how many conversations there are.
    """
    plans = []
    for index in range(count):
        conv_id = f"conv{index:04d}"
        opener = random.Random(f"{seed}:introspection-opener:{conv_id}").choice(INTERACTION_OPENERS)
        plans.append(InteractionPlan(conv_id, GUIDANCE_KINDS[index % 2], opener))
    return plans


def speaker_of(turn: int) -> str:
    """Who writes sampled turn ``turn`` (0-based): A replies to B's opener, then they alternate."""
    return "A" if turn % 2 == 0 else "B"


def interaction_key(conv_id: str, turn: int) -> str:
    return f"{conv_id}:t{turn}"


def view_messages(
    system: str, opener: str, turns: Sequence[Mapping[str, Any]], speaker: str
) -> list[Message]:
    """The conversation as ``speaker`` sees it when writing the next turn.

    Roles are swapped per instance: the speaker's own earlier turns are ``assistant``, the other
    instance's are ``user``. The opener is B's, so A sees it as the user's first message and B
    as its own first (assistant) message.
    """
    if speaker not in ("A", "B"):
        raise DataError(f"speaker {speaker!r}: expected 'A' or 'B'")
    messages: list[Message] = [{"role": "system", "content": system}]
    for who, text in [(OPENER_SPEAKER, opener), *((t["speaker"], t["text"]) for t in turns)]:
        messages.append({"role": "assistant" if who == speaker else "user", "content": text})
    return messages


def fit_to_context(
    messages: Sequence[Message],
    count_tokens: Callable[[Sequence[Message]], int],
    window: int,
    max_tokens: int,
) -> tuple[list[Message], int]:
    """Drop the oldest turns until prompt + ``max_tokens`` fits ``window``; (messages, dropped).

    Turns go two at a time (one exchange, so the remaining turns still alternate as before),
    one at a time only when two would remove the message being answered. The system prompt and
    that last message always stay; if even they do not fit, raises `DataError`.
    """
    head = list(messages[:1]) if messages and messages[0]["role"] == "system" else []
    rest = list(messages[len(head) :])
    budget = window - max_tokens
    dropped = 0
    while count_tokens(head + rest) > budget:
        if len(rest) <= 1:
            raise DataError(
                f"the system prompt and the last turn alone take {count_tokens(head + rest)} "
                f"tokens, leaving less than max_tokens={max_tokens} of a {window}-token window: "
                "raise introspection.context_tokens or lower introspection.response_tokens"
            )
        step = 2 if len(rest) > 2 else 1
        rest = rest[step:]
        dropped += step
    return head + rest, dropped


def turn_record(
    turn: int, completion: Completion, context_dropped: int, truncated: str = "drop"
) -> dict[str, Any]:
    """One turn of an interaction: turn (0-based), speaker, text, complete, trimmed,
    num_tokens, seed, context_dropped (earlier turns left out of this turn's prompt to fit the
    window). A trimmed turn is what the other instance reads next."""
    text, trimmed = trimmed_text(completion, truncated)
    return {
        "turn": turn,
        "speaker": speaker_of(turn),
        "text": text,
        "complete": completion.complete or trimmed,
        "trimmed": trimmed,
        "num_tokens": completion.num_tokens,
        "seed": completion.seed,
        "context_dropped": context_dropped,
    }


def interaction_record(plan: InteractionPlan, turns: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One line of ``interactions.jsonl``.

    Fields: id, guidance (``free`` | ``reflect``), opener (B's first message), turns (list of
    `turn_record`, A first), truncations (turns whose prompt lost earlier turns to the window),
    incomplete_turns (cut at ``response_tokens``), empty_turns.
    """
    return {
        "id": plan.conv_id,
        "guidance": plan.guidance,
        "opener": plan.opener,
        "turns": [dict(t) for t in turns],
        "truncations": sum(1 for t in turns if t["context_dropped"]),
        "incomplete_turns": sum(1 for t in turns if not t["complete"]),
        "empty_turns": sum(1 for t in turns if not t["text"].strip()),
    }


def prompts_digest(constitution: Constitution, name: str) -> str:
    """Hash of every text this stage shows the model (system prompts, instructions, openers)."""
    texts = [
        m["content"] for t in REFLECTION_THEMES for m in reflection_messages(constitution, name, t)
    ]
    texts += [self_interaction_system_prompt(constitution, name, g) for g in GUIDANCE_KINDS]
    texts += list(INTERACTION_OPENERS)
    return digest(texts)


# -- the sampler's context window ---------------------------------------------------------------
def model_context_tokens(sampler: Any) -> int | None:
    """The model's own maximum sequence length where the sampler exposes it, else None.

    The local engine's client holds the Hugging Face model (``max_position_embeddings``, the
    limit its ``sample`` enforces); a Tinker client exposes none, so ``context_tokens`` rules.
    """
    config = getattr(getattr(sampler, "model", None), "config", None)
    value = getattr(config, "max_position_embeddings", None)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def context_window(sampler: Any, configured: int) -> int:
    """``introspection.context_tokens``, capped by the model's own limit when known."""
    model_limit = model_context_tokens(sampler)
    return configured if model_limit is None else min(configured, model_limit)


def load_dpo_checkpoint(run_dir: Path, student: str) -> Checkpoint:
    """Checkpoint "dpo" (notebook 03), refused if it was trained from another base model."""
    checkpoint = find_checkpoint(run_dir, CHECKPOINT)
    if checkpoint.base_model != student:
        raise DataError(
            f"{Path(run_dir) / 'checkpoints.json'}: checkpoint 'dpo' was trained from "
            f"{checkpoint.base_model!r}, but the student is {student!r}: run notebook 03_dpo "
            "again for this student"
        )
    return checkpoint


# -- the stage -----------------------------------------------------------------------------------
def run(params: RunParams, service_client: Any, on_existing: str = "resume") -> Result:
    """Sample self-reflections and self-interactions from checkpoint "dpo"; resumable."""
    from ..backends import resolve_client

    config = Config.from_params(params)
    settings = config.introspection
    constitution = load_constitution(config.constitution_ref, allow_opt_in=config.allow_misaligned)
    checkpoint = load_dpo_checkpoint(params.run_dir, config.student)
    name = assistant_name(config)
    self_interaction_sft_system(name)  # refuses an unusable name before anything is sampled
    config = replace(
        config,
        checkpoint=checkpoint.to_dict(),
        prompts_digest=prompts_digest(constitution, name),
    )
    stage: StageDir = stage_dir(params.run_dir, STAGE)
    stage.prepare(config.fingerprint(), on_existing, config.as_dict())
    stage.write_manifest(inputs={"checkpoint": checkpoint.to_dict()})

    sampler = resolve_client(
        service_client.create_sampling_client(model_path=checkpoint.sampler_path)
    )
    renderer = get_renderer(config.student_renderer, sampler.get_tokenizer())
    window = context_window(sampler, settings.context_tokens)
    common = sampler_settings(config.sampling, settings.response_tokens, config.seed)

    def count_tokens(messages: Sequence[Message]) -> int:
        return generation_prompt(renderer, messages).length

    # -- self-reflection
    requests = reflection_requests(constitution, name, settings.reflections_per_prompt)
    for request in requests[:: max(1, settings.reflections_per_prompt)]:
        fit_to_context(request.messages, count_tokens, window, settings.response_tokens)
    done = sample_chat(
        sampler,
        renderer,
        requests,
        log_path=stage.file("reflections.partial.jsonl"),
        desc="self-reflection",
        **common,
    )
    reflections = [reflection_record(done[r.key], settings.truncated) for r in requests]
    write_jsonl(stage.file("reflections.jsonl"), reflections)

    # -- self-interaction: one batched sample_chat call per turn
    plans = plan_interactions(settings.interactions, config.seed)
    systems = {g: self_interaction_system_prompt(constitution, name, g) for g in GUIDANCE_KINDS}
    turns: dict[str, list[dict[str, Any]]] = {p.conv_id: [] for p in plans}
    for turn in range(settings.interaction_turns if plans else 0):
        speaker = speaker_of(turn)
        batch, dropped = [], {}
        for plan in plans:
            messages = view_messages(
                systems[plan.guidance], plan.opener, turns[plan.conv_id], speaker
            )
            messages, dropped[plan.conv_id] = fit_to_context(
                messages, count_tokens, window, settings.response_tokens
            )
            batch.append(
                SampleRequest(
                    interaction_key(plan.conv_id, turn),
                    messages,
                    meta={"conv_id": plan.conv_id, "turn": turn, "speaker": speaker},
                )
            )
        done = sample_chat(
            sampler,
            renderer,
            batch,
            log_path=stage.file("interactions.partial.jsonl"),
            desc=f"self-interaction turn {turn + 1}/{settings.interaction_turns} ({speaker})",
            **common,
        )
        for plan, request in zip(plans, batch):
            turns[plan.conv_id].append(
                turn_record(turn, done[request.key], dropped[plan.conv_id], settings.truncated)
            )
    interactions = [interaction_record(p, turns[p.conv_id]) for p in plans]
    write_jsonl(stage.file("interactions.jsonl"), interactions)

    sft = sft_counts((reflections, interactions), name)
    all_turns = [t for row in interactions for t in row["turns"]]
    counts: dict[str, Any] = {
        "reflection_themes": len(REFLECTION_THEMES),
        "reflections": len(reflections),
        "reflections_incomplete": sum(not r["complete"] for r in reflections),
        "reflections_trimmed": sum(bool(r.get("trimmed")) for r in reflections),
        "reflections_empty": sum(not r["reply"].strip() for r in reflections),
        "interactions": len(interactions),
        **{
            f"interactions_{g}": sum(r["guidance"] == g for r in interactions)
            for g in GUIDANCE_KINDS
        },
        "interaction_turns": settings.interaction_turns if plans else 0,
        "turns": len(all_turns),
        "turns_incomplete": sum(not t["complete"] for t in all_turns),
        "turns_trimmed": sum(bool(t.get("trimmed")) for t in all_turns),
        "turns_empty": sum(not t["text"].strip() for t in all_turns),
        "truncated_prompts": sum(r["truncations"] for r in interactions),
        "conversations_truncated": sum(bool(r["truncations"]) for r in interactions),
        "context_tokens": window,
        **{f"sft_{k}": v for k, v in sft.items()},
    }
    warnings = []
    for what, cut, total, consequence in (
        ("reflections", counts["reflections_incomplete"], len(reflections), "leaves them out"),
        ("self-interaction turns", counts["turns_incomplete"], len(all_turns),
         "ends each transcript before A's first cut turn"),
    ):  # fmt: skip
        if total and cut > total / 2:
            warnings.append(
                f"{cut} of {total} {what} were cut at introspection.response_tokens="
                f"{settings.response_tokens}: stage 05 {consequence}; raise response_tokens"
            )
    for warning in warnings:
        logger.warning("%s", warning)
    stage.write_manifest(
        warnings=warnings,
        assistant_name=name,
        context={
            "window": window,
            "configured": settings.context_tokens,
            "model": model_context_tokens(sampler),
        },
    )
    stage.finish(**counts)
    return Result(stage.path, counts, window, warnings)


def transcript_rows(record: Mapping[str, Any]) -> list[dict[str, Any]]:
    """An interaction as rows to read in order: B's opener, then every sampled turn.

    Columns: turn (-1 for the opener), speaker, text, complete, context_dropped.
    """
    rows = [
        {
            "turn": -1,
            "speaker": OPENER_SPEAKER,
            "text": record["opener"],
            "complete": True,
            "context_dropped": 0,
        }
    ]
    rows += [
        {k: t[k] for k in ("turn", "speaker", "text", "complete", "context_dropped")}
        for t in record["turns"]
    ]
    return rows


__all__ = [
    "CHECKPOINT",
    "GUIDANCE_KINDS",
    "STAGE",
    "Config",
    "InteractionPlan",
    "Result",
    "context_window",
    "fit_to_context",
    "interaction_key",
    "interaction_record",
    "load_dpo_checkpoint",
    "load_outputs",
    "model_context_tokens",
    "plan_interactions",
    "prompts_digest",
    "reflection_key",
    "reflection_record",
    "reflection_requests",
    "run",
    "sft_conversations",
    "sft_counts",
    "speaker_of",
    "transcript_rows",
    "turn_record",
    "view_messages",
]
