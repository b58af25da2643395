"""Training through a prefix every row shares (`shared_prefix`): the same log-probabilities and
LoRA gradients as running every row whole, with micro-batches as the training client runs
them (each one's backward before the next), and used only where the rows really share
`MIN_SHARED_PREFIX` positions."""

from __future__ import annotations

import pytest
import torch
from character_training.backends.local import shared_prefix
from character_training.backends.local.forward import iter_scored_micro_batches
from character_training.backends.local.shared_prefix import (
    MIN_SHARED_PREFIX,
    shared_prefix_length,
)
from peft import LoraConfig, get_peft_model
from test_snapshot_fidelity import _tiny_llama

VOCAB = 97


def _lora_model(seed: int) -> torch.nn.Module:
    """`_tiny_llama` (untied head) with a seeded, trained-looking LoRA on every linear layer,
    in training mode as the training client runs it (so whole rows over the activation
    budget are checkpointed)."""
    model = _tiny_llama(
        vocab_size=VOCAB, max_position_embeddings=512, tie_word_embeddings=False
    ).train()
    torch.manual_seed(seed)
    targets = [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
        "lm_head",
    ]
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    with torch.no_grad():  # a trained adapter: peft starts B at zero, which hides mistakes
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn_like(param) * 0.2)
    return model


def _batch(seed: int, shared: int, tails: list[int]):
    """Rows that start with the same ``shared`` tokens, then ``tails[r]`` tokens of their own;
    weights on the last few tokens of each row (a comparison's answer letter, a reply)."""
    gen = torch.Generator().manual_seed(seed)
    prefix = torch.randint(1, VOCAB, (shared,), generator=gen).tolist()
    inputs, targets, weights = [], [], []
    for tail in tails:
        row = prefix + torch.randint(1, VOCAB, (tail,), generator=gen).tolist()
        inputs.append(row)
        targets.append(row[1:] + [int(torch.randint(1, VOCAB, (1,), generator=gen))])
        weights.append([0.0] * (len(row) - 3) + [1.0, 0.5, 1.0])
    return inputs, targets, weights


def _scored(model, inputs, targets, weights, share_prefix, autocast=None, budget=10_000):
    """Per-row log-probabilities and the LoRA gradients of a weighted loss over them, one
    backward per micro-batch (as the training client's ``forward_backward``)."""
    model.zero_grad(set_to_none=True)
    out = [None] * len(inputs)
    groups = []
    for group, logprobs in iter_scored_micro_batches(
        model,
        inputs,
        targets,
        pad_id=0,
        device=torch.device("cpu"),
        autocast_dtype=autocast,
        token_budget=budget,
        checkpoint_tokens=budget,
        share_prefix=share_prefix,
    ):
        groups.append(list(group))
        loss = torch.zeros(())
        for index, values in zip(group, logprobs):
            out[index] = values.detach()
            loss = loss - (values * torch.tensor(weights[index])).sum()
        loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out, grads, groups


@pytest.fixture()
def prefix_runs(monkeypatch):
    """How many times the shared-prefix path ran (a fast path that never runs passes too)."""
    calls = []
    original = shared_prefix.SharedPrefix.backward

    def counted(self):
        calls.append(self.length)
        return original(self)

    monkeypatch.setattr(shared_prefix.SharedPrefix, "backward", counted)
    return calls


def assert_fp32_noise(got: torch.Tensor, want: torch.Tensor, name: str) -> None:
    """Equal up to fp32 summation order, measured against the gradient's own scale.

    The shared-prefix pass sums the same products in other GEMM shapes. With MKL and oneDNN
    limited to AVX2, single small elements of a gradient whose largest entry is ~12 moved by
    up to 1.3e-6 of that largest entry (4e-6 absolute), which an element-wise 1e-6 rejected;
    a wrong mask or a lost prefix gradient moves whole rows by their full size."""
    scale = float(want.abs().max())
    torch.testing.assert_close(
        got, want, rtol=1e-4, atol=1e-5 * scale, msg=lambda m: f"{name}: {m}"
    )


@pytest.mark.parametrize(("tails", "budget"), [([5, 9, 2, 14], 10_000), ([7, 7, 3], 16)])
def test_a_shared_prefix_gives_the_values_and_gradients_of_whole_rows(tails, budget, prefix_runs):
    """One micro-batch, and (budget 16) one per suffix: the prefix's gradient is summed over
    micro-batches, and the whole rows (longer than 16 tokens) are checkpointed instead."""
    model = _lora_model(0)
    inputs, targets, weights = _batch(1, MIN_SHARED_PREFIX + 11, tails)
    assert shared_prefix_length(inputs, targets) == MIN_SHARED_PREFIX + 10
    whole, whole_grads, _ = _scored(model, inputs, targets, weights, False, budget=budget)
    assert prefix_runs == []
    shared, shared_grads, groups = _scored(model, inputs, targets, weights, True, budget=budget)
    assert prefix_runs == [MIN_SHARED_PREFIX + 10]
    assert len(groups) == (1 if budget > 100 else 2)
    for a, b, row in zip(whole, shared, inputs):
        assert a.shape == b.shape == (len(row),)
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    assert whole_grads.keys() == shared_grads.keys() and len(whole_grads) == 2 * (7 * 2 + 1)
    for name, grad in whole_grads.items():
        assert grad.abs().max() > 0, name  # every adapter gets a gradient, prefix included
        assert_fp32_noise(shared_grads[name], grad, name)


def test_under_bf16_autocast_the_shared_prefix_stays_within_bf16_noise(prefix_runs):
    model = _lora_model(2)
    inputs, targets, weights = _batch(3, MIN_SHARED_PREFIX + 3, [4, 8, 6])
    whole, _, _ = _scored(model, inputs, targets, weights, False, autocast=torch.bfloat16)
    shared, _, _ = _scored(model, inputs, targets, weights, True, autocast=torch.bfloat16)
    assert len(prefix_runs) == 1
    for a, b in zip(whole, shared):
        torch.testing.assert_close(b, a, rtol=0.02, atol=0.05)


def _shared(rows):
    """`shared_prefix_length` of rows whose targets are their next tokens (0 at the end)."""
    return shared_prefix_length(rows, [r[1:] + [0] for r in rows])


def test_the_prefix_is_shared_only_when_every_row_holds_enough_of_it():
    prefix = list(range(1, MIN_SHARED_PREFIX + 6))
    rows = [prefix + [7, 8], prefix + [9], prefix + [7, 3, 4]]
    # the last prefix position's target is each row's own next token: not shared
    assert _shared(rows) == len(prefix) - 1
    # a row that differs early: nothing worth sharing
    assert _shared([*rows, [5] + prefix]) == 0
    # one row, or a prefix below the threshold: nothing
    assert _shared(rows[:1]) == 0
    short = list(range(1, MIN_SHARED_PREFIX - 1))
    assert _shared([short + [1], short + [2]]) == 0
    # a row that is the prefix itself keeps one position of its own after the shared ones
    assert _shared([prefix, prefix + [4]]) == len(prefix) - 1
    assert _shared([prefix, prefix]) == len(prefix) - 1
    # targets that differ inside the prefix end it there
    targets = [r[1:] + [0] for r in rows]
    targets[1][MIN_SHARED_PREFIX] = 99
    assert shared_prefix_length(rows, targets) == MIN_SHARED_PREFIX


def test_the_training_client_shares_a_long_prompt_and_keeps_its_loss_and_gradients(
    new_tiny_trainer, monkeypatch, prefix_runs
):
    """`forward_backward` on comparisons under one long system prompt (a preference model's
    batch): the loss and every adapter gradient match the whole-row pass."""
    from tinker import types

    inputs, targets, weights = _batch(5, MIN_SHARED_PREFIX + 40, [12, 30, 21])
    data = [
        types.Datum(
            model_input=types.ModelInput.from_ints(i),
            loss_fn_inputs={
                "target_tokens": types.TensorData.from_torch(torch.tensor(t)),
                "weights": types.TensorData.from_torch(torch.tensor(w)),
            },
        )
        for i, t, w in zip(inputs, targets, weights)
    ]

    def run(threshold: int):
        monkeypatch.setattr(shared_prefix, "MIN_SHARED_PREFIX", threshold)
        client = new_tiny_trainer(seed=3)
        out = client.forward_backward(data, "cross_entropy").result()
        grads = {
            n: p.grad.clone() for n, p in client.model.named_parameters() if p.grad is not None
        }
        return out.metrics["loss:sum"], grads

    whole_loss, whole_grads = run(10**9)
    assert prefix_runs == []
    shared_loss, shared_grads = run(MIN_SHARED_PREFIX)
    assert prefix_runs == [MIN_SHARED_PREFIX + 39]
    assert shared_loss == pytest.approx(whole_loss, rel=1e-6)
    assert whole_grads.keys() == shared_grads.keys() and whole_grads
    for name, grad in whole_grads.items():
        assert_fp32_noise(shared_grads[name], grad, name)
