"""The real Tinker service, built only from the environment, and checked before it is paid.

The API key never travels through parameters, notebooks or logs: the SDK reads
``TINKER_API_KEY`` (and optionally ``TINKER_BASE_URL``) from the environment itself. We only
check that the key is present, so a missing key fails at once with one actionable line
instead of deep inside the first network call.

Served models change (Tinker retired the Llama models and Qwen3-235B-A22B-Instruct-2507 in
June 2026), so before any paid call `check_models_served` compares every model a run names
(student, teacher, generator, judge) with the service's own capability list and stops with one
line naming the model, its role and what is served. The student must also be trainable; every
model must be sampleable. The capability call itself is free and needs no training session.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

from ..errors import BackendError, ConfigError, MissingCredentialsError

API_KEY_VARIABLE = "TINKER_API_KEY"
BASE_URL_VARIABLE = "TINKER_BASE_URL"
TRAINED_ROLES = ("student",)  # roles that get a LoRA training client


def create_tinker_service_client():
    """Return a ``tinker.ServiceClient`` configured from the environment."""
    if not os.environ.get(API_KEY_VARIABLE, "").strip():
        raise MissingCredentialsError(
            f"backend 'tinker' needs {API_KEY_VARIABLE} in the environment: run "
            f"`export {API_KEY_VARIABLE}=...` (key from the Tinker console) or use the "
            "offline backend with `backend: local`"
        )
    import tinker

    return tinker.ServiceClient(base_url=os.environ.get(BASE_URL_VARIABLE) or None)


def create_capabilities_client():
    """A ``tinker.RestClient`` from the environment: it answers capability queries without a
    training session (``ServiceClient.get_server_capabilities`` is deprecated in SDK 0.38)."""
    import tinker

    return tinker.RestClient(base_url=os.environ.get(BASE_URL_VARIABLE) or None)


def create_rest_client():
    """A ``tinker.RestClient`` for checkpoint queries (archive URLs, listings), with the key
    checked first as for `create_tinker_service_client`."""
    if not os.environ.get(API_KEY_VARIABLE, "").strip():
        raise MissingCredentialsError(
            f"downloading Tinker checkpoints needs {API_KEY_VARIABLE} in the environment"
        )
    return create_capabilities_client()


def server_capabilities(source: Any):
    """``source.get_server_capabilities()`` as a ``types.GetServerCapabilitiesResponse``.

    ``source`` is a ``tinker.RestClient`` (which returns a future), a ``tinker.ServiceClient``
    (which returns the response) or any object with that method. A failed query becomes one
    `BackendError` line rather than an SDK traceback.
    """
    import tinker
    from tinker import types

    try:
        answer = source.get_server_capabilities()
        if not isinstance(answer, types.GetServerCapabilitiesResponse) and hasattr(
            answer, "result"
        ):
            answer = answer.result()
    except (tinker.TinkerError, OSError, TimeoutError) as exc:  # auth, status, connection
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise BackendError(
            f"could not read Tinker's capability list before the run "
            f"({type(exc).__name__}: {first_line}); check {API_KEY_VARIABLE}, "
            f"{BASE_URL_VARIABLE} and the network"
        ) from exc
    if not isinstance(answer, types.GetServerCapabilitiesResponse):
        raise BackendError(
            "Tinker's capability query returned "
            f"{type(answer).__name__}, expected GetServerCapabilitiesResponse"
        )
    return answer


def check_models_served(
    models: Mapping[str, str], capabilities: Any, where: str = "the run's parameters"
) -> None:
    """Raise `ConfigError` in one line unless Tinker serves every model in ``models``.

    ``models`` maps role -> model name (`RunParams.models()`); ``capabilities`` is a
    ``GetServerCapabilitiesResponse``. Names must match exactly (a ``:peft:<context>`` variant
    is a different model with its own price). Flags the server leaves unset (None) are not held
    against a model; an explicit ``trainable: false`` for the student, or ``sampleable: false``
    for any role, is.
    """
    served = {m.model_name: m for m in capabilities.supported_models if m.model_name}
    listing = ", ".join(sorted(served)) or "nothing"
    for role, model in models.items():
        entry = served.get(model)
        if entry is None:
            raise ConfigError(
                f"{role} model {model!r} is not served by Tinker now (served: {listing}); "
                f"choose a served model in {where} or with --set {role}=..."
            )
        if role in TRAINED_ROLES and entry.trainable is False:
            trainable = ", ".join(sorted(n for n, m in served.items() if m.trainable is not False))
            raise ConfigError(
                f"{role} model {model!r} is served by Tinker but not trainable (trainable: "
                f"{trainable or 'nothing'}); choose another student in {where}"
            )
        if entry.sampleable is False:
            sampleable = ", ".join(
                sorted(n for n, m in served.items() if m.sampleable is not False)
            )
            raise ConfigError(
                f"{role} model {model!r} is served by Tinker but not sampleable (sampleable: "
                f"{sampleable or 'nothing'}); choose another {role} in {where}"
            )


def check_params_served(params: Any, source: Any) -> None:
    """`check_models_served` for a run's `RunParams`, asking ``source`` for the capabilities."""
    check_models_served(
        params.models(),
        server_capabilities(source),
        where=f"params/models/{params.size}.yaml",
    )
