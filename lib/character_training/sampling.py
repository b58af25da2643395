"""The one way every stage samples chat replies and scores them.

Stages 01-09 all need the same loop: render conversations, issue many ``sample()`` calls,
collect the replies, keep what finished across an interruption. Writing that loop once keeps
four properties that are easy to lose when each stage writes its own:

* **Seeds come from the request's identity.** Each request carries a stable ``key`` (e.g.
  ``"<prompt_id>:s<sample_index>"``) and its seed is a hash of (run seed, key). It never depends
  on how many calls are pending or in which order they were issued, so a run that was
  interrupted and resumed produces the text one uninterrupted run produces (the engine's
  per-request seeded streams do not depend on what else shares a batch). One caveat: batch
  shapes change floating-point reduction order, so logits move by ~1e-6 in fp32 (more in
  bf16); a draw whose uniform falls that close to a token's bin edge can flip to the
  neighbouring token and the reply diverges from there. Stage 02's resume test saw 1 such
  reply in 38 with bf16 batches; decoding one sequence at a time removes it.
* **Resumable.** With ``log_path``, every finished reply is appended to a JSONL log as it
  arrives; a rerun reads the log and samples only the missing keys. A torn last line (process
  killed mid-write) is counted, reported and cut off, never fatal. A logged row whose request
  differs from the one asked for now (other messages, prefill or sampling settings under the
  same key) is refused rather than silently reused.
* **Pipelined, in a bounded window.** Up to ``chunk_size`` requests are in flight: all of the
  first ``chunk_size`` are issued before any result is read, and then, as each result is read
  (in order), the next request is issued. The service's slots never wait for the slowest
  request of a chunk (a chunk barrier made stages 02/07 round-trip bound unless the slots
  divided the chunk: bench/README.md "Service pipelining"), and the local engine still decodes
  exactly the batches it decoded with chunks (when it reads request k * chunk_size + 1, the
  requests pending are the next ``chunk_size``), so its replies are unchanged. The window
  bounds the work an interruption can lose.
* **Honest about truncation.** A `Completion` says whether the reply ended on the renderer's stop
  sequence or ran into ``max_tokens``; the caller decides what to do with cut-off replies.

Multi-turn sampling (self-interaction) is the caller building ``messages`` turn by turn and
calling `sample_chat` once per turn.

Scoring (`sequence_logprobs`, `reply_logprobs`) computes the summed log-probability of given
replies with ``compute_logprobs`` on exactly the tokens supervised training puts loss on (via
`renderers.conversation.supervised_datum`), so a score, a DPO log-ratio and a forced-choice
judgement all see the same token sequence.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from tinker import types
from tinker_cookbook.renderers import Renderer
from tqdm.auto import tqdm

from .errors import ConfigError, DataError, RendererError
from .renderers import get_renderer
from .renderers.conversation import (
    generation_prompt,
    parse_reply,
    supervised_datum,
    validate_messages,
)
from .store import append_jsonl

logger = logging.getLogger(__name__)

DEFAULT_CHUNK_SIZE = 128
"""Sample calls in flight at once (the window): large enough for a full local batch and real
concurrency on Tinker, small enough that an interruption loses little."""


class SamplerLike(Protocol):
    """What this module needs from a sampling client (Tinker's or the local engine's)."""

    def sample(self, prompt: types.ModelInput, num_samples: int, sampling_params: Any) -> Any: ...

    def compute_logprobs(self, prompt: types.ModelInput) -> Any: ...

    def get_tokenizer(self) -> Any: ...


@dataclass(frozen=True)
class SampleRequest:
    """One reply to sample.

    key: the request's stable identity, unique within a call and stable across reruns; it
        names the row in the log and seeds the sample.
    messages: the conversation so far (system/user/assistant dicts); the reply is the next
        assistant turn.
    prefill: text the reply is forced to start with (it is part of the prompt, not sampled).
    meta: anything the caller wants back on the `Completion` (ids, indices); not hashed, so
        changing it does not invalidate logged rows.
    """

    key: str
    messages: Sequence[Mapping[str, Any]]
    prefill: str = ""
    meta: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Completion:
    """One sampled reply.

    text: the sampled text WITHOUT the prefill (``prefill + text`` is the whole reply).
    complete: True when the reply ended on the renderer's stop sequence, False when it was cut
        off by ``max_tokens``.
    stop_reason: the sampler's own reason (``"stop"`` or ``"length"``).
    num_tokens / prompt_tokens: sampled tokens (stop token included) and prompt tokens.
    logprob_sum: summed log-probability of the sampled tokens (None if the sampler gave none).
    seed: the seed this request was sampled with (derived from the run seed and the key).
    tokens / token_logprobs: the sampled tokens and their log-probabilities, kept only when
        `sample_chat` is asked for them (``return_tokens=True``; RL needs the exact tokens,
        since decoding and re-encoding text need not give them back).
    """

    key: str
    text: str
    prefill: str
    complete: bool
    stop_reason: str
    num_tokens: int
    prompt_tokens: int
    logprob_sum: float | None
    seed: int
    meta: Mapping[str, Any] = field(default_factory=dict)
    tokens: list[int] | None = None
    token_logprobs: list[float] | None = None

    @property
    def full_text(self) -> str:
        """The reply as the reader sees it: prefill plus sampled text."""
        return self.prefill + self.text

    def to_record(self) -> dict[str, Any]:
        return {**asdict(self), "meta": dict(self.meta)}

    @classmethod
    def from_record(cls, row: Mapping[str, Any]) -> "Completion":
        names = cls.__dataclass_fields__
        return cls(**{k: v for k, v in row.items() if k in names})


@dataclass(frozen=True)
class SampleLog:
    """What a log file holds: rows by key, and how many torn lines were found."""

    rows: dict[str, dict[str, Any]]
    torn_lines: int = 0


# -- pure helpers --------------------------------------------------------------------------------
def derive_seed(seed: int, key: str) -> int:
    """The seed of request ``key`` in a run seeded with ``seed``: a stable 31-bit hash.

    31 bits keep the value valid for every backend's seed field; collisions only mean two
    requests share a random stream, which is harmless.
    """
    digest = hashlib.sha256(f"{int(seed)}\x1f{key}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def request_digest(
    request: SampleRequest,
    *,
    max_tokens: int,
    temperature: float,
    top_p: float,
    top_k: int,
    seed: int,
    return_tokens: bool = False,
) -> str:
    """Hash of everything that determines a logged row (not the request's ``meta``)."""
    blob = json.dumps(
        {
            "messages": [dict(m) for m in validate_messages(request.messages)],
            "prefill": request.prefill,
            "max_tokens": max_tokens,
            "temperature": float(temperature),
            "top_p": float(top_p),
            "top_k": top_k,
            "seed": seed,
            **({"return_tokens": True} if return_tokens else {}),
        },
        sort_keys=True,
        ensure_ascii=False,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def check_unique_keys(requests: Sequence[SampleRequest]) -> None:
    """Refuse empty or duplicated keys: a key is a row of the log and a seed."""
    seen: set[str] = set()
    for index, request in enumerate(requests):
        if not isinstance(request.key, str) or not request.key:
            raise DataError(
                f"request {index}: expected a non-empty string key, found {request.key!r}"
            )
        if request.key in seen:
            raise DataError(
                f"request {index}: key {request.key!r} appears more than once; each request "
                "needs its own key (e.g. '<prompt_id>:s<sample_index>')"
            )
        seen.add(request.key)


def read_log(log_path: Path | str, repair: bool = False) -> SampleLog:
    """Rows of a sampling log by key; a torn last line is counted (and cut off if ``repair``).

    A process killed while appending leaves a last line without its newline. Appending after it
    would glue the next record onto that fragment and make the log unreadable, so ``repair``
    truncates the file to its last complete line (or adds the missing newline when the last
    line is whole). A bad line anywhere else is real corruption and raises `DataError`.
    """
    path = Path(log_path)
    if not path.is_file():
        return SampleLog({})
    data = path.read_bytes()
    lines = data.split(b"\n")
    ends_cleanly = data.endswith(b"\n") or not data
    rows: dict[str, dict[str, Any]] = {}
    torn = 0
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        is_last = number == len(lines)  # only a line not followed by a newline
        try:
            row = json.loads(raw.decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            if is_last:
                torn = 1
                break
            raise DataError(f"{path}:{number}: not valid JSON (the log is corrupted)") from None
        if not isinstance(row, dict) or not isinstance(row.get("key"), str):
            raise DataError(f"{path}:{number}: expected a JSON object with a string 'key'")
        rows.setdefault(row["key"], row)
    if repair and not ends_cleanly:
        with path.open("r+b") as handle:
            if torn:
                handle.truncate(data.rfind(b"\n") + 1)
            else:
                handle.seek(0, os.SEEK_END)
                handle.write(b"\n")
    return SampleLog(rows, torn)


def _resolve_sampler(sampler: SamplerLike | Callable[[], Any]) -> SamplerLike:
    """A client as given, or the client a zero-argument factory makes (only when needed).

    The factory may return the SDK's future of a client (``create_sampling_client`` on
    Tinker >= 0.38); `resolve_client` unwraps it.
    """
    from .backends import resolve_client

    if not hasattr(sampler, "sample") and not hasattr(sampler, "result"):
        sampler = sampler()  # type: ignore[operator]
    return resolve_client(sampler)


def _resolve_renderer(renderer: Renderer | str, sampler: SamplerLike) -> Renderer:
    if isinstance(renderer, str):
        return get_renderer(renderer, sampler.get_tokenizer())
    return renderer


def _check_settings(max_tokens: int, temperature: float, top_p: float, chunk_size: int) -> None:
    if not isinstance(max_tokens, int) or max_tokens < 1:
        raise ConfigError(f"max_tokens={max_tokens!r}: expected an integer >= 1")
    if temperature < 0:
        raise ConfigError(f"temperature={temperature!r}: expected >= 0")
    if not 0 < top_p <= 1:
        raise ConfigError(f"top_p={top_p!r}: expected in (0, 1]")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ConfigError(f"chunk_size={chunk_size!r}: expected an integer >= 1")


# -- sampling ------------------------------------------------------------------------------------
def sample_chat(
    sampler: SamplerLike | Callable[[], SamplerLike],
    renderer: Renderer | str,
    requests: Sequence[SampleRequest],
    *,
    max_tokens: int,
    temperature: float,
    top_p: float,
    top_k: int = -1,
    seed: int,
    log_path: Path | str | None = None,
    desc: str = "sampling",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    return_tokens: bool = False,
) -> dict[str, Completion]:
    """Sample one reply per request; returns key -> `Completion` in the order of ``requests``.

    ``sampler`` is a sampling client, or a zero-argument callable that makes one; the callable
    is only called when something is left to sample, so a fully logged rerun loads no model.
    ``renderer`` is a renderer, or a renderer name resolved with the sampler's tokenizer.
    With ``log_path``, finished rows are appended as they arrive and a rerun samples only the
    keys the log lacks (see the module docstring). ``chunk_size`` is the window: requests in
    flight at once, the next issued as each result is read. ``return_tokens`` also keeps each
    reply's tokens and per-token log-probabilities (in the log too). Raises `DataError` for
    duplicated keys, a malformed conversation, or a logged row made from a different request
    under the same key.
    """
    check_unique_keys(requests)
    _check_settings(max_tokens, temperature, top_p, chunk_size)
    settings = dict(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        return_tokens=return_tokens,
    )
    seeds = {r.key: derive_seed(seed, r.key) for r in requests}
    digests = {r.key: request_digest(r, **settings, seed=seeds[r.key]) for r in requests}

    results: dict[str, Completion] = {}
    path = Path(log_path) if log_path is not None else None
    if path is not None:
        log = read_log(path, repair=True)
        if log.torn_lines:
            logger.warning(
                "%s: dropped %d torn last line (a write interrupted mid-way); that request "
                "is sampled again",
                path,
                log.torn_lines,
            )
        for request in requests:
            row = log.rows.get(request.key)
            if row is None:
                continue
            if row.get("request_digest") != digests[request.key]:
                raise DataError(
                    f"{path}: the logged row for key {request.key!r} was sampled from a different "
                    "request (messages, prefill or sampling settings changed); delete the log or "
                    "use a new key/stage folder"
                )
            results[request.key] = Completion.from_record({**row, "meta": request.meta})

    missing = [r for r in requests if r.key not in results]
    if missing:
        client = _resolve_sampler(sampler)
        chat = _resolve_renderer(renderer, client)
        stop = chat.get_stop_sequences()

        def issue(request: SampleRequest) -> tuple[SampleRequest, int, Any]:
            prompt = generation_prompt(chat, request.messages, prefill=request.prefill or None)
            params = types.SamplingParams(
                max_tokens=max_tokens,
                temperature=temperature,
                top_p=top_p,
                top_k=top_k,
                seed=seeds[request.key],
                stop=stop,
            )
            return request, prompt.length, client.sample(prompt, 1, params)

        waiting = iter(missing)
        in_flight = deque(issue(r) for r in itertools.islice(waiting, chunk_size))
        with tqdm(total=len(requests), initial=len(results), desc=desc, unit="sample") as bar:
            while in_flight:  # read in order; each read makes room for the next request
                request, prompt_tokens, future = in_flight.popleft()
                sequence = future.result().sequences[0]
                completion = _completion(
                    chat, request, sequence, prompt_tokens, seeds[request.key], return_tokens
                )
                if path is not None:
                    append_jsonl(
                        path, {**completion.to_record(), "request_digest": digests[request.key]}
                    )
                results[request.key] = completion
                bar.update(1)
                following = next(waiting, None)
                if following is not None:
                    in_flight.append(issue(following))
    return {r.key: results[r.key] for r in requests}


def _completion(
    renderer: Renderer,
    request: SampleRequest,
    sequence: Any,
    prompt_tokens: int,
    seed: int,
    return_tokens: bool,
) -> Completion:
    tokens = [int(t) for t in sequence.tokens]
    text, complete = parse_reply(renderer, tokens)
    logprobs = None if sequence.logprobs is None else [float(v) for v in sequence.logprobs]
    return Completion(
        key=request.key,
        text=text,
        prefill=request.prefill,
        complete=bool(complete),
        stop_reason=str(sequence.stop_reason),
        num_tokens=len(tokens),
        prompt_tokens=int(prompt_tokens),
        logprob_sum=None if logprobs is None else float(sum(logprobs)),
        seed=seed,
        meta=dict(request.meta),
        tokens=tokens if return_tokens else None,
        token_logprobs=logprobs if return_tokens else None,
    )


# -- scoring -------------------------------------------------------------------------------------
def reply_logprobs(
    sampler: SamplerLike,
    renderer: Renderer,
    items: Sequence[tuple[Sequence[Mapping[str, Any]], str]],
    *,
    include_end: bool = True,
    desc: str | None = None,
) -> list[float]:
    """Summed log-probability of each (conversation, reply) pair's reply as the next turn.

    The tokens scored are exactly those `supervised_datum` gives weight to, so the number is
    what SFT/DPO training sees. ``include_end`` keeps the end-of-turn token (the default: a
    complete reply); set it False to score the reply as a prefix that may continue, e.g. a
    forced-choice answer "A" that the judge might go on to explain. All ``compute_logprobs``
    calls are issued before any is read, so the local engine batches them.
    """
    stop_ids = set()
    if not include_end:
        stops = renderer.get_stop_sequences()
        if not all(isinstance(s, int) for s in stops):
            raise RendererError(
                "include_end=False needs a renderer whose stop sequences are token ids; "
                f"found {stops!r}"
            )
        stop_ids = set(stops)
    pending = []
    for messages, reply in items:
        if not isinstance(reply, str):
            raise DataError(f"expected each reply to be a str, found {type(reply).__name__}")
        datum = supervised_datum(renderer, [*messages, {"role": "assistant", "content": reply}])
        targets = list(datum.loss_fn_inputs["target_tokens"].data)
        tokens = datum.model_input.to_ints() + targets[-1:]
        # weights[i] belongs to target i, i.e. to token i + 1 of the full sequence
        positions = [i + 1 for i, w in enumerate(datum.loss_fn_inputs["weights"].data) if w > 0]
        while positions and tokens[positions[-1]] in stop_ids:
            positions.pop()
        if not positions:  # nothing to score (an empty prefix reply): log-probability 0
            pending.append((positions, None))
            continue
        # Only the reply's positions are asked for, and nothing after the last one is sent: the
        # service (or the local engine) then unembeds just those positions, and candidates that
        # differ only in a one-token answer share everything before it.
        tokens = tokens[: positions[-1] + 1]
        future = sampler.compute_logprobs(
            types.ModelInput.from_ints(tokens),
            prompt_logprobs_last_n=len(tokens) - positions[0],
        )
        pending.append((positions, future))
    scores = []
    for positions, future in tqdm(pending, desc=desc, unit="seq", disable=desc is None):
        if future is None:
            scores.append(0.0)
            continue
        logprobs = future.result()
        scores.append(float(sum(logprobs[p] for p in positions)))
    return scores


def sequence_logprobs(
    sampler: SamplerLike,
    renderer: Renderer,
    messages: Sequence[Mapping[str, Any]],
    completions: Sequence[str],
    *,
    include_end: bool = True,
) -> list[float]:
    """Summed log-probability of each completion as the assistant's reply to ``messages``.

    The common case of `reply_logprobs`: one conversation, several candidate replies (forced
    choice, reward by likelihood, DPO chosen vs rejected).
    """
    return reply_logprobs(
        sampler, renderer, [(messages, c) for c in completions], include_end=include_end
    )


__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "Completion",
    "SampleLog",
    "SampleRequest",
    "check_unique_keys",
    "derive_seed",
    "read_log",
    "reply_logprobs",
    "request_digest",
    "sample_chat",
    "sequence_logprobs",
]
