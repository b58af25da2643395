"""log p(target) through the output head (frozen weight, optionally a LoRA on it), with a
backward pass that touches only the positions that have a gradient.

Why: training and scoring ask for the log-probability of every position (the SDK returns them
all), but a loss usually weighs only some of them: the reply of an SFT or DPO sequence, and
the single answer letter of a preference-model comparison (one position in ~400). Autograd
through a checkpointed ``lm_head`` chunk recomputed the logits of *every* position in the
backward pass and multiplied a zero gradient back through the vocabulary-sized product. The
head is ~20% of SmolLM2-135M's forward FLOPs (49,152 words x 576), and it ran three times per
trained position. Here it runs once for every real position (the forward, as before) and
twice only for the positions whose upstream gradient is non-zero; padding is never unembedded.

With ``logits = h W^T + s (h A^T) B^T`` (``W`` frozen; ``A``, ``B`` the LoRA's down and up
projections, ``s`` its scale) and ``d = g (onehot(t) - softmax(logits))`` for upstream
gradient ``g``: ``dh = d W + s (d B) A``, ``dB = s d^T (h A^T)``, ``dA = s (d B)^T h``. The
products run in the dtype autocast would give them (bf16 or fp32), so the numbers match
autograd through the same layer to float noise (tested against it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

HEAD_CHUNK = 512
"""Positions unembedded at once: the logits of a whole micro-batch (8,192 positions x 49,152
words in fp32: 1.6 GB) were most of the engine's peak memory, so at most one chunk's logits
exist at any time, in the forward and in the backward pass."""


@dataclass(frozen=True)
class HeadParts:
    """The output head as plain tensors: a frozen weight and an optional low-rank update."""

    weight: torch.Tensor  # [vocab, hidden], frozen
    down: torch.Tensor | None = None  # LoRA A [rank, hidden]
    up: torch.Tensor | None = None  # LoRA B [vocab, rank]
    scale: float = 1.0


def head_parts(head: torch.nn.Module) -> HeadParts | None:
    """`HeadParts` of a bias-free linear head with a frozen weight, bare or wrapped by one
    active, unmerged, dropout-free plain LoRA (peft); None for anything else (the caller then
    takes autograd's path)."""
    if type(head) is torch.nn.Linear:
        return HeadParts(head.weight) if _frozen_plain(head) else None
    try:
        from peft.tuners.lora.layer import Linear as LoraLinear
    except ImportError:  # pragma: no cover - peft is a dependency of the local engine
        return None
    if type(head) is not LoraLinear or head.merged or head.disable_adapters:
        return None
    if len(head.active_adapters) != 1 or not _frozen_plain(head.base_layer):
        return None
    name = head.active_adapters[0]
    if name not in head.lora_A or name not in head.lora_B or name not in head.lora_dropout:
        return None
    down, up = head.lora_A[name], head.lora_B[name]
    plain = (
        not head.use_dora.get(name, False)
        and type(head.lora_dropout[name]) is torch.nn.Identity
        and type(down) is torch.nn.Linear
        and type(up) is torch.nn.Linear
        and down.bias is None
        and up.bias is None
    )
    if not plain:
        return None
    return HeadParts(head.base_layer.weight, down.weight, up.weight, float(head.scaling[name]))


def _frozen_plain(linear: torch.nn.Module) -> bool:
    return (
        type(linear) is torch.nn.Linear and linear.bias is None and not linear.weight.requires_grad
    )


class _HeadLogprobs(torch.autograd.Function):
    """``log_softmax(logits(hidden))[target]`` per row, chunked (see the module docstring)."""

    @staticmethod
    def forward(ctx, hidden, weight, down, up, targets, scale, product_dtype, chunk):  # type: ignore[override]
        lora = down is not None
        w = weight.to(product_dtype)
        a = down.to(product_dtype) if lora else None
        b = up.to(product_dtype) if lora else None
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(out)
        for first in range(0, hidden.shape[0], chunk):
            logits = _logits(hidden[first : first + chunk].to(product_dtype), w, a, b, scale)
            norm = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(-1, targets[first : first + chunk, None]).squeeze(-1)
            out[first : first + chunk] = picked - norm
            lse[first : first + chunk] = norm
        ctx.save_for_backward(hidden, weight, down, up, targets, lse)
        ctx.scale, ctx.product_dtype, ctx.chunk = scale, product_dtype, chunk
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        hidden, weight, down, up, targets, lse = ctx.saved_tensors
        lora, scale, dtype = down is not None, ctx.scale, ctx.product_dtype
        grad_hidden = torch.zeros_like(hidden)
        grad_down = torch.zeros_like(down, dtype=torch.float32) if lora else None
        grad_up = torch.zeros_like(up, dtype=torch.float32) if lora else None
        rows = rows_with_gradient(grad_out)
        w = weight.to(dtype)
        a = down.to(dtype) if lora else None
        b = up.to(dtype) if lora else None
        for first in range(0, rows.numel(), ctx.chunk):
            index = rows[first : first + ctx.chunk]
            h = hidden[index].to(dtype)
            g = grad_out[index].float()
            dlogits = torch.exp(_logits(h, w, a, b, scale) - lse[index, None]).mul_(-g[:, None])
            dlogits[torch.arange(index.numel(), device=index.device), targets[index]] += g
            d = dlogits.to(dtype)
            dh = d @ w
            if lora:
                through_up = d @ b  # [n, rank]
                dh = dh + (through_up * scale) @ a
                grad_up += scale * (d.T @ (h @ a.T)).float()
                grad_down += scale * (through_up.T @ h).float()
            grad_hidden[index] = dh.to(hidden.dtype)
        if lora:
            grad_down, grad_up = grad_down.to(down.dtype), grad_up.to(up.dtype)
        return grad_hidden, None, grad_down, grad_up, None, None, None, None


def _logits(h, w, a, b, scale) -> torch.Tensor:
    """fp32 logits of a chunk of hidden states, the products in ``h``'s dtype (as peft: the
    update ``(h A^T) B^T`` times the scale, added to the frozen product)."""
    logits = h @ w.T
    if a is not None:
        logits = logits + ((h @ a.T) @ b.T) * scale
    return logits.float()


def rows_with_gradient(grad: torch.Tensor) -> torch.Tensor:
    """Indices of the positions whose upstream gradient is not zero (the only ones whose
    logits the backward pass recomputes)."""
    return (grad != 0).nonzero().squeeze(-1)


def head_logprobs(
    parts: HeadParts,
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
    picked = _HeadLogprobs.apply(
        flat_hidden,
        parts.weight,
        parts.down,
        parts.up,
        targets.reshape(-1)[index],
        parts.scale,
        product_dtype,
        chunk,
    )
    full = torch.zeros(flat_valid.shape[0], dtype=torch.float32, device=hidden.device)
    return full.index_put((index,), picked).reshape(targets.shape)
