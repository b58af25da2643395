"""Shared-prefix reuse: the keys and values of a prompt prefix that many requests share,
computed once and reused, as vLLM's prefix caching and llama.cpp's prompt cache do.

Why: the pipeline's prompts come in families. Stage 02's teacher prompts all start with the
same ~700-token system prompt (constitution and demonstrations) and differ in a short user
turn; judge prompts in stages 07-09 share long instruction prefixes. Prefilling each request
alone computed that prefix once per request (93 teacher requests prefilled 74.8k tokens to
generate 8.4k). A token's key and value at position ``i`` depend only on tokens ``<= i``, so
the prefix's keys and values are the same for every request that starts with it: computing
them once and letting each request prefill only its own suffix (attending to the stored
prefix) gives the same numbers up to floating-point reduction order (the same ~1e-6 in fp32
that batch shapes already cause).

What is stored and when:

* a `PrefixKV` holds the keys and values of one token prefix, every layer, in the dtype the
  consumer attends in (the sampler's cache dtype, or fp32 for scoring), under a namespace
  that names the model (one sampling client: base plus adapter) and that dtype;
* `PrefixStore` keeps them in one least-recently-used list per engine, bounded in bytes, so
  the chunks of one stage and the calls of one judge reuse each other's prefixes; a client's
  entries are dropped when it is garbage-collected;
* `PrefixStore.plan` decides, for the prompts about to be prefilled, how many leading tokens
  each takes from a stored prefix: the longest prefix it shares with a stored entry, or, when
  it shares a longer one with another prompt of the same call (or with one of the last
  prompts this model saw), that shared prefix rounded down to a block of `BLOCK` tokens, which
  is then computed once and stored. Rounding to blocks makes prompts that share a system
  prompt and then differ after a few tokens of the user turn agree on one entry.

A prefix always leaves at least one token to compute (the sampler needs the last position's
logits; scoring needs the positions it scores), so the callers pass a limit per prompt.
"""

from __future__ import annotations

import itertools
import weakref
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Callable, Hashable, Sequence

import numpy as np
import torch

BLOCK = 16  # new entries cover a multiple of this many tokens
MIN_PREFIX = 32  # shorter shared prefixes are computed with the request (not worth a copy)
HISTORY = 256  # recent prompts per namespace remembered (as tokens only) to spot sharing


@dataclass
class PrefixKV:
    """Keys and values of ``tokens`` for every layer: [layers, kv_heads, len, head_dim]."""

    tokens: np.ndarray
    keys: torch.Tensor
    values: torch.Tensor

    @property
    def length(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes


@dataclass
class PrefixCounters:
    """Prefill work asked for vs. done, cumulative; ``requested - computed`` was reused."""

    requested: int = 0  # prompt tokens the requests asked to prefill
    computed: int = 0  # tokens actually run through the model (suffixes and new prefixes)
    reused: int = 0  # tokens taken from stored prefixes
    padded: int = 0  # tokens run including padding (what the matrix products saw)
    entries_built: int = 0
    hits: int = 0  # prompts that took at least one token from a stored prefix

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the longest common prefix of two token arrays."""
    n = min(a.shape[0], b.shape[0])
    if n == 0:
        return 0
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if diff.size else n


@dataclass
class _Namespace:
    history: deque = field(default_factory=lambda: deque(maxlen=HISTORY))
    keys: set = field(default_factory=set)  # store keys of this namespace's entries


class PrefixStore:
    """Stored prefixes of every model of one engine, least recently used first out.

    ``max_bytes`` bounds the keys and values held (0 disables reuse: `plan` then asks for
    nothing). Thread-unsafe, like the rest of the engine.
    """

    def __init__(self, max_bytes: int, block: int = BLOCK, min_tokens: int = MIN_PREFIX):
        self.max_bytes = int(max_bytes)
        self.block = block
        self.min_tokens = min_tokens
        self._entries: OrderedDict[tuple, PrefixKV] = OrderedDict()
        self._namespaces: dict[Hashable, _Namespace] = {}
        self._bytes = 0
        self._ids = itertools.count()

    # -- bookkeeping ----------------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def namespace(self, owner: object, *parts: Hashable) -> tuple:
        """A fresh namespace for ``owner`` (dropped with its entries when it is collected)."""
        name = (next(self._ids), *parts)
        self._namespaces[name] = _Namespace()
        weakref.finalize(owner, self.drop, name)
        return name

    def drop(self, name: Hashable) -> None:
        space = self._namespaces.pop(name, None)
        if space is None:
            return
        for key in space.keys:
            entry = self._entries.pop(key, None)
            if entry is not None:
                self._bytes -= entry.nbytes

    def clear(self) -> None:
        for name in list(self._namespaces):
            space = self._namespaces[name]
            for key in space.keys:
                self._bytes -= self._entries.pop(key).nbytes
            space.keys.clear()

    def _space(self, name: Hashable) -> _Namespace:
        return self._namespaces.setdefault(name, _Namespace())

    def add(self, name: Hashable, entry: PrefixKV) -> None:
        if entry.nbytes > self.max_bytes:
            return
        key = (name, entry.tokens.tobytes())
        if key in self._entries:
            self._entries.move_to_end(key)
            return
        self._entries[key] = entry
        self._space(name).keys.add(key)
        self._bytes += entry.nbytes
        while self._bytes > self.max_bytes:
            old_key, old = self._entries.popitem(last=False)
            self._bytes -= old.nbytes
            self._space(old_key[0]).keys.discard(old_key)

    def longest(
        self, name: Hashable, prompt: np.ndarray, limit: int
    ) -> tuple[PrefixKV | None, int]:
        """The stored entry sharing the longest prefix with ``prompt`` (at most ``limit``)."""
        best, best_len = None, 0
        for key in self._space(name).keys:
            entry = self._entries[key]
            length = min(common_prefix(entry.tokens, prompt), limit)
            if length > best_len:
                best, best_len = entry, length
        if best is not None:
            self._entries.move_to_end((name, best.tokens.tobytes()))
        return best, best_len

    # -- planning -------------------------------------------------------------------------------
    def shared_lengths(self, name: Hashable, prompts: Sequence[np.ndarray]) -> list[int]:
        """For each prompt, the longest prefix it shares with another prompt of the list or a
        recent prompt of the namespace (whole prompts, not rounded)."""
        space = self._space(name)
        pool = list(prompts) + list(space.history)
        order = sorted(range(len(pool)), key=lambda i: tuple(pool[i].tolist()))
        best = [0] * len(pool)
        for left, right in zip(order, order[1:]):
            length = common_prefix(pool[left], pool[right])
            best[left] = max(best[left], length)
            best[right] = max(best[right], length)
        return best[: len(prompts)]

    def plan(
        self,
        name: Hashable,
        prompts: Sequence[Sequence[int]],
        limits: Sequence[int],
        build: Callable[[np.ndarray, PrefixKV | None, int], PrefixKV],
        counters: PrefixCounters,
    ) -> list[tuple[PrefixKV | None, int]]:
        """For each prompt, the stored prefix to start from and how many tokens to take.

        ``limits[i]`` caps prompt ``i``'s reuse (at least one token must be computed).
        ``build(tokens, parent, reuse)`` computes a new entry for ``tokens``, starting from the
        first ``reuse`` tokens of ``parent`` (or from nothing); new entries are built shortest
        first, so a longer shared prefix extends a shorter one built in the same call. The
        prompts are then remembered, so a later call can find what they share.
        """
        arrays = [np.asarray(p, dtype=np.int64) for p in prompts]
        if self.max_bytes <= 0:
            return [(None, 0)] * len(arrays)
        shared = self.shared_lengths(name, arrays)
        wanted = [min(s, limit) // self.block * self.block for s, limit in zip(shared, limits)]
        todo: dict[tuple[int, bytes], np.ndarray] = {}
        for prompt, length in zip(arrays, wanted):
            if length >= self.min_tokens:  # one entry serves every prompt wanting this prefix
                todo.setdefault((length, prompt[:length].tobytes()), prompt[:length])
        for (length, _), prefix in sorted(todo.items(), key=lambda item: item[0][0]):
            parent, reuse = self.longest(name, prefix, length)
            if reuse < length:
                self.add(name, build(prefix, parent, reuse))
                counters.entries_built += 1
                counters.computed += length - reuse
        out: list[tuple[PrefixKV | None, int]] = []
        for prompt, limit in zip(arrays, limits):
            entry, length = self.longest(name, prompt, limit)
            if length < self.min_tokens:
                entry, length = None, 0
            out.append((entry, length))
            counters.hits += entry is not None
            counters.reused += length
        space = self._space(name)
        for prompt in arrays:
            space.history.append(prompt)
        return out
