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
    """Inverse-CDF sampling: one token per row from softmax(filtered) using given uniforms."""
    probs = torch.softmax(filtered, dim=-1)
    cdf = torch.cumsum(probs, dim=-1)
    u = (uniforms * cdf[:, -1]).unsqueeze(-1)
    idx = torch.searchsorted(cdf, u).squeeze(-1)
    return idx.clamp(max=filtered.shape[-1] - 1)


class BatchedSampler:
    """Decodes lists of `GenerationRequest` with one model; stateless between calls."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        device: torch.device,
        max_batch_size: int,
        show_progress: bool = True,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.max_batch_size = max_batch_size
        self.pad_id = int(tokenizer.pad_token_id)
        self.show_progress = show_progress

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
        with torch.inference_mode():
            for batch in batches:
                self._decode_batch(batch)
                progress.update(len(batch))
        progress.close()
        results: list[list[GeneratedSequence]] = [
            [GeneratedSequence() for _ in range(req.num_samples)] for req in requests
        ]
        for row in rows:
            results[row.request][row.sample] = row.out
        return results

    # -- one batch ------------------------------------------------------------------------------
    def _prefill(self, batch: list[_Row]):
        from transformers import DynamicCache

        unique: dict[tuple[int, ...], int] = {}
        row_to_unique = []
        for row in batch:
            row_to_unique.append(unique.setdefault(row.prompt, len(unique)))
        prompts = list(unique)
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, prompt in enumerate(prompts):
            ids[i, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
            mask[i, width - len(prompt):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        logits = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        ).logits[:, -1]
        index = torch.tensor(row_to_unique, device=self.device)
        if len(prompts) != len(batch) or row_to_unique != list(range(len(batch))):
            cache.batch_select_indices(index)
        lengths = torch.tensor([len(r.prompt) for r in batch], device=self.device)
        return cache, logits[index], mask[index], lengths

    def _decode_batch(self, batch: list[_Row]) -> None:
        cache, logits, mask, lengths = self._prefill(batch)
        active = list(range(len(batch)))
        temperature = torch.tensor([r.params.temperature for r in batch], dtype=torch.float32)
        top_k = torch.tensor([r.params.top_k for r in batch], dtype=torch.long)
        top_p = torch.tensor([r.params.top_p for r in batch], dtype=torch.float32)
        max_stop_len = max((len(s) for r in batch for s in r.params.stop_strings), default=0)
        step = 0
        while active:
            rows = [batch[i] for i in active]
            logprobs = torch.log_softmax(logits.float(), dim=-1).cpu()
            temps = temperature[active]
            greedy = temps <= 0
            tokens = torch.argmax(logprobs, dim=-1)
            if not bool(greedy.all()):
                sampling = (~greedy).nonzero().squeeze(-1)
                filtered = filter_logits(
                    logprobs[sampling], temps[sampling], top_k[active][sampling],
                    top_p[active][sampling],
                )
                uniforms = torch.stack(
                    [torch.rand((), generator=rows[int(i)].generator) for i in sampling]
                )
                tokens[sampling] = draw(filtered, uniforms)
            chosen = logprobs.gather(-1, tokens[:, None]).squeeze(-1)
            keep = []
            step += 1
            for pos, row in enumerate(rows):
                token = int(tokens[pos])
                row.out.tokens.append(token)
                row.out.logprobs.append(float(chosen[pos]))
                if token in row.params.stop_token_ids or self._hit_stop_string(row, max_stop_len):
                    row.out.stop_reason = "stop"
                elif step >= row.params.max_tokens:
                    row.out.stop_reason = "length"
                else:
                    keep.append(pos)
            if not keep:
                break
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

    def _hit_stop_string(self, row: _Row, max_stop_len: int) -> bool:
        if not row.params.stop_strings:
            return False
        tail = self.tokenizer.decode(row.out.tokens[-(max_stop_len + 1):])
        return any(stop in tail for stop in row.params.stop_strings)
