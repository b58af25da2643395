"""Chat transcripts as supervised training examples: ids, rendering, fitting, batch losses.

Stage 05 trains on stage 04's transcripts and stage 09's SFT start on stage 02's chosen
replies; both turn conversations into loss-on-every-assistant-turn datums, fit them to a token
budget, normalise a batch's weights to a per-token mean and read the per-kind losses back in
the same way. That shared part lives here (the stage modules keep only what is theirs); see
stage 05's docstring for why each choice was made.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tinker import types

from .errors import DataError
from .renderers.conversation import loss_positions, supervised_datum, truncate_datum
from .training import StepBatch

REFLECTION = "reflection"
INTERACTION = "self_interaction"
MIN_LOSS_TOKENS = 2

PLACEHOLDER = re.compile(r"\{\{?\s*[A-Za-z_][A-Za-z0-9_]*\s*\}\}?")
"""A template field left unfilled: ``{NAME}``, ``{name}``, ``{{ persona }}``."""


@dataclass(frozen=True)
class Transcript:
    """One conversation to train on: a stable id, its kind and its messages."""

    id: str
    kind: str
    messages: tuple[Mapping[str, Any], ...]


@dataclass(frozen=True)
class Example:
    """A rendered transcript ready for ``forward_backward``, and how it was fitted."""

    id: str
    kind: str
    datum: types.Datum
    assistant_turns: int  # assistant turns that carry loss
    turns_removed: int  # messages removed from the end to fit max_length
    cut: bool  # cut mid-turn (even the first reply did not fit)
    loss_tokens: int

    @property
    def tokens(self) -> int:
        return self.datum.model_input.length

    def record(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "assistant_turns": self.assistant_turns,
            "turns_removed": self.turns_removed,
            "cut": self.cut,
            "tokens": self.tokens,
            "loss_tokens": self.loss_tokens,
        }


def transcript_kind(messages: Sequence[Mapping[str, Any]]) -> str:
    """A self-interaction opens with its system line; a reflection has none."""
    first = messages[0] if messages else {}
    return (
        INTERACTION if isinstance(first, Mapping) and first.get("role") == "system" else REFLECTION
    )


def as_transcripts(conversations: Sequence[Any]) -> list[Transcript]:
    """Stage 04's conversations as `Transcript` objects with stable ids.

    Accepts a list of messages per conversation (the `sft_conversations` contract) or a
    mapping with ``messages`` and optional ``id``/``kind``. Without an id, a conversation is
    named by its kind and position, which is stable as long as stage 04's output is.
    """
    transcripts: list[Transcript] = []
    seen: set[str] = set()
    for index, item in enumerate(conversations):
        if isinstance(item, Mapping):
            messages = item.get("messages")
            given_id, given_kind = item.get("id"), item.get("kind")
        else:
            messages, given_id, given_kind = item, None, None
        if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
            raise DataError(
                f"conversation {index}: expected a list of messages, found "
                f"{type(messages).__name__}"
            )
        kind = str(given_kind) if given_kind else transcript_kind(messages)
        tid = str(given_id) if given_id else f"{kind}-{index:06d}"
        if tid in seen:
            raise DataError(f"conversation {index}: id {tid!r} appears more than once")
        seen.add(tid)
        transcripts.append(Transcript(tid, kind, tuple(messages)))
    return transcripts


def find_placeholder(messages: Sequence[Mapping[str, Any]]) -> tuple[int, str] | None:
    """The first unfilled template field, as (message index, text), or None."""
    for index, message in enumerate(messages):
        content = message.get("content") if isinstance(message, Mapping) else None
        if isinstance(content, str):
            match = PLACEHOLDER.search(content)
            if match:
                return index, match.group(0)
    return None


def fit_transcript(
    renderer: Any, messages: Sequence[Mapping[str, Any]], max_length: int
) -> tuple[types.Datum, int, bool]:
    """Render with loss on every assistant turn, fitted to ``max_length`` tokens.

    Returns (datum, messages removed from the end, cut mid-turn). Whole turns are removed from
    the end, keeping the transcript ending on an assistant turn, until it fits; when even the
    conversation up to the first reply is too long, that one is cut at ``max_length`` tokens.
    """
    datum = supervised_datum(renderer, messages, train_on="all_assistant")
    if datum.model_input.length <= max_length:
        return datum, 0, False
    ends = [i for i, m in enumerate(messages) if m.get("role") == "assistant"][:-1]
    for end in reversed(ends):
        shorter = supervised_datum(renderer, messages[: end + 1], train_on="all_assistant")
        if shorter.model_input.length <= max_length:
            return shorter, len(messages) - end - 1, False
    first = ends[0] if ends else len(messages) - 1
    shortest = supervised_datum(renderer, messages[: first + 1], train_on="all_assistant")
    return truncate_datum(shortest, max_length), len(messages) - first - 1, True


def build_examples(
    transcripts: Sequence[Transcript], renderer: Any, max_length: int
) -> tuple[list[Example], list[dict[str, Any]]]:
    """Render every transcript; returns (trainable examples, dropped records with reasons)."""
    kept: list[Example] = []
    dropped: list[dict[str, Any]] = []
    for transcript in transcripts:
        messages = transcript.messages
        found = find_placeholder(messages)
        if found is not None:
            index, text = found
            dropped.append(
                {
                    "id": transcript.id,
                    "kind": transcript.kind,
                    "reason": "placeholder",
                    "detail": f"message {index} holds {text!r}",
                }
            )
            continue
        try:
            datum, removed, cut = fit_transcript(renderer, messages, max_length)
        except DataError as exc:
            dropped.append(
                {
                    "id": transcript.id,
                    "kind": transcript.kind,
                    "reason": "malformed",
                    "detail": str(exc),
                }
            )
            continue
        n_loss = len(loss_positions(datum))
        if n_loss < MIN_LOSS_TOKENS:
            dropped.append(
                {
                    "id": transcript.id,
                    "kind": transcript.kind,
                    "reason": "too few loss tokens",
                    "detail": f"{n_loss} loss token(s) after fitting to {max_length} tokens",
                }
            )
            continue
        kept_messages = messages[: len(messages) - removed]
        kept.append(
            Example(
                id=transcript.id,
                kind=transcript.kind,
                datum=datum,
                assistant_turns=sum(m.get("role") == "assistant" for m in kept_messages),
                turns_removed=removed,
                cut=cut,
                loss_tokens=n_loss,
            )
        )
    return kept, dropped


def counts_by_kind(
    transcripts: Sequence[Transcript], kept: Sequence[Example], dropped: Sequence[Mapping]
) -> dict[str, dict[str, int]]:
    """Per kind: transcripts read, trained, dropped (per reason), shortened, cut, tokens."""
    table: dict[str, dict[str, int]] = {}
    for transcript in transcripts:
        row = table.setdefault(transcript.kind, {"transcripts": 0, "trained": 0, "dropped": 0})
        row["transcripts"] += 1
    for example in kept:
        row = table[example.kind]
        row["trained"] += 1
        row["turns_removed"] = row.get("turns_removed", 0) + (example.turns_removed > 0)
        row["cut_mid_turn"] = row.get("cut_mid_turn", 0) + example.cut
        row["tokens"] = row.get("tokens", 0) + example.tokens
        row["loss_tokens"] = row.get("loss_tokens", 0) + example.loss_tokens
    for record in dropped:
        row = table[record["kind"]]
        row["dropped"] += 1
        key = "dropped: " + record["reason"]
        row[key] = row.get(key, 0) + 1
    for row in table.values():
        for key in ("turns_removed", "cut_mid_turn", "tokens", "loss_tokens"):
            row.setdefault(key, 0)
    return table


def normalise_batch(datums: Sequence[types.Datum]) -> tuple[list[types.Datum], int]:
    """The batch with weights divided by its total loss tokens; and that total.

    ``cross_entropy`` sums ``-weight * logprob``, so after this the loss of the batch is its
    mean NLL per loss token (see the module docstring).
    """
    total = sum(float(d.loss_fn_inputs["weights"].to_torch().sum()) for d in datums)
    if total <= 0:
        raise DataError("a training batch has no loss tokens")
    scaled = []
    for datum in datums:
        weights = datum.loss_fn_inputs["weights"].to_torch().float() / total
        inputs = dict(datum.loss_fn_inputs)
        inputs["weights"] = types.TensorData.from_torch(weights)
        scaled.append(types.Datum(model_input=datum.model_input, loss_fn_inputs=inputs))
    return scaled, int(round(total))


def batch_losses(
    examples: Sequence[Example], outputs: Sequence[Mapping[str, Any]]
) -> dict[str, float]:
    """Mean NLL per loss token, overall and per kind, from the returned log-probs."""
    sums: dict[str, list[float]] = {}
    for example, output in zip(examples, outputs):
        lp = output["logprobs"].to_torch().reshape(-1).float()
        w = example.datum.loss_fn_inputs["weights"].to_torch().reshape(-1).float()
        nll, n = float(-(lp * w).sum()), float(w.sum())
        for key in ("all", example.kind):
            acc = sums.setdefault(key, [0.0, 0.0])
            acc[0] += nll
            acc[1] += n
    out = {"train/loss": sums["all"][0] / sums["all"][1]}
    for kind, (nll, n) in sums.items():
        if kind != "all":
            out[f"train/loss_{kind}"] = nll / n
    return out


def cross_entropy_step(
    batch: Sequence[Example], count_name: str, metrics: Mapping[str, Any] | None = None
) -> StepBatch:
    """One optimiser step on ``batch`` for `training.run_training`: its datums normalised to a
    per-token mean (`normalise_batch`), logged with ``metrics`` (known before the step), the
    batch size under ``count_name`` and its loss tokens; the examples ride along for
    `step_losses`."""
    data, loss_tokens = normalise_batch([e.datum for e in batch])
    return StepBatch(
        data,
        "cross_entropy",
        metrics={**(metrics or {}), count_name: len(batch), "train/loss_tokens": loss_tokens},
        payload=batch,
        tokens=sum(e.tokens for e in batch),
    )


def step_losses(batch: StepBatch, output: Any) -> dict[str, float]:
    """`run_training`'s ``read_metrics`` for a `cross_entropy_step`: `batch_losses` of its
    examples."""
    return batch_losses(batch.payload, output.loss_fn_outputs)


def data_digest(transcripts: Sequence[Transcript]) -> str:
    blob = json.dumps(
        [[t.id, t.kind, [dict(m) for m in t.messages]] for t in transcripts],
        sort_keys=True,
        ensure_ascii=False,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:12]
