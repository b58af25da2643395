"""Stage 08: the persona classifier, its F1 and intervals, the attacks, the coherence judge.

Bugs pinned here (the paper's robustness code, or easy to get quietly wrong):

* a classifier scored on prompts it was trained on (the split must be disjoint by prompt, and
  only no-instruction replies of training prompts may train it);
* a macro F1 that silently differs from the standard one (absent classes, zero denominators),
  or that averages over whichever classes the classifier happened to predict, so methods are
  compared on different class sets;
* intervals that resample replies rather than prompts, or splits independently;
* a classifier that puts every reply in one class (F1 0.33 on the tiny run) whose F1 reaches
  the headline as "the persona did not survive" instead of "no measurement";
* adversarial instructions that never reach the rendered prompt (the paper's scripts kept four
  diverging copies of them);
* a coherence win rate that counts a position-biased judge's verdicts instead of dropping the
  verdicts that flip when the two replies swap places;
* a resumed stage that resamples, retrains or rejudges what it already has;
* a notebook that only runs after notebooks 01-07 ran.
"""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
from character_training import plots
from character_training.backends.local import TINY_RANDOM_NAME as TINY
from character_training.config import load_params, with_overrides
from character_training.errors import ConfigError, DataError
from character_training.evaluate import coherence
from character_training.evaluate import robustness as scores
from character_training.evaluate.robustness import (
    ClassifierSettings,
    bootstrap_macro_f1,
    chance_macro_f1,
    check_f1,
    class_scores,
    f1_table,
    macro_f1,
    null_macro_f1,
    split_prompts,
    summarise_method,
    train_classifier,
    trivial_macro_f1,
)
from character_training.evaluate.robustness_replies import (
    ReplySettings,
    log_name,
    prefill_requests,
    reply_requests,
)
from character_training.evaluate.robustness_report import Report
from character_training.prompts import (
    ADVERSARIAL_INSTRUCTIONS,
    FOLLOW_UP_PROMPT,
    coherence_judge_messages,
)
from character_training.renderers.conversation import generation_prompt
from character_training.stages import robustness as stage
from character_training.store import Checkpoint, read_jsonl, record_checkpoint

# -- macro F1 ------------------------------------------------------------------------------------
TRUE = ["cat", "cat", "cat", "dog", "dog", "fish"]
PRED = ["cat", "dog", "cat", "dog", "bird", "cat"]


def test_macro_f1_equals_a_hand_computation_with_absent_classes():
    # bird: predicted once, never true -> tp 0, fp 1 -> F1 0
    # cat:  tp 2, fp 1 (the fish), fn 1 (a cat called dog) -> 2*2 / (4 + 1 + 1) = 2/3
    # dog:  tp 1, fp 1 (that cat), fn 1 (a dog called bird) -> 2 / (2 + 1 + 1) = 1/2
    # fish: true once, never predicted -> F1 0
    assert macro_f1(TRUE, PRED) == pytest.approx((0 + 2 / 3 + 1 / 2 + 0) / 4)  # 7/24
    scores = {s.label: s for s in class_scores(TRUE, PRED)}
    assert [scores[k].support for k in ("bird", "cat", "dog", "fish")] == [0, 3, 2, 1]
    assert scores["cat"].precision == pytest.approx(2 / 3)
    assert scores["cat"].recall == pytest.approx(2 / 3)
    assert scores["dog"].precision == pytest.approx(1 / 2)
    assert scores["bird"].precision == scores["bird"].recall == scores["bird"].f1 == 0.0
    # explicit labels: a class left out does not count; one absent from both counts as 0
    assert macro_f1(TRUE, PRED, labels=["cat", "dog", "fish"]) == pytest.approx(7 / 18)
    assert macro_f1(TRUE, PRED, labels=["bird", "cat", "dog", "fish", "eel"]) == pytest.approx(
        7 / 30
    )
    assert macro_f1(["a", "b"], ["a", "b"]) == 1.0
    with pytest.raises(DataError, match="as many predictions"):
        macro_f1(["a"], ["a", "b"])


def test_the_bootstrap_averages_over_a_fixed_label_set_not_over_what_was_predicted():
    rows = [(f"p{i // 2}", t, p) for i, (t, p) in enumerate(zip(TRUE * 4, PRED * 4))]
    estimate = bootstrap_macro_f1(rows, 400, seed=3)
    # "bird" is predicted but never true: by default it is not one of the averaged classes
    assert estimate.value == pytest.approx(7 / 18)
    assert estimate.value == pytest.approx(macro_f1(TRUE * 4, PRED * 4, ["cat", "dog", "fish"]))
    every = bootstrap_macro_f1(rows, 400, seed=3, labels=["bird", "cat", "dog", "fish"])
    assert every.value == pytest.approx(macro_f1(TRUE * 4, PRED * 4))  # 7/24, as before
    assert bootstrap_macro_f1(rows, 400, seed=3) == estimate  # seeded
    perfect = [(f"p{i}", label, label) for i, label in enumerate(TRUE)]
    assert bootstrap_macro_f1(perfect, 100, 0).to_dict() == {
        "value": 1.0, "low": 1.0, "high": 1.0, "level": 0.95, "method": "point"
    }  # fmt: skip


def _known_f1_rows(rng, n, persona_right=(4, 2), base_right=0.8):
    """Per prompt two persona replies, each right with the prompt's chance q ~ Beta(4, 2), and
    one base reply, right with chance 0.8."""
    q = rng.beta(*persona_right, size=n)
    persona = rng.random((n, 2)) < q[:, None]
    base = rng.random(n) < base_right
    ids = [f"p{i}" for i in range(n)]
    rows = [(p, "pirate", "pirate" if ok else "base") for p, oks in zip(ids, persona) for ok in oks]
    return rows + [(p, "base", "base" if ok else "pirate") for p, ok in zip(ids, base)]


def test_the_macro_f1_interval_covers_a_known_truth():
    """Expected counts per prompt: pirate tp 2a, fn 2(1-a), fp (1-b); base tp b, fn 1-b, fp
    2(1-a), with a = 2/3 and b = 0.8, so the population macro F1 is known in closed form."""
    a, b = 4 / 6, 0.8
    truth = (4 * a / (4 * a + 2 * (1 - a) + (1 - b)) + 2 * b / (2 * b + (1 - b) + 2 * (1 - a))) / 2
    rng = np.random.default_rng(8)
    hits = sum(
        (e := bootstrap_macro_f1(_known_f1_rows(rng, 50), 400, rep)).low <= truth <= e.high
        for rep in range(200)
    )
    assert hits / 200 >= 0.9


def test_the_trivial_macro_f1_is_the_best_constant_answer():
    # 4 pirate + 2 base: always "pirate" scores 2*4/(4+6) = 0.8 on pirate, 0 on base -> 0.4
    rows = [("p", "pirate", "x")] * 4 + [("p", "base", "x")] * 2
    assert trivial_macro_f1(rows) == (pytest.approx(0.4), "pirate")
    every_pirate = [(p, t, "pirate") for p, t, _ in rows]
    assert macro_f1([r[1] for r in every_pirate], [r[2] for r in every_pirate]) == 0.4
    # three classes of 2: 2*2/(2+6)/3 = 1/6; ties go to base; two splits average
    three = [("p", c, "x") for c in ("base", "a", "b") for _ in range(2)]
    assert trivial_macro_f1(three) == (pytest.approx(1 / 6), "base")
    assert trivial_macro_f1({"s": rows, "t": three}, ["base", "pirate", "a", "b"])[0] == (
        pytest.approx((2 * 4 / 10 / 4 + 2 * 2 / 8 / 4) / 2)
    )


def test_guessing_at_the_classifiers_own_rates_can_beat_the_constant_answer():
    """Truth 2:1 (pirate:base), predictions half and half, independent of the truth: pirate
    expects F1 2*(2/3)(1/2)/(2/3+1/2) = 4/7, base 2*(1/3)(1/2)/(1/3+1/2) = 2/5."""
    rows = [("p", "pirate", "pirate"), ("p", "pirate", "base")] * 2 + [
        ("p", "base", "pirate"),
        ("p", "base", "base"),
    ]
    assert chance_macro_f1(rows) == pytest.approx((4 / 7 + 2 / 5) / 2)
    assert null_macro_f1(rows)[0] == pytest.approx((4 / 7 + 2 / 5) / 2)  # above 0.40
    every_base = [(p, t, "base") for p, t, _ in rows]  # guessing "base" only is the constant
    assert chance_macro_f1(every_base) == pytest.approx(2 * 2 / 8 / 2)
    assert null_macro_f1(every_base) == (pytest.approx(0.4), "0.40, the score of putting every "
                                         "reply in 'pirate'")  # fmt: skip


def test_a_classifier_at_its_trivial_value_is_no_measurement():
    rng = np.random.default_rng(2)
    rows = _known_f1_rows(rng, 40)
    assert check_f1(rows, bootstrap_macro_f1(rows, 300, 0)).measured
    one_class = [(p, t, "base") for p, t, _ in rows]
    verdict = check_f1(one_class, bootstrap_macro_f1(one_class, 300, 0))
    assert verdict.reason == (
        "the classifier put all 120 replies in class 'base': it does not tell the classes apart"
    )
    # a coin flip scores about 0.49, above the constant answer's 0.40, yet measures nothing
    coin = [(p, t, "pirate" if rng.random() < 0.5 else "base") for p, t, _ in rows]
    estimate = bootstrap_macro_f1(coin, 300, 0)
    verdict = check_f1(coin, estimate)
    assert estimate.value > trivial_macro_f1(coin)[0]
    assert not verdict.measured and verdict.reason.startswith(f"macro F1 {estimate.text()}")
    assert "what guessing at the classifier's own rate of each class scores" in verdict.reason


def test_the_bootstrap_resamples_prompts_and_averages_splits_on_shared_draws():
    # each prompt has one persona and one base reply; half the prompts are fully right
    rng = np.random.default_rng(0)
    right = rng.random(60) < 0.5
    rows = []
    for i, ok in enumerate(right):
        rows += [(f"p{i}", "pirate", "pirate" if ok else "base"), (f"p{i}", "base", "base")]
    one = bootstrap_macro_f1(rows, 500, 1)
    few = bootstrap_macro_f1(rows[:20], 500, 1)
    assert (few.high - few.low) > (one.high - one.low)  # fewer prompts, wider interval
    # the mean over two splits is the mean of their macro F1s; identical splits keep the width
    flipped = [(p, t, "pirate" if t == "pirate" else "base") for p, t, _ in rows]
    both = bootstrap_macro_f1({"a": rows, "b": flipped}, 500, 1)
    assert both.value == pytest.approx((one.value + 1.0) / 2)
    twice = bootstrap_macro_f1({"a": rows, "b": rows}, 500, 1)
    assert (twice.value, twice.low, twice.high) == pytest.approx((one.value, one.low, one.high))


def test_the_f1_table_scores_each_method_against_the_same_base_rows():
    """Method m at split s is scored on m's replies plus the base model's at s (the same base
    rows for every method); base gets only its own-class rate; the summary averages the
    adversarial splits and reads the plain and prefill sets."""

    def reply(method, persona, split, prompt, predicted):
        true = persona or "base"
        return {"method": method, "persona": persona, "class": true, "split": split,
                "prompt_id": prompt, "predicted": predicted}  # fmt: skip

    scored = []
    for split in ("none", "attack", "prefill"):
        for i in range(4):
            scored.append(reply("base", "", split, f"p{i}", "base" if i else "pirate"))
            scored.append(reply("final", "pirate", split, f"p{i}", "pirate" if i < 2 else "base"))
    scored.append(reply("dpo", "pirate", "none", "p0", "pirate"))
    rows, sets = f1_table(scored, ["dpo", "final"], ["none", "attack", "prefill"], 50, 0)
    assert [(r.method, r.split) for r in rows] == [
        ("dpo", "none"), ("final", "none"), ("base", "none"),
        ("final", "attack"), ("base", "attack"), ("final", "prefill"), ("base", "prefill"),
    ]  # fmt: skip
    base_none = [(r["prompt_id"], r["class"], r["predicted"]) for r in scored
                 if (r["method"], r["split"]) == ("base", "none")]  # fmt: skip
    assert sets[("dpo", "none")] == [("p0", "pirate", "pirate"), *base_none]
    final = next(r for r in rows if (r.method, r.split) == ("final", "none"))
    truth = ["pirate"] * 4 + ["base"] * 4  # final's replies, then base's
    predicted = ["pirate", "pirate", "base", "base"] + ["pirate", "base", "base", "base"]
    assert final.macro_f1.value == pytest.approx(macro_f1(truth, predicted))
    assert final.own_class_rate.value == 0.5 and (final.n_prompts, final.n_replies) == (4, 4)
    base = next(r for r in rows if (r.method, r.split) == ("base", "none"))
    assert base.macro_f1 is None and base.own_class_rate.value == 0.75
    assert math.isnan(base.record()["macro_f1"])
    summary = summarise_method("final", sets, ["attack"], 50, 0)
    assert summary.no_instruction == bootstrap_macro_f1(sets[("final", "none")], 50, 0)
    assert summary.with_instructions == bootstrap_macro_f1(
        {"attack": sets[("final", "attack")]}, 50, 0
    )
    assert summary.prefill == bootstrap_macro_f1(sets[("final", "prefill")], 50, 0)
    only_plain = summarise_method("dpo", sets, ["attack"], 50, 0)
    assert only_plain.with_instructions is None and only_plain.prefill is None


def test_each_method_is_scored_on_its_own_classes_and_a_blind_one_is_no_measurement(tmp_path):
    """final (one persona) is taken for "sarcastic" once: that class is not final's, so it does
    not pull final's F1 down. Under the attack final's replies all read as base: the persona
    was lost, a measurement. dpo's plain replies are all taken for base: the classifier cannot
    see dpo at all, so none of dpo's numbers reach the headline."""

    def reply(method, persona, split, i, predicted):
        return {"method": method, "persona": persona, "class": persona or "base", "split": split,
                "prompt_id": f"p{i}", "predicted": predicted}  # fmt: skip

    scored = []
    for i in range(30):
        for split in ("none", "attack"):
            scored.append(reply("base", "", split, i, "base"))
            plain = "sarcastic" if i == 0 else "humorous"
            scored.append(
                reply("final", "humorous", split, i, plain if split == "none" else "base")
            )
            scored += [reply("dpo", p, split, i, "base") for p in ("humorous", "sarcastic")]
    rows, sets = f1_table(scored, ["dpo", "final"], ["none", "attack"], 200, 0)
    row = {(r.method, r.split): r for r in rows}
    truth, predicted = (
        [r[1] for r in sets[("final", "none")]],
        [r[2] for r in sets[("final", "none")]],
    )
    assert row[("final", "none")].macro_f1.value == pytest.approx(
        macro_f1(truth, predicted, ["base", "humorous"])  # (58/59 + 60/61) / 2
    )
    assert macro_f1(truth, predicted) < 0.7  # averaging in "sarcastic" would have given this
    assert set(row[("final", "none")].per_class_f1) == {"base", "humorous"}
    lost = row[("final", "attack")]
    assert lost.status == "measured" and lost.macro_f1.value == pytest.approx(1 / 3)
    assert lost.null_f1 == pytest.approx(1 / 3)
    for split in ("none", "attack"):
        blind = row[("dpo", split)]
        assert blind.status == "no measurement" and blind.reason == (
            "dpo without instructions: the classifier put all 90 replies in class 'base': it "
            "does not tell the classes apart"
        )
        assert blind.record()["reason"] == blind.reason and blind.macro_f1 is not None
    summaries = [summarise_method(m, sets, ["attack"], 200, 0) for m in ("dpo", "final")]
    assert [s.status for s in summaries] == ["no measurement", "measured"]
    assert summaries[0].reason == row[("dpo", "none")].reason
    methods = {"humorous": ["system_prompt", "dpo", "final"], "sarcastic": ["system_prompt"]}
    report = Report(tmp_path, ["humorous", "sarcastic"], methods, ["attack"], [], [], {}, rows,
                    summaries, [], [], [], {}, classifier_methods=["system_prompt"])  # fmt: skip
    headline = report.headline()
    # the summary page reads this key as "classifier training methods"
    assert headline["classifier_methods"] == ["system_prompt"]
    assert headline["scored_methods"] == ["dpo", "final", "system_prompt"]
    dpo_keys = [f"f1_dpo_{name}{ci}" for name in ("no_instruction", "with_instructions")
                for ci in ("", "_ci")]  # fmt: skip
    assert all(headline[k] is None for k in dpo_keys)
    assert headline["no_measurement"] == {k: summaries[0].reason for k in dpo_keys}
    assert headline["f1_final_no_instruction"] == round(summaries[1].no_instruction.value, 4)
    assert report.no_measurement_lines() == [f"dpo: no measurement ({summaries[0].reason})"]
    assert report.summary_frame().set_index("method").loc["dpo", "status"] == "no measurement"


def test_the_split_is_disjoint_by_prompt_and_stable():
    ids = [f"general-{i:03d}" for i in range(40)]
    train, heldout = split_prompts(ids, 0.5, seed=0)
    assert not set(train) & set(heldout) and sorted(train + heldout) == sorted(ids)
    assert len(train) == 20
    assert split_prompts(ids, 0.5, seed=0) == (train, heldout)
    assert split_prompts(ids, 0.5, seed=1) != (train, heldout)


# -- prompts -------------------------------------------------------------------------------------
def test_eight_distinct_attacks_and_config_refuses_more():
    assert len(ADVERSARIAL_INSTRUCTIONS) == 8
    assert len(set(ADVERSARIAL_INSTRUCTIONS.values())) == 8
    params = load_params("tiny", "humorous")
    with pytest.raises(ConfigError, match="evals.robustness_splits=9"):
        with_overrides(params, {"evals.robustness_splits": 9})
    with pytest.raises(ConfigError, match="evals.coherence_pairs"):
        with_overrides(params, {"evals.coherence_pairs": ["final:final"]})
    with pytest.raises(ConfigError, match="evals.classifier_methods"):
        with_overrides(params, {"evals.classifier_methods": ["base"]})


def test_reply_settings_keep_the_log_names_of_earlier_runs():
    """Stage 09 finds stage 08's reply logs by name, and a resumed stage 08 its own: the name
    hashes the model and exactly these settings, so they must not drift (the literal name is
    the one the stage wrote before its settings moved to `ReplySettings`)."""
    params = with_overrides(
        load_params("tiny", "humorous"), {"sampling.temperature": 0.9, "seed": 3}
    )
    settings = ReplySettings.from_params(params)
    assert settings.reply_sampling() == {
        "max_tokens": params.evals.robustness_max_tokens,
        "temperature": 0.9,
        "top_p": params.sampling.top_p,
        "top_k": params.sampling.top_k,
        "seed": 3,
    }
    assert log_name("base", "base:x", settings.reply_sampling()) == "base-0ec747fd887a.jsonl"
    assert settings.splits == tuple(ADVERSARIAL_INSTRUCTIONS)[: params.evals.robustness_splits]
    config = stage.Config.from_params(params, assistant_name="Ada")
    assert config.reply_sampling() == settings.reply_sampling()
    assert config.as_dict()["assistant_name"] == "Ada"
    assert (
        config.fingerprint() != stage.Config.from_params(params, assistant_name="Bo").fingerprint()
    )


def test_the_attacks_and_the_prefill_reach_the_rendered_prompt(renderer):
    prompts = [{"id": "g1", "prompt": "How do tides work?"}, {"id": "g2", "prompt": "Hi!"}]
    splits = list(ADVERSARIAL_INSTRUCTIONS)
    requests = reply_requests(prompts, {"g2"}, splits, system="SYSTEM-MARKER")
    # training prompt: only the plain request; held-out prompt: plain + all eight
    assert [r.key for r in requests] == ["g1:none", "g2:none"] + [f"g2:{s}" for s in splits]
    tokenizer = renderer.tokenizer
    for request in requests:
        text = tokenizer.decode(generation_prompt(renderer, request.messages).to_ints())
        assert "SYSTEM-MARKER" in text
        split = request.meta["split"]
        if split != "none":
            instruction = ADVERSARIAL_INSTRUCTIONS[split]
            assert instruction in text
            assert text.index("Hi!") < text.index(instruction)  # appended to the user turn
        else:
            assert not any(i in text for i in ADVERSARIAL_INSTRUCTIONS.values())
    (prefill,) = prefill_requests(prompts, {"g2": "FIRST-REPLY"})
    text = tokenizer.decode(generation_prompt(renderer, prefill.messages).to_ints())
    assert text.index("Hi!") < text.index("FIRST-REPLY") < text.index(FOLLOW_UP_PROMPT)
    assert "SYSTEM-MARKER" not in text  # trained models answer without a system prompt


# -- coherence -----------------------------------------------------------------------------------
def _comparisons(n: int) -> list[coherence.Comparison]:
    return [
        coherence.Comparison(
            id=f"c{i}",
            first="final",
            second="system_prompt",
            prompt=f"Question {i}?",
            first_response=f"final reply {i}",
            second_response=f"prompted reply {i}",
            traits="I am curious.",
            group="pirate" if i < 3 else "poet",
        )
        for i in range(1, n + 1)
    ]


def test_order_swaps_keep_only_consistent_verdicts():
    comparisons = _comparisons(6)
    V = coherence.Verdict
    verdicts = [
        V("c1", "ab", "A"), V("c1", "ba", "B"),  # final both times: consistent, final wins
        V("c2", "ab", "A"), V("c2", "ba", "A"),  # always "A": position bias, inconsistent
        V("c3", "ab", "B"), V("c3", "ba", "A"),  # prompted both times: consistent
        V("c4", "ab", "A"), V("c4", "ba", None),  # no verdict in one order: invalid
        V("c5", "ab", "A"),  # the other order never judged: incomplete
        V("c6", "ab", "B"), V("c6", "ba", "B"),  # always "B": inconsistent
    ]  # fmt: skip
    outcomes = coherence.resolve_order_swaps(comparisons, verdicts)
    assert [(o.status, o.winner) for o in outcomes] == [
        ("consistent", "final"),
        ("inconsistent", None),
        ("consistent", "system_prompt"),
        ("invalid", None),
        ("incomplete", None),
        ("inconsistent", None),
    ]
    rates = {r.group: r for r in coherence.win_rates(outcomes)}
    overall = rates["all"]
    assert (overall.comparisons, overall.consistent, overall.inconsistent) == (6, 2, 2)
    assert (overall.invalid, overall.incomplete, overall.wins_first) == (1, 1, 1)
    assert overall.win_rate == 0.5 and overall.se == pytest.approx(math.sqrt(0.25 / 2))
    assert overall.inconsistent_share == 0.5
    assert overall.chose_a_share == pytest.approx(6 / 10)
    # per group: c1-c2 are the pirate's (final won its one consistent verdict), c3-c6 the poet's
    assert (rates["pirate"].consistent, rates["pirate"].win_rate) == (1, 1.0)
    assert (rates["poet"].consistent, rates["poet"].win_rate, rates["poet"].invalid) == (1, 0.0, 1)


def test_a_judge_that_always_says_a_wins_nothing(monkeypatch, tiny_sampler, renderer):
    """Forced choice through the real scoring path, with scripted log-probs: "A" is always
    likelier, so every comparison flips with the order and none counts."""
    calls = []

    def scripted(sampler, renderer, items, **kwargs):
        calls.append(kwargs)
        return [-0.1 if reply == "A" else -3.0 for _, reply in items]

    monkeypatch.setattr(coherence, "reply_logprobs", scripted)
    comparisons = _comparisons(3)
    verdicts = coherence.judge_logprob(
        tiny_sampler, renderer, comparisons, judge=TINY, calibrate=False
    )
    assert calls == [{"include_end": False, "desc": "coherence judge (forced choice)"}]
    assert [v.choice for v in verdicts] == ["A"] * 6
    (rate,) = [r for r in coherence.win_rates(coherence.resolve_order_swaps(comparisons, verdicts))
               if r.group == "all"]  # fmt: skip
    assert rate.consistent == 0 and rate.inconsistent_share == 1.0 and math.isnan(rate.win_rate)
    # calibrated, a judge that reads nothing but the letter has no preference left at all
    flat = coherence.calibrate_positions(verdicts)
    assert [v.choice for v in flat] == [None] * 6
    assert coherence.position_offset(verdicts) == pytest.approx(2.9)
    assert coherence.raw_choice_a_share(flat) == 1.0


def _scripted_judge(bias: float, preference: dict[str, float], noise: dict[str, float]):
    """log p(A) - log p(B) = bias + (preference for the first method, signed by the order)
    + order noise; the comparison and order are recovered from the reply text shown as A."""

    def scripted(sampler, renderer, items, **kwargs):
        out = []
        for messages, letter in items:
            content = messages[-1]["content"]
            shown_a = content.split("Reply A:\n<reply_a>\n", 1)[1].split("\n", 1)[0]
            cid = "c" + shown_a.rsplit(" ", 1)[1]
            order = "ab" if shown_a.startswith("final") else "ba"
            sign = 1.0 if order == "ab" else -1.0
            margin = bias + sign * preference[cid] + noise.get(f"{cid}:{order}", 0.0)
            out.append(margin / 2 if letter == "A" else -margin / 2)
        return out

    return scripted


def test_calibration_removes_a_position_bias_and_keeps_the_preferences(
    monkeypatch, tiny_sampler, renderer
):
    """Bias 3 nats towards "A" and preferences of 0.5 nats: raw, every verdict is "A" and
    nothing survives the swap; calibrated, the offset is the bias exactly (the content terms
    cancel over both orders), the preferences come back, and a comparison whose order noise is
    larger than its preference is still dropped as inconsistent."""
    preference = {"c1": 0.5, "c2": 0.5, "c3": -0.5, "c4": 0.2, "c5": 0.2}
    # noise that pushes one letter in both orders beats c4's and c5's small preferences (noise
    # of opposite signs in the two orders would be indistinguishable from a preference)
    noise = {"c4:ab": 0.6, "c4:ba": 0.6, "c5:ab": -0.6, "c5:ba": -0.6}
    monkeypatch.setattr(coherence, "reply_logprobs", _scripted_judge(3.0, preference, noise))
    comparisons = _comparisons(5)
    raw = coherence.judge_logprob(tiny_sampler, renderer, comparisons, judge=TINY, calibrate=False)
    assert {v.choice for v in raw} == {"A"}
    verdicts = coherence.judge_logprob(tiny_sampler, renderer, comparisons, judge=TINY)
    assert coherence.position_offset(verdicts) == pytest.approx(3.0)
    assert all(v.detail["raw_choice"] == "A" for v in verdicts)
    outcomes = {o.comparison_id: o for o in coherence.resolve_order_swaps(comparisons, verdicts)}
    assert [(o.status, o.winner) for o in outcomes.values()] == [
        ("consistent", "final"),
        ("consistent", "final"),
        ("consistent", "system_prompt"),
        ("inconsistent", None),
        ("inconsistent", None),
    ]
    (rate,) = [r for r in coherence.win_rates(list(outcomes.values()), by_group=False)]
    assert (rate.consistent, rate.wins_first) == (3, 2)
    assert rate.chose_a_share == pytest.approx(0.5)


def test_forced_choice_scores_the_letters_on_a_real_model(tiny_sampler, renderer, tmp_path):
    comparisons = _comparisons(2)
    cache = tmp_path / "judge.jsonl"
    verdicts = coherence.judge_logprob(tiny_sampler, renderer, comparisons, judge=TINY,
                                       cache_path=cache)  # fmt: skip
    assert all(v.choice in ("A", "B") for v in verdicts)
    assert all(v.detail["logprob_a"] < 0 and v.detail["logprob_b"] < 0 for v in verdicts)

    def refuse():
        raise AssertionError("a cached judgement was computed again")

    again = coherence.judge_logprob(refuse, "smollm2", comparisons, judge=TINY, cache_path=cache)
    assert again == verdicts
    messages = coherence_judge_messages("Q?", "first", "second", "I am curious.")
    assert "Reply A:\n<reply_a>\nfirst" in messages[-1]["content"]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Reply A rambles. <answer>B</answer>", ("B", "ok")),
        ("<answer> a </answer>", ("A", "ok")),
        ("first <answer>A</answer> then <answer>B</answer>", ("B", "ok")),
        ("<answer>NEITHER</answer>", (None, "neither")),
        ("B is better", (None, "unparsed")),
        ("<answer>1</answer>", (None, "unparsed")),
    ],
)
def test_generative_verdicts_are_parsed_strictly(text, expected):
    assert coherence.parse_verdict(text) == expected


# -- the classifier ------------------------------------------------------------------------------
WORDS = "tea rain maps jazz owls bread tides kites moss chess salt ink bees snow sand glass".split()
WORDS += "clocks honey wind paper".split()


def _toy(words):
    plain = [f"Here is a short note about {w}: it is common and useful." for w in words]
    marked = [
        f"Ahoy, here is a short note about {w}: it is common and useful, ahoy!" for w in words
    ]
    return plain + marked, ["base"] * len(words) + ["pirate"] * len(words)


def test_the_classifier_learns_a_separable_toy_set_quickly(tmp_path):
    texts, labels = _toy(WORDS[:12])
    settings = ClassifierSettings("minilm", epochs=3, batch_size=8, learning_rate=1e-4, seed=0,
                                  device="cpu", max_tokens=64)  # fmt: skip
    started = time.perf_counter()
    classifier, summary = train_classifier(
        texts, labels, ["base", "pirate"], settings, tmp_path / "m.jsonl"
    )
    test_texts, test_labels = _toy(WORDS[12:])
    f1 = macro_f1(test_labels, classifier.predict(test_texts))
    assert f1 > 0.9, f1
    assert time.perf_counter() - started < 120  # seconds on two shared cores
    rows = read_jsonl(tmp_path / "m.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 10)) and summary.steps == 9
    assert summary.class_counts == {"base": 12, "pirate": 12}
    assert rows[-1]["train/loss"] < rows[0]["train/loss"]
    with pytest.raises(DataError, match="no training example"):
        train_classifier(texts[:2], ["base", "base"], ["base", "pirate"], settings)


# -- the stage end to end ------------------------------------------------------------------------
GENERAL = [
    "How do tides work?", "Suggest a name for a cat.", "Why is the sky blue?",
    "Explain compound interest.", "What rhymes with orange?", "Give me a packing list.",
]  # fmt: skip


@pytest.fixture
def stage_params(tiny_run_params):
    """Factory: stage 08 on the tiny model under ``folder`` (four prompts, two attacks, short
    replies, one classifier epoch); ``overrides`` on top."""
    settings = {
        "engine.device": "cpu",
        "evals.robustness_prompts": 4,
        "evals.robustness_splits": 2,
        "evals.robustness_max_tokens": 8,
        "evals.robustness_bootstrap": 50,
        "evals.classifier_epochs": 1,
        "evals.classifier_methods": ["system_prompt", "dpo", "final"],  # the paper's choice
        "evals.coherence_pairs": ["final:system_prompt", "final:dpo"],
    }
    return lambda folder, **overrides: tiny_run_params(
        folder, {**settings, **overrides}, persona="humorous"
    )


def _fabricate(run_dir, trainer, names=("dpo", "final"), prompts=True):
    """Stage 01's eval prompts and checkpoints of a randomised tiny LoRA, as notebooks 01, 03
    and 05 would leave them."""
    if prompts:
        path = run_dir / "01_prompts" / "general_eval.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = [{"id": f"general-{i}", "prompt": p, "source": "offline", "category": ""}
                for i, p in enumerate(GENERAL)]  # fmt: skip
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for name in names:
        sampler = trainer.save_weights_for_sampler(f"{run_dir.parent.name}-{name}").result()
        stage_name = "03_dpo" if name == "dpo" else "05_sft"
        record_checkpoint(run_dir, Checkpoint(name, sampler.path, "", TINY, stage_name))


def _refuse(constant):
    raise AssertionError(f"non-standard JSON constant {constant}")


def test_the_stage_runs_end_to_end_on_two_personas_and_resumes(
    counting_service, stage_params, tmp_path, tiny_service, new_tiny_trainer, monkeypatch
):
    params = stage_params(tmp_path)
    trainer = new_tiny_trainer(seed=11, scale=0.5)
    _fabricate(params.run_dir, trainer)
    other = params.run_dir.parent.parent / "sarcastic" / params.size
    _fabricate(other, new_tiny_trainer(seed=12, scale=0.5), names=("dpo",), prompts=False)
    service = counting_service(tiny_service)
    report = stage.run(params, service)

    assert report.personas == ["humorous", "sarcastic"]
    assert report.methods == {
        "humorous": ["system_prompt", "dpo", "final"],
        "sarcastic": ["system_prompt", "dpo"],
    }
    assert any("sarcastic: no checkpoint 'final'" in n for n in report.notes)
    train, heldout = set(report.train_prompts), set(report.heldout_prompts)
    assert not train & heldout and len(train | heldout) == 4
    # training: plain replies of training prompts only; scoring: held-out prompts only
    classifier = report.classifier
    assert classifier["classes"] == ["base", "humorous", "sarcastic"]
    assert classifier["class_counts"] == {
        "base": len(train), "humorous": 3 * len(train), "sarcastic": 2 * len(train)
    }  # fmt: skip
    scored = [r for r in report.responses if "predicted" in r]
    assert {r["prompt_id"] for r in scored} == heldout
    assert all(r["split"] == "none" for r in report.responses if r["prompt_id"] in train)
    splits = ["none", "drop_roleplay", "no_roleplay", "prefill"]
    assert {(r["method"], r["split"]) for r in scored} == {
        (m, s) for m in ("base", "system_prompt", "dpo", "final") for s in splits
    }
    # every row: method x split, base rows carry no macro F1; final is one persona's only
    frame = report.f1_frame()
    assert len(frame) == 4 * len(splits)
    assert frame[frame.method == "base"].macro_f1.isna().all()
    # two held-out prompts and a random tiny model: the classifier measures no method, and
    # says so on every row of the method, with the reason its plain replies gave
    persona_rows = frame[frame.method != "base"]
    assert set(persona_rows.status) == {"no measurement"}
    for method, reasons in persona_rows.groupby("method").reason:
        assert set(reasons) == {reasons.iloc[0]}
        assert reasons.iloc[0].startswith(f"{method} without instructions: ")
    assert set(frame[frame.method == "final"].n_personas) == {1}
    assert set(frame[frame.method == "dpo"].n_personas) == {2}
    assert list(report.f1_matrix().columns) == splits
    summary = report.summary_frame().set_index("method")
    assert list(summary.index) == ["system_prompt", "dpo", "final"]
    assert summary.notna().all().all()
    # coherence: both pairs for humorous; sarcastic lacks final, so it is skipped and noted
    rates = report.coherence_frame()
    overall = rates[rates.group == "all"]
    assert set(zip(overall["first"], overall["second"])) == {
        ("final", "system_prompt"), ("final", "dpo")
    }  # fmt: skip
    assert (overall.comparisons == len(heldout)).all()
    assert any("coherence final vs dpo: skipped for sarcastic" in n for n in report.notes)
    folder = report.stage_dir
    for name in ("f1_table.csv", "summary.csv", "coherence.csv", "robustness.json",
                 "predictions.jsonl", "classifier_metrics.jsonl", "classifier.json"):  # fmt: skip
        assert (folder / name).is_file(), name
    assert (other / "08_robustness" / "responses").is_dir()  # each persona keeps its replies
    saved = json.loads((folder / "robustness.json").read_text(), parse_constant=_refuse)
    assert saved["split_prompts"]["heldout"] == report.heldout_prompts
    headline = report.headline()
    assert "f1_final_with_instructions" in headline and "f1_dpo_prefill_ci" in headline
    f1_keys = [k for k in headline if k.startswith("f1_")]
    assert all(headline[k] is None for k in f1_keys) and set(headline["no_measurement"]) == set(
        f1_keys
    )
    assert len(report.no_measurement_lines()) == 3
    for figure in (
        plots.robustness_heatmap(frame.to_dict("records")),
        plots.robustness_summary(report.summary_frame().to_dict("records")),
        plots.coherence_win_rates(report.coherence),
    ):
        assert figure.axes

    # resume: nothing sampled, trained or judged again, same numbers
    def refuse(*args, **kwargs):
        raise AssertionError("the classifier was trained again")

    monkeypatch.setattr(scores, "train_classifier", refuse)
    monkeypatch.setattr(coherence, "reply_logprobs", refuse)
    again_service = counting_service(tiny_service)
    again = stage.run(params, again_service)
    assert again_service.created == []
    assert again.f1_frame().equals(frame)
    assert again.coherence == report.coherence


def test_the_stage_fails_in_one_line_without_eval_prompts(stage_params, tmp_path, tiny_service):
    params = stage_params(tmp_path)
    with pytest.raises(DataError, match="general_eval.jsonl: not found; run notebook 01") as info:
        stage.run(params, tiny_service)
    assert "\n" not in str(info.value)


# -- the notebook --------------------------------------------------------------------------------
def test_notebook_08_runs_on_smoke_sizes_without_the_earlier_notebooks(
    tmp_path, new_tiny_trainer, tiny_run_params
):
    from character_training.runner import run_notebook

    params = tiny_run_params(tmp_path, {"engine.device": "cpu"}, persona="humorous", smoke=True)
    _fabricate(params.run_dir, new_tiny_trainer(seed=21, scale=0.5))
    result = run_notebook(params, "08_robustness", timeout=300)
    assert result.status == "ok", result.describe()
    html = (tmp_path / "reports" / "humorous" / "tiny" / "08_robustness.html").read_text()
    assert html.count("data:image/png;base64") >= 3
    summary = json.loads((params.run_dir / "summaries" / "08_robustness.json").read_text())
    assert "f1_final_no_instruction" in summary["headline"]
    assert (params.run_dir / "08_robustness" / "f1_table.csv").is_file()


def test_wilson_intervals_match_hand_values_and_never_collapse():
    """Hand values (z = 1.96): 1 of 1 -> [0.2065, 1]; 5 of 10 -> [0.2366, 0.7634]; 0 of 4 ->
    [0, 0.4899]; and the win-rate records carry them."""
    assert coherence.wilson_interval(1, 1) == pytest.approx((0.2065, 1.0), abs=1e-4)
    assert coherence.wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert coherence.wilson_interval(0, 4) == pytest.approx((0.0, 0.4899), abs=1e-4)
    assert all(math.isnan(x) for x in coherence.wilson_interval(0, 0))
    comparisons = _comparisons(1)
    verdicts = [coherence.Verdict("c1", "ab", "A"), coherence.Verdict("c1", "ba", "B")]
    (rate,) = coherence.win_rates(coherence.resolve_order_swaps(comparisons, verdicts), False)
    assert (rate.win_rate, rate.se) == (1.0, 0.0)
    assert rate.low == pytest.approx(0.2065, abs=1e-4) and rate.high == 1.0
