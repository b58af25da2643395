"""The local engine's `ServiceClient`: the factory for training and sampling clients.

Signatures follow ``tinker.ServiceClient`` one for one (names, defaults, sync or async, what
is returned), so pipeline code does not know which backend it talks to: ``create_*`` return
futures of clients that can also be used directly as the client (deprecated, as in the SDK),
and ``close`` takes the session's finish status. Checkpoint paths are local directories (under
``LocalEngineConfig.root_dir``) where the service would return ``tinker://`` URIs.

The local engine creates clients eagerly, so errors (an unknown model, a bad rank) raise at
the call rather than at ``.result()``. The ``*_async`` twins (deprecated coroutines returning
the client), the deprecations, the argument checks and the one-line failures of the methods
that only make sense against the service (console URL, REST client, the session holder) come
from the SDK class itself through `sdk_surface.follows_sdk`.
"""

from __future__ import annotations

import shutil
from concurrent.futures import Future as ConcurrentFuture
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Mapping

import tinker
from tinker import LossHandle, types
from tinker.lib.public_interfaces.api_future import APIFuture, AwaitableConcurrentFuture
from tinker.lib.public_interfaces.custom_loss import trace_loss

from ...errors import BackendError
from .engine import LocalEngine, read_checkpoint_meta, write_checkpoint_meta
from .futures import LocalFuture
from .lora import parts_flags
from .model_files import KNOWN_LOCAL_MODELS, resolve_model_dir
from .sampling_client import LocalSamplingClient, LocalSamplingClientFuture
from .sdk_surface import follows_sdk, no_telemetry
from .settings import LocalEngineConfig
from .training_client import LocalTrainingClient, LocalTrainingClientFuture

if TYPE_CHECKING:
    from tinker.lib.public_interfaces.custom_loss import PerDatumLossFn
    from tinker.lib.retry_handler import RetryConfig


@follows_sdk(
    tinker.ServiceClient,
    tinker_only={
        "holder": "the local engine has no session holder or HTTP pool",
        "get_console_url": "the local engine has no console",
        "create_rest_client": "the REST API (runs, checkpoints, sessions) is the service's",
    },
)
class LocalServiceClient:
    """In-process stand-in for ``tinker.ServiceClient`` (torch + transformers + peft).

    Arguments a method body does not read (``weights_access_token``, ``optimizer``,
    ``retry_config``, ...) are checked before it runs (`sdk_arguments`): only values the local
    engine honours get through.
    """

    def __init__(self, config: LocalEngineConfig | None = None, **overrides: Any):
        self.config = config or LocalEngineConfig(**overrides)
        self.engine = LocalEngine(self.config)
        self._closed = False

    # -- the session ----------------------------------------------------------------------------
    def _check_open(self, method: str) -> None:
        if self._closed:
            raise BackendError(f"{method}: this ServiceClient is closed; create a new one")

    get_telemetry = no_telemetry

    def close(
        self,
        status: Literal["success", "errored", "interrupted"],
        detail: str | None = None,
    ) -> AwaitableConcurrentFuture[None]:
        """Finish the "session": later calls that create clients fail, as on Tinker.

        Clients already created keep working (they hold no connection). The returned future is
        already done, as the SDK's is once the session is finished.
        """
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
    def get_server_capabilities(self) -> types.GetServerCapabilitiesResponse:
        """The SDK's response type, listing the models the local engine knows by name.

        ``max_context_length`` is left unset: knowing it means reading (for SmolLM2, first
        converting) the model files, which this cheap query should not do.
        """
        return types.GetServerCapabilitiesResponse(
            supported_models=[
                types.SupportedModel(model_name=name, trainable=True, sampleable=True)
                for name in KNOWN_LOCAL_MODELS
            ]
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
        self._check_open("create_lora_training_client")
        resolve_model_dir(base_model)  # fail fast with the list of known models
        client = LocalTrainingClient(
            self.engine,
            base_model,
            rank,
            seed=seed,
            user_metadata=user_metadata,
            train_mlp=train_mlp,
            train_attn=train_attn,
            train_unembed=train_unembed,
        )
        return LocalTrainingClientFuture.completed(client)

    def _client_from_state(
        self,
        method: str,
        path: str,
        base_model: str | None,
        user_metadata: dict[str, str] | None,
        with_optimizer: bool,
    ) -> LocalTrainingClientFuture:
        """A training client rebuilt from a ``save_state`` checkpoint (weights; optionally Adam).

        As on Tinker, the client is a new training run (a new ``run_id``, so its checkpoints
        never collide with the source run's names); its step count continues from the
        checkpoint.
        """
        self._check_open(method)
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
            user_metadata=user_metadata,
            **parts_flags(meta),
        )
        client._load(path, with_optimizer=with_optimizer)
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
        return self._client_from_state(
            "create_training_client_from_state",
            path,
            base_model,
            user_metadata,
            with_optimizer=False,
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
            with_optimizer=True,
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
        if model_path is not None:
            client = LocalSamplingClient.from_checkpoint(self.engine, model_path)
        else:
            resolve_model_dir(base_model)  # type: ignore[arg-type]
            client = LocalSamplingClient.from_base(self.engine, base_model)  # type: ignore[arg-type]
        return LocalSamplingClientFuture.completed(client)

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
        self._check_open("copy_weights")
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
            handle = trace_loss(fn, input_ranks, self.engine.session_id)
        except ValueError as exc:
            raise BackendError(str(exc).splitlines()[0]) from exc
        return LocalFuture.completed(handle)
