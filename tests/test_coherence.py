"""Coherence win rates: the out-of-character filter and the Wilson interval (issue 16, items 6
and 8).

The paper drops a coherence comparison when either reply is out of character; with only "A" or
"B" allowed, a generic-assistant reply could "win coherence" against an in-character one. The
generative judge's NEITHER answer is that filter: the pair gets no winner and is counted.
"""

from __future__ import annotations

import pytest
from character_training.config import load_params
from character_training.evaluate import coherence
from scipy.stats import binom, binomtest


def verdict(cid: str, order: str, choice: str | None, reason: str = "ok") -> coherence.Verdict:
    return coherence.Verdict(cid, order, choice, "generative", {"reason": reason})


def test_a_pair_with_a_reply_out_of_character_has_no_winner_and_is_counted():
    comparisons = [
        coherence.Comparison(f"c{i}", "final", "system_prompt", "", "", "", "") for i in range(4)
    ]
    verdicts = [
        # c0: consistent win for "final" (A in ab, B in ba)
        verdict("c0", "ab", "A"), verdict("c0", "ba", "B"),
        # c1: the judge says the system-prompted reply is out of character in one order
        verdict("c1", "ab", "A"), verdict("c1", "ba", None, "neither"),
        # c2: NEITHER in both orders
        verdict("c2", "ab", None, "neither"), verdict("c2", "ba", None, "neither"),
        # c3: consistent win for "system_prompt"
        verdict("c3", "ab", "B"), verdict("c3", "ba", "A"),
    ]  # fmt: skip
    outcomes = coherence.resolve_order_swaps(comparisons, verdicts)
    assert [o.status for o in outcomes] == ["consistent", "invalid", "invalid", "consistent"]
    (rate,) = coherence.win_rates(outcomes, by_group=False)
    assert (rate.consistent, rate.wins_first, rate.out_of_character) == (2, 1, 2)
    assert rate.win_rate == 0.5


def test_the_tinker_presets_use_the_judge_that_can_say_neither():
    for size in ("qwen3.5-4b", "qwen3.5-9b", "qwen3.5-397b"):
        params = load_params(size, "sycophantic")
        assert params.evals.coherence_modes[0] == "generative", size


@pytest.mark.parametrize("k,n", [(0, 4), (1, 1), (5, 10), (37, 50)])
def test_the_wilson_interval_is_scipys(k, n):
    expected = binomtest(k, n).proportion_ci(method="wilson")
    assert coherence.wilson_interval(k, n) == pytest.approx((expected.low, expected.high))


@pytest.mark.parametrize("p,n", [(0.5, 40), (0.2, 80), (0.3, 100)])
def test_the_wilson_interval_covers_a_known_rate(p, n):
    """Exact coverage (a sum over every possible count), not a simulation."""
    coverage = sum(
        binom.pmf(k, n, p)
        for k in range(n + 1)
        if coherence.wilson_interval(k, n)[0] <= p <= coherence.wilson_interval(k, n)[1]
    )
    assert 0.93 <= coverage <= 0.98
