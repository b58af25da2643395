"""Training through a prompt prefix that every sequence of a batch shares, once per batch.

Why: a preference model's comparisons (and any batch under one long system prompt) start with
the same few hundred tokens: the instructions and the character the judge is shown. Run whole,
each comparison carried that prefix through the forward pass, the backward pass and, because
a 600-token row exceeds the activation budget, a recomputed forward too; the prefix was about
two thirds of the preference model's training time.

How, exactly up to float summation order:

1. The prefix runs once, without a graph, layer by layer, keeping each layer's input (one
   hidden-sized row per token and layer) and its keys and values.
2. Each micro-batch of the rows' own tokens (the suffixes) attends to those keys and values,
   broadcast to its rows from leaf tensors that collect gradients. The prefix positions'
   log-probabilities are one shared leaf too. The caller runs each micro-batch's backward as
   usual; the leaves sum what every row sends back to the prefix.
3. When the caller asks for the next micro-batch after the last one, the prefix's own backward
   runs from those sums, one layer at a time from the kept inputs (so its memory is one layer's
   activations, not the whole stack's), down to the embeddings.

The weights do not change between 1 and 3 (the optimiser steps after the whole batch), so the
kept inputs are those a whole-row pass computes. Only decoders laid out like Llama's
(``embed_tokens``, ``layers``, ``rotary_emb``, ``norm``) take this path; others run whole.
"""

from __future__ import annotations

from typing import Callable, ContextManager, Iterator, Sequence

import torch

MIN_SHARED_PREFIX = 64  # tokens; below this the bookkeeping costs more than it saves


def shared_prefix_length(inputs: Sequence[Sequence[int]], targets: Sequence[Sequence[int]]) -> int:
    """Positions every sequence starts with, inputs and targets alike, when worth sharing: at
    least `MIN_SHARED_PREFIX`, two sequences or more, and a position of its own after it in
    each (0 otherwise). The targets count too, so a prefix position's log-probability is the
    same number in every row."""
    if len(inputs) < 2:
        return 0
    first = list(zip(inputs[0], targets[0]))
    length = min(len(s) for s in inputs) - 1
    for seq, tgt in zip(inputs[1:], targets[1:]):
        pairs = list(zip(seq[:length], tgt[:length]))
        length = next((i for i, (a, b) in enumerate(zip(first, pairs)) if a != b), len(pairs))
        if length < MIN_SHARED_PREFIX:
            return 0
    return length


def supports(decoder: torch.nn.Module) -> bool:
    """Whether ``decoder`` has the parts this module runs one layer at a time."""
    return all(hasattr(decoder, name) for name in ("embed_tokens", "layers", "rotary_emb", "norm"))


class SharedPrefix:
    """One batch's shared prefix: its kept layer inputs, its keys and values as gradient
    leaves, and its positions' log-probabilities as a gradient leaf (steps 1-3 above)."""

    def __init__(
        self,
        decoder: torch.nn.Module,
        head_logprobs: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        prefix_ids: torch.Tensor,
        prefix_targets: torch.Tensor,
        *,
        grad: bool,
        autocast: Callable[[], ContextManager],
    ):
        self.decoder = decoder
        self.head_logprobs = head_logprobs  # hidden [1, P, H], targets [1, P] -> log-probs [1, P]
        self.autocast = autocast  # the decoder's products run under the caller's autocast
        self.ids, self.targets = prefix_ids, prefix_targets
        self.length = int(prefix_ids.shape[1])
        self.layers = list(decoder.layers[: decoder.config.num_hidden_layers])
        self.positions = torch.arange(self.length, device=prefix_ids.device)[None]
        with torch.no_grad():
            with autocast():
                hidden = decoder.embed_tokens(prefix_ids)
                self.rope = decoder.rotary_emb(hidden, position_ids=self.positions)
                self.inputs: list[torch.Tensor] = []
                keys, values = [], []
                for layer in self.layers:
                    self.inputs.append(hidden)
                    hidden, k, v = self._layer(layer, hidden)
                    keys.append(k)
                    values.append(v)
                self.inputs.append(hidden)  # the last layer's output, before the final norm
                normed = decoder.norm(hidden)
            logprobs = head_logprobs(normed, prefix_targets)[0]
        self.grad = grad
        self.keys = [k.detach().requires_grad_(grad) for k in keys]
        self.values = [v.detach().requires_grad_(grad) for v in values]
        self.logprobs = logprobs.detach().requires_grad_(grad)

    def _layer(self, layer, hidden):
        """One decoder layer over the prefix (causal, no padding): output, keys, values."""
        from transformers import DynamicCache

        cache = DynamicCache(config=self.decoder.config)
        out = layer(
            hidden,
            attention_mask=None,
            position_embeddings=self.rope,
            position_ids=self.positions,
            past_key_values=cache,
            use_cache=True,
        )
        index = layer.self_attn.layer_idx
        return out, cache.layers[index].keys, cache.layers[index].values

    def suffix_hidden(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Last hidden states [R, S, H] of right-padded suffixes ``ids`` (mask ``mask``) that
        follow the prefix, attending to its keys and values broadcast to every row."""
        from transformers import DynamicCache

        rows = ids.shape[0]
        cache = DynamicCache(config=self.decoder.config)
        for index, (k, v) in enumerate(zip(self.keys, self.values)):
            cache.update(k.expand(rows, -1, -1, -1), v.expand(rows, -1, -1, -1), index)
        ones = torch.ones((rows, self.length), dtype=mask.dtype, device=mask.device)
        positions = torch.arange(self.length, self.length + ids.shape[1], device=ids.device)
        with self.autocast():
            return self.decoder(
                input_ids=ids,
                attention_mask=torch.cat([ones, mask], dim=1),
                position_ids=positions.expand(rows, -1),
                past_key_values=cache,
                use_cache=True,
            ).last_hidden_state

    def backward(self) -> None:
        """The prefix's part of the gradient, from what the rows sent to the leaves: the head
        and final norm, then each layer recomputed from its kept input, top to bottom."""
        if not self.grad:
            return
        top = self.inputs[-1].detach().requires_grad_(True)
        upstream = None
        if self.logprobs.grad is not None:
            with self.autocast():
                normed = self.decoder.norm(top)
            logprobs = self.head_logprobs(normed, self.targets)[0]
            torch.autograd.backward([logprobs], [self.logprobs.grad])
            upstream = top.grad
        for index in reversed(range(len(self.layers))):
            layer_input = self.inputs[index].detach().requires_grad_(True)
            with self.autocast():
                out, k, v = self._layer(self.layers[index], layer_input)
            pairs = [(out, upstream), (k, self.keys[index].grad), (v, self.values[index].grad)]
            pairs = [(t, g) for t, g in pairs if g is not None]
            if pairs:
                torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs])
            upstream = layer_input.grad
        embed = self.decoder.embed_tokens
        if upstream is not None and any(p.requires_grad for p in embed.parameters()):
            with self.autocast():
                embedded = embed(self.ids)
            torch.autograd.backward([embedded], [upstream])


def scored_with_shared_prefix(
    prefix: SharedPrefix,
    suffixes: Sequence[Sequence[int]],
    suffix_targets: Sequence[Sequence[int]],
    groups: Sequence[Sequence[int]],
    suffix_logprobs,
    right_pad,
) -> Iterator[tuple[list[int], list[torch.Tensor]]]:
    """``(indices, logprobs)`` per micro-batch of ``groups`` (over the suffixes), each row's
    log-probabilities the prefix's followed by its own; after the last micro-batch (the
    caller has run its backward) the prefix's backward runs."""
    for group in groups:
        ids, mask = right_pad([suffixes[i] for i in group])
        tgt, _ = right_pad([suffix_targets[i] for i in group], pad=0)
        hidden = prefix.suffix_hidden(ids, mask)
        flat = suffix_logprobs(hidden, tgt, mask)
        own = [flat[row, : len(suffixes[i])] for row, i in enumerate(group)]
        yield list(group), [torch.cat([prefix.logprobs, values]) for values in own]
    prefix.backward()
