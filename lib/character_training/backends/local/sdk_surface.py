"""How the three local clients keep the Tinker SDK's public surface exactly, written once.

The local clients take the SDK's methods, parameter names and defaults one for one (a
conformance test derives them from the installed ``tinker`` classes). Most of what that takes
follows from the SDK classes themselves, so `follows_sdk` reads them with ``inspect`` and
completes a local client class:

* every method gets the argument checks of its parameters (`sdk_arguments`);
* every ``*_async`` twin the SDK has is made from the sync method. The SDK's twins either return
  the sync method's future (``forward_async``) or await it (``sample_async``,
  ``create_*_async``); the two return annotations tell which. A twin takes the local sync
  method's signature and the SDK twin's return annotation;
* every member the SDK deprecates warns with the SDK's category (`FutureWarning`) and advice,
  so local runs warn exactly where Tinker runs would;
* members that only mean something on the service (console URLs, REST clients, sampler
  handles, external weights) become stand-ins with the SDK's signature and descriptor kind
  that fail in one line; the client names them, each with its reason.

So a client's class body holds only what the local engine does itself.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Callable, TypeVar

from typing_extensions import deprecated

from ...errors import BackendError
from .sdk_arguments import with_argument_checks

if TYPE_CHECKING:
    from tinker.lib.telemetry import Telemetry

C = TypeVar("C", bound=type)

# SDK class names in annotations -> the local classes that play their part.
LOCAL_NAMES = {
    "TrainingClient": "LocalTrainingClient",
    "SamplingClient": "LocalSamplingClient",
    "BackcompatTrainingClientFuture": "LocalTrainingClientFuture",
    "BackcompatSamplingClientFuture": "LocalSamplingClientFuture",
}
_SDK_NAME = re.compile(r"\b(" + "|".join(LOCAL_NAMES) + r")\b")
_ASYNC = "_async"


def follows_sdk(
    sdk_class: type, *, tinker_only: Mapping[str, str] | None = None
) -> Callable[[C], C]:
    """A class decorator completing a local client from the SDK class it stands in for.

    ``tinker_only`` maps the SDK members the local engine cannot serve to the reason, which
    the one-line error gives. Twins of those fail the same way.
    """
    reasons = dict(tinker_only or {})

    def complete(cls: C) -> C:
        sdk = {
            name: inspect.getattr_static(sdk_class, name)
            for name, _ in inspect.getmembers(sdk_class)
            if not name.startswith("_")
        }
        unknown = sorted(set(reasons) - set(sdk))
        if unknown:
            raise TypeError(f"tinker_only names {unknown}, which {sdk_class.__name__} lacks")
        # 1. Tinker-only stand-ins, and the argument checks of what the class implements.
        for name, member in sdk.items():
            own = cls.__dict__.get(name)
            if name in reasons:
                setattr(cls, name, _stand_in(cls, sdk_class, name, member, reasons[name]))
            elif inspect.isfunction(own) and inspect.isfunction(member):
                setattr(cls, name, with_argument_checks(own, inspect.signature(member)))
        # 2. The async twins the class does not write itself, on the checked sync methods.
        for name, member in sdk.items():
            sync = name.removesuffix(_ASYNC)
            if sync != name and sync in sdk and name not in cls.__dict__:
                setattr(cls, name, _async_twin(cls, name, sdk[sync], member))
        # 3. Deprecations last, so that a twin calls its sync method without a second warning.
        for name, member in sdk.items():
            message = getattr(member, "__deprecated__", None)
            own = cls.__dict__.get(name)
            if message and inspect.isfunction(own):
                warning = _deprecation(sdk_class.__name__, name, message)
                setattr(cls, name, deprecated(warning, category=FutureWarning)(own))
        return cls

    return complete


def no_telemetry(self) -> Telemetry | None:
    """Always None: the SDK's answer when no telemetry is being collected.

    The SDK returns its session's `Telemetry` (an uploader of client-side events to the
    service) or None when there is none; the local engine uploads nothing, so None is the
    truthful answer and code that checks for telemetry keeps working.
    """
    return None


def local_annotation(annotation: Any) -> Any:
    """An SDK annotation string with the SDK's client classes renamed to the local ones."""
    if isinstance(annotation, str):
        return _SDK_NAME.sub(lambda match: LOCAL_NAMES[match[1]], annotation)
    return annotation


def _local_signature(signature: inspect.Signature) -> inspect.Signature:
    return signature.replace(
        parameters=[
            p.replace(annotation=local_annotation(p.annotation))
            for p in signature.parameters.values()
        ],
        return_annotation=local_annotation(signature.return_annotation),
    )


def _async_twin(cls: type, name: str, sdk_sync: Any, sdk_twin: Any) -> Callable[..., Any]:
    """The SDK's ``*_async`` twin of a local sync method (before any deprecation wrapper, so a
    deprecated method's twin warns once)."""
    sync = cls.__dict__[name.removesuffix(_ASYNC)]
    returns = inspect.signature(sdk_twin).return_annotation
    if returns == inspect.signature(sdk_sync).return_annotation:

        async def twin(self: Any, *args: Any, **kwargs: Any) -> Any:
            return sync(self, *args, **kwargs)

        what = "what the sync method returns (a future stays a future, as in the SDK)"
    else:

        async def twin(self: Any, *args: Any, **kwargs: Any) -> Any:
            return await sync(self, *args, **kwargs)

        what = "the result of the sync method's future"
    twin.__name__ = name
    twin.__qualname__ = f"{cls.__qualname__}.{name}"
    twin.__module__ = cls.__module__
    twin.__doc__ = f"The SDK's async twin of ``{sync.__name__}``: awaiting it gives {what}."
    twin.__signature__ = inspect.signature(sync).replace(  # type: ignore[attr-defined]
        return_annotation=local_annotation(returns)
    )
    return twin


def _stand_in(cls: type, sdk_class: type, name: str, member: Any, reason: str) -> Any:
    """A member with the SDK's signature and descriptor kind that fails in one line."""
    if isinstance(member, property):
        label = f"{sdk_class.__name__}.{name}"

        def fail(self: Any) -> Any:
            raise _tinker_only_error(label, reason)

        return property(fail, doc=f"Tinker-only: {reason}.")
    function = member.__func__ if isinstance(member, (staticmethod, classmethod)) else member
    signature = _local_signature(inspect.signature(function))
    label = f"{sdk_class.__name__}.{name}()"

    def stand_in(*args: Any, **kwargs: Any) -> Any:
        signature.bind(*args, **kwargs)  # a wrong call is still a TypeError
        raise _tinker_only_error(label, reason)

    stand_in.__name__ = name
    stand_in.__qualname__ = f"{cls.__qualname__}.{name}"
    stand_in.__module__ = cls.__module__
    stand_in.__doc__ = f"Tinker-only: {reason}."
    stand_in.__signature__ = signature  # type: ignore[attr-defined]
    if isinstance(member, (staticmethod, classmethod)):
        return type(member)(stand_in)
    return stand_in


def _tinker_only_error(member: str, reason: str) -> BackendError:
    """The error for an SDK member that only means something against the Tinker service."""
    return BackendError(
        f"{member} is Tinker-only: {reason}; use backend 'tinker' for it, or drop the call "
        "when running on the local engine"
    )


def _deprecation(client: str, name: str, sdk_message: str) -> str:
    """The local warning: the SDK's advice after a first sentence that says it is the SDK's."""
    advice = sdk_message.removeprefix("DEPRECATED: ").partition(". ")[2] or sdk_message
    return f"{client}.{name}() is deprecated in the Tinker SDK (and so here). {advice}"
