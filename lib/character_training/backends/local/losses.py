"""The built-in losses of `forward_backward`, with the Tinker service's definitions.

Every loss is a *sum* over tokens (not a mean), as on Tinker: the caller controls
normalisation through the per-token ``weights`` / ``advantages`` it sends, which is what
tinker-cookbook's recipes do. With ``lp`` the learner's log-probability of each target token,
``q`` the sampler's (``loss_fn_inputs["logprobs"]``), ``A`` the advantages and
``r = exp(lp - q)`` the importance ratio, the per-token losses are (Tinker's loss docs):

* ``cross_entropy``: ``-weights * lp``;
* ``importance_sampling``: ``-r * A``;
* ``ppo``: ``-min(r * A, clip(r, low, high) * A)``;
* ``cispo``: ``-stopgrad(clip(r, low, high)) * lp * A``;
* ``dro``: ``-(lp * A - beta / 2 * (lp - q) ** 2)``.

``loss_fn_config`` carries the hyper-parameters: ``clip_low_threshold`` and
``clip_high_threshold`` for ppo and cispo (default 0.8 and 1.2, Tinker's documented epsilon of
0.2) and ``beta`` for dro. Tinker documents no default for ``beta``, so the local engine asks
for it rather than guess. The other loss types Tinker lists (``gspo``, ``stable_reinforce``,
``custom``) are not implemented here and fail in one line: their full definitions (sequence
masks, KL terms, server-side graphs) are not in the SDK, and an approximation would train
silently on a different objective.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping, get_args

import torch
from tinker import types

from ...errors import BackendError, DataError

LossOutputs = dict[str, torch.Tensor]
LossFn = Callable[
    [torch.Tensor, Mapping[str, torch.Tensor], Mapping[str, float]],
    tuple[torch.Tensor, LossOutputs],
]

_RL_INPUTS = ("target_tokens", "logprobs", "advantages")
_CLIP_DEFAULTS: dict[str, float | None] = {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}


def cross_entropy(lp: torch.Tensor, inputs: Mapping[str, torch.Tensor], config):
    elementwise = -lp * inputs["weights"].to(lp.dtype)
    return elementwise.sum(), {"elementwise_loss": elementwise}


def importance_sampling(lp: torch.Tensor, inputs: Mapping[str, torch.Tensor], config):
    ratio = torch.exp(lp - inputs["logprobs"].to(lp.dtype))
    elementwise = -ratio * inputs["advantages"].to(lp.dtype)
    return elementwise.sum(), {"elementwise_loss": elementwise}


def ppo(lp: torch.Tensor, inputs: Mapping[str, torch.Tensor], config: Mapping[str, float]):
    advantages = inputs["advantages"].to(lp.dtype)
    ratio = torch.exp(lp - inputs["logprobs"].to(lp.dtype))
    clipped = torch.clamp(ratio, config["clip_low_threshold"], config["clip_high_threshold"])
    elementwise = -torch.minimum(ratio * advantages, clipped * advantages)
    return elementwise.sum(), {"elementwise_loss": elementwise}


def cispo(lp: torch.Tensor, inputs: Mapping[str, torch.Tensor], config: Mapping[str, float]):
    ratio = torch.exp(lp - inputs["logprobs"].to(lp.dtype))
    clipped = torch.clamp(ratio, config["clip_low_threshold"], config["clip_high_threshold"])
    elementwise = -clipped.detach() * lp * inputs["advantages"].to(lp.dtype)
    return elementwise.sum(), {"elementwise_loss": elementwise}


def dro(lp: torch.Tensor, inputs: Mapping[str, torch.Tensor], config: Mapping[str, float]):
    penalty = (lp - inputs["logprobs"].to(lp.dtype)) ** 2
    elementwise = -(lp * inputs["advantages"].to(lp.dtype) - 0.5 * config["beta"] * penalty)
    return elementwise.sum(), {"elementwise_loss": elementwise}


@dataclass(frozen=True)
class BuiltinLoss:
    """One built-in loss: its per-datum function, the inputs it reads, its config keys.

    ``config`` maps each accepted ``loss_fn_config`` key to its default (None: required).
    """

    fn: LossFn
    inputs: tuple[str, ...]
    config: Mapping[str, float | None]


BUILTIN_LOSSES: dict[str, BuiltinLoss] = {
    "cross_entropy": BuiltinLoss(cross_entropy, ("target_tokens", "weights"), {}),
    "importance_sampling": BuiltinLoss(importance_sampling, _RL_INPUTS, {}),
    "ppo": BuiltinLoss(ppo, _RL_INPUTS, _CLIP_DEFAULTS),
    "cispo": BuiltinLoss(cispo, _RL_INPUTS, _CLIP_DEFAULTS),
    "dro": BuiltinLoss(dro, _RL_INPUTS, {"beta": None}),
}

# Tinker loss types without a local implementation, and why (for the one-line error).
UNSUPPORTED_LOSSES: dict[str, str] = {
    "gspo": "its sequence-ratio masking is not fully specified by the SDK",
    "stable_reinforce": "it needs the stability records only the service keeps",
    "custom": "uploaded losses run on the service; pass the LossHandle to forward_backward_custom",
}

TINKER_LOSS_TYPES: tuple[str, ...] = get_args(types.LossFnType)

# Per-token clip thresholds are valid loss_fn_inputs keys in the SDK, but their semantics are
# undocumented; a datum carrying them must not be trained with the scalar thresholds instead.
_PER_TOKEN_CLIP_INPUTS = ("clip_low_threshold", "clip_high_threshold")


def resolve_loss(loss_fn: str, loss_fn_config: Mapping[str, float | str] | None):
    """The `BuiltinLoss` for ``loss_fn`` and its full config (defaults filled in), or a one-line
    `BackendError` naming what was expected."""
    supported = sorted(BUILTIN_LOSSES)
    if loss_fn in UNSUPPORTED_LOSSES:
        why = UNSUPPORTED_LOSSES[loss_fn]
        raise BackendError(
            f"loss_fn={loss_fn!r} is not supported by the local engine ({why}): expected one of "
            f"{supported}, or use forward_backward_custom"
        )
    if loss_fn not in BUILTIN_LOSSES:
        raise BackendError(
            f"loss_fn={loss_fn!r} is not supported by the local engine: expected one of "
            f"{supported}, or use forward_backward_custom"
        )
    loss = BUILTIN_LOSSES[loss_fn]
    given = dict(loss_fn_config or {})
    unknown = sorted(set(given) - set(loss.config))
    if unknown:
        accepted = sorted(loss.config) or "none"
        raise BackendError(
            f"loss_fn_config keys {unknown} are not accepted by loss {loss_fn!r}: expected "
            f"{accepted}"
        )
    config: dict[str, float] = {}
    for key, default in loss.config.items():
        value = given.get(key, default)
        if value is None:
            raise BackendError(
                f"loss {loss_fn!r} needs loss_fn_config[{key!r}] (Tinker documents no default, "
                f"so the local engine does not guess one), e.g. loss_fn_config={{{key!r}: 0.05}}"
            )
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise BackendError(
                f"loss_fn_config[{key!r}]={value!r}: expected a number for loss {loss_fn!r}"
            )
        if not math.isfinite(value):
            raise BackendError(f"loss_fn_config[{key!r}]={value!r}: expected a finite number")
        config[key] = float(value)
    if "clip_low_threshold" in config and not (
        0 <= config["clip_low_threshold"] <= config["clip_high_threshold"]
    ):
        raise BackendError(
            f"loss {loss_fn!r}: expected 0 <= clip_low_threshold <= clip_high_threshold; got "
            f"{config['clip_low_threshold']} and {config['clip_high_threshold']}"
        )
    return loss, config


def loss_inputs_as_tensors(
    datum: types.Datum, required: tuple[str, ...], index: int, loss_name: str
) -> dict[str, torch.Tensor]:
    """Check one datum's ``loss_fn_inputs`` and convert them to 1-D torch tensors."""
    if loss_name in ("ppo", "cispo"):
        per_token = sorted(set(_PER_TOKEN_CLIP_INPUTS) & set(datum.loss_fn_inputs))
        if per_token:
            raise DataError(
                f"datum {index}: per-token loss_fn_inputs {per_token} are not supported by the "
                f"local engine; pass scalar thresholds in loss_fn_config instead"
            )
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
