"""The frozen-head log-probabilities: autograd's numbers, without unembedding padding or the
positions that have no gradient."""

from __future__ import annotations

import pytest
import torch
from character_training.backends.local.forward import chunked_target_logprobs
from character_training.backends.local.head_logprobs import (
    can_use_frozen_head,
    frozen_head_logprobs,
    rows_with_gradient,
)


def _case(seed: int = 0, rows: int = 3, width: int = 7, hidden: int = 16, vocab: int = 50):
    gen = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(hidden, vocab, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(vocab, hidden, generator=gen))
    head.weight.requires_grad_(False)
    states = torch.randn(rows, width, hidden, generator=gen)
    targets = torch.randint(0, vocab, (rows, width), generator=gen)
    valid = torch.ones(rows, width, dtype=torch.long)
    valid[1, 4:] = 0  # a shorter, right-padded sequence
    valid[2, 6:] = 0
    upstream = torch.randn(rows, width, generator=gen) * valid
    upstream[0, :3] = 0  # prompt positions: no gradient
    return head, states, targets, valid, upstream


def _value_and_grad(fn, states, upstream):
    states = states.clone().requires_grad_(True)
    values = fn(states)
    (values * upstream).sum().backward()
    return values.detach(), states.grad


@pytest.mark.parametrize("chunk", [2, 512])
def test_matches_autograd_through_the_head_in_fp32(chunk):
    head, states, targets, valid, upstream = _case()
    cpu = torch.device("cpu")
    reference = _value_and_grad(
        lambda h: chunked_target_logprobs(head, h, targets, device=cpu, autocast_dtype=None),
        states,
        upstream,
    )
    fast = _value_and_grad(
        lambda h: frozen_head_logprobs(
            head, h, targets, valid, product_dtype=torch.float32, chunk=chunk
        ),
        states,
        upstream,
    )
    mask = valid.bool()
    torch.testing.assert_close(fast[0][mask], reference[0][mask], rtol=0, atol=1e-5)
    assert torch.equal(fast[0][~mask], torch.zeros_like(fast[0][~mask]))
    torch.testing.assert_close(fast[1], reference[1], rtol=0, atol=1e-5)


def test_matches_autograd_under_bf16_products():
    head, states, targets, valid, upstream = _case(seed=1)
    cpu = torch.device("cpu")
    reference = _value_and_grad(
        lambda h: chunked_target_logprobs(
            head, h, targets, device=cpu, autocast_dtype=torch.bfloat16
        ),
        states,
        upstream,
    )
    fast = _value_and_grad(
        lambda h: frozen_head_logprobs(head, h, targets, valid, product_dtype=torch.bfloat16),
        states,
        upstream,
    )
    mask = valid.bool()
    # the same bf16 products; only the order of fp32 reductions differs
    torch.testing.assert_close(fast[0][mask], reference[0][mask], rtol=0, atol=2e-3)
    torch.testing.assert_close(fast[1], reference[1], rtol=0, atol=2e-2)


def test_positions_without_gradient_and_padding_are_never_unembedded():
    """A position the backward pass recomputed would turn an inf hidden state into nan; the
    ones with a zero upstream gradient (and padding) must get an exact zero instead."""
    head, states, targets, valid, upstream = _case(seed=2)
    states[0, :3] = float("inf")  # no gradient there
    states[1, 5] = float("inf")  # padding
    _, grad = _value_and_grad(
        lambda h: frozen_head_logprobs(head, h, targets, valid, product_dtype=torch.float32),
        states,
        upstream,
    )
    assert torch.isfinite(grad).all()
    assert torch.equal(grad[0, :3], torch.zeros_like(grad[0, :3]))
    assert torch.equal(grad[1, 5], torch.zeros_like(grad[1, 5]))
    assert grad[0, 3:].abs().sum() > 0


def test_rows_with_gradient_lists_nonzero_positions_only():
    assert rows_with_gradient(torch.tensor([0.0, 1e-30, 0.0, -2.0])).tolist() == [1, 3]


def test_only_a_frozen_plain_linear_head_takes_the_fast_path():
    frozen = torch.nn.Linear(4, 6, bias=False).requires_grad_(False)
    assert can_use_frozen_head(frozen)
    assert not can_use_frozen_head(torch.nn.Linear(4, 6, bias=False))  # trained head
    assert not can_use_frozen_head(torch.nn.Linear(4, 6).requires_grad_(False))  # bias
