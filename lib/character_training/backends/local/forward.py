"""Teacher-forced log-probabilities over ragged batches: the one forward pass the engine has.

Training (`forward_backward`), DPO reference scoring and `compute_logprobs` all reduce to
"log p(target_t | tokens_<=t) for every position of every sequence". Doing that in one place
guarantees the numbers agree across those uses, which DPO (policy vs reference) and RL
(sampler vs learner) both rely on. Sequences are sorted by length and packed into
micro-batches bounded by a padded-token budget, so memory stays flat however large the batch.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

from . import shared_prefix
from .head_logprobs import HEAD_CHUNK, head_logprobs, head_parts


def micro_batches(lengths: Sequence[int], token_budget: int) -> list[list[int]]:
    """Group indices (longest first) so that each group's ``count * max_len <= token_budget``.

    A sequence longer than the budget gets a group of its own rather than an error: the budget
    is a memory target, not a limit on what can be trained.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    current: list[int] = []
    current_max = 0
    for idx in order:
        new_max = max(current_max, lengths[idx])
        if current and new_max * (len(current) + 1) > token_budget:
            groups.append(current)
            current, new_max = [], lengths[idx]
        current.append(idx)
        current_max = new_max
    if current:
        groups.append(current)
    return groups


def autocast_context(device: torch.device, dtype: torch.dtype | None):
    """bf16 autocast when asked for, a no-op otherwise."""
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def right_pad(sequences: Sequence[Sequence[int]], pad_id: int, device: torch.device):
    """Stack ragged token lists into (ids, attention_mask), padding on the right."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.as_tensor(list(seq), dtype=torch.long)
        mask[row, : len(seq)] = 1
    return ids.to(device), mask.to(device)


def logprobs_with_alternatives(
    model: torch.nn.Module,
    inputs: Sequence[Sequence[int]],
    targets: Sequence[Sequence[int]],
    alternatives: Sequence[Sequence[int]],
    *,
    pad_id: int,
    device: torch.device,
    autocast_dtype: torch.dtype | None,
    starts: Sequence[int] | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Log-probabilities of ``targets[r][starts[r]:]`` given ``inputs[r]``, plus log p(a | the
    whole input) for each id ``a`` of ``alternatives[r]``; one padded forward for the batch.

    Two savings over `iter_scored_micro_batches`, both exact. Sequences that differ only in
    their last token (a forced choice between one-token answers) are one row here: the last
    position's distribution holds every answer. And only positions from ``starts[r]`` on go
    through the unembedding and the softmax (a vocabulary-sized product per position, about a
    fifth of a small model's forward): a judge's verdict needs one position, not the whole
    prompt.
    """
    starts = [0] * len(inputs) if starts is None else list(starts)
    ids, mask = right_pad(inputs, pad_id, device)
    selective = getattr(model.config, "final_logit_softcapping", None) is None and hasattr(
        model, "get_decoder"
    )
    with autocast_context(device, autocast_dtype):
        if selective:
            hidden = model.get_decoder()(input_ids=ids, attention_mask=mask, use_cache=False)
            hidden = hidden.last_hidden_state
            head = model.get_output_embeddings()
            # one product per row: a row's numbers must not depend on what shares its batch
            rows = [head(hidden[r, starts[r] : len(seq)]) for r, seq in enumerate(inputs)]
            logits = torch.cat(rows)
        else:
            full = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            logits = torch.cat([full[r, starts[r] : len(seq)] for r, seq in enumerate(inputs)])
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    out, offset = [], 0
    for r, seq in enumerate(inputs):
        count = len(seq) - starts[r]
        block = logprobs[offset : offset + count]
        offset += count
        wanted = torch.as_tensor(list(targets[r][starts[r] :]), dtype=torch.long, device=device)
        picked = block[torch.arange(count, device=device), wanted]
        last = block[-1, torch.as_tensor(list(alternatives[r]), dtype=torch.long, device=device)]
        out.append((picked, last))
    return out


def iter_scored_micro_batches(
    model: torch.nn.Module,
    inputs: Sequence[Sequence[int]],
    targets: Sequence[Sequence[int]],
    *,
    pad_id: int,
    device: torch.device,
    autocast_dtype: torch.dtype | None,
    token_budget: int,
    checkpoint_tokens: int | None = None,
    share_prefix: bool = False,
) -> Iterator[tuple[list[int], list[torch.Tensor]]]:
    """Yield ``(indices, logprobs)`` per micro-batch, in the packing order of `micro_batches`.

    ``logprobs`` holds the log-probabilities (float32, one per input position) of each
    sequence's ``targets`` given its ``inputs``, from one padded forward pass per micro-batch.
    Gradients flow when grad mode is on, so the training client uses them directly as its loss
    input. A micro-batch of more than ``checkpoint_tokens`` padded tokens (a sequence longer
    than the budget gets a micro-batch of its own) keeps only the input of enough layers for
    its activations to fit that many tokens' worth, and recomputes those layers in the backward
    pass (`activation_checkpointing`).

    With ``share_prefix``, sequences that all start with the same `MIN_SHARED_PREFIX` or more
    tokens run that prefix once (`shared_prefix`). The caller must then run each micro-batch's
    backward before asking for the next (as ``forward_backward`` does): the prefix's own
    backward runs when the generator is resumed after the last one.
    """
    if share_prefix:
        shared = _shareable_prefix(model, inputs, targets, token_budget, checkpoint_tokens)
        if shared:
            yield from _scored_with_shared_prefix(
                model, inputs, targets, shared, pad_id, device, autocast_dtype, token_budget
            )
            return
    layers = len(getattr(_decoder(model), "layers", ()))
    for group in micro_batches([len(s) for s in inputs], token_budget):
        ids, mask = right_pad([inputs[i] for i in group], pad_id, device)
        tgt, _ = right_pad([targets[i] for i in group], 0, device)
        recompute = 0
        if checkpoint_tokens is not None and torch.is_grad_enabled():
            recompute = layers_to_checkpoint(ids.numel(), checkpoint_tokens, layers)
        if _splits_the_head(model):
            with (
                autocast_context(device, autocast_dtype),
                activation_checkpointing(model, recompute),
            ):
                hidden = model.get_decoder()(input_ids=ids, attention_mask=mask, use_cache=False)
            head = model.get_output_embeddings()
            parts = head_parts(head)
            if parts is not None:
                flat = head_logprobs(
                    parts,
                    hidden.last_hidden_state,
                    tgt,
                    mask,
                    product_dtype=_product_dtype(hidden.last_hidden_state, autocast_dtype),
                )
            else:
                flat = chunked_target_logprobs(
                    head,
                    hidden.last_hidden_state,
                    tgt,
                    device=device,
                    autocast_dtype=autocast_dtype,
                )
        else:
            with (
                autocast_context(device, autocast_dtype),
                activation_checkpointing(model, recompute),
            ):
                logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            flat = _target_logprobs(logits, tgt.reshape(-1)).reshape(tgt.shape)
        yield group, [flat[row, : len(inputs[i])] for row, i in enumerate(group)]


def _shareable_prefix(model, inputs, targets, token_budget: int, checkpoint_tokens) -> int:
    """The prefix length `shared_prefix` may run once, or 0: a Llama-like decoder with a plain
    head, and every suffix within the activation budget (a checkpointed layer drops the keys
    and values the suffixes attend to)."""
    if not _splits_the_head(model) or not shared_prefix.supports(model.get_decoder()):
        return 0
    shared = shared_prefix.shared_prefix_length(inputs, targets)
    if not shared:
        return 0
    longest = max(len(s) for s in inputs) - shared
    if longest > token_budget:
        return 0
    if checkpoint_tokens is not None and torch.is_grad_enabled() and longest > checkpoint_tokens:
        return 0
    return shared


def _scored_with_shared_prefix(
    model, inputs, targets, shared: int, pad_id: int, device, autocast_dtype, token_budget: int
) -> Iterator[tuple[list[int], list[torch.Tensor]]]:
    head = model.get_output_embeddings()
    parts = head_parts(head)

    def logprobs(hidden: torch.Tensor, tgt: torch.Tensor, mask=None) -> torch.Tensor:
        if parts is None:
            return chunked_target_logprobs(
                head, hidden, tgt, device=device, autocast_dtype=autocast_dtype
            )
        mask = torch.ones_like(tgt) if mask is None else mask
        dtype = _product_dtype(hidden, autocast_dtype)
        return head_logprobs(parts, hidden, tgt, mask, product_dtype=dtype)

    prefix = shared_prefix.SharedPrefix(
        model.get_decoder(),
        logprobs,
        torch.as_tensor(list(inputs[0][:shared]), dtype=torch.long, device=device)[None],
        torch.as_tensor(list(targets[0][:shared]), dtype=torch.long, device=device)[None],
        grad=torch.is_grad_enabled(),
        autocast=lambda: autocast_context(device, autocast_dtype),
    )
    suffixes = [list(s[shared:]) for s in inputs]
    return shared_prefix.scored_with_shared_prefix(
        prefix,
        suffixes,
        [list(t[shared:]) for t in targets],
        micro_batches([len(s) for s in suffixes], token_budget),
        logprobs,
        lambda rows, pad=pad_id: right_pad(rows, pad, device),
    )


def _decoder(model: torch.nn.Module):
    return model.get_decoder() if hasattr(model, "get_decoder") else None


def layers_to_checkpoint(tokens: int, budget_tokens: int, layers: int) -> int:
    """How many decoder layers a micro-batch of ``tokens`` must checkpoint for its kept
    activations to stay near ``budget_tokens`` tokens' worth of a whole layer stack (a
    checkpointed layer keeps only its input, and the backward pass rebuilds one layer at a
    time)."""
    if tokens <= budget_tokens or layers == 0:
        return 0
    kept = layers * budget_tokens // tokens  # layers whose activations fit
    return min(layers, layers - kept + 1)


@contextlib.contextmanager
def activation_checkpointing(model: torch.nn.Module, layers: int):
    """Hugging Face gradient checkpointing (non-reentrant) of the first ``layers`` decoder
    layers inside the block (none when 0).

    Exact: a checkpointed layer's recomputed forward is the same computation. It costs that
    layer's forward once more, so the training client checkpoints only micro-batches that
    cannot be split below its activation budget, and only as many layers as needed.
    """
    stack = list(getattr(_decoder(model), "layers", ()))
    if layers <= 0 or not stack or not hasattr(model, "gradient_checkpointing_enable"):
        yield
        return
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    try:
        for layer in stack[layers:]:
            layer.gradient_checkpointing = False
        yield
    finally:
        model.gradient_checkpointing_disable()


def activation_bytes_per_token(config) -> int:
    """Rough bytes of activations a decoder layer stack keeps per token for its backward pass
    (fp32; measured on SmolLM2 with LoRA on every linear layer: ~20 hidden-sized and ~4
    intermediate-sized tensors per layer)."""
    hidden = int(config.hidden_size)
    intermediate = int(getattr(config, "intermediate_size", 4 * hidden))
    return int(config.num_hidden_layers) * (20 * hidden + 4 * intermediate) * 4


def _product_dtype(hidden: torch.Tensor, autocast_dtype: torch.dtype | None) -> torch.dtype:
    """The dtype autocast would run the head's product in."""
    if autocast_dtype is None or autocast_dtype == torch.float32:
        return hidden.dtype
    return autocast_dtype


def _splits_the_head(model: torch.nn.Module) -> bool:
    """Whether the model's logits are its output embedding applied to the decoder's last
    hidden states, with nothing after (no soft-capping), so the head can run in chunks."""
    return getattr(model.config, "final_logit_softcapping", None) is None and all(
        hasattr(model, name) for name in ("get_decoder", "get_output_embeddings")
    )


def _target_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = logits.float()
    return -F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets, reduction="none")


def chunked_target_logprobs(
    head: torch.nn.Module,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    *,
    device: torch.device,
    autocast_dtype: torch.dtype | None,
    chunk: int = HEAD_CHUNK,
) -> torch.Tensor:
    """log p(targets) [R, T] from hidden states [R, T, H], unembedding ``chunk`` positions at
    a time (a head `head_logprobs.head_parts` cannot take apart: a trained weight, a bias,
    dropout). With gradients on, each chunk is checkpointed: its logits are recomputed in the
    backward pass instead of kept, so at most one chunk's logits exist at any time. The
    numbers are those of the whole product (each position's logits are its own row)."""
    from torch.utils.checkpoint import checkpoint

    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_targets = targets.reshape(-1)

    def piece(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with autocast_context(device, autocast_dtype):
            logits = head(h)
        return _target_logprobs(logits, t)

    keep_graph = torch.is_grad_enabled() and flat_hidden.requires_grad
    pieces = []
    for first in range(0, flat_hidden.shape[0], chunk):
        h, t = flat_hidden[first : first + chunk], flat_targets[first : first + chunk]
        pieces.append(checkpoint(piece, h, t, use_reentrant=False) if keep_graph else piece(h, t))
    return torch.cat(pieces).reshape(targets.shape)
