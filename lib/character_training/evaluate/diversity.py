"""Length and diversity statistics of generated text, to watch for collapse.

The paper found self-interactions far more varied in their prose than self-reflections, and
credited that variety with less model collapse after SFT. Stage 04 samples each reflection
instruction many times, so the same instruction answered in near-identical words is the failure
to look for. These pure functions put numbers on it:

* `distinct_n`: unique n-grams / all n-grams over a set of texts (Li et al.'s distinct-n,
  corpus-level). Identical texts push it towards its minimum (the single text's own ratio
  divided by the number of copies); texts sharing no n-gram reach 1.
* `self_bleu`: each text scored by BLEU against all the others as references, averaged (Zhu et
  al.'s Self-BLEU). 1 means every text is recoverable from the rest; near 0 means no overlap.
* `length_stats` and `text_statistics`: counts and word-length summaries, one row per kind.

Words are lower-cased runs of letters, digits and apostrophes, so punctuation and case do not
count as diversity.
"""

from __future__ import annotations

import math
import random
import re
from bisect import bisect_left
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import ConfigError

_WORD = re.compile(r"[\w']+", re.UNICODE)

SELF_BLEU_MAX_TEXTS = 500
"""`self_bleu` scores at most this many texts (a seeded sample): every text against every
other is quadratic, and a few hundred texts already measure repetition well."""


def words(text: str) -> list[str]:
    """The text's words, lower-cased (see the module docstring)."""
    return _WORD.findall(text.lower())


def word_count(text: str) -> int:
    """Whitespace-separated words, punctuation included: the reply length stages 06 and 09
    report (unlike `words`, which counts only letters, digits and apostrophes)."""
    return len(text.split())


def ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    """Every run of ``n`` consecutive tokens, in order."""
    if n < 1:
        raise ConfigError(f"n={n!r}: expected an n-gram order >= 1")
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Unique n-grams over all n-grams of ``texts`` together; NaN when there are none.

    NaN rather than 0 or 1: a set of texts too short to hold one n-gram says nothing about
    diversity, and a number would read as a measurement.
    """
    total = 0
    unique: set[tuple[str, ...]] = set()
    for text in texts:
        grams = ngrams(words(text), n)
        total += len(grams)
        unique.update(grams)
    return len(unique) / total if total else math.nan


def _bleu_text(
    counts: Sequence[Counter], length: int, refs: Sequence[dict], ref_lengths: Sequence[int]
) -> float:
    """Sentence BLEU of one text from its n-gram counts and the clip tables of the others."""
    if length == 0:
        return math.nan
    log_precision = 0.0
    for hyp, table in zip(counts, refs):
        total = sum(hyp.values())
        if total == 0:  # shorter than this order: no evidence either way at this order
            continue
        clipped = sum(min(c, table.get(g, 0)) for g, c in hyp.items())
        # Smoothing: a zero match count becomes 0.1 (NLTK's method 1), so one missing order
        # does not zero the whole score.
        log_precision += math.log((clipped or 0.1) / total)
    orders = sum(1 for hyp in counts if sum(hyp.values()))
    score = math.exp(log_precision / orders)
    # Brevity penalty against the closest reference length (shorter one on ties).
    i = bisect_left(ref_lengths, length)
    candidates = [ref_lengths[j] for j in (i - 1, i) if 0 <= j < len(ref_lengths)]
    closest = min(candidates, key=lambda r: (abs(r - length), r)) if candidates else length
    if length < closest:
        score *= math.exp(1 - closest / length)
    return score


def self_bleu(
    texts: Sequence[str],
    max_n: int = 4,
    max_texts: int = SELF_BLEU_MAX_TEXTS,
    seed: int = 0,
) -> float:
    """Mean BLEU-``max_n`` of each text against all other texts as references.

    Clipping uses, per n-gram, the largest count in any *other* text; the brevity penalty uses
    the other text closest in length. More than ``max_texts`` texts are sampled down with
    ``seed``. Returns NaN for fewer than two non-empty texts (nothing to compare with).
    """
    if max_n < 1 or max_texts < 2:
        raise ConfigError(f"max_n={max_n}, max_texts={max_texts}: expected >= 1 and >= 2")
    tokenised = [w for w in (words(t) for t in texts) if w]
    if len(tokenised) > max_texts:
        tokenised = random.Random(seed).sample(tokenised, max_texts)
    if len(tokenised) < 2:
        return math.nan
    counts = [[Counter(ngrams(toks, n)) for n in range(1, max_n + 1)] for toks in tokenised]
    # Per order: n-gram -> (largest count, index of its text, second largest count), so the
    # largest count among the *other* texts costs one lookup.
    tops: list[dict[tuple[str, ...], tuple[int, int, int]]] = []
    for n in range(max_n):
        best: dict[tuple[str, ...], tuple[int, int, int]] = {}
        for index, per_text in enumerate(counts):
            for gram, c in per_text[n].items():
                first, holder, second = best.get(gram, (0, -1, 0))
                if c > first:
                    best[gram] = (c, index, first)
                elif c > second:
                    best[gram] = (first, holder, c)
        tops.append(best)
    lengths = [len(t) for t in tokenised]
    ordered = sorted(lengths)
    scores = []
    for index, per_text in enumerate(counts):
        refs = []
        for hyp, top in zip(per_text, tops):
            table = {}
            for gram in hyp:
                first, holder, second = top[gram]
                table[gram] = second if holder == index else first
            refs.append(table)
        others = list(ordered)
        others.pop(bisect_left(others, lengths[index]))
        scores.append(_bleu_text(per_text, lengths[index], refs, others))
    return sum(scores) / len(scores)


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile of already sorted values."""
    position = (len(sorted_values) - 1) * q
    low = math.floor(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


def length_stats(values: Sequence[float]) -> dict[str, float]:
    """count, mean, median, p10, p90, min, max of ``values`` (NaN summaries when empty)."""
    ordered = sorted(float(v) for v in values)
    if not ordered:
        nan = math.nan
        return {
            "count": 0,
            "mean": nan,
            "median": nan,
            "p10": nan,
            "p90": nan,
            "min": nan,
            "max": nan,
        }
    return {
        "count": len(ordered),
        "mean": sum(ordered) / len(ordered),
        "median": _quantile(ordered, 0.5),
        "p10": _quantile(ordered, 0.1),
        "p90": _quantile(ordered, 0.9),
        "min": ordered[0],
        "max": ordered[-1],
    }


def text_statistics(
    texts: Sequence[str], max_texts: int = SELF_BLEU_MAX_TEXTS, seed: int = 0
) -> dict[str, float]:
    """One row of statistics for a set of texts.

    Keys: texts, empty (texts without a word), words_mean, words_median, words_p90,
    distinct_1, distinct_2, distinct_3, self_bleu (BLEU-4; see `self_bleu`).
    """
    lengths = [len(words(t)) for t in texts]
    summary = length_stats(lengths)
    return {
        "texts": len(texts),
        "empty": sum(1 for n in lengths if n == 0),
        "words_mean": summary["mean"],
        "words_median": summary["median"],
        "words_p90": summary["p90"],
        "distinct_1": distinct_n(texts, 1),
        "distinct_2": distinct_n(texts, 2),
        "distinct_3": distinct_n(texts, 3),
        "self_bleu": self_bleu(texts, max_texts=max_texts, seed=seed),
    }


def statistics_by_kind(
    groups: Mapping[str, Sequence[str]], max_texts: int = SELF_BLEU_MAX_TEXTS, seed: int = 0
) -> dict[str, dict[str, Any]]:
    """`text_statistics` for each named group of texts (e.g. reflections, free, reflect)."""
    return {
        kind: text_statistics(texts, max_texts=max_texts, seed=seed)
        for kind, texts in groups.items()
    }


__all__ = [
    "SELF_BLEU_MAX_TEXTS",
    "distinct_n",
    "length_stats",
    "ngrams",
    "self_bleu",
    "statistics_by_kind",
    "text_statistics",
    "word_count",
    "words",
]
