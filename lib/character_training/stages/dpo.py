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
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from tinker import types
from tqdm.auto import tqdm

from ..config import RunParams
from ..errors import DataError
from ..metrics import JsonlLogger
from ..objectives import compute_dpo_loss
from ..renderers import get_renderer, renderer_for_model
from ..renderers.conversation import supervised_datum
from ..store import (
    StageDir,
    append_jsonl,
    find_checkpoint,
    read_jsonl,
    stage_dir,
    write_jsonl,
)
from ..training import (
    finish_checkpoint,
    learning_rate_at,
    open_training_client,
    save_if_due,
    step_record,
    truncate_metrics,
)

logger = logging.getLogger(__name__)

STAGE = "03_dpo"
PAIRS_STAGE = "02_distillation"
CHECKPOINT = "dpo"


@dataclass(frozen=True)
class Config:
    """Stage 03 settings, derived from `RunParams` (see `config.DPOParams` for each field)."""

    student: str
    student_renderer: str
    lora_rank: int
    learning_rate: float
    batch_size: int
    beta: float
    nll_coef: float
    kl_coef: float
    epochs: int
    warmup_fraction: float
    schedule: str
    max_length: int
    save_every: int
    seed: int
    pairs_digest: str = ""

    @classmethod
    def from_params(cls, params: RunParams, pairs_digest: str = "") -> "Config":
        d = params.dpo
        return cls(
            student=params.student,
            student_renderer=params.renderers.get(params.student)
            or renderer_for_model(params.student),
            lora_rank=params.lora_rank,
            learning_rate=d.learning_rate,
            batch_size=d.batch_size,
            beta=d.beta,
            nll_coef=d.nll_coef,
            kl_coef=d.kl_coef,
            epochs=d.epochs,
            warmup_fraction=d.warmup_fraction,
            schedule=d.schedule,
            max_length=d.max_length,
            save_every=d.save_every,
            seed=params.seed,
            pairs_digest=pairs_digest,
        )

    def fingerprint(self) -> str:
        return hashlib.sha256(repr(sorted(asdict(self).items())).encode()).hexdigest()[:12]


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
def truncate_datum(datum: types.Datum, max_length: int) -> types.Datum:
    """The datum cut to its first ``max_length`` positions (the end of the reply goes)."""
    if datum.model_input.length <= max_length:
        return datum
    tokens = datum.model_input.to_ints()[:max_length]
    inputs = {
        key: types.TensorData.from_torch(value.to_torch()[:max_length])
        for key, value in datum.loss_fn_inputs.items()
    }
    return types.Datum(model_input=types.ModelInput.from_ints(tokens), loss_fn_inputs=inputs)


def loss_positions(datum: types.Datum) -> torch.Tensor:
    """Indices of the positions whose target carries loss (weight > 0)."""
    weights = datum.loss_fn_inputs["weights"].to_torch().reshape(-1)
    return torch.nonzero(weights > 0).reshape(-1)


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


def epoch_batches(
    pair_ids: Sequence[str], batch_size: int, epochs: int, seed: int
) -> list[list[str]]:
    """Every optimiser step's pair ids: a seeded shuffle per epoch, cut into batches.

    The last batch of an epoch may be smaller; batches never cross epochs, and a pair is never
    split (ids, not datums, are batched).
    """
    steps: list[list[str]] = []
    for epoch in range(epochs):
        order = list(pair_ids)
        random.Random(f"{seed}:dpo-epoch:{epoch}").shuffle(order)
        steps += [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    return steps


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
def load_pairs(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / PAIRS_STAGE / "pairs.jsonl"
    if not path.is_file():
        raise DataError(f"{path} is missing: run notebook 02_distillation first")
    pairs = read_jsonl(path)
    if not pairs:
        raise DataError(f"{path} holds no pairs: nothing to train on")
    return pairs


def run(params: RunParams, service_client, on_existing: str = "resume") -> Result:
    """Train LoRA DPO on the stage-02 pairs; resumable (see the module docstring)."""
    pairs = load_pairs(params.run_dir)
    digest = hashlib.sha256(
        "\n".join(f"{p['id']}\t{p['chosen']}\t{p['rejected']}" for p in pairs).encode()
    ).hexdigest()[:12]
    config = Config.from_params(params, pairs_digest=digest)
    stage: StageDir = stage_dir(params.run_dir, STAGE)
    stage.prepare(config.fingerprint(), on_existing, asdict(config))
    finished = stage.manifest()
    if finished.get("status") == "done":  # nothing left to do: the checkpoint is recorded
        return Result(
            stage.path, finished.get("counts", {}), find_checkpoint(params.run_dir, CHECKPOINT)
        )

    client, done_steps = open_training_client(
        service_client, stage, base_model=config.student, rank=config.lora_rank, seed=config.seed
    )
    renderer = get_renderer(config.student_renderer, client.get_tokenizer())
    data, dropped = build_pair_data(pairs, renderer, config.max_length)
    write_jsonl(stage.file("dropped.jsonl"), dropped)
    if not data:
        raise DataError(f"{PAIRS_STAGE}/pairs.jsonl: no pair has two trainable replies")
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

    steps = epoch_batches(list(by_id), config.batch_size, config.epochs, config.seed)
    metrics_path = stage.file("metrics.jsonl")
    truncate_metrics(metrics_path, done_steps)
    log = JsonlLogger(metrics_path)
    total = len(steps)
    bar = tqdm(total=total, initial=done_steps, desc="DPO", unit="step")
    for step in range(done_steps + 1, total + 1):
        batch = [by_id[pid] for pid in steps[step - 1]]
        started = time.perf_counter()
        loss_fn = make_dpo_loss_fn(
            [references[p.pair_id] for p in batch],
            beta=config.beta,
            nll_coef=config.nll_coef,
            kl_coef=config.kl_coef,
        )
        data_list = [d for p in batch for d in (p.chosen, p.rejected)]
        out = client.forward_backward_custom(data_list, loss_fn).result()
        lr = learning_rate_at(
            step, total, config.learning_rate, config.warmup_fraction, config.schedule
        )
        optim = client.optim_step(types.AdamParams(learning_rate=lr)).result()
        elapsed = time.perf_counter() - started
        tokens = sum(d.model_input.length for d in data_list)
        row = {k: v for k, v in out.metrics.items() if k.startswith("dpo/")}
        row.update(step_record(step, total, config.epochs, lr, optim, tokens, elapsed))
        row.update(
            {
                "train/pairs": len(batch),
            }
        )
        log.log(step, row)
        save_if_due(client, stage, step, total, config.save_every)
        bar.update(1)
    bar.close()

    checkpoint = finish_checkpoint(client, params.run_dir, CHECKPOINT, STAGE, config.student)
    counts = {"pairs": len(data), "dropped": len(dropped), "steps": total}
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
