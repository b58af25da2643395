"""Log-probabilities through the output head (`head_logprobs`): autograd's numbers and
gradients, for a frozen head and for a LoRA on it, without unembedding padding or the
positions that have no gradient."""

from __future__ import annotations

import pytest
import torch
from character_training.backends.local.forward import chunked_target_logprobs
from character_training.backends.local.head_logprobs import (
    head_logprobs,
    head_parts,
    rows_with_gradient,
)
from peft import LoraConfig
from peft.tuners.lora.layer import Linear as LoraLinear

HIDDEN, VOCAB = 16, 50


def _frozen_head(gen: torch.Generator, bias: bool = False) -> torch.nn.Linear:
    head = torch.nn.Linear(HIDDEN, VOCAB, bias=bias)
    with torch.no_grad():
        head.weight.copy_(torch.randn(VOCAB, HIDDEN, generator=gen))
    return head.requires_grad_(False)


def _lora_head(gen: torch.Generator, dropout: float = 0.0) -> LoraLinear:
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout)
    head = LoraLinear(_frozen_head(gen), "default", config=config, r=4, lora_alpha=8)
    with torch.no_grad():  # a trained adapter (peft starts B at zero)
        head.lora_A["default"].weight.copy_(torch.randn(4, HIDDEN, generator=gen) * 0.3)
        head.lora_B["default"].weight.copy_(torch.randn(VOCAB, 4, generator=gen) * 0.3)
    return head


def _case(seed: int, lora: bool, rows: int = 3, width: int = 7):
    gen = torch.Generator().manual_seed(seed)
    head = _lora_head(gen) if lora else _frozen_head(gen)
    states = torch.randn(rows, width, HIDDEN, generator=gen)
    targets = torch.randint(0, VOCAB, (rows, width), generator=gen)
    valid = torch.ones(rows, width, dtype=torch.long)
    valid[1, 4:] = 0  # a shorter, right-padded sequence
    valid[2, 6:] = 0
    upstream = torch.randn(rows, width, generator=gen) * valid
    upstream[0, :3] = 0  # prompt positions: no gradient
    return head, states, targets, valid, upstream


def _run(fn, head, states, upstream):
    """Values, and gradients of sum(values * upstream) w.r.t. the states and the adapter."""
    head.zero_grad(set_to_none=True)
    states = states.clone().requires_grad_(True)
    values = fn(states)
    (values * upstream).sum().backward()
    adapter = [p.grad.clone() for p in head.parameters() if p.requires_grad]
    return values.detach(), states.grad, adapter


def _compare(head, states, targets, valid, upstream, dtype, chunk, atol_value, atol_grad):
    cpu = torch.device("cpu")
    autocast = None if dtype == torch.float32 else dtype
    reference = _run(
        lambda h: chunked_target_logprobs(head, h, targets, device=cpu, autocast_dtype=autocast),
        head,
        states,
        upstream,
    )
    parts = head_parts(head)
    assert parts is not None
    fast = _run(
        lambda h: head_logprobs(parts, h, targets, valid, product_dtype=dtype, chunk=chunk),
        head,
        states,
        upstream,
    )
    mask = valid.bool()
    torch.testing.assert_close(fast[0][mask], reference[0][mask], rtol=0, atol=atol_value)
    assert torch.equal(fast[0][~mask], torch.zeros_like(fast[0][~mask]))
    torch.testing.assert_close(fast[1], reference[1], rtol=0, atol=atol_grad)
    assert len(fast[2]) == len(reference[2])
    for ours, theirs in zip(fast[2], reference[2]):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=atol_grad)


@pytest.mark.parametrize("lora", [False, True], ids=["frozen", "lora"])
@pytest.mark.parametrize("chunk", [2, 512])
def test_matches_autograd_through_the_head_in_fp32(lora, chunk):
    _compare(*_case(0, lora), torch.float32, chunk, atol_value=1e-5, atol_grad=1e-5)


@pytest.mark.parametrize("lora", [False, True], ids=["frozen", "lora"])
def test_matches_autograd_under_bf16_products(lora):
    # the same bf16 products; the order of fp32 reductions and one bf16 rounding differ
    _compare(*_case(1, lora), torch.bfloat16, 512, atol_value=3e-2, atol_grad=5e-2)


def test_positions_without_gradient_and_padding_are_never_unembedded():
    """A position the backward pass recomputed would turn an inf hidden state into nan; the
    ones with a zero upstream gradient (and padding) must get an exact zero instead."""
    head, states, targets, valid, upstream = _case(2, lora=True)
    states[0, :3] = float("inf")  # no gradient there
    states[1, 5] = float("inf")  # padding
    parts = head_parts(head)
    _, grad, adapter = _run(
        lambda h: head_logprobs(parts, h, targets, valid, product_dtype=torch.float32),
        head,
        states,
        upstream,
    )
    assert torch.isfinite(grad).all() and all(torch.isfinite(g).all() for g in adapter)
    assert torch.equal(grad[0, :3], torch.zeros_like(grad[0, :3]))
    assert torch.equal(grad[1, 5], torch.zeros_like(grad[1, 5]))
    assert grad[0, 3:].abs().sum() > 0


def test_rows_with_gradient_lists_nonzero_positions_only():
    assert rows_with_gradient(torch.tensor([0.0, 1e-30, 0.0, -2.0])).tolist() == [1, 3]


def test_only_heads_it_can_take_apart_leave_autograd():
    gen = torch.Generator().manual_seed(3)
    assert head_parts(_frozen_head(gen)) is not None
    lora = head_parts(_lora_head(gen))
    assert lora is not None and lora.scale == 2.0 and lora.down.shape == (4, HIDDEN)
    assert head_parts(_frozen_head(gen).requires_grad_(True)) is None  # a trained head
    assert head_parts(_frozen_head(gen, bias=True)) is None
    assert head_parts(_lora_head(gen, dropout=0.1)) is None  # dropout is random
    merged = _lora_head(gen)
    merged.merge()
    assert head_parts(merged) is None
