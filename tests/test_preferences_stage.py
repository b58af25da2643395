"""Stage 07 (revealed preferences) end to end on the tiny model, and notebook 07 headless.

Bugs pinned here:

* models compared on different matches (each model must see the same pairs, prompts and judge
  order, so their bootstrap resamples are paired);
* the judge being a checkpoint under test rather than the untrained judge model;
* a missing checkpoint stopping the stage instead of being skipped with a note, or a missing
  stage-01 file giving anything but a one-line "run notebook 01 first";
* a rerun sampling again (or a retrained checkpoint reusing the old checkpoint's replies);
* tables, summary and headline that disagree with the judgements they came from.
"""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pandas as pd
import pytest
from character_training.backends.local import TINY_RANDOM_NAME as TINY
from character_training.config import load_params, notebook_params, with_overrides
from character_training.errors import ConfigError, DataError
from character_training.evaluate import preference_judging
from character_training.evaluate.preference_matches import (
    bootstrap_seed,
    choose_traits,
    draw_matches,
    load_traits,
    outcomes,
)
from character_training.sampler_setup import LazySampler
from character_training.stages import preferences
from character_training.store import Checkpoint, record_checkpoint

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
        "student": TINY,
        "teacher": TINY,
        "generator": TINY,
        "judge": TINY,
        "runs_dir": str(tmp_path / "runs"),
        "engine.precision": "fp32",
        "evals.elo_comparisons": 10,
        "evals.elo_traits": 6,
        "evals.elo_conditions": ["adopt", "random"],
        "evals.elo_bootstrap": 40,
        "evals.elo_response_tokens": 6,
        "evals.judge_max_tokens": 4,
        "evals.judge_modes": ["generative", "logprob"],
    }
    values.update(overrides)
    return with_overrides(load_params("tiny", "sarcastic"), values)


class CountingService:
    """The real local service, recording every sampling client it is asked for."""

    def __init__(self, inner):
        self.inner = inner
        self.created: list[dict] = []

    def create_sampling_client(self, **kwargs):
        self.created.append(kwargs)
        return self.inner.create_sampling_client(**kwargs)


# -- pure parts ----------------------------------------------------------------------------------
def test_every_condition_and_model_sees_the_same_draws():
    prompts = [{"id": f"p{i}", "prompt": f"prompt {i}"} for i in range(7)]
    traits = ("formal", "casual", "poetic", "blunt", "calm")
    matches = draw_matches(traits, prompts, ("adopt", "random"), 50, seed=3)
    assert matches == draw_matches(traits, prompts, ("adopt", "random"), 50, seed=3)
    adopt = [m for m in matches if m.condition == "adopt"]
    rand = [m for m in matches if m.condition == "random"]
    strip = lambda m: (m.match_id, m.first, m.second, m.prompt_id, m.judge_first)  # noqa: E731
    assert [strip(m) for m in adopt] == [strip(m) for m in rand]
    assert len({m.key for m in matches}) == 100
    for m in adopt:
        assert m.first != m.second and {m.judge_first, m.judge_second} == {m.first, m.second}
    # the judge's listing order is drawn apart from the offered order
    same = sum(m.judge_first == m.first for m in adopt)
    assert 10 < same < 40
    other = draw_matches(traits, prompts, ("adopt",), 50, seed=4)
    assert [strip(m) for m in other] != [strip(m) for m in adopt]


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
    """A scripted judge that likes alphabetically earlier words by 3 nats whatever it reads,
    and gives +1 nat to a word the reply contains. Plain forced choice then always names the
    earlier word (its Elo would rank the vocabulary alphabetically, for any model); the
    calibrated mode subtracts the empty-reply prior and names the word the reply shows."""
    from types import SimpleNamespace

    params = stage_params(tmp_path, **{"evals.judge_modes": ["calibrated", "logprob"]})
    traits_of_run = choose_traits(load_traits(), params.evals.elo_traits, params.seed)
    config = preferences.Config.from_params(params, traits=traits_of_run, prompts_digest="d")
    traits = ("calm", "blunt", "poetic", "formal")
    prompts = [{"id": f"p{i}", "prompt": f"prompt {i}"} for i in range(3)]
    matches = draw_matches(traits, prompts, ("adopt",), 12, seed=1)

    def scripted(_client, _renderer, items, desc=None):
        def score(messages, word):
            reply = messages[-1]["content"]
            shown = reply.count(f"SHOWN:{word}") > 0
            return -3.0 * sorted(traits).index(word) + (1.0 if shown else 0.0)

        return [(score(m, a), score(m, b)) for m, a, b in items]

    monkeypatch.setattr(preference_judging.judging, "forced_choice_scores", scripted)
    monkeypatch.setattr(preference_judging, "get_renderer", lambda *a, **k: None)
    client = LazySampler(lambda: SimpleNamespace(get_tokenizer=lambda: None))
    # the reply shows the later word of each pair: the one the judge's taste works against
    shows = {m.key: max(m.first, m.second) for m in matches}
    responses = {k: SimpleNamespace(full_text=f"SHOWN:{w}") for k, w in shows.items()}
    prior = preference_judging.prior_scores(config, client, matches, tmp_path)
    verdicts = preference_judging.judge_replies(
        config, client, "base", "log", matches, responses, tmp_path, prior
    )
    for m in matches:
        assert verdicts[m.key]["logprob_choice"] == min(m.first, m.second)  # taste wins
        assert verdicts[m.key]["calibrated_choice"] == shows[m.key]  # the reply wins
    with pytest.raises(ConfigError, match="evals.coherence_modes"):
        stage_params(tmp_path, **{"evals.coherence_modes": ["calibrated"]})


def test_the_fingerprint_keeps_only_this_stages_evals_settings(tmp_path):
    """Stage 08's and 09's settings share the ``evals`` section: changing them must not refuse
    a finished stage-07 folder, while any ``elo_*`` or ``judge_*`` setting must."""
    params = stage_params(tmp_path)
    traits = choose_traits(load_traits(), params.evals.elo_traits, params.seed)

    def fingerprint(overrides):
        changed = with_overrides(params, overrides)
        return preferences.Config.from_params(changed, traits=traits).fingerprint()

    before = fingerprint({})
    for unrelated in (
        {"evals.robustness_prompts": 7},
        {"evals.rl_steps": 3},
        {"sampling.max_tokens": 9},
    ):
        assert fingerprint(unrelated) == before
    for related in (
        {"evals.elo_comparisons": 11},
        {"evals.judge_top_p": 0.5},
        {"sampling.top_p": 0.5},
    ):
        assert fingerprint(related) != before


def test_missing_stage_01_prompts_fail_in_one_line(tmp_path):
    params = stage_params(tmp_path)
    with pytest.raises(DataError, match="general_eval.jsonl is missing: run notebook 01_prompts"):
        preferences.run(params, None)


# -- the stage on the tiny model -----------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_dpo_checkpoint(new_tiny_trainer):
    trainer = new_tiny_trainer(seed=11, scale=0.5)
    return trainer.save_weights_for_sampler("dpo-07").result().path


def test_the_stage_end_to_end_resumes_and_reports(tmp_path, tiny_service, tiny_dpo_checkpoint):
    params = stage_params(tmp_path)
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
    traits = set(result.config.traits)
    assert len(traits) == 6
    for j in judgements:
        assert j["logprob_choice"] in (j["first"], j["second"])  # forced choice always decides
        assert j["generative_reason"] in ("ok", "empty", "both", "neither", "extra_text")
        if j["generative_choice"] is not None:
            assert j["generative_choice"] in (j["first"], j["second"])
        assert {j["first"], j["second"]} <= traits
        assert j["judge_first"] in (j["first"], j["second"])

    table = pd.read_csv(folder / "elo_table.csv")
    assert len(table) == 2 * 2 * 2 * 6  # models x conditions x modes x traits
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
    lp = table[(table["mode"] == "logprob")]
    for (model, condition), group in lp.groupby(["model", "condition"]):
        assert group["games"].sum() == 2 * 10  # every forced-choice match decided
        assert group["elo"].mean() == pytest.approx(1000)
        decided = [j for j in judgements if j["model"] == model and j["condition"] == condition]
        assert group["wins"].sum() == len(decided)

    # the judge's own leaning (empty replies): one score pair per match, shared by all models
    prior = pd.read_csv(folder / "judge_prior.csv")
    assert list(prior["trait"]) == list(result.config.traits)
    assert prior["games"].sum() == 2 * 10
    assert {(r["model"], r["condition"]) for r in result.prior_correlations()} == {
        (m, c) for m in ("base", "dpo") for c in ("adopt", "random")
    }

    summary = json.loads((folder / "summary.json").read_text())
    assert summary["judge_is_base_student"] is True
    assert summary["models"]["dpo"] == tiny_dpo_checkpoint
    judge = summary["judge"]
    ok = sum(j["generative_choice"] is not None for j in judgements)
    assert judge["parse_rate"] == pytest.approx(ok / len(judgements))
    assert judge["logprob"]["decided"] == len(judgements)
    assert 0 <= judge["logprob"]["position_bias"]["value"] <= 1

    changes = result.changes("dpo", condition="adopt", mode="logprob")
    assert len(changes) == 6 and changes[0]["change"] >= changes[-1]["change"]
    assert all(c["ci_low"] <= c["ci_high"] for c in changes)
    correlations = result.model_correlations("logprob")
    assert {(r["condition"], r["a"], r["b"]) for r in correlations} == {
        ("adopt", "base", "dpo"),
        ("random", "base", "dpo"),
    }
    (change,) = [r for r in result.spread_changes("logprob") if r["condition"] == "adopt"]
    assert change["model"] == "dpo" and change["ci_low"] <= change["ci_high"]
    headline = result.headline()
    for key in (
        "elo_std_base",
        "elo_std_dpo",
        "elo_std_change_dpo",
        "spearman_base_dpo",
        "judge_parse_rate",
        "judge_prior_spearman_base",
    ):
        assert key in headline
    assert "mode_agreement" in headline
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
