"""Teacher-forced scoring on the fast decoder, with shared prompt prefixes computed once.

`LocalSamplingClient.compute_logprobs` scores judge prompts, forced-choice answers and
candidate replies. These come in families that share long prefixes (one judge instruction,
one conversation with several candidate replies), so scoring reuses `prefix_cache` entries:
a prefix shared by several inputs is run once, and each input runs only its suffix,
attending to the stored keys and values. The prefix must end before the first position
whose log-probability is asked for (its hidden states are not kept), and before the input's
last token.

Numerics: the layer math is the fast decoder's (`fast_decode.FastDecoder`), which reproduces
the Hugging Face forward of the sampling model; attention runs in the activation dtype
(fp32), as it does in that forward. Only positions from each input's first scored one go
through the unembedding, one product per input so that an input's numbers do not depend on
what shares its batch.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .fast_decode import FastDecoder
from .forward import micro_batches
from .prefix_cache import PrefixCounters, PrefixKV

# An input's attention reads its prefix's keys and values: a row counts as this fraction of
# its prefix (plus its suffix) against the micro-batch token budget, which bounds the copied
# keys without shrinking batches of short suffixes to a few rows.
_PREFIX_WEIGHT = 4


def score_inputs(
    fast: FastDecoder,
    inputs: Sequence[Sequence[int]],
    targets: Sequence[Sequence[int]],
    alternatives: Sequence[Sequence[int]],
    starts: Sequence[int],
    reuse: Sequence[tuple[PrefixKV | None, int]],
    *,
    pad_id: int,
    token_budget: int,
    counters: PrefixCounters,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """As `forward.logprobs_with_alternatives`: for each input ``r``, the log-probabilities of
    ``targets[r][starts[r]:]`` and log p(a | the whole input) for each ``a`` of
    ``alternatives[r]``; input ``r`` starts from the first ``reuse[r][1]`` tokens of the
    stored prefix ``reuse[r][0]`` (at most ``starts[r]`` and ``len(inputs[r]) - 1``)."""
    device = fast.device
    dtype = fast.act_dtype
    out: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(inputs)
    groups: dict[tuple[int, int], list[int]] = {}
    for index, (entry, length) in enumerate(reuse):
        groups.setdefault((id(entry), length), []).append(index)
    for members in groups.values():
        entry, length = reuse[members[0]]
        suffixes = [list(inputs[i][length:]) for i in members]
        costs = [max(len(s), (length + len(s)) // _PREFIX_WEIGHT) for s in suffixes]
        for batch in micro_batches(costs, token_budget):
            rows = [members[b] for b in batch]
            width = max(len(suffixes[b]) for b in batch)
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            for row, b in enumerate(batch):
                ids[row, : len(suffixes[b])] = torch.as_tensor(suffixes[b], dtype=torch.long)
            hidden, _ = fast.extend(ids.to(device), entry, length, dtype)
            counters.computed += sum(len(suffixes[b]) for b in batch)
            counters.padded += ids.numel()
            for row, index in enumerate(rows):
                first, end = starts[index] - length, len(inputs[index]) - length
                logprobs = torch.log_softmax(fast.unembed(hidden[row, first:end]), dim=-1)
                count = end - first
                wanted = torch.as_tensor(
                    list(targets[index][starts[index] :]), dtype=torch.long, device=device
                )
                picked = logprobs[torch.arange(count, device=device), wanted]
                last = logprobs[
                    -1, torch.as_tensor(list(alternatives[index]), dtype=torch.long, device=device)
                ]
                out[index] = (picked, last)
    return out  # type: ignore[return-value]
