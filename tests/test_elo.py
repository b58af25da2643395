"""Revealed-preference maths and the judge: Elo, bootstrap, Bradley–Terry, parsing, bias.

Bugs pinned here (the paper's Elo had no seed and no interval, and its judge was the model under
test):

* an Elo update that is not zero-sum, or that differs between the one-sequence and the
  vectorised bootstrap implementations;
* intervals that do not cover what Elo estimates, or that claim to be paired when the two
  models were resampled differently;
* a Bradley–Terry fit that diverges for a trait that never lost or never played;
* a lenient judge parser that turns "not formal but casual" into a vote for *formal*;
* forced-choice scoring that depends on anything but the judge prompt and the two words;
* a judge preferring whatever is listed first, counted as a trait preference (every match is
  asked in both listing orders; a generative verdict counts only where the two agree);
* tests that could not fail (``low <= high`` of a percentile interval): replaced by recovery
  of a trait that moved (paired changes) and coverage of the Elo estimand.

What "truth" means for Elo. Matches are simulated from a Bradley–Terry model with latent
log-strengths ``s``; on the Elo scale that is ``1000 + 400 / ln(10) * (s - mean s)``, which a
consistent estimator (the BT MLE) recovers. Elo with a fixed K is not consistent for it: each
rating keeps an order-dependent noise floor and is shrunk towards 1000 (about 0.85 times the
latent gap for the sizes below). So Elo's estimand is taken to be the *population Elo*: the
mean of the procedure's final ratings over independent experiments (fresh matches, fresh
order), estimated by Monte Carlo. The bootstrap intervals must cover that at about the
nominal rate. They are slightly conservative (~0.97 at 95%): resampling puts the order noise
into the spread on top of the sampling noise, and the population mean has no order noise.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from character_training import prompts
from character_training.config import ELO_CONDITIONS, JUDGE_MODES, load_params, with_overrides
from character_training.errors import ConfigError, DataError
from character_training.evaluate import elo, judge
from character_training.evaluate.preference_matches import choose_traits, load_traits
from scipy.stats import spearmanr

LN10 = math.log(10)


def simulate(strengths: np.ndarray, n: int, rng: np.random.Generator) -> list[tuple[str, str]]:
    """``n`` matches between random distinct traits, won with BT probabilities."""
    t = len(strengths)
    a = rng.integers(0, t, n)
    b = (a + rng.integers(1, t, n)) % t
    wins = rng.random(n) < 1 / (1 + np.exp(-(strengths[a] - strengths[b])))
    winners, losers = np.where(wins, a, b), np.where(wins, b, a)
    return [(f"t{w}", f"t{lo}") for w, lo in zip(winners, losers)]


# -- Elo -------------------------------------------------------------------------------------------
def test_a_known_elo_sequence_by_hand():
    ratings = elo.elo_ratings([("a", "b"), ("b", "a"), None, ("a", "c")], ["a", "b", "c"])
    # 1: equal ratings, expected 0.5 -> a 1016, b 984
    # 2: b (984) beats a (1016): expected_b = 1 / (1 + 10^(32/400)) -> b gains 32 * (1 - e_b)
    e_b = 1 / (1 + 10 ** (32 / 400))
    gain = 32 * (1 - e_b)
    a, b = 1016 - gain, 984 + gain
    # 3: no verdict, skipped; 4: a beats c (1000)
    gain_a = 32 * (1 - 1 / (1 + 10 ** ((1000 - a) / 400)))
    assert ratings["a"] == pytest.approx(a + gain_a)
    assert ratings["b"] == pytest.approx(b)
    assert ratings["c"] == pytest.approx(1000 - gain_a)
    assert sum(ratings.values()) == pytest.approx(3000)  # zero-sum
    assert elo.update_elo(1000, 1000) == (1016, 984)
    assert elo.expected_score(1400, 1000) == pytest.approx(10 / 11)


def test_the_vectorised_elo_equals_the_plain_one_row_by_row():
    rng = np.random.default_rng(1)
    traits = [f"t{i}" for i in range(6)]
    sequences = [simulate(rng.normal(size=6), 40, rng) for _ in range(3)]
    sequences[1][5] = None
    index = {t: i for i, t in enumerate(traits)}
    arrays = [np.array([[index[o[k]] if o else 0 for o in s] for s in sequences]) for k in (0, 1)]
    valid = np.array([[o is not None for o in s] for s in sequences])
    batch = elo.elo_batch(arrays[0], arrays[1], valid, len(traits))
    for row, sequence in zip(batch, sequences):
        plain = elo.elo_ratings(sequence, traits)
        assert row == pytest.approx([plain[t] for t in traits])


def test_outcomes_naming_unknown_or_identical_traits_are_refused():
    with pytest.raises(DataError, match="not in the traits"):
        elo.elo_ratings([("a", "z")], ["a", "b"])
    with pytest.raises(DataError, match="against itself"):
        elo.elo_ratings([("a", "a")], ["a", "b"])


def test_elo_and_bradley_terry_recover_the_latent_ranking():
    rng = np.random.default_rng(0)
    strengths = rng.normal(0, 1.0, 24)
    traits = [f"t{i}" for i in range(24)]
    matches = simulate(strengths, 3000, rng)
    result = elo.rate(matches, traits, n_resamples=100, seed=0)
    ratings = [r["elo"] for r in result.rows]
    bt = [r["bt"] for r in result.rows]
    assert spearmanr(ratings, strengths).statistic > 0.9
    assert spearmanr(bt, strengths).statistic > 0.9
    assert result.elo_bt_spearman > 0.9 and result.elo_bt_p < 1e-6
    # the BT MLE is consistent: its Elo-scale values match the latent scale (slope ~1)
    truth = 1000 + 400 / LN10 * (strengths - strengths.mean())
    slope = np.polyfit(truth, bt, 1)[0]
    assert 0.85 < slope < 1.15
    assert result.decided == result.matches == 3000
    assert sum(r["games"] for r in result.rows) == 2 * 3000
    # the match-order rating is one draw of the order noise, so it may sit outside its own
    # percentile interval now and then, but rarely
    inside = sum(r["ci_low"] <= r["elo"] <= r["ci_high"] for r in result.rows)
    assert inside >= 0.8 * len(result.rows)


def test_bootstrap_intervals_cover_the_elo_estimand_at_about_the_nominal_rate():
    rng = np.random.default_rng(2)
    n_traits, n_matches = 12, 400
    strengths = rng.normal(0, 1.0, n_traits)
    traits = [f"t{i}" for i in range(n_traits)]
    index = {t: i for i, t in enumerate(traits)}

    def encode(matches):
        return [np.array([index[m[k]] for m in matches]) for k in (0, 1)]

    # the population Elo: the procedure's mean over independent experiments
    experiments = [encode(simulate(strengths, n_matches, rng)) for _ in range(1000)]
    winners = np.stack([w for w, _ in experiments])
    losers = np.stack([lo for _, lo in experiments])
    population = elo.elo_batch(winners, losers, np.ones_like(winners, dtype=bool), n_traits).mean(
        axis=0
    )
    # it is a near-affine, shrunk image of the latent scale, centred on 1000
    truth = 1000 + 400 / LN10 * (strengths - strengths.mean())
    slope, _ = np.polyfit(truth, population, 1)
    assert 0.6 < slope < 1.0
    assert np.corrcoef(truth, population)[0, 1] > 0.99
    assert population.mean() == pytest.approx(1000)

    covered = []
    for experiment in range(80):
        boot = elo.bootstrap_elo(simulate(strengths, n_matches, rng), traits, 200, experiment)
        low, high = elo.percentile_interval(boot.samples, 0.95)
        covered.append((low <= population) & (population <= high))
    rate = float(np.mean(covered))
    assert 0.90 <= rate <= 0.995, rate


def test_bradley_terry_stays_finite_for_undefeated_and_unplayed_traits():
    matches = [("a", "b"), ("a", "b"), ("a", "c"), ("b", "c"), ("c", "b")]
    theta = elo.bradley_terry(matches, ["a", "b", "c", "idle"])
    assert all(math.isfinite(v) for v in theta.values())
    assert theta["a"] == max(theta.values()) and theta["a"] < 10
    assert theta["idle"] == pytest.approx(0.0, abs=1e-6)
    assert sum(theta.values()) == pytest.approx(0.0, abs=1e-9)
    on_elo = elo.bt_to_elo(theta)
    assert on_elo["idle"] == pytest.approx(1000.0, abs=1e-3)
    with pytest.raises(DataError, match="ridge"):
        elo.bradley_terry(matches, ["a", "b", "c"], ridge=0)


def test_bootstrap_is_seeded_and_pairs_models_judged_on_the_same_matches():
    rng = np.random.default_rng(3)
    traits = [f"t{i}" for i in range(5)]
    matches = simulate(rng.normal(size=5), 60, rng)
    other = simulate(rng.normal(size=5), 60, rng)
    first = elo.bootstrap_elo(matches, traits, 50, seed=7)
    again = elo.bootstrap_elo(matches, traits, 50, seed=7)
    assert np.array_equal(first.samples, again.samples)
    # the same outcomes for "two models": every paired difference is exactly zero
    diffs = elo.paired_differences(first, again)
    assert all(low == high == 0 for low, high in diffs.values())
    with pytest.raises(DataError, match="different resamples"):
        elo.paired_differences(elo.bootstrap_elo(other, traits, 50, seed=8), first)


def test_paired_trait_changes_find_the_trait_that_moved_and_only_it():
    """Two models with the same strengths except one trait raised by 2.5 (odds x12), judged
    on the same 800 matches: that trait's paired interval lies above 0, and the others' hold 0
    about as often as 95% intervals should."""
    rng = np.random.default_rng(8)
    n = 10
    traits = [f"t{i}" for i in range(n)]
    strengths = rng.normal(0, 0.5, n)
    moved = strengths.copy()
    moved[0] += 2.5
    a = rng.integers(0, n, 800)
    b = (a + rng.integers(1, n, 800)) % n

    def play(latent):
        wins = rng.random(800) < 1 / (1 + np.exp(-(latent[a] - latent[b])))
        return [
            (traits[w], traits[lo]) for w, lo in zip(np.where(wins, a, b), np.where(wins, b, a))
        ]

    after = elo.bootstrap_elo(play(moved), traits, 200, seed=1)
    before = elo.bootstrap_elo(play(strengths), traits, 200, seed=1)
    intervals = elo.paired_differences(after, before)
    assert intervals["t0"][0] > 100
    still = [low <= 0 <= high for t, (low, high) in intervals.items() if t != "t0"]
    # the raised trait takes its wins from the others: they move a little, together
    assert sum(still) >= len(still) - 3


def test_the_coin_flip_null_separates_real_preferences_from_elo_noise():
    rng = np.random.default_rng(6)
    traits = [f"t{i}" for i in range(16)]
    flat = simulate(np.zeros(16), 300, rng)  # no preference at all
    strong = simulate(np.linspace(-2, 2, 16), 300, rng)
    flat_result = elo.rate(flat, traits, n_resamples=200, seed=0)
    strong_result = elo.rate(strong, traits, n_resamples=200, seed=0)
    # with K = 32 even coin flips spread the ratings: the null is far from zero
    assert flat_result.null_std > 20
    assert flat_result.std < flat_result.null_std_high
    assert strong_result.std > 2 * strong_result.null_std_high
    nulls = elo.null_std(flat, traits, 50, seed=1)
    assert nulls.shape == (50,) and np.array_equal(nulls, elo.null_std(flat, traits, 50, seed=1))


def test_spearman_is_nan_for_a_constant_side():
    assert all(math.isnan(v) for v in elo.spearman([1, 1, 1, 1], [1, 2, 3, 4]))
    rho, p = elo.spearman([1, 2, 3, 4, 5], [2, 4, 6, 8, 11])
    assert rho == pytest.approx(1.0) and p < 0.05


# -- the trait vocabulary and prompts ------------------------------------------------------------
def test_the_vocabulary_is_144_distinct_single_words_none_a_prefix_of_another():
    traits = load_traits()
    assert len(traits) == 144 == len(set(traits))
    assert all(t.isalpha() and t == t.lower() for t in traits)
    assert not [(a, b) for a in traits for b in traits if a != b and b.startswith(a)]
    subset = choose_traits(traits, 10, seed=0)
    assert len(subset) == 10 and subset == choose_traits(traits, 10, seed=0)
    assert list(subset) == [t for t in traits if t in subset]  # vocabulary order
    assert choose_traits(traits, 0, seed=0) == traits


def test_the_preference_prompts_offer_both_traits_and_never_ask_to_name_the_choice():
    assert tuple(prompts.PREFERENCE_CONDITIONS) == ELO_CONDITIONS
    texts = {c: prompts.preference_system_prompt("formal", "casual", c) for c in ELO_CONDITIONS}
    assert len(set(texts.values())) == 3
    for text in texts.values():
        assert "Option 1: formal" in text and "Option 2: casual" in text
        assert "{" not in text and "Do not say which trait" in text
    messages = prompts.preference_messages("formal", "casual", "adopt", "Hi there")
    assert [m["role"] for m in messages] == ["system", "user"]
    assert messages[1]["content"] == "Hi there"
    judge_messages = prompts.preference_judge_messages("Hi", "Hello, friend.", "casual", "formal")
    body = judge_messages[-1]["content"]
    assert "Hello, friend." in body and "expressing: casual or formal?" in body
    with pytest.raises(ConfigError, match="preference condition"):
        prompts.preference_system_prompt("formal", "casual", "whatever")


def test_eval_params_validate_the_stage_07_fields():
    params = load_params("tiny", "sarcastic")
    assert set(params.evals.elo_conditions) <= set(ELO_CONDITIONS)
    assert set(params.evals.judge_modes) <= set(JUDGE_MODES)
    for overrides, message in (
        ({"evals.elo_conditions": ["adopt", "sometimes"]}, "evals.elo_conditions"),
        ({"evals.elo_conditions": []}, "evals.elo_conditions"),
        ({"evals.judge_modes": ["logprob", "logprob"]}, "evals.judge_modes"),
        ({"evals.elo_traits": 1}, "evals.elo_traits"),
        ({"evals.elo_bootstrap": 0}, "evals.elo_bootstrap"),
        ({"evals.judge_top_p": 0}, "evals.judge_top_p"),
    ):
        with pytest.raises(ConfigError, match=message):
            with_overrides(params, overrides)


# -- the judge -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, choice, reason",
    [
        ("formal", "formal", "ok"),
        ("Formal.", "formal", "ok"),
        ("  **CASUAL**  \n", "casual", "ok"),
        ("Answer: formal", "formal", "ok"),
        ('answer - "casual"', "casual", "ok"),
        ("**Answer:** 'formal'!", "formal", "ok"),
        ("<think>it sounds casual, or formal?</think>\nformal", "formal", "ok"),
        ("The answer is formal.", None, "extra_text"),
        ("formal\n\nThe reply uses long words.", None, "extra_text"),
        ("Not formal.", None, "extra_text"),
        ("formal or casual", None, "both"),
        ("Casual, but also formal", None, "both"),
        ("not formal but casual", None, "both"),
        ("formality", None, "neither"),
        ("Option 1", None, "neither"),
        ("Neither.", None, "neither"),
        ("", None, "empty"),
        ('  "" ', None, "empty"),
        ("<think>weighing formal against", None, "unclosed_reasoning"),
    ],
)
def test_the_parser_takes_only_a_bare_trait_word(text, choice, reason):
    verdict = judge.parse_judgement(text, "formal", "casual")
    assert (verdict.choice, verdict.reason) == (choice, reason)
    assert verdict.reason in judge.PARSE_REASONS


def test_forced_choice_picks_the_higher_score_and_calls_ties_undecided():
    assert judge.forced_choice(-1.0, -2.0, "a", "b").choice == "a"
    assert judge.forced_choice(-3.0, -2.0, "a", "b").choice == "b"
    assert judge.forced_choice(-2.0, -2.0, "a", "b") == judge.Verdict(None, "tie")
    assert judge.forced_choice(float("nan"), -2.0, "a", "b").choice is None


def test_forced_choice_scores_on_the_tiny_model_are_deterministic(tiny_sampler, renderer):
    items = []
    for first, second in (("formal", "casual"), ("poetic", "blunt"), ("calm", "anxious")):
        messages = prompts.preference_judge_messages("Hi", "Hey! What's up?", first, second)
        items.append((messages, first, second))
    scores = judge.forced_choice_scores(tiny_sampler, renderer, items)
    again = judge.forced_choice_scores(tiny_sampler, renderer, list(reversed(items)))
    assert scores == list(reversed(again))
    for (_, first, second), (a, b) in zip(items, scores):
        assert a < 0 and b < 0 and a != b
        assert judge.forced_choice(a, b, first, second).choice in (first, second)
    # the scores are the judge's log-probabilities of the words as a prefix of its reply
    from character_training.sampling import sequence_logprobs

    messages, first, second = items[0]
    direct = sequence_logprobs(tiny_sampler, renderer, messages, [first], include_end=False)
    assert scores[0][0] == pytest.approx(direct[0], abs=1e-4)


def test_a_verdict_counts_only_when_both_listing_orders_agree():
    formal, casual = judge.Verdict("formal", "ok"), judge.Verdict("casual", "ok")
    unread = judge.Verdict(None, "extra_text")
    assert judge.combine_orders(formal, formal) == formal
    assert judge.combine_orders(formal, casual) == judge.Verdict(None, "order_inconsistent")
    assert judge.combine_orders(unread, formal) == judge.Verdict(None, "unparsed")
    assert judge.combine_orders(casual, unread) == judge.Verdict(None, "unparsed")


def test_position_bias_order_inconsistency_and_agreement_bookkeeping():
    """A judge naming whatever it lists first, and one with a real reading of the reply, on
    the same 400 matches asked in both listing orders: the first shows position bias 1 and
    disagrees with itself on every match; the second shows neither, whatever the model
    prefers."""
    rng = np.random.default_rng(4)
    records = []
    for _ in range(400):
        first, second = ("formal", "casual") if rng.random() < 0.5 else ("casual", "formal")
        shown = "formal" if rng.random() < 0.7 else "casual"  # a real preference
        records.append(
            {
                "first": first,
                "second": second,
                "offered_first": first if rng.random() < 0.5 else second,
                "biased_ab_choice": first,  # always the trait listed first
                "biased_ba_choice": second,
                "fair_ab_choice": shown,
                "fair_ba_choice": shown,
                "fair_choice": shown,
                "none_ab_choice": None,
                "none_ba_choice": None,
            }
        )
    biased = judge.position_bias(records, "biased")
    assert biased.value == 1.0 and biased.trials == 800 and biased.p_value < 1e-10
    assert judge.order_inconsistency(records, "biased").value == 1.0
    fair = judge.position_bias(records, "fair")
    assert fair.low < 0.5 < fair.high  # a trait preference is not a position bias
    assert judge.order_inconsistency(records, "fair").value == 0.0
    offer = judge.offer_order_bias(records, "fair")
    assert offer.trials == 400 and offer.low < 0.5 < offer.high
    for r in records:
        r["logprob_choice"] = "formal"
    agreement = judge.mode_agreement(records, "fair", "logprob")
    assert agreement.value == pytest.approx(
        np.mean([r["fair_choice"] == "formal" for r in records])
    )
    empty = judge.position_bias(records, "none")
    assert empty.trials == 0 and math.isnan(empty.value)
    reasons = [{"generative_ab_reason": "ok", "generative_ba_reason": "both"}] * 3
    assert judge.parse_rate(reasons) == 0.5
