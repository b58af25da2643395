"""Stage 03: DPO on the distilled pairs, the first half of character training.

Inputs: ``02_distillation/pairs.jsonl`` (chosen = the teacher's reply with the constitution,
rejected = the student's without). Outputs (``runs/<persona>/<size>/03_dpo/``):

* ``reference_logprobs.jsonl``: per pair, the starting model's log-probabilities of every loss
  token of both replies, computed once with the training client's own forward (so at step 0
  policy and reference agree exactly) and reused on every epoch and after a resume: a resumed
  run never takes its resumed weights as the reference;
* ``metrics.jsonl``: one row per optimiser step: every loss term, accuracy, margin, rewards,
  KL, learning rate, gradient norm, tokens/s;
* ``progress.json`` + states every ``dpo.save_every`` steps (resume point, with the optimiser);
* ``dropped.jsonl``: pairs that cannot be trained (a reply with fewer than two loss tokens
  after truncation to ``dpo.max_length``), with the reason;
* checkpoint "dpo" in the run's ``checkpoints.json`` (sampler path + state path).

The objective (`objectives.compute_dpo_loss`) runs inside ``forward_backward_custom``, the same
call on the local engine and on Tinker. Chosen and rejected of a pair always travel in the same
call; batches are the pairs of one optimiser step, shuffled per epoch with a seed, so a resumed
run sees the same data order as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from tinker import types
from tqdm.auto import tqdm

from .. import training
from ..artifacts import DISTILL_STAGE, DPO_CHECKPOINT, DPO_STAGE, load_pairs
from ..config import DPOParams, RunParams
from ..errors import DataError
from ..objectives import compute_dpo_loss
from ..renderers.conversation import loss_positions, supervised_datum, truncate_datum
from ..stage_config import StageConfig
from ..store import (
    StageDir,
    append_jsonl,
    find_checkpoint,
    read_jsonl,
    stage_dir,
    write_jsonl,
)

logger = logging.getLogger(__name__)

STAGE = DPO_STAGE
SHUFFLE_SALT = "dpo"
CHECKPOINT = DPO_CHECKPOINT


@dataclass(frozen=True)
class Config(StageConfig):
    """Stage 03 settings: the ``dpo`` section (see `config.DPOParams`), the student and its chat
    format, the LoRA rank and seed, and the digest of the pairs it trains on."""

    dpo: DPOParams
    student: str
    student_renderer: str
    lora_rank: int
    seed: int
    pairs_digest: str = ""


@dataclass(frozen=True)
class PairData:
    """One trainable pair: its id and the chosen/rejected training datums."""

    pair_id: str
    chosen: types.Datum
    rejected: types.Datum


@dataclass(frozen=True)
class Result:
    stage_dir: Path
    counts: dict[str, Any]
    checkpoint: Any


# -- pure helpers --------------------------------------------------------------------------------
def build_pair_data(
    pairs: Sequence[dict], renderer, max_length: int
) -> tuple[list[PairData], list[dict]]:
    """Render every pair as two datums sharing the user prompt; returns (kept, dropped).

    The conversation is exactly [user prompt, assistant reply]: nothing of the teacher's
    system prompt or demonstrations exists in a pair record, so nothing of it can be trained.
    A reply needs at least two loss tokens after truncation (one would be the end-of-turn
    token alone).
    """
    kept: list[PairData] = []
    dropped: list[dict] = []
    for row in pairs:
        if row["chosen"] == row["rejected"]:
            dropped.append({"id": row["id"], "reason": "chosen equals rejected"})
            continue
        datums = []
        for side in ("chosen", "rejected"):
            messages = [
                {"role": "user", "content": row["prompt"]},
                {"role": "assistant", "content": row[side]},
            ]
            datums.append(truncate_datum(supervised_datum(renderer, messages), max_length))
        short = [
            side for side, d in zip(("chosen", "rejected"), datums) if len(loss_positions(d)) < 2
        ]
        if short:
            dropped.append(
                {"id": row["id"], "reason": f"fewer than 2 loss tokens in {'+'.join(short)}"}
            )
            continue
        kept.append(PairData(row["id"], datums[0], datums[1]))
    return kept, dropped


def make_dpo_loss_fn(
    references: Sequence[tuple[torch.Tensor, torch.Tensor]],
    *,
    beta: float,
    nll_coef: float,
    kl_coef: float,
    scale: float = 1.0,
):
    """The ``loss_fn(data, logprobs)`` closure for ``forward_backward_custom``.

    ``data`` alternates chosen, rejected for each pair, in the order of ``references`` (the
    reference log-probs of each pair's loss tokens). ``scale`` multiplies the loss so that a
    batch split over several calls still averages over the whole batch.
    """

    def loss_fn(data: list[types.Datum], logprobs: list[torch.Tensor]):
        if len(data) != 2 * len(references):
            raise DataError(
                f"DPO loss got {len(data)} sequences for {len(references)} pairs; "
                "expected chosen and rejected of every pair"
            )
        chosen, rejected = [], []
        for i in range(len(references)):
            for datum, lp, bucket in (
                (data[2 * i], logprobs[2 * i], chosen),
                (data[2 * i + 1], logprobs[2 * i + 1], rejected),
            ):
                bucket.append(lp.reshape(-1)[loss_positions(datum)])
        loss, metrics = compute_dpo_loss(
            chosen,
            rejected,
            [ref[0] for ref in references],
            [ref[1] for ref in references],
            beta=beta,
            nll_coef=nll_coef,
            kl_coef=kl_coef,
        )
        return loss * scale, metrics

    return loss_fn


def dpo_metrics(batch: training.StepBatch, output: Any) -> dict[str, Any]:
    """The DPO loss terms of a step (``dpo/*``) from its forward-backward output."""
    return {k: v for k, v in output.metrics.items() if k.startswith("dpo/")}


# -- reference log-probs --------------------------------------------------------------------------
def compute_reference_logprobs(
    client, pairs: Sequence[PairData], path: Path, batch_pairs: int = 16
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Reference log-probs of every pair's loss tokens, from ``client``'s current weights.

    Must be called before any optimiser step (the starting weights are the reference). Rows
    already in ``path`` are reused; missing ones are computed and appended, so an interruption
    here loses nothing either.
    """
    done = {row["id"]: row for row in read_jsonl(path)}
    missing = [p for p in pairs if p.pair_id not in done]
    for start in tqdm(
        range(0, len(missing), batch_pairs), desc="reference log-probs", unit="batch"
    ):
        chunk = missing[start : start + batch_pairs]
        data = [d for p in chunk for d in (p.chosen, p.rejected)]
        outputs = client.forward(data, "cross_entropy").result().loss_fn_outputs
        for i, pair in enumerate(chunk):
            row = {"id": pair.pair_id}
            for j, side in enumerate(("chosen", "rejected")):
                lp = outputs[2 * i + j]["logprobs"].to_torch().reshape(-1).float()
                datum = pair.chosen if side == "chosen" else pair.rejected
                row[side] = lp[loss_positions(datum)].tolist()
            append_jsonl(path, row)
            done[pair.pair_id] = row
    return {
        pid: (
            torch.tensor(done[pid]["chosen"], dtype=torch.float32),
            torch.tensor(done[pid]["rejected"], dtype=torch.float32),
        )
        for pid in (p.pair_id for p in pairs)
    }


# -- the stage -----------------------------------------------------------------------------------
def run(params: RunParams, service_client, on_existing: str = "resume") -> Result:
    """Train LoRA DPO on the stage-02 pairs; resumable (see the module docstring)."""
    pairs = load_pairs(params.run_dir)
    digest = hashlib.sha256(
        "\n".join(f"{p['id']}\t{p['chosen']}\t{p['rejected']}" for p in pairs).encode()
    ).hexdigest()[:12]
    config = Config.from_params(params, pairs_digest=digest)
    dpo = config.dpo
    stage: StageDir = stage_dir(params.run_dir, STAGE)
    stage.prepare(config.fingerprint(), on_existing, config.as_dict())
    finished = stage.manifest()
    if finished.get("status") == "done":  # nothing left to do: the checkpoint is recorded
        return Result(
            stage.path, finished.get("counts", {}), find_checkpoint(params.run_dir, CHECKPOINT)
        )

    client, done_steps, renderer = training.open_trainer(service_client, stage, config)
    data, dropped = build_pair_data(pairs, renderer, dpo.max_length)
    write_jsonl(stage.file("dropped.jsonl"), dropped)
    if not data:
        raise DataError(f"{DISTILL_STAGE}/pairs.jsonl: no pair has two trainable replies")
    by_id = {p.pair_id: p for p in data}

    ref_path = stage.file("reference_logprobs.jsonl")
    if done_steps == 0:
        references = compute_reference_logprobs(client, data, ref_path)
    else:  # the client holds trained weights now: only the stored reference may be used
        references = _load_references(ref_path)
        if not set(by_id) <= set(references):
            raise DataError(
                f"{ref_path}: reference log-probs are incomplete but training already ran "
                f"{done_steps} steps; rerun with on_existing='overwrite'"
            )

    steps = training.epoch_batches(
        list(by_id), dpo.batch_size, dpo.epochs, config.seed, SHUFFLE_SALT
    )

    def make_batch(step: int) -> training.StepBatch:
        batch = [by_id[pid] for pid in steps[step - 1]]
        loss_fn = make_dpo_loss_fn(
            [references[p.pair_id] for p in batch],
            beta=dpo.beta,
            nll_coef=dpo.nll_coef,
            kl_coef=dpo.kl_coef,
        )
        data = [d for p in batch for d in (p.chosen, p.rejected)]
        return training.StepBatch(data, loss_fn, metrics={"train/pairs": len(batch)})

    target = training.CheckpointTarget(params.run_dir, STAGE, CHECKPOINT)
    plan = training.TrainingPlan.for_section("DPO", dpo, len(steps), target, config.student)
    checkpoint = training.run_training(
        client, stage, plan, make_batch, done_steps=done_steps, read_metrics=dpo_metrics
    )
    counts = {"pairs": len(data), "dropped": len(dropped), "steps": len(steps)}
    stage.finish(**counts)
    return Result(stage.path, counts, checkpoint)


def _load_references(path: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {
        row["id"]: (
            torch.tensor(row["chosen"], dtype=torch.float32),
            torch.tensor(row["rejected"], dtype=torch.float32),
        )
        for row in read_jsonl(path)
    }
