"""What every training stage (DPO, SFT, RL) shares: schedules, resumable clients, checkpoints.

A stage trains through a Tinker-style training client (local engine or the service alike) and
must survive an interruption without redoing or losing work. The contract here:

* ``progress.json`` in the stage folder names the last saved step and its state path (weights
  and optimiser). A restarted stage continues from it with the optimiser state, and drops any
  metrics logged after it (those steps are redone, on the same data order).
* A stage that starts from an earlier stage's weights (SFT from "dpo") loads them without the
  optimiser, as a fresh run would.
* The finished model is saved twice, for sampling and as a state, and recorded under its name
  in the run's checkpoint manifest, where later notebooks find it.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tinker import types
from tqdm.auto import tqdm

from .backends import resolve_client
from .errors import ConfigError
from .metrics import JsonlLogger
from .renderers import get_renderer
from .store import (
    Checkpoint,
    StageDir,
    find_checkpoint,
    read_jsonl,
    record_checkpoint,
    write_jsonl,
)
from .weights_archive import keep_sampler_weights

PROGRESS_FILE = "progress.json"


def learning_rate_at(
    step: int, total_steps: int, base_lr: float, warmup_fraction: float, schedule: str
) -> float:
    """Learning rate of optimiser step ``step`` (1-based) out of ``total_steps``.

    Linear warm-up from ``base_lr / warmup`` to ``base_lr`` over the first
    ``ceil(warmup_fraction * total_steps)`` steps, then ``schedule``: "constant", "linear"
    (to zero after the last step) or "cosine" (half a cosine to zero).
    """
    if not 1 <= step <= total_steps:
        raise ValueError(f"step {step} outside 1..{total_steps}")
    warmup = math.ceil(warmup_fraction * total_steps)
    if step <= warmup:
        return base_lr * step / warmup
    if schedule == "constant":
        return base_lr
    remaining = total_steps - warmup
    progress = (step - warmup - 1) / remaining  # 0 at the first decayed step
    if schedule == "linear":
        return base_lr * (1.0 - progress)
    if schedule == "cosine":
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ConfigError(f"schedule={schedule!r}: expected linear, cosine or constant")


@dataclass(frozen=True)
class Progress:
    step: int
    state_path: str


def read_progress(stage: StageDir) -> Progress | None:
    """The last saved step and its state, as an absolute path (the file holds it relative to
    the run folder, so a copied run folder resumes from its own copy of the state)."""
    from .store import resolve_path

    path = stage.file(PROGRESS_FILE)
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    state_path = resolve_path(stage.run_dir, str(data["state_path"]))
    return Progress(step=int(data["step"]), state_path=state_path)


def open_training_client(
    service: Any,
    stage: StageDir,
    *,
    base_model: str,
    rank: int,
    seed: int,
    init_state: str | None = None,
) -> tuple[Any, int]:
    """The training client to continue with, and the number of steps already done.

    Resumes from ``progress.json`` (weights and optimiser) when present; otherwise starts
    from ``init_state`` (weights only) or a fresh LoRA adapter on ``base_model``.
    """
    progress = read_progress(stage)
    if progress is not None:
        client = resolve_client(
            service.create_training_client_from_state_with_optimizer(progress.state_path)
        )
        return client, progress.step
    if init_state:
        return resolve_client(service.create_training_client_from_state(init_state)), 0
    client = resolve_client(
        service.create_lora_training_client(base_model=base_model, rank=rank, seed=seed)
    )
    return client, 0


def open_trainer(
    service: Any,
    stage: StageDir,
    config: Any,
    role: str = "student",
    init_state: str | None = None,
) -> tuple[Any, int, Any]:
    """`open_training_client` for the ``role`` model of a stage's settings (``config.<role>``
    with ``config.lora_rank`` and ``config.seed``), the steps already done, and that model's
    chat format (``config.<role>_renderer``) on the client's tokenizer."""
    client, done_steps = open_training_client(
        service,
        stage,
        base_model=getattr(config, role),
        rank=config.lora_rank,
        seed=config.seed,
        init_state=init_state,
    )
    renderer = get_renderer(getattr(config, f"{role}_renderer"), client.get_tokenizer())
    return client, done_steps, renderer


def save_progress(client: Any, stage: StageDir, step: int) -> Progress:
    """Save weights + optimiser after ``step`` and point ``progress.json`` at them."""
    from .store import portable_path

    path = client.save_state(f"{stage.path.name}-step-{step:06d}").result().path
    progress = Progress(step=step, state_path=str(path))
    target = stage.file(PROGRESS_FILE)
    tmp = target.with_suffix(".tmp")
    stored = portable_path(stage.run_dir, path)
    tmp.write_text(json.dumps({"step": step, "state_path": stored}))
    os.replace(tmp, target)
    return progress


def truncate_metrics(path: Path, last_step: int) -> int:
    """Keep the metric rows of steps <= ``last_step`` (later ones are redone); returns kept."""
    rows = [r for r in read_jsonl(path) if int(r.get("step", 0)) <= last_step]
    if path.is_file():
        write_jsonl(path, rows)
    return len(rows)


def finish_checkpoint(
    client: Any, run_dir: Path, name: str, stage_name: str, base_model: str
) -> Checkpoint:
    """Save the trained model for sampling and as a state; record it as ``name`` (with its
    creation time), and keep a local copy of the sampler weights where the service offers an
    archive (`weights_archive`)."""
    sampler_path = client.save_weights_for_sampler(name).result().path
    state_path = client.save_state(f"{name}-final").result().path
    checkpoint = Checkpoint(
        name=name,
        sampler_path=str(sampler_path),
        state_path=str(state_path),
        base_model=base_model,
        stage=stage_name,
    )
    record_checkpoint(run_dir, checkpoint)
    keep_sampler_weights(run_dir, find_checkpoint(run_dir, name))  # outlives the service
    return checkpoint


def step_record(
    step: int,
    total_steps: int,
    epochs: int,
    learning_rate: float,
    optim_response: Any,
    tokens: int,
    elapsed: float,
) -> dict[str, Any]:
    """The bookkeeping every training stage logs for an optimiser step (its own loss terms
    and batch counts go next to these)."""
    return {
        "epoch": math.floor((step - 1) * epochs / total_steps),
        "optim/lr": learning_rate,
        "optim/grad_norm": (getattr(optim_response, "metrics", None) or {}).get("optim/grad_norm"),
        "train/tokens": tokens,
        "time/step": elapsed,
        "time/tokens_per_s": tokens / elapsed if elapsed > 0 else None,
    }


def save_if_due(client: Any, stage: StageDir, step: int, total_steps: int, every: int) -> None:
    """A resume point every ``every`` steps; none after the last (the checkpoint follows)."""
    if step % every == 0 and step < total_steps:
        save_progress(client, stage, step)


def epoch_batches(
    ids: Sequence[str], batch_size: int, epochs: int, seed: int, salt: str
) -> list[list[str]]:
    """Every optimiser step's example ids: a seeded shuffle per epoch, cut into batches.

    Batches never cross epochs (the last one of an epoch may be smaller), an example is never
    split (ids are batched, so DPO's chosen and rejected stay together), and the order depends
    only on the ids, the seed and ``salt`` (the stage's name for its shuffle), so a resumed
    run sees the same steps as an uninterrupted one.
    """

    steps: list[list[str]] = []
    for epoch in range(epochs):
        order = list(ids)
        random.Random(f"{seed}:{salt}-epoch:{epoch}").shuffle(order)
        steps += [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    return steps


# -- the one training loop -----------------------------------------------------------------------
@dataclass(frozen=True)
class LRSchedule:
    """Learning rate per step: linear warm-up over ``warmup_fraction`` of the steps, then
    ``schedule`` (see `learning_rate_at`)."""

    learning_rate: float
    warmup_fraction: float = 0.0
    schedule: str = "constant"

    def at(self, step: int, total_steps: int) -> float:
        return learning_rate_at(
            step, total_steps, self.learning_rate, self.warmup_fraction, self.schedule
        )


@dataclass(frozen=True)
class CheckpointTarget:
    """Where a trainer's finished weights are recorded: the name in the run's checkpoint
    manifest, the run folder, and the stage credited with them (see `finish_checkpoint`)."""

    run_dir: Path
    stage_name: str
    checkpoint: str


# what a params section may give a plan, and the value when it has no such field (RL's section
# has no warm-up and trains one pass)
_SECTION_FIELDS = (
    ("learning_rate", None),
    ("warmup_fraction", 0.0),
    ("schedule", "constant"),
    ("save_every", None),
    ("epochs", 1),
    ("grad_clip_norm", 0.0),
)


@dataclass(frozen=True)
class TrainingPlan:
    """What the loop needs to know about a stage's training, besides its batches.

    ``name`` labels the progress bar; ``epochs`` only feeds the ``epoch`` metric column;
    ``grad_clip_norm`` goes to every ``optim_step`` (Tinker's ``AdamParams.grad_clip_norm``);
    ``target``, when set, is where the finished weights of ``base_model`` are recorded.
    """

    name: str
    total_steps: int
    schedule: LRSchedule
    save_every: int
    epochs: int = 1
    grad_clip_norm: float = 0.0  # global gradient-norm clip in the optimiser step (0: none)
    target: CheckpointTarget | None = None
    base_model: str = ""

    @classmethod
    def for_section(
        cls,
        name: str,
        section: Any,
        total_steps: int,
        target: CheckpointTarget,
        base_model: str,
        **overrides: Any,
    ) -> TrainingPlan:
        """The plan of a trainer configured by a params section (``dpo``, ``sft``, ``rl``):
        its ``learning_rate``, ``warmup_fraction``, ``schedule``, ``save_every``, ``epochs``
        and ``grad_clip_norm``, each replaced by ``overrides`` where given (the RL start's
        own step count, the preference model's ``pm_*`` settings)."""
        unknown = set(overrides) - {key for key, _ in _SECTION_FIELDS}
        if unknown:
            raise TypeError(f"TrainingPlan.for_section: unknown overrides {sorted(unknown)}")
        value = {key: getattr(section, key, default) for key, default in _SECTION_FIELDS}
        value.update(overrides)
        return cls(
            name=name,
            total_steps=total_steps,
            schedule=LRSchedule(
                value["learning_rate"], value["warmup_fraction"], value["schedule"]
            ),
            save_every=value["save_every"],
            epochs=value["epochs"],
            grad_clip_norm=value["grad_clip_norm"],
            target=target,
            base_model=base_model,
        )


@dataclass
class StepBatch:
    """One optimiser step's work, as the stage builds it.

    ``loss`` is a built-in loss name ("cross_entropy", "importance_sampling", ...) for
    ``forward_backward`` or a custom ``(data, logprobs) -> (loss, metrics)`` function for
    ``forward_backward_custom``. ``metrics`` are known before the step runs (batch counts,
    RL rollout statistics) and are logged as they are; ``payload`` is handed back to the
    stage's ``read_metrics`` with the step's output. ``tokens`` defaults to the data's length.
    """

    data: Sequence[types.Datum]
    loss: str | Callable[..., Any]
    loss_fn_config: Mapping[str, Any] | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    payload: Any = None
    tokens: int | None = None


@dataclass
class _Submitted:
    step: int
    batch: StepBatch
    learning_rate: float
    forward_backward: Any
    optim: Any
    started: float


def _submit(
    client: Any, batch: StepBatch, step: int, learning_rate: float, grad_clip_norm: float
) -> _Submitted:
    """Queue the step's forward-backward and its optimiser step back to back (one round trip
    on the service; the local engine runs them as they are called, in order)."""
    started = time.perf_counter()
    if callable(batch.loss):
        fb = client.forward_backward_custom(list(batch.data), batch.loss)
    elif batch.loss_fn_config is not None:
        fb = client.forward_backward(list(batch.data), batch.loss, dict(batch.loss_fn_config))
    else:
        fb = client.forward_backward(list(batch.data), batch.loss)
    optim = client.optim_step(
        types.AdamParams(learning_rate=learning_rate, grad_clip_norm=grad_clip_norm)
    )
    return _Submitted(step, batch, learning_rate, fb, optim, started)


def run_training(
    client: Any,
    stage: StageDir,
    plan: TrainingPlan,
    make_batch: Callable[[int], StepBatch],
    *,
    done_steps: int,
    read_metrics: Callable[[StepBatch, Any], Mapping[str, Any]] | None = None,
    after_step: Callable[[int], None] | None = None,
    hook_steps: Sequence[int] = (),
) -> Checkpoint | None:
    """Train steps ``done_steps + 1 .. plan.total_steps``: the one loop every trainer uses.

    The stage supplies ``make_batch(step)`` (its data and loss) and optionally
    ``read_metrics(batch, forward_backward_output)`` (its own loss terms); the loop owns the
    learning-rate schedule, step submission, the per-step metrics row (`step_record` plus the
    stage's), resume points every ``plan.save_every`` steps and the final checkpoint.

    Steps are pipelined: step s+1 is built and submitted before step s's results are read,
    so on the service a step costs one clock cycle rather than a round trip per call. At a
    resume point, or at a step in ``hook_steps`` (where ``after_step(step)`` runs, e.g. RL's
    probes), the loop first reads the step's results and logs them, so a resume never lacks
    a finished step's metrics and a hook always sees the updated weights. On the local engine
    calls run eagerly in order, so pipelining changes no number.
    """
    metrics_path = stage.file("metrics.jsonl")
    truncate_metrics(metrics_path, done_steps)
    log = JsonlLogger(metrics_path)
    total = plan.total_steps
    hooks = set(hook_steps)
    bar = tqdm(total=total, initial=done_steps, desc=plan.name, unit="step")

    def finish(sub: _Submitted) -> None:
        out = sub.forward_backward.result()
        optim = sub.optim.result()
        elapsed = time.perf_counter() - sub.started
        batch = sub.batch
        tokens = (
            batch.tokens
            if batch.tokens is not None
            else sum(d.model_input.length for d in batch.data)
        )
        row: dict[str, Any] = dict(read_metrics(batch, out)) if read_metrics else {}
        row.update(
            step_record(sub.step, total, plan.epochs, sub.learning_rate, optim, tokens, elapsed)
        )
        row["optim/grad_clip_norm"] = plan.grad_clip_norm
        row.update(batch.metrics)
        log.log(sub.step, row)
        bar.update(1)

    pending: _Submitted | None = None
    for step in range(done_steps + 1, total + 1):
        batch = make_batch(step)
        submitted = _submit(client, batch, step, plan.schedule.at(step, total), plan.grad_clip_norm)
        if pending is not None:
            finish(pending)
        pending = submitted
        save_due = step % plan.save_every == 0 and step < total
        if save_due or step in hooks:
            finish(pending)
            pending = None
            if step in hooks and after_step is not None:
                after_step(step)
            if save_due:
                save_progress(client, stage, step)
    if pending is not None:
        finish(pending)
    bar.close()
    if plan.target is None:
        return None
    target = plan.target
    return finish_checkpoint(
        client, target.run_dir, target.checkpoint, target.stage_name, plan.base_model
    )
