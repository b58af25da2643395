"""Batched autoregressive sampling with a KV cache, for many prompts at once.

Why not ``model.generate``: the pipeline samples thousands of short answers, each request with
its own seed, stop sequences and token budget, and needs the log-probability of every sampled
token. This decoder differs from ``generate`` where that matters for throughput and for the
SDK contract:

* continuous batching (Llama-family models, on `fast_decode.FastDecoder`): a decode step has
  a large fixed cost, reading every weight once, plus a cost per row (SmolLM2-135M in bf16 on
  this project's 2-core CPU: ~70 ms for 8 rows, ~105 ms for 32, ~190 ms for 64). A batch
  decoded until its longest row ends pays the fixed cost for fewer and fewer live rows (and
  the per-row cost of finished rows until they are dropped), once per batch. Here a finished
  row's cache slot is given to a queued sequence: its prompt is prefilled into the columns
  just before the current one and it joins the next step, so the batch stays full and the
  half-empty tail comes once per queue instead of once per batch. The price: every row's
  attention reads all columns from the oldest live row's first one (masked where they are
  not its own), so columns that no live row needs are dropped by shifting the cache left;
  one cache (a "wave") then serves the whole queue, and only the tail, once the queue is
  empty, shrinks the batch;
* prompts are sorted by length (longest first), so left padding inside one prefill is small
  and every later prompt fits in front of the current column;
* a prompt sampled ``n`` times is prefilled once and its cache columns are copied ``n`` times;
* prompts that share a prefix (one system prompt, many user turns) prefill it once
  (`prefix_cache`: planned once per call, kept across calls in the engine's prefix store)
  and only their own suffix; the prefix most rows share is kept once per wave, outside the
  rows' columns, and every step's attention reads it once for all of them (cascade
  attention, `fast_decode.attend_with_shared`); other stored prefixes are copied into the
  row's first columns. A row then holds only its own tokens, so long shared prompts cost
  neither per-row memory nor per-row attention reads;
* the cache is bounded in bytes (``cache_bytes``): long prompts get fewer rows, not more
  memory;
* each row draws from its own seeded generator, so a request's samples depend only on its
  seed, not on which other requests share the batch or when its row was admitted;
* the returned log-probabilities are those of the untempered model distribution
  (``log_softmax(logits)``), the quantity ``compute_logprobs`` returns for the same tokens.

Other models run the Hugging Face forward in fixed batches; finished rows leave the batch
(its dynamic cache shrinks) but are not replaced.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from . import fast_decode
from .prefix_cache import PrefixCounters, PrefixKV, PrefixStore, common_prefix


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
    shared: int = 0  # leading prompt tokens read from the wave's shared prefix (fast path)
    own: int = 0  # prompt tokens held in the row's own cache columns: len(prompt) - shared


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


@dataclass
class SamplerStats:
    """Counters of the last `BatchedSampler.generate` call (fast path), for benchmarks/tests.

    ``live_row_steps / row_steps`` is the batch occupancy: the share of decoded rows that
    belonged to an unfinished sequence.
    """

    waves: int = 0
    steps: int = 0
    row_steps: int = 0
    live_row_steps: int = 0
    span_columns: int = 0  # sum over steps of the columns each step's attention read
    admissions: int = 0
    admitted_rows: int = 0
    prefill_tokens: int = 0
    shifts: int = 0
    compactions: int = 0

    @property
    def occupancy(self) -> float:
        return self.live_row_steps / self.row_steps if self.row_steps else 1.0


class _Wave:
    """One static cache and the row decoding in each of its slots (``None``: free)."""

    def __init__(
        self, cache: fast_decode.StaticCache, column: int, vocab: int, device: torch.device
    ):
        slots = cache.keys.shape[1]
        self.cache = cache
        self.rows: list[_Row | None] = [None] * slots
        self.starts = [0] * slots  # first cache column of each slot's sequence
        self.positions = torch.zeros(slots, dtype=torch.long, device=device)
        self.logits = torch.zeros((slots, vocab), dtype=torch.float32, device=device)
        self.column = column  # the column the next decode step writes

    def free_slots(self) -> list[int]:
        return [slot for slot, row in enumerate(self.rows) if row is None]

    def live_slots(self) -> list[int]:
        return [slot for slot, row in enumerate(self.rows) if row is not None]

    def keep(self, slots: list[int]) -> None:
        index = torch.tensor(slots, device=self.positions.device)
        self.cache = self.cache.compact(index)
        self.positions = self.positions[index]
        self.rows = [self.rows[slot] for slot in slots]
        self.starts = [self.starts[slot] for slot in slots]


class BatchedSampler:
    """Decodes lists of `GenerationRequest` with one model; stateless between calls.

    Llama-family models run on `FastDecoder` (static cache, fused projections) with
    continuous batching: a finished row's slot is refilled from the queue. Any other model runs
    the Hugging Face forward with its dynamic cache, batch after batch, dropping finished rows.
    Both share the token choice and stop logic below. ``stats`` describes the last call.
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
        cache_tokens: int = 65536,
        cache_bytes: int | None = None,
        prefixes: PrefixStore | None = None,
        counters: PrefixCounters | None = None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.max_batch_size = max_batch_size
        self.pad_id = int(tokenizer.pad_token_id)
        self.show_progress = show_progress
        self.prefill_tokens = prefill_tokens
        self.cache_tokens = cache_tokens  # rows x columns of one static cache, if more is optional
        self.cache_bytes = cache_bytes  # when given, the bound in bytes (replaces cache_tokens)
        self.stats = SamplerStats()
        if use_fast_decoder is None:
            use_fast_decoder = fast_decode.supports(model)
        self._use_fast = use_fast_decoder
        self._fast: fast_decode.FastDecoder | None = None
        # Shared-prefix reuse (fast path only): stored prefixes per attention dtype, and the
        # engine-wide counters of prefill work asked for and done (`prefix_cache`).
        self.prefixes = prefixes if prefixes is not None else PrefixStore(0)
        self.counters = counters if counters is not None else PrefixCounters()
        self._namespaces: dict[torch.dtype, tuple] = {}
        self._plan: dict[tuple[int, ...], tuple] = {}  # prompt -> (stored prefix, tokens)

    @property
    def fast(self) -> fast_decode.FastDecoder | None:
        """The fast decoder, built on first use (a client that only scores may never need it,
        and building it costs the fused weights if no other client built them)."""
        if self._use_fast and self._fast is None:
            self._fast = fast_decode.FastDecoder(self.model)
        return self._fast

    def prefix_namespace(self, dtype: torch.dtype) -> tuple:
        """This model's namespace in the prefix store for keys and values in ``dtype``."""
        if dtype not in self._namespaces:
            self._namespaces[dtype] = self.prefixes.namespace(self, str(dtype))
        return self._namespaces[dtype]

    def resolve_prefixes(
        self,
        prompts: Sequence[Sequence[int]],
        limits: Sequence[int],
        dtype: torch.dtype,
        counters: PrefixCounters | None = None,
    ) -> list[tuple[PrefixKV | None, int]]:
        """For each prompt, the stored prefix (keys and values in ``dtype``) it starts from
        and how many of its tokens that covers (at most ``limits[i]``); builds the prefixes
        that several prompts share (`PrefixStore.plan`)."""
        fast = self.fast
        assert fast is not None
        return self.prefixes.plan(
            self.prefix_namespace(dtype),
            prompts,
            limits,
            lambda tokens, parent, reuse: fast.prefix_kv(tokens, parent, reuse, dtype),
            self.counters if counters is None else counters,
        )

    def generate(self, requests: Sequence[GenerationRequest]) -> list[list[GeneratedSequence]]:
        rows = [
            _Row(r, j, req.prompt, req, _row_generator(req.seed, j), GeneratedSequence())
            for r, req in enumerate(requests)
            for j in range(req.num_samples)
        ]
        # Longest prompts first, samples of one prompt kept together (shared prefill).
        order = sorted(range(len(rows)), key=lambda i: (-len(rows[i].prompt), rows[i].prompt))
        ordered = [rows[i] for i in order]
        progress = tqdm(
            total=len(rows),
            desc="sampling",
            unit="seq",
            leave=False,
            disable=not self.show_progress or len(rows) < 2 * self.max_batch_size,
        )
        self.stats = SamplerStats()
        with torch.inference_mode():
            if self.fast is not None:
                self._decode_fast(ordered, on_done=lambda: progress.update(1))
            else:
                for start in range(0, len(ordered), self.max_batch_size):
                    batch = ordered[start : start + self.max_batch_size]
                    self._decode_batch_hf(batch)
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
        """Pick the next token of each row and record it with its untempered log-probability.

        Greedy rows take an argmax and sampling rows a draw (`sample_tokens`); a batch whose
        rows are all of one kind is used as it is, not copied into a sub-batch (at 128 rows
        each full-vocabulary pass or copy is several ms of a step). Every row's numbers are
        those of the whole-batch computation.
        """
        logprobs = torch.log_softmax(logits.float(), dim=-1).cpu()
        temps = torch.tensor([r.params.temperature for r in rows], dtype=torch.float32)
        positive = (temps > 0).tolist()
        sampling = [i for i, p in enumerate(positive) if p]
        greedy = [i for i, p in enumerate(positive) if not p]
        if not sampling:
            tokens = torch.argmax(logprobs, dim=-1)
        else:
            tokens = torch.empty(len(rows), dtype=torch.long)
            if greedy:
                tokens[greedy] = torch.argmax(logprobs[greedy], dim=-1)
            uniforms = torch.stack([torch.rand((), generator=rows[i].generator) for i in sampling])
            tokens[sampling] = sample_tokens(
                logprobs if not greedy else logprobs[sampling],
                temps[sampling],
                torch.tensor([rows[i].params.top_k for i in sampling], dtype=torch.long),
                torch.tensor([rows[i].params.top_p for i in sampling], dtype=torch.float32),
                uniforms,
            )
        chosen = logprobs.gather(-1, tokens[:, None]).squeeze(-1)
        for row, token, logprob in zip(rows, tokens.tolist(), chosen.tolist()):
            row.out.tokens.append(token)
            row.out.logprobs.append(logprob)
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
        tail = self.tokenizer.decode(row.out.tokens[-(max_stop_len + 1) :])
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
            ids[i, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            mask[i, width - len(prompt) :] = 1
        return ids.to(self.device), mask.to(self.device)

    # -- fast path: continuous batching over static caches ------------------------------------
    # A slot is refilled once this fraction of the slots is free (or when the queue would fit):
    # each admission is one prefill call, so admitting a few rows at a time saves calls, while
    # waiting longer leaves slots idle.
    REFILL_FRACTION = 8
    # Columns before the oldest live row's first column are dropped once they are this many and
    # at least a quarter of the span that every step's attention reads.
    MIN_SHIFT = 32
    # Queued rows looked at per admission (a row whose budget does not fit now can be passed
    # over for a later one that does; bounded so a long queue costs no per-step scan).
    ADMISSION_WINDOW = 512

    def _plan_prefixes(self, rows: list[_Row]) -> dict[tuple[int, ...], tuple]:
        """Each distinct prompt's stored prefix and how many of its tokens that covers
        (`resolve_prefixes`: prefixes several prompts share are built here, once)."""
        prompts = list(dict.fromkeys(row.prompt for row in rows))
        reuse = self.resolve_prefixes(prompts, [len(p) - 1 for p in prompts], self.fast.cache_dtype)
        return dict(zip(prompts, reuse))

    def _shared_prefix(self, rows: list[_Row]) -> PrefixKV | None:
        """The stored prefix the most prompt tokens of ``rows`` come from, if at least two
        rows use it: the wave keeps it once and its rows read it from there (`fast_decode`
        cascade attention) instead of each holding a copy."""
        use: dict[int, list] = {}
        for row in rows:
            entry, length = self._plan[row.prompt]
            if entry is not None:
                slot = use.setdefault(id(entry), [entry, 0, 0])
                slot[1] += length
                slot[2] += 1
        best = max(use.values(), key=lambda item: item[1], default=None)
        return best[0] if best is not None and best[2] >= 2 else None

    def _wave_capacity(
        self, slots: int, width: int, longest: int, cache_tokens: int | None = None
    ) -> int:
        """Cache columns for a wave whose prompts are at most ``width`` tokens.

        ``width + longest`` is what one sequence needs. With twice the token budget a shift
        always makes room for a new row: a live row started at most ``width + longest``
        columns ago, so shifting brings the current column back to at most that, leaving a
        full budget before the end. More columns would only cost memory.
        """
        needed = width + longest
        budget = self.cache_tokens if cache_tokens is None else cache_tokens
        return max(needed, min(width + 2 * longest, budget // max(1, slots)))

    def _decode_fast(self, pending: list[_Row], on_done) -> None:
        """Decode ``pending`` (longest prompt first) to the end, one wave after another.

        A new wave (fresh cache) starts only when the current one has no live row and cannot
        admit any queued one, which shifting makes rare.
        """
        max_stop_len = max((len(s) for r in pending for s in r.params.stop_strings), default=0)
        self._plan = self._plan_prefixes(pending)
        shared = self._shared_prefix(pending)
        for row in pending:
            row.shared = 0
            if shared is not None:
                limit = min(len(row.prompt) - 1, shared.length)
                length = common_prefix(shared.tokens, np.asarray(row.prompt[:limit]))
                row.shared = length if length >= self.prefixes.min_tokens else 0
            row.own = len(row.prompt) - row.shared
        # longest own part first, samples of one prompt together (as in `generate`)
        pending = sorted(pending, key=lambda r: (-r.own, r.prompt))
        cache_tokens = self.cache_tokens
        if self.cache_bytes is not None:
            cache_tokens = max(1, self.cache_bytes // self.fast.bytes_per_column)
        while pending:
            width = max(r.own for r in pending)
            longest = max(r.params.max_tokens for r in pending)
            # the cache's memory bound: fewer rows rather than more than cache_tokens columns
            room = max(1, cache_tokens // (width + longest))
            slots = min(self.max_batch_size, len(pending), room)
            capacity = self._wave_capacity(slots, width, longest, cache_tokens)
            wave = _Wave(
                self.fast.new_cache(slots, capacity, shared=shared),
                column=width,
                vocab=self.fast.vocab,
                device=self.device,
            )
            self.stats.waves += 1
            self._run_wave(wave, pending, max_stop_len, on_done)
        self._plan = {}  # the stored prefixes it holds may have left the store since

    def _run_wave(self, wave: "_Wave", pending: list[_Row], max_stop_len: int, on_done) -> None:
        assert self.fast is not None
        while True:
            if pending:
                free = wave.free_slots()
                self._maybe_shift(wave, pending, room_wanted=bool(free))
                if free and (
                    len(free) == len(wave.rows)
                    or len(free) * self.REFILL_FRACTION >= len(wave.rows)
                    or len(pending) <= len(free)
                ):
                    self._admit(wave, pending, free)
            live = wave.live_slots()
            if not live:
                return  # empty and nothing admissible: the caller starts a new wave
            rows = [wave.rows[slot] for slot in live]
            logits = wave.logits if len(live) == len(wave.rows) else wave.logits[live]
            tokens = self._choose(rows, logits)
            for slot, row in zip(live, rows):
                if self._finished(row, max_stop_len):
                    wave.rows[slot] = None
                    on_done()
            still = wave.live_slots()
            if not still:
                if pending:
                    continue  # refill the empty batch at this column, or start a new wave
                return
            step_tokens = torch.full((len(wave.rows),), self.pad_id, dtype=torch.long)
            step_tokens[live] = tokens
            dead = len(wave.rows) - len(still)
            if not pending and dead * 4 >= len(wave.rows):  # the tail: shrink the batch
                step_tokens = step_tokens[still]
                wave.keep(still)
                self.stats.compactions += 1
            if not pending:
                self._maybe_shift(wave, pending, room_wanted=False)
            self.stats.steps += 1
            self.stats.row_steps += len(wave.rows)
            self.stats.live_row_steps += len(still)
            self.stats.span_columns += wave.column + 1
            wave.logits = self.fast.decode(
                wave.cache, step_tokens.to(self.device), wave.positions, wave.column
            )
            wave.positions += 1
            wave.column += 1

    def _maybe_shift(self, wave: "_Wave", pending: list[_Row], room_wanted: bool) -> None:
        """Drop the columns before the oldest live row when that is worth a copy of the rest,
        or when the next queued row needs the room for its budget and a slot is free."""
        live = wave.live_slots()
        if not live:
            return
        offset = min(wave.starts[slot] for slot in live)
        if pending:  # keep room in front of the column for the longest queued prompt
            offset = min(offset, wave.column - pending[0].own)
        if offset <= 0:
            return
        blocked = (
            room_wanted
            and bool(pending)
            and (wave.column + pending[0].params.max_tokens > wave.cache.capacity)
        )
        if blocked or offset >= max(self.MIN_SHIFT, (wave.column + 1) // 4):
            wave.cache.shift_left(offset, wave.column)
            wave.column -= offset
            wave.starts = [start - offset for start in wave.starts]
            self.stats.shifts += 1

    def _admit(self, wave: "_Wave", pending: list[_Row], free: list[int]) -> None:
        """Move queued rows that fit into free slots, prefilled to end at the current column.

        A row fits when its prompt fits in front of the column and its token budget before the
        end of the cache. Prompts shared by several admitted rows are prefilled once.
        """
        column, capacity = wave.column, wave.cache.capacity
        taken: list[int] = []
        for index, row in enumerate(pending[: self.ADMISSION_WINDOW]):
            if len(taken) == len(free):
                break
            if row.own <= column and column + row.params.max_tokens <= capacity:
                taken.append(index)
        if not taken:
            return
        admitted = [pending[i] for i in taken]
        for index in reversed(taken):
            del pending[index]
        slots = free[: len(admitted)]
        prompts, row_to_unique = self._unique_prompts(admitted)
        first_row = {}  # unique prompt -> one of its rows (they share shared/own lengths)
        for row, u in zip(admitted, row_to_unique):
            first_row.setdefault(u, row)
        source: dict[int, int] = {}  # unique prompt -> the slot its prefill is written to
        for slot, unique in zip(slots, row_to_unique):
            source.setdefault(unique, slot)
        fast = self.fast
        # Each prompt's own part ends at the current column. Its first `shared` tokens are
        # read from the wave's shared prefix; tokens [shared, reuse) of its stored prefix
        # are copied into its first own columns; only the rest is prefilled.
        shared = [first_row[u].shared for u in range(len(prompts))]
        own = [first_row[u].own for u in range(len(prompts))]
        plans = [self._plan[p] for p in prompts]
        done = [max(length, s) for (_, length), s in zip(plans, shared)]
        suffixes = [p[d:] for p, d in zip(prompts, done)]
        width = max(len(x) for x in suffixes)  # the suffix block: [column - width, column)
        start = column - width
        lo = column - max(own)  # the first column any of these rows uses
        copied = any(d > s for d, s in zip(done, shared))
        if copied:
            rows = torch.tensor([source[u] for u in range(len(prompts))], device=self.device)
            wave.cache.valid[rows] = False
            for u, ((entry, length), s) in enumerate(zip(plans, shared)):
                if entry is not None and length > s:
                    wave.cache.put(source[u], column - own[u], entry, s, length)
        per_chunk = max(1, self.prefill_tokens // width)
        chunks = []
        for first in range(0, len(prompts), per_chunk):
            ids, mask = self._left_pad(suffixes[first : first + per_chunk], width)
            count = ids.shape[0]
            part = range(first, first + count)
            chunks.append(
                fast.prefill(
                    wave.cache,
                    torch.tensor([source[u] for u in part], device=self.device),
                    ids,
                    mask,
                    start=start,
                    offsets=torch.tensor([done[u] for u in part], device=self.device),
                    context_start=lo if copied else None,
                    shared=torch.tensor([shared[u] for u in part], device=self.device),
                )
            )
        prompt_logits = torch.cat(chunks)
        copies = [(source[u], slot) for slot, u in zip(slots, row_to_unique) if source[u] != slot]
        if copies:
            src, dst = (torch.tensor(side, device=self.device) for side in zip(*copies))
            wave.cache.copy_rows(src, dst, lo, column)
        slot_index = torch.tensor(slots, device=self.device)
        wave.logits[slot_index] = prompt_logits[torch.tensor(row_to_unique)].to(wave.logits.device)
        wave.positions[slot_index] = torch.tensor(
            [len(r.prompt) for r in admitted], device=self.device
        )
        for slot, row in zip(slots, admitted):
            wave.rows[slot] = row
            wave.starts[slot] = column - row.own
        self.stats.admissions += 1
        self.stats.admitted_rows += len(admitted)
        self.stats.prefill_tokens += len(prompts) * width
        self.counters.requested += sum(len(r.prompt) for r in admitted if r.sample == 0)
        self.counters.computed += sum(len(x) for x in suffixes)
        self.counters.padded += len(prompts) * width

    # -- generic Hugging Face path --------------------------------------------------------------
    def _decode_batch_hf(self, batch: list[_Row]) -> None:
        from transformers import DynamicCache

        prompts, row_to_unique = self._unique_prompts(batch)
        ids, mask = self._left_pad(prompts, max(len(p) for p in prompts))
        self.counters.requested += sum(len(r.prompt) for r in batch if r.sample == 0)
        self.counters.computed += sum(len(p) for p in prompts)
        self.counters.padded += ids.numel()
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
