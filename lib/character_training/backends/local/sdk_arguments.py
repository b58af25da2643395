"""The Tinker SDK's arguments, checked by parameter name: one rule per name, written once.

The local clients take the SDK's parameters one for one, and a parameter name means the same
thing wherever the SDK uses it (``ttl_seconds`` on ``save_state``, ``save_weights_for_sampler``
and ``copy_weights``; ``weights_access_token`` on every way to load a checkpoint; ...). So the
checks are a table from parameter name to rules, and `with_argument_checks` runs the rules of
every parameter a method takes before the method itself. Three kinds of argument need a rule:

* arguments the local engine honours after checking them as the service does: ``ttl_seconds``
  (recorded in the checkpoint manifest; local checkpoints are never deleted automatically),
  ``user_metadata`` (recorded too), ``retry_config`` (honoured vacuously: nothing in-process
  ever needs a retry), ``optimizer`` (AdamW only), counts that must be >= 0, and every
  parameter the SDK annotates as a ``Literal`` (its values are read from the annotation);
* arguments that only mean something on the service (an access token for another account,
  StableReinforce recording, inflight weights, ...): the SDK's default is accepted, anything
  else fails with one `BackendError` line instead of being silently ignored (`only_the_default`);
* arguments the SDK deprecates: a `DeprecationWarning` when one is given.

Checks that need more than the argument itself (a prompt's length, the model's vocabulary)
stay in the methods.
"""

from __future__ import annotations

import ast
import functools
import inspect
import re
import warnings
from collections.abc import Mapping
from typing import Any, Callable, TypeVar

from tinker import types
from tinker.lib.retry_handler import RetryConfig

from ...errors import BackendError

F = TypeVar("F", bound=Callable[..., Any])
# A rule gets (method, parameter, value, the SDK's default) and raises or warns.
Rule = Callable[[str, str, Any, Any], None]

_MIN_TTL_SECONDS = 3600  # the SDK documents "between 1 hour (3600) and 10 years"
_MAX_TTL_SECONDS = 10 * 366 * 24 * 3600
_LITERAL = re.compile(r"^Literal\[(?P<values>[^\]]*)\](?P<optional>\s*\|\s*None)?$")


def _ttl_seconds(method: str, name: str, value: Any, default: Any) -> None:
    """None means the checkpoint never expires; otherwise the service's range."""
    if value is None:
        return
    if (
        not isinstance(value, int)
        or isinstance(value, bool)
        or not _MIN_TTL_SECONDS <= value <= _MAX_TTL_SECONDS
    ):
        raise BackendError(
            f"{method}: {name}={value!r}, expected None or an integer between "
            f"{_MIN_TTL_SECONDS} (1 hour) and {_MAX_TTL_SECONDS} (10 years)"
        )


def _str_to_str(method: str, name: str, value: Any, default: Any) -> None:
    if value is None:
        return
    if not isinstance(value, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise BackendError(f"{method}: {name} must be a dict of str to str; got {value!r}")


def _retry_config(method: str, name: str, value: Any, default: Any) -> None:
    if value is not None and not isinstance(value, RetryConfig):
        raise BackendError(
            f"{method}: {name} must be a tinker RetryConfig or None; got {type(value).__name__}"
        )


def _adam_only(method: str, name: str, value: Any, default: Any) -> None:
    """The local engine trains with AdamW only (the SDK's default optimizer)."""
    if value is not None and not isinstance(value, types.AdamOptimizerConfig):
        kind = getattr(value, "type", type(value).__name__)
        raise BackendError(
            f"{method}: {name} {kind!r} is not supported by the local engine: expected None "
            "or tinker.types.AdamOptimizerConfig()"
        )


def _count(method: str, name: str, value: Any, default: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise BackendError(f"{method}: {name}={value!r}, expected an integer >= 0")


def only_the_default(what: str) -> Rule:
    """A rule for an argument only the service honours: anything but the SDK's default fails.

    ``what`` says why, and may name the given value as ``{value!r}``; the message ends with the
    value to pass instead.
    """

    def rule(method: str, name: str, value: Any, default: Any) -> None:
        if value != default:
            raise BackendError(f"{method}: {what.format(value=value)}; pass {default!r}")

    return rule


def one_of(*allowed: Any) -> Rule:
    """A rule for a parameter with a fixed set of values (the SDK's ``Literal`` annotations)."""

    def rule(method: str, name: str, value: Any, default: Any) -> None:
        if value not in allowed:
            raise BackendError(f"{method}: {name}={value!r}, expected one of {allowed}")

    return rule


def deprecated_argument(advice: str) -> Rule:
    """A rule for an argument the SDK deprecates: warn when it is given (not the default)."""

    def rule(method: str, name: str, value: Any, default: Any) -> None:
        if value != default:
            warnings.warn(
                f"{method}({name}=...) is deprecated in the Tinker SDK: {advice}",
                DeprecationWarning,
                stacklevel=3,  # the method's caller (this rule <- the checks <- the caller)
            )

    return rule


# Rules by parameter name, for every method of the three clients that takes that parameter.
ARGUMENT_RULES: dict[str, tuple[Rule, ...]] = {
    "ttl_seconds": (_ttl_seconds,),
    "user_metadata": (_str_to_str,),
    "retry_config": (_retry_config,),
    "optimizer": (_adam_only,),
    "topk_prompt_logprobs": (_count,),
    "topk_sample_logprobs": (
        _count,
        only_the_default(
            "topk_sample_logprobs is not supported by the local engine (its decoder keeps only "
            "the sampled token's log-probability)"
        ),
    ),
    "prompt_alt_tokens_k": (
        _count,
        only_the_default("prompt_alt_tokens_k is not supported by the local engine"),
    ),
    "weights_access_token": (
        only_the_default(
            "weights_access_token is Tinker-only (local checkpoints belong to no account)"
        ),
    ),
    "record_stability_info": (
        only_the_default(
            "record_stability_info=True is Tinker-only (the local sampler records no "
            "StableReinforce stability information)"
        ),
    ),
    "kind": (
        only_the_default(
            "kind={value!r}: the local engine implements 'snapshot' only ('inflight' shared "
            "weights are Tinker-only)"
        ),
    ),
}

# Arguments the SDK deprecates, by (method, parameter): what to do instead.
DEPRECATED_ARGUMENTS: dict[tuple[str, str], str] = {
    ("save_weights_and_get_sampling_client", "name"): (
        "it has no effect; use save_weights_for_sampler(name) + "
        "create_sampling_client(model_path=...) for a named checkpoint"
    ),
    ("forward_backward_custom", "loss_type_input"): (
        "the loss always receives logprobs; remove the argument"
    ),
}


def literal_values(annotation: object) -> tuple[Any, ...] | None:
    """The values a ``Literal[...]`` (or ``Literal[...] | None``) annotation string allows."""
    if not isinstance(annotation, str):
        return None
    match = _LITERAL.match(annotation.strip())
    if match is None:
        return None
    values = ast.literal_eval(f"({match['values']},)")
    return values + ((None,) if match["optional"] else ())


def rules_for(method: str, parameter: inspect.Parameter) -> tuple[Rule, ...]:
    """Every rule for one parameter of one SDK method, in the order they run."""
    rules: list[Rule] = []
    advice = DEPRECATED_ARGUMENTS.get((method, parameter.name))
    if advice is not None:
        rules.append(deprecated_argument(advice))
    allowed = literal_values(parameter.annotation)
    if allowed is not None:
        rules.append(one_of(*allowed))
    return (*rules, *ARGUMENT_RULES.get(parameter.name, ()))


def with_argument_checks(function: F, sdk_signature: inspect.Signature) -> F:
    """``function`` checking its arguments first, by the rules of the SDK's parameters.

    Messages name the method as ``function`` is named. A function whose parameters have no
    rules is returned as it is.
    """
    method = function.__name__
    plan = [
        (parameter.name, parameter.default, rules)
        for parameter in sdk_signature.parameters.values()
        if (rules := rules_for(method, parameter))
    ]
    if not plan:
        return function
    signature = inspect.signature(function)

    @functools.wraps(function)
    def checked(*args: Any, **kwargs: Any) -> Any:
        arguments = signature.bind(*args, **kwargs).arguments
        for name, default, rules in plan:
            value = arguments.get(name, default)
            for rule in rules:
                rule(method, name, value, default)
        return function(*args, **kwargs)

    return checked  # type: ignore[return-value]
