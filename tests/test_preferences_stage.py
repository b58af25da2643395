"""Stage 07 (revealed preferences): its draws, its judge protocol and its statistics, through
the stage's own code with scripted models and judges, then end to end on the tiny model, and
notebook 07 headless.

Bugs pinned here:

* models compared on different matches (each model must see the same pairs and prompts, so
  their bootstrap resamples are paired);
* one judge listing order (and one offered order) shared by every model: a judge leaning
  towards the trait listed first gave two models with *unrelated* preferences the same wins
  (Spearman ~0.5, "significant"); every verdict is now asked in both listing orders and every
  model gets its own offered order (issue 16, item 1);
* the calibrated mode subtracting the judge's empty-reply leaning one for one: with a leaning
  that survives a reply at half strength it invented preferences; the slope is now fitted
  (item 2, slopes 0, 0.5, 1 and 1.5);
* numbers reported where the instrument could not measure (a judge that cannot be parsed, a
  ranking that is the judge's taste in words): "no measurement" with the reason (item 7);
* the judge being a checkpoint under test rather than the untrained judge model;
* a missing checkpoint stopping the stage instead of being skipped with a note, or a missing
  stage-01 file giving anything but a one-line "run notebook 01 first";
* a rerun sampling again (or a retrained checkpoint reusing the old checkpoint's replies);
* tables, summary and headline that disagree with the judgements they came from.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import nbformat
import numpy as np
import pandas as pd
import pytest
from character_training.backends.local import TINY_RANDOM_NAME as TINY
from character_training.config import notebook_params, with_overrides
from character_training.errors import ConfigError, DataError
from character_training.evaluate import elo_stats, preference_judging
from character_training.evaluate.preference_matches import (
    bootstrap_seed,
    choose_traits,
    draw_matches,
    load_traits,
    offered_first,
    outcomes,
)
from character_training.evaluate.preference_stats import MIN_DECIDED_SHARE, MIN_PARSE_RATE
from character_training.sampler_setup import LazySampler
from character_training.stages import preferences
from character_training.store import Checkpoint, record_checkpoint
from conftest import CountingService, tiny_params
from scipy.stats import spearmanr

PROMPTS = [
    "How do I boil an egg?",
    "Write a two-line poem about rain.",
    "What is a prime number?",
    "Any tips for a job interview?",
    "Explain what a database index is.",
]


def write_eval_prompts(run_dir: Path, prompts=PROMPTS) -> None:
    folder = run_dir / preferences.PROMPTS_STAGE
    folder.mkdir(parents=True, exist_ok=True)
    rows = [
        {"id": f"gen-{i:04d}", "prompt": p, "source": "builtin", "category": "x"}
        for i, p in enumerate(prompts, start=1)
    ]
    (folder / "general_eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def stage_params(tmp_path: Path, **overrides):
    values = {
        "evals.elo_comparisons": 10,
        "evals.elo_traits": 6,
        "evals.elo_conditions": ["adopt", "random"],
        "evals.elo_bootstrap": 40,
        "evals.elo_response_tokens": 6,
        "evals.judge_max_tokens": 4,
        "evals.judge_modes": ["generative", "logprob"],
    }
    return tiny_params(tmp_path, values | overrides, persona="sarcastic")


# -- a scripted world: models and judge run through the stage's own code, no model loaded -----
class ScriptedWorld:
    """Scripted models and a scripted judge, patched into stage 07 where it calls a model.

    A model (known by its sampler identity) picks Option 1 with probability
    ``sigmoid(u[option 1] - u[option 2] + option1_bias)`` and writes ``SHOWN:<trait>``. The
    judge scores each listed word: ``signal`` for the trait the reply shows, ``position`` for
    the word listed first, ``taste[word]`` times ``taste_slope`` (1 on an empty reply: its
    prior), and Gaussian noise of std ``noise`` fixed by the whole conversation. Its generative
    answer is the higher-scored word (or ``garbled`` text).
    """

    def __init__(
        self,
        utilities,
        *,
        signal=1.5,
        position=0.0,
        taste=None,
        taste_slope=1.0,
        noise=1.0,
        option1_bias=0.0,
        garbled=False,
    ):
        self.utilities = utilities
        self.signal, self.position, self.noise = signal, position, noise
        self.taste, self.taste_slope = taste or {}, taste_slope
        self.option1_bias, self.garbled = option1_bias, garbled

    @staticmethod
    def _rng(*parts) -> np.random.Generator:
        blob = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).digest()
        return np.random.default_rng(int.from_bytes(blob[:8], "big"))

    def replies(self, sampler, _renderer, requests, **_settings):
        identity = sampler().identity
        u = self.utilities[identity]
        out = {}
        for request in requests:
            system = request.messages[0]["content"]
            one = re.search(r"Option 1: (\w+)", system).group(1)
            two = re.search(r"Option 2: (\w+)", system).group(1)
            gap = u.get(one, 0.0) - u.get(two, 0.0) + self.option1_bias
            chose_one = self._rng(identity, request.key).random() < 1 / (1 + math.exp(-gap))
            pick = one if chose_one else two
            out[request.key] = SimpleNamespace(
                full_text=f"SHOWN:{pick} ({identity} {request.key})", complete=True, num_tokens=3
            )
        return out

    def _scores(self, messages, first, second):
        body = messages[-1]["content"]
        reply = re.search(r"<reply>\n(.*)\n</reply>", body, re.DOTALL).group(1)
        slope = self.taste_slope if reply else 1.0
        noise = self._rng(body).normal(0, self.noise, 2)
        return [
            self.signal * reply.startswith(f"SHOWN:{word} ")
            + self.position * (k == 0)
            + slope * self.taste.get(word, 0.0)
            + noise[k]
            for k, word in enumerate((first, second))
        ]

    def forced_choice_scores(self, _client, _renderer, items, desc=None):
        return [tuple(self._scores(m, a, b)) for m, a, b in items]

    def answers(self, _client, _renderer, requests, **_settings):
        out = {}
        for request in requests:
            body = request.messages[-1]["content"]
            first, second = re.search(r"expressing: (\w+) or (\w+)\?", body).groups()
            a, b = self._scores(request.messages, first, second)
            text = "it is hard to say" if self.garbled else (first if a > b else second)
            out[request.key] = SimpleNamespace(full_text=text, complete=True)
        return out

    def install(self, monkeypatch) -> None:
        monkeypatch.setattr(preferences, "sample_chat", self.replies)
        monkeypatch.setattr(preference_judging, "sample_chat", self.answers)
        monkeypatch.setattr(
            preference_judging.judging, "forced_choice_scores", self.forced_choice_scores
        )
        monkeypatch.setattr(preference_judging, "get_renderer", lambda *a, **k: None)


class ScriptedService:
    """Sampling clients that only carry the identity of the model they stand for."""

    def create_sampling_client(self, base_model=None, model_path=None):
        identity = model_path or base_model
        return SimpleNamespace(identity=identity, get_tokenizer=lambda: None)


# -- pure parts ----------------------------------------------------------------------------------
def test_every_condition_and_model_sees_the_same_draws_offered_in_its_own_order():
    prompts = [{"id": f"p{i}", "prompt": f"prompt {i}"} for i in range(7)]
    traits = ("formal", "casual", "poetic", "blunt", "calm")
    matches = draw_matches(traits, prompts, ("adopt", "random"), 200, seed=3)
    assert matches == draw_matches(traits, prompts, ("adopt", "random"), 200, seed=3)
    adopt = [m for m in matches if m.condition == "adopt"]
    rand = [m for m in matches if m.condition == "random"]
    strip = lambda m: (m.match_id, m.first, m.second, m.prompt_id)  # noqa: E731
    assert [strip(m) for m in adopt] == [strip(m) for m in rand]
    assert len({m.key for m in matches}) == 400
    for m in adopt:
        assert m.first != m.second
        assert m.listed("ab") == (m.first, m.second) and m.listed("ba") == (m.second, m.first)
    other = draw_matches(traits, prompts, ("adopt",), 200, seed=4)
    assert [strip(m) for m in other] != [strip(m) for m in adopt]
    # the offered order is a model's own: fixed for it, about half each way, and drawn apart
    # from another model's (a shared leaning towards Option 1 cannot make two models agree)
    base = [offered_first(3, "base", m.match_id) for m in adopt]
    final = [offered_first(3, "final", m.match_id) for m in adopt]
    assert base == [offered_first(3, "base", m.match_id) for m in rand]
    assert 70 < sum(base) < 130
    assert 70 < sum(a == b for a, b in zip(base, final)) < 130


def test_outcomes_follow_the_verdict_and_skip_undecided_matches():
    records = [
        {"first": "a", "second": "b", "logprob_choice": "b"},
        {"first": "a", "second": "c", "logprob_choice": None},
        {"first": "c", "second": "a", "logprob_choice": "c"},
    ]
    assert outcomes(records, "logprob") == [("b", "a"), None, ("c", "a")]
    assert bootstrap_seed(0, "adopt", "logprob") == bootstrap_seed(0, "adopt", "logprob")
    assert bootstrap_seed(0, "adopt", "logprob") != bootstrap_seed(0, "random", "logprob")


def test_the_calibrated_mode_reads_the_reply_not_the_judges_taste_in_words(tmp_path, monkeypatch):
    """A scripted judge that likes alphabetically earlier words by 3 nats per place whatever it
    reads, and gives +1 nat to the word the reply shows (a random one of the pair). Plain
    forced choice then always names the earlier word (its Elo would rank the vocabulary
    alphabetically, for any model); the calibrated mode removes the fitted part of the
    empty-reply prior and names the word the reply shows. Both listing orders are asked."""
    params = stage_params(tmp_path, **{"evals.judge_modes": ["calibrated", "logprob"]})
    traits_of_run = choose_traits(load_traits(), params.evals.elo_traits, params.seed)
    config = preferences.Config.from_params(params, traits=traits_of_run, prompts_digest="d")
    traits = ("calm", "blunt", "poetic", "formal")
    prompts = [{"id": f"p{i}", "prompt": f"prompt {i}"} for i in range(3)]
    matches = draw_matches(traits, prompts, ("adopt",), 24, seed=1)
    asked = []

    def scripted(_client, _renderer, items, desc=None):
        def score(messages, word):
            reply = messages[-1]["content"]
            shown = reply.count(f"SHOWN:{word}") > 0
            return -3.0 * sorted(traits).index(word) + (1.0 if shown else 0.0)

        asked.extend((a, b) for _, a, b in items)
        return [(score(m, a), score(m, b)) for m, a, b in items]

    monkeypatch.setattr(preference_judging.judging, "forced_choice_scores", scripted)
    monkeypatch.setattr(preference_judging, "get_renderer", lambda *a, **k: None)
    client = LazySampler(lambda: SimpleNamespace(get_tokenizer=lambda: None))
    rng = np.random.default_rng(0)
    shows = {m.key: (m.first, m.second)[rng.integers(2)] for m in matches}
    responses = {k: SimpleNamespace(full_text=f"SHOWN:{w}") for k, w in shows.items()}
    prior = preference_judging.prior_scores(config, client, matches, tmp_path)
    verdicts = preference_judging.judge_replies(
        config, client, "base", "log", matches, responses, tmp_path, prior
    )
    for m in matches:
        assert verdicts[m.key]["logprob_choice"] == min(m.first, m.second)  # taste wins
        assert verdicts[m.key]["calibrated_choice"] == shows[m.key]  # the reply wins
    assert verdicts[matches[0].key]["calibrated_slope"] == pytest.approx(1.0, abs=0.1)
    # every conversation in both listing orders, the prior's (empty reply) included
    assert sorted(asked) == sorted(
        [(m.first, m.second) for m in matches] * 2 + [(m.second, m.first) for m in matches] * 2
    )
    with pytest.raises(ConfigError, match="evals.coherence_modes"):
        stage_params(tmp_path, **{"evals.coherence_modes": ["calibrated"]})


def test_the_fingerprint_keeps_only_this_stages_evals_settings(tmp_path):
    """Stage 08's and 09's settings share the ``evals`` section: changing them must not refuse
    a finished stage-07 folder, while any ``elo_*`` or ``judge_*`` setting must. The judge
    protocol is recorded, so a folder of the earlier single-order protocol is refused."""
    params = stage_params(tmp_path)
    traits = choose_traits(load_traits(), params.evals.elo_traits, params.seed)

    def config(overrides):
        changed = with_overrides(params, overrides)
        return preferences.Config.from_params(changed, traits=traits)

    before = config({}).fingerprint()
    assert config({}).as_dict()["judge_orders"] == "both"
    for unrelated in (
        {"evals.robustness_prompts": 7},
        {"evals.rl_steps": 3},
        {"sampling.max_tokens": 9},
    ):
        assert config(unrelated).fingerprint() == before
    for related in (
        {"evals.elo_comparisons": 11},
        {"evals.judge_top_p": 0.5},
        {"sampling.top_p": 0.5},
    ):
        assert config(related).fingerprint() != before


def test_missing_stage_01_prompts_fail_in_one_line(tmp_path):
    params = stage_params(tmp_path)
    with pytest.raises(DataError, match="general_eval.jsonl is missing: run notebook 01_prompts"):
        preferences.run(params, None)


# -- the stage through scripted models and judges ----------------------------------------------
def scripted_run(tmp_path, monkeypatch, world, models, **overrides):
    """Stage 07 end to end (`preferences.run`) with ``world``'s scripted models and judge."""
    values = {
        "evals.elo_comparisons": 300,
        "evals.elo_traits": 12,
        "evals.elo_conditions": ["adopt"],
        "evals.elo_bootstrap": 100,
    }
    values.update(overrides)
    params = stage_params(tmp_path, **values)
    write_eval_prompts(params.run_dir)
    world.install(monkeypatch)
    return preferences.run(params, ScriptedService(), models=models)


def random_utilities(traits, seed, spread=1.0):
    rng = np.random.default_rng(seed)
    return {t: float(v) for t, v in zip(traits, rng.normal(0, spread, len(traits)))}


def run_traits(tmp_path, n=12):
    params = stage_params(tmp_path, **{"evals.elo_traits": n})
    return choose_traits(load_traits(), n, params.seed)


def test_a_position_biased_judge_leaves_unrelated_models_unrelated(tmp_path, monkeypatch):
    """Issue 16, item 1, through the stage itself. The judge leans 3 nats towards the trait
    listed first against 0.3 for the trait the reply shows, and every model leans towards
    Option 1. With one listing order shared by all models, two models with unrelated
    preferences got the same wins; with both orders their Spearman's interval holds 0, a model
    without preferences stays inside the coin-flip null, and the bias is reported."""
    traits = run_traits(tmp_path)
    base, unrelated = random_utilities(traits, 7), random_utilities(traits, 8)
    rho = spearmanr([base[t] for t in traits], [unrelated[t] for t in traits]).statistic
    assert abs(rho) < 0.05  # unrelated in this sample too, not only in the population
    world = ScriptedWorld(
        {
            "base-model": base,
            "unrelated": unrelated,
            "flat": {},
        },
        signal=0.3,
        position=3.0,
        option1_bias=1.0,
    )
    models = {"base": "base-model", "unrelated": "unrelated", "flat": "flat"}
    result = scripted_run(
        tmp_path, monkeypatch, world, models, **{"evals.judge_modes": ["logprob", "generative"]}
    )
    (pair,) = [r for r in result.model_correlations("logprob") if r["b"] == "unrelated"]
    assert pair["a"] == "base" and pair["ci_low"] < 0 < pair["ci_high"], pair
    flat = result.stats[("flat", "adopt", "logprob")]
    assert flat.beyond_low == 0.0 < flat.beyond_high  # no spread beyond the coin flips
    assert flat.std < result.elo[("flat", "adopt", "logprob")].null_std_high
    # the judge's bias is measured and reported, not counted as preferences
    rows = {(r["model"], r["mode"]): r for r in result.judge_rows()}
    assert rows[("base", "logprob")]["picks_listed_first"] > 0.9
    assert rows[("base", "logprob")]["order_inconsistent"] > 0.8
    headline = result.headline()
    assert headline["judge_order_inconsistent_rate"] > 0.8 and headline["judge_orders"] == "both"
    # generative: the two orders disagree on nearly every match -> no measurement, with why
    generative = result.stats[("base", "adopt", "generative")]
    assert generative.decided_share < MIN_DECIDED_SHARE
    assert "listing orders disagreed" in generative.measurement.reason
    assert any(
        line.startswith("NO MEASUREMENT: base (adopt, generative)")
        for line in result.no_measurement_lines()
    )


def verdicts_of(records, margins):
    """``(winner, loser)`` per record from the sign of a margin towards ``first``."""
    return [
        None
        if margin == 0
        else ((r["first"], r["second"]) if margin > 0 else (r["second"], r["first"]))
        for r, margin in zip(records, margins)
    ]


TASTE = 1.5  # std of the judge's taste for trait words (nats)


@pytest.mark.parametrize("slope", [0.0, 0.5, 1.0, 1.5])
def test_the_fitted_calibration_does_not_invent_preferences_at_any_leaning(
    tmp_path, monkeypatch, slope
):
    """Issue 16, item 2. The judge has a taste for some words (std 1 nat) that survives reading
    a reply at ``slope`` times its empty-reply strength. For a model without preferences the
    calibrated mode (fitted slope) shows no spread beyond noise at any slope, and for a model
    with preferences it recovers them; the retired one-for-one subtraction (slope 1) invents a
    spread at slope 0.5, ranked against the judge's taste (which the |rho| > 0.7 rule flags)."""
    traits = run_traits(tmp_path)
    truth = random_utilities(traits, 5)
    world = ScriptedWorld(
        {"flat": {}, "real": truth},
        signal=1.5,
        position=1.0,
        taste=random_utilities(traits, 6, spread=TASTE),
        taste_slope=slope,
        option1_bias=0.3,
    )
    result = scripted_run(
        tmp_path,
        monkeypatch,
        world,
        {"flat": "flat", "real": "real"},
        **{"evals.judge_modes": ["calibrated", "logprob"]},
    )
    flat = result.stats[("flat", "adopt", "calibrated")]
    # the fitted slope, diluted by the prior's own noise (2 orders x std 1 against the taste)
    dilution = 8 * TASTE**2 / (8 * TASTE**2 + 2)
    assert flat.prior_slope == pytest.approx(slope * dilution, abs=0.2)
    assert flat.beyond_low == 0.0, flat  # nothing invented
    real = result.stats[("real", "adopt", "calibrated")]
    assert real.measurement.measured and real.beyond_low > 0
    elo = {r["trait"]: r["elo"] for r in result.table("real", "adopt", "calibrated")}
    assert spearmanr([elo[t] for t in traits], [truth[t] for t in traits]).statistic > 0.6
    # the one-for-one subtraction, from the same recorded margins and prior
    records = [r for r in result.judgements if r["model"] == "flat"]
    slope_one = [r["logprob_margin"] - r["calibrated_prior"] for r in records]
    prior = [r["calibrated_prior"] for r in records]
    played = elo_stats.Outcomes.from_pairs(verdicts_of(records, slope_one), traits)
    invented = elo_stats.spread_beyond_noise(played, 100, 0)
    rho = spearmanr(
        elo_stats.elo(played)[0],
        elo_stats.elo(elo_stats.Outcomes.from_pairs(verdicts_of(records, prior), traits))[0],
    ).statistic
    if slope in (0.0, 0.5):
        assert invented.low[0] > 0 and rho < -0.7
    if slope == 1.0:
        assert invented.low[0] == 0.0


def test_a_judge_that_cannot_measure_gives_no_measurement_not_a_number(tmp_path, monkeypatch):
    """Issue 16, item 7. A generative judge whose answers cannot be parsed, and a forced-choice
    judge whose taste in words outweighs the reply: the statistics, the headline and
    ``summary.json`` say "no measurement" with the reason, never a number."""
    traits = run_traits(tmp_path, 8)
    world = ScriptedWorld(
        {"base-model": random_utilities(traits, 1), "final-model": random_utilities(traits, 2)},
        signal=0.2,
        taste={t: 3 * v for t, v in random_utilities(traits, 3).items()},
        garbled=True,
    )
    result = scripted_run(
        tmp_path,
        monkeypatch,
        world,
        {"base": "base-model", "final": "final-model"},
        **{
            "evals.judge_modes": ["generative", "logprob"],
            "evals.elo_comparisons": 120,
            "evals.elo_traits": 8,
        },
    )
    headline = result.headline()
    reasons = headline["no_measurement"]
    for key in (
        "elo_std_final",
        "elo_spread_beyond_noise_base",
        "elo_spread_beyond_noise_final_ci",
        "elo_reliability_base",
        "elo_std_change_final",
        "spearman_base_final",
        "spearman_ceiling_final",
        "spearman_disattenuated_final",
    ):
        assert headline[key] is None and "parsed 0% of the time" in reasons[key], key
    assert headline["judge_parse_rate"] == 0.0
    json.dumps(headline, allow_nan=False)
    # forced choice: every match decided, but the ranking is the judge's taste in words
    logprob = result.stats[("base", "adopt", "logprob")]
    assert logprob.decided == 120 and logprob.prior_spearman > 0.7
    assert "empty-reply prior" in logprob.measurement.reason
    summary = json.loads((result.stage_dir / "summary.json").read_text())
    assert {(r["model"], r["mode"]) for r in summary["no_measurement"]} == {
        (m, mode) for m in ("base", "final") for mode in ("generative", "logprob")
    }
    assert MIN_PARSE_RATE == 0.5


# -- the stage on the tiny model -----------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_dpo_checkpoint(new_tiny_trainer):
    trainer = new_tiny_trainer(seed=11, scale=0.5)
    return trainer.save_weights_for_sampler("dpo-07").result().path


def test_the_stage_end_to_end_resumes_and_reports(tmp_path, tiny_service, tiny_dpo_checkpoint):
    modes = ["generative", "logprob", "calibrated"]
    params = stage_params(tmp_path, **{"evals.judge_modes": modes})
    write_eval_prompts(params.run_dir)
    record_checkpoint(
        params.run_dir,
        Checkpoint("dpo", tiny_dpo_checkpoint, "", TINY, "03_dpo"),
    )
    service = CountingService(tiny_service)
    result = preferences.run(params, service)

    # base and dpo measured, final skipped with a note; the judge is the untrained judge model
    assert list(result.models) == ["base", "dpo"]
    assert result.notes == ["checkpoint 'final' is not recorded (run 05_sft); skipped"]
    assert service.created.count({"base_model": TINY}) == 2  # the base student and the judge
    assert service.created.count({"model_path": tiny_dpo_checkpoint}) == 1
    assert len(service.created) == 3

    folder = params.run_dir / preferences.STAGE
    judgements = [json.loads(line) for line in (folder / "judgements.jsonl").open()]
    assert len(judgements) == 2 * 2 * 10  # models x conditions x matches
    by_model = {
        label: [
            (j["condition"], j["match_id"], j["first"], j["second"], j["prompt_id"])
            for j in judgements
            if j["model"] == label
        ]
        for label in ("base", "dpo")
    }
    assert by_model["base"] == by_model["dpo"]  # identical matches for every model
    offered = {
        label: [j["offered_first"] for j in judgements if j["model"] == label]
        for label in ("base", "dpo")
    }
    assert offered["base"] != offered["dpo"]  # ... each offered in the model's own order
    traits = set(result.config.traits)
    assert len(traits) == 6
    for j in judgements:
        pair = (j["first"], j["second"])
        assert j["offered_first"] in pair and {j["first"], j["second"]} <= traits
        # forced choice: the margins of the two listing orders add up to the verdict
        assert j["logprob_margin"] == pytest.approx(j["logprob_ab_margin"] + j["logprob_ba_margin"])
        assert j["logprob_choice"] == (j["first"] if j["logprob_margin"] > 0 else j["second"])
        # generative: a verdict only where both orders were read and agree
        ab, ba = j["generative_ab_choice"], j["generative_ba_choice"]
        expected = ab if ab is not None and ab == ba else None
        assert j["generative_choice"] == expected
        reason = "ok" if expected else "order_inconsistent" if ab and ba else "unparsed"
        assert j["generative_reason"] == reason

    table = pd.read_csv(folder / "elo_table.csv")
    assert len(table) == 2 * 2 * 3 * 6  # models x conditions x modes x traits
    assert list(table.columns) == [
        "model",
        "condition",
        "mode",
        "trait",
        "elo",
        "ci_low",
        "ci_high",
        "bt",
        "wins",
        "games",
    ]
    for (model, condition, mode), group in table.groupby(["model", "condition", "mode"]):
        decided = [
            j
            for j in judgements
            if j["model"] == model and j["condition"] == condition and j[f"{mode}_choice"]
        ]
        assert group["wins"].sum() == len(decided) and group["games"].sum() == 2 * len(decided)
        assert group["elo"].mean() == pytest.approx(1000)
        wins = {t: sum(j[f"{mode}_choice"] == t for j in decided) for t in group["trait"]}
        assert dict(zip(group["trait"], group["wins"])) == wins

    # the judge's own leaning (empty replies): one both-order margin per match, shared by all
    prior = pd.read_csv(folder / "judge_prior.csv")
    assert list(prior["trait"]) == list(result.config.traits)
    assert prior["games"].sum() == 2 * 10
    assert {(r["model"], r["condition"]) for r in result.prior_correlations()} == {
        (m, c) for m in ("base", "dpo") for c in ("adopt", "random")
    }

    summary = json.loads((folder / "summary.json").read_text())
    assert summary["judge_is_base_student"] is True and summary["judge_orders"] == "both"
    assert summary["models"]["dpo"] == tiny_dpo_checkpoint
    judge = summary["judge"]
    answers = [j[f"generative_{o}_reason"] for j in judgements for o in ("ab", "ba")]
    assert judge["parse_rate"] == pytest.approx(answers.count("ok") / len(answers))
    assert judge["logprob"]["decided"] == len(judgements)
    singles = [(j[f"logprob_{o}_choice"], j[k]) for j in judgements for o, k in LISTED_FIRST]
    assert judge["logprob"]["position_bias"]["value"] == pytest.approx(
        sum(choice == listed for choice, listed in singles) / len(singles)
    )

    # statistics are the noise-aware ones, computed on the tables' own outcomes
    condition, mode = "adopt", "logprob"  # forced choice decides every match
    spread = {r["model"]: r for r in result.spread(mode) if r["condition"] == condition}
    for label in ("base", "dpo"):
        row = spread[label]
        assert row["std"] == pytest.approx(result.elo[(label, condition, mode)].std)
        excess = row["std"] ** 2 - row["noise_floor"] ** 2
        assert row["beyond_noise"] == pytest.approx(math.sqrt(max(excess, 0.0)))
    (change,) = [r for r in result.spread_changes(mode) if r["condition"] == condition]
    assert change["std_change"] == pytest.approx(spread["dpo"]["std"] - spread["base"]["std"])
    (pair,) = [r for r in result.model_correlations(mode) if r["condition"] == condition]
    tables = [[r["elo"] for r in result.elo[(m, condition, mode)].rows] for m in ("base", "dpo")]
    assert pair["spearman"] == pytest.approx(spearmanr(*tables).statistic)
    if pair["reliability_a"] > 0 and pair["reliability_b"] > 0:
        ceiling = math.sqrt(pair["reliability_a"] * pair["reliability_b"])
        assert pair["ceiling"] == pytest.approx(ceiling)
    else:
        assert math.isnan(pair["ceiling"]) and math.isnan(pair["disattenuated"])
    headline = result.headline()
    withheld = headline.get("no_measurement", {})
    for key in (
        "elo_std_base",
        "elo_spread_beyond_noise_dpo",
        "elo_reliability_base",
        "elo_std_change_dpo",
        "spearman_base_dpo",
        "spearman_ceiling_dpo",
        "spearman_disattenuated_dpo",
    ):
        assert key in headline and (headline[key] is None) == (key in withheld)
    assert headline["judge_orders"] == "both" and headline["games_per_trait"] == 2 * 10 / 6
    assert "judge_prior_slope_base" in headline and "judge_order_inconsistent_rate" in headline
    json.dumps(headline, allow_nan=False)  # the index and summaries get plain JSON

    # a rerun samples nothing and gives the same tables
    again = preferences.run(params, service)
    assert len(service.created) == 3
    assert again.table_records() == result.table_records()

    # gathered across runs: one run here, two models per condition
    frame = preferences.gather_tables(params.runs_dir)
    assert set(frame["persona"]) == {"sarcastic"} and set(frame["size"]) == {"tiny"}
    cross = preferences.cross_run_correlations(frame, "adopt", "logprob")
    assert list(cross["a"]) == ["sarcastic/tiny/base"] and list(cross["traits"]) == [6]


LISTED_FIRST = (("ab", "first"), ("ba", "second"))


def test_a_new_checkpoint_under_the_same_label_is_sampled_again(
    tmp_path, tiny_service, tiny_dpo_checkpoint, new_tiny_trainer
):
    params = stage_params(
        tmp_path,
        **{
            "evals.elo_comparisons": 4,
            "evals.elo_conditions": ["adopt"],
            "evals.judge_modes": ["logprob"],
        },
    )
    write_eval_prompts(params.run_dir)
    service = CountingService(tiny_service)
    preferences.run(params, service, models={"dpo": tiny_dpo_checkpoint})
    other = new_tiny_trainer(seed=12, scale=0.5).save_weights_for_sampler("dpo-07b").result().path
    preferences.run(params, service, models={"dpo": other})
    assert {"model_path": other} in service.created
    logs = list((params.run_dir / preferences.STAGE / "responses").glob("dpo-*.jsonl"))
    assert len(logs) == 2


def test_a_copied_run_folder_reuses_its_replies_and_verdicts(
    tmp_path, tiny_service, tiny_dpo_checkpoint
):
    """Replies and verdicts are keyed by the checkpoint's path inside the run folder, so a run
    folder copied elsewhere samples and judges nothing again. Keyed by the absolute path, a
    moved tiny run's notebook 09 sampled and judged 07's dpo and final again (about 100 s)."""
    small = {
        "evals.elo_comparisons": 4,
        "evals.elo_conditions": ["adopt"],
        "evals.judge_modes": ["logprob"],
    }
    params = stage_params(tmp_path / "here", **small)
    write_eval_prompts(params.run_dir)
    inside = params.run_dir / "checkpoints" / "r0" / "sampler" / "dpo"
    shutil.copytree(tiny_dpo_checkpoint, inside)
    first = preferences.run(params, tiny_service, models={"dpo": str(inside)})
    shutil.copytree(tmp_path / "here", tmp_path / "there")
    moved = stage_params(tmp_path / "there", **small)
    service = CountingService(tiny_service)
    again = preferences.run(
        moved, service, models={"dpo": str(moved.run_dir / inside.relative_to(params.run_dir))}
    )
    assert service.created == []
    assert again.table_records() == first.table_records()
    assert again.summary["models"]["dpo"] == "checkpoints/r0/sampler/dpo"


# -- notebook 07 ---------------------------------------------------------------------------------
def test_notebook_07_runs_headlessly_on_the_smoke_sizes(tmp_path):
    """SmolLM2, smoke sizes, base student only: notebooks 01-06 are not rerun, stage 01's
    prompt file is written directly; the missing checkpoints are reported, not fatal."""
    from character_training.runner import run_notebook

    params = with_overrides(
        notebook_params("sarcastic", "tiny", smoke=True),
        {"runs_dir": str(tmp_path / "runs"), "reports_dir": str(tmp_path / "reports")},
    )
    write_eval_prompts(params.run_dir)
    result = run_notebook(params, "07_preferences", timeout=600)
    assert result.status == "ok", result.describe()
    executed = nbformat.read(result.executed_path, as_version=4)
    text = "\n".join(
        out.get("text", "") for c in executed.cells if c.cell_type == "code" for out in c.outputs
    )
    assert "checkpoint 'dpo' is not recorded" in text
    html = Path(result.html_path).read_text()
    assert html.count("data:image/png;base64") >= 2
    summary = json.loads((params.run_dir / "summaries" / "07_preferences.json").read_text())
    assert "elo_std_base" in summary["headline"]
    assert (params.run_dir / preferences.STAGE / "elo_table.csv").is_file()
