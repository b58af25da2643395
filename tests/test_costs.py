"""Dry-run estimate: token counts follow the parameters and prices multiply them exactly.

Also pins what the June 2026 model retirement taught: a price is only as good as its date, so
the dry-run prints the table's date and source and names any model it has no price for.
"""

from __future__ import annotations

from character_training.config import load_params, with_overrides
from character_training.costs import (
    CHARS_PER_TOKEN,
    EXPANSION_PROMPT_TOKENS,
    GENERATED_PROMPT_TOKENS,
    TEACHER_REASONING_TOKENS,
    USER_PROMPT_TOKENS,
    Lengths,
    dry_run_report,
    estimate,
    format_estimate,
    measured_lengths,
    total_usd,
)
from character_training.store import write_jsonl


def _row(costs, stage):
    return next(c for c in costs if c.stage == stage)


def test_local_runs_cost_nothing_but_still_count_tokens():
    costs = estimate(load_params("tiny", "sarcastic"))
    assert total_usd(costs) == 0.0
    assert sum(c.sample_tokens for c in costs) > 0 and _row(costs, "03_dpo").train_tokens > 0


def test_prompt_generation_tokens_follow_the_call_plan():
    params = with_overrides(
        load_params("qwen3.5-9b", "sarcastic"),
        {"prompts.generated_per_assertion": 45, "prompts.per_generation_call": 15},
    )
    row = _row(estimate(params, assertions=10), "01_prompts")
    assert row.prefill_tokens == 10 * 3 * EXPANSION_PROMPT_TOKENS
    assert row.sample_tokens == 10 * 45 * GENERATED_PROMPT_TOKENS


def test_price_is_tokens_times_the_per_million_rates():
    params = with_overrides(
        load_params("qwen3.5-9b", "sarcastic"),
        {
            "prices.per_million": {
                "Qwen/Qwen3.5-9B": {"prefill": 1.0, "sample": 2.0, "train": 3.0},
            }
        },
    )
    sft = _row(estimate(params), "05_sft")
    assert sft.usd == sft.train_tokens * 3.0 / 1e6
    dpo = _row(estimate(params), "03_dpo")
    assert abs(dpo.usd - (dpo.prefill_tokens * 1.0 + dpo.train_tokens * 3.0) / 1e6) < 1e-9


def test_a_model_missing_from_the_price_table_makes_the_total_unknown_not_zero():
    params = with_overrides(
        load_params("qwen3.5-9b", "sarcastic"), {"teacher": "org/unpriced-model"}
    )
    costs = estimate(params)
    assert total_usd(costs) is None
    text = format_estimate(params, costs)
    assert "n/a" in text
    assert (
        "price unknown: org/unpriced-model (teacher) is not in the price table as of 2026-06-26"
        in text
    )


def test_doubling_the_dpo_epochs_doubles_dpo_training_tokens():
    base = load_params("qwen3.5-9b", "sarcastic")
    one = _row(estimate(base), "03_dpo").train_tokens
    two = _row(estimate(with_overrides(base, {"dpo.epochs": 2})), "03_dpo").train_tokens
    assert two == 2 * one


def test_dry_run_prints_the_date_and_source_of_its_prices(capsys):
    from character_training.cli import main

    assert main(["dry-run", "--persona", "sycophantic", "--size", "qwen3.5-9b"]) == 0
    out = capsys.readouterr().out
    assert "prices: USD per million tokens as of 2026-06-26, from tinker-cost 0.1.0 on PyPI" in out
    assert "params/prices/tinker.yaml" in out
    assert "price unknown" not in out and "n/a" not in out


def test_local_dry_run_says_it_is_free_and_undated_prices_are_flagged():
    tiny = load_params("tiny", "sarcastic")
    assert "prices: local backend, no charge" in format_estimate(tiny, estimate(tiny))
    bare = with_overrides(
        load_params("qwen3.5-9b", "sarcastic"), {"prices.as_of": "", "prices.source": ""}
    )
    assert "undated and without a source" in format_estimate(bare, estimate(bare))


def test_a_thinking_teacher_is_billed_for_its_reasoning():
    thinking = load_params("qwen3.5-9b", "sarcastic")
    plain = with_overrides(thinking, {"teacher_thinking": False})
    extra = (
        _row(estimate(thinking), "02_distillation (teacher)").sample_tokens
        - _row(estimate(plain), "02_distillation (teacher)").sample_tokens
    )
    n_prompts = (
        10 * (5 + thinking.prompts.generated_per_assertion) + thinking.prompts.general_prompts
    )
    assert extra == n_prompts * TEACHER_REASONING_TOKENS


def test_measured_prompt_lengths_from_the_tiny_run_replace_the_planning_constant(tmp_path):
    params = with_overrides(load_params("qwen3.5-9b", "sarcastic"), {"runs_dir": str(tmp_path)})
    assert measured_lengths(params) == Lengths()  # nothing measured yet
    stage = tmp_path / "sarcastic" / "tiny" / "01_prompts"
    stage.mkdir(parents=True)
    write_jsonl(stage / "constitution_prompts.jsonl", [{"prompt": "x" * 80}, {"prompt": "y" * 40}])
    write_jsonl(stage / "general_train.jsonl", [{"prompt": "z" * 120}])
    lengths = measured_lengths(params)
    assert lengths.user_prompt_tokens == round(80 / CHARS_PER_TOKEN)
    assert "measured: mean of 3 prompts" in lengths.source
    planned = _row(estimate(params), "02_distillation (student)").prefill_tokens
    measured = _row(estimate(params, lengths=lengths), "02_distillation (student)").prefill_tokens
    assert measured == planned * lengths.user_prompt_tokens // USER_PROMPT_TOKENS
    assert "user prompt length: 20 tokens (measured" in dry_run_report(params)


def test_preference_stage_counts_follow_models_conditions_and_judge_modes():
    """Stage 07 as it runs: three models answer every match of every condition; the judge
    reads each reply once per mode (forced choice: two trait words) plus one empty-reply prior
    per match; dropping a mode or a condition drops exactly its share."""
    from character_training.costs import ELO_SYSTEM_TOKENS, JUDGE_PROMPT_TOKENS

    overrides = {
        "evals.elo_comparisons": 100,
        "evals.elo_conditions": ["adopt", "random"],
        "evals.elo_response_tokens": 50,
        "evals.judge_max_tokens": 10,
        "evals.judge_modes": ["logprob", "generative"],
    }
    params = with_overrides(load_params("qwen3.5-9b", "sarcastic"), overrides)
    costs = estimate(params, lengths=Lengths(user_prompt_tokens=40))
    model, judge = _row(costs, "07_preferences (model)"), _row(costs, "07_preferences (judge)")
    replies = 3 * 2 * 100
    assert (model.prefill_tokens, model.sample_tokens) == (
        replies * (ELO_SYSTEM_TOKENS + 40),
        replies * 50,
    )
    read = JUDGE_PROMPT_TOKENS + 50
    assert (
        judge.prefill_tokens == replies * read + 2 * replies * read + 2 * 200 * JUDGE_PROMPT_TOKENS
    )
    assert judge.sample_tokens == replies * 10
    only_logprob = with_overrides(params, {"evals.judge_modes": ["logprob"]})
    judge = _row(estimate(only_logprob), "07_preferences (judge)")
    assert (
        judge.sample_tokens == 0
        and judge.prefill_tokens == 2 * replies * read + 400 * JUDGE_PROMPT_TOKENS
    )


def test_rlaif_signal_counts_every_matchup_in_both_orders():
    overrides = {
        "evals.rl_steps": 10,
        "evals.rl_prompts_per_step": 4,
        "evals.rl_group_size": 4,
        "rl.response_tokens": 100,
        "rl.matchups_per_group": 0,
        "rl.signal": "judge",
    }
    params = with_overrides(load_params("qwen3.5-9b", "sarcastic"), overrides)
    from character_training.costs import JUDGE_PROMPT_TOKENS

    signal = _row(estimate(params), "09_rlaif (signal)")
    # 6 matchups per group of 4, both orders, two letters scored per order
    assert signal.prefill_tokens == 2 * (10 * 4 * 6 * 2) * (JUDGE_PROMPT_TOKENS + 200)
    assert signal.train_tokens == 0
    trained = with_overrides(params, {"rl.signal": "preference_model"})
    assert _row(estimate(trained), "09_rlaif (signal)").train_tokens > 0
    policy = _row(estimate(params), "09_rlaif (policy)")
    assert policy.sample_tokens == 10 * 4 * 4 * 100
