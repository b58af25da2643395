"""Sampling client with the Tinker `SamplingClient` contract, run in-process.

A sampling client is a frozen snapshot: LoRA weights (if any) are merged into a private copy
of the base model and cast to the engine's compute dtype, so later training never changes
what an existing client samples. Calls are queued and resolved lazily in batches: issue all
your ``sample()`` / ``compute_logprobs()`` calls first, then collect the results, exactly as
with the remote service, and the engine batches them.

Stop semantics (as on Tinker): ``stop=None`` stops at the tokenizer's end-of-sequence token;
a list of strings or token ids replaces that default; ``[]`` disables stopping. The returned
tokens include the stop token (or the tokens that complete a stop string).
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tinker import types

from ...errors import BackendError
from .engine import LocalEngine, read_checkpoint_meta
from .forward import iter_scored_micro_batches
from .futures import LocalFuture
from .generation import BatchedSampler, GenerationRequest

_sequence_ids = itertools.count()


class LocalSamplingClient:
    """Generates from, and scores with, one frozen model."""

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
            model, self._tokenizer, engine.device, engine.config.max_batch_size
        )
        self._pending_samples: list[tuple[GenerationRequest, bool, LocalFuture]] = []
        self._pending_scores: list[tuple[list[int], LocalFuture]] = []
        self._context = int(getattr(model.config, "max_position_embeddings", 1 << 30))

    @classmethod
    def from_base(cls, engine: LocalEngine, base_model: str) -> "LocalSamplingClient":
        return cls(engine, base_model, engine.frozen_base(base_model, engine.compute_dtype))

    @classmethod
    def from_checkpoint(cls, engine: LocalEngine, path: str) -> "LocalSamplingClient":
        """Merge a saved LoRA adapter into a private copy of its base model."""
        from peft import PeftModel

        meta = read_checkpoint_meta(path)
        adapter = Path(path) / "adapter"
        if not adapter.is_dir():
            raise BackendError(f"checkpoint {path} has no adapter directory")
        base = engine.load_trainable_base(meta["base_model"])  # fresh fp32 copy, merged below
        merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
        merged.to(device=engine.device, dtype=engine.compute_dtype).eval()
        for param in merged.parameters():
            param.requires_grad_(False)
        return cls(engine, meta["base_model"], merged, model_path=str(path))

    def get_tokenizer(self):
        return self._tokenizer

    def get_base_model(self) -> str:
        return self.base_model

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
        **_unsupported,
    ) -> LocalFuture[types.SampleResponse]:
        unknown = {k: v for k, v in _unsupported.items() if v}
        if unknown:
            raise BackendError(f"sample: the local engine does not support {sorted(unknown)}")
        request = self._normalise(prompt, num_samples, sampling_params)
        future: LocalFuture[types.SampleResponse] = LocalFuture()
        future._compute = self._resolve_samples_then(future)
        self._pending_samples.append((request, include_prompt_logprobs, future))
        return future

    async def sample_async(self, prompt, num_samples, sampling_params, **kwargs):
        return await self.sample(prompt, num_samples, sampling_params, **kwargs).result_async()

    def _resolve_samples_then(self, future):
        def compute():
            self.flush()
            if not future.done():
                raise RuntimeError("local sampler flushed but did not resolve this request")
            return future.result()

        return compute

    def flush(self) -> None:
        """Run every queued request now (samples first, then scores)."""
        if self._pending_samples:
            pending, self._pending_samples = self._pending_samples, []
            try:
                outputs = self._sampler.generate([req for req, _, _ in pending])
                prompt_lps = self._score_now([list(req.prompt) for req, want, _ in pending if want])
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
                results = self._score_now([tokens for tokens, _ in pending_scores])
            except BaseException as exc:
                for _, fut in pending_scores:
                    fut.set_exception(exc)
                raise
            for (_, fut), result in zip(pending_scores, results):
                fut.set_result(result)

    # -- scoring ------------------------------------------------------------------------------
    def compute_logprobs(self, prompt: types.ModelInput) -> LocalFuture[list[float | None]]:
        """Log-probability of each prompt token given the ones before it; ``None`` first."""
        tokens = prompt.to_ints()
        if not tokens:
            raise BackendError("compute_logprobs: the prompt is empty")
        if len(tokens) > self._context:
            raise BackendError(
                f"compute_logprobs: {len(tokens)} tokens exceed the context of {self._context}"
            )
        future: LocalFuture[list[float | None]] = LocalFuture()
        future._compute = self._resolve_samples_then(future)
        self._pending_scores.append((tokens, future))
        return future

    async def compute_logprobs_async(self, prompt: types.ModelInput):
        return await self.compute_logprobs(prompt).result_async()

    def _score_now(self, sequences: Sequence[list[int]]) -> list[list[float | None]]:
        if not sequences:
            return []
        out: list[list[float | None]] = [[] for _ in sequences]
        pad = int(self._tokenizer.pad_token_id)
        targets = [seq[1:] + [pad] for seq in sequences]
        with torch.inference_mode():
            for group, logprobs in iter_scored_micro_batches(
                self.model,
                sequences,
                targets,
                pad_id=pad,
                device=self.engine.device,
                autocast_dtype=None,
                token_budget=self.engine.config.micro_batch_tokens,
            ):
                for idx, lp in zip(group, logprobs):
                    out[idx] = [None] + [float(v) for v in lp[:-1].tolist()]
        return out
