"""What stage 09's trainers read from its ``Config``, and where they record their weights.

The settings live in the stage's ``Config`` (`stages.rlaif.Config`, a `StageConfig` that
declares the ``rl``, ``sft``, ``evals`` and ``adherence`` sections and the run-level models).
This package sits below the stage and must not import it, so it names the part of that
``Config`` it relies on as a protocol: anything with these attributes will do.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ..config import RLParams, SFTParams
from ..training import LRSchedule, TrainingPlan


class RLAIFSettings(Protocol):
    """The settings stage 09's pieces read (see `stages.rlaif.Config`)."""

    @property
    def rl(self) -> RLParams: ...

    @property
    def sft(self) -> SFTParams: ...

    @property
    def student(self) -> str: ...

    @property
    def student_renderer(self) -> str: ...

    @property
    def judge(self) -> str: ...

    @property
    def judge_renderer(self) -> str: ...

    @property
    def lora_rank(self) -> int: ...

    @property
    def pairs_digest(self) -> str: ...

    @property
    def seed(self) -> int: ...

    @property
    def steps(self) -> int: ...

    @property
    def group_size(self) -> int: ...

    @property
    def prompts_per_step(self) -> int: ...

    @property
    def bootstrap(self) -> int: ...


@dataclass(frozen=True)
class CheckpointTarget:
    """Where a trainer's finished weights are recorded: the name in the run's checkpoint
    manifest, the run folder, and the stage credited with them."""

    run_dir: Path
    stage_name: str
    checkpoint: str

    def plan(
        self,
        name: str,
        total_steps: int,
        schedule: LRSchedule,
        save_every: int,
        base_model: str,
        epochs: int = 1,
        grad_clip_norm: float = 0.0,
    ) -> TrainingPlan:
        """The `training.TrainingPlan` of a trainer that records its weights here."""
        return TrainingPlan(
            name=name,
            total_steps=total_steps,
            schedule=schedule,
            save_every=save_every,
            epochs=epochs,
            grad_clip_norm=grad_clip_norm,
            checkpoint=self.checkpoint,
            run_dir=self.run_dir,
            stage_name=self.stage_name,
            base_model=base_model,
        )
