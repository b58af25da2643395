"""LoRA training client with the Tinker `TrainingClient` contract, run in-process.

Semantics copied from the service (not its code): gradients from successive
``forward_backward`` calls accumulate until ``optim_step``; losses are token sums; the optimiser
is AdamW with Tinker's defaults (betas 0.9/0.95, eps 1e-12, no weight decay); LoRA uses
LoRA follows Tinker's parametrisation (alpha 32, scale alpha/rank, attention + MLP + unembedding
by default; see `lora`). Checkpoints are plain directories with the PEFT adapter, the optimiser
state and a small JSON manifest, so a run can resume after an interruption.

``forward_backward_custom`` follows the SDK's contract ``loss_fn(data, logprobs_list) ->
(loss, metrics)``. When the batch fits in one micro-batch the loss is back-propagated through
the graph directly; otherwise the engine scores without a graph, asks the loss for its gradient
with respect to each log-probability, and replays the micro-batches with the linear surrogate
``sum(grad * logprobs)``. Both give the same parameter gradients (checked by a test).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Callable, Sequence

import torch
from tinker import types

from ...errors import BackendError, DataError
from .engine import LocalEngine, read_checkpoint_meta, write_checkpoint_meta
from .forward import iter_scored_micro_batches, micro_batches
from .futures import LocalFuture
from .lora import LORA_ALPHA, lora_parts, lora_target_modules
from .losses import BUILTIN_LOSSES, loss_inputs_as_tensors

logger = logging.getLogger(__name__)

CustomLossFn = Callable[
    [list[types.Datum], list[torch.Tensor]], tuple[torch.Tensor, dict[str, float]]
]

_ADAPTER = "adapter"
_OPTIMIZER_FILE = "optimizer.pt"


def _tensor_data(t: torch.Tensor) -> types.TensorData:
    return types.TensorData.from_torch(t.detach().float().cpu())


def _inputs_and_targets(data: Sequence[types.Datum]) -> tuple[list[list[int]], list[list[int]]]:
    inputs, targets = [], []
    for i, datum in enumerate(data):
        tokens = datum.model_input.to_ints()
        if not tokens:
            raise DataError(f"datum {i}: model_input is empty")
        if "target_tokens" not in datum.loss_fn_inputs:
            raise DataError(f"datum {i}: loss_fn_inputs has no 'target_tokens'")
        target = datum.loss_fn_inputs["target_tokens"].to_torch().reshape(-1).tolist()
        if len(target) != len(tokens):
            raise DataError(
                f"datum {i}: target_tokens has {len(target)} entries but model_input has "
                f"{len(tokens)} tokens"
            )
        inputs.append(tokens)
        targets.append([int(t) for t in target])
    return inputs, targets


class LocalTrainingClient:
    """LoRA fine-tuning of a local Hugging Face causal LM behind the SDK's interface."""

    def __init__(
        self,
        engine: LocalEngine,
        base_model: str,
        rank: int,
        seed: int | None = None,
        run_id: str | None = None,
        *,
        train_mlp: bool = True,
        train_attn: bool = True,
        train_unembed: bool = True,
    ):
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise BackendError(f"LoRA rank={rank!r}: expected a positive integer")
        from peft import LoraConfig, get_peft_model

        self.engine = engine
        self.base_model = base_model
        self.rank = rank
        self.trained_parts = lora_parts(train_mlp, train_attn, train_unembed)
        self.run_id = run_id or engine.new_run_id()
        self._tokenizer = engine.tokenizer(base_model)
        if seed is not None:
            torch.manual_seed(seed)
        base = engine.load_trainable_base(base_model)
        lora = LoraConfig(
            r=rank,
            lora_alpha=LORA_ALPHA,
            lora_dropout=0.0,
            target_modules=lora_target_modules(base, self.trained_parts),
            bias="none",
            task_type="CAUSAL_LM",
        )
        with warnings.catch_warnings():
            # With tied embeddings peft warns that merging would also change the input
            # embedding; the engine never merges (sampling applies the adapter unmerged).
            warnings.filterwarnings("ignore", message=".*tie_word_embeddings.*")
            self.model = get_peft_model(base, lora)
        self.model.train()
        self._params = [p for p in self.model.parameters() if p.requires_grad]
        self._optimizer: torch.optim.AdamW | None = None
        self._optimizer_state_to_restore: dict | None = None
        self.steps = 0
        self._sampler_counter = 0

    # -- information --------------------------------------------------------------------------
    def get_tokenizer(self):
        return self._tokenizer

    def get_info(self) -> types.GetInfoResponse:
        return types.GetInfoResponse(
            model_data=types.ModelData(model_name=self.base_model, lora_rank=self.rank),
            model_id=self.run_id,
            is_lora=True,
            lora_rank=self.rank,
            model_name=self.base_model,
        )

    @property
    def _pad_id(self) -> int:
        return int(self._tokenizer.pad_token_id)

    def _score(self, inputs, targets):
        return iter_scored_micro_batches(
            self.model,
            inputs,
            targets,
            pad_id=self._pad_id,
            device=self.engine.device,
            autocast_dtype=self.engine.compute_dtype,
            token_budget=self.engine.config.micro_batch_tokens,
        )

    # -- forward / backward -------------------------------------------------------------------
    def forward(self, data: list[types.Datum], loss_fn: str) -> LocalFuture:
        """Loss and log-probabilities without touching gradients."""
        with torch.no_grad():
            result = self._builtin(data, loss_fn, backward=False)
        return LocalFuture.completed(result)

    def forward_backward(
        self, data: list[types.Datum], loss_fn: str, loss_fn_config=None
    ) -> LocalFuture[types.ForwardBackwardOutput]:
        """Run the built-in loss and accumulate its gradient (eagerly: order matters)."""
        return LocalFuture.completed(self._builtin(data, loss_fn, backward=True))

    def _builtin(self, data, loss_fn: str, backward: bool) -> types.ForwardBackwardOutput:
        if loss_fn not in BUILTIN_LOSSES:
            raise BackendError(
                f"loss_fn={loss_fn!r} is not supported by the local engine: expected one of "
                f"{sorted(BUILTIN_LOSSES)}, or use forward_backward_custom"
            )
        if not data:
            raise DataError("forward_backward got an empty batch")
        fn, required = BUILTIN_LOSSES[loss_fn]
        tensors = [loss_inputs_as_tensors(d, required, i, loss_fn) for i, d in enumerate(data)]
        inputs, targets = _inputs_and_targets(data)
        outputs: list[dict | None] = [None] * len(data)
        total = 0.0
        for group, logprobs in self._score(inputs, targets):
            losses = []
            for idx, lp in zip(group, logprobs):
                loss, extra = fn(lp, {k: v.to(lp.device) for k, v in tensors[idx].items()})
                losses.append(loss)
                outputs[idx] = {"logprobs": _tensor_data(lp)} | {
                    k: _tensor_data(v) for k, v in extra.items()
                }
            group_loss = torch.stack(losses).sum()
            if backward:
                group_loss.backward()
            total += float(group_loss.detach())
        return types.ForwardBackwardOutput(
            loss_fn_output_type="TorchLossReturn",
            loss_fn_outputs=outputs,  # type: ignore[arg-type]
            metrics={"loss:sum": total},
        )

    def forward_backward_custom(
        self, data: list[types.Datum], loss_fn: CustomLossFn
    ) -> LocalFuture[types.ForwardBackwardOutput]:
        """Accumulate the gradient of an arbitrary loss of per-token log-probabilities."""
        if not data:
            raise DataError("forward_backward_custom got an empty batch")
        inputs, targets = _inputs_and_targets(data)
        budget = self.engine.config.micro_batch_tokens
        single_pass = len(micro_batches([len(s) for s in inputs], budget)) == 1
        if single_pass:
            logprobs: list[torch.Tensor | None] = [None] * len(data)
            for group, lps in self._score(inputs, targets):
                for idx, lp in zip(group, lps):
                    logprobs[idx] = lp
            loss, metrics = loss_fn(list(data), logprobs)  # type: ignore[arg-type]
            loss.backward()
        else:
            with torch.no_grad():
                detached: list[torch.Tensor | None] = [None] * len(data)
                for group, lps in self._score(inputs, targets):
                    for idx, lp in zip(group, lps):
                        detached[idx] = lp.detach()
            leaves = [lp.clone().requires_grad_(True) for lp in detached]  # type: ignore[union-attr]
            loss, metrics = loss_fn(list(data), leaves)
            grads = torch.autograd.grad(loss, leaves, allow_unused=True)
            for group, lps in self._score(inputs, targets):
                surrogate = sum(
                    (lp * grads[idx].to(lp.dtype)).sum()
                    for idx, lp in zip(group, lps)
                    if grads[idx] is not None
                )
                if isinstance(surrogate, torch.Tensor) and surrogate.requires_grad:
                    surrogate.backward()
            logprobs = detached
        outputs = [{"logprobs": _tensor_data(lp)} for lp in logprobs]  # type: ignore[arg-type]
        merged = {k: float(v) for k, v in (metrics or {}).items()}
        merged["loss:sum"] = float(loss.detach())
        return LocalFuture.completed(
            types.ForwardBackwardOutput(
                loss_fn_output_type="TorchLossReturn",
                loss_fn_outputs=outputs,  # type: ignore[arg-type]
                metrics=merged,
            )
        )

    # -- optimiser ----------------------------------------------------------------------------
    def optim_step(
        self, optim_params: types.AdamParams | None = None, *, adam_params=None
    ) -> LocalFuture[types.OptimStepResponse]:
        params = optim_params or adam_params
        if not isinstance(params, types.AdamParams):
            raise BackendError(
                f"optim_step expects tinker.types.AdamParams; got {type(params).__name__}"
            )
        if params.learning_rate < 0:
            raise BackendError(f"learning_rate={params.learning_rate}: expected >= 0")
        optimizer = self._ensure_optimizer(params)
        for group in optimizer.param_groups:
            group["lr"] = params.learning_rate
            group["betas"] = (params.beta1, params.beta2)
            group["eps"] = params.eps
            group["weight_decay"] = params.weight_decay
        # One pass computes the global norm (reported) and clips; without a limit the scale
        # factor is exactly 1, so the gradients are untouched.
        max_norm = params.grad_clip_norm if params.grad_clip_norm > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self._params, max_norm))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self.steps += 1
        return LocalFuture.completed(
            types.OptimStepResponse(
                metrics={"optim/grad_norm": grad_norm, "optim/lr": params.learning_rate}
            )
        )

    def _ensure_optimizer(self, params: types.AdamParams) -> torch.optim.AdamW:
        if self._optimizer is None:
            self._optimizer = torch.optim.AdamW(
                self._params,
                lr=params.learning_rate,
                betas=(params.beta1, params.beta2),
                eps=params.eps,
                weight_decay=params.weight_decay,
            )
            if self._optimizer_state_to_restore is not None:
                self._optimizer.load_state_dict(self._optimizer_state_to_restore)
                self._optimizer_state_to_restore = None
        return self._optimizer

    # -- checkpoints --------------------------------------------------------------------------
    def _save_adapter(self, path: Path, kind: str) -> None:
        # The base weights never change, so the (tied) embedding matrix is not saved with it.
        self.model.save_pretrained(str(path / _ADAPTER), save_embedding_layers=False)
        write_checkpoint_meta(
            path,
            kind=kind,
            base_model=self.base_model,
            rank=self.rank,
            trained_parts=list(self.trained_parts),
            steps=self.steps,
            run_id=self.run_id,
        )

    def save_state(self, name: str, ttl_seconds=None, **_ignored) -> LocalFuture:
        """Adapter + optimiser state, enough to resume training exactly."""
        path = self.engine.checkpoint_dir(self.run_id, "state", name)
        self._save_adapter(path, kind="state")
        optimizer_state = (
            self._optimizer.state_dict()
            if self._optimizer is not None
            else self._optimizer_state_to_restore
        )
        if optimizer_state is not None:
            torch.save(optimizer_state, path / _OPTIMIZER_FILE)
        return LocalFuture.completed(types.SaveWeightsResponse(path=str(path)))

    def save_weights_for_sampler(self, name: str, ttl_seconds=None, **_ignored) -> LocalFuture:
        """Adapter only: what a sampling client needs."""
        path = self.engine.checkpoint_dir(self.run_id, "sampler", name)
        self._save_adapter(path, kind="sampler")
        return LocalFuture.completed(types.SaveWeightsForSamplerResponse(path=str(path)))

    def load_state(self, path: str, weights_access_token=None) -> LocalFuture:
        """Load adapter weights (not the optimiser), like the SDK's ``load_state``."""
        self._load(path, with_optimizer=False)
        return LocalFuture.completed(types.LoadWeightsResponse(path=str(path)))

    def load_state_with_optimizer(self, path: str, weights_access_token=None) -> LocalFuture:
        self._load(path, with_optimizer=True)
        return LocalFuture.completed(types.LoadWeightsResponse(path=str(path)))

    def _load(self, path: str, with_optimizer: bool) -> None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        meta = read_checkpoint_meta(path)
        if meta["base_model"] != self.base_model or int(meta["rank"]) != self.rank:
            raise BackendError(
                f"checkpoint {path} is for {meta['base_model']} rank {meta['rank']}; this client "
                f"trains {self.base_model} rank {self.rank}"
            )
        weights = load_file(str(Path(path) / _ADAPTER / "adapter_model.safetensors"))
        result = set_peft_model_state_dict(self.model, weights)
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise BackendError(f"checkpoint {path} has weights this model lacks: {unexpected[:3]}")
        self.steps = int(meta.get("steps", 0))
        if with_optimizer:
            opt_file = Path(path) / _OPTIMIZER_FILE
            if not opt_file.is_file():
                raise BackendError(f"checkpoint {path} has no optimizer state ({_OPTIMIZER_FILE})")
            state = torch.load(opt_file, weights_only=False)
            if self._optimizer is not None:
                self._optimizer.load_state_dict(state)
            else:
                self._optimizer_state_to_restore = state

    # -- sampling -----------------------------------------------------------------------------
    def save_weights_and_get_sampling_client(self, name: str | None = None, **_ignored):
        """Snapshot the current weights into a new, independent sampling client."""
        from .sampling_client import LocalSamplingClient

        self._sampler_counter += 1
        name = name or f"snapshot-{self.steps:06d}-{self._sampler_counter}"
        path = self.save_weights_for_sampler(name).result().path
        return LocalSamplingClient.from_checkpoint(self.engine, path)

    def create_sampling_client(self, model_path: str, **_ignored):
        from .sampling_client import LocalSamplingClient

        return LocalSamplingClient.from_checkpoint(self.engine, model_path)
