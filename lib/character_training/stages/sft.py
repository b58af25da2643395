"""Stage 05: supervised fine-tuning on the introspection transcripts, the second half of
character training.

Inputs: the "dpo" checkpoint's *state* (``checkpoints.json``, written by notebook 03) and the
chat transcripts stage 04 produced, as `introspect.sft_conversations` returns them: each a
list of ``{"role", "content"}`` messages, with the constitution already removed. A
self-reflection is [user instruction, assistant reply]; a self-interaction starts with a short
neutral system line naming the assistant, then alternates user and assistant turns and ends on
an assistant turn. Training on them *without* the constitution is prompt distillation: the
model learns to produce, unprompted, what it wrote while it could read its character.

Outputs (``runs/<persona>/<size>/05_sft/``):

* ``data.jsonl``: per trained transcript its id, kind, assistant turns kept, turns removed to
  fit ``sft.max_length``, whether it had to be cut mid-turn, tokens and loss tokens;
* ``dropped.jsonl``: transcripts not trained on, with the reason (fewer than two loss tokens,
  an unfilled ``{placeholder}``, a malformed conversation);
* ``metrics.jsonl``: one row per optimiser step (loss per token, overall and per kind, learning
  rate, gradient norm, tokens/s);
* ``progress.json`` + states every ``sft.save_every`` steps (resume point, with the optimiser);
* checkpoint "final" in the run's ``checkpoints.json`` (sampler path + state path).

Choices, and why:

* **Start from the DPO weights, not the DPO optimiser.** The "dpo" state is loaded weights-only
  (`training.open_training_client` with ``init_state``): SFT is a new run with fresh Adam
  moments, so the LoRA adapter of stage 03 keeps training. The paper trained a second adapter
  and merged the two linearly; Tinker trains one adapter per client, and continuing it is the
  nearest equivalent there.
* **Loss on every assistant turn, never on a system or user turn**
  (`supervised_datum` with ``train_on="all_assistant"``): each reply and its end-of-turn token
  carry weight 1, everything else 0. In a self-interaction the "user" turns were also written
  by the model, but as the other instance; training on them would teach the assistant to
  speak as its interlocutor. The original code trained on a transcript whose last turn was a
  user turn; a transcript must end on an assistant turn here.
* **Per-token loss over the batch.** Weights are divided by the number of loss tokens in the
  whole batch, so the ``cross_entropy`` sum is the mean negative log-likelihood per loss token
  and every token counts the same, whichever transcript it sits in (a ten-turn
  self-interaction outweighs a short reflection in proportion to its length). This is the
  quantity tinker-cookbook logs as its mean NLL (``-sum(w * lp) / sum(w)`` over the batch);
  note that the cookbook's *training* default (``reduction="mean"``) instead normalises each
  example to weight 1, which weighs a short reflection's tokens more.
* **Too-long transcripts lose whole turns from the end** until they fit ``sft.max_length`` and
  still end on an assistant turn; only when even the first reply does not fit is it cut
  mid-turn (that reply then has no end-of-turn token to learn). Both are counted. A transcript
  left with fewer than two loss tokens is dropped and recorded.
* **No template text leaks in.** A ``{placeholder}`` (the original data kept a literal
  ``{NAME}``) in a sampled turn drops the transcript; in a system line it is a template bug
  and stops the stage, as does a system line that carries constitution text.
* **Resumable and reproducible.** Batches are a seeded shuffle per epoch of stable transcript
  ids; a resumed run reloads weights and optimiser from ``progress.json`` and redoes only the
  steps after it, ending with the adapter an uninterrupted run ends with.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import training
from ..artifacts import (
    DPO_CHECKPOINT,
    INTROSPECTION_STAGE,
    SFT_CHECKPOINT,
    SFT_STAGE,
    assistant_name,
    sft_conversations,
    sft_counts,
)
from ..config import RunParams, SFTParams
from ..constitutions import load_constitution
from ..errors import ConfigError, DataError
from ..stage_config import StageConfig
from ..store import StageDir, find_checkpoint, portable_path, stage_dir, write_jsonl
from ..supervised import (
    PLACEHOLDER,
    Transcript,
    as_transcripts,
    build_examples,
    counts_by_kind,
    cross_entropy_step,
    data_digest,
    step_losses,
)

logger = logging.getLogger(__name__)

STAGE = SFT_STAGE
START_CHECKPOINT = DPO_CHECKPOINT
CHECKPOINT = SFT_CHECKPOINT
SHUFFLE_SALT = "sft"


@dataclass(frozen=True)
class Config(StageConfig):
    """Stage 05 settings: the ``sft`` section (see `config.SFTParams`), the student and its
    chat format, the LoRA rank and seed, and the inputs (start state, transcripts digest)."""

    sft: SFTParams
    student: str
    student_renderer: str
    lora_rank: int
    seed: int
    start_state: str = ""
    data_digest: str = ""


@dataclass(frozen=True)
class Result:
    stage_dir: Path
    counts: dict[str, Any]
    checkpoint: Any
    by_kind: dict[str, dict[str, int]] = field(default_factory=dict)


# -- pure helpers --------------------------------------------------------------------------------
def check_system_lines(
    transcripts: Sequence[Transcript], constitution_texts: Sequence[str] = ()
) -> None:
    """Refuse a system line with an unfilled placeholder or with constitution text.

    System lines come from stage 04's template, not from sampling, so either is a bug there
    that would reach every self-interaction: stop in one line instead of training on it.
    """
    for transcript in transcripts:
        first = transcript.messages[0] if transcript.messages else None
        if not isinstance(first, Mapping) or first.get("role") != "system":
            continue
        content = str(first.get("content", ""))
        match = PLACEHOLDER.search(content)
        if match:
            raise DataError(
                f"{transcript.id}: the system line holds an unfilled placeholder "
                f"{match.group(0)!r}; fix stage 04's template and rerun notebook 04"
            )
        leaked = next((t for t in constitution_texts if t and t in content), None)
        if leaked is not None:
            raise DataError(
                f"{transcript.id}: the system line carries constitution text ({leaked[:60]!r}); "
                "SFT trains without the constitution: fix stage 04 and rerun notebook 04"
            )


# -- the stage -----------------------------------------------------------------------------------
def load_conversations(params: RunParams) -> list[Any]:
    """Stage 04's training transcripts (constitution removed); one-line error naming notebook
    04 when its files are missing."""
    return list(sft_conversations(params.run_dir, assistant_name(params)))


def introspection_counts(params: RunParams) -> dict[str, int]:
    """What stage 04 left out of the training transcripts, by reason (for the notebook)."""
    return dict(sft_counts(params.run_dir, assistant_name(params)))


def run(
    params: RunParams,
    service_client: Any,
    on_existing: str = "resume",
    conversations: Sequence[Any] | None = None,
) -> Result:
    """Fine-tune the "dpo" weights on stage 04's transcripts; records checkpoint "final".

    ``conversations`` overrides what stage 04 wrote (tests, ablations); by default they come
    from `load_conversations`. Resumable (see the module docstring).
    """
    start = find_checkpoint(params.run_dir, START_CHECKPOINT)
    if not start.state_path:
        raise DataError(
            f"checkpoint {START_CHECKPOINT!r} has no training state to continue from: rerun "
            "notebook 03_dpo"
        )
    raw = load_conversations(params) if conversations is None else list(conversations)
    transcripts = as_transcripts(raw)
    if not transcripts:
        left_out = ""
        if conversations is None:  # say what stage 04 left out (e.g. every reply cut)
            counts = introspection_counts(params)
            left_out = (
                " (stage 04 left out: "
                + ", ".join(f"{k}={v}" for k, v in counts.items() if v and k != "transcripts")
                + ")"
            )
        raise DataError(
            f"{INTROSPECTION_STAGE}: no transcripts to train on{left_out}: check "
            "introspection.response_tokens and rerun notebook 04_introspection"
        )
    constitution = load_constitution(
        params.constitution_ref, allow_opt_in=params.allow_misaligned, prompts_per_assertion=None
    )
    check_system_lines(transcripts, [a.text for a in constitution.assertions])

    config = Config.from_params(
        params,
        start_state=portable_path(params.run_dir, start.state_path),
        data_digest=data_digest(transcripts),
    )
    stage: StageDir = stage_dir(params.run_dir, STAGE)
    stage.prepare(config.fingerprint(), on_existing, config.as_dict())
    finished = stage.manifest()
    if finished.get("status") == "done":
        counts = finished.get("counts", {})
        return Result(
            stage.path,
            counts,
            find_checkpoint(params.run_dir, CHECKPOINT),
            counts.get("by_kind", {}),
        )

    client, done_steps, renderer = training.open_trainer(
        service_client, stage, config, init_state=start.state_path
    )
    rank = getattr(client, "rank", None)
    if isinstance(rank, int) and rank != config.lora_rank:
        raise ConfigError(
            f"lora_rank={config.lora_rank} but the {START_CHECKPOINT!r} adapter has rank {rank}: "
            "SFT continues that adapter; set lora_rank to match or retrain notebook 03"
        )
    examples, dropped = build_examples(transcripts, renderer, config.sft.max_length)
    by_kind = counts_by_kind(transcripts, examples, dropped)
    write_jsonl(stage.file("data.jsonl"), (e.record() for e in examples))
    write_jsonl(stage.file("dropped.jsonl"), dropped)
    if not examples:
        raise DataError(
            f"none of the {len(transcripts)} stage-04 transcripts is trainable (see "
            f"{stage.file('dropped.jsonl')}): check notebook 04_introspection's output"
        )
    by_id = {e.id: e for e in examples}

    sft = config.sft
    steps = training.epoch_batches(
        list(by_id), sft.batch_size, sft.epochs, config.seed, SHUFFLE_SALT
    )

    def make_batch(step: int) -> training.StepBatch:
        return cross_entropy_step([by_id[i] for i in steps[step - 1]], "train/transcripts")

    target = training.CheckpointTarget(params.run_dir, STAGE, CHECKPOINT)
    plan = training.TrainingPlan.for_section("SFT", sft, len(steps), target, config.student)
    checkpoint = training.run_training(
        client, stage, plan, make_batch, done_steps=done_steps, read_metrics=step_losses
    )
    counts = {
        "transcripts": len(transcripts),
        "trained": len(examples),
        "dropped": len(dropped),
        "turns_removed": sum(e.turns_removed > 0 for e in examples),
        "cut_mid_turn": sum(e.cut for e in examples),
        "tokens": sum(e.tokens for e in examples),
        "loss_tokens": sum(e.loss_tokens for e in examples),
        "steps": len(steps),
        "by_kind": by_kind,
    }
    stage.finish(**counts)
    return Result(stage.path, counts, checkpoint, by_kind)
