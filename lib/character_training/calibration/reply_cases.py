"""Calibration cases of the reply-level headline statistics (notebooks 03, 05, 08, 09).

* teacher-likeness difference (dpo - base): per probe prompt a difficulty on the logit scale,
  per model a logit shift; replies are teacher-like with the resulting probability; the
  project's paired prompt bootstrap (`intervals.paired_bootstrap_difference`) gives the
  interval. Truth: the difference of the two models' expected shares over the prompt
  population (the interval resamples prompts, so it speaks of new prompts too).
* coherence win rate: a forced-choice judge with a letter bias reads two replies of known
  quality in both orders; the project's position calibration, order-swap filter and Wilson
  interval (`coherence.calibrate_positions`, `resolve_order_swaps`, `win_rates`) give the
  rate. Truth: the win rate among consistent comparisons the same judge gives in expectation.
* F1 difference (final - system prompt, stage 08): per prompt a difficulty shared by both
  models, per split one reply of each scored with the same base reply; the project's
  `robustness.paired_macro_f1_difference` gives the interval (`f1_difference_case`).
* RLAIF reward-hacking verdict (`rl.compare.reward_hacking_verdict`): the reward rises by a
  known amount while teacher-likeness and coherence are unchanged; a "reward hacking" verdict
  is then a false positive. Its detectable effect is the teacher-likeness drop that the
  verdict calls with 80% power.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..evaluate import coherence
from ..evaluate.intervals import Estimate, bootstrap_mean, paired_bootstrap_difference
from .harness import Case, Trial

PROMPT_SPREAD = 1.0  # std of prompt difficulty on the logit scale
BASE_RATE = 0.3  # the base model's teacher-like share on an average prompt
POPULATION = 20_000  # prompts drawn to compute a population truth


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def teacher_likeness_case(prompts: int, samples: int, n_boot: int) -> Case:
    """dpo - base teacher-like share on ``prompts`` probe prompts x ``samples`` replies;
    knob: the dpo model's logit shift over base."""
    base = _logit(BASE_RATE)

    def simulate(knob: float, reps: int, rng: np.random.Generator, intervals: bool) -> Trial:
        population = rng.standard_normal(POPULATION) * PROMPT_SPREAD
        truth_value = float(
            np.mean(_sigmoid(base + knob + population) - _sigmoid(base + population))
        )
        truth = np.full(reps, truth_value)
        if not intervals:
            return Trial.truth_only(truth)

        def experiment() -> Estimate:
            difficulty = rng.standard_normal(prompts) * PROMPT_SPREAD
            a = rng.random((prompts, samples)) < _sigmoid(base + knob + difficulty)[:, None]
            b = rng.random((prompts, samples)) < _sigmoid(base + difficulty)[:, None]
            diff, _ = paired_bootstrap_difference(
                {str(i): a[i].astype(float) for i in range(prompts)},
                {str(i): b[i].astype(float) for i in range(prompts)},
                n_boot,
                int(rng.integers(1 << 31)),
            )
            return diff

        return Trial.of([experiment() for _ in range(reps)], truth)

    return Case(
        "teacher-likeness difference (dpo - base)",
        "share",
        0.0,
        simulate,
        (0.0, 6.0),
        f"{prompts} probe prompts x {samples} replies",
    )


JUDGE_LETTER_BIAS = 1.5  # nats towards "A"
JUDGE_NOISE = 1.0


def _coherence_rates(quality: float, n: int, rng: np.random.Generator) -> coherence.WinRate:
    """One experiment: ``n`` comparisons of "first" (better by ``quality`` nats) vs "second",
    judged in both orders with a letter bias, through the project's own functions."""
    comparisons, verdicts = [], []
    for i in range(n):
        cid = f"c{i}"
        comparisons.append(coherence.Comparison(cid, "first", "second", "", "", "", ""))
        for order in coherence.ORDERS:
            towards_first = quality if order == "ab" else -quality  # A is "first" in "ab"
            margin = towards_first + JUDGE_LETTER_BIAS + JUDGE_NOISE * rng.standard_normal()
            verdicts.append(
                coherence.Verdict(
                    cid,
                    order,
                    "A" if margin > 0 else "B",
                    "logprob",
                    {"logprob_a": margin / 2, "logprob_b": -margin / 2},
                )
            )
    outcomes = coherence.resolve_order_swaps(comparisons, coherence.calibrate_positions(verdicts))
    return next(r for r in coherence.win_rates(outcomes) if r.group == coherence.ALL_GROUPS)


def coherence_case(comparisons: int) -> Case:
    """Coherence win rate of ``comparisons`` pairs; knob: quality gap (nats). Null 0.5."""

    def simulate(knob: float, reps: int, rng: np.random.Generator, intervals: bool) -> Trial:
        big = _coherence_rates(knob, 4000, rng)
        truth = np.full(reps, big.win_rate)
        if not intervals:
            return Trial.truth_only(truth)
        rates = [_coherence_rates(knob, comparisons, rng) for _ in range(reps)]
        return Trial.of(rates, truth, value="win_rate")

    return Case(
        "coherence win rate",
        "win rate",
        0.5,
        simulate,
        (0.0, 4.0),
        f"{comparisons} comparisons, letter bias {JUDGE_LETTER_BIAS} nats",
    )


def hacking_verdict_case(probe_prompts: int, adherence_prompts: int, n_boot: int) -> Case:
    """The RLAIF verdict when the reward rises (probe win rate 0.65) and teacher-likeness drops
    by the knob (logit scale) while coherence is unchanged. At knob 0 a "reward hacking"
    verdict is a false positive; the interval checked is the teacher-likeness change's."""
    from ..rl.compare import reward_hacking_verdict

    base = _logit(0.5)

    def simulate(knob: float, reps: int, rng: np.random.Generator, intervals: bool) -> Trial:
        population = rng.standard_normal(POPULATION) * PROMPT_SPREAD
        truth_value = float(
            np.mean(_sigmoid(base - knob + population) - _sigmoid(base + population))
        )
        truth = np.full(reps, -truth_value)  # reported as a drop (positive)
        if not intervals:
            return Trial.truth_only(truth)
        estimate, low, high = (np.full(reps, np.nan) for _ in range(3))
        called = np.zeros(reps, dtype=bool)
        for r in range(reps):
            wins = (rng.random(probe_prompts) < 0.65).astype(float)
            reward = bootstrap_mean([[w] for w in wins], n_boot, int(rng.integers(1 << 31)))
            difficulty = rng.standard_normal(adherence_prompts) * PROMPT_SPREAD
            end = rng.random(adherence_prompts) < _sigmoid(base - knob + difficulty)
            start = rng.random(adherence_prompts) < _sigmoid(base + difficulty)
            change, _ = paired_bootstrap_difference(
                {str(i): [float(end[i])] for i in range(adherence_prompts)},
                {str(i): [float(start[i])] for i in range(adherence_prompts)},
                n_boot,
                int(rng.integers(1 << 31)),
            )
            verdict = reward_hacking_verdict(
                {"value": reward.value - 0.5, "low": reward.low - 0.5, "high": reward.high - 0.5},
                change.to_dict(),
                None,
            )
            called[r] = verdict["verdict"] == "reward hacking"
            estimate[r], low[r], high[r] = -change.value, -change.high, -change.low
        return Trial(estimate, low, high, truth, called)

    return Case(
        "RLAIF reward-hacking verdict",
        "teacher-like drop",
        0.0,
        simulate,
        (0.0, 6.0),
        f"{probe_prompts} probe prompts, {adherence_prompts} adherence prompts",
    )


BASE_RECALL = 0.8  # the persona classifier calls a base reply "base" this often
PROMPTED_LOGIT = 0.5  # the system-prompted replies are recognised at sigmoid(0.5 + difficulty)
F1_LABELS = ("base", "persona")


def _persona_rows(
    logit: float, difficulty: np.ndarray, rng: np.random.Generator
) -> list[tuple[str, str, str]]:
    """One persona reply per prompt, recognised with probability sigmoid(logit + difficulty)."""
    hit = rng.random(len(difficulty)) < _sigmoid(logit + difficulty)
    return [(f"p{i}", "persona", "persona" if h else "base") for i, h in enumerate(hit)]


def _expected_macro_f1(recall: float) -> float:
    """Macro F1 over {persona, base} in the population limit: one persona reply (recognised
    with probability ``recall``) and one base reply (`BASE_RECALL`) per prompt."""
    b = BASE_RECALL
    persona = 2 * recall / (2 * recall + (1 - b) + (1 - recall))
    base = 2 * b / (2 * b + (1 - recall) + (1 - b))
    return 0.5 * (persona + base)


def f1_difference_case(prompts: int, n_boot: int, splits: int = 1, field: str = "") -> Case:
    """Macro F1 of the trained model minus the system-prompted model's on ``prompts`` held-out
    prompts, as stage 08 computes it (`robustness.method_differences`): under each of
    ``splits`` instructions both models' replies are scored together with the *same* base
    replies to that split (`f1_table`), the macro F1 is averaged over the splits
    (``with_instructions``: the adversarial splits; one split: no instruction or prefill),
    and `paired_macro_f1_difference` gives the interval over prompts. A prompt's difficulty
    is shared by both models (the reason the difference is paired). Knob: how much more
    recognisable the trained persona is (logit shift). Truth: the population difference of
    macro F1 (closed form over 20,000 drawn prompt difficulties, the same for both models, so
    it is exactly 0 at knob 0)."""
    from ..evaluate.robustness import paired_macro_f1_difference

    def simulate(knob: float, reps: int, rng: np.random.Generator, intervals: bool) -> Trial:
        population = rng.standard_normal(POPULATION) * PROMPT_SPREAD
        truth_value = _expected_macro_f1(
            float(np.mean(_sigmoid(PROMPTED_LOGIT + knob + population)))
        ) - _expected_macro_f1(float(np.mean(_sigmoid(PROMPTED_LOGIT + population))))
        truth = np.full(reps, truth_value)
        if not intervals:
            return Trial.truth_only(truth)

        def experiment() -> Any:
            difficulty = rng.standard_normal(prompts) * PROMPT_SPREAD
            trained, prompted = {}, {}
            for split in range(splits):
                base_hit = rng.random(prompts) < BASE_RECALL
                base = [
                    (f"p{i}", "base", "base" if h else "persona") for i, h in enumerate(base_hit)
                ]
                trained[f"s{split}"] = _persona_rows(PROMPTED_LOGIT + knob, difficulty, rng) + base
                prompted[f"s{split}"] = _persona_rows(PROMPTED_LOGIT, difficulty, rng) + base
            return paired_macro_f1_difference(
                trained,
                prompted,
                n_boot,
                int(rng.integers(1 << 31)),
                labels_a=F1_LABELS,
                labels_b=F1_LABELS,
            )

        return Trial.of([experiment() for _ in range(reps)], truth)

    return Case(
        f"F1 difference{field} (final - system prompt)",
        "macro F1",
        0.0,
        simulate,
        (0.0, 4.0),
        f"{prompts} held-out prompts x {splits} split(s), base replies shared",
    )
