"""A lean decoder for Llama-family models, used by the sampler in place of the HF forward.

Why: profiling the Hugging Face forward during batched decoding on CPU showed that most of a
step was not the matrix products but copies around them: the dynamic KV cache concatenates
every layer's keys and values at every step, grouped-query attention repeats the shared K/V
heads into full copies, and q/k/v (and gate/up) are three (two) separate small products. This
module runs the *same mathematics* on the same weights with

* q/k/v and gate/up fused into one product each, every product on weights laid out once
  (`LAYOUTS`), shared by every decoder of the same base weights: reordered for oneDNN
  (`PACKED_DTYPES`; the reorder was otherwise redone at every call, which made small-batch
  products 1.5-4x slower), or, for fp32 on an AVX2 CPU, kept as bf16 in panels for
  `panel_linear` (half the bytes a decode step reads, the same numbers);
* a preallocated KV cache written in place, one column per step;
* grouped-query attention without copying K/V: the query heads that share a K/V head are
  folded into the query-length axis of one attention call;
* cache rows ("slots") that outlive the sequence in them: every row is decoded at the same
  column, but a row's rotary positions are its own token count and a validity mask says which
  columns belong to it, so a finished row's slot can be given a new prompt, prefilled into the
  columns just before the current one (`prefill` with ``start``), while the other rows go on.
  This is what lets the sampler keep its batch full (see `generation`).
* `StaticCache.shift_left`: columns no live row still needs are dropped by moving the rest to
  the front; every step's attention reads columns ``[0, column]``, so dead columns cost time;
* a decode step over a few dozen rows runs its element-wise work (norms, rotary, SiLU,
  residual adds; in place, q and k rotated together) on one thread and only its products and
  attention on all (`threads.ThreadSwitch`): split between two threads, each small op cost a
  worker wake-up larger than the op itself. The same operations, the same bits;
* once nothing is left to refill with, finished rows leave the batch: the live rows move to
  the front of the cache in place (`StaticCache.compact`), done when a quarter of the rows has
  finished, not every step;
* a prefix many rows start with is kept once per cache (`StaticCache.shared_keys`) and read
  once per step for all of them (`attend_with_shared`), instead of a copy per row; prompts
  continue stored prefixes (`prefill` with a context, `extend` for scoring and for building
  them: `prefix_cache`).

It reproduces the HF model's numerics (RMSNorm in fp32, rotary tables in fp32 then cast, the
same softmax scale; fp32 products on oneDNN sum in another order than MKL's, ~1e-6 relative,
bf16 ones are bit for bit the same); a test compares its logits with the HF model's, including
after a slot is refilled and after a shift. Masked columns hold finite stale values, never NaN,
and every query sees at least one valid column, so masked softmaxes stay finite. Models outside
its scope (other rope types, sliding windows, biases other than q/k/v, other norms: see
`unsupported_reason`) use the generic HF path. LoRA snapshots keep their adapters unmerged
(`adapters`); the decoder fuses their updates like the weights and adds them in fp32.

Length: the decoder, its cache and the shared-prefix attention are one data layout; split up,
each part would have to re-explain the cache's rows, columns and validity mask.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F

from . import panel_linear
from .adapters import LowRankUpdate, update_of
from .panel_linear import PanelWeight
from .prefix_cache import PrefixKV
from .threads import ThreadSwitch

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")
_NORM_ATTRIBUTES = {"weight", "variance_epsilon"}


def unsupported_reason(model: torch.nn.Module) -> str | None:
    """Why `FastDecoder` cannot compute this model exactly, or None when it can.

    The decoder implements one precise computation: RMSNorm (weight only, no bias, no offset),
    default rotary embeddings over the whole head, softmax scale head_dim**-0.5, optional
    biases on q/k/v only, bias-free output and SiLU-gated MLP projections, no logit soft-capping
    and no multipliers. Anything else (a model that adds a bias to the attention output, a
    LayerNorm, scaled or partial rotary, sliding windows) must take the generic HF path, so
    each of these is checked on the loaded modules, not only on the config's model type.
    """
    config = getattr(model, "config", None)
    if config is None or getattr(config, "model_type", None) not in SUPPORTED_MODEL_TYPES:
        return f"model type {getattr(config, 'model_type', None)!r} not in {SUPPORTED_MODEL_TYPES}"
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        return f"rope type {rope.get('rope_type', rope.get('type'))!r}"
    if float(rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0))) != 1:
        return "partial rotary embedding"
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        if config.model_type != "llama":
            return "sliding-window attention"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act!r}"
    if int(getattr(config, "pretraining_tp", 1) or 1) != 1:
        return "tensor-parallel slicing (pretraining_tp > 1)"
    for name in ("attn_logit_softcapping", "final_logit_softcapping", "logits_scaling"):
        if getattr(config, name, None) not in (None, 0, 1, 1.0):
            return f"{name}={getattr(config, name)}"
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(model, "lm_head"):
        return "no model.layers / lm_head"
    if model.lm_head.bias is not None:
        return "bias on lm_head"
    for index, layer in enumerate(inner.layers):
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if attn is None or mlp is None:
            return f"layer {index}: no self_attn/mlp"
        for part in ("q_norm", "k_norm"):
            if getattr(attn, part, None) is not None:
                return f"layer {index}: {part} (query/key normalisation)"
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        scaling = getattr(attn, "scaling", head_dim**-0.5)
        if abs(float(scaling) - head_dim**-0.5) > 1e-9:
            return f"layer {index}: attention scale {scaling}"
        if attn.o_proj.bias is not None:
            return f"layer {index}: bias on o_proj"
        q_bias = [getattr(attn, n).bias is not None for n in ("q_proj", "k_proj", "v_proj")]
        if any(q_bias) and not all(q_bias):
            return f"layer {index}: bias on some of q/k/v only"
        for n in ("gate_proj", "up_proj", "down_proj"):
            proj = getattr(mlp, n, None)
            if proj is None:
                return f"layer {index}: no mlp.{n}"
            if proj.bias is not None:
                return f"layer {index}: bias on mlp.{n}"
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            if "RMSNorm" not in type(norm).__name__:
                return f"layer {index}: {type(norm).__name__} instead of RMSNorm"
            extra = {n for n, _ in norm.named_parameters(recurse=False)} - _NORM_ATTRIBUTES
            if extra:
                return f"layer {index}: norm with {sorted(extra)}"
    if "RMSNorm" not in type(inner.norm).__name__:
        return f"final {type(inner.norm).__name__} instead of RMSNorm"
    return None


def supports(model: torch.nn.Module) -> bool:
    """Whether `FastDecoder` can run this model exactly (see `unsupported_reason`)."""
    return unsupported_reason(model) is None


# Weights built for decoders, by the storage of the tensors they are made from (a snapshot's
# layers wrap the base's weight storage in new Parameter objects, so identity would miss):
# a weak reference to the result, and the sources themselves, which pins their storage so
# its address cannot be reused by other data while the entry exists.
_SHARED: dict[tuple, tuple[weakref.ref, list[torch.Tensor]]] = {}


# dtypes whose products run on oneDNN with weights reordered once ("prepacked"), on CPU.
# bf16: the kernels `F.linear` itself uses, so the same numbers to the bit (checked by a
# test), without reordering every weight at every call: 1.5-4x faster products at 8-64 rows
# on this project's CPU. fp32: `F.linear` uses MKL; oneDNN's prepacked kernels decode
# 1.4-1.5x faster at 8-128 rows (measured with AVX2 only, the CPUs that run fp32) and sum in
# another order (~1e-6 relative: float noise, the size of a change of batch shape). Every
# product of the sampler and of `compute_logprobs` runs on them, so the two agree as before.
PACKED_DTYPES = (torch.bfloat16, torch.float32)
_PACK_HINT = 32  # rows the packed layout is tuned for (any row count works)
# How the decoder stores its weights: as given (`F.linear`), prepacked for oneDNN, or in
# panels for `panel_linear` (fp32 products on bf16-stored weights, AVX2 CPUs).
LAYOUTS = ("plain", "onednn", "panel")


def can_pack(weight: torch.Tensor) -> bool:
    """Whether products with ``weight`` can run on a prepacked oneDNN weight here (bf16 only
    where oneDNN has bf16 kernels: an AVX2-only CPU, or an ISA cap, refuses to reorder bf16
    weights, so bf16 asked for explicitly there runs on `F.linear`)."""
    return (
        weight.device.type == "cpu"
        and weight.dtype in PACKED_DTYPES
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        and (weight.dtype != torch.bfloat16 or _onednn_has_bf16())
    )


def _onednn_has_bf16() -> bool:
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(check()) if check is not None else True


def shared_weight(parts: list[torch.Tensor], layout: str = "plain") -> torch.Tensor | PanelWeight:
    """``torch.cat(parts)`` in the decoder's ``layout`` (`LAYOUTS`: as is, prepacked for
    oneDNN, or panels for `panel_linear`), built once per set of weight storages and shared by
    every decoder.

    Every sampling client (each snapshot of a training run) makes its own decoder, but they
    all run the engine's one frozen base: without sharing, each decoder held its own copy of
    the fused (and packed) weights, up to a model's size per snapshot. An entry lives as long
    as some decoder holds its result.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown weight layout {layout!r}; expected one of {LAYOUTS}")
    key = (
        tuple((t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype, t.device) for t in parts),
        layout,
    )
    hit = _SHARED.get(key)
    tensor = hit[0]() if hit is not None else None
    if tensor is not None:
        return tensor
    with torch.no_grad():
        tensor = parts[0].detach() if len(parts) == 1 else torch.cat([t.detach() for t in parts])
        tensor = tensor.contiguous()
        if layout == "onednn":
            tensor = torch.ops.mkldnn._reorder_linear_weight(tensor, _PACK_HINT)
        elif layout == "panel":
            tensor = panel_linear.pack(tensor)
    _SHARED[key] = (weakref.ref(tensor), [t.detach() for t in parts])
    weakref.finalize(tensor, _forget, key)
    return tensor


def products_layout(weight: torch.Tensor) -> str:
    """Which products the decoder runs for weights like ``weight`` (`LAYOUTS`): the panel
    kernel where it applies (fp32 on a CPU whose best kernels are AVX2), else oneDNN on
    prepacked weights where it can, else `F.linear`."""
    if panel_linear.enabled_for(weight.dtype, weight.device):
        return "panel"
    return "onednn" if can_pack(weight) else "plain"


def _forget(key: tuple) -> None:
    hit = _SHARED.get(key)
    if hit is not None and hit[0]() is None:
        del _SHARED[key]


def fused(parts: list[torch.Tensor]) -> torch.Tensor:
    """``torch.cat(parts)``, shared by every decoder (`shared_weight`)."""
    return shared_weight(parts, layout="plain")


def _flash(q, k, v, additive_mask, scale):
    """Attention output and log-sum-exp of the scaled scores ([..., queries], fp32).

    On CPU this is the kernel `F.scaled_dot_product_attention` itself runs (it returns the
    log-sum-exp too); elsewhere the same mathematics written out in fp32.
    """
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, attn_mask=additive_mask, scale=scale
        )
        return out, lse.float()
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale + additive_mask.float()
    lse = torch.logsumexp(scores, dim=-1)
    return torch.matmul(torch.softmax(scores, dim=-1), v.float()).to(q.dtype), lse


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
        ~mask, float("-inf")
    )


def attend_with_shared(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    shared_keys: torch.Tensor,
    shared_values: torch.Tensor,
    shared_len: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Attention of queries ``q`` [B, KV, Q, D] over their rows' own keys [B, KV, L, D]
    (boolean ``mask`` [B, 1, Q or 1, L]) and over the first ``shared_len[b]`` keys of a prefix
    every row shares ([KV, P, D], stored once): "cascade" attention.

    The shared prefix is read once for all rows (their queries are stacked into one query
    block), not once per row, which is what long shared prompts cost per decoding step; the
    two parts are merged exactly by their log-sum-exps. Every query must see at least one of
    its own keys. Returns [B, KV, Q, D] in float32.
    """
    b, kv, nq, d = q.shape
    prefix = shared_keys.shape[1]
    own_out, own_lse = _flash(q, keys, values, _additive(mask, q.dtype), scale)
    stacked = q.transpose(0, 1).reshape(1, kv, b * nq, d)
    uses = torch.arange(prefix, device=q.device)[None, :] < shared_len[:, None]  # [B, P]
    uses = uses[:, None, :].expand(b, nq, prefix).reshape(1, 1, b * nq, prefix)
    shared_out, shared_lse = _flash(
        stacked, shared_keys[None], shared_values[None], _additive(uses, q.dtype), scale
    )
    shared_out = shared_out.reshape(kv, b, nq, d).transpose(0, 1).float()
    shared_lse = shared_lse.reshape(kv, b, nq).transpose(0, 1)
    none = (shared_len <= 0)[:, None, None]
    shared_lse = shared_lse.masked_fill(none, float("-inf"))
    top = torch.maximum(own_lse, shared_lse)
    w_own, w_shared = torch.exp(own_lse - top), torch.exp(shared_lse - top)
    merged = own_out.float() * w_own[..., None] + shared_out * w_shared[..., None]
    return merged / (w_own + w_shared)[..., None]


@dataclass
class _Layer:
    norm_in: torch.Tensor
    norm_post: torch.Tensor
    # products' weights, in the decoder's layout (`LAYOUTS`)
    qkv: torch.Tensor | PanelWeight
    qkv_bias: torch.Tensor | None
    out: torch.Tensor | PanelWeight
    gate_up: torch.Tensor | PanelWeight
    down: torch.Tensor | PanelWeight
    # Unmerged LoRA updates (fp32), fused the same way as the weights; None when not adapted.
    qkv_update: LowRankUpdate | None = None
    out_update: LowRankUpdate | None = None
    gate_up_update: LowRankUpdate | None = None
    down_update: LowRankUpdate | None = None


def _fuse_updates(
    updates: list[LowRankUpdate | None], out_sizes: list[int], like: torch.Tensor
) -> LowRankUpdate | None:
    """One low-rank update for projections that are fused into one product.

    The down-projections are stacked and the (scaled) up-projections placed block-diagonally,
    so ``fused(x)`` equals the concatenation of each part's update; a part without an update
    contributes zero rows.
    """
    present = [u for u in updates if u is not None]
    if not present:
        return None
    in_features = present[0].down.shape[1]
    ranks = [u.rank if u is not None else 0 for u in updates]
    down = torch.zeros((sum(ranks), in_features), dtype=torch.float32, device=like.device)
    up = torch.zeros((sum(out_sizes), sum(ranks)), dtype=torch.float32, device=like.device)
    r0 = o0 = 0
    for update, rank, size in zip(updates, ranks, out_sizes):
        if update is not None:
            down[r0 : r0 + rank] = update.down
            up[o0 : o0 + size, r0 : r0 + rank] = update.up
        r0, o0 = r0 + rank, o0 + size
    return LowRankUpdate(down=down, up=up)


class FastDecoder:
    """Prefill and single-token decode steps over a static KV cache."""

    def __init__(self, model: torch.nn.Module, cache_dtype: torch.dtype | None = None):
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"FastDecoder does not compute this model exactly ({reason})")
        config = model.config
        # Two dtypes, as in the model: products and the KV cache in the linear weights' dtype,
        # activations (residual stream, norms, rotary tables) in the embedding's. For a plain
        # model they are the same; a sampling model (`adapters.sampling_model`) has bf16
        # weights and fp32 activations.
        self.dtype = model.lm_head.weight.dtype
        self.act_dtype = model.model.embed_tokens.weight.dtype
        self.device = model.lm_head.weight.device
        # The KV cache holds keys/values in the weights' dtype: it is the decoder's largest
        # allocation (SmolLM2: 46 KB per token in fp32, so 64 rows x 1,500 columns = 4.4 GB),
        # and bf16 halves it; attention then runs in bf16 on bf16 keys, as under autocast.
        self.cache_dtype = cache_dtype or self.dtype
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.eps = float(config.rms_norm_eps)
        self.scale = self.head_dim**-0.5
        theta = float(
            (getattr(config, "rope_parameters", None) or {}).get(
                "rope_theta", getattr(config, "rope_theta", 10000.0)
            )
        )
        exponent = torch.arange(0, self.head_dim, 2, dtype=torch.int64).float() / self.head_dim
        self.inv_freq = (1.0 / (theta**exponent)).to(self.device)
        inner = model.model
        self.embed = inner.embed_tokens.weight
        self.final_norm = inner.norm.weight
        self.lm_head_update = update_of(model.lm_head)
        self.layout = products_layout(model.lm_head.weight)

        def weight(*parts: torch.Tensor) -> torch.Tensor | PanelWeight:
            return shared_weight(list(parts), layout=self.layout)

        self.lm_head = weight(model.lm_head.weight)
        self.layers: list[_Layer] = []
        q_out = self.heads * self.head_dim
        kv_out = config.num_key_value_heads * self.head_dim
        with torch.no_grad():
            for layer in inner.layers:
                attn, mlp = layer.self_attn, layer.mlp
                biases = [attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]
                self.layers.append(
                    _Layer(
                        norm_in=layer.input_layernorm.weight,
                        norm_post=layer.post_attention_layernorm.weight,
                        qkv=weight(attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight),
                        qkv_bias=fused(biases) if all(b is not None for b in biases) else None,
                        out=weight(attn.o_proj.weight),
                        gate_up=weight(mlp.gate_proj.weight, mlp.up_proj.weight),
                        down=weight(mlp.down_proj.weight),
                        qkv_update=_fuse_updates(
                            [update_of(getattr(attn, n)) for n in ("q_proj", "k_proj", "v_proj")],
                            [q_out, kv_out, kv_out],
                            attn.q_proj.weight,
                        ),
                        out_update=update_of(attn.o_proj),
                        gate_up_update=_fuse_updates(
                            [update_of(mlp.gate_proj), update_of(mlp.up_proj)],
                            [mlp.gate_proj.weight.shape[0], mlp.up_proj.weight.shape[0]],
                            mlp.gate_proj.weight,
                        ),
                        down_update=update_of(mlp.down_proj),
                    )
                )
        self.q_size = self.heads * self.head_dim
        self.vocab = int(model.lm_head.weight.shape[0])
        self.kv_size = self.kv_heads * self.head_dim
        # the widest element-wise tensor of a decode step, per row (`ThreadSwitch.for_step`)
        self.elementwise_width = max(
            self.layers[0].gate_up.shape[0], self.q_size + 2 * self.kv_size
        )
        # Decode attention (without a shared prefix) on the element-wise thread: faster on a
        # CPU shared with other work (no worker to wake), but the flash kernel then sums in
        # another order (~1e-7 relative; sampled log-probs move by up to ~4e-5), so off.
        self.serial_attention = False

    # -- pieces -------------------------------------------------------------------------------
    def _rms(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """HF's RMSNorm, ``weight * (h * rsqrt(mean(h^2) + eps)).to(x.dtype)`` with ``h`` the
        fp32 input, in the same operations (the same bits) but in place where the result is
        a fresh tensor: fewer temporaries in a decode step."""
        h = x.float()
        scale = h.pow(2).mean(-1, keepdim=True).add_(self.eps).rsqrt_()
        normed = (h * scale).to(x.dtype)
        if weight.dtype == normed.dtype:
            return normed.mul_(weight)
        return weight * normed

    def _rotary(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin tables, shape positions.shape + (head_dim,), in the activation dtype."""
        freqs = positions.float()[..., None] * self.inv_freq
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos().to(self.act_dtype), emb.sin().to(self.act_dtype)

    def _linear(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        update: LowRankUpdate | None = None,
    ) -> torch.Tensor:
        """A product in the weights' dtype, returned in the activation dtype, plus an unmerged
        update in fp32: what `adapters.FrozenLinear` computes."""
        if self.layout == "panel":
            out = panel_linear.linear(x.float(), weight)
            if bias is not None:
                out += bias
            out = out.to(self.act_dtype)
        elif self.layout == "onednn":
            out = torch.ops.mkldnn._linear_pointwise(
                x.to(self.dtype), weight, bias, "none", [], ""
            ).to(self.act_dtype)
        else:
            out = F.linear(x.to(weight.dtype), weight, bias).to(self.act_dtype)
        if update is None:
            return out
        return update.add_to(out, x).to(self.act_dtype)

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated * sin

    def new_cache(self, batch: int, capacity: int, shared: PrefixKV | None = None) -> "StaticCache":
        """A cache of ``batch`` rows and ``capacity`` columns; with ``shared``, a prefix the
        rows may start with, kept once (each row says how many of its tokens it uses)."""
        shape = (len(self.layers), batch, self.kv_heads, capacity, self.head_dim)
        cache = StaticCache(
            keys=torch.zeros(shape, dtype=self.cache_dtype, device=self.device),
            values=torch.zeros(shape, dtype=self.cache_dtype, device=self.device),
            valid=torch.zeros((batch, capacity), dtype=torch.bool, device=self.device),
        )
        if shared is not None:
            cache.shared_keys = shared.keys.to(self.cache_dtype)
            cache.shared_values = shared.values.to(self.cache_dtype)
            cache.shared_len = torch.zeros(batch, dtype=torch.long, device=self.device)
        return cache

    @property
    def bytes_per_column(self) -> int:
        """Cache bytes per row and column (keys and values of every layer)."""
        item = torch.empty((), dtype=self.cache_dtype).element_size()
        return 2 * len(self.layers) * self.kv_heads * self.head_dim * item

    # -- forward passes -------------------------------------------------------------------------
    def _blocks(self, ids: torch.Tensor, positions: torch.Tensor, attend) -> torch.Tensor:
        """The layer stack over a block of tokens ``ids`` [R, T] at rotary ``positions``
        [R, T]; ``attend(layer_index, q, k, v)`` (q [R, heads, T, D], k and v
        [R, kv_heads, T, D], rotated) returns the attention output [R, heads, T, D]. Returns
        the last hidden states [R, T, hidden] before the final norm."""
        r, t = ids.shape
        cos, sin = self._rotary(positions)  # [R, T, D]
        cos, sin = cos[:, None], sin[:, None]
        h = F.embedding(ids, self.embed)
        for index, layer in enumerate(self.layers):
            x = self._rms(h, layer.norm_in)
            qkv = self._linear(x, layer.qkv, layer.qkv_bias, layer.qkv_update)
            q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
            q = self._rotate(q.view(r, t, self.heads, self.head_dim).transpose(1, 2), cos, sin)
            k = self._rotate(k.view(r, t, self.kv_heads, self.head_dim).transpose(1, 2), cos, sin)
            v = v.view(r, t, self.kv_heads, self.head_dim).transpose(1, 2)
            attn = attend(index, q, k, v).to(self.act_dtype)
            h = h + self._linear(
                attn.transpose(1, 2).reshape(r, t, self.q_size), layer.out, None, layer.out_update
            )
            h = h + self._mlp(self._rms(h, layer.norm_post), layer)
        return h

    def unembed(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits (float32) of final hidden states (before the final norm)."""
        normed = self._rms(hidden, self.final_norm)
        return self._linear(normed, self.lm_head, None, self.lm_head_update).float()

    def prefill(
        self,
        cache: "StaticCache",
        rows: torch.Tensor,
        ids: torch.Tensor,
        mask: torch.Tensor,
        start: int = 0,
        offsets: torch.Tensor | None = None,
        context_start: int | None = None,
        shared: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run left-padded prompts ``ids`` [R, T] into cache rows ``rows`` (distinct), columns
        [start, start + T). Returns the last position's logits [R, vocab] (float32).

        ``shared`` [R]: how many tokens of the cache's shared prefix (`StaticCache.shared_keys`)
        each row starts with (0 or None: none); those tokens are not in the row's columns.

        Without ``context_start``, whatever those rows held before is invalidated (their whole
        validity mask is reset), so a slot freed by a finished sequence can take a new prompt
        while other rows keep decoding; rotary positions count each row's own tokens from 0,
        whatever ``start`` is.

        With ``context_start`` (a shared prefix already copied into the rows, `generation`),
        the tokens continue what the rows hold in columns [context_start, start + T) and
        marked valid: positions count from ``offsets`` [R] (each row's prefix length),
        attention reads those valid columns up to each query's own, and only real tokens are
        written, so a row's prefix may lie in the padding columns of a shorter suffix.
        """
        r, t = ids.shape
        if start < 0 or start + t > cache.capacity:
            raise ValueError(f"prefill columns [{start}, {start + t}) outside the cache")
        end = start + t
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        if offsets is not None:
            positions = positions + offsets[:, None]
        valid = mask.bool()
        diagonal = torch.eye(t, dtype=torch.bool, device=self.device)
        if cache.shared_len is not None:
            cache.shared_len[rows] = 0 if shared is None else shared
        cascade = cache.shared_len is not None and bool((cache.shared_len[rows] > 0).any())
        if context_start is None:
            cache.valid[rows] = False
            causal = torch.ones((t, t), dtype=torch.bool, device=self.device).tril()
            # Padding queries attend to themselves only, which keeps every softmax finite.
            attn_mask = ((causal[None] & valid[:, None, :]) | diagonal[None])[:, None]
            lo = start
        else:
            lo = context_start
            cache.valid[rows, start:end] |= valid
            width = end - lo
            columns = torch.arange(width, device=self.device)
            causal = columns[None, :] <= (columns[width - t :, None])  # [T, width]
            own = torch.zeros((t, width), dtype=torch.bool, device=self.device)
            own[:, width - t :] = diagonal
            attn_mask = (causal[None] & cache.valid[rows, lo:end][:, None, :]) | own[None]
            attn_mask = attn_mask[:, None]  # [R, 1, T, width]
            written = valid[:, None, :, None]

        def attend(index, q, k, v):
            k, v = k.to(self.cache_dtype), v.to(self.cache_dtype)
            keys, values = cache.keys[index], cache.values[index]
            if context_start is None:
                keys[rows, :, start:end] = k
                values[rows, :, start:end] = v
            else:
                keys[rows, :, start:end] = torch.where(written, k, keys[rows, :, start:end])
                values[rows, :, start:end] = torch.where(written, v, values[rows, :, start:end])
                k, v = keys[rows, :, lo:end], values[rows, :, lo:end]
            if cascade:
                return self._prefill_cascade(q, k, v, attn_mask, cache, rows, index)
            return F.scaled_dot_product_attention(
                q.to(self.cache_dtype), k, v, attn_mask=attn_mask, scale=self.scale, enable_gqa=True
            )

        h = self._blocks(ids, positions, attend)
        if context_start is None:
            cache.valid[rows, start:end] = valid
        return self.unembed(h[:, -1])

    def _prefill_cascade(self, q, k, v, attn_mask, cache: "StaticCache", rows, index):
        """Prefill attention of rows that start with the cache's shared prefix: the query
        heads sharing a K/V head are stacked along the query axis, as in `decode`."""
        r, heads, t, d = q.shape
        groups = heads // self.kv_heads
        stacked = q.to(self.cache_dtype).reshape(r, self.kv_heads, groups * t, d)
        out = attend_with_shared(
            stacked,
            k,
            v,
            attn_mask.repeat(1, 1, groups, 1),
            cache.shared_keys[index],
            cache.shared_values[index],
            cache.shared_len[rows],
            self.scale,
        )
        return out.reshape(r, heads, t, d)

    def extend(
        self,
        ids: torch.Tensor,
        context: PrefixKV | None,
        reuse: int,
        kv_dtype: torch.dtype,
        keep_kv: bool = False,
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """Hidden states (before the final norm) of right-padded blocks ``ids`` [R, T] that
        continue the first ``reuse`` tokens of ``context`` (shared by every row; None: no
        prefix), attending in ``kv_dtype``.

        Used for scoring (`LocalSamplingClient.compute_logprobs`) and to build stored prefixes
        (`prefix_kv`). Right padding keeps every real query's keys real: a padding position is
        only seen by later padding positions. With ``keep_kv`` also returns each layer's new
        keys and values ([R, kv_heads, T, D] in ``kv_dtype``).
        """
        r, t = ids.shape
        positions = torch.arange(reuse, reuse + t, device=self.device).expand(r, t)
        causal = torch.ones((t, t), dtype=torch.bool, device=self.device).tril()
        attn_mask = torch.cat(
            [torch.ones((t, reuse), dtype=torch.bool, device=self.device), causal], dim=-1
        )
        kept: list[tuple[torch.Tensor, torch.Tensor]] = []

        def attend(index, q, k, v):
            k, v = k.to(kv_dtype), v.to(kv_dtype)
            if keep_kv:
                kept.append((k, v))
            if reuse:
                k = torch.cat([context.keys[index, :, :reuse].expand(r, -1, -1, -1), k], dim=2)
                v = torch.cat([context.values[index, :, :reuse].expand(r, -1, -1, -1), v], dim=2)
            return F.scaled_dot_product_attention(
                q.to(kv_dtype), k, v, attn_mask=attn_mask, scale=self.scale, enable_gqa=True
            )

        return self._blocks(ids, positions, attend), kept

    def prefix_kv(
        self, tokens: np.ndarray, parent: PrefixKV | None, reuse: int, kv_dtype: torch.dtype
    ) -> PrefixKV:
        """A stored prefix for ``tokens``: the first ``reuse`` tokens' keys and values come
        from ``parent`` (which starts with them), the rest are computed here."""
        ids = torch.as_tensor(tokens[reuse:], dtype=torch.long, device=self.device)[None]
        _, kept = self.extend(ids, parent, reuse, kv_dtype, keep_kv=True)
        keys = torch.stack([k[0] for k, _ in kept])  # [layers, kv_heads, new, D]
        values = torch.stack([v[0] for _, v in kept])
        if reuse:
            keys = torch.cat([parent.keys[:, :, :reuse], keys], dim=2)
            values = torch.cat([parent.values[:, :, :reuse], values], dim=2)
        return PrefixKV(tokens=tokens.copy(), keys=keys.contiguous(), values=values.contiguous())

    def _mlp(self, x: torch.Tensor, layer: _Layer) -> torch.Tensor:
        gate, up = self._linear(x, layer.gate_up, None, layer.gate_up_update).chunk(2, dim=-1)
        return self._linear(F.silu(gate).mul_(up), layer.down, None, layer.down_update)

    def decode(
        self, cache: "StaticCache", tokens: torch.Tensor, positions: torch.Tensor, column: int
    ) -> torch.Tensor:
        """One step for every cache row: ``tokens`` [B] at ``positions`` [B], written at
        ``column``. Returns logits [B, vocab] (float32).

        The products and attention run on every thread; where torch would split the
        element-wise work between threads (`threads.ThreadSwitch.for_step`), that work runs on
        one instead: the same operations, the same bits."""
        switch = ThreadSwitch.for_step(tokens.shape[0], self.elementwise_width, self.device)
        try:
            return self._decode_step(cache, tokens, positions, column, switch)
        finally:
            switch.restore()

    def _decode_step(
        self,
        cache: "StaticCache",
        tokens: torch.Tensor,
        positions: torch.Tensor,
        column: int,
        switch: ThreadSwitch,
    ) -> torch.Tensor:
        cos, sin = self._rotary(positions)  # [B, D]
        # rotate-half as one product: [x1, x2] -> [x2, x1] * [-sin1, sin2] (sign moved onto the
        # table: the same bits as [-x2, x1] * sin)
        half = self.head_dim // 2
        sin = torch.cat([-sin[:, :half], sin[:, half:]], dim=-1)[:, None]
        cos = cos[:, None]
        cache.valid[:, column] = True
        step = _Step(
            cache=cache,
            column=column,
            cos=cos,
            sin=sin,
            mask=cache.valid[:, None, None, : column + 1],  # [B, 1, 1, L]
            cascade=cache.shared_len is not None and bool((cache.shared_len > 0).any()),
        )
        # The attention block follows its product on all threads: the flash kernel's sums
        # depend on the thread count, and a parallel region right after another one finds the
        # workers awake (after serial work they may have lost their core: ~0.5 ms per layer
        # under load)
        attend = self._attend if self.serial_attention else partial(switch.run, self._attend)
        switch.serial()
        h = F.embedding(tokens, self.embed)  # [B, hidden]
        for index, layer in enumerate(self.layers):
            x = self._rms(h, layer.norm_in)
            qkv = switch.run(self._linear, x, layer.qkv, layer.qkv_bias, layer.qkv_update)
            attn = attend(index, qkv, step)
            h.add_(switch.run(self._linear, attn, layer.out, None, layer.out_update))
            x = self._rms(h, layer.norm_post)
            gate_up = switch.run(self._linear, x, layer.gate_up, None, layer.gate_up_update)
            gate, up = gate_up.chunk(2, dim=-1)
            act = F.silu(gate).mul_(up)
            h.add_(switch.run(self._linear, act, layer.down, None, layer.down_update))
        x = self._rms(h, self.final_norm)
        return switch.run(self._linear, x, self.lm_head, None, self.lm_head_update).float()

    def _attend(self, index: int, qkv: torch.Tensor, step: "_Step") -> torch.Tensor:
        """One layer's decode attention from its fused q/k/v output [B, q + 2 kv]: q and k
        heads rotated together, this step's key and value written to the cache at
        ``step.column``, the query heads that share a K/V head read as that head's "query
        positions". Returns [B, heads * head_dim] in the activation dtype."""
        b, heads, kv_heads, d = qkv.shape[0], self.heads, self.kv_heads, self.head_dim
        cache, column, span = step.cache, step.column, step.column + 1
        qk = qkv[:, : self.q_size + self.kv_size].view(b, heads + kv_heads, d)
        swapped = qk.view(b, heads + kv_heads, 2, d // 2).flip(2).view_as(qk)
        rotated = qk * step.cos
        rotated += swapped * step.sin
        q = rotated[:, :heads].view(b, kv_heads, heads // kv_heads, d)
        q = q.to(self.cache_dtype).contiguous()  # the flash kernel reads strided q slower
        cache.keys[index, :, :, column] = rotated[:, heads:]
        cache.values[index, :, :, column] = qkv[:, self.q_size + self.kv_size :].view(
            b, kv_heads, d
        )
        keys, values = cache.keys[index, :, :, :span], cache.values[index, :, :, :span]
        if step.cascade:  # rows that share the cache's prefix read it once, together
            shared = (cache.shared_keys[index], cache.shared_values[index], cache.shared_len)
            attn = attend_with_shared(q, keys, values, step.mask, *shared, self.scale)
        else:
            attn = F.scaled_dot_product_attention(
                q, keys, values, attn_mask=step.mask, scale=self.scale
            )
        return attn.to(self.act_dtype).reshape(b, self.q_size)


@dataclass
class _Step:
    """What every layer's attention needs in one decode step (`FastDecoder._attend`)."""

    cache: "StaticCache"
    column: int
    cos: torch.Tensor  # [B, 1, D]
    sin: torch.Tensor  # [B, 1, D], rotate-half's sign folded in
    mask: torch.Tensor  # [B, 1, 1, L] bool: the columns each row may read
    cascade: bool  # some rows read the cache's shared prefix


@dataclass
class StaticCache:
    """Keys/values [layers, batch, kv_heads, capacity, head_dim] and a validity mask."""

    keys: torch.Tensor
    values: torch.Tensor
    valid: torch.Tensor
    # A prefix shared by the rows, stored once ([layers, kv_heads, P, head_dim]), and how
    # many of its tokens each row starts with (`FastDecoder.new_cache`); None: no prefix.
    shared_keys: torch.Tensor | None = None
    shared_values: torch.Tensor | None = None
    shared_len: torch.Tensor | None = None

    @property
    def capacity(self) -> int:
        return self.valid.shape[1]

    def compact(self, rows: torch.Tensor) -> "StaticCache":
        """The cache of only ``rows`` (strictly increasing): they are moved to the first rows
        of this cache's own tensors, and the returned cache views those.

        Why in place: copying the kept rows into new tensors held the old and the new cache
        at once, and that moment (a wave shrinking its batch after a wave that filled it) set
        the peak memory of a whole run (09: +500 MB for a fraction of a second). Here the
        temporary is one layer's kept rows. The views keep the per-layer layout of a fresh
        cache ([rows, kv_heads, capacity, head_dim], contiguous), so decoding computes the
        same numbers; this cache must not be used afterwards.
        """
        kept = rows.tolist()
        if any(b <= a for a, b in zip(kept, kept[1:])) or (kept and kept[0] < 0):
            raise ValueError(f"compact needs strictly increasing rows, got {kept[:8]}")
        n = len(kept)
        if kept != list(range(n)):
            for tensor in (self.keys, self.values):
                for layer in tensor:  # row kept[i] >= i moves down; one layer at a time
                    layer[:n] = layer[rows]
        return StaticCache(
            self.keys[:, :n],
            self.values[:, :n],
            self.valid[rows],
            self.shared_keys,
            self.shared_values,
            None if self.shared_len is None else self.shared_len[rows],
        )

    def put(self, row: int, column: int, prefix: PrefixKV, first: int, end: int) -> None:
        """Write tokens [first, end) of a stored prefix into ``row`` from ``column`` on and
        mark those columns valid (the row's other columns are left as they are)."""
        stop = column + end - first
        self.keys[:, row, :, column:stop] = prefix.keys[:, :, first:end]
        self.values[:, row, :, column:stop] = prefix.values[:, :, first:end]
        self.valid[row, column:stop] = True

    def copy_rows(self, src: torch.Tensor, dst: torch.Tensor, start: int, end: int) -> None:
        """Make rows ``dst`` hold what rows ``src`` hold in columns [start, end), and nothing
        else (used to share one prefill among the samples of a prompt)."""
        self.keys[:, dst, :, start:end] = self.keys[:, src, :, start:end]
        self.values[:, dst, :, start:end] = self.values[:, src, :, start:end]
        self.valid[dst] = False
        self.valid[dst, start:end] = self.valid[src, start:end]
        if self.shared_len is not None:
            self.shared_len[dst] = self.shared_len[src]

    def shift_left(self, offset: int, end: int) -> None:
        """Move columns [offset, end) to [0, end - offset), in place, for every row.

        Keys carry their rotary position already, so moving them changes no result; the
        columns from ``end - offset`` on are marked invalid.
        """
        if offset <= 0:
            return
        width = end - offset
        overlap = offset < width
        for tensor in (self.keys, self.values):
            for layer in tensor:  # one layer at a time bounds the temporary copy
                moved = layer[:, :, offset:end]
                layer[:, :, :width] = moved.clone() if overlap else moved
        self.valid[:, :width] = self.valid[:, offset:end].clone()
        self.valid[:, width:] = False
