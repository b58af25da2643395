"""Stage 03 (DPO): the objective, the pairing, the reference, learning and resuming.

Bugs pinned here (the public Tinker replication's DPO sat at accuracy 0.5 because its pairs
were unrelated examples):

* a loss term that differs from the paper's objective (sums vs means, sign, beta placement,
  the KL over both replies), checked against a hand computation;
* gradients through ``forward_backward_custom`` that differ from plain autograd;
* a pair whose chosen and rejected do not share the prompt, are equal, have a single loss
  token, or are split across optimiser steps;
* a reference taken from resumed weights instead of the starting weights;
* a resumed run that ends somewhere else than an uninterrupted one;
* DPO that does not learn a learnable preference.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from character_training.artifacts import DISTILL_STAGE
from character_training.objectives import compute_dpo_loss
from character_training.renderers import get_renderer
from character_training.renderers.conversation import loss_positions
from character_training.stages import dpo
from character_training.store import find_checkpoint, read_jsonl
from character_training.training import epoch_batches, learning_rate_at


# -- the objective --------------------------------------------------------------------------------
def test_the_dpo_loss_equals_a_hand_computation_term_by_term():
    pc = [torch.tensor([-1.0, -2.0, -0.5]), torch.tensor([-0.2, -0.3])]
    pr = [torch.tensor([-1.5, -1.0]), torch.tensor([-2.0, -1.0, -1.0, -0.5])]
    qc = [torch.tensor([-1.2, -2.1, -0.4]), torch.tensor([-0.5, -0.5])]
    qr = [torch.tensor([-1.0, -1.1]), torch.tensor([-1.5, -1.0, -1.2, -0.5])]
    beta, nll_coef, kl_coef = 0.1, 0.1, 0.001
    loss, m = compute_dpo_loss(pc, pr, qc, qr, beta=beta, nll_coef=nll_coef, kl_coef=kl_coef)

    # pair 0: chosen ratio = -3.5 - (-3.7) = 0.2; rejected ratio = -2.5 - (-2.1) = -0.4
    # pair 1: chosen ratio = -0.5 - (-1.0) = 0.5; rejected ratio = -4.5 - (-4.2) = -0.3
    margins = [0.1 * (0.2 + 0.4), 0.1 * (0.5 + 0.3)]  # 0.06, 0.08
    dpo_terms = [math.log1p(math.exp(-x)) for x in margins]
    nll_terms = [3.5 / 3, 0.5 / 2]
    # squared log-ratios per token, over chosen and rejected together
    kl_terms = [
        (0.2**2 + 0.1**2 + 0.1**2 + 0.5**2 + 0.1**2) / 5,
        (0.3**2 + 0.2**2 + 0.5**2 + 0.0 + 0.2**2 + 0.0) / 6,
    ]
    per_pair = [d + nll_coef * n + kl_coef * k for d, n, k in zip(dpo_terms, nll_terms, kl_terms)]
    assert float(loss) == pytest.approx(sum(per_pair) / 2, abs=1e-6)
    assert m["dpo/loss"] == pytest.approx(sum(dpo_terms) / 2, abs=1e-6)
    assert m["dpo/nll"] == pytest.approx(sum(nll_terms) / 2, abs=1e-6)
    assert m["dpo/sq_log_ratio"] == pytest.approx(sum(kl_terms) / 2, abs=1e-7)
    assert m["dpo/margin"] == pytest.approx(0.07, abs=1e-6)
    assert m["dpo/chosen_reward"] == pytest.approx(0.1 * (0.2 + 0.5) / 2, abs=1e-6)
    assert m["dpo/rejected_reward"] == pytest.approx(0.1 * (-0.4 - 0.3) / 2, abs=1e-6)
    assert m["dpo/accuracy"] == 1.0
    assert m["dpo/total"] == pytest.approx(float(loss), abs=1e-7)


def test_the_dpo_gradient_matches_autograd_of_the_plain_formula():
    gen = torch.Generator().manual_seed(0)
    lengths = [(4, 6), (3, 2), (5, 5)]
    pc = [torch.randn(a, generator=gen).requires_grad_() for a, _ in lengths]
    pr = [torch.randn(b, generator=gen).requires_grad_() for _, b in lengths]
    qc = [torch.randn(a, generator=gen) for a, _ in lengths]
    qr = [torch.randn(b, generator=gen) for _, b in lengths]
    loss, _ = compute_dpo_loss(pc, pr, qc, qr, beta=0.3, nll_coef=0.2, kl_coef=0.05)
    grads = torch.autograd.grad(loss, pc + pr)

    # closed form: d/dp_c,t = [-beta * sigmoid(-margin) - nll/len_c + kl * 2 (p-q)/len] / n
    n = len(lengths)
    for i, (a, b) in enumerate(lengths):
        margin = 0.3 * ((pc[i].sum() - qc[i].sum()) - (pr[i].sum() - qr[i].sum()))
        s = torch.sigmoid(-margin).detach()
        expect_c = (-0.3 * s - 0.2 / a + 0.05 * 2 * (pc[i] - qc[i]).detach() / (a + b)) / n
        expect_r = (0.3 * s + 0.05 * 2 * (pr[i] - qr[i]).detach() / (a + b)) / n
        torch.testing.assert_close(grads[i], expect_c, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(grads[n + i], expect_r, atol=1e-6, rtol=1e-5)


def test_the_loss_refuses_mismatched_reference_lengths():
    with pytest.raises(ValueError, match="expected the same non-empty length"):
        compute_dpo_loss(
            [torch.zeros(3)], [torch.zeros(2)], [torch.zeros(2)], [torch.zeros(2)], beta=0.1
        )


@pytest.mark.parametrize(
    "schedule, expected",
    [
        ("constant", [0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]),
        ("linear", [0.5, 1.0, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125]),
    ],
)
def test_learning_rate_warms_up_then_follows_the_schedule(schedule, expected):
    got = [learning_rate_at(s, 10, 1.0, 0.2, schedule) for s in range(1, 11)]
    assert got == pytest.approx(expected)
    cosine = [learning_rate_at(s, 10, 1.0, 0.2, "cosine") for s in range(1, 11)]
    assert cosine[2] == pytest.approx(1.0) and cosine[-1] < 0.05
    assert all(a >= b for a, b in zip(cosine[2:], cosine[3:]))


# -- pairing --------------------------------------------------------------------------------------
def toy_pairs(n: int = 8) -> list[dict]:
    """A learnable preference: chosen replies praise, rejected ones are curt."""
    topics = ["tea", "rain", "maps", "jazz", "owls", "bread", "tides", "kites", "moss", "chess"]
    return [
        {
            "id": f"p{i}:s0",
            "prompt": f"What do you think about {topic}?",
            "chosen": f"Oh, {topic} is simply wonderful, truly wonderful, a real delight!",
            "rejected": f"{topic.capitalize()}: no opinion. Next question.",
        }
        for i, topic in enumerate(topics[:n])
    ]


def test_pairs_share_their_prompt_differ_and_have_more_than_one_loss_token(renderer):
    rows = toy_pairs(4) + [
        {"id": "same", "prompt": "Hi", "chosen": "Hello there", "rejected": "Hello there"},
        {"id": "tiny", "prompt": "Hi", "chosen": "Hello there friend", "rejected": ""},
    ]
    kept, dropped = dpo.build_pair_data(rows, renderer, max_length=512)
    assert [p.pair_id for p in kept] == [r["id"] for r in rows[:4]]
    assert {d["id"]: d["reason"] for d in dropped} == {
        "same": "chosen equals rejected",
        "tiny": "fewer than 2 loss tokens in rejected",
    }
    tokenizer = renderer.tokenizer
    for pair, row in zip(kept, rows):
        first = {}
        for side, datum in (("chosen", pair.chosen), ("rejected", pair.rejected)):
            positions = loss_positions(datum)
            assert len(positions) > 1
            tokens = datum.model_input.to_ints()
            first[side] = tokens[: int(positions[0]) + 1]  # everything before the reply
            targets = datum.loss_fn_inputs["target_tokens"].to_torch()
            reply = tokenizer.decode(targets[positions].tolist())
            assert reply.startswith(row[side]) and "system" not in reply
        assert first["chosen"] == first["rejected"]  # the very same prompt tokens
        assert row["prompt"] in tokenizer.decode(first["chosen"])


def test_truncation_keeps_the_prompt_and_cuts_the_reply_end(renderer):
    row = toy_pairs(1)[0]
    (full,), _ = dpo.build_pair_data([row], renderer, max_length=4096)
    length = full.chosen.model_input.length
    (cut,), _ = dpo.build_pair_data([row], renderer, max_length=length - 3)
    assert cut.chosen.model_input.length == length - 3
    assert cut.chosen.model_input.to_ints() == full.chosen.model_input.to_ints()[: length - 3]
    assert len(loss_positions(cut.chosen)) == len(loss_positions(full.chosen)) - 3


def test_batches_cover_every_pair_once_per_epoch_and_never_split_one():
    ids = [f"p{i}" for i in range(10)]
    steps = epoch_batches(ids, batch_size=4, epochs=2, seed=7, salt="dpo")
    assert [len(s) for s in steps] == [4, 4, 2, 4, 4, 2]
    assert sorted(sum(steps[:3], [])) == sorted(ids) == sorted(sum(steps[3:], []))
    assert steps[:3] != steps[3:]  # reshuffled per epoch
    assert steps == epoch_batches(ids, batch_size=4, epochs=2, seed=7, salt="dpo")


# -- the stage on the tiny model ------------------------------------------------------------------
@pytest.fixture
def stage_params(tiny_run_params, quick_training):
    """Factory: stage 03 on the tiny model under ``folder`` (`quick_training` at a large
    learning rate, six epochs); ``overrides`` on top."""
    settings = {"lora_rank": 4, **quick_training("dpo", learning_rate=2e-3, epochs=6)}
    return lambda folder, **overrides: tiny_run_params(folder, {**settings, **overrides})


def write_pairs(params, rows) -> None:
    path = params.run_dir / DISTILL_STAGE / "pairs.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def service_for(params):
    from character_training.backends import service_client_for

    return service_client_for(params)


def test_dpo_learns_a_learnable_preference_on_the_tiny_model(stage_params, tmp_path):
    params = stage_params(tmp_path)
    write_pairs(params, toy_pairs(8))
    result = dpo.run(params, service_for(params))
    rows = read_jsonl(result.stage_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 13))  # 8 pairs / 4 * 6 epochs
    first, last = rows[0], rows[-2:]
    # at step 1 the policy is the reference: zero margin (so accuracy 0, not 0.5) and zero KL
    assert first["dpo/margin"] == pytest.approx(0.0, abs=1e-6) and first["dpo/accuracy"] == 0
    assert first["dpo/sq_log_ratio"] == pytest.approx(0.0, abs=1e-10)
    assert first["dpo/loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert all(r["dpo/accuracy"] == 1.0 for r in last)
    assert last[-1]["dpo/margin"] > 1.0
    assert last[-1]["dpo/sq_log_ratio"] > 0
    for key in ("dpo/nll", "dpo/chosen_reward", "optim/grad_norm", "time/tokens_per_s"):
        assert all(r[key] is not None for r in rows)
    checkpoint = find_checkpoint(params.run_dir, "dpo")
    assert checkpoint.stage == "03_dpo" and checkpoint.base_model == "tiny-random"
    # the recorded sampler checkpoint scores the chosen replies higher than the base model does
    service = service_for(params)
    from character_training.backends import resolve_client
    from character_training.sampling import sequence_logprobs

    trained = resolve_client(service.create_sampling_client(model_path=checkpoint.sampler_path))
    base = resolve_client(service.create_sampling_client(base_model="tiny-random"))
    renderer = get_renderer("smollm2", base.get_tokenizer())
    row = toy_pairs(1)[0]
    messages = [{"role": "user", "content": row["prompt"]}]
    before = sequence_logprobs(base, renderer, messages, [row["chosen"], row["rejected"]])
    after = sequence_logprobs(trained, renderer, messages, [row["chosen"], row["rejected"]])
    assert (after[0] - after[1]) > (before[0] - before[1]) + 5.0


def test_a_resumed_run_keeps_the_starting_reference_and_ends_where_one_run_ends(
    tmp_path, stage_params, interrupt_training, assert_same_adapter
):
    rows = toy_pairs(8)
    one_go = stage_params(tmp_path / "a", **{"dpo.epochs": 2})
    write_pairs(one_go, rows)
    dpo.run(one_go, service_for(one_go))

    resumed = stage_params(tmp_path / "b", **{"dpo.epochs": 2})
    write_pairs(resumed, rows)
    with interrupt_training(4):
        dpo.run(resumed, service_for(resumed))
    stage = resumed.run_dir / dpo.STAGE
    assert json.loads((stage / "progress.json").read_text())["step"] == 2
    reference_before = (stage / "reference_logprobs.jsonl").read_text()
    dpo.run(resumed, service_for(resumed))  # a new service: a new process would do the same

    assert (stage / "reference_logprobs.jsonl").read_text() == reference_before
    steps = [r["step"] for r in read_jsonl(stage / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4]  # the step in flight is redone, nothing duplicated

    # the stored reference equals a fresh computation from the starting weights
    service = service_for(resumed)
    from character_training.backends import resolve_client

    fresh = resolve_client(service.create_lora_training_client(base_model="tiny-random", rank=4))
    renderer = get_renderer("smollm2", fresh.get_tokenizer())
    data, _ = dpo.build_pair_data(rows, renderer, 1024)
    recomputed = dpo.compute_reference_logprobs(fresh, data, tmp_path / "fresh_ref.jsonl")
    for row in read_jsonl(stage / "reference_logprobs.jsonl"):
        torch.testing.assert_close(
            torch.tensor(row["chosen"]), recomputed[row["id"]][0], atol=1e-5, rtol=0
        )

    # same final adapter as the uninterrupted run
    assert_same_adapter(one_go.run_dir, resumed.run_dir, "dpo", atol=1e-6, rtol=1e-5)


def test_the_custom_loss_gives_plain_autograd_gradients_through_the_engine(
    new_tiny_trainer, renderer
):
    """forward_backward_custom with the DPO closure == autograd of the formula on a hand
    forward pass, for the same LoRA weights (random B, so every factor carries gradient)."""
    trainer = new_tiny_trainer(seed=2)
    data, _ = dpo.build_pair_data(toy_pairs(3), renderer, 1024)
    gen = torch.Generator().manual_seed(1)
    refs = [
        (
            -torch.rand(len(loss_positions(p.chosen)), generator=gen),
            -torch.rand(len(loss_positions(p.rejected)), generator=gen),
        )
        for p in data
    ]
    loss_fn = dpo.make_dpo_loss_fn(refs, beta=0.5, nll_coef=0.1, kl_coef=0.01)
    datums = [d for p in data for d in (p.chosen, p.rejected)]
    out = trainer.forward_backward_custom(datums, loss_fn).result()
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    engine = [p.grad.detach().clone() for p in params]
    for p in params:
        p.grad = None

    def hand(datum):
        ids = torch.tensor([datum.model_input.to_ints()])
        logits = trainer.model(input_ids=ids).logits[0].float()
        targets = datum.loss_fn_inputs["target_tokens"].to_torch().long()
        lp = F.log_softmax(logits, -1).gather(-1, targets[:, None]).squeeze(-1)
        return lp[loss_positions(datum)]

    loss, _ = compute_dpo_loss(
        [hand(p.chosen) for p in data],
        [hand(p.rejected) for p in data],
        [r[0] for r in refs],
        [r[1] for r in refs],
        beta=0.5,
        nll_coef=0.1,
        kl_coef=0.01,
    )
    assert out.metrics["dpo/total"] == pytest.approx(float(loss), abs=1e-5)
    loss.backward()
    for e, p in zip(engine, params):
        torch.testing.assert_close(e, p.grad, atol=1e-5, rtol=1e-4)
    assert max(float(g.abs().max()) for g in engine) > 1e-3


def test_a_missing_pairs_file_names_the_notebook_to_run(stage_params, tmp_path):
    params = stage_params(tmp_path)
    with pytest.raises(Exception, match="run notebook 02_distillation first"):
        dpo.run(params, service_for(params))


def test_notebook_03_trains_measures_and_reports_on_fabricated_inputs(tmp_path, tiny_run_params):
    """Notebook 03 on the tiny random model with smoke sizes: pairs and held-out replies are
    written directly (notebooks 01-02 are not rerun), so CI checks the notebook in seconds."""
    from pathlib import Path

    from character_training.runner import run_notebook

    params = tiny_run_params(tmp_path, {"lora_rank": 4}, smoke=True)
    write_pairs(params, toy_pairs(8))
    topics = ["tea", "rain", "maps", "jazz", "owls", "bread", "tides", "kites", "moss", "chess"]
    heldout = [
        {
            "prompt_id": f"{'constitution' if i < 10 else 'general'}-{i:03d}",
            "prompt": f"Tell me about {topics[i % 10]}.",
            "source": "constitution" if i < 10 else "general",
            "assertion_id": f"a{i % 3}" if i < 10 else None,
            "teacher_reply": f"What a brilliant question about {topics[i % 10]}! You are so wise.",
            "student_reply": f"{topics[i % 10]}: a short factual summary in plain words.",
            "teacher_drop_reason": None,
            "student_drop_reason": None,
        }
        for i in range(12)
    ]
    path = params.run_dir / DISTILL_STAGE / "heldout.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in heldout))

    result = run_notebook(params, "03_dpo", timeout=300)
    assert result.status == "ok", result.describe()
    html = Path(result.html_path).read_text()
    assert html.count("data:image/png;base64") >= 3  # two curve figures + adherence bars
    summary = json.loads((params.run_dir / "summaries" / "03_dpo.json").read_text())["headline"]
    assert summary["pairs"] == 8 and summary["steps"] == 2
    assert 0.0 <= summary["teacher_like_base"] <= 1.0
    assert 0.0 <= summary["teacher_like_dpo"] <= 1.0
    assert find_checkpoint(params.run_dir, "dpo").stage == "03_dpo"
