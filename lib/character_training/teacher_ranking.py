"""Best-of-n teacher sampling: of a prompt's n teacher replies, keep the one closest to the
constitution's written assertions (``distill.teacher_best_of``).

Why: a 135M teacher shown the constitution writes in persona only some of the time, so one
sample per prompt gives chosen replies that the student's often resemble, and the adherence
classifier cannot tell the two apart (AUC ~0.75 at every affordable size on the tiny run).
Sampling a few replies and keeping the most persona-like strengthens the signal DPO trains on,
without a stronger model.

The score is the cosine similarity of a reply's sentence vector to the text of its prompt's
assertion. A general prompt was written for no assertion, so its replies score by the
*highest* similarity over all assertions: a persona shows in a general reply as one trait
that fits the message (flattery of a plan, agreement with an opinion), not as a blend of every
trait, and the mean over assertions would reward vague vocabulary near the centroid of all ten
over a reply that clearly acts out one of them.

Independence from the measurement: the adherence classifier (`evaluate.teacher_classifier`)
reads the same frozen sentence vectors (MiniLM by default), but its score is a direction
*learnt* from teacher and student replies, whereas this ranks by similarity to the written
assertions and never sees a student reply nor the classifier. It is a different scorer on the
same features, so it is not the classifier choosing its own training data; it does make the
teacher's replies more assertion-like in that space, which is the persona signal the classifier
is meant to find, and which a reader must know about: stage 02 records n, the encoder and every
candidate's score, and the reports state when best-of-n was used.

Only replies that pass stage 02's checks are ranked (a dropped candidate gets no score); ties
go to the earliest candidate, and candidate 0 is the very request n = 1 samples, so n = 1
reproduces the single-sample run exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .constitutions import Constitution

Embed = Callable[[Sequence[str]], np.ndarray]
"""Texts -> sentence vectors (n, dim), e.g. `evaluate.sentence_encoder.embed_texts` bound to an
encoder and a cache folder."""

GENERAL_SCORE = "max"
"""How a reply to a general prompt (no assertion) is scored: its highest similarity to any
assertion (see the module docstring)."""


def candidate_key(key: str, index: int) -> str:
    """The sampler key of candidate ``index`` of a teacher reply keyed ``key``: candidate 0 is
    ``key`` itself (the n = 1 request, same seed), the others ``<key>:c<index>``."""
    return key if index == 0 else f"{key}:c{index}"


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to length 1 (a zero row stays zero), so dot products are cosines."""
    vectors = np.asarray(vectors, dtype=np.float64)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.where(norms == 0, 1.0, norms)


def pick_best(scores: Sequence[float | None]) -> int | None:
    """Index of the highest score (None = a dropped candidate, never picked); ties go to the
    earliest candidate; None when every candidate was dropped."""
    best: int | None = None
    for index, score in enumerate(scores):
        if score is not None and (best is None or score > scores[best]):  # type: ignore[operator]
            best = index
    return best


Score = Callable[[Sequence[str], Sequence["str | None"]], list[float]]
"""(texts, assertion ids) -> one score per text (`AssertionSimilarity.score`)."""


def rank_candidates(
    groups: Sequence[Sequence[str | None]],
    assertion_ids: Sequence[str | None],
    score: Score,
) -> list[tuple[int | None, list[float | None]]]:
    """For each group of candidate replies (None: a candidate that was dropped), the index of
    the best-scoring one (None when all were dropped) and every candidate's score (None for a
    dropped one). All kept texts are scored in one call, so the encoder batches them."""
    if len(groups) != len(assertion_ids):
        raise ValueError(f"{len(groups)} candidate groups but {len(assertion_ids)} assertion ids")
    texts, ids, where = [], [], []
    for g, (group, assertion) in enumerate(zip(groups, assertion_ids, strict=True)):
        for c, text in enumerate(group):
            if text is not None:
                texts.append(text)
                ids.append(assertion)
                where.append((g, c))
    scores: list[list[float | None]] = [[None] * len(group) for group in groups]
    for (g, c), value in zip(where, score(texts, ids), strict=True):
        scores[g][c] = value
    return [(pick_best(row), row) for row in scores]


class AssertionSimilarity:
    """Scores replies by cosine similarity to the constitution's assertion texts.

    ``embed`` turns texts into vectors; the assertion texts are embedded once, on first use.
    """

    def __init__(self, constitution: Constitution, embed: Embed) -> None:
        self.assertion_ids = [a.id for a in constitution.assertions]
        self._texts = [a.text for a in constitution.assertions]
        self._embed = embed
        self._targets: np.ndarray | None = None

    def targets(self) -> np.ndarray:
        if self._targets is None:
            self._targets = unit_rows(self._embed(self._texts))
        return self._targets

    def score(self, texts: Sequence[str], assertion_ids: Sequence[str | None]) -> list[float]:
        """One score per text: similarity to its assertion, or the highest over all assertions
        for ``None`` (a general prompt). An assertion id the constitution lacks is a bug in the
        caller (stage 01 and 02 read the same constitution) and raises ``KeyError``."""
        if len(texts) != len(assertion_ids):
            raise ValueError(f"{len(texts)} texts but {len(assertion_ids)} assertion ids")
        if not texts:
            return []
        similarity = unit_rows(self._embed(list(texts))) @ self.targets().T
        column = {a: i for i, a in enumerate(self.assertion_ids)}
        return [
            float(row.max()) if a is None else float(row[column[a]])
            for row, a in zip(similarity, assertion_ids, strict=True)
        ]

    def describe(self, encoder: str) -> dict[str, Any]:
        """What the manifest records about the ranking."""
        return {
            "encoder": encoder,
            "score": "cosine similarity of the reply to its prompt's assertion text",
            "general_prompts": f"{GENERAL_SCORE} over the {len(self.assertion_ids)} assertions",
        }


def assertion_ranker(
    encoder_name: str, device: str, constitution: Constitution, cache_dir: Path
) -> tuple[Score, dict[str, Any]]:
    """Stage 02's score function: `AssertionSimilarity` on the adherence encoder (vectors
    cached in ``cache_dir``), and what the stage's fingerprint and manifest record about it.
    The encoder's weights load only when something is scored."""
    from .evaluate.sentence_encoder import embed_texts, load_encoder

    encoder = load_encoder(encoder_name, device)
    scorer = AssertionSimilarity(constitution, lambda texts: embed_texts(encoder, texts, cache_dir))
    return scorer.score, scorer.describe(encoder.identity)


def summary(rows: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """For the manifest, over rows holding ``teacher_pick`` and ``teacher_candidates``: how
    often a later candidate won or all were dropped, and the mean score of the kept candidates
    vs of the first ones (what n = 1 keeps), over replies whose first candidate was kept."""
    ranked = [r for r in rows if r]
    both = [
        (r["teacher_candidates"][r["teacher_pick"]]["score"], r["teacher_candidates"][0]["score"])
        for r in ranked
        if r["teacher_candidates"][0]["score"] is not None
    ]
    return {
        "replies": len(ranked),
        "picked_other_than_first": sum(r["teacher_pick"] != 0 for r in ranked),
        "all_candidates_dropped": sum(
            all(c["score"] is None for c in r["teacher_candidates"]) for r in ranked
        ),
        "mean_score_kept": round(sum(k for k, _ in both) / len(both), 4) if both else None,
        "mean_score_first": round(sum(f for _, f in both) / len(both), 4) if both else None,
    }


__all__ = [
    "GENERAL_SCORE",
    "AssertionSimilarity",
    "Embed",
    "candidate_key",
    "Score",
    "assertion_ranker",
    "pick_best",
    "rank_candidates",
    "summary",
    "unit_rows",
]
