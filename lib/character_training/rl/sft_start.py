"""The optional start of RL (``rl.init: sft``): a short SFT on stage 02's chosen replies.

The public replication started RL from such a model. Here it is ``rl.sft_init_steps`` steps of
the same supervised recipe as stage 05 (`supervised`: loss on the reply and its end-of-turn
token, per-token mean over the batch), from the instruct model, with stage 05's learning rate,
batch size, warm-up, schedule and length limit (``sft.*``). Batches are stage 05's seeded
shuffle (salt "sft"), as many epochs as the steps need, cut at ``rl.sft_init_steps``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from .. import training
from ..errors import DataError
from ..stage_config import digest, json_ready
from ..store import Checkpoint, StageDir, find_checkpoint
from ..supervised import as_transcripts, build_examples, cross_entropy_step, step_losses
from .settings import RLAIFSettings, trainer_settings

SHUFFLE_SALT = "sft"


def chosen_transcripts(pairs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Each pair's prompt and chosen reply as a one-exchange conversation (kind "chosen")."""
    return [
        {
            "id": p["id"],
            "kind": "chosen",
            "messages": [
                {"role": "user", "content": p["prompt"]},
                {"role": "assistant", "content": p["chosen"]},
            ],
        }
        for p in pairs
    ]


def settings_used(config: RLAIFSettings) -> dict[str, Any]:
    """What the SFT start depends on: its folder's fingerprint and ``config.json``."""
    sft = config.sft
    return {
        **trainer_settings(config, "student"),
        "steps": config.rl.sft_init_steps,
        "sft": {
            "learning_rate": sft.learning_rate,
            "batch_size": sft.batch_size,
            "max_length": sft.max_length,
            "warmup_fraction": sft.warmup_fraction,
            "schedule": sft.schedule,
        },
    }


def train_sft_start(
    service: Any,
    stage: StageDir,
    config: RLAIFSettings,
    pairs: Sequence[Mapping[str, Any]],
    target: training.CheckpointTarget,
    on_existing: str = "resume",
) -> Checkpoint:
    """Train the SFT start in ``stage`` and record it as ``target``; a finished folder with
    the same settings is reused, an interrupted one resumed."""
    used = settings_used(config)
    stage.prepare(digest(used), on_existing, json_ready(used))
    if stage.manifest().get("status") == "done":
        return find_checkpoint(target.run_dir, target.checkpoint)
    client, done_steps, renderer = training.open_trainer(service, stage, config)
    transcripts = as_transcripts(chosen_transcripts(pairs))
    sft = config.sft
    examples, dropped = build_examples(transcripts, renderer, sft.max_length)
    if not examples:
        raise DataError("no chosen reply of 02_distillation/pairs.jsonl is trainable")
    by_id = {e.id: e for e in examples}
    total = config.rl.sft_init_steps
    epochs = math.ceil(total * sft.batch_size / len(examples))
    batches = training.epoch_batches(
        list(by_id), sft.batch_size, epochs, config.seed, SHUFFLE_SALT
    )[:total]
    per_epoch = math.ceil(len(examples) / sft.batch_size)

    def make_batch(step: int) -> training.StepBatch:
        # the steps stop mid-epoch: the epoch column counts epochs rather than spreading them
        return cross_entropy_step(
            [by_id[i] for i in batches[step - 1]],
            "train/examples",
            {"epoch": (step - 1) // per_epoch},
        )

    plan = training.TrainingPlan.for_section(
        "RL start: SFT",
        sft,
        total,
        target,
        config.student,
        save_every=config.rl.save_every,
        epochs=epochs,
    )
    checkpoint = training.run_training(
        client, stage, plan, make_batch, done_steps=done_steps, read_metrics=step_losses
    )
    assert checkpoint is not None  # the plan names one
    stage.finish(examples=len(examples), dropped=len(dropped), steps=total)
    return checkpoint
