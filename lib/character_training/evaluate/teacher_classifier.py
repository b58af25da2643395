"""The teacher-vs-student classifier of the adherence measure: a logistic head on frozen
sentence vectors, how it is trained, and how it is validated.

Why a linear head on a frozen encoder: the question is whether a reply *reads like* the
persona-prompted teacher's, on a scale every notebook (03, 05, 06, 08, 09) can recompute in
seconds. A ridge-penalised logistic regression on the 384 MiniLM numbers (`sentence_encoder`)
fits in milliseconds; a fully fine-tuned classifier (notebook 08's robustness classifier) is
worth its cost only where the question is whether *any* classifier can tell the two apart.

The head is trained on teacher (label 1) and student (label 0) replies to classifier prompts
and validated only on probe prompts (`adherence` makes the split), overall and per prompt
source, so no accuracy or AUC is reported on a prompt the head was fitted on. The AUC comes
with a prompt-level interval (`auc_interval`): when it includes 0.5 the head cannot tell the
two apart and `adherence` reports "no measurement" instead of shares that would read as "no
effect". A reply is teacher-like when the head gives it probability > `THRESHOLD`.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, DataError
from .intervals import Estimate, Measurement, bootstrap_groups, paired_bootstrap_difference
from .sentence_encoder import SentenceEncoder, embed_texts

logger = logging.getLogger(__name__)

THRESHOLD = 0.5  # p(teacher) above which a reply counts as teacher-like


@dataclass(frozen=True)
class LogisticHead:
    """p(teacher | x) = sigmoid(((x - mean) / scale) @ weights + bias).

    Features are standardised with the training set's mean and scale before the penalty
    applies, so ``l2`` means the same whatever the encoder's scale (unit vectors have tiny
    per-dimension spread). `direction` gives the boundary's normal in raw feature space.
    """

    weights: np.ndarray
    bias: float
    mean: np.ndarray
    scale: np.ndarray
    l2: float

    def decision(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        return ((x - self.mean) / self.scale) @ self.weights + self.bias

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        return _sigmoid(self.decision(x))

    @property
    def direction(self) -> np.ndarray:
        """Unit normal of the decision boundary in raw feature space."""
        raw = self.weights / self.scale
        return raw / max(float(np.linalg.norm(raw)), 1e-300)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with tmp.open("wb") as handle:
            np.savez(
                handle,
                weights=self.weights,
                bias=np.array(self.bias),
                mean=self.mean,
                scale=self.scale,
                l2=np.array(self.l2),
            )
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> "LogisticHead":
        with np.load(path) as data:
            return cls(
                data["weights"], float(data["bias"]), data["mean"], data["scale"], float(data["l2"])
            )


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return np.exp(-np.logaddexp(0.0, -z))


def fit_logistic(
    x: np.ndarray,
    y: np.ndarray,
    l2: float,
    *,
    balanced: bool = True,
    max_iter: int = 2000,
) -> LogisticHead:
    """Ridge-penalised logistic regression, fitted in float64 with L-BFGS (scipy).

    Minimises ``mean_i s_i * logloss_i + l2 / 2 * ||w||^2`` on standardised features; the bias is
    not penalised. ``balanced`` weights each class to half the total (``s_i = n / (2 n_class)``),
    so unequal drop counts between teacher and student do not move the 0.5 threshold. In
    scikit-learn's terms this is ``C = 1 / (l2 * n)`` with ``class_weight="balanced"``.
    """
    from scipy.optimize import minimize

    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64).ravel()
    if x.ndim != 2 or len(x) != len(y):
        raise DataError(f"expected x of shape (n, d) and y of shape (n,), got {x.shape}, {y.shape}")
    if not np.isin(y, (0.0, 1.0)).all():
        raise DataError("expected labels 0 (student) and 1 (teacher)")
    n_pos, n_neg = int(y.sum()), int(len(y) - y.sum())
    if n_pos == 0 or n_neg == 0:
        raise DataError(f"need both classes to fit, found {n_pos} positive and {n_neg} negative")
    if l2 < 0:
        raise ConfigError(f"l2={l2!r}: expected >= 0")
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale[scale < 1e-12] = 1.0
    z = (x - mean) / scale
    n, d = z.shape
    if balanced:
        sample = np.where(y == 1, n / (2 * n_pos), n / (2 * n_neg))
    else:
        sample = np.ones(n)
    sample = sample / n

    def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        w, b = theta[:d], theta[d]
        logits = z @ w + b
        loss = float(sample @ (np.logaddexp(0.0, logits) - y * logits) + 0.5 * l2 * (w @ w))
        residual = sample * (_sigmoid(logits) - y)
        grad = np.empty(d + 1)
        grad[:d] = z.T @ residual + l2 * w
        grad[d] = residual.sum()
        return loss, grad

    result = minimize(
        objective,
        np.zeros(d + 1),
        jac=True,
        method="L-BFGS-B",
        options={"maxiter": max_iter, "gtol": 1e-9, "ftol": 1e-14},
    )
    if not result.success and l2 > 0:
        logger.warning("logistic head: L-BFGS stopped early (%s)", result.message)
    return LogisticHead(result.x[:d].copy(), float(result.x[d]), mean, scale, float(l2))


def accuracy(probabilities: np.ndarray, labels: np.ndarray, threshold: float = THRESHOLD) -> float:
    """Share of items whose thresholded probability matches the 0/1 label."""
    probabilities, labels = np.asarray(probabilities), np.asarray(labels)
    if len(labels) == 0:
        return math.nan
    return float(np.mean((probabilities > threshold) == (labels == 1)))


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve: P(score of a random positive > a random negative), ties 1/2."""
    from scipy.stats import rankdata

    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels)
    n_pos = int((labels == 1).sum())
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = rankdata(scores)
    return float((ranks[labels == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def auc_interval(
    scores: np.ndarray,
    labels: np.ndarray,
    groups: Sequence[str],
    n_resamples: int,
    seed: int,
    level: float = 0.95,
) -> Estimate | None:
    """`roc_auc` with a BCa interval that resamples ``groups`` (prompts); None without both
    classes.

    A probe prompt holds a teacher and a student reply to the same question, so the two share
    the prompt's topic and length; resampling prompts keeps them together. The statistic is
    the weighted AUC: every (teacher, student) pair of replies counts with the product of its
    prompts' draw counts, ``sum_ij w_i w_j [s_i > s_j] (ties 1/2) / (sum_i w_i * sum_j w_j)``,
    computed for all resamples at once from one pair-comparison matrix. A resample without a
    teacher or without a student reply has no AUC; then the interval is the percentile one
    over the others (`intervals.bootstrap_groups`).
    """
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels)
    positive, negative = labels == 1, labels != 1
    if not positive.any() or not negative.any():
        return None
    index = {g: i for i, g in enumerate(dict.fromkeys(groups))}
    group_of = np.array([index[g] for g in groups])
    pos, neg = scores[positive], scores[negative]
    wins = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    pos_group, neg_group = group_of[positive], group_of[negative]

    def weighted_auc(weights: np.ndarray) -> np.ndarray:
        w_pos, w_neg = weights[:, pos_group], weights[:, neg_group]
        pairs = w_pos.sum(axis=1) * w_neg.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return ((w_pos @ wins) * w_neg).sum(axis=1) / pairs

    return bootstrap_groups(weighted_auc, len(index), n_resamples, seed, level)


# -- training and validation ---------------------------------------------------------------------
def train_teacher_head(
    encoder: SentenceEncoder,
    teacher_replies: Sequence[str],
    student_replies: Sequence[str],
    l2: float,
    cache_dir: Path | None = None,
) -> tuple[LogisticHead, float]:
    """The head fitted on embedded teacher (1) and student (0) replies, and its training
    accuracy. Vectors come from (and extend) the embedding cache in ``cache_dir``."""
    x = embed_texts(encoder, list(teacher_replies) + list(student_replies), cache_dir)
    y = np.r_[np.ones(len(teacher_replies)), np.zeros(len(student_replies))]
    head = fit_logistic(x, y, l2)
    return head, accuracy(head.predict_proba(x), y)


@dataclass(frozen=True)
class Validation:
    """How well the head separates teacher (1) from student (0) replies it was not fitted on.

    ``auc_interval``: the AUC with its prompt-level BCa interval (None without both classes);
    ``by_source``: per prompt source, the teacher and student counts, accuracy, AUC and its
    interval (``auc_low``, ``auc_high``; NaN without both classes).
    """

    accuracy: float
    auc: float
    by_source: dict[str, dict[str, float]]
    auc_interval: Estimate | None = None


def validate(
    probabilities: np.ndarray,
    labels: np.ndarray,
    sources: Sequence[str],
    prompt_ids: Sequence[str] | None = None,
    n_resamples: int = 1000,
    seed: int = 0,
) -> Validation:
    """Accuracy and AUC of ``probabilities`` against 0/1 ``labels``, overall and per source
    (sources in order of first appearance); with ``prompt_ids`` (one per item), AUC intervals
    that resample prompts (`auc_interval`)."""
    probabilities, labels = np.asarray(probabilities), np.asarray(labels)
    source_of = np.array(list(sources))
    ids = None if prompt_ids is None else np.array(list(prompt_ids))

    def interval(pick: np.ndarray) -> Estimate | None:
        if ids is None:
            return None
        return auc_interval(probabilities[pick], labels[pick], ids[pick], n_resamples, seed)

    by_source = {}
    for source in dict.fromkeys(source_of.tolist()):
        pick = source_of == source
        estimate = interval(pick)
        by_source[source] = {
            "teacher": int(labels[pick].sum()),
            "student": int((1 - labels[pick]).sum()),
            "accuracy": accuracy(probabilities[pick], labels[pick]),
            "auc": roc_auc(probabilities[pick], labels[pick]),
            "auc_low": estimate.low if estimate else math.nan,
            "auc_high": estimate.high if estimate else math.nan,
        }
    overall = interval(np.ones(len(labels), dtype=bool))
    return Validation(
        accuracy(probabilities, labels), roc_auc(probabilities, labels), by_source, overall
    )


@dataclass(frozen=True)
class ClassifierSummary:
    """How the head was trained and how well it separates teacher from student on probes.

    train_*/val_* count kept replies (teacher = 1, student = 0) on classifier / probe prompts;
    val_accuracy and val_auc are measured on probe prompts only (never trained on), overall and
    in ``val_by_source`` per prompt source (general prompts test transfer: the head never saw
    one); ``val_auc_low``/``val_auc_high`` bound the AUC (95%, resampling probe prompts);
    ``learning_curve``: the probe AUC of heads refitted on shares of the classifier prompts
    (`learning_curve.CurvePoint` records), which says whether more prompts would help;
    ``teacher_best_of``: stage 02 kept the best of that many teacher replies per prompt (ranked
    by similarity to the constitution's assertions, `teacher_ranking`), which the report says.
    """

    encoder: str
    l2: float
    heldout_prompts: int
    classifier_prompts: int
    probe_prompts: int
    train_teacher: int
    train_student: int
    train_accuracy: float
    val_teacher: int
    val_student: int
    val_accuracy: float
    val_auc: float
    dropped_teacher: int
    dropped_student: int
    val_by_source: dict[str, dict[str, float]] = field(default_factory=dict)
    val_auc_low: float = math.nan
    val_auc_high: float = math.nan
    learning_curve: tuple[dict[str, Any], ...] = ()
    teacher_best_of: int = 1

    def sampling_notes(self) -> list[str]:
        """How the teacher's replies were chosen, when not simply the first sample."""
        if self.teacher_best_of <= 1:
            return []
        return [
            f"teacher replies: best of {self.teacher_best_of} per prompt, ranked by MiniLM "
            "similarity to the constitution's assertions (stage 02), not by this classifier"
        ]


# -- can the head measure? ---------------------------------------------------------------------
@dataclass(frozen=True)
class InstrumentCheck:
    """Whether the classifier can measure teacher-likeness on one probe set, and the numbers
    that decide it: the AUC on the references' replies with its prompt-level interval, the
    references' teacher-like shares, and their paired difference (teacher minus student, on
    ``n_paired`` prompts holding both replies)."""

    probe_set: str
    auc: Estimate | None
    teacher_ref: float
    student_ref: float
    reference_gap: Estimate | None
    n_paired: int
    measurement: Measurement

    def record(self) -> dict[str, Any]:
        """A flat dict: ``auc``, ``auc_low``, ..., ``status`` and ``reason``."""
        record: dict[str, Any] = {"probe_set": self.probe_set}
        for name in ("auc", "reference_gap"):
            estimate = getattr(self, name)
            record[name] = estimate.value if estimate else None
            record[f"{name}_low"] = estimate.low if estimate else None
            record[f"{name}_high"] = estimate.high if estimate else None
        record |= {"teacher_ref": self.teacher_ref, "student_ref": self.student_ref}
        return record | {"n_paired": self.n_paired, **self.measurement.to_dict()}


def judge_instrument(
    probe_set: str,
    auc: Estimate | None,
    teacher_ref: float,
    student_ref: float,
    reference_gap: Estimate | None,
) -> Measurement:
    """ "measured", or "no measurement" with the first reason the classifier cannot measure on
    ``probe_set``: no AUC (a reference side has no reply), an AUC interval that reaches 0.5
    (the head cannot rank teacher above student replies), a teacher reference not above the
    student reference (the 0.5 threshold does not separate them), or a paired difference
    whose interval reaches 0 (the references are not apart)."""
    where = f"on the {probe_set} probe prompts"
    if auc is None:
        return Measurement.failed(
            f"no teacher or no student reference reply {where}: the classifier cannot be "
            "validated there"
        )
    if auc.high < 0.5:
        return Measurement.failed(
            f"classifier AUC {auc.text()} {where} is below 0.5: it ranks the student's "
            "replies above the teacher's"
        )
    if auc.low <= 0.5:
        return Measurement.failed(
            f"classifier AUC {auc.text()} {where} includes 0.5: it cannot tell the teacher's "
            "replies from the student's"
        )
    if teacher_ref <= student_ref:
        return Measurement.failed(
            f"teacher reference {teacher_ref:.2f} is not above student reference "
            f"{student_ref:.2f} {where}: the classifier's threshold does not separate them"
        )
    if reference_gap is None:
        return Measurement.failed(
            f"no probe prompt holds both a teacher and a student reference reply {where}: "
            "the references cannot be compared"
        )
    if reference_gap.low <= 0:
        return Measurement.failed(
            f"teacher reference {teacher_ref:.2f} and student reference {student_ref:.2f} "
            f"{where} are not apart (difference {reference_gap.text()} includes 0)"
        )
    return Measurement()


def check_instrument(
    probe_set: str,
    teacher_rows: Sequence[Mapping[str, Any]],
    student_rows: Sequence[Mapping[str, Any]],
    n_resamples: int,
    seed: int,
) -> InstrumentCheck:
    """`judge_instrument` on the scored reference rows (``prompt_id``, ``p_teacher``) of one
    probe set; both intervals resample probe prompts."""
    rows = [*teacher_rows, *student_rows]
    auc = auc_interval(
        [r["p_teacher"] for r in rows],
        np.r_[np.ones(len(teacher_rows)), np.zeros(len(student_rows))],
        [r["prompt_id"] for r in rows],
        n_resamples,
        seed,
    )

    def teacher_like(side: Sequence[Mapping[str, Any]]) -> dict[str, list[float]]:
        out: dict[str, list[float]] = {}
        for r in side:
            out.setdefault(r["prompt_id"], []).append(float(r["p_teacher"] > THRESHOLD))
        return out

    def share(side: Sequence[Mapping[str, Any]]) -> float:
        return float(np.mean([r["p_teacher"] > THRESHOLD for r in side])) if side else 0.0

    try:
        gap, n_paired = paired_bootstrap_difference(
            teacher_like(teacher_rows), teacher_like(student_rows), n_resamples, seed
        )
    except DataError:
        gap, n_paired = None, 0
    teacher, student = share(teacher_rows), share(student_rows)
    measurement = judge_instrument(probe_set, auc, teacher, student, gap)
    return InstrumentCheck(probe_set, auc, teacher, student, gap, n_paired, measurement)
