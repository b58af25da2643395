"""How the adherence classifier's AUC grows with the number of classifier prompts.

Why: when the head cannot tell the teacher's replies from the student's (AUC near 0.5), the
reader needs to know whether more data would fix it or whether the two models simply write
alike. Refitting the same head on nested subsets of the classifier prompts and validating every
fit on the same probe prompts answers that for the cost of a few logistic fits (the sentence
vectors are already computed): a curve still climbing at the full size asks for more prompts,
a flat one near 0.5 says the teacher's persona is not visible at this model size.

Subsets are drawn by prompt, not by reply, so a prompt's teacher and student replies enter
together (the head never learns a prompt's topic as a class cue), and each size below the full
set is averaged over several seeded draws to smooth the luck of one subset.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError
from ..field_dict import FieldDict
from .heldout import HeldoutPrompt
from .sentence_encoder import SentenceEncoder, embed_texts
from .teacher_classifier import fit_logistic, roc_auc

CURVE_FRACTIONS = (0.25, 0.5, 0.75, 1.0)  # shares of the classifier prompts refitted on
CURVE_DRAWS = 5  # seeded prompt subsets averaged per share below 1


@dataclass(frozen=True)
class CurvePoint(FieldDict):
    """The head refitted on ``prompts`` classifier prompts (``replies`` replies): its probe AUC,
    the mean over ``draws`` prompt subsets (one draw at the full set)."""

    prompts: int
    replies: int
    auc: float
    draws: int


def auc_learning_curve(
    train_x: np.ndarray,
    train_y: np.ndarray,
    train_prompts: Sequence[str],
    val_x: np.ndarray,
    val_y: np.ndarray,
    l2: float,
    seed: int,
    fractions: Sequence[float] = CURVE_FRACTIONS,
    draws: int = CURVE_DRAWS,
) -> list[CurvePoint]:
    """Probe AUC of heads fitted on growing shares of the classifier prompts.

    ``train_x`` rows are replies (label 1 teacher, 0 student) of the prompts named in
    ``train_prompts``; ``val_x``/``val_y`` are the probe replies every fit is scored on. A
    share whose draw lacks one class is skipped for that draw; a share with no usable draw is
    left out of the curve.
    """
    train_x, train_y = np.asarray(train_x), np.asarray(train_y, dtype=np.float64)
    val_x, val_y = np.asarray(val_x), np.asarray(val_y, dtype=np.float64)
    prompt_of = np.asarray(list(train_prompts))
    if not (len(train_x) == len(train_y) == len(prompt_of)) or len(val_x) != len(val_y):
        raise DataError(
            f"learning curve: expected one label and prompt per reply, got {len(train_x)} "
            f"replies, {len(train_y)} labels, {len(prompt_of)} prompts; {len(val_x)} probe "
            f"replies, {len(val_y)} probe labels"
        )
    if len(set(val_y.tolist())) < 2:
        raise DataError("learning curve: the probe replies need both teacher and student")
    prompts = list(dict.fromkeys(prompt_of.tolist()))
    rng = np.random.default_rng(seed)
    orders = [rng.permutation(len(prompts)) for _ in range(max(1, draws))]
    points: list[CurvePoint] = []
    for fraction in sorted(set(fractions)):
        size = max(1, math.ceil(fraction * len(prompts)))
        chosen_orders = orders[:1] if size == len(prompts) else orders
        aucs, replies = [], 0
        for order in chosen_orders:
            keep = np.isin(prompt_of, [prompts[i] for i in order[:size]])
            labels = train_y[keep]
            if labels.min() == labels.max():
                continue
            head = fit_logistic(train_x[keep], labels, l2)
            aucs.append(roc_auc(head.predict_proba(val_x), val_y))
            replies = int(keep.sum())
        if aucs:
            points.append(CurvePoint(size, replies, float(np.mean(aucs)), len(aucs)))
    return points


def heldout_curve(
    encoder: SentenceEncoder,
    classifier_prompts: Sequence[HeldoutPrompt],
    reference_vectors: np.ndarray,
    reference_is_teacher: Sequence[bool],
    fit: tuple[float, int],
    cache_dir: Path | None = None,
) -> tuple[dict[str, Any], ...]:
    """`auc_learning_curve` of the adherence head: fitted on the classifier prompts' kept
    replies, scored on the references' probe replies as `validate` scores the full head.
    Teacher replies come before student replies, as in `train_teacher_head`, so the full-size
    point is the reported head's own AUC. ``fit`` is (l2, seed); records, for JSON."""
    teacher = [(h.prompt_id, h.teacher_reply) for h in classifier_prompts if h.teacher_reply]
    student = [(h.prompt_id, h.student_reply) for h in classifier_prompts if h.student_reply]
    l2, seed = fit
    points = auc_learning_curve(
        embed_texts(encoder, [text for _, text in teacher + student], cache_dir),
        np.r_[np.ones(len(teacher)), np.zeros(len(student))],
        [prompt_id for prompt_id, _ in teacher + student],
        reference_vectors,
        np.asarray(reference_is_teacher, dtype=np.float64),
        l2,
        seed,
    )
    return tuple(point.to_dict() for point in points)


def auc_gain_per_doubling(points: Sequence[CurvePoint]) -> float:
    """Least-squares slope of AUC against log2(prompts): how much a doubling of the
    classifier prompts added over the measured range (NaN with fewer than two sizes)."""
    if len({p.prompts for p in points}) < 2:
        return math.nan
    x = np.log2([p.prompts for p in points])
    y = np.array([p.auc for p in points])
    return float(np.polyfit(x, y, 1)[0])


def curve_text(points: Sequence[CurvePoint]) -> str:
    """One line for a report: AUC at each size and the gain per doubling."""
    if not points:
        return "learning curve: not enough classifier prompts to refit on subsets"
    steps = ", ".join(f"{p.prompts} prompts {p.auc:.2f}" for p in points)
    gain = auc_gain_per_doubling(points)
    gain = 0.0 if abs(gain) < 5e-4 else gain  # a flat curve reads +0.000, not -0.000
    tail = "" if math.isnan(gain) else f"; {gain:+.3f} AUC per doubling of the prompts"
    return f"learning curve (probe AUC by classifier prompts): {steps}{tail}"
