"""What stage 09's trainers read from its ``Config``, and what each trainer's folder depends on.

The settings live in the stage's ``Config`` (`stages.rlaif.Config`, a `StageConfig` that
declares the ``rl``, ``sft``, ``evals`` and ``adherence`` sections and the run-level models).
This package sits below the stage and must not import it, so it names the part of that
``Config`` it relies on as a protocol: anything with these attributes will do. Where a trainer
records its weights is a `training.CheckpointTarget`.
"""

from __future__ import annotations

from typing import Any, Protocol

from ..config import RLParams, SFTParams


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


def trainer_settings(config: RLAIFSettings, role: str) -> dict[str, Any]:
    """What every stage-09 trainer's folder depends on besides its own section: the model it
    trains (``role``: "student" or "judge") and its chat format, the LoRA rank, the seed and
    the pairs it learns from (the start of its fingerprint and ``config.json``)."""
    return {
        role: getattr(config, role),
        f"{role}_renderer": getattr(config, f"{role}_renderer"),
        "lora_rank": config.lora_rank,
        "seed": config.seed,
        "pairs_digest": config.pairs_digest,
    }
