"""The adherence classifier's learning curve on synthetic replies with a known answer."""

from __future__ import annotations

import math

import numpy as np
import pytest
from character_training.errors import DataError
from character_training.evaluate.learning_curve import (
    CurvePoint,
    auc_gain_per_doubling,
    auc_learning_curve,
    curve_text,
)


def _replies(n_prompts: int, shift: float, seed: int, dim: int = 40):
    """Two replies per prompt (teacher 1, student 0); the teacher's vectors are moved by
    ``shift`` along the first axis, everything else is noise."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(2 * n_prompts, dim))
    y = np.tile([1.0, 0.0], n_prompts)
    x[y == 1, 0] += shift
    prompts = [f"p{i}" for i in range(n_prompts) for _ in range(2)]
    return x, y, prompts


def test_a_real_signal_climbs_and_noise_stays_at_chance():
    train_x, train_y, prompts = _replies(48, shift=1.0, seed=1)
    val_x, val_y, _ = _replies(200, shift=1.0, seed=2)
    curve = auc_learning_curve(train_x, train_y, prompts, val_x, val_y, l2=1.0, seed=0)
    assert [p.prompts for p in curve] == [12, 24, 36, 48]
    assert [p.replies for p in curve] == [24, 48, 72, 96]
    assert [p.draws for p in curve] == [5, 5, 5, 1]
    # The population AUC of a unit shift in one of 40 noisy axes is Phi(1/sqrt 2) = 0.76;
    # small fits reach less of it, the full set most of it.
    assert curve[0].auc < curve[-1].auc
    assert 0.62 < curve[-1].auc < 0.8
    assert auc_gain_per_doubling(curve) > 0.02

    noise_x, noise_y, noise_prompts = _replies(48, shift=0.0, seed=3)
    flat = auc_learning_curve(noise_x, noise_y, noise_prompts, val_x, val_y, l2=1.0, seed=0)
    assert all(abs(p.auc - 0.5) < 0.08 for p in flat)


def test_subsets_keep_both_replies_of_a_prompt_together():
    # Each prompt holds only one class: a subset of 1 prompt has one class and is skipped.
    x = np.arange(8, dtype=float).reshape(4, 2)
    y = np.array([1.0, 1.0, 0.0, 0.0])
    prompts = ["a", "a", "b", "b"]
    curve = auc_learning_curve(x, y, prompts, x, y, l2=1.0, seed=0, fractions=(0.5, 1.0))
    assert [p.prompts for p in curve] == [2]
    assert curve[0].replies == 4


def test_the_report_line_and_bad_input():
    points = [CurvePoint(6, 12, 0.52, 5), CurvePoint(12, 24, 0.58, 1)]
    assert curve_text(points) == (
        "learning curve (probe AUC by classifier prompts): 6 prompts 0.52, 12 prompts 0.58; "
        "+0.060 AUC per doubling of the prompts"
    )
    assert math.isnan(auc_gain_per_doubling(points[:1]))
    assert curve_text([]).startswith("learning curve: not enough")
    x = np.zeros((4, 2))
    with pytest.raises(DataError, match="one label and prompt per reply"):
        auc_learning_curve(x, np.ones(3), ["a"] * 4, x, np.array([0, 1, 0, 1]), 1.0, 0)
    with pytest.raises(DataError, match="need both teacher and student"):
        auc_learning_curve(x, np.array([0, 1, 0, 1]), list("aabb"), x, np.ones(4), 1.0, 0)


def test_the_report_says_when_the_teacher_replies_were_best_of_n():
    from character_training.evaluate.teacher_classifier import ClassifierSummary

    counts = dict.fromkeys(
        ["heldout_prompts", "classifier_prompts", "probe_prompts", "train_teacher"], 4
    )
    counts |= dict.fromkeys(["train_student", "val_teacher", "val_student"], 4)
    counts |= {"dropped_teacher": 0, "dropped_student": 0}
    rates = {"train_accuracy": 1.0, "val_accuracy": 0.5, "val_auc": 0.5}
    first = ClassifierSummary(encoder="minilm", l2=0.01, **counts, **rates)
    best = ClassifierSummary(encoder="minilm", l2=0.01, teacher_best_of=2, **counts, **rates)
    assert first.sampling_notes() == []
    assert best.sampling_notes() == [
        "teacher replies: best of 2 per prompt, ranked by MiniLM similarity to the "
        "constitution's assertions (stage 02), not by this classifier"
    ]
