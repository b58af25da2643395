"""The service client every notebook gets: the backend's own, counted and held to the cap.

`backends.service_client_for` wraps whatever it built (the local engine or ``tinker``) in a
`MeteredService`. Every call still goes to the wrapped client at once and in the order it is
made, with the same arguments, and every answer is the wrapped client's (so nothing a run
computes changes); on the way the wrapper

* charges the run's ledger (`spend.Ledger`) with what the service is asked: ``sample`` and
  ``compute_logprobs`` prompts and ``forward`` inputs as prefill (a ``sample`` of n replies
  counts its prompt n times, as the dry-run plans it; an upper bound where the service shares
  the prompt), the replies it returns as sampled tokens, ``forward_backward`` and
  ``forward_backward_custom`` inputs as trained tokens;
* asks the cap (`spend_cap.CapGuard`, when ``--max-usd`` is set) before each request, with the
  request's worst case (a reply at its ``max_tokens``) held until its answer is charged;
* turns the service's "not found" for a checkpoint path (``create_*_from_state*``,
  ``create_sampling_client(model_path=...)``, ``load_state*``) into a one-line
  `checkpoint_expiry.CheckpointGoneError` naming the stage to rerun.

Futures stay futures (`tinker`'s ``APIFuture``), and a ``create_*`` call still returns a future
of a client, so `backends.resolve_client` and the stages see the SDK's shapes. Methods not
listed here (``optim_step``, ``save_state``, tokenizers ...) are the wrapped client's own.
"""

from __future__ import annotations

import atexit
from collections.abc import Callable, Sequence
from concurrent.futures import Future as ConcurrentFuture
from pathlib import Path
from typing import Any

from tinker.lib.public_interfaces.api_future import APIFuture

from .checkpoint_expiry import gone_error, is_not_found
from .spend import Ledger, Tokens, current_stage, price
from .spend_cap import CapGuard, SpendCap

_UNSET = object()


def _datum_tokens(data: Sequence[Any]) -> int:
    return sum(int(datum.model_input.length) for datum in data)


class MeteredFuture(APIFuture):
    """A wrapped request's future: ``settle(value)`` runs once, when the answer is first read;
    ``fail(exc)`` maps an error (and releases what the cap held)."""

    def __init__(
        self,
        inner: Any,
        settle: Callable[[Any], Any] | None = None,
        fail: Callable[[BaseException], BaseException] | None = None,
    ):
        self._inner = inner
        self._settle = settle
        self._fail = fail
        self._value: Any = _UNSET

    def _finish(self, read: Callable[[], Any]) -> Any:
        if self._value is not _UNSET:
            return self._value
        try:
            value = read()
        except Exception as exc:
            if self._fail is None:
                raise
            mapped = self._fail(exc)
            if mapped is exc:
                raise
            raise mapped from exc
        self._value = self._settle(value) if self._settle else value
        return self._value

    def result(self, timeout: float | None = None) -> Any:
        return self._finish(lambda: self._inner.result(timeout))

    async def result_async(self, timeout: float | None = None) -> Any:
        if self._value is _UNSET:
            try:
                value = await self._inner.result_async(timeout)
            except Exception:
                return self.result(timeout)  # maps the error the same way
            return self._finish(lambda: value)
        return self._value

    def done(self) -> bool:
        return self._value is not _UNSET or bool(getattr(self._inner, "done", lambda: True)())

    def future(self) -> ConcurrentFuture:
        concurrent: ConcurrentFuture = ConcurrentFuture()
        try:
            concurrent.set_result(self.result())
        except BaseException as exc:
            concurrent.set_exception(exc)
        return concurrent


class _ClientFuture(MeteredFuture):
    """What a ``create_*`` call returns: the future of a wrapped client, which can also be used
    as the client itself (deprecated in the SDK, still allowed there)."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.result(), name)


class MeteredService:
    """A service client whose clients charge ``ledger`` (see the module docstring)."""

    def __init__(
        self, inner: Any, ledger: Ledger, guard: CapGuard | None = None, run_dir: Path | None = None
    ):
        self._inner = inner
        self.ledger = ledger
        self.guard = guard
        self.run_dir = Path(run_dir) if run_dir is not None else ledger.run_dir

    @property
    def wrapped(self) -> Any:
        return self._inner

    def flush(self) -> None:
        """Write the counts not yet in the ledger (also done every few seconds and at exit)."""
        self.ledger.flush()

    # -- charging -------------------------------------------------------------------------------
    def hold(self, model: str, worst: Tokens, held: Tokens | None = None) -> int | None:
        """Ask the cap whether a request's ``worst`` case fits and hold ``held`` of it (the
        part charged only when the answer comes; default all) until `release`; a token, or
        None (no cap)."""
        if self.guard is None:
            return None
        params = self.ledger.params
        try:
            return self.guard.reserve(
                price(params, model, worst) or 0.0,
                None if held is None else price(params, model, held) or 0.0,
            )
        except Exception:
            self.ledger.flush()  # the stage stops here: leave its counts on disk
            raise

    def release(self, token: int | None) -> None:
        if token is not None and self.guard is not None:
            self.guard.release(token)

    def charge_now(self, model: str, tokens: Tokens) -> None:
        """A request whose price is known when it is sent (prefill, training)."""
        token = self.hold(model, tokens, Tokens())
        self.ledger.charge(model, tokens.prefill, tokens.sample, tokens.train)
        self.release(token)

    def gone(self, path: str | None) -> Callable[[BaseException], BaseException]:
        def mapped(exc: BaseException) -> BaseException:
            if path is not None and is_not_found(exc):
                self.ledger.flush()
                return gone_error(self.run_dir, str(path), exc)
            return exc

        return mapped

    def client_future(
        self, made: Any, wrap: Callable[[Any], Any], path: str | None = None
    ) -> _ClientFuture:
        """The future of a wrapped client, from what the inner ``create_*`` returned (the
        SDK's future of a client, or the client itself from an older SDK or a fake)."""
        if not isinstance(made, APIFuture):
            made = _Ready(made)
        return _ClientFuture(made, wrap, self.gone(path))

    def _model_of_path(self, model_path: str | None) -> str | None:
        """The base model this run recorded for a sampler path (no service call)."""
        if not model_path:
            return None
        from .store import list_checkpoints, resolve_path

        target = resolve_path(self.run_dir, model_path)
        for checkpoint in list_checkpoints(self.run_dir).values():
            if checkpoint.sampler_path == target:
                return checkpoint.base_model
        return None

    # -- the ServiceClient surface --------------------------------------------------------------
    def create_lora_training_client(self, *args: Any, **kwargs: Any) -> MeteredFuture:
        model = kwargs.get("base_model", args[0] if args else None)
        made = self._inner.create_lora_training_client(*args, **kwargs)
        return self.client_future(made, lambda c: MeteredTrainingClient(self, c, model))

    def create_training_client_from_state(self, path: str, *args: Any, **kwargs: Any) -> Any:
        made = self._from_state("create_training_client_from_state", path, *args, **kwargs)
        return self.client_future(made, lambda c: MeteredTrainingClient(self, c, None), path)

    def create_training_client_from_state_with_optimizer(
        self, path: str, *args: Any, **kwargs: Any
    ) -> Any:
        made = self._from_state(
            "create_training_client_from_state_with_optimizer", path, *args, **kwargs
        )
        return self.client_future(made, lambda c: MeteredTrainingClient(self, c, None), path)

    def _from_state(self, method: str, path: str, *args: Any, **kwargs: Any) -> Any:
        try:
            return getattr(self._inner, method)(path, *args, **kwargs)
        except Exception as exc:
            mapped = self.gone(path)(exc)
            if mapped is exc:
                raise
            raise mapped from exc

    def create_sampling_client(
        self, model_path: str | None = None, base_model: str | None = None, **kwargs: Any
    ) -> MeteredFuture:
        try:
            made = self._inner.create_sampling_client(
                model_path=model_path, base_model=base_model, **kwargs
            )
        except Exception as exc:
            mapped = self.gone(model_path)(exc)
            if mapped is exc:
                raise
            raise mapped from exc
        model = base_model or self._model_of_path(model_path)
        return self.client_future(
            made, lambda c: MeteredSamplingClient(self, c, model, model_path), model_path
        )

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or "_inner" not in vars(self):
            raise AttributeError(name)
        return getattr(self._inner, name)

    def __enter__(self) -> MeteredService:
        if hasattr(self._inner, "__enter__"):
            self._inner.__enter__()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.ledger.flush()
        if hasattr(self._inner, "__exit__"):
            self._inner.__exit__(*exc_info)


class _Ready(APIFuture):
    """A value as a future (a client an older SDK returned directly)."""

    def __init__(self, value: Any):
        self._value = value

    def result(self, timeout: float | None = None) -> Any:
        return self._value

    async def result_async(self, timeout: float | None = None) -> Any:
        return self._value

    def future(self) -> ConcurrentFuture:
        concurrent: ConcurrentFuture = ConcurrentFuture()
        concurrent.set_result(self._value)
        return concurrent


class _MeteredClient:
    """What both kinds of client share: the model they charge, and passing the rest on."""

    def __init__(self, service: MeteredService, inner: Any, model: str | None):
        self._service = service
        self._inner = inner
        self._model = model

    def _model_name(self) -> str:
        raise NotImplementedError

    @property
    def billed_model(self) -> str:
        """The model the ledger charges (not ``model``: the local client has its own)."""
        if not self._model:
            self._model = self._model_name()
        return self._model

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or "_inner" not in vars(self):
            raise AttributeError(name)
        return getattr(self._inner, name)


class MeteredSamplingClient(_MeteredClient):
    """``sample`` and ``compute_logprobs``, charged; see the module docstring."""

    def __init__(
        self, service: MeteredService, inner: Any, model: str | None, path: str | None = None
    ):
        super().__init__(service, inner, model)
        self._path = path

    def _model_name(self) -> str:
        return str(self._inner.get_base_model())

    def sample(
        self, prompt: Any, num_samples: int, sampling_params: Any, *args: Any, **kwargs: Any
    ) -> MeteredFuture:
        service, model = self._service, self.billed_model
        prefill = int(prompt.length) * int(num_samples)
        budget = int(getattr(sampling_params, "max_tokens", None) or 0) * int(num_samples)
        token = service.hold(model, Tokens(prefill=prefill, sample=budget), Tokens(sample=budget))
        try:
            inner = self._inner.sample(prompt, num_samples, sampling_params, *args, **kwargs)
        except Exception:
            service.release(token)
            raise
        service.ledger.charge(model, prefill=prefill)

        def settle(response: Any) -> Any:
            sampled = sum(len(sequence.tokens) for sequence in response.sequences)
            service.ledger.charge(model, sample=sampled)
            service.release(token)
            return response

        def fail(exc: BaseException) -> BaseException:
            service.release(token)
            return service.gone(self._path)(exc)

        return MeteredFuture(inner, settle, fail)

    def compute_logprobs(self, prompt: Any, *args: Any, **kwargs: Any) -> MeteredFuture:
        self._service.charge_now(self.billed_model, Tokens(prefill=int(prompt.length)))
        inner = self._inner.compute_logprobs(prompt, *args, **kwargs)
        return MeteredFuture(inner, None, self._service.gone(self._path))


class MeteredTrainingClient(_MeteredClient):
    """Training passes charged as they are submitted; see the module docstring."""

    def _model_name(self) -> str:
        info = self._inner.get_info()
        data = getattr(info, "model_data", None)
        return str(getattr(data, "model_name", None) or getattr(info, "model_name", "?"))

    def forward(self, data: Sequence[Any], *args: Any, **kwargs: Any) -> Any:
        self._service.charge_now(self.billed_model, Tokens(prefill=_datum_tokens(data)))
        return self._inner.forward(data, *args, **kwargs)

    def forward_backward(self, data: Sequence[Any], *args: Any, **kwargs: Any) -> Any:
        self._service.charge_now(self.billed_model, Tokens(train=_datum_tokens(data)))
        return self._inner.forward_backward(data, *args, **kwargs)

    def forward_backward_custom(self, data: Sequence[Any], *args: Any, **kwargs: Any) -> Any:
        self._service.charge_now(self.billed_model, Tokens(train=_datum_tokens(data)))
        return self._inner.forward_backward_custom(data, *args, **kwargs)

    def save_weights_for_sampler(self, *args: Any, **kwargs: Any) -> Any:
        self._service.ledger.flush()  # a stage's milestone: its counts so far go to disk
        return self._inner.save_weights_for_sampler(*args, **kwargs)

    def save_weights_and_get_sampling_client(self, *args: Any, **kwargs: Any) -> MeteredFuture:
        made = self._inner.save_weights_and_get_sampling_client(*args, **kwargs)
        model = self.billed_model
        return self._service.client_future(
            made, lambda c: MeteredSamplingClient(self._service, c, model)
        )

    def create_sampling_client(self, model_path: str, *args: Any, **kwargs: Any) -> MeteredFuture:
        made = self._inner.create_sampling_client(model_path, *args, **kwargs)
        model = self.billed_model
        return self._service.client_future(
            made, lambda c: MeteredSamplingClient(self._service, c, model, model_path), model_path
        )

    def load_state(self, path: str, *args: Any, **kwargs: Any) -> MeteredFuture:
        inner = self._inner.load_state(path, *args, **kwargs)
        return MeteredFuture(inner, None, self._service.gone(path))

    def load_state_with_optimizer(self, path: str, *args: Any, **kwargs: Any) -> MeteredFuture:
        inner = self._inner.load_state_with_optimizer(path, *args, **kwargs)
        return MeteredFuture(inner, None, self._service.gone(path))


def metered_for(params: Any, client: Any, stage: str | None = None) -> MeteredService:
    """``client`` charging the ledger of ``params``' run, for the stage running now (or
    ``stage``), under the ``--max-usd`` cap this process was started with, if any."""
    run_dir = params.run_dir
    label = stage or current_stage(run_dir)
    ledger = Ledger(run_dir, params, label)
    atexit.register(ledger.flush_if_run_exists)
    cap = SpendCap.from_env(run_dir)
    guard = CapGuard(cap, run_dir, label, ledger.spent_usd) if cap is not None else None
    return MeteredService(client, ledger, guard, run_dir)


__all__ = [
    "MeteredFuture",
    "MeteredSamplingClient",
    "MeteredService",
    "MeteredTrainingClient",
    "metered_for",
]
