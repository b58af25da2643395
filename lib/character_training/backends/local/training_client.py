"""LoRA training client with the Tinker `TrainingClient` contract, run in-process.

Semantics copied from the service (not its code): gradients from successive
``forward_backward`` calls accumulate until ``optim_step``; losses are token sums (`losses`
defines the built-in ones and their ``loss_fn_config``); the optimiser is AdamW with Tinker's
defaults (betas 0.9/0.95, eps 1e-12, no weight decay); LoRA follows Tinker's parametrisation
(alpha 32, scale alpha/rank, attention + MLP + unembedding by default; see `lora`).
Checkpoints are plain directories with the PEFT adapter, the optimiser state and a small JSON
manifest, so a run can resume after an interruption.

The public methods take the SDK's exact parameters and return what the SDK returns: futures
(already resolved, since work runs eagerly in order), and futures of sampling clients from the
``*sampling_client`` methods. The deprecated ``*_async`` twins, the deprecation warnings, the
argument checks and the one-line failures of arguments and methods that only make sense on the
service come from the SDK class itself (`sdk_surface.follows_sdk`, `sdk_arguments`).

``forward_backward_custom`` follows the SDK's contract ``loss_fn(data, logprobs_list) ->
(loss, metrics)``, with the log-probabilities handed over as the SDK hands them (CPU float32
leaves). The engine asks the loss for its gradient with respect to each log-probability and
back-propagates that vector through the scoring graph: directly when the batch fits in one
micro-batch, otherwise by replaying the micro-batches. Both give the parameter gradients of the
loss itself (checked by a test), which is what the service's linear surrogate computes.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Callable, List, Literal, Mapping, Sequence

import tinker
import torch
from tinker import LossHandle, types
from tinker.lib.public_interfaces.api_future import APIFuture
from tinker.lib.public_interfaces.custom_loss import check_loss_inputs, run_loss_handle

from ...errors import BackendError, DataError
from .engine import (
    LocalEngine,
    read_checkpoint_meta,
    release_free_memory,
    write_checkpoint_meta,
)
from .forward import activation_bytes_per_token, iter_scored_micro_batches, micro_batches
from .futures import LocalClientFuture, LocalFuture
from .lora import LORA_ALPHA, lora_parts, lora_target_modules
from .losses import loss_inputs_as_tensors, resolve_loss
from .sampling_client import LocalSamplingClient, LocalSamplingClientFuture
from .sdk_surface import follows_sdk, no_telemetry

if TYPE_CHECKING:
    from tinker.lib.public_interfaces.training_client import CustomLossFnV1
    from tinker.lib.retry_handler import RetryConfig
    from transformers import PreTrainedTokenizer

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


class LocalTrainingClientFuture(LocalClientFuture["LocalTrainingClient"]):
    """What ``create_lora_training_client`` and friends return (SDK: a training client future)."""

    _client_kind = "TrainingClient"


@follows_sdk(
    tinker.TrainingClient,
    tinker_only={
        "get_console_url": "the local engine has no console",
        "save_weights_external": (
            "external-weights storage is a service bucket; locally, save_weights_for_sampler "
            "already writes a PEFT adapter directory"
        ),
    },
)
class LocalTrainingClient:
    """LoRA fine-tuning of a local Hugging Face causal LM behind the SDK's interface.

    ``user_metadata`` (the service client's ``user_metadata=``) is recorded in every checkpoint
    manifest of the run.
    """

    def __init__(
        self,
        engine: LocalEngine,
        base_model: str,
        rank: int,
        seed: int | None = None,
        run_id: str | None = None,
        *,
        user_metadata: Mapping[str, str] | None = None,
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
        self.user_metadata = dict(user_metadata or {})
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
        per_token = activation_bytes_per_token(base.config)
        self._activation_tokens = max(1, engine.config.activation_mb * 2**20 // per_token)
        self._optimizer: torch.optim.AdamW | None = None
        self._optimizer_state_to_restore: dict | None = None
        self.steps = 0
        self._sampler_counter = 0

    # -- information --------------------------------------------------------------------------
    def get_tokenizer(self) -> PreTrainedTokenizer:
        return self._tokenizer

    def get_info(self) -> types.GetInfoResponse:
        return types.GetInfoResponse(
            model_data=types.ModelData(model_name=self.base_model, lora_rank=self.rank),
            model_id=self.run_id,
            is_lora=True,
            lora_rank=self.rank,
            model_name=self.base_model,
        )

    get_telemetry = no_telemetry

    @property
    def _pad_id(self) -> int:
        return int(self._tokenizer.pad_token_id)

    def _token_budget(self, with_graph: bool) -> int:
        """Padded tokens per micro-batch: ``micro_batch_tokens``, and with a graph also what
        ``activation_mb`` holds (activations kept for the backward pass grow with the tokens,
        ~2 MB per token for SmolLM2 in fp32; smaller micro-batches give the same gradient
        sums, with no extra computation)."""
        budget = self.engine.config.micro_batch_tokens
        if with_graph:
            budget = min(budget, self._activation_tokens)
        return budget

    def _score(self, inputs, targets, share_prefix: bool = False):
        """``share_prefix``: only where each micro-batch's backward runs before the next is
        asked for (`forward.iter_scored_micro_batches`)."""
        with_graph = torch.is_grad_enabled()
        return iter_scored_micro_batches(
            self.model,
            inputs,
            targets,
            pad_id=self._pad_id,
            device=self.engine.device,
            autocast_dtype=self.engine.compute_dtype,
            token_budget=self._token_budget(with_graph),
            checkpoint_tokens=self._activation_tokens if with_graph else None,
            share_prefix=share_prefix,
        )

    # -- forward / backward -------------------------------------------------------------------
    def forward(
        self,
        data: List[types.Datum],
        loss_fn: types.LossFnType,
        loss_fn_config: Mapping[str, float | str] | None = None,
    ) -> APIFuture[types.ForwardBackwardOutput]:
        """Loss and log-probabilities without touching gradients."""
        with torch.no_grad():
            result = self._builtin(data, loss_fn, loss_fn_config, backward=False)
        return LocalFuture.completed(result)

    def forward_backward(
        self,
        data: List[types.Datum],
        loss_fn: types.LossFnType,
        loss_fn_config: Mapping[str, float | str] | None = None,
    ) -> APIFuture[types.ForwardBackwardOutput]:
        """Run the built-in loss and accumulate its gradient (eagerly: order matters).

        ``loss_fn_config`` holds the loss's hyper-parameters (see `losses`); an unknown key, a
        missing required one or a loss without a local implementation fails in one line.
        """
        return LocalFuture.completed(self._builtin(data, loss_fn, loss_fn_config, backward=True))

    def _builtin(
        self, data, loss_fn: str, loss_fn_config, backward: bool
    ) -> types.ForwardBackwardOutput:
        loss, config = resolve_loss(loss_fn, loss_fn_config)
        if not data:
            raise DataError("forward_backward got an empty batch")
        tensors = [loss_inputs_as_tensors(d, loss.inputs, i, loss_fn) for i, d in enumerate(data)]
        inputs, targets = _inputs_and_targets(data)
        outputs: list[dict | None] = [None] * len(data)
        total = 0.0
        for group, logprobs in self._score(inputs, targets, share_prefix=True):
            losses = []
            for idx, lp in zip(group, logprobs):
                value, extra = loss.fn(
                    lp, {k: v.to(lp.device) for k, v in tensors[idx].items()}, config
                )
                losses.append(value)
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
        self,
        data: List[types.Datum],
        loss_fn: CustomLossFnV1 | LossHandle,
        *,
        loss_type_input: Literal["logprobs"] | None = None,
    ) -> APIFuture[types.ForwardBackwardOutput]:
        """Accumulate the gradient of an arbitrary loss of per-token log-probabilities.

        ``loss_fn`` is a callable ``(data, logprobs_list) -> (loss, metrics)`` or a `LossHandle`
        from ``create_custom_loss`` (run per datum and summed, as the SDK runs one client-side).
        The log-probabilities reach it as the SDK hands them: CPU float32 leaf tensors that
        require grad, one per datum. As on Tinker, a loss with no gradient, or one that leaves
        some datum's log-probabilities without a gradient, is an error. ``loss_type_input`` is
        deprecated and can only be ``"logprobs"`` (checked by `sdk_arguments`).
        """
        run_loss = self._custom_loss_runner(data, loss_fn)
        if not data:
            raise DataError("forward_backward_custom got an empty batch")
        inputs, targets = _inputs_and_targets(data)
        budget = self._token_budget(with_graph=True)
        single_pass = len(micro_batches([len(s) for s in inputs], budget)) == 1
        graph_logprobs: list[torch.Tensor | None] = [None] * len(data)
        with contextlib.nullcontext() if single_pass else torch.no_grad():
            for group, lps in self._score(inputs, targets):
                for idx, lp in zip(group, lps):
                    graph_logprobs[idx] = lp
        # What the SDK hands the loss: fresh CPU float32 leaves, one per datum.
        leaves = [
            lp.detach().to("cpu", torch.float32).clone().requires_grad_(True)  # type: ignore[union-attr]
            for lp in graph_logprobs
        ]
        loss, metrics = run_loss(list(data), leaves)
        grads = _logprob_gradients(loss, leaves)
        if single_pass:
            # The scoring graph is still alive: back-propagate dLoss/dlogprobs through it.
            torch.autograd.backward(
                graph_logprobs,  # type: ignore[arg-type]
                [g.to(lp.device, lp.dtype) for g, lp in zip(grads, graph_logprobs)],  # type: ignore[union-attr]
            )
        else:
            # Replay each micro-batch with a graph; the same vector-Jacobian product per group.
            for group, lps in self._score(inputs, targets):
                torch.autograd.backward(
                    lps, [grads[i].to(lp.device, lp.dtype) for i, lp in zip(group, lps)]
                )
        surrogate = sum(float((leaf.detach() * g).sum()) for leaf, g in zip(leaves, grads))
        merged = {k: float(v) for k, v in (metrics or {}).items()}
        merged["loss:sum"] = float(loss.detach().sum())
        merged["surrogate_loss:sum"] = surrogate
        return LocalFuture.completed(
            types.ForwardBackwardOutput(
                loss_fn_output_type="TorchLossReturn",
                loss_fn_outputs=[{"logprobs": _tensor_data(leaf)} for leaf in leaves],  # type: ignore[misc]
                metrics=merged,
            )
        )

    def _custom_loss_runner(self, data: Sequence[types.Datum], loss_fn) -> CustomLossFnV1:
        """``loss_fn`` as a ``(data, logprobs_list)`` callable, after the SDK's handle checks."""
        if isinstance(loss_fn, LossHandle):
            if loss_fn.session_id != self.engine.session_id:
                raise BackendError(
                    f"LossHandle {loss_fn.name!r} was created by another service client (session "
                    f"{loss_fn.session_id}); create it with this client's ServiceClient"
                )
            try:
                check_loss_inputs(loss_fn, list(data))
            except ValueError as exc:
                raise DataError(f"forward_backward_custom: {exc}") from exc
            return lambda batch, logprobs: run_loss_handle(loss_fn, batch, logprobs)
        if not callable(loss_fn):
            raise BackendError(
                "forward_backward_custom: loss_fn must be a callable (data, logprobs_list) -> "
                f"(loss, metrics) or a LossHandle; got {type(loss_fn).__name__}"
            )
        return loss_fn

    # -- optimiser ----------------------------------------------------------------------------
    def optim_step(
        self,
        optim_params: types.OptimParams | None = None,
        *,
        adam_params: types.AdamParams | None = None,
    ) -> APIFuture[types.OptimStepResponse]:
        """One AdamW step with the accumulated gradients, then clear them.

        As in the SDK, exactly one of ``optim_params`` and the legacy keyword ``adam_params``
        is given; the local engine implements the Adam family only.
        """
        if optim_params is not None and adam_params is not None:
            raise BackendError(
                "optim_step: pass optim_params or the legacy adam_params keyword, not both"
            )
        params = optim_params if optim_params is not None else adam_params
        if not isinstance(params, types.AdamParams):
            raise BackendError(
                "optim_step expects tinker.types.AdamParams (as optim_params, or adam_params=); "
                f"got {type(params).__name__}"
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
        release_free_memory()  # the step's activations, before sampling or the next step
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
    def _save_adapter(
        self,
        method: str,
        kind: str,
        name: str,
        overwrite: bool,
        ttl_seconds: int | None,
        user_metadata: Mapping[str, str] | None,
    ) -> Path:
        """A new checkpoint directory with the adapter and the manifest.

        An existing checkpoint of that name is replaced only on request. The base weights never
        change, so the (tied) embedding matrix is not saved with the adapter.
        """
        path = self.engine.checkpoint_dir(self.run_id, kind, name)
        if path.exists():
            if not overwrite:
                hint = "pass overwrite=True to replace it" if kind == "state" else "pick a new name"
                raise BackendError(
                    f"{method}: checkpoint {name!r} already exists at {path}; {hint}"
                )
            shutil.rmtree(path)
        self.model.save_pretrained(str(path / _ADAPTER), save_embedding_layers=False)
        write_checkpoint_meta(
            path,
            kind=kind,
            base_model=self.base_model,
            rank=self.rank,
            trained_parts=list(self.trained_parts),
            steps=self.steps,
            run_id=self.run_id,
            run_user_metadata=self.user_metadata,
            ttl_seconds=ttl_seconds,
            user_metadata=dict(user_metadata or {}),
        )
        return path

    def save_state(
        self,
        name: str,
        ttl_seconds: int | None = None,
        overwrite: bool = False,
        user_metadata: dict[str, str] | None = None,
    ) -> APIFuture[types.SaveWeightsResponse]:
        """Adapter + optimiser state, enough to resume training exactly.

        A name already saved by this run fails unless ``overwrite=True``, which replaces the
        whole checkpoint, metadata included (the SDK's rule). ``ttl_seconds`` is checked and
        recorded, but local checkpoints are never deleted automatically.
        """
        path = self._save_adapter(
            "save_state", "state", name, overwrite, ttl_seconds, user_metadata
        )
        optimizer_state = (
            self._optimizer.state_dict()
            if self._optimizer is not None
            else self._optimizer_state_to_restore
        )
        if optimizer_state is not None:
            torch.save(optimizer_state, path / _OPTIMIZER_FILE)
        return LocalFuture.completed(types.SaveWeightsResponse(path=str(path)))

    def save_weights_for_sampler(
        self,
        name: str,
        ttl_seconds: int | None = None,
        user_metadata: dict[str, str] | None = None,
    ) -> APIFuture[types.SaveWeightsForSamplerResponse]:
        """Adapter only: what a sampling client needs. Names are unique within a run."""
        path = self._save_adapter(
            "save_weights_for_sampler", "sampler", name, False, ttl_seconds, user_metadata
        )
        return LocalFuture.completed(types.SaveWeightsForSamplerResponse(path=str(path)))

    def load_state(
        self, path: str, weights_access_token: str | None = None
    ) -> APIFuture[types.LoadWeightsResponse]:
        """Load adapter weights (not the optimiser), like the SDK's (deprecated) ``load_state``."""
        self._load(path, with_optimizer=False)
        return LocalFuture.completed(types.LoadWeightsResponse(path=str(path)))

    def load_state_with_optimizer(
        self, path: str, weights_access_token: str | None = None
    ) -> APIFuture[types.LoadWeightsResponse]:
        """Load adapter weights and the Adam moments (deprecated in the SDK too)."""
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
    def save_weights_and_get_sampling_client(
        self,
        name: str | None = None,
        retry_config: RetryConfig | None = None,
        record_stability_info: bool = False,
        kind: types.SamplingClientKind = "snapshot",
    ) -> LocalSamplingClientFuture:
        """Snapshot the current weights into a new, independent sampling client.

        As in the SDK, ``name`` is deprecated and has no effect (the snapshot gets a generated
        name), and the return value is a future of the client. ``kind="inflight"`` (weights
        shared with later saves) is Tinker-only.
        """
        while True:  # the first free name: snapshots are never overwritten
            self._sampler_counter += 1
            snapshot = f"snapshot-{self.steps:06d}-{self._sampler_counter}"
            if not self.engine.checkpoint_dir(self.run_id, "sampler", snapshot).exists():
                break
        path = self.save_weights_for_sampler(snapshot).result().path
        return self.create_sampling_client(path, retry_config, record_stability_info)

    def create_sampling_client(
        self,
        model_path: str,
        retry_config: RetryConfig | None = None,
        record_stability_info: bool = False,
    ) -> LocalSamplingClientFuture:
        """A future of a sampling client on a checkpoint (any run's, as in the SDK)."""
        return LocalSamplingClientFuture.completed(
            LocalSamplingClient.from_checkpoint(self.engine, model_path)
        )


def _logprob_gradients(loss: object, leaves: list[torch.Tensor]) -> list[torch.Tensor]:
    """dLoss/dlogprobs for every datum, with the SDK's failures as one-line errors.

    The SDK calls ``loss.backward()`` and raises "No gradient computed for logprob tensor" when
    any datum's log-probabilities get no gradient; a loss with no graph at all fails inside
    ``backward()``. Both are mistakes in the loss (it ignores some data), so both fail here too.
    """
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise BackendError(
            "forward_backward_custom: the loss function must return (loss, metrics) with loss a "
            f"scalar torch.Tensor; got {shape}"
        )
    if not loss.requires_grad:
        raise BackendError(
            "forward_backward_custom: the loss has no gradient (it does not depend on the "
            "log-probabilities it was given); build it from the logprobs tensors"
        )
    grads = torch.autograd.grad(loss.sum(), leaves, allow_unused=True)
    for index, grad in enumerate(grads):
        if grad is None:
            raise BackendError(
                f"forward_backward_custom: no gradient reached the log-probabilities of datum "
                f"{index} (Tinker fails the same way: 'No gradient computed for logprob tensor'); "
                "every datum passed must take part in the loss"
            )
    return list(grads)  # type: ignore[arg-type]
