"""log p(target) through a frozen output head, whose backward pass touches only the positions
that have a gradient.

Why: training and scoring ask for the log-probability of every position (the SDK returns them
all), but a loss usually weighs only a few of them: the reply of an SFT or DPO sequence, and
the single answer letter of a preference-model comparison (one position in ~400). Autograd
through a checkpointed ``lm_head`` chunk recomputed the logits of *every* position in the
backward pass and multiplied a zero gradient back through the vocabulary-sized product. The
head is ~20% of SmolLM2-135M's forward FLOPs (49,152 words x 576), and it ran three times per
trained position. Here it runs once for every real position (the forward, as before) and
twice only for the positions whose upstream gradient is non-zero.

The gradient is the textbook one, d log p(t) / d logits = onehot(t) - softmax(logits), taken
through the head's product in the product's dtype (bf16 under autocast, as autograd would),
so the result matches autograd through the same computation to float noise; the head's weight
must not need a gradient (LoRA leaves it frozen). Padding positions are skipped entirely.
"""

from __future__ import annotations

import torch

HEAD_CHUNK = 512
"""Positions unembedded at once: the logits of a whole micro-batch (8,192 positions x 49,152
words in fp32: 1.6 GB) were most of the engine's peak memory, so at most one chunk's logits
exist at any time, in the forward and in the backward pass."""


class _FrozenHeadLogprobs(torch.autograd.Function):
    """``log_softmax(hidden @ weight.T)[target]`` per row, chunked, frozen ``weight``."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, product_dtype, chunk):  # type: ignore[override]
        w = weight.to(product_dtype)
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(out)
        for first in range(0, hidden.shape[0], chunk):
            h = hidden[first : first + chunk].to(product_dtype)
            logits = (h @ w.T).float()
            norm = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(-1, targets[first : first + chunk, None]).squeeze(-1)
            out[first : first + chunk] = picked - norm
            lse[first : first + chunk] = norm
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.product_dtype = product_dtype
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        hidden, weight, targets, lse = ctx.saved_tensors
        grad_hidden = torch.zeros_like(hidden)
        rows = rows_with_gradient(grad_out)
        if rows.numel():
            w = weight.to(ctx.product_dtype)
            for first in range(0, rows.numel(), ctx.chunk):
                index = rows[first : first + ctx.chunk]
                h = hidden[index].to(ctx.product_dtype)
                g = grad_out[index].float()
                probs = torch.exp((h @ w.T).float() - lse[index, None])
                dlogits = probs.mul_(-g[:, None])
                dlogits[torch.arange(index.numel(), device=index.device), targets[index]] += g
                grad_hidden[index] = (dlogits.to(ctx.product_dtype) @ w).to(hidden.dtype)
        return grad_hidden, None, None, None, None


def rows_with_gradient(grad: torch.Tensor) -> torch.Tensor:
    """Indices of the positions whose upstream gradient is not zero (the only ones whose
    logits the backward pass recomputes)."""
    return (grad != 0).nonzero().squeeze(-1)


def can_use_frozen_head(head: torch.nn.Module) -> bool:
    """A plain bias-free linear head whose weight is not trained (LoRA's case)."""
    return type(head) is torch.nn.Linear and head.bias is None and not head.weight.requires_grad


def frozen_head_logprobs(
    head: torch.nn.Linear,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    valid: torch.Tensor,
    *,
    product_dtype: torch.dtype,
    chunk: int = HEAD_CHUNK,
) -> torch.Tensor:
    """log p(targets) [R, T] from hidden states [R, T, H]; 0 where ``valid`` [R, T] is False
    (padding), which is never unembedded."""
    flat_valid = valid.reshape(-1).bool()
    index = flat_valid.nonzero().squeeze(-1)
    flat_hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, index)
    picked = _FrozenHeadLogprobs.apply(
        flat_hidden, head.weight, targets.reshape(-1)[index], product_dtype, chunk
    )
    full = torch.zeros(flat_valid.shape[0], dtype=torch.float32, device=hidden.device)
    return full.index_put((index,), picked).reshape(targets.shape)
