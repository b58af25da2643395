"""The local engine behind a simulated Tinker service clock: what a loop costs remotely.

The local engine answers every call as soon as it is made (training calls run eagerly,
sampling calls are batched on first demand), so running the pipeline locally says nothing
about what it would cost on the service, where a training step is paid in clock cycles and
sampling in round trips. `SimulatedService` wraps a `LocalServiceClient`: every call still goes
to the local engine, unchanged and in the order it is made (so every number a run computes is
the same), and the wrapper only keeps a clock of when each answer would be available on the
service. Tests assert on it (cycles per training step, sampling latencies); bench scripts
report it (``bench/service_pipelining.py``).

**Not a backend.** It lives in ``character_training.testing`` (shipped like ``numpy.testing``),
`backends.get_service_client` does not know it and no run parameter can select it; tests and
benches build it around a local service client they made themselves.

The model of time (after Tinker's documentation of its clock cycles, simplified):

* **Clock.** With ``time_scale=0`` (the default) time is virtual: a number that only
  ``.result()`` advances, to the completion time of the request asked for; nothing sleeps,
  so tests run at the local engine's speed. One thread drives it. With ``time_scale > 0``
  virtual time is real time divided by ``time_scale`` and ``.result()`` sleeps the scaled
  wait, so chains running in threads on one service overlap in wall time; the local engine's
  own compute then counts as client-side time too, and a request sent on reading a result
  arrives just after the cycle boundary and misses that cycle, as on the service.
* **Training.** The service works in clock cycles of ``cycle_s``: cycle k spans
  ``[k * cycle_s, (k + 1) * cycle_s)``. Per training client a cycle runs at most one model pass
  (``forward``, ``forward_backward``, or one half of ``forward_backward_custom``) and then at
  most one ``optim_step``. Requests run in submission order; a pass joins the first cycle that
  begins at or after its submission and after the client's earlier work, and an
  ``optim_step`` joins its pass's cycle when it was submitted before that cycle began,
  otherwise the next cycle that begins after its submission. Results are available at the end
  of the cycle. So a loop that reads ``forward_backward``'s result before submitting
  ``optim_step`` pays 2 cycles per step, and one that submits both back to back pays 1 (with
  a client delay, only if it also submits the next step before reading: see below).
  ``forward_backward_custom`` with a Python loss is two passes, as
  in the SDK (a forward, the loss computed client-side, then a backward with the surrogate),
  so 2 cycles however it is pipelined; a `LossHandle` the service runs (``loss_id`` set) is
  one pass. An ``optim_step`` with no ``forward_backward`` since the previous one fails at the
  call with `BackendError`: on the service Adam's moments would still move the weights, while
  the local engine skips parameters without a gradient, so the two would silently differ.
  Checkpoint calls (``save_state``, ``save_weights_for_sampler``, ``load_state``...) run after
  the client's earlier work, take ``save_s`` and use no cycle; later passes wait for them.
* **Sampling.** ``sampling_slots`` requests (``sample`` or ``compute_logprobs``, any sampling
  client of this service) run at once, first come first served; the rest queue. A ``sample``
  takes ``sample_latency_s + sample_token_s * max_tokens``: the token budget, not the reply's
  length, because a request's slot time is fixed when it is submitted (asking the local engine
  for the reply early would change how it batches). ``compute_logprobs`` takes
  ``logprob_latency_s`` (default: ``sample_latency_s``).
* **Client delay.** ``arrival_delay_s`` (default 0) is the time from a call to the request
  reaching the service (network, client-side work). With it, a request sent on reading an
  answer misses the cycle that begins at that answer: a loop that submits ``forward_backward``
  and ``optim_step`` back to back but the next step only after reading pays 2 cycles a step,
  one that waits for ``forward_backward`` before ``optim_step`` pays 4, and one that enqueues
  the next step before reading (`training.run_training`) still pays 1.
* **Faults.** A checkpoint path passed to ``expired_paths`` or `SimulatedService.expire`, or
  saved with ``ttl_seconds`` that have passed in simulated time, answers
  ``tinker.NotFoundError`` when a client is created from it or it is loaded, as the service
  answers for a deleted checkpoint (the local files stay).

`SimulatedService.report` gives the counters: per training client the optimiser steps, passes,
cycles used and spanned and cycles per step; the sampling requests, their largest concurrency
and queueing; the simulated wall time. `SimulatedService.events` lists every timed request.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import os
import threading
import time
import warnings
from collections.abc import Iterable
from concurrent.futures import Future as ConcurrentFuture
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import httpx
import tinker
from tinker import LossHandle
from tinker.lib.public_interfaces.api_future import APIFuture

from ..errors import BackendError, ConfigError

T = TypeVar("T")
_EPS = 1e-9  # virtual times closer than this are the same instant
_UNSET = object()

_TIMED_TRAINING = frozenset(
    "forward forward_backward forward_backward_custom optim_step save_state "
    "save_weights_for_sampler load_state load_state_with_optimizer "
    "save_weights_and_get_sampling_client create_sampling_client".split()
)
_TIMED_SAMPLING = frozenset({"sample", "compute_logprobs"})
_TIMED_SERVICE = frozenset(
    "create_lora_training_client create_training_client_from_state "
    "create_training_client_from_state_with_optimizer create_sampling_client".split()
)


# -- clock and futures ---------------------------------------------------------------------------
class SimulatedClock:
    """Virtual seconds since the service was made: counted (``time_scale=0``) or real seconds
    divided by ``time_scale``."""

    def __init__(self, time_scale: float = 0.0):
        if not time_scale >= 0:
            raise ConfigError(f"time_scale={time_scale!r}: expected >= 0 (0 = virtual time)")
        self.time_scale = float(time_scale)
        self._origin = time.monotonic()
        self._now = 0.0
        self._lock = threading.Lock()

    @property
    def virtual(self) -> bool:
        return self.time_scale == 0.0

    def now(self) -> float:
        if self.virtual:
            return self._now
        return (time.monotonic() - self._origin) / self.time_scale

    def delay_until(self, moment: float) -> float:
        """Real seconds to sleep until virtual time ``moment``; in virtual time, advance the
        clock to it and return 0."""
        if self.virtual:
            with self._lock:
                self._now = max(self._now, moment)
            return 0.0
        return max(0.0, (moment - self.now()) * self.time_scale)

    def wait_until(self, moment: float) -> None:
        delay = self.delay_until(moment)
        if delay > 0:
            time.sleep(delay)


class SimulatedFuture(APIFuture[T], Generic[T]):
    """A request's answer from the local engine, handed over at its simulated completion time.

    ``result()`` advances the caller's clock to ``done_at`` (sleeping the scaled wait in scaled
    time); its ``timeout`` is ignored. An ``error`` is raised instead of any value (a simulated
    service failure, such as an expired checkpoint).
    """

    def __init__(
        self,
        clock: SimulatedClock,
        done_at: float,
        inner: APIFuture[T] | None = None,
        value: Any = _UNSET,
        error: BaseException | None = None,
    ):
        self._clock = clock
        self.done_at = done_at
        self._inner = inner
        self._value = value
        self._error = error

    def done(self) -> bool:
        return self._error is not None or self._clock.now() >= self.done_at - _EPS

    def _answer(self) -> T:
        if self._error is not None:
            raise self._error
        if self._inner is not None:
            return self._inner.result()
        return self._value  # type: ignore[return-value]

    def result(self, timeout: float | None = None) -> T:
        value = self._answer()
        self._clock.wait_until(self.done_at)
        return value

    async def result_async(self, timeout: float | None = None) -> T:
        await asyncio.sleep(0)  # let sibling coroutines submit first, as the local futures do
        value = self._answer()
        delay = self._clock.delay_until(self.done_at)
        if delay > 0:
            await asyncio.sleep(delay)
        return value

    def future(self) -> ConcurrentFuture[T]:
        concurrent: ConcurrentFuture[T] = ConcurrentFuture()
        try:
            concurrent.set_result(self.result())
        except BaseException as exc:
            concurrent.set_exception(exc)
        return concurrent


class _SimulatedClientFuture(SimulatedFuture[T]):
    """What the ``create_*`` methods return: a future of a wrapped client that can still be
    used, with the SDK's `FutureWarning`, as the client itself."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or "_clock" not in vars(self):
            raise AttributeError(name)
        if not name.startswith("_"):
            warnings.warn(
                "Using the future as the client is deprecated (as in the Tinker SDK); call "
                ".result() on it, or await it, to get the client first",
                FutureWarning,
                stacklevel=2,
            )
        return getattr(self.result(), name)


@dataclass(frozen=True)
class SimulatedEvent:
    """One timed request: ``submitted`` is when it reached the service, ``cycle`` the training
    cycle it ran in (None for checkpoints and sampling); times are virtual seconds."""

    client: str
    op: str
    submitted: float
    start: float
    done: float
    cycle: int | None = None


@dataclass
class _TrainingState:
    label: str
    steps: int = 0
    passes: int = 0
    cycles: set[int] = field(default_factory=set)
    last_cycle: int = -1
    not_before: float = 0.0  # end of the client's last checkpoint call
    gradient_pending: bool = False


def _normal_path(path: Any) -> str:
    text = str(path)
    return text if "://" in text else os.path.normpath(os.path.abspath(text))


def _not_found(path: Any) -> tinker.NotFoundError:
    request = httpx.Request("GET", "https://simulated-service.invalid/checkpoints")
    return tinker.NotFoundError(
        f"checkpoint {path} not found (expired on the simulated service)",
        response=httpx.Response(404, request=request),
        body=None,
    )


def _inner_attribute(wrapper: Any, name: str, timed: frozenset[str]) -> Any:
    """What a simulated wrapper does not time is its inner local object's own attribute; the
    async twin of a timed method is refused (it would run untimed)."""
    if name.startswith("__") or "_inner" not in vars(wrapper):
        raise AttributeError(name)
    if name.endswith("_async") and name.removesuffix("_async") in timed:
        raise AttributeError(
            f"{type(wrapper).__name__}.{name}: the simulated service times only the methods "
            f"that return futures; call {name.removesuffix('_async')}(...) and await its future"
        )
    return getattr(wrapper._inner, name)


# -- the service ---------------------------------------------------------------------------------
class SimulatedService:
    """A local service client whose clients answer on a simulated service clock.

    Settings (virtual seconds): ``cycle_s`` the training clock cycle; ``sampling_slots``
    concurrent sampling requests; ``sample_latency_s`` per ``sample`` request, plus
    ``sample_token_s`` per token of its ``max_tokens``; ``logprob_latency_s`` per
    ``compute_logprobs`` request (default ``sample_latency_s``); ``save_s`` per checkpoint
    call; ``time_scale`` real seconds per virtual second (0: virtual time, nothing sleeps);
    ``arrival_delay_s`` from a call to its request reaching the service; ``expired_paths``
    checkpoints that answer "not found". See the module docstring.
    """

    def __init__(
        self,
        local_service_client: Any,
        *,
        cycle_s: float = 10.0,
        sampling_slots: int = 32,
        sample_latency_s: float = 5.0,
        sample_token_s: float = 0.0,
        logprob_latency_s: float | None = None,
        save_s: float = 0.0,
        arrival_delay_s: float = 0.0,
        time_scale: float = 0.0,
        expired_paths: Iterable[str] = (),
    ):
        if not cycle_s > 0:
            raise ConfigError(f"cycle_s={cycle_s!r}: expected > 0")
        if not isinstance(sampling_slots, int) or sampling_slots < 1:
            raise ConfigError(f"sampling_slots={sampling_slots!r}: expected an integer >= 1")
        for name, value in (
            ("sample_latency_s", sample_latency_s),
            ("sample_token_s", sample_token_s),
            ("logprob_latency_s", logprob_latency_s if logprob_latency_s is not None else 0.0),
            ("save_s", save_s),
            ("arrival_delay_s", arrival_delay_s),
        ):
            if not value >= 0:
                raise ConfigError(f"{name}={value!r}: expected >= 0")
        self._inner = local_service_client
        self.clock = SimulatedClock(time_scale)
        self.cycle_s = float(cycle_s)
        self.sampling_slots = sampling_slots
        self.sample_latency_s = float(sample_latency_s)
        self.sample_token_s = float(sample_token_s)
        self.logprob_latency_s = (
            float(logprob_latency_s) if logprob_latency_s is not None else self.sample_latency_s
        )
        self.save_s = float(save_s)
        self.arrival_delay_s = float(arrival_delay_s)
        self.events: list[SimulatedEvent] = []
        self._lock = threading.Lock()
        self._labels = itertools.count(1)
        self._training: dict[str, _TrainingState] = {}
        self._slots = [0.0] * sampling_slots  # when each slot frees up (a heap)
        self._running: list[float] = []  # completion times of started requests (a heap)
        self._sampling = {
            "requests": 0,
            "sample_requests": 0,
            "logprob_requests": 0,
            "samples": 0,
            "max_concurrency": 0,
            "queue_wait_s": 0.0,
            "busy_until_s": 0.0,
        }
        self._expired = {_normal_path(p) for p in expired_paths}
        self._expires_at: dict[str, float] = {}

    # -- what tests and benches read ----------------------------------------------------------
    @property
    def local(self) -> Any:
        """The wrapped local service client."""
        return self._inner

    def now(self) -> float:
        """Virtual seconds since this service was made."""
        return self.clock.now()

    def _arrival(self) -> float:
        """When a request made now reaches the service."""
        return self.clock.now() + self.arrival_delay_s

    def expire(self, path: str) -> None:
        """From now on, ``path`` answers "not found" (a checkpoint the service deleted)."""
        with self._lock:
            self._expired.add(_normal_path(path))

    def training_report(self, label: str) -> dict[str, Any]:
        """One training client's counters; ``span_cycles`` runs from its first busy cycle to
        its last, and ``cycles_per_step`` divides it by the optimiser steps."""
        with self._lock:
            state = self._training[label]
            used = sorted(state.cycles)
            span = used[-1] - used[0] + 1 if used else 0
            return {
                "steps": state.steps,
                "passes": state.passes,
                "cycles": len(used),
                "first_cycle": used[0] if used else None,
                "last_cycle": used[-1] if used else None,
                "span_cycles": span,
                "cycles_per_step": span / state.steps if state.steps else None,
            }

    def report(self) -> dict[str, Any]:
        """Every counter, JSON-ready: settings, wall time, training per client, sampling."""
        training = {label: self.training_report(label) for label in list(self._training)}
        now = self.now()
        with self._lock:
            sampling = dict(self._sampling)
        return {
            "settings": {
                "cycle_s": self.cycle_s,
                "sampling_slots": self.sampling_slots,
                "sample_latency_s": self.sample_latency_s,
                "sample_token_s": self.sample_token_s,
                "logprob_latency_s": self.logprob_latency_s,
                "save_s": self.save_s,
                "arrival_delay_s": self.arrival_delay_s,
                "time_scale": self.clock.time_scale,
            },
            "wall_s": now,
            "wall_cycles": now / self.cycle_s,
            "steps": sum(r["steps"] for r in training.values()),
            "cycles": sum(r["cycles"] for r in training.values()),
            "training": training,
            "sampling": sampling,
        }

    # -- scheduling (the wrappers call these) ---------------------------------------------------
    def _new_training_state(self) -> _TrainingState:
        with self._lock:
            state = _TrainingState(f"training-{next(self._labels)}")
            self._training[state.label] = state
            return state

    def _first_cycle_from(self, moment: float) -> int:
        """The first cycle that begins at or after ``moment``."""
        return max(0, math.ceil(moment / self.cycle_s - _EPS))

    def _cycle_event(self, state: _TrainingState, op: str, submitted: float, cycle: int) -> float:
        state.cycles.add(cycle)
        state.last_cycle = cycle
        start, done = cycle * self.cycle_s, (cycle + 1) * self.cycle_s
        self.events.append(SimulatedEvent(state.label, op, submitted, start, done, cycle))
        return done

    def _schedule_passes(
        self, state: _TrainingState, submitted: float, ops: list[str], gradient: bool
    ) -> float:
        """Model passes in order, each in the first free cycle after the previous one's answer
        (the second half of a custom loss is sent when the first half's answer arrives)."""
        with self._lock:
            done = submitted
            for op in ops:
                earliest = self._first_cycle_from(max(submitted, done, state.not_before))
                cycle = max(earliest, state.last_cycle + 1)
                state.passes += 1
                done = self._cycle_event(state, op, submitted, cycle)
                submitted = done
            state.gradient_pending = state.gradient_pending or gradient
            return done

    def _check_gradient(self, state: _TrainingState) -> None:
        if not state.gradient_pending:
            raise BackendError(
                f"optim_step on {state.label}: no forward_backward since the last optim_step; "
                "the service would still move the weights (Adam's moments) where the local "
                "engine skips the step, so the simulated service refuses it. Submit "
                "forward_backward first"
            )

    def _schedule_optim(self, state: _TrainingState, submitted: float) -> float:
        """In the cycle of the pass it follows, if submitted before that cycle began."""
        with self._lock:
            earliest = self._first_cycle_from(max(submitted, state.not_before))
            cycle = max(earliest, state.last_cycle)
            state.steps += 1
            state.gradient_pending = False
            return self._cycle_event(state, "optim_step", submitted, cycle)

    def _schedule_checkpoint(self, state: _TrainingState, submitted: float, op: str) -> float:
        with self._lock:
            after_cycles = (state.last_cycle + 1) * self.cycle_s
            start = max(submitted, state.not_before, after_cycles)
            done = start + self.save_s
            state.not_before = done
            self.events.append(SimulatedEvent(state.label, op, submitted, start, done))
            return done

    def _schedule_sampling(self, op: str, duration: float, samples: int) -> float:
        """First come, first served over the slots; returns the completion time."""
        with self._lock:
            submitted = self._arrival()
            start = max(submitted, heapq.heappop(self._slots))
            done = start + duration
            heapq.heappush(self._slots, done)
            while self._running and self._running[0] <= start + _EPS:
                heapq.heappop(self._running)
            heapq.heappush(self._running, done)
            counters = self._sampling
            counters["requests"] += 1
            counters["sample_requests" if op == "sample" else "logprob_requests"] += 1
            counters["samples"] += samples
            counters["max_concurrency"] = max(counters["max_concurrency"], len(self._running))
            counters["queue_wait_s"] += start - submitted
            counters["busy_until_s"] = max(counters["busy_until_s"], done)
            self.events.append(SimulatedEvent("sampling", op, submitted, start, done))
            return done

    def _missing(self, path: Any) -> BaseException | None:
        """``tinker.NotFoundError`` for an expired checkpoint, else None."""
        key = _normal_path(path)
        with self._lock:
            gone = key in self._expired or self._expires_at.get(key, math.inf) <= self.now()
        return _not_found(path) if gone else None

    def _record_ttl(self, path: Any, ttl_seconds: float | None, saved_at: float) -> None:
        if ttl_seconds is not None:
            with self._lock:
                self._expires_at[_normal_path(path)] = saved_at + float(ttl_seconds)

    def _client_future(self, client: Any, done_at: float | None = None) -> Any:
        return _SimulatedClientFuture(
            self.clock, self.now() if done_at is None else done_at, value=client
        )

    def _failed_future(self, error: BaseException) -> Any:
        return _SimulatedClientFuture(self.clock, self.now(), error=error)

    def _training_client(self, local_future: Any) -> Any:
        client = SimulatedTrainingClient(self, local_future.result(), self._new_training_state())
        return self._client_future(client)

    # -- the ServiceClient surface --------------------------------------------------------------
    def create_lora_training_client(self, *args: Any, **kwargs: Any) -> Any:
        return self._training_client(self._inner.create_lora_training_client(*args, **kwargs))

    def _from_state(self, op: str, path: str, *args: Any, **kwargs: Any) -> Any:
        """A training client resumed from ``path`` by the inner service's ``op``; a failed
        future where the simulated store has no (or no longer) such checkpoint."""
        error = self._missing(path)
        if error is not None:
            return self._failed_future(error)
        return self._training_client(getattr(self._inner, op)(path, *args, **kwargs))

    def create_training_client_from_state(self, path: str, *args: Any, **kwargs: Any) -> Any:
        return self._from_state("create_training_client_from_state", path, *args, **kwargs)

    def create_training_client_from_state_with_optimizer(
        self, path: str, *args: Any, **kwargs: Any
    ) -> Any:
        return self._from_state(
            "create_training_client_from_state_with_optimizer", path, *args, **kwargs
        )

    def create_sampling_client(
        self, model_path: str | None = None, base_model: str | None = None, **kwargs: Any
    ) -> Any:
        error = self._missing(model_path) if model_path is not None else None
        if error is not None:
            return self._failed_future(error)
        local = self._inner.create_sampling_client(
            model_path=model_path, base_model=base_model, **kwargs
        )
        return self._client_future(SimulatedSamplingClient(self, local.result()))

    def __getattr__(self, name: str) -> Any:
        return _inner_attribute(self, name, _TIMED_SERVICE)

    def __enter__(self) -> SimulatedService:
        self._inner.__enter__()
        return self

    def __exit__(self, exc_type, exc_value, traceback) -> None:
        self._inner.__exit__(exc_type, exc_value, traceback)


# -- the clients ---------------------------------------------------------------------------------
class SimulatedTrainingClient:
    """A local training client whose calls answer on the service's cycles (see the module
    docstring); anything not timed is the local client's own attribute."""

    def __init__(self, service: SimulatedService, inner: Any, state: _TrainingState):
        self._service = service
        self._inner = inner
        self._state = state
        self.label = state.label

    def stats(self) -> dict[str, Any]:
        """This client's counters (`SimulatedService.training_report`)."""
        return self._service.training_report(self.label)

    def _future(self, done_at: float, inner: Any) -> SimulatedFuture:
        return SimulatedFuture(self._service.clock, done_at, inner)

    def get_tokenizer(self) -> Any:
        return self._inner.get_tokenizer()

    def get_info(self) -> Any:
        return self._inner.get_info()

    # -- passes and steps -----------------------------------------------------------------------
    def _pass(self, op: str, backward: bool, *args: Any, **kwargs: Any) -> SimulatedFuture:
        """One built-in pass (``forward`` or ``forward_backward``), run by the inner client now
        and answered when the simulated service has scheduled it."""
        submitted = self._service._arrival()
        local = getattr(self._inner, op)(*args, **kwargs)
        done = self._service._schedule_passes(self._state, submitted, [op], backward)
        return self._future(done, local)

    def forward(self, *args: Any, **kwargs: Any) -> SimulatedFuture:
        return self._pass("forward", False, *args, **kwargs)

    def forward_backward(self, *args: Any, **kwargs: Any) -> SimulatedFuture:
        return self._pass("forward_backward", True, *args, **kwargs)

    def forward_backward_custom(self, data: Any, loss_fn: Any, **kwargs: Any) -> SimulatedFuture:
        """Two passes for a client-side loss (forward, then the surrogate's backward once the
        loss is computed), one for a `LossHandle` the service runs itself."""
        submitted = self._service._arrival()
        local = self._inner.forward_backward_custom(data, loss_fn, **kwargs)
        if isinstance(loss_fn, LossHandle) and loss_fn.loss_id is not None:
            ops = ["forward_backward_custom"]
        else:
            ops = ["forward_backward_custom:forward", "forward_backward_custom:backward"]
        done = self._service._schedule_passes(self._state, submitted, ops, True)
        return self._future(done, local)

    def optim_step(self, *args: Any, **kwargs: Any) -> SimulatedFuture:
        submitted = self._service._arrival()
        self._service._check_gradient(self._state)
        local = self._inner.optim_step(*args, **kwargs)
        return self._future(self._service._schedule_optim(self._state, submitted), local)

    # -- checkpoints ----------------------------------------------------------------------------
    def _checkpoint(self, op: str, local: Any, submitted: float) -> SimulatedFuture:
        return self._future(self._service._schedule_checkpoint(self._state, submitted, op), local)

    def _save(self, op: str, name: str, ttl_seconds: int | None, **kwargs: Any) -> SimulatedFuture:
        """Save through the inner client now; the simulated checkpoint finishes later, and the
        saved path expires ``ttl_seconds`` after that."""
        submitted = self._service._arrival()
        local = getattr(self._inner, op)(name, ttl_seconds=ttl_seconds, **kwargs)
        future = self._checkpoint(op, local, submitted)
        self._service._record_ttl(local.result().path, ttl_seconds, future.done_at)
        return future

    def save_state(
        self, name: str, ttl_seconds: int | None = None, **kwargs: Any
    ) -> SimulatedFuture:
        return self._save("save_state", name, ttl_seconds, **kwargs)

    def save_weights_for_sampler(
        self, name: str, ttl_seconds: int | None = None, **kwargs: Any
    ) -> SimulatedFuture:
        return self._save("save_weights_for_sampler", name, ttl_seconds, **kwargs)

    def _load(self, op: str, path: str, *args: Any, **kwargs: Any) -> SimulatedFuture:
        submitted = self._service._arrival()
        error = self._service._missing(path)
        if error is not None:
            return SimulatedFuture(self._service.clock, submitted, error=error)
        local = getattr(self._inner, op)(path, *args, **kwargs)
        return self._checkpoint(op, local, submitted)

    def load_state(self, path: str, *args: Any, **kwargs: Any) -> SimulatedFuture:
        return self._load("load_state", path, *args, **kwargs)

    def load_state_with_optimizer(self, path: str, *args: Any, **kwargs: Any) -> SimulatedFuture:
        return self._load("load_state_with_optimizer", path, *args, **kwargs)

    # -- sampling clients -----------------------------------------------------------------------
    def save_weights_and_get_sampling_client(self, *args: Any, **kwargs: Any) -> Any:
        """A future of a sampling client, ready once the snapshot is saved."""
        submitted = self._service._arrival()
        local = self._inner.save_weights_and_get_sampling_client(*args, **kwargs).result()
        done = self._service._schedule_checkpoint(
            self._state, submitted, "save_weights_and_get_sampling_client"
        )
        return self._service._client_future(SimulatedSamplingClient(self._service, local), done)

    def create_sampling_client(self, model_path: str, *args: Any, **kwargs: Any) -> Any:
        error = self._service._missing(model_path)
        if error is not None:
            return self._service._failed_future(error)
        local = self._inner.create_sampling_client(model_path, *args, **kwargs).result()
        return self._service._client_future(SimulatedSamplingClient(self._service, local))

    def __getattr__(self, name: str) -> Any:
        return _inner_attribute(self, name, _TIMED_TRAINING)


class SimulatedSamplingClient:
    """A local sampling client whose requests queue for the service's sampling slots; the local
    engine still batches them as it always does (lazily, on first demand)."""

    def __init__(self, service: SimulatedService, inner: Any):
        self._service = service
        self._inner = inner

    def get_tokenizer(self) -> Any:
        return self._inner.get_tokenizer()

    def get_base_model(self) -> str:
        return self._inner.get_base_model()

    def sample(
        self, prompt: Any, num_samples: int, sampling_params: Any, *args: Any, **kwargs: Any
    ) -> SimulatedFuture:
        local = self._inner.sample(prompt, num_samples, sampling_params, *args, **kwargs)
        budget = getattr(sampling_params, "max_tokens", None) or 0
        service = self._service
        duration = service.sample_latency_s + service.sample_token_s * budget
        done = service._schedule_sampling("sample", duration, num_samples)
        return SimulatedFuture(service.clock, done, local)

    def compute_logprobs(self, prompt: Any, *args: Any, **kwargs: Any) -> SimulatedFuture:
        local = self._inner.compute_logprobs(prompt, *args, **kwargs)
        service = self._service
        done = service._schedule_sampling("compute_logprobs", service.logprob_latency_s, 0)
        return SimulatedFuture(service.clock, done, local)

    def __getattr__(self, name: str) -> Any:
        return _inner_attribute(self, name, _TIMED_SAMPLING)
