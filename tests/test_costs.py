"""Dry-run estimate: token counts follow the parameters and prices multiply them exactly."""

from __future__ import annotations

from character_training.config import load_params, with_overrides
from character_training.costs import (
    EXPANSION_PROMPT_TOKENS,
    GENERATED_PROMPT_TOKENS,
    estimate,
    format_estimate,
    total_usd,
)


def _row(costs, stage):
    return next(c for c in costs if c.stage == stage)


def test_local_runs_cost_nothing_but_still_count_tokens():
    costs = estimate(load_params("tiny", "sarcastic"))
    assert total_usd(costs) == 0.0
    assert sum(c.sample_tokens for c in costs) > 0 and _row(costs, "03_dpo").train_tokens > 0


def test_prompt_generation_tokens_follow_the_call_plan():
    params = with_overrides(
        load_params("8b", "sarcastic"),
        {"prompts.generated_per_assertion": 45, "prompts.per_generation_call": 15},
    )
    row = _row(estimate(params, assertions=10), "01_prompts")
    assert row.prefill_tokens == 10 * 3 * EXPANSION_PROMPT_TOKENS
    assert row.sample_tokens == 10 * 45 * GENERATED_PROMPT_TOKENS


def test_price_is_tokens_times_the_per_million_rates():
    params = with_overrides(
        load_params("8b", "sarcastic"),
        {
            "prices.per_million": {
                "meta-llama/Llama-3.1-8B-Instruct": {"prefill": 1.0, "sample": 2.0, "train": 3.0},
                "meta-llama/Llama-3.3-70B-Instruct": {"prefill": 0, "sample": 0, "train": 0},
                "Qwen/Qwen3-235B-A22B-Instruct-2507": {"prefill": 0, "sample": 0, "train": 0},
            }
        },
    )
    sft = _row(estimate(params), "05_sft")
    assert sft.usd == sft.train_tokens * 3.0 / 1e6
    dpo = _row(estimate(params), "03_dpo")
    assert abs(dpo.usd - (dpo.prefill_tokens * 1.0 + dpo.train_tokens * 3.0) / 1e6) < 1e-9


def test_a_model_missing_from_the_price_table_makes_the_total_unknown_not_zero():
    params = with_overrides(load_params("8b", "sarcastic"), {"teacher": "org/unpriced-model"})
    costs = estimate(params)
    assert total_usd(costs) is None
    assert "n/a" in format_estimate(params, costs)


def test_doubling_the_dpo_epochs_doubles_dpo_training_tokens():
    base = load_params("8b", "sarcastic")
    one = _row(estimate(base), "03_dpo").train_tokens
    two = _row(estimate(with_overrides(base, {"dpo.epochs": 2})), "03_dpo").train_tokens
    assert two == 2 * one
