"""LoRA adapters applied *unmerged* at sampling time, so a bf16 snapshot keeps its training.

Why not merge: a LoRA update is small next to the weight it modifies (relative size ~1e-3 to
1e-2 after a few steps at the learning rates character training uses), and bf16 keeps 8 bits
of mantissa, a relative step of ~4e-3. Merging ``W + scale * B @ A`` in fp32 and casting the
sum to bf16 rounds most of the update away: measured on SmolLM2 at rank 8 and lr 1e-4, the
merged bf16 snapshot showed only 20-60% of the fp32 snapshot's log-prob shift on the trained
text. Applied to activations instead, the update is a sum over the whole input dimension and
survives, provided nothing rounds it back: a bf16 product's output lies on the bf16 grid, and
adding an update smaller than half a grid step then casting to bf16 returns the same value
(measured: 10% of the fp32 shift after one step). So sampling models run in the regime of the
training client's bf16 autocast: linear weights and products in bf16, activations and the
residual stream in fp32, and every adapted layer computes

    y = float(x.bf16 @ W.T + b) + (x.float() @ A.T) @ (scale * B).T        (all fp32)

which the fast decoder reproduces for its fused projections.

A snapshot shares the frozen weights with every other client (a deep copy of the module tree
whose parameters are memoised to themselves), so it costs the adapter's size, not a model's.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ...errors import BackendError

_PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class LowRankUpdate:
    """``delta(x) = (x @ down.T) @ up.T`` in fp32; ``up`` already carries alpha / rank."""

    down: torch.Tensor  # [rank, in_features], fp32
    up: torch.Tensor  # [out_features, rank], fp32, scaled

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x.float(), self.down), self.up)

    def add_to(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``out.float() + self(x)``, the sum taken inside the up-projection's product.

        Why: a rank-8 product into a wide output (the 49,152-token head) spent most of its
        time writing a temporary that the addition then read again: at 64 rows the head's
        update took 9.9 ms, 1.1 ms as one ``addmm``. The bits are the same (each output is
        its short dot product plus ``out``, in that order; measured equal on every layer shape).
        """
        shape = out.shape
        rows = F.linear(x.float().reshape(-1, x.shape[-1]), self.down)
        return torch.addmm(out.float().reshape(-1, shape[-1]), rows, self.up.t()).reshape(shape)

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])


def load_adapter(adapter_dir: str | Path, device: torch.device) -> dict[str, LowRankUpdate]:
    """Module name (as in the base model) -> its low-rank update, from a saved peft adapter.

    The scale comes from the adapter's own config (``lora_alpha / r``), so checkpoints written
    under an older scale convention still load with the scale they were trained with.
    """
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    config_file = adapter_dir / "adapter_config.json"
    weights_file = adapter_dir / "adapter_model.safetensors"
    if not config_file.is_file() or not weights_file.is_file():
        raise BackendError(
            f"{adapter_dir} is not a LoRA adapter: expected adapter_config.json and "
            "adapter_model.safetensors"
        )
    config = json.loads(config_file.read_text())
    if config.get("use_rslora") or config.get("use_dora") or config.get("rank_pattern"):
        raise BackendError(
            f"{config_file}: only plain LoRA is supported (no rslora, dora or rank_pattern)"
        )
    scale = float(config["lora_alpha"]) / float(config["r"])
    weights = load_file(str(weights_file))
    downs: dict[str, torch.Tensor] = {}
    ups: dict[str, torch.Tensor] = {}
    for key, tensor in weights.items():
        name = key[len(_PEFT_PREFIX) :] if key.startswith(_PEFT_PREFIX) else key
        if name.endswith(".lora_A.weight"):
            downs[name[: -len(".lora_A.weight")]] = tensor
        elif name.endswith(".lora_B.weight"):
            ups[name[: -len(".lora_B.weight")]] = tensor
        else:
            raise BackendError(f"{weights_file}: unexpected tensor {key!r} in a LoRA adapter")
    if set(downs) != set(ups):
        raise BackendError(f"{weights_file}: lora_A and lora_B cover different modules")
    return {
        name: LowRankUpdate(
            down=downs[name].to(device=device, dtype=torch.float32),
            up=(ups[name].to(dtype=torch.float32) * scale).to(device),
        )
        for name in sorted(downs)
    }


class FrozenLinear(torch.nn.Module):
    """A frozen linear layer in the compute dtype with fp32 output, plus an optional update.

    ``forward(x) = float(linear(x.to(w.dtype), w, b)) + update(x)``: the product runs in the
    compute dtype (bf16 on CPUs that have it), exactly as under the training client's autocast,
    but its result stays fp32, so the residual stream is fp32 as it is in training and a small
    LoRA update added to it is not rounded back onto the bf16 grid. ``weight``, ``bias`` and
    ``update`` are read directly by the fast decoder.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        update: LowRankUpdate | None = None,
    ):
        super().__init__()
        self.weight = torch.nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)
        self.update = update
        if update is not None and (
            update.down.shape[1] != self.in_features or update.up.shape[0] != self.out_features
        ):
            raise BackendError(
                f"adapter {tuple(update.up.shape)} x {tuple(update.down.shape)} does not fit a "
                f"linear layer {self.in_features} -> {self.out_features}"
            )

    @property
    def in_features(self) -> int:
        return int(self.weight.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.weight.shape[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x.to(self.weight.dtype), self.weight, self.bias).float()
        if self.update is not None:
            out = self.update.add_to(out, x)
        return out


def sampling_model(base_fp32: torch.nn.Module, compute_dtype: torch.dtype) -> torch.nn.Module:
    """The frozen model every sampling client runs: fp32 activations, linear weights in
    ``compute_dtype`` (the training client's autocast regime, without its per-step casts).

    Norms and embeddings keep the fp32 tensors of ``base_fp32`` (shared, not copied); each
    ``nn.Linear`` becomes a `FrozenLinear` holding its weight cast once to ``compute_dtype``
    (in fp32 the very same tensor).
    """
    shared = {id(t): t for t in list(base_fp32.parameters()) + list(base_fp32.buffers())}
    model = copy.deepcopy(base_fp32, memo=shared)
    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.Linear):
            bias = None if module.bias is None else module.bias.detach().to(compute_dtype)
            _replace(model, name, FrozenLinear(module.weight.detach().to(compute_dtype), bias))
    model.eval()
    return model


def with_adapter(base: torch.nn.Module, updates: dict[str, LowRankUpdate]) -> torch.nn.Module:
    """A copy of a `sampling_model` that shares its weights and applies ``updates`` unmerged.

    ``base`` itself is left untouched (other clients keep sampling from it).
    """
    shared = {id(t): t for t in list(base.parameters()) + list(base.buffers())}
    model = copy.deepcopy(base, memo=shared)
    modules = dict(model.named_modules())
    for name, update in updates.items():
        target = modules.get(name)
        if not isinstance(target, FrozenLinear):
            raise BackendError(
                f"adapter module {name!r} is not a linear layer of {type(model).__name__}"
            )
        _replace(model, name, FrozenLinear(target.weight, target.bias, update))
    model.eval()
    return model


def _replace(model: torch.nn.Module, name: str, new: torch.nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def update_of(module: torch.nn.Module) -> LowRankUpdate | None:
    """The unmerged update of a sampling layer, or None for a plain layer."""
    return getattr(module, "update", None) if isinstance(module, FrozenLinear) else None
