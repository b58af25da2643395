"""What the three local clients share to keep the Tinker SDK's public surface exactly.

The local clients take the SDK's parameter names and defaults one for one (a conformance test
derives them from the installed ``tinker`` classes), so three kinds of argument need a rule:

* arguments the local engine honours fully: nothing to do;
* arguments that only mean something on the service (access tokens for another account,
  StableReinforce recording, inflight weights, ...): the default is accepted, anything else
  fails with one `BackendError` line instead of being silently ignored;
* arguments that are trivially honoured in-process: ``ttl_seconds`` (checked as the service
  checks it and recorded in the checkpoint manifest; local checkpoints are never deleted
  automatically), ``retry_config`` (checked for type; nothing in-process ever needs a retry)
  and ``user_metadata`` (checked and recorded in the manifest).

Methods that exist only on the service (console URLs, REST clients, sampler handles, external
weights) fail with `tinker_only`. Methods the SDK deprecates carry `tinker_deprecated`, so
local runs warn exactly where Tinker runs would.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, TypeVar

from typing_extensions import deprecated

from ...errors import BackendError

F = TypeVar("F", bound=Callable[..., Any])

_MIN_TTL_SECONDS = 3600  # the SDK documents "between 1 hour (3600) and 10 years"
_MAX_TTL_SECONDS = 10 * 366 * 24 * 3600


def tinker_deprecated(method: str, instead: str) -> Callable[[F], F]:
    """Mark a method the Tinker SDK deprecates, with the same warning category (FutureWarning).

    The wrapper keeps the signature (``functools.wraps``) and sets ``__deprecated__``, which the
    conformance test compares with the SDK's.
    """
    return deprecated(
        f"{method} is deprecated in the Tinker SDK (and so here); use {instead} instead",
        category=FutureWarning,
    )


def tinker_only(method: str, reason: str) -> BackendError:
    """The error for an SDK method that only means something against the Tinker service."""
    return BackendError(
        f"{method} is Tinker-only: {reason}; use backend 'tinker' for it, or drop the call "
        "when running on the local engine"
    )


def check_ttl_seconds(method: str, ttl_seconds: int | None) -> None:
    """Reject a TTL the service would reject; ``None`` means the checkpoint never expires."""
    if ttl_seconds is None:
        return
    if (
        not isinstance(ttl_seconds, int)
        or isinstance(ttl_seconds, bool)
        or not _MIN_TTL_SECONDS <= ttl_seconds <= _MAX_TTL_SECONDS
    ):
        raise BackendError(
            f"{method}: ttl_seconds={ttl_seconds!r}, expected None or an integer between "
            f"{_MIN_TTL_SECONDS} (1 hour) and {_MAX_TTL_SECONDS} (10 years)"
        )


def check_user_metadata(method: str, user_metadata: Mapping[str, str] | None) -> dict[str, str]:
    """A copy of ``user_metadata`` after checking it is a str -> str mapping (``{}`` for None)."""
    if user_metadata is None:
        return {}
    if not isinstance(user_metadata, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in user_metadata.items()
    ):
        raise BackendError(
            f"{method}: user_metadata must be a dict of str to str; got {user_metadata!r}"
        )
    return dict(user_metadata)


def check_no_access_token(method: str, weights_access_token: str | None) -> None:
    """Local checkpoints belong to no account, so a token for another account means nothing."""
    if weights_access_token is not None:
        raise BackendError(
            f"{method}: weights_access_token is Tinker-only (local checkpoints belong to no "
            "account); pass None"
        )


def check_retry_config(method: str, retry_config: object | None) -> None:
    """A RetryConfig is honoured vacuously in-process (no request ever fails transiently)."""
    from tinker.lib.retry_handler import RetryConfig

    if retry_config is not None and not isinstance(retry_config, RetryConfig):
        raise BackendError(
            f"{method}: retry_config must be a tinker RetryConfig or None; got "
            f"{type(retry_config).__name__}"
        )


def check_no_stability_info(method: str, record_stability_info: bool) -> None:
    """StableReinforce stability records live on the service; the local sampler keeps none."""
    if record_stability_info:
        raise BackendError(
            f"{method}: record_stability_info=True is Tinker-only (the local sampler records no "
            "StableReinforce stability information); pass False"
        )


def local_session_id(engine: object) -> str:
    """The local stand-in for a Tinker session id: one per engine (so per service client).

    ``LossHandle``s carry it, so a handle is only accepted by clients of the service client
    that created it, as on Tinker.
    """
    return f"local-{getattr(engine, '_session', 'session')}-{id(engine):x}"
