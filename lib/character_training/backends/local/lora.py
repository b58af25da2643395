"""Which weights LoRA trains, and at what scale: Tinker's conventions, so learning rates transfer.

Tinker's ``create_lora_training_client(rank, train_mlp, train_attn, train_unembed)`` exposes the
rank and three groups of weights but no alpha. Its LoRA follows the parametrisation of the
"LoRA Without Regret" write-up that tinker-cookbook's learning-rate helpers are built on: a
fixed alpha of 32 with the usual ``alpha / rank`` scale, which keeps the best learning rate
roughly independent of the rank (the cookbook's ``get_lora_lr_over_full_finetune_lr`` takes
``lora_alpha=32`` as its default for that reason). The local engine uses the same alpha and the
same defaults, so a learning rate tuned on the local engine at rank r means the same update
size on Tinker at rank r:

* attn: the query, key, value and output projections of every block;
* mlp: the gate, up and down projections (and any other linear layer inside an MLP block);
* unembed: the output projection to the vocabulary (``lm_head``), trained by default as on
  Tinker. With tied embeddings (SmolLM2) the adapter sits on the output side only; the input
  embedding stays frozen.
"""

from __future__ import annotations

import torch

from ...errors import BackendError

LORA_ALPHA = 32
PARTS = ("attn", "mlp", "unembed")

_ATTENTION_MARKERS = ("attn", "attention")
_MLP_MARKERS = ("mlp", "feed_forward", "ffn")


def lora_parts(train_mlp: bool, train_attn: bool, train_unembed: bool) -> tuple[str, ...]:
    """The weight groups to adapt, in a fixed order; at least one must be chosen (as on Tinker)."""
    chosen = tuple(
        part for part, wanted in zip(PARTS, (train_attn, train_mlp, train_unembed)) if bool(wanted)
    )
    if not chosen:
        raise BackendError(
            "create_lora_training_client: at least one of train_mlp, train_attn or "
            "train_unembed must be True"
        )
    return chosen


def lora_scale(rank: int) -> float:
    """The factor applied to ``B @ A``: alpha / rank."""
    return LORA_ALPHA / rank


def classify_linear(module_name: str) -> str | None:
    """'attn', 'mlp' or None for a linear layer inside a transformer block, by its path."""
    parts = module_name.lower().split(".")
    parents = parts[:-1]
    if any(marker in p for p in parents for marker in _ATTENTION_MARKERS):
        return "attn"
    if any(marker in p for p in parents for marker in _MLP_MARKERS):
        return "mlp"
    return None


def lora_target_modules(model: torch.nn.Module, parts: tuple[str, ...]) -> list[str]:
    """Full module names of the linear layers to wrap for ``parts``.

    Fails when a part matches nothing (an architecture whose layer names we cannot classify),
    rather than silently training fewer weights than asked.
    """
    output = model.get_output_embeddings()
    targets: list[str] = []
    found = {part: 0 for part in parts}
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        if module is output:
            kind = "unembed"
        else:
            kind = classify_linear(name)
        if kind in parts:
            targets.append(name)
            found[kind] += 1
    missing = [part for part, count in found.items() if count == 0]
    if missing:
        raise BackendError(
            f"LoRA: found no linear layers for {missing} in {type(model).__name__}; the engine "
            "classifies layers by the names attn/attention and mlp/feed_forward/ffn"
        )
    return targets


def parts_flags(checkpoint_meta: dict) -> dict[str, bool]:
    """``train_*`` keyword arguments that rebuild the adapter layout a checkpoint was saved with.

    Checkpoints written before the layout was recorded adapted attention and MLP only.
    """
    parts = checkpoint_meta.get("trained_parts", ["attn", "mlp"])
    return {f"train_{part}": part in parts for part in PARTS}
