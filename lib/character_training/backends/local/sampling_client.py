"""Sampling client with the Tinker `SamplingClient` contract, run in-process.

A sampling client is a frozen snapshot: the shared base model in the engine's compute dtype
plus the checkpoint's LoRA adapter (if any), applied unmerged with an fp32 low-rank path so a
bf16 snapshot keeps the whole update (`adapters`); later training never changes what an
existing client samples. Calls are queued and resolved lazily in batches: issue all
your ``sample()`` / ``compute_logprobs()`` calls first, then collect the results, exactly as
with the remote service, and the engine batches them.

Stop semantics (as on Tinker): ``stop=None`` stops at the tokenizer's end-of-sequence token;
a list of strings or token ids replaces that default; ``[]`` disables stopping. The returned
tokens include the stop token (or the tokens that complete a stop string).

The public methods take the SDK's exact parameters: ``sample`` and ``compute_logprobs``
return futures, their deprecated ``*_async`` twins return values, and the options the local
engine cannot honour (top-k log-probabilities of sampled tokens, alternative prompt tokens,
sampler handles) fail in one line instead of being ignored. The twins, the deprecations and
the checks that need only the argument come from the SDK class (`sdk_surface.follows_sdk`).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import tinker
import torch
from tinker import types
from tinker.lib.api_future_impl import QueueState
from tinker.lib.public_interfaces.api_future import APIFuture
from tinker.types.topk_logprobs import MASK_LOGPROB, TopkLogprobs

from ...errors import BackendError
from .adapters import load_adapter, with_adapter
from .engine import LocalEngine, read_checkpoint_meta, release_free_memory
from .forward import logprobs_with_alternatives, micro_batches
from .futures import LocalClientFuture, LocalFuture
from .generation import BatchedSampler, GenerationRequest
from .scoring import score_inputs
from .sdk_surface import follows_sdk, no_telemetry

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizer

logger = logging.getLogger(__name__)

_sequence_ids = itertools.count()
_QUEUE_LOG_INTERVAL = 60.0  # seconds between "sampling is paused" warnings, as in the SDK


class LocalSamplingClientFuture(LocalClientFuture["LocalSamplingClient"]):
    """What ``create_sampling_client`` and friends return (SDK: a sampling client future)."""

    _client_kind = "SamplingClient"


@follows_sdk(
    tinker.SamplingClient,
    tinker_only={
        "get_sampler_handle": (
            "a handle names a sampler session on the service; pass the local client itself"
        ),
        "from_sampler_handle": "a handle names a sampler session on the service",
        "create": (
            "it takes the SDK's session holder; use LocalServiceClient.create_sampling_client()"
        ),
    },
)
class LocalSamplingClient:
    """Generates from, and scores with, one frozen model."""

    _queue_state_logged_at = float("-inf")  # last "sampling is paused" warning (monotonic s)

    def __init__(
        self,
        engine: LocalEngine,
        base_model: str,
        model: torch.nn.Module,
        model_path: str | None = None,
    ):
        self.engine = engine
        self.base_model = base_model
        self.model_path = model_path
        self.model = model
        self._tokenizer = engine.tokenizer(base_model)
        self._sampler = BatchedSampler(
            model,
            self._tokenizer,
            engine.device,
            engine.config.max_batch_size,
            cache_bytes=engine.config.kv_cache_mb * 2**20,
            prefixes=engine.prefixes,
            counters=engine.counters["sampling"],
        )
        self._pending_samples: list[tuple[GenerationRequest, bool, LocalFuture]] = []
        self._pending_scores: list[tuple[list[int], int, LocalFuture]] = []
        self._context = int(getattr(model.config, "max_position_embeddings", 1 << 30))

    @classmethod
    def from_base(cls, engine: LocalEngine, base_model: str) -> "LocalSamplingClient":
        return cls(engine, base_model, engine.sampling_base(base_model))

    @classmethod
    def from_checkpoint(cls, engine: LocalEngine, path: str) -> "LocalSamplingClient":
        """The shared frozen base plus the checkpoint's LoRA adapter, applied unmerged.

        Merging the adapter into bf16 weights would round most of a small update away (see
        `adapters`); the low-rank path runs in fp32 next to the base instead.
        """
        meta = read_checkpoint_meta(path)
        adapter = Path(path) / "adapter"
        if not adapter.is_dir():
            raise BackendError(f"checkpoint {path} has no adapter directory")
        base = engine.sampling_base(meta["base_model"])
        model = with_adapter(base, load_adapter(adapter, engine.device))
        return cls(engine, meta["base_model"], model, model_path=str(path))

    def get_tokenizer(self) -> PreTrainedTokenizer:
        return self._tokenizer

    def get_base_model(self) -> str:
        return self.base_model

    get_telemetry = no_telemetry

    def on_queue_state_change(
        self, queue_state: QueueState, queue_state_reason: str | None
    ) -> None:
        """Log a paused queue, as the SDK's observer does (at most once a minute).

        The local engine has no queue and never calls this itself; it exists so code that
        forwards queue states to a sampling client works against both backends.
        """
        if queue_state == QueueState.ACTIVE:
            return
        now = time.monotonic()
        if now - self._queue_state_logged_at < _QUEUE_LOG_INTERVAL:
            return
        self._queue_state_logged_at = now
        logger.warning(
            "sampling is paused for %s: %s",
            self.model_path or self.base_model,
            queue_state_reason or queue_state.name.lower(),
        )

    # -- sampling -----------------------------------------------------------------------------
    def _normalise(
        self, prompt: types.ModelInput, num_samples: int, params: types.SamplingParams
    ) -> GenerationRequest:
        tokens = tuple(prompt.to_ints())
        if not tokens:
            raise BackendError("sample: the prompt is empty")
        if not isinstance(num_samples, int) or num_samples < 1:
            raise BackendError(f"sample: num_samples={num_samples!r}, expected an integer >= 1")
        max_tokens = params.max_tokens if params.max_tokens is not None else 512
        if max_tokens < 1:
            raise BackendError(f"sample: max_tokens={max_tokens}, expected >= 1")
        if len(tokens) + max_tokens > self._context:
            raise BackendError(
                f"sample: prompt ({len(tokens)} tokens) + max_tokens ({max_tokens}) exceeds the "
                f"model context of {self._context} tokens"
            )
        if params.temperature < 0 or not 0 < params.top_p <= 1:
            raise BackendError(
                f"sample: temperature={params.temperature} must be >= 0 and top_p={params.top_p} "
                "in (0, 1]"
            )
        stop = params.stop
        stop_ids: set[int] = set()
        stop_strings: tuple[str, ...] = ()
        if stop is None:
            stop_ids = {int(self._tokenizer.eos_token_id)}
        elif isinstance(stop, str):
            stop_strings = (stop,)
        else:
            items = list(stop)
            if all(isinstance(s, str) for s in items):
                stop_strings = tuple(items)
            elif all(isinstance(s, int) for s in items):
                stop_ids = set(items)
            else:
                raise BackendError("sample: stop must be strings or token ids, not a mixture")
        return GenerationRequest(
            prompt=tokens,
            num_samples=num_samples,
            max_tokens=int(max_tokens),
            temperature=float(params.temperature),
            top_p=float(params.top_p),
            top_k=int(params.top_k),
            seed=params.seed,
            stop_token_ids=frozenset(stop_ids),
            stop_strings=stop_strings,
        )

    def sample(
        self,
        prompt: types.ModelInput,
        num_samples: int,
        sampling_params: types.SamplingParams,
        include_prompt_logprobs: bool = False,
        topk_prompt_logprobs: int = 0,
        topk_sample_logprobs: int = 0,
        target_prompt_logprobs: types.TensorData | None = None,
        prompt_alt_tokens_k: int = 0,
        prompt_logprobs_last_n: int | None = None,
    ) -> APIFuture[types.SampleResponse]:
        """Queue a generation request; the engine batches every queued request on first demand.

        Prompt-side options follow the SDK: ``include_prompt_logprobs`` (with
        ``prompt_logprobs_last_n`` scoring only the last N tokens), ``topk_prompt_logprobs``
        (the k most likely tokens at each prompt position) and ``target_prompt_logprobs``
        (dense int64 ``[len(prompt) - 1, K]`` token ids, ``-1`` for unused cells). Two options
        fail in one line: ``topk_sample_logprobs`` (the decoder keeps only the sampled token's
        log-probability) and ``prompt_alt_tokens_k`` (both checked by `sdk_arguments`).
        """
        extras = self._prompt_options(
            prompt,
            include_prompt_logprobs,
            topk_prompt_logprobs,
            target_prompt_logprobs,
            prompt_logprobs_last_n,
        )
        request = self._normalise(prompt, num_samples, sampling_params)
        future: LocalFuture[types.SampleResponse] = LocalFuture()
        future._compute = self._resolve_samples_then(future)
        self._pending_samples.append((request, include_prompt_logprobs, future))
        if extras is None:
            return future
        return LocalFuture(
            lambda: self._add_prompt_options(future.result(), request.prompt, extras)
        )

    def _prompt_options(
        self,
        prompt: types.ModelInput,
        include_prompt_logprobs: bool,
        topk_prompt_logprobs: int,
        target_prompt_logprobs: types.TensorData | None,
        prompt_logprobs_last_n: int | None,
    ) -> _PromptOptions | None:
        """Check the prompt-side options of ``sample`` that depend on the prompt or the model
        as the SDK and service do; None when nothing beyond plain prompt log-probabilities is
        asked for."""
        length = prompt.length
        vocab = int(self.model.config.vocab_size)
        if topk_prompt_logprobs > vocab:
            raise BackendError(
                f"sample: topk_prompt_logprobs={topk_prompt_logprobs} exceeds the vocabulary "
                f"({vocab} tokens)"
            )
        _check_last_n("sample", prompt_logprobs_last_n, length)
        if prompt_logprobs_last_n is not None and not include_prompt_logprobs:
            raise BackendError(
                "sample: prompt_logprobs_last_n applies to prompt logprobs; set "
                "include_prompt_logprobs=True"
            )
        target = None
        if target_prompt_logprobs is not None:
            target = _target_ids(target_prompt_logprobs, length, vocab)
        if prompt_logprobs_last_n is None and not topk_prompt_logprobs and target is None:
            return None
        return _PromptOptions(prompt_logprobs_last_n, topk_prompt_logprobs, target)

    def _add_prompt_options(
        self, response: types.SampleResponse, prompt: Sequence[int], options: _PromptOptions
    ) -> types.SampleResponse:
        """``response`` with the prompt-side outputs ``options`` asks for (one extra forward
        pass over the prompt when top-k or target log-probabilities are wanted)."""
        length = len(prompt)
        first_scored = 1 if options.last_n is None else length - options.last_n
        changes: dict[str, object] = {}
        if options.last_n is not None and response.prompt_logprobs_np is not None:
            masked = response.prompt_logprobs_np.copy()
            masked[:first_scored] = np.nan
            changes["prompt_logprobs_np"] = masked
        if options.topk or options.target is not None:
            distribution = self._prompt_distribution(prompt)  # row i scores prompt[i + 1]
            if options.topk:
                values, ids = distribution.topk(options.topk, dim=-1)
                token_ids = np.zeros((length, options.topk), dtype=np.int32)
                logprobs = np.full((length, options.topk), MASK_LOGPROB, dtype=np.float32)
                token_ids[first_scored:] = ids[first_scored - 1 :].numpy()
                logprobs[first_scored:] = values[first_scored - 1 :].numpy()
                changes["topk_prompt_logprobs_np"] = TopkLogprobs(token_ids, logprobs)
            if options.target is not None:
                ids = torch.from_numpy(options.target)
                picked = distribution.gather(-1, ids.clamp(min=0))
                picked = torch.where(ids >= 0, picked, torch.zeros_like(picked))
                changes["target_prompt_logprobs"] = types.TensorData.from_numpy(
                    picked.numpy().astype(np.float32)
                )
        return dataclasses.replace(response, **changes)  # type: ignore[arg-type]

    def _prompt_distribution(self, prompt: Sequence[int]) -> torch.Tensor:
        """log p(. | prompt[:i + 1]) for i < len(prompt) - 1: float32 [len(prompt) - 1, vocab]."""
        ids = torch.tensor([list(prompt)], dtype=torch.long, device=self.engine.device)
        with torch.inference_mode():
            logits = self.model(input_ids=ids, use_cache=False).logits[0, :-1]
        return torch.log_softmax(logits.float(), dim=-1).cpu()

    def _resolve_samples_then(self, future):
        def compute():
            self.flush()
            if not future.done():
                raise RuntimeError("local sampler flushed but did not resolve this request")
            return future.result()

        return compute

    def flush(self) -> None:
        """Run every queued request now (samples first, then scores)."""
        try:
            self._flush()
        finally:
            release_free_memory()

    def _flush(self) -> None:
        if self._pending_samples:
            pending, self._pending_samples = self._pending_samples, []
            try:
                outputs = self._sampler.generate([req for req, _, _ in pending])
                prompts = [list(req.prompt) for req, want, _ in pending if want]
                prompt_lps = self._score_now(prompts, [1] * len(prompts))
            except BaseException as exc:
                for _, _, fut in pending:
                    fut.set_exception(exc)
                raise
            prompt_iter = iter(prompt_lps)
            for (_req, want, fut), seqs in zip(pending, outputs):
                fut.set_result(
                    types.SampleResponse(
                        sequences=[
                            types.SampledSequence(
                                stop_reason=s.stop_reason,  # type: ignore[arg-type]
                                sequence_id=f"local-{next(_sequence_ids)}",
                                tokens_np=np.asarray(s.tokens, dtype=np.int32),
                                logprobs_np=np.asarray(s.logprobs, dtype=np.float32),
                            )
                            for s in seqs
                        ],
                        prompt_logprobs_np=(
                            np.asarray(
                                [np.nan if v is None else v for v in next(prompt_iter)],
                                dtype=np.float32,
                            )
                            if want
                            else None
                        ),
                    )
                )
        if self._pending_scores:
            pending_scores, self._pending_scores = self._pending_scores, []
            try:
                results = self._score_now(
                    [tokens for tokens, _, _ in pending_scores],
                    [first for _, first, _ in pending_scores],
                )
            except BaseException as exc:
                for _, _, fut in pending_scores:
                    fut.set_exception(exc)
                raise
            for (_, _, fut), result in zip(pending_scores, results):
                fut.set_result(result)

    # -- scoring ------------------------------------------------------------------------------
    def compute_logprobs(
        self, prompt: types.ModelInput, prompt_logprobs_last_n: int | None = None
    ) -> APIFuture[list[float | None]]:
        """Log-probability of each prompt token given the ones before it; ``None`` first.

        With ``prompt_logprobs_last_n=N`` only the last N entries are scored and the earlier
        ones are ``None``, as on Tinker (which then serves the prefix from its cache; locally
        the prefix still runs through the model, but only the last N positions go through the
        unembedding, and the numbers are the same).
        """
        tokens = prompt.to_ints()
        if not tokens:
            raise BackendError("compute_logprobs: the prompt is empty")
        if len(tokens) > self._context:
            raise BackendError(
                f"compute_logprobs: {len(tokens)} tokens exceed the context of {self._context}"
            )
        _check_last_n("compute_logprobs", prompt_logprobs_last_n, len(tokens))
        future: LocalFuture[list[float | None]] = LocalFuture()
        future._compute = self._resolve_samples_then(future)
        first_scored = 1 if prompt_logprobs_last_n is None else len(tokens) - prompt_logprobs_last_n
        self._pending_scores.append((tokens, max(first_scored, 1), future))
        return future

    def _score_now(
        self, sequences: Sequence[list[int]], first_scored: Sequence[int]
    ) -> list[list[float | None]]:
        """Score every sequence from its ``first_scored`` position on (``None`` before).

        Token ``i``'s log-probability depends on tokens ``< i`` only, so a sequence is scored by
        a forward over all but its last token. Sequences with the same such prefix (the judge
        prompt followed by "A", then by "B") are grouped: one forward, and the last position's
        distribution gives each one's final token. On forced-choice judging that halves the
        work; Tinker reaches the same by caching prefixes.
        """
        if not sequences:
            return []
        out: list[list[float | None]] = [[None] for _ in sequences]
        shared: dict[tuple[int, ...], list[int]] = {}
        for idx, seq in enumerate(sequences):
            if len(seq) > 1:
                shared.setdefault(tuple(seq[:-1]), []).append(idx)
        if not shared:
            return out
        prefixes = list(shared)
        members = [shared[prefix] for prefix in prefixes]
        inputs = [list(prefix) for prefix in prefixes]
        targets = [inputs[k][1:] + [sequences[idx[0]][-1]] for k, idx in enumerate(members)]
        alternatives = [[sequences[i][-1] for i in idx] for idx in members]
        # input position j predicts token j + 1: scoring from token f starts at position f - 1
        starts = [min(first_scored[i] for i in idx) - 1 for idx in members]
        pad = int(self._tokenizer.pad_token_id)
        budget = self.engine.config.micro_batch_tokens
        counters = self.engine.counters["scoring"]
        counters.requested += sum(len(seq) - 1 for seq in sequences if len(seq) > 1)
        with torch.inference_mode():
            fast = self._sampler.fast
            if fast is not None:
                # inputs sharing a prefix run it once (`prefix_cache`, `scoring`)
                reuse = self._sampler.resolve_prefixes(
                    inputs,
                    [min(s, len(x) - 1) for s, x in zip(starts, inputs)],
                    fast.act_dtype,
                    counters,
                )
                scored = score_inputs(
                    fast,
                    inputs,
                    targets,
                    alternatives,
                    starts,
                    reuse,
                    pad_id=pad,
                    token_budget=budget,
                    counters=counters,
                )
                batches = [(list(range(len(inputs))), scored)]
            else:
                batches = []
                for group in micro_batches([len(x) for x in inputs], budget):
                    batches.append(
                        (group, self._score_hf(group, inputs, targets, alternatives, starts))
                    )
                    counters.computed += sum(len(inputs[k]) for k in group)
            for group, scored in batches:
                for k, (logprobs, last) in zip(group, scored):
                    head = [None] * (starts[k] + 1) + [float(v) for v in logprobs[:-1].tolist()]
                    for idx, value in zip(members[k], last.tolist()):
                        first = first_scored[idx]  # None before this sequence's own start
                        out[idx] = [None] * first + (head + [float(value)])[first:]
        return out

    def _score_hf(self, group, inputs, targets, alternatives, starts):
        """One micro-batch scored by the Hugging Face forward (models the fast decoder does
        not cover)."""
        return logprobs_with_alternatives(
            self.model,
            [inputs[k] for k in group],
            [targets[k] for k in group],
            [alternatives[k] for k in group],
            pad_id=int(self._tokenizer.pad_token_id),
            device=self.engine.device,
            autocast_dtype=None,
            starts=[starts[k] for k in group],
        )


@dataclass(frozen=True)
class _PromptOptions:
    """Prompt-side outputs of one ``sample`` request beyond plain prompt log-probabilities."""

    last_n: int | None
    topk: int
    target: np.ndarray | None  # int64 [len(prompt) - 1, K], -1 where no id is asked for


def _check_last_n(method: str, last_n: int | None, length: int) -> None:
    """``prompt_logprobs_last_n`` must be None or between 1 and ``len(prompt) - 1``."""
    if last_n is None:
        return
    if not isinstance(last_n, int) or isinstance(last_n, bool) or not 1 <= last_n <= length - 1:
        raise BackendError(
            f"{method}: prompt_logprobs_last_n={last_n!r}, expected None or an integer between 1 "
            f"and len(prompt) - 1 = {length - 1}"
        )


def _target_ids(target: types.TensorData, length: int, vocab: int) -> np.ndarray:
    """The dense id matrix of ``target_prompt_logprobs`` after the SDK's and service's checks."""
    if not isinstance(target, types.TensorData):
        raise BackendError(
            "sample: target_prompt_logprobs must be a tinker TensorData; got "
            f"{type(target).__name__}"
        )
    if target.dtype != "int64":
        raise BackendError(
            "sample: target_prompt_logprobs must be an int64 tensor of token ids, got "
            f"{target.dtype}"
        )
    if target.sparse_crow_indices is not None:
        raise BackendError(
            "sample: a sparse target_prompt_logprobs is not supported by the local engine; pass "
            "a dense tensor (TensorData.from_torch(ids))"
        )
    ids = target.to_numpy()
    if ids.ndim != 2 or ids.shape[0] != length - 1:
        raise BackendError(
            f"sample: target_prompt_logprobs must have shape [len(prompt) - 1, K] = "
            f"[{length - 1}, K]; got {list(ids.shape)}"
        )
    if not (ids >= 0).any() or ids.min() < -1 or ids.max() >= vocab:
        raise BackendError(
            f"sample: target_prompt_logprobs must name at least one token id in [0, {vocab}) and "
            "use -1 for unused cells"
        )
    return ids.astype(np.int64)
