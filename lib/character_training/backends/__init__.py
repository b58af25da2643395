"""Backend factory: one code path, two engines.

``get_service_client("tinker")`` returns the SDK's ``tinker.ServiceClient``;
``get_service_client("local", ...)`` returns the in-process engine with the same methods.
Everything downstream (stages, evaluations, notebooks) receives a service client and never
asks which one it got.
"""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError
from .local import LocalEngineConfig, LocalServiceClient
from .tinker_backend import (
    check_params_served,
    create_capabilities_client,
    create_tinker_service_client,
)

BACKENDS = ("local", "tinker")


def get_service_client(backend: str, **local_options: Any):
    """Build the service client for ``backend``.

    ``local_options`` are `LocalEngineConfig` fields (root_dir, device, precision,
    max_batch_size, micro_batch_tokens) and are rejected for the Tinker backend, whose
    settings live in the environment.
    """
    if backend == "local":
        unknown = set(local_options) - set(LocalEngineConfig.__dataclass_fields__)
        if unknown:
            raise ConfigError(
                f"unknown local engine option(s) {sorted(unknown)}: expected some of "
                f"{sorted(LocalEngineConfig.__dataclass_fields__)}"
            )
        return LocalServiceClient(LocalEngineConfig(**local_options))
    if backend == "tinker":
        if local_options:
            raise ConfigError(
                f"backend 'tinker' takes no engine options (got {sorted(local_options)}); "
                "set TINKER_BASE_URL / TINKER_API_KEY in the environment instead"
            )
        return create_tinker_service_client()
    raise ConfigError(f"backend={backend!r}: expected one of {BACKENDS}")


def resolve_client(client_or_future: Any) -> Any:
    """The client itself, whichever backend made it.

    Tinker SDK >= 0.38 returns *futures* of clients from ``create_sampling_client``,
    ``create_lora_training_client`` and ``save_weights_and_get_sampling_client`` (using the
    future as the client still works but is deprecated); the local engine returns the same
    kind of future.
    Pipeline code passes every such return value through this function.
    """
    from tinker.lib.public_interfaces.api_future import APIFuture

    if isinstance(client_or_future, APIFuture):
        return client_or_future.result()
    return client_or_future


def service_client_for(params, capabilities_source: Any = None) -> Any:
    """The service client a run's parameters ask for (engine options only for local).

    For Tinker, every model the parameters name is first checked against the service's
    capability list (`check_params_served`), so a retired or misspelt model fails in one line
    before anything is paid for. ``capabilities_source`` is whatever answers
    ``get_server_capabilities()``; by default a ``tinker.RestClient`` from the environment.
    Either client comes wrapped by `metering.metered_for`: every request is counted in the
    run's spend ledger and held to ``--max-usd``, with the backend's own answers unchanged.
    """
    from ..metering import metered_for

    if params.backend == "local":
        engine = params.engine
        local = get_service_client(
            "local",
            root_dir=str(params.run_dir / "checkpoints"),
            device=engine.device,
            precision=engine.precision,
            max_batch_size=engine.max_batch_size,
            micro_batch_tokens=engine.micro_batch_tokens,
        )
        return metered_for(params, local)
    client = get_service_client(params.backend)  # fails first on a missing key
    if capabilities_source is None:
        capabilities_source = create_capabilities_client()
    check_params_served(params, capabilities_source)
    return metered_for(params, client)


__all__ = [
    "BACKENDS",
    "LocalEngineConfig",
    "LocalServiceClient",
    "get_service_client",
    "service_client_for",
]
