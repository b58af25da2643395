"""The built-in losses of `forward_backward`, with the Tinker service's definitions.

Both are *sums* over tokens (not means), as on Tinker: the caller controls normalisation
through the per-token ``weights`` / ``advantages`` it sends, which is what tinker-cookbook's
recipes do. Each function maps one datum's log-probabilities to ``(loss, outputs)``.

* ``cross_entropy``: ``loss = -sum_t weights_t * logp_t``.
* ``importance_sampling``: ``loss = -sum_t exp(logp_t - sampling_logp_t) * advantages_t``,
  the off-policy REINFORCE estimator whose gradient at ``logp == sampling_logp`` is the
  plain policy gradient.
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch
from tinker import types

from ...errors import DataError

LossOutputs = dict[str, torch.Tensor]
LossFn = Callable[[torch.Tensor, Mapping[str, torch.Tensor]], tuple[torch.Tensor, LossOutputs]]


def cross_entropy(logprobs: torch.Tensor, inputs: Mapping[str, torch.Tensor]):
    weights = inputs["weights"].to(logprobs.dtype)
    elementwise = -logprobs * weights
    return elementwise.sum(), {"elementwise_loss": elementwise}


def importance_sampling(logprobs: torch.Tensor, inputs: Mapping[str, torch.Tensor]):
    sampling_logprobs = inputs["logprobs"].to(logprobs.dtype)
    advantages = inputs["advantages"].to(logprobs.dtype)
    ratio = torch.exp(logprobs - sampling_logprobs)
    elementwise = -ratio * advantages
    return elementwise.sum(), {"elementwise_loss": elementwise}


BUILTIN_LOSSES: dict[str, tuple[LossFn, tuple[str, ...]]] = {
    "cross_entropy": (cross_entropy, ("target_tokens", "weights")),
    "importance_sampling": (importance_sampling, ("target_tokens", "logprobs", "advantages")),
}


def loss_inputs_as_tensors(
    datum: types.Datum, required: tuple[str, ...], index: int, loss_name: str
) -> dict[str, torch.Tensor]:
    """Check one datum's ``loss_fn_inputs`` and convert them to 1-D torch tensors."""
    length = datum.model_input.length
    out: dict[str, torch.Tensor] = {}
    for key in required:
        if key not in datum.loss_fn_inputs:
            raise DataError(
                f"datum {index}: loss {loss_name!r} needs loss_fn_inputs[{key!r}]; "
                f"got keys {sorted(datum.loss_fn_inputs)}"
            )
        tensor = datum.loss_fn_inputs[key].to_torch().reshape(-1)
        if tensor.numel() != length:
            raise DataError(
                f"datum {index}: loss_fn_inputs[{key!r}] has {tensor.numel()} entries but "
                f"model_input has {length} tokens; they must match position for position"
            )
        out[key] = tensor
    return out
