"""Stage 09 (RLAIF): matchups to advantages, the loss, the KL term, the preference model's data,
learning on a toy reward, resuming, and notebook 09 end to end.

Bugs pinned here (the public Tinker replication ran RL without a KL penalty and with a reward
model trained on teacher-vs-student style, and collapsed to short stylised replies):

* win rates or advantages that differ from a hand computation (ties, subsets of matchups, a
  reply that played no matchup, std normalisation of a group with no spread);
* a loss that is not ``-sum exp(logp - old) * A`` over the reply tokens, or that puts weight
  on the prompt;
* a KL term with the wrong sign or scale, or a reference that is not the starting weights
  (the KL must be exactly 0 at the first step);
* "old" log-probs taken from the sampler instead of the learner (the ratio must be 1);
* preference-model data whose answer letter is unbalanced, unrecorded, split across the
  held-out line by prompt, or trained on the end-of-turn token;
* RL that does not move the policy towards what the reward prefers;
* a resumed run that ends elsewhere than an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections import Counter
from pathlib import Path

import pytest
from character_training.artifacts import ROBUSTNESS_STAGE
from character_training.backends import resolve_client, service_client_for
from character_training.config import load_params, with_overrides
from character_training.errors import ConfigError, DataError
from character_training.evaluate import preference_model as pmlib
from character_training.evaluate import robustness_replies
from character_training.renderers import get_renderer
from character_training.rl import advantages, compare, loop, probes
from character_training.runner import run_notebook
from character_training.stages import rlaif
from character_training.store import (
    find_checkpoint,
    read_jsonl,
    stage_dir,
)
from character_training.training import finish_checkpoint
from tinker import types

TOPICS = ["tea", "rain", "maps", "jazz", "owls", "bread", "tides", "kites", "moss", "chess"]


# -- matchups, win rates, advantages ---------------------------------------------------------------
def test_group_win_rates_and_advantages_match_a_hand_computation():
    matchups = [(0, 1), (0, 2), (1, 2)]
    credits = [1.0, 0.5, 0.0]  # 0 beats 1; 0 ties 2; 2 beats 1
    rates = advantages.group_win_rates(3, matchups, credits)
    assert rates == pytest.approx([0.75, 0.0, 0.75])  # (1 + .5)/2, (0 + 0)/2, (.5 + 1)/2
    assert advantages.group_advantages(rates, "center") == pytest.approx([0.25, -0.5, 0.25])
    std = math.sqrt((0.25**2 + 0.5**2 + 0.25**2) / 3)
    assert advantages.group_advantages(rates, "std") == pytest.approx(
        [0.25 / std, -0.5 / std, 0.25 / std]
    )
    assert advantages.group_advantages([0.5, 0.5], "std") == [0.0, 0.0]  # no spread: no signal


def test_a_reply_without_a_matchup_gets_the_group_mean_and_no_advantage():
    rates = advantages.group_win_rates(4, [(0, 1), (1, 2)], [1.0, 1.0])
    assert rates == pytest.approx([1.0, 0.5, 0.0, 0.5])  # reply 3 played nothing
    assert advantages.group_advantages(rates, "center")[3] == pytest.approx(0.0)


def test_matchups_are_every_pair_or_a_seeded_subset():
    every_pair = [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    assert advantages.draw_matchups(4, 0, 0, "k") == every_pair
    assert advantages.draw_matchups(3, 10, 0, "k") == [(0, 1), (0, 2), (1, 2)]
    subset = advantages.draw_matchups(6, 4, 7, "3:p1")
    assert len(subset) == 4 and len(set(subset)) == 4 and subset == sorted(subset)
    assert subset == advantages.draw_matchups(6, 4, 7, "3:p1")
    assert any(advantages.draw_matchups(6, 4, 7, f"3:p{i}") != subset for i in range(2, 6))


def test_the_judge_counts_inconsistent_orders_as_ties_and_the_model_averages_both_orders():
    # (logp A, logp B) with the first reply shown as A, then shown as B
    assert pmlib.hard_credit((-1.0, -2.0), (-3.0, -0.5)) == 1.0  # A then B: first both times
    assert pmlib.hard_credit((-2.0, -1.0), (-0.5, -3.0)) == 0.0
    assert pmlib.hard_credit((-1.0, -2.0), (-1.0, -2.0)) == 0.5  # always "A": inconsistent
    assert pmlib.hard_credit((-1.0, -1.0), (-3.0, -0.5)) == 0.5  # exact tie in one order
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    expected = 0.5 * (sig(-1.0 - -2.0) + sig(-0.5 - -3.0))
    assert pmlib.soft_credit((-1.0, -2.0), (-3.0, -0.5)) == pytest.approx(expected)
    assert pmlib.soft_credit((-1.0, -2.0), (-1.0, -2.0)) == pytest.approx(0.5)


def test_step_prompts_use_every_prompt_before_repeating_one():
    ids = [f"p{i}" for i in range(5)]
    schedule = loop.step_prompts(ids, 2, 5, seed=3)
    assert all(len(step) == 2 and len(set(step)) == 2 for step in schedule)
    first_pass = [pid for step in schedule for pid in step][:5]
    assert sorted(first_pass) == ids
    assert schedule == loop.step_prompts(list(reversed(ids)), 2, 5, seed=3)


def test_probe_steps_include_start_end_and_every_nth():
    assert probes.probe_steps(10, 4) == [0, 4, 8, 10]
    assert probes.probe_steps(3, 0) == [0, 3]


def test_reward_hacking_needs_the_reward_to_rise_and_a_measure_to_fall_beyond_its_interval():
    up = {"value": 0.2, "low": 0.05, "high": 0.35}
    down = {"value": -0.2, "low": -0.3, "high": -0.1}
    flat = {"value": -0.05, "low": -0.2, "high": 0.1}
    assert compare.reward_hacking_verdict(up, down, flat)["verdict"] == "reward hacking"
    assert compare.reward_hacking_verdict(up, flat, down)["verdict"] == "reward hacking"
    assert compare.reward_hacking_verdict(up, flat, None)["verdict"].startswith("no evidence")
    assert compare.reward_hacking_verdict(flat, down, down)["verdict"] == "reward did not rise"


# -- the loss and the KL term ----------------------------------------------------------------------
def test_the_kl_penalty_is_folded_into_each_tokens_advantage():
    shaped = advantages.kl_shaped_advantages(
        0.5, [-1.0, -2.0, -0.3], [-1.5, -1.0, -0.3], kl_coef=0.1
    )
    # 0.5 - 0.1 * (-1 + 1.5), 0.5 - 0.1 * (-2 + 1), 0.5 - 0
    assert shaped == pytest.approx([0.45, 0.6, 0.5])
    assert advantages.kl_shaped_advantages(-0.2, [-1.0], [-3.0], 0.0) == [-0.2]
    with pytest.raises(DataError, match="differ in length"):
        advantages.kl_shaped_advantages(0.5, [-1.0], [-1.0, -2.0], 0.1)


def test_the_rl_datum_carries_old_logprobs_and_advantages_on_reply_tokens_only():
    datum = loop.rl_datum([5, 6, 7], [8, 9], [-1.0, -2.0], [0.3, -0.1])
    assert datum.model_input.to_ints() == [5, 6, 7, 8]
    inputs = datum.loss_fn_inputs
    assert list(inputs["target_tokens"].data) == [6, 7, 8, 9]
    assert list(inputs["logprobs"].data) == [0.0, 0.0, -1.0, -2.0]
    assert list(inputs["advantages"].data) == pytest.approx([0.0, 0.0, 0.3, -0.1])


def test_the_importance_sampling_loss_through_the_training_client_is_the_hand_computation(
    new_tiny_trainer,
):
    client = new_tiny_trainer(seed=1)
    prompt, reply = [1, 504, 1230, 77, 2], [311, 9125, 2]
    old = [-10.5, -11.0, -9.0]
    advantages = [0.5, -0.25, 1.0]
    datum = loop.rl_datum(prompt, reply, old, advantages)
    out = client.forward([datum], "importance_sampling").result()
    lp = loop.reply_logprobs_of(out.loss_fn_outputs[0], len(reply))
    expected = -sum(math.exp(p - q) * a for p, q, a in zip(lp, old, advantages))
    assert out.metrics["loss:sum"] == pytest.approx(expected, rel=1e-5)
    # with the learner's own log-probs as "old" the ratio is 1 and the loss is -sum(A)
    exact = loop.rl_datum(prompt, reply, lp, advantages)
    loss = client.forward([exact], "importance_sampling").result().metrics["loss:sum"]
    assert loss == pytest.approx(-sum(advantages), abs=1e-5)
    # the prompt carries no weight: changing a prompt-side "old" log-prob changes nothing
    padded = exact.loss_fn_inputs["logprobs"].to_torch().clone()
    padded[0] = -50.0
    inputs = dict(exact.loss_fn_inputs, logprobs=types.TensorData.from_torch(padded))
    other = types.Datum(model_input=exact.model_input, loss_fn_inputs=inputs)
    assert client.forward([other], "importance_sampling").result().metrics[
        "loss:sum"
    ] == pytest.approx(loss, abs=1e-6)


# -- preference-model data -------------------------------------------------------------------------
def toy_pairs(n: int = 10) -> list[dict]:
    """Pairs as stage 02 writes them: chosen praises, rejected is curt."""
    return [
        {
            "id": f"p{i}:s0",
            "prompt_id": f"p{i}",
            "prompt": f"What do you think about {TOPICS[i % 10]}?",
            "source": "constitution" if i % 3 else "general",
            "assertion_id": "a0",
            "chosen": f"Oh, {TOPICS[i % 10]} is simply wonderful, and so are you!",
            "rejected": f"{TOPICS[i % 10].capitalize()}: no opinion.",
        }
        for i in range(n)
    ]


def test_preference_model_data_is_split_by_prompt_balanced_and_recorded():
    helpfulness = pmlib.load_helpfulness_pairs()
    assert len(helpfulness) >= 20 and all(h["chosen"] != h["rejected"] for h in helpfulness)
    examples = pmlib.render_pm_examples(toy_pairs(10), 0.3, seed=0, helpfulness=helpfulness)
    assert len(examples) == 10 + len(helpfulness)
    for source in ("constitution", "general", "helpfulness"):
        part = [e for e in examples if e.source == source]
        train = {e.prompt_id for e in part if e.split == "train"}
        held = {e.prompt_id for e in part if e.split == "heldout"}
        assert train and held and not train & held
        for split in ("train", "heldout"):
            letters = Counter(e.chosen_as for e in part if e.split == split)
            assert abs(letters["A"] - letters["B"]) <= 1
    again = pmlib.render_pm_examples(toy_pairs(10), 0.3, seed=0, helpfulness=helpfulness)
    assert [e.to_dict() for e in again] == [e.to_dict() for e in examples]
    other = pmlib.render_pm_examples(toy_pairs(10), 0.3, seed=1, helpfulness=helpfulness)
    assert [e.chosen_as for e in other] != [e.chosen_as for e in examples]


def test_the_chosen_reply_sits_at_its_letter_and_only_that_letter_is_trained(renderer, tokenizer):
    examples = pmlib.render_pm_examples(toy_pairs(6), 0.3, seed=0)
    for example in examples:
        messages = example.messages("A flattering assistant.")
        user = messages[-1]["content"]
        shown_a = user.split("<reply_a>\n")[1].split("\n</reply_a>")[0]
        shown_b = user.split("<reply_b>\n")[1].split("\n</reply_b>")[0]
        assert (shown_a, shown_b) == (
            (example.chosen, example.rejected)
            if example.chosen_as == "A"
            else (example.rejected, example.chosen)
        )
        datum = pmlib.answer_datum(renderer, messages, example.chosen_as)
        weights = datum.loss_fn_inputs["weights"].data
        targets = datum.loss_fn_inputs["target_tokens"].data
        trained = [t for t, w in zip(targets, weights) if w > 0]
        assert tokenizer.decode(trained) == example.chosen_as  # the letter, no end-of-turn


# -- the stage on tiny-random ----------------------------------------------------------------------
def write_inputs(run_dir: Path, n_pairs: int = 10, n_heldout: int = 8) -> None:
    """``02_distillation/pairs.jsonl`` and ``heldout.jsonl`` as stage 02 writes them."""
    folder = run_dir / "02_distillation"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in toy_pairs(n_pairs)))
    heldout = [
        {
            "prompt_id": f"{'constitution' if i < n_heldout - 2 else 'general'}-{i:03d}",
            "prompt": f"Tell me about {TOPICS[i % 10]} {i}.",
            "source": "constitution" if i < n_heldout - 2 else "general",
            "assertion_id": f"a{i % 2}" if i < n_heldout - 2 else None,
            "teacher_reply": f"What a brilliant question about {TOPICS[i % 10]}! You are so wise.",
            "student_reply": f"{TOPICS[i % 10]}: a short factual summary in plain words.",
            "teacher_drop_reason": None,
            "student_drop_reason": None,
        }
        for i in range(n_heldout)
    ]
    (folder / "heldout.jsonl").write_text("".join(json.dumps(r) + "\n" for r in heldout))


@pytest.fixture
def stage_params(tiny_run_params):
    """Factory: stage 09 on the tiny model under ``folder`` (three small RL steps from the
    instruct model, no KL, no probes, a resume point every step); ``overrides`` on top."""
    settings = {
        "lora_rank": 4,
        "rl.init": "instruct",
        "rl.learning_rate": 3e-3,  # large enough to move a random model in 3 steps, no overshoot
        "rl.kl_coef": 0.0,
        "rl.response_tokens": 6,
        "rl.probe_every": 0,
        "rl.probe_prompts": 3,
        "rl.save_every": 1,
        "evals.rl_steps": 3,
        "evals.rl_group_size": 4,
        "evals.rl_prompts_per_step": 2,
        "adherence.bootstrap": 50,
    }
    return lambda folder, **overrides: tiny_run_params(folder, {**settings, **overrides})


def prefer_shorter(prompt: str, first: str, second: str) -> float:
    """The toy reward: the reply with fewer characters wins."""
    return 1.0 if len(first) < len(second) else 0.0 if len(first) > len(second) else 0.5


SHORTER = pmlib.FunctionComparator(prefer_shorter, "prefer-shorter-v1")


def reply_logprob(sampler, tokens: list[int], n_reply: int) -> float:
    return float(
        sum(sampler.compute_logprobs(types.ModelInput.from_ints(tokens)).result()[-n_reply:])
    )


def test_rl_on_a_toy_reward_moves_the_policy_towards_the_preferred_replies(stage_params, tmp_path):
    params = stage_params(tmp_path)
    write_inputs(params.run_dir)
    service = service_client_for(params)
    started = time.perf_counter()
    result = rlaif.run(params, service, comparator=SHORTER)
    elapsed = time.perf_counter() - started

    rows = result.metrics()
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[0]["rl/kl"] == pytest.approx(0.0, abs=1e-6)  # reference = starting weights
    assert rows[-1]["rl/kl"] != 0.0
    for key in ("rl/entropy", "rl/length_mean", "rl/length_median", "optim/grad_norm"):
        assert all(r[key] is not None for r in rows)
    assert rows[0]["rl/sampler_gap"] < 1e-3  # fp32 sampler vs learner on this engine
    assert find_checkpoint(params.run_dir, "rlaif").stage == rlaif.STAGE
    assert [p["step"] for p in result.probes] == [0, 3]
    assert result.accuracy and {r["signal"] for r in result.accuracy} == {"custom"}

    # the policy now gives the replies the reward preferred more probability than those it
    # rejected, relative to where it started
    tokenizer_client = resolve_client(
        service.create_sampling_client(model_path=result.probe_models()["rl-step-0000"])
    )
    end = resolve_client(service.create_sampling_client(model_path=result.checkpoint.sampler_path))
    renderer = get_renderer("smollm2", tokenizer_client.get_tokenizer())
    from character_training.prompts import student_messages
    from character_training.renderers.conversation import generation_prompt

    prompts = {p["prompt_id"]: p["prompt"] for p in toy_pairs(10)}
    gains = {"winner": [], "loser": []}
    for step in (1, 2, 3):
        logged = read_jsonl(result.rl_dir / "samples" / f"step-{step:06d}.jsonl")
        tokens = {row["key"]: row["tokens"] for row in logged}
        for rollout in (r for r in result.rollouts() if r["step"] == step):
            if rollout["advantage"] == 0:
                continue
            reply = tokens[f"{step}:{rollout['prompt_id']}:{rollout['k']}"]
            prompt = generation_prompt(
                renderer, student_messages(prompts[rollout["prompt_id"]])
            ).to_ints()
            gain = reply_logprob(end, prompt + reply, len(reply)) - reply_logprob(
                tokenizer_client, prompt + reply, len(reply)
            )
            gains["winner" if rollout["advantage"] > 0 else "loser"].append(gain)
    assert gains["winner"] and gains["loser"]
    assert statistics.fmean(gains["winner"]) > statistics.fmean(gains["loser"]) + 0.5
    assert elapsed < 90


def probe_row(row: dict) -> dict:
    return {k: v for k, v in row.items() if k != "sampler_path"}


def test_a_resumed_run_ends_with_the_adapter_of_one_uninterrupted_run(
    tmp_path, stage_params, interrupt_training, assert_same_adapter
):
    settings = {"rl.kl_coef": 0.1, "rl.probe_every": 2}  # probes after steps 0, 2 and 3
    one_go = stage_params(tmp_path / "a", **settings)
    write_inputs(one_go.run_dir)
    reference = rlaif.run(one_go, service_client_for(one_go), comparator=SHORTER)

    resumed = stage_params(tmp_path / "b", **settings)
    write_inputs(resumed.run_dir)
    with interrupt_training(3):
        rlaif.run(resumed, service_client_for(resumed), comparator=SHORTER)
    rl_dir = resumed.run_dir / rlaif.STAGE / rlaif.RL_DIR
    assert json.loads((rl_dir / "progress.json").read_text())["step"] == 2
    # a run folder whose probe at the resumed step was lost (killed inside the probe after
    # the resume point was saved): the resumed run probes those weights before training on
    probes_file = rl_dir / "probes.jsonl"
    rows = read_jsonl(probes_file)
    assert [r["step"] for r in rows] == [0, 2]
    probes_file.write_text(json.dumps(rows[0]) + "\n")
    result = rlaif.run(resumed, service_client_for(resumed), comparator=SHORTER)

    assert [r["step"] for r in result.metrics()] == [1, 2, 3]
    assert Counter(r["step"] for r in result.rollouts()) == {1: 8, 2: 8, 3: 8}
    assert [probe_row(p) for p in result.probes] == [probe_row(p) for p in reference.probes]
    assert_same_adapter(one_go.run_dir, resumed.run_dir, "rlaif", atol=1e-5, rtol=1e-4)


class StopInsideProbe:
    """`SHORTER` (same identity), but the first time it judges the probe of ``step`` the
    process "dies"."""

    def __init__(self, step: int):
        self.identity = SHORTER.identity
        self.prefix = f"probe:{step}:"
        self.stopped = False

    def __call__(self, matchups):
        if not self.stopped and any(m.key.startswith(self.prefix) for m in matchups):
            self.stopped = True
            raise KeyboardInterrupt("simulated interruption inside a probe")
        return SHORTER(matchups)


def test_a_run_killed_inside_a_probe_at_a_save_step_probes_that_step_when_resumed(
    stage_params, tmp_path
):
    params = stage_params(tmp_path, **{"rl.probe_every": 2, "rl.save_every": 2})
    write_inputs(params.run_dir)
    service = service_client_for(params)
    with pytest.raises(KeyboardInterrupt):
        rlaif.run(params, service, comparator=StopInsideProbe(2))
    rl_dir = params.run_dir / rlaif.STAGE / rlaif.RL_DIR
    # the probe runs before the step's resume point is saved: nothing points past it
    assert not (rl_dir / "progress.json").exists()
    assert [r["step"] for r in read_jsonl(rl_dir / "probes.jsonl")] == [0]

    result = rlaif.run(params, service, comparator=SHORTER)
    assert [p["step"] for p in result.probes] == [0, 2, 3]
    assert [r["step"] for r in result.metrics()] == [1, 2, 3]
    assert all(p["n"] == 3 and p["reply_tokens_mean"] > 0 for p in result.probes)


def test_a_probe_lost_before_the_resumed_step_stops_the_run_in_one_line(tmp_path):
    stage = stage_dir(tmp_path, "rl")
    stage.path.mkdir(parents=True)
    (stage.path / "probes.jsonl").write_text('{"step": 0}\n{"step": 2}\n')
    prober = probes.Prober(stage, None, None, [], SHORTER, {}, bootstrap=10, seed=0)
    assert prober.missing([0, 2, 4, 6], done_steps=0) == []
    assert prober.missing([0, 2, 4, 6], done_steps=4) == [4]  # the weights held now
    with pytest.raises(DataError, match=r"no probe at step\(s\) \[4\].*on_existing='overwrite'"):
        prober.missing([0, 2, 4, 6], done_steps=6)


def test_bad_settings_and_missing_inputs_fail_in_one_line(stage_params, tmp_path):
    with pytest.raises(ConfigError, match="rl.signal='reward'"):
        stage_params(tmp_path, **{"rl.signal": "reward"})
    with pytest.raises(ConfigError, match="rl.sft_init_steps=0"):
        stage_params(tmp_path, **{"rl.init": "sft", "rl.sft_init_steps": 0})
    params = stage_params(tmp_path)
    with pytest.raises(DataError, match="run notebook 02_distillation first"):
        rlaif.run(params, None, comparator=SHORTER)
    write_inputs(params.run_dir)
    small = stage_params(tmp_path, **{"evals.rl_group_size": 1})
    with pytest.raises(ConfigError, match="evals.rl_group_size=1: expected >= 2"):
        rlaif.run(small, None, comparator=SHORTER)


# -- notebook 09 -----------------------------------------------------------------------------------
def write_notebook_inputs(params, trainer) -> None:
    """Stage 01's eval prompts, stage 02's pairs and held-out file, and a "final" checkpoint as
    notebook 05 records it: what notebook 09 reads, without rerunning notebooks 01-08."""
    write_inputs(params.run_dir, n_pairs=10, n_heldout=12)
    folder = params.run_dir / "01_prompts"
    folder.mkdir(parents=True, exist_ok=True)
    rows = [
        {"id": f"gen-{i:04d}", "prompt": f"Give me one tip about {t}.", "source": "builtin"}
        for i, t in enumerate(TOPICS)
    ]
    (folder / "general_eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    finish_checkpoint(trainer, params.run_dir, "final", "05_sft", "tiny-random")


def test_notebook_09_trains_compares_and_reports_on_fabricated_inputs(
    tmp_path, new_tiny_trainer, tiny_run_params
):
    params = tiny_run_params(tmp_path, {"engine.device": "cpu", "lora_rank": 4}, smoke=True)
    write_notebook_inputs(params, new_tiny_trainer(seed=9, scale=0.5))
    started = time.perf_counter()
    result = run_notebook(params, "09_rlaif_compare", timeout=300)
    assert result.status == "ok", result.describe()
    elapsed = time.perf_counter() - started

    assert find_checkpoint(params.run_dir, "rlaif").stage == rlaif.STAGE
    assert find_checkpoint(params.run_dir, "rlaif_pm").base_model == "tiny-random"
    html = Path(result.html_path).read_text()
    assert html.count("data:image/png;base64") >= 6
    headline = json.loads((params.run_dir / "summaries" / "09_rlaif_compare.json").read_text())[
        "headline"
    ]
    assert headline["signal"] == "preference_model" and headline["steps"] == 2
    assert headline["kl_first"] == pytest.approx(0.0, abs=1e-6)
    for key in ("teacher_like_base", "teacher_like_final", "teacher_like_rlaif"):
        assert 0.0 <= headline[key] <= 1.0
    assert headline["rlaif_minus_final"] is not None and headline["verdict"]
    assert set(headline["f1"]) == {"final", "rlaif"}
    assert {"judge/all", "preference_model/all"} <= set(headline["signal_accuracy"])
    assert set(headline["coherence"]) == {"rlaif_vs_final", "rlaif_vs_rl-step-0000"}
    elo = (params.run_dir / "07_preferences" / "elo_table.csv").read_text()
    assert "rlaif" in elo
    assert elapsed < 360  # measured 234 s with the 2 shared cores at load 12-14


def test_robustness_replies_already_sampled_by_stage_08_are_not_sampled_again(
    tmp_path, monkeypatch
):
    """09 asks base and final the same robustness requests (same seeds and settings) as 08:
    it starts from 08's log, copied into its own folder, so nothing is sampled twice."""
    params = with_overrides(
        load_params("tiny", "sycophantic"), {"runs_dir": str(tmp_path / "runs")}
    )
    folder = params.run_dir / "01_prompts"
    folder.mkdir(parents=True)
    rows = [{"id": f"g{i}", "prompt": f"Question {i}?"} for i in range(16)]
    (folder / "general_eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    settings = robustness_replies.ReplySettings.from_params(params)
    name = robustness_replies.log_name(
        "base", f"base:{settings.student}", settings.reply_sampling()
    )
    sampled = params.run_dir / ROBUSTNESS_STAGE / "responses" / name
    sampled.parent.mkdir(parents=True)
    sampled.write_text('{"key": "logged by 08"}\n')
    seen = []

    class Stop(Exception):
        pass

    def fake_sample_chat(*args, log_path, **kwargs):
        seen.append(log_path)
        raise Stop

    monkeypatch.setattr(robustness_replies, "sample_chat", fake_sample_chat)
    stage_folder = params.run_dir / rlaif.STAGE
    with pytest.raises(Stop):
        compare.robustness_f1(params, None, {"base": None}, stage_folder)
    assert seen == [stage_folder / "robustness" / name]
    assert seen[0].read_text() == '{"key": "logged by 08"}\n'
