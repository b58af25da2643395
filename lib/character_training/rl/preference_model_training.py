"""The trained preference signal (``rl.signal: preference_model``): a LoRA on the judge's base.

It learns, with cross-entropy on the answer letter only, which of two replies to a prompt is
the teacher's: stage 02's pairs rendered as comparisons (`evaluate.preference_model`: split
by prompt, letters balanced and recorded), optionally with the shipped helpfulness pairs mixed
in so that it is not a pure style detector. Comparisons longer than ``rl.pm_max_length``
tokens are left out and recorded. Batches are a seeded shuffle of the sorted comparison ids
per epoch (salt "pm"); the learning rate warms up over the first 10% of the steps and decays
linearly. Outputs of its folder: ``data.jsonl`` (every comparison with its split and letter),
``dropped.jsonl``, ``metrics.jsonl`` (loss and probability of the right letter per step).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tinker import types

from .. import training
from ..errors import DataError
from ..evaluate.preference_model import (
    PMExample,
    answer_datum,
    load_helpfulness_pairs,
    render_pm_examples,
)
from ..stage_config import digest, json_ready
from ..store import Checkpoint, StageDir, find_checkpoint, read_jsonl, write_jsonl
from ..supervised import normalise_batch
from .settings import RLAIFSettings, trainer_settings

SHUFFLE_SALT = "pm"
WARMUP_FRACTION = 0.1
SCHEDULE = "linear"


@dataclass
class PMResult:
    checkpoint: Checkpoint
    examples: list[PMExample]
    dropped: list[dict[str, Any]]


def pm_examples(config: RLAIFSettings, pairs: Sequence[Mapping[str, Any]]) -> list[PMExample]:
    """Every comparison, training and held-out (the held-out ones measure each signal)."""
    helpfulness = load_helpfulness_pairs() if config.rl.pm_helpfulness_pairs else []
    return render_pm_examples(pairs, config.rl.pm_heldout_fraction, config.seed, helpfulness)


def settings_used(config: RLAIFSettings, character: str) -> dict[str, Any]:
    """What the preference model depends on: its folder's fingerprint and ``config.json``."""
    rl = config.rl
    return {
        **trainer_settings(config, "judge"),
        "character": character,
        "pm": {
            "epochs": rl.pm_epochs,
            "learning_rate": rl.pm_learning_rate,
            "batch_size": rl.pm_batch_size,
            "heldout_fraction": rl.pm_heldout_fraction,
            "helpfulness_pairs": rl.pm_helpfulness_pairs,
            "max_length": rl.pm_max_length,
        },
    }


def letter_logprobs(
    outputs: Sequence[Mapping[str, Any]], datums: Sequence[types.Datum]
) -> list[float]:
    """Log-probability of each comparison's answer letter (its datum's only weighted token)."""
    return [
        float((o["logprobs"].to_torch().reshape(-1) * d.loss_fn_inputs["weights"].to_torch()).sum())
        for o, d in zip(outputs, datums)
    ]


def train_preference_model(
    service: Any,
    stage: StageDir,
    config: RLAIFSettings,
    examples: Sequence[PMExample],
    character: str,
    target: training.CheckpointTarget,
    on_existing: str = "resume",
) -> PMResult:
    """Train on the ``train`` comparisons in ``stage`` (``character``: the constitution summary
    the model is shown) and record it as ``target``; resumable, a finished folder is reused."""
    used = settings_used(config, character)
    stage.prepare(digest(used), on_existing, json_ready(used))
    write_jsonl(stage.file("data.jsonl"), (e.to_dict() for e in examples))
    if stage.manifest().get("status") == "done":
        return PMResult(
            find_checkpoint(target.run_dir, target.checkpoint),
            list(examples),
            read_jsonl(stage.file("dropped.jsonl")),
        )
    client, done_steps, renderer = training.open_trainer(service, stage, config, role="judge")
    rl = config.rl
    datums: dict[str, types.Datum] = {}
    dropped = []
    for e in (e for e in examples if e.split == "train"):
        datum = answer_datum(renderer, e.messages(character), e.chosen_as)
        if datum.model_input.length > rl.pm_max_length:
            dropped.append(
                {"id": e.id, "reason": f"{datum.model_input.length} tokens > rl.pm_max_length"}
            )
            continue
        datums[e.id] = datum
    write_jsonl(stage.file("dropped.jsonl"), dropped)
    if not datums:
        raise DataError("no preference-model comparison fits rl.pm_max_length")
    steps = training.epoch_batches(
        sorted(datums), rl.pm_batch_size, rl.pm_epochs, config.seed, SHUFFLE_SALT
    )

    def make_batch(step: int) -> training.StepBatch:
        ids = steps[step - 1]
        data, _ = normalise_batch([datums[i] for i in ids])
        return training.StepBatch(
            data, "cross_entropy", metrics={"train/comparisons": len(ids)}, payload=ids
        )

    def read_metrics(batch: training.StepBatch, out: Any) -> dict[str, float]:
        # the letter's log-prob under the unnormalised weights (exactly 1 on the letter)
        letter_lp = letter_logprobs(out.loss_fn_outputs, [datums[i] for i in batch.payload])
        return {
            "pm/loss": -statistics.fmean(letter_lp),
            "pm/p_answer": statistics.fmean(math.exp(v) for v in letter_lp),
        }

    plan = training.TrainingPlan.for_section(
        "preference model",
        rl,
        len(steps),
        target,
        config.judge,
        learning_rate=rl.pm_learning_rate,
        warmup_fraction=WARMUP_FRACTION,
        schedule=SCHEDULE,
        epochs=rl.pm_epochs,
    )
    checkpoint = training.run_training(
        client, stage, plan, make_batch, done_steps=done_steps, read_metrics=read_metrics
    )
    assert checkpoint is not None  # the plan names one
    stage.finish(
        examples=len(examples), trained=len(datums), dropped=len(dropped), steps=len(steps)
    )
    return PMResult(checkpoint, list(examples), dropped)
