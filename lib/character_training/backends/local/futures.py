"""SDK-style futures for the in-process engine.

Pipeline code is written against the Tinker SDK, where every call returns an `APIFuture`
that can be resolved with ``.result()`` or awaited. The local engine returns the same kind of
object (a subclass of the SDK's own `APIFuture`, so ``isinstance`` checks in tinker-cookbook
hold). Work is *lazy*: a future holds a thunk that runs when the result is first asked for.
That laziness is what lets the sampler batch thousands of ``sample()`` calls: they queue up
until someone needs a result, then all pending requests are generated together.

`LocalClientFuture` is what the ``create_*`` methods return, as the SDK returns its
``Backcompat*ClientFuture``: a future of the client that can still be used, with a deprecation
warning, as the client itself. It is generic in the client: each client module names its own
subclass (`LocalTrainingClientFuture` in `training_client`, `LocalSamplingClientFuture` in
`sampling_client`), so this module needs to know no client and imports none.
"""

from __future__ import annotations

import asyncio
import warnings
from concurrent.futures import Future as ConcurrentFuture
from typing import Any, Callable, Generic, TypeVar

from tinker.lib.public_interfaces.api_future import APIFuture

T = TypeVar("T")
C = TypeVar("C")

_PENDING = object()


class LocalFuture(APIFuture[T], Generic[T]):
    """A future whose value is computed in-process, on first demand, exactly once."""

    def __init__(self, compute: Callable[[], T] | None = None, *, value: object = _PENDING):
        self._compute = compute
        self._value: object = value
        self._error: BaseException | None = None

    @classmethod
    def completed(cls, value: T) -> "LocalFuture[T]":
        """A future that already holds its value (for calls that ran eagerly)."""
        return cls(value=value)

    def done(self) -> bool:
        return self._value is not _PENDING or self._error is not None

    def set_result(self, value: T) -> None:
        """Resolve from outside; used by batchers that compute many futures at once."""
        self._value = value

    def set_exception(self, error: BaseException) -> None:
        self._error = error

    def result(self, timeout: float | None = None) -> T:
        if self._error is not None:
            raise self._error
        if self._value is _PENDING:
            if self._compute is None:
                raise RuntimeError("LocalFuture has neither a value nor a way to compute it")
            try:
                self._value = self._compute()
            except BaseException as exc:
                self._error = exc
                raise
        return self._value  # type: ignore[return-value]

    async def result_async(self, timeout: float | None = None) -> T:
        # Yield once so that sibling coroutines started by asyncio.gather can enqueue their
        # requests before this one triggers a batch: that is how awaited samples get batched.
        await asyncio.sleep(0)
        return self.result(timeout)

    def future(self) -> ConcurrentFuture[T]:
        concurrent: ConcurrentFuture[T] = ConcurrentFuture()
        try:
            concurrent.set_result(self.result())
        except BaseException as exc:  # propagate into the concurrent future, as the SDK does
            concurrent.set_exception(exc)
        return concurrent


class LocalClientFuture(LocalFuture[C], Generic[C]):
    """A future of a client that can also be used, deprecated, as the client itself.

    The SDK's ``create_*`` methods return ``Backcompat*ClientFuture`` objects: ``.result()``
    (or ``await``) gives the client, and calling client methods on the future still works but
    warns with a `FutureWarning`. This class behaves the same way, so code that runs locally
    without warnings also runs on Tinker without them. Two differences, both deliberate:

    * the local engine builds the client before returning (it is in-process, and failing at
      the call site gives a better traceback), so the future is always already resolved;
    * private attributes (``_sampler`` and friends) are forwarded without a warning, because
      the engine's own tests inspect them; they are not part of the SDK's surface.
    """

    _client_kind = "client"  # the SDK's name for the client, for the deprecation warning

    def __getattr__(self, name: str) -> Any:
        # Only reached for names the future itself lacks. Dunder lookups (copy, pickle) and
        # lookups before __init__ has run must not recurse into result().
        if name.startswith("__") or "_value" not in vars(self):
            raise AttributeError(name)
        if not name.startswith("_"):
            warnings.warn(
                f"Using the future as the {self._client_kind} is deprecated (as in the Tinker "
                f"SDK); call .result() on it, or await it, to get the {self._client_kind} first",
                FutureWarning,
                stacklevel=2,
            )
        return getattr(self.result(), name)

    def __repr__(self) -> str:
        state = "pending" if not self.done() else repr(self._value)
        return f"<{type(self).__name__}: {state}>"
