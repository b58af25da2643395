"""Batched autoregressive sampling with a KV cache, for many prompts at once.

Why not ``model.generate``: the pipeline samples thousands of short answers, each request with
its own seed, stop sequences and token budget, and needs the log-probability of every sampled
token. This decoder differs from ``generate`` where that matters for throughput and for the
SDK contract:

* prompts are sorted by length and batched, so left padding is small;
* a prompt sampled ``n`` times is prefilled once and its cache is copied ``n`` times;
* finished rows leave the batch immediately (the cache shrinks), instead of decoding padding
  until the longest row ends;
* each row draws from its own seeded generator, so a request's samples depend only on its
  seed, not on which other requests share the batch;
* the returned log-probabilities are those of the untempered model distribution
  (``log_softmax(logits)``), the quantity ``compute_logprobs`` returns for the same tokens.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Sequence

import torch
from tqdm.auto import tqdm

from . import fast_decode


@dataclass(frozen=True)
class GenerationRequest:
    """One ``sample()`` call, already validated and normalised."""

    prompt: tuple[int, ...]
    num_samples: int
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    stop_token_ids: frozenset[int] = frozenset()
    stop_strings: tuple[str, ...] = ()


@dataclass
class GeneratedSequence:
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    stop_reason: str = "length"


@dataclass
class _Row:
    request: int
    sample: int
    prompt: tuple[int, ...]
    params: GenerationRequest
    generator: torch.Generator
    out: GeneratedSequence


def _row_generator(seed: int | None, sample_index: int) -> torch.Generator:
    gen = torch.Generator()
    if seed is None:
        gen.manual_seed(random.SystemRandom().getrandbits(63))
    else:
        # Distinct, reproducible streams for the n samples of one seeded request.
        gen.manual_seed((int(seed) * 1_000_003 + sample_index * 7_919) % (2**63 - 1))
    return gen


def filter_logits(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
) -> torch.Tensor:
    """Temperature, top-k and nucleus filtering per row; returns logits with -inf outside.

    ``temperature`` must be > 0 here (greedy rows are handled by the caller).
    """
    scaled = logits / temperature[:, None]
    vocab = scaled.shape[-1]
    if bool((top_k > 0).any()):
        k = torch.where(top_k > 0, top_k.clamp(max=vocab), torch.full_like(top_k, vocab))
        kth = torch.topk(scaled, int(k.max()), dim=-1).values
        threshold = kth.gather(-1, (k - 1)[:, None])
        scaled = scaled.masked_fill(scaled < threshold, float("-inf"))
    if bool((top_p < 1.0).any()):
        sorted_logits, sorted_idx = torch.sort(scaled, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = torch.cumsum(probs, dim=-1) - probs
        drop_sorted = mass_before >= top_p[:, None]
        drop = torch.zeros_like(drop_sorted).scatter(-1, sorted_idx, drop_sorted)
        scaled = scaled.masked_fill(drop, float("-inf"))
    return scaled


def draw(filtered: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling, one token per row from softmax(filtered), given uniforms.

    Tokens are visited in token-id order, the same order `sample_tokens` uses, so the two map
    a given uniform to the same token. Id order (not probability order) keeps a seeded sample
    independent of the batch: logits differ by ~1e-6 between batch shapes, which moves a bin
    edge by about that much, whereas sorting by probability reorders near-tied tokens and
    sends the same uniform to an unrelated token.
    """
    cdf = torch.cumsum(torch.softmax(filtered, dim=-1), dim=-1)
    u = (uniforms * cdf[:, -1]).unsqueeze(-1)
    # right=True: the first token whose cumulative mass exceeds u, never a zero-mass token
    # (with the default, a uniform of exactly 0 would pick token 0 even when filtered out)
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp(max=filtered.shape[-1] - 1)


CANDIDATES = 256  # nucleus search width; rows whose nucleus is wider fall back to a full sort


def sample_tokens(
    logprobs: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    uniforms: torch.Tensor,
) -> torch.Tensor:
    """Sample one token per row (temperature > 0) as `filter_logits` + `draw` would.

    Sorting the whole vocabulary every step dominated the sampler's time, so the nucleus is
    searched among the top ``CANDIDATES`` tokens; a row whose nucleus does not fit (its top
    candidates hold less than ``top_p`` of the mass) is sampled with the full sort instead.
    """
    scaled = logprobs / temperature[:, None]
    vocab = scaled.shape[-1]
    width = min(vocab, max(CANDIDATES, int(top_k.max())))
    values, index = torch.topk(scaled, width, dim=-1)
    k = torch.where(top_k > 0, top_k.clamp(max=width), torch.full_like(top_k, width))
    in_top_k = torch.arange(width)[None, :] < k[:, None]
    uses_top_k = (top_k > 0) & (top_k <= width)
    log_norm = torch.where(
        uses_top_k,
        torch.logsumexp(values.masked_fill(~in_top_k, float("-inf")), dim=-1),
        torch.logsumexp(scaled, dim=-1),
    )
    probs = torch.exp(values - log_norm[:, None]) * in_top_k
    mass_before = torch.cumsum(probs, dim=-1) - probs
    keep = in_top_k & (mass_before < top_p[:, None])
    covered = uses_top_k | (probs.sum(-1) >= top_p) | (top_p >= 1.0) & (width == vocab)
    kept = probs * keep
    index, by_id = torch.sort(index, dim=-1)  # token-id order, as in `draw`
    kept = kept.gather(-1, by_id)
    cdf = torch.cumsum(kept, dim=-1)
    position = torch.searchsorted(cdf, (uniforms * cdf[:, -1])[:, None], right=True).squeeze(-1)
    tokens = index.gather(-1, position.clamp(max=width - 1)[:, None]).squeeze(-1)
    if not bool(covered.all()):
        rows = (~covered).nonzero().squeeze(-1)
        filtered = filter_logits(logprobs[rows], temperature[rows], top_k[rows], top_p[rows])
        tokens[rows] = draw(filtered, uniforms[rows])
    return tokens


class BatchedSampler:
    """Decodes lists of `GenerationRequest` with one model; stateless between calls.

    Llama-family models run on `FastDecoder` (static cache, fused projections); any other
    model runs the Hugging Face forward with its dynamic cache. Both share the token choice
    and stop logic below, and both drop finished rows from the batch.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        device: torch.device,
        max_batch_size: int,
        show_progress: bool = True,
        prefill_tokens: int = 8192,
        use_fast_decoder: bool | None = None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.max_batch_size = max_batch_size
        self.pad_id = int(tokenizer.pad_token_id)
        self.show_progress = show_progress
        self.prefill_tokens = prefill_tokens
        if use_fast_decoder is None:
            use_fast_decoder = fast_decode.supports(model)
        self.fast = fast_decode.FastDecoder(model) if use_fast_decoder else None

    def generate(self, requests: Sequence[GenerationRequest]) -> list[list[GeneratedSequence]]:
        rows = [
            _Row(r, j, req.prompt, req, _row_generator(req.seed, j), GeneratedSequence())
            for r, req in enumerate(requests)
            for j in range(req.num_samples)
        ]
        # Longest prompts first, samples of one prompt kept together (shared prefill).
        order = sorted(range(len(rows)), key=lambda i: (-len(rows[i].prompt), rows[i].prompt))
        batches = [
            [rows[i] for i in order[start : start + self.max_batch_size]]
            for start in range(0, len(order), self.max_batch_size)
        ]
        progress = tqdm(
            total=len(rows), desc="sampling", unit="seq", leave=False,
            disable=not self.show_progress or len(rows) < 2 * self.max_batch_size,
        )
        decode = self._decode_batch_fast if self.fast is not None else self._decode_batch_hf
        with torch.inference_mode():
            for batch in batches:
                decode(batch)
                progress.update(len(batch))
        progress.close()
        results: list[list[GeneratedSequence]] = [
            [GeneratedSequence() for _ in range(req.num_samples)] for req in requests
        ]
        for row in rows:
            results[row.request][row.sample] = row.out
        return results

    # -- shared per-step logic ------------------------------------------------------------------
    def _choose(self, rows: list[_Row], logits: torch.Tensor) -> torch.Tensor:
        """Pick the next token of each row and record it with its untempered log-probability."""
        logprobs = torch.log_softmax(logits.float(), dim=-1).cpu()
        temps = torch.tensor([r.params.temperature for r in rows], dtype=torch.float32)
        tokens = torch.argmax(logprobs, dim=-1)
        sampling = (temps > 0).nonzero().squeeze(-1)
        if sampling.numel():
            uniforms = torch.stack(
                [torch.rand((), generator=rows[int(i)].generator) for i in sampling]
            )
            tokens[sampling] = sample_tokens(
                logprobs[sampling],
                temps[sampling],
                torch.tensor([rows[int(i)].params.top_k for i in sampling], dtype=torch.long),
                torch.tensor([rows[int(i)].params.top_p for i in sampling], dtype=torch.float32),
                uniforms,
            )
        chosen = logprobs.gather(-1, tokens[:, None]).squeeze(-1)
        for pos, row in enumerate(rows):
            row.out.tokens.append(int(tokens[pos]))
            row.out.logprobs.append(float(chosen[pos]))
        return tokens

    def _finished(self, row: _Row, max_stop_len: int) -> bool:
        """Record the stop reason of a row that just produced its last token."""
        if row.out.tokens[-1] in row.params.stop_token_ids or self._hit_stop_string(
            row, max_stop_len
        ):
            row.out.stop_reason = "stop"
            return True
        if len(row.out.tokens) >= row.params.max_tokens:
            row.out.stop_reason = "length"
            return True
        return False

    def _hit_stop_string(self, row: _Row, max_stop_len: int) -> bool:
        if not row.params.stop_strings:
            return False
        tail = self.tokenizer.decode(row.out.tokens[-(max_stop_len + 1):])
        return any(stop in tail for stop in row.params.stop_strings)

    @staticmethod
    def _unique_prompts(batch: list[_Row]) -> tuple[list[tuple[int, ...]], list[int]]:
        unique: dict[tuple[int, ...], int] = {}
        row_to_unique = [unique.setdefault(row.prompt, len(unique)) for row in batch]
        return list(unique), row_to_unique

    def _left_pad(self, prompts: list[tuple[int, ...]], width: int):
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, prompt in enumerate(prompts):
            ids[i, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
            mask[i, width - len(prompt):] = 1
        return ids.to(self.device), mask.to(self.device)

    # -- fast path ------------------------------------------------------------------------------
    def _decode_batch_fast(self, batch: list[_Row]) -> None:
        assert self.fast is not None
        prompts, row_to_unique = self._unique_prompts(batch)
        width = max(len(p) for p in prompts)
        capacity = width + max(r.params.max_tokens for r in batch)
        prompt_cache = self.fast.new_cache(len(prompts), capacity)
        prompt_logits = torch.empty(0)
        per_chunk = max(1, self.prefill_tokens // width)
        chunks = []
        for start in range(0, len(prompts), per_chunk):
            ids, mask = self._left_pad(prompts[start : start + per_chunk], width)
            rows_idx = torch.arange(start, start + ids.shape[0], device=self.device)
            chunks.append(self.fast.prefill(prompt_cache, rows_idx, ids, mask))
        prompt_logits = torch.cat(chunks)
        index = torch.tensor(row_to_unique, device=self.device)
        cache = prompt_cache.select(index) if len(prompts) != len(batch) else prompt_cache
        logits = prompt_logits[index]
        positions = torch.tensor([len(r.prompt) for r in batch], device=self.device)
        in_cache = list(range(len(batch)))  # batch row held by each cache row
        alive = [True] * len(batch)
        max_stop_len = max((len(s) for r in batch for s in r.params.stop_strings), default=0)
        column = width
        while True:
            live_slots = [slot for slot, ok in enumerate(alive) if ok]
            rows = [batch[in_cache[slot]] for slot in live_slots]
            tokens = self._choose(rows, logits[live_slots])
            for slot, row in zip(live_slots, rows):
                if self._finished(row, max_stop_len):
                    alive[slot] = False
            if not any(alive):
                return
            step_tokens = torch.full((len(in_cache),), self.pad_id, dtype=torch.long)
            step_tokens[live_slots] = tokens
            if alive.count(False) * 4 >= len(alive):  # compact once a quarter has finished
                keep = [slot for slot, ok in enumerate(alive) if ok]
                keep_idx = torch.tensor(keep, device=self.device)
                cache = cache.select(keep_idx)
                positions = positions[keep_idx]
                step_tokens = step_tokens[keep]
                in_cache = [in_cache[slot] for slot in keep]
                alive = [True] * len(keep)
            logits = self.fast.decode(cache, step_tokens.to(self.device), positions, column)
            positions = positions + 1
            column += 1

    # -- generic Hugging Face path --------------------------------------------------------------
    def _decode_batch_hf(self, batch: list[_Row]) -> None:
        from transformers import DynamicCache

        prompts, row_to_unique = self._unique_prompts(batch)
        ids, mask = self._left_pad(prompts, max(len(p) for p in prompts))
        cache = DynamicCache()
        logits = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        ).logits[:, -1]
        index = torch.tensor(row_to_unique, device=self.device)
        if len(prompts) != len(batch):
            cache.batch_select_indices(index)
        logits, mask = logits[index], mask[index]
        lengths = torch.tensor([len(r.prompt) for r in batch], device=self.device)
        active = list(range(len(batch)))
        max_stop_len = max((len(s) for r in batch for s in r.params.stop_strings), default=0)
        while True:
            rows = [batch[i] for i in active]
            tokens = self._choose(rows, logits)
            keep = [pos for pos, row in enumerate(rows) if not self._finished(row, max_stop_len)]
            if not keep:
                return
            if len(keep) != len(rows):
                keep_idx = torch.tensor(keep, device=self.device)
                cache.batch_select_indices(keep_idx)
                mask, lengths, tokens = mask[keep_idx], lengths[keep_idx], tokens[keep]
                active = [active[k] for k in keep]
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
            logits = self.model(
                input_ids=tokens[:, None].to(self.device),
                attention_mask=mask,
                position_ids=lengths[:, None],
                past_key_values=cache,
                use_cache=True,
            ).logits[:, -1]
            lengths = lengths + 1
