"""The local engine's `ServiceClient`: the factory for training and sampling clients.

Signatures follow ``tinker.ServiceClient`` so pipeline code does not know which backend it
talks to. Checkpoint paths are local directories (under ``LocalEngineConfig.root_dir``) where
the service would return ``tinker://`` URIs.
"""

from __future__ import annotations

from ...errors import BackendError
from .engine import LocalEngine, read_checkpoint_meta
from .lora import parts_flags
from .model_files import KNOWN_LOCAL_MODELS, resolve_model_dir
from .sampling_client import LocalSamplingClient
from .settings import LocalEngineConfig
from .training_client import LocalTrainingClient


class LocalServiceClient:
    """In-process stand-in for ``tinker.ServiceClient`` (torch + transformers + peft)."""

    def __init__(self, config: LocalEngineConfig | None = None, **overrides):
        self.config = config or LocalEngineConfig(**overrides)
        self.engine = LocalEngine(self.config)

    def get_server_capabilities(self):
        return {"supported_models": list(KNOWN_LOCAL_MODELS), "backend": "local"}

    def create_lora_training_client(
        self,
        base_model: str,
        rank: int = 32,
        seed: int | None = None,
        train_mlp: bool = True,
        train_attn: bool = True,
        train_unembed: bool = True,
        **_ignored,
    ) -> LocalTrainingClient:
        resolve_model_dir(base_model)  # fail fast with the list of known models
        return LocalTrainingClient(
            self.engine,
            base_model,
            rank,
            seed=seed,
            train_mlp=train_mlp,
            train_attn=train_attn,
            train_unembed=train_unembed,
        )

    async def create_lora_training_client_async(self, *args, **kwargs) -> LocalTrainingClient:
        return self.create_lora_training_client(*args, **kwargs)

    def create_training_client_from_state(self, path: str, **_ignored) -> LocalTrainingClient:
        """Resume from ``save_state``: weights only, like the SDK's method of this name."""
        meta = read_checkpoint_meta(path)
        client = LocalTrainingClient(
            self.engine,
            meta["base_model"],
            int(meta["rank"]),
            run_id=meta.get("run_id"),
            **parts_flags(meta),
        )
        client.load_state(path)
        return client

    def create_training_client_from_state_with_optimizer(self, path: str, **_ignored):
        meta = read_checkpoint_meta(path)
        client = LocalTrainingClient(
            self.engine,
            meta["base_model"],
            int(meta["rank"]),
            run_id=meta.get("run_id"),
            **parts_flags(meta),
        )
        client.load_state_with_optimizer(path)
        return client

    def create_sampling_client(
        self, model_path: str | None = None, base_model: str | None = None, **_ignored
    ) -> LocalSamplingClient:
        if (model_path is None) == (base_model is None):
            raise BackendError(
                "create_sampling_client: pass exactly one of model_path or base_model"
            )
        if model_path is not None:
            return LocalSamplingClient.from_checkpoint(self.engine, model_path)
        resolve_model_dir(base_model)  # type: ignore[arg-type]
        return LocalSamplingClient.from_base(self.engine, base_model)  # type: ignore[arg-type]

    async def create_sampling_client_async(self, *args, **kwargs) -> LocalSamplingClient:
        return self.create_sampling_client(*args, **kwargs)

    def close(self) -> None:
        """Nothing to release beyond Python objects; present for API parity."""
