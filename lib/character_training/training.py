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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .backends import resolve_client
from .errors import ConfigError
from .store import Checkpoint, StageDir, read_jsonl, record_checkpoint, write_jsonl

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
    path = stage.file(PROGRESS_FILE)
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    return Progress(step=int(data["step"]), state_path=str(data["state_path"]))


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


def save_progress(client: Any, stage: StageDir, step: int) -> Progress:
    """Save weights + optimiser after ``step`` and point ``progress.json`` at them."""
    path = client.save_state(f"{stage.path.name}-step-{step:06d}").result().path
    progress = Progress(step=step, state_path=str(path))
    target = stage.file(PROGRESS_FILE)
    tmp = target.with_suffix(".tmp")
    tmp.write_text(json.dumps({"step": step, "state_path": str(path)}))
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
    """Save the trained model for sampling and as a state; record it as ``name``."""
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
