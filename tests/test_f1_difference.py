"""The paired F1 difference of stage 08 (trained minus system-prompted), issue 16 items 5/9.

Both sides are scored against the same base replies on the same held-out prompts, so the
difference resamples the prompts once for both. Checked on synthetic predictions with a known
truth: a classifier equally good on both methods gives an interval around 0 at about the
nominal rate, and a real gap is found.
"""

from __future__ import annotations

import numpy as np
from character_training.evaluate import robustness as rob


def rows(method_class: str, accuracy: float, prompts: int, rng) -> list[tuple[str, str, str]]:
    """One method reply and one base reply per prompt, each classified right with
    ``accuracy`` (base replies at 0.8)."""
    out = []
    for i in range(prompts):
        p = f"p{i}"
        right = rng.random() < accuracy
        out.append((p, method_class, method_class if right else "base"))
        out.append((p, "base", "base" if rng.random() < 0.8 else method_class))
    return out


def test_equal_classifiers_give_an_interval_around_zero_at_its_nominal_rate():
    rng = np.random.default_rng(0)
    excluded = 0
    for _ in range(60):
        a, b = rows("sycophantic", 0.7, 40, rng), rows("sycophantic", 0.7, 40, rng)
        diff = rob.paired_macro_f1_difference(a, b, 400, int(rng.integers(1 << 31)))
        excluded += diff.low > 0 or diff.high < 0
    assert excluded / 60 <= 0.12


def test_a_real_gap_is_found_and_the_point_is_the_difference_of_the_f1s():
    rng = np.random.default_rng(1)
    a, b = rows("sycophantic", 0.95, 60, rng), rows("sycophantic", 0.4, 60, rng)
    diff = rob.paired_macro_f1_difference(a, b, 400, 3)
    expected = rob.macro_f1([r[1] for r in a], [r[2] for r in a]) - rob.macro_f1(
        [r[1] for r in b], [r[2] for r in b]
    )
    assert diff.value == expected
    assert diff.low > 0


def test_few_prompts_get_a_jackknife_t_interval_that_keeps_its_level():
    """BCa over the tiny preset's 6 held-out prompts covered the true F1 difference 0.86 of the
    time; below 30 prompts the difference now takes a jackknife-t interval. Checked on stage
    08's design as `calibrate` simulates it (8 adversarial splits, base replies shared by both
    models, a prompt difficulty shared by both): at no effect and at a real one."""
    from character_training.calibration.harness import calibrate_case
    from character_training.calibration.reply_cases import f1_difference_case

    rng = np.random.default_rng(4)
    a, b = rows("sycophantic", 0.9, 6, rng), rows("sycophantic", 0.5, 6, rng)
    diff = rob.paired_macro_f1_difference(a, b, 400, 3)
    assert diff.method == "jackknife-t" and diff.low < diff.value < diff.high
    row = calibrate_case(f1_difference_case(6, 100, splits=8), reps=400, seed=11)
    assert row.false_positive_rate <= 0.07
    assert row.coverage >= 0.92
    assert 0.05 < row.detectable_effect < 0.4


def test_method_differences_keep_the_model_name_and_say_how_the_interval_was_made():
    """The estimate's own ``method`` ("BCa", "jackknife-t") used to overwrite the model's name,
    so the headline key read ``f1_diff_BCa_...`` and the summary never found final's row."""
    rng = np.random.default_rng(5)
    sets = {
        ("final", rob.NONE_SPLIT): rows("sycophantic", 0.9, 8, rng),
        (rob.SYSTEM_PROMPT, rob.NONE_SPLIT): rows("sycophantic", 0.6, 8, rng),
    }
    summaries = [rob.MethodSummary(m, None, None, None) for m in (rob.SYSTEM_PROMPT, "final")]
    (diff,) = rob.method_differences(sets, summaries, [], 200, 1)
    assert (diff["method"], diff["reference"], diff["field"]) == (
        "final",
        rob.SYSTEM_PROMPT,
        "no_instruction",
    )
    assert diff["interval"] == "jackknife-t" and diff["low"] < diff["value"] < diff["high"]
