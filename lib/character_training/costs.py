"""Dry-run budget: planned token counts per stage and their estimated price.

Before a Tinker run spends money, `estimate` turns the run parameters into token counts for
every stage (prefill = prompt tokens the service reads, sample = tokens it generates,
train = tokens through forward/backward) and prices them with the per-model table in the
parameters. The counts are planning figures built from the dataset sizes and mean lengths
below, not measurements; the notebooks record actual counts in each stage's manifest.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import RunParams

# Planning constants (tokens). Measured means from real runs should replace them over time.
PERSONA_SYSTEM_TOKENS = 450  # persona system prompt with ~10 assertions
USER_PROMPT_TOKENS = 60
EXPANSION_PROMPT_TOKENS = 350
GENERATED_PROMPT_TOKENS = 35
ASSERTIONS = 10
REFLECTION_PROMPTS = 10
ELO_SYSTEM_TOKENS = 170
JUDGE_PROMPT_TOKENS = 600
JUDGE_OUTPUT_TOKENS = 20


@dataclass(frozen=True)
class StageCost:
    stage: str
    model: str
    prefill_tokens: int
    sample_tokens: int
    train_tokens: int
    usd: float | None

    def as_row(self) -> dict:
        return {
            "stage": self.stage,
            "model": self.model,
            "prefill_tokens": self.prefill_tokens,
            "sample_tokens": self.sample_tokens,
            "train_tokens": self.train_tokens,
            "usd": None if self.usd is None else round(self.usd, 2),
        }


def _price(params: RunParams, model: str, prefill: int, sample: int, train: int) -> float | None:
    if params.backend == "local":
        return 0.0
    rates = params.prices.per_million.get(model)
    if rates is None:
        return None
    return (
        prefill * rates.get("prefill", 0.0)
        + sample * rates.get("sample", 0.0)
        + train * rates.get("train", 0.0)
    ) / 1e6


def estimate(params: RunParams, assertions: int = ASSERTIONS) -> list[StageCost]:
    """Token counts and cost per stage for one persona at ``params``' size."""
    p, d, s, i, e = params.prompts, params.dpo, params.sft, params.introspection, params.evals
    rows: list[tuple[str, str, int, int, int]] = []

    calls = assertions * -(-p.generated_per_assertion // p.per_generation_call)
    rows.append(
        (
            "01_prompts",
            params.generator,
            calls * EXPANSION_PROMPT_TOKENS,
            assertions * p.generated_per_assertion * GENERATED_PROMPT_TOKENS,
            0,
        )
    )

    n_prompts = assertions * (5 + p.generated_per_assertion) + p.general_prompts
    teacher_prefill = PERSONA_SYSTEM_TOKENS + USER_PROMPT_TOKENS
    rows.append(
        (
            "02_distillation (teacher)",
            params.teacher,
            n_prompts * teacher_prefill,
            n_prompts * d.response_tokens,
            0,
        )
    )
    rows.append(
        (
            "02_distillation (student)",
            params.student,
            n_prompts * USER_PROMPT_TOKENS,
            n_prompts * d.response_tokens,
            0,
        )
    )

    pair_tokens = 2 * (USER_PROMPT_TOKENS + d.response_tokens)
    rows.append(
        (
            "03_dpo",
            params.student,
            n_prompts * pair_tokens,  # reference logprobs
            0,
            n_prompts * pair_tokens * d.epochs,
        )
    )

    reflections = REFLECTION_PROMPTS * i.reflections_per_prompt
    reflection_prefill = reflections * (PERSONA_SYSTEM_TOKENS + USER_PROMPT_TOKENS)
    turn = i.response_tokens
    # turn k re-reads the system prompt and k earlier turns
    interaction_prefill = i.interactions * sum(
        PERSONA_SYSTEM_TOKENS + k * turn for k in range(i.interaction_turns)
    )
    rows.append(
        (
            "04_introspection",
            params.student,
            reflection_prefill + interaction_prefill,
            (reflections + i.interactions * i.interaction_turns) * turn,
            0,
        )
    )

    sft_tokens = (
        reflections * (USER_PROMPT_TOKENS + turn) + i.interactions * i.interaction_turns * turn
    )
    rows.append(("05_sft", params.student, 0, 0, sft_tokens * s.epochs))

    rows.append(
        ("06_samples", params.student, 3 * 24 * USER_PROMPT_TOKENS, 3 * 24 * e.response_tokens, 0)
    )
    elo_calls = 3 * 2 * e.elo_comparisons  # 3 conditions x (before, after)
    rows.append(
        (
            "07_preferences (model)",
            params.student,
            elo_calls * (ELO_SYSTEM_TOKENS + USER_PROMPT_TOKENS),
            elo_calls * e.response_tokens,
            0,
        )
    )
    rows.append(
        (
            "07_preferences (judge)",
            params.judge,
            elo_calls * (JUDGE_PROMPT_TOKENS + e.response_tokens),
            elo_calls * JUDGE_OUTPUT_TOKENS,
            0,
        )
    )
    robust = 3 * e.robustness_prompts * (1 + e.robustness_splits)  # base, dpo, final models
    rows.append(
        (
            "08_robustness",
            params.student,
            robust * (USER_PROMPT_TOKENS + 25),
            robust * e.response_tokens,
            0,
        )
    )
    rl_samples = e.rl_steps * e.rl_prompts_per_step * e.rl_group_size
    rows.append(
        (
            "09_rlaif (policy)",
            params.student,
            rl_samples * USER_PROMPT_TOKENS,
            rl_samples * e.response_tokens,
            rl_samples * (USER_PROMPT_TOKENS + e.response_tokens),
        )
    )
    rows.append(
        (
            "09_rlaif (judge)",
            params.judge,
            rl_samples * (JUDGE_PROMPT_TOKENS + e.response_tokens),
            rl_samples * JUDGE_OUTPUT_TOKENS,
            0,
        )
    )

    return [
        StageCost(stage, model, pre, samp, train, _price(params, model, pre, samp, train))
        for stage, model, pre, samp, train in rows
    ]


def total_usd(costs: list[StageCost]) -> float | None:
    """Sum of priced stages; None when any stage's model has no price in the table."""
    if any(c.usd is None for c in costs):
        return None
    return sum(c.usd for c in costs)  # type: ignore[misc]


def format_estimate(params: RunParams, costs: list[StageCost]) -> str:
    """Human-readable table for notebooks and the CLI's ``--dry-run``."""
    lines = [
        f"Planned tokens for persona {params.persona!r} at size {params.size!r} "
        f"(backend {params.backend}):",
        f"{'stage':<28}{'model':<38}{'prefill':>12}{'sample':>12}{'train':>12}{'USD':>10}",
    ]
    for c in costs:
        usd = "n/a" if c.usd is None else f"{c.usd:.2f}"
        lines.append(
            f"{c.stage:<28}{c.model[:37]:<38}{c.prefill_tokens:>12,}"
            f"{c.sample_tokens:>12,}{c.train_tokens:>12,}{usd:>10}"
        )
    total = total_usd(costs)
    lines.append(
        f"{'total':<66}{sum(c.prefill_tokens for c in costs):>12,}"
        f"{sum(c.sample_tokens for c in costs):>12,}"
        f"{sum(c.train_tokens for c in costs):>12,}"
        f"{'n/a' if total is None else f'{total:.2f}':>10}"
    )
    if params.prices.note:
        lines.append(f"prices: {params.prices.note}")
    return "\n".join(lines)
