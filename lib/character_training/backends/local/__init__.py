"""In-process engine implementing the Tinker client interface on torch + transformers + peft."""

from .futures import LocalFuture
from .model_files import KNOWN_LOCAL_MODELS, SMOLLM2_NAME, TINY_RANDOM_NAME, resolve_model_dir
from .sampling_client import LocalSamplingClient, LocalSamplingClientFuture
from .service_client import LocalServiceClient
from .settings import LocalEngineConfig
from .training_client import LocalTrainingClient, LocalTrainingClientFuture

__all__ = [
    "KNOWN_LOCAL_MODELS",
    "LocalEngineConfig",
    "LocalFuture",
    "LocalSamplingClient",
    "LocalSamplingClientFuture",
    "LocalServiceClient",
    "LocalTrainingClient",
    "LocalTrainingClientFuture",
    "SMOLLM2_NAME",
    "TINY_RANDOM_NAME",
    "resolve_model_dir",
]
