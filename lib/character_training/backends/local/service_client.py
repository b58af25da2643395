"""The local engine's `ServiceClient`: the factory for training and sampling clients.

Signatures follow ``tinker.ServiceClient`` one for one (names, defaults, sync or async, what
is returned), so pipeline code does not know which backend it talks to: ``create_*`` return
futures of clients that can also be used directly as the client (deprecated, as in the SDK),
the ``*_async`` twins are deprecated coroutines returning the client, and ``close`` takes the
session's finish status. Checkpoint paths are local directories (under
``LocalEngineConfig.root_dir``) where the service would return ``tinker://`` URIs.

The local engine creates clients eagerly, so errors (an unknown model, a bad rank) raise at
the call rather than at ``.result()``. Methods that only make sense against the service
(console URL, REST client, the session holder) fail in one line.
"""

from __future__ import annotations

import shutil
from concurrent.futures import Future as ConcurrentFuture
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Mapping

from tinker import LossHandle, types
from tinker.lib.public_interfaces.api_future import APIFuture, AwaitableConcurrentFuture
from tinker.lib.public_interfaces.custom_loss import trace_loss

from ...errors import BackendError
from .engine import LocalEngine, read_checkpoint_meta, write_checkpoint_meta
from .futures import LocalFuture, LocalSamplingClientFuture, LocalTrainingClientFuture
from .lora import parts_flags
from .model_files import KNOWN_LOCAL_MODELS, resolve_model_dir
from .sampling_client import LocalSamplingClient
from .sdk_surface import (
    check_no_access_token,
    check_no_stability_info,
    check_retry_config,
    check_ttl_seconds,
    check_user_metadata,
    local_session_id,
    tinker_deprecated,
    tinker_only,
)
from .settings import LocalEngineConfig
from .training_client import LocalTrainingClient

if TYPE_CHECKING:
    from tinker.lib.internal_client_holder import InternalClientHolder
    from tinker.lib.public_interfaces.custom_loss import PerDatumLossFn
    from tinker.lib.public_interfaces.rest_client import RestClient
    from tinker.lib.retry_handler import RetryConfig
    from tinker.lib.telemetry import Telemetry

_CLOSE_STATUSES = ("success", "errored", "interrupted")


class LocalServiceClient:
    """In-process stand-in for ``tinker.ServiceClient`` (torch + transformers + peft)."""

    def __init__(self, config: LocalEngineConfig | None = None, **overrides: Any):
        self.config = config or LocalEngineConfig(**overrides)
        self.engine = LocalEngine(self.config)
        self._closed = False

    # -- the session ----------------------------------------------------------------------------
    def _check_open(self, method: str) -> None:
        if self._closed:
            raise BackendError(f"{method}: this ServiceClient is closed; create a new one")

    @property
    def holder(self) -> InternalClientHolder:
        raise tinker_only(
            "ServiceClient.holder", "the local engine has no session holder or HTTP pool"
        )

    def get_console_url(self) -> str:
        raise tinker_only("ServiceClient.get_console_url()", "the local engine has no console")

    def get_telemetry(self) -> Telemetry | None:
        """Always None: what the SDK returns while no session collects telemetry (locally none
        ever does, so code that checks for telemetry keeps working)."""
        return None

    def close(
        self,
        status: Literal["success", "errored", "interrupted"],
        detail: str | None = None,
    ) -> AwaitableConcurrentFuture[None]:
        """Finish the "session": later calls that create clients fail, as on Tinker.

        Clients already created keep working (they hold no connection). The returned future is
        already done, as the SDK's is once the session is finished.
        """
        if status not in _CLOSE_STATUSES:
            raise BackendError(f"close: status={status!r}, expected one of {_CLOSE_STATUSES}")
        self._closed = True
        done: ConcurrentFuture[None] = ConcurrentFuture()
        done.set_result(None)
        return AwaitableConcurrentFuture(done)

    def __enter__(self) -> LocalServiceClient:
        self._check_open("ServiceClient.__enter__")
        return self

    def __exit__(self, exc_type, exc_value, traceback) -> None:
        if exc_type is None:
            self.close("success")
        else:
            self.close("errored" if issubclass(exc_type, Exception) else "interrupted")

    # -- capabilities ---------------------------------------------------------------------------
    @tinker_deprecated(
        "ServiceClient.get_server_capabilities()", "tinker.RestClient().get_server_capabilities()"
    )
    def get_server_capabilities(self) -> types.GetServerCapabilitiesResponse:
        """The SDK's response type, listing the models the local engine knows by name.

        ``max_context_length`` is left unset: knowing it means reading (for SmolLM2, first
        converting) the model files, which this cheap query should not do.
        """
        return _capabilities()

    @tinker_deprecated(
        "ServiceClient.get_server_capabilities_async()",
        "await tinker.RestClient().get_server_capabilities()",
    )
    async def get_server_capabilities_async(self) -> types.GetServerCapabilitiesResponse:
        return _capabilities()

    @tinker_deprecated("ServiceClient.create_rest_client()", "tinker.RestClient()")
    def create_rest_client(self) -> RestClient:
        raise tinker_only(
            "ServiceClient.create_rest_client()",
            "the REST API (runs, checkpoints, sessions) is the service's",
        )

    # -- training clients -----------------------------------------------------------------------
    def create_lora_training_client(
        self,
        base_model: str,
        rank: int = 32,
        seed: int | None = None,
        train_mlp: bool = True,
        train_attn: bool = True,
        train_unembed: bool = True,
        user_metadata: dict[str, str] | None = None,
        optimizer: types.OptimizerConfig | None = None,
    ) -> LocalTrainingClientFuture:
        """A future of a new LoRA training client (already resolved; see the module docstring)."""
        method = "create_lora_training_client"
        self._check_open(method)
        metadata = check_user_metadata(method, user_metadata)
        _check_optimizer(method, optimizer)
        resolve_model_dir(base_model)  # fail fast with the list of known models
        client = LocalTrainingClient(
            self.engine,
            base_model,
            rank,
            seed=seed,
            train_mlp=train_mlp,
            train_attn=train_attn,
            train_unembed=train_unembed,
        )
        client.user_metadata = metadata
        return LocalTrainingClientFuture.completed(client)

    @tinker_deprecated(
        "ServiceClient.create_lora_training_client_async()",
        "await ServiceClient.create_lora_training_client()",
    )
    async def create_lora_training_client_async(
        self,
        base_model: str,
        rank: int = 32,
        seed: int | None = None,
        train_mlp: bool = True,
        train_attn: bool = True,
        train_unembed: bool = True,
        user_metadata: dict[str, str] | None = None,
        optimizer: types.OptimizerConfig | None = None,
    ) -> LocalTrainingClient:
        return await self.create_lora_training_client(
            base_model,
            rank,
            seed,
            train_mlp,
            train_attn,
            train_unembed,
            user_metadata,
            optimizer,
        )

    def _client_from_state(
        self,
        method: str,
        path: str,
        base_model: str | None,
        user_metadata: dict[str, str] | None,
        weights_access_token: str | None,
        with_optimizer: bool,
    ) -> LocalTrainingClientFuture:
        """A training client rebuilt from a ``save_state`` checkpoint (weights; optionally Adam).

        As on Tinker, the client is a new training run (a new ``run_id``, so its checkpoints
        never collide with the source run's names); its step count continues from the
        checkpoint.
        """
        self._check_open(method)
        metadata = check_user_metadata(method, user_metadata)
        check_no_access_token(method, weights_access_token)
        meta = read_checkpoint_meta(path)
        if base_model is not None and base_model != meta["base_model"]:
            raise BackendError(
                f"{method}: base_model={base_model!r} but checkpoint {path} was trained on "
                f"{meta['base_model']!r}; the local engine loads a checkpoint on its own base only"
            )
        client = LocalTrainingClient(
            self.engine,
            meta["base_model"],
            int(meta["rank"]),
            **parts_flags(meta),
        )
        client._load(path, with_optimizer=with_optimizer)
        client.user_metadata = metadata
        return LocalTrainingClientFuture.completed(client)

    def create_training_client_from_state(
        self,
        path: str,
        base_model: str | None = None,
        user_metadata: dict[str, str] | None = None,
        weights_access_token: str | None = None,
        optimizer: types.OptimizerConfig | None = None,
    ) -> LocalTrainingClientFuture:
        """Resume from ``save_state``: weights only (a fresh optimiser), like the SDK's."""
        method = "create_training_client_from_state"
        _check_optimizer(method, optimizer)
        return self._client_from_state(
            method, path, base_model, user_metadata, weights_access_token, with_optimizer=False
        )

    @tinker_deprecated(
        "ServiceClient.create_training_client_from_state_async()",
        "await ServiceClient.create_training_client_from_state()",
    )
    async def create_training_client_from_state_async(
        self,
        path: str,
        base_model: str | None = None,
        user_metadata: dict[str, str] | None = None,
        weights_access_token: str | None = None,
        optimizer: types.OptimizerConfig | None = None,
    ) -> LocalTrainingClient:
        return await self.create_training_client_from_state(
            path,
            base_model=base_model,
            user_metadata=user_metadata,
            weights_access_token=weights_access_token,
            optimizer=optimizer,
        )

    def create_training_client_from_state_with_optimizer(
        self,
        path: str,
        base_model: str | None = None,
        user_metadata: dict[str, str] | None = None,
        weights_access_token: str | None = None,
    ) -> LocalTrainingClientFuture:
        """Resume from ``save_state`` with the Adam moments, so training continues exactly."""
        return self._client_from_state(
            "create_training_client_from_state_with_optimizer",
            path,
            base_model,
            user_metadata,
            weights_access_token,
            with_optimizer=True,
        )

    @tinker_deprecated(
        "ServiceClient.create_training_client_from_state_with_optimizer_async()",
        "await ServiceClient.create_training_client_from_state_with_optimizer()",
    )
    async def create_training_client_from_state_with_optimizer_async(
        self,
        path: str,
        base_model: str | None = None,
        user_metadata: dict[str, str] | None = None,
        weights_access_token: str | None = None,
    ) -> LocalTrainingClient:
        return await self.create_training_client_from_state_with_optimizer(
            path,
            base_model=base_model,
            user_metadata=user_metadata,
            weights_access_token=weights_access_token,
        )

    # -- sampling clients -----------------------------------------------------------------------
    def create_sampling_client(
        self,
        model_path: str | None = None,
        base_model: str | None = None,
        retry_config: RetryConfig | None = None,
        record_stability_info: bool = False,
    ) -> LocalSamplingClientFuture:
        """A future of a sampling client on a saved checkpoint or on a base model."""
        method = "create_sampling_client"
        self._check_open(method)
        if (model_path is None) == (base_model is None):
            raise BackendError(f"{method}: pass exactly one of model_path or base_model")
        check_retry_config(method, retry_config)
        check_no_stability_info(method, record_stability_info)
        if model_path is not None:
            client = LocalSamplingClient.from_checkpoint(self.engine, model_path)
        else:
            resolve_model_dir(base_model)  # type: ignore[arg-type]
            client = LocalSamplingClient.from_base(self.engine, base_model)  # type: ignore[arg-type]
        return LocalSamplingClientFuture.completed(client)

    @tinker_deprecated(
        "ServiceClient.create_sampling_client_async()",
        "await ServiceClient.create_sampling_client()",
    )
    async def create_sampling_client_async(
        self,
        model_path: str | None = None,
        base_model: str | None = None,
        retry_config: RetryConfig | None = None,
        record_stability_info: bool = False,
    ) -> LocalSamplingClient:
        return await self.create_sampling_client(
            model_path=model_path,
            base_model=base_model,
            retry_config=retry_config,
            record_stability_info=record_stability_info,
        )

    # -- weights and losses ---------------------------------------------------------------------
    def copy_weights(
        self,
        path: str,
        *,
        ttl_seconds: int | None = None,
        weights_access_token: str | None = None,
    ) -> APIFuture[str]:
        """Copy a checkpoint (either kind, kind kept) into a new run of this service's root.

        The service shares storage between the copy and its source; locally the directory is
        copied. The copy's manifest names its new run and its source.
        """
        method = "copy_weights"
        self._check_open(method)
        check_ttl_seconds(method, ttl_seconds)
        check_no_access_token(method, weights_access_token)
        meta = read_checkpoint_meta(path)
        run_id = self.engine.new_run_id()
        target = self.engine.checkpoint_dir(run_id, str(meta["kind"]), Path(path).name)
        shutil.copytree(path, target)
        write_checkpoint_meta(
            target,
            **{**meta, "run_id": run_id, "copied_from": str(path), "ttl_seconds": ttl_seconds},
        )
        return LocalFuture.completed(str(target))

    def create_custom_loss(
        self, fn: PerDatumLossFn, input_ranks: Mapping[str, types.CustomLossInputRank]
    ) -> APIFuture[LossHandle]:
        """A `LossHandle` for ``forward_backward_custom``, traced and checked by the SDK's own
        rules (torch.fx, torch and math only, ``custom/<name>:sum|mean`` metrics).

        The handle runs client-side, per datum, as the SDK runs a handle the server did not
        take (``loss_id`` None); only clients of this service client accept it.
        """
        self._check_open("create_custom_loss")
        try:
            handle = trace_loss(fn, input_ranks, local_session_id(self.engine))
        except ValueError as exc:
            raise BackendError(str(exc).splitlines()[0]) from exc
        return LocalFuture.completed(handle)


def _capabilities() -> types.GetServerCapabilitiesResponse:
    return types.GetServerCapabilitiesResponse(
        supported_models=[
            types.SupportedModel(model_name=name, trainable=True, sampleable=True)
            for name in KNOWN_LOCAL_MODELS
        ]
    )


def _check_optimizer(method: str, optimizer: types.OptimizerConfig | None) -> None:
    """The local engine trains with AdamW only (the SDK's default optimizer)."""
    if optimizer is not None and not isinstance(optimizer, types.AdamOptimizerConfig):
        kind = getattr(optimizer, "type", type(optimizer).__name__)
        raise BackendError(
            f"{method}: optimizer {kind!r} is not supported by the local engine: expected None "
            "or tinker.types.AdamOptimizerConfig()"
        )
