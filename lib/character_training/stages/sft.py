"""Stage 05: supervised fine-tuning on the introspection transcripts, the second half of
character training.

Inputs: the "dpo" checkpoint's *state* (``checkpoints.json``, written by notebook 03) and the
chat transcripts stage 04 produced, as `introspect.sft_conversations` returns them: each a
list of ``{"role", "content"}`` messages, with the constitution already removed. A
self-reflection is [user instruction, assistant reply]; a self-interaction starts with a short
neutral system line naming the assistant, then alternates user and assistant turns and ends on
an assistant turn. Training on them *without* the constitution is prompt distillation: the
model learns to produce, unprompted, what it wrote while it could read its character.

Outputs (``runs/<persona>/<size>/05_sft/``):

* ``data.jsonl``: per trained transcript its id, kind, assistant turns kept, turns removed to
  fit ``sft.max_length``, whether it had to be cut mid-turn, tokens and loss tokens;
* ``dropped.jsonl``: transcripts not trained on, with the reason (fewer than two loss tokens,
  an unfilled ``{placeholder}``, a malformed conversation);
* ``metrics.jsonl``: one row per optimiser step (loss per token, overall and per kind, learning
  rate, gradient norm, tokens/s);
* ``progress.json`` + states every ``sft.save_every`` steps (resume point, with the optimiser);
* checkpoint "final" in the run's ``checkpoints.json`` (sampler path + state path).

Choices, and why:

* **Start from the DPO weights, not the DPO optimiser.** The "dpo" state is loaded weights-only
  (`training.open_training_client` with ``init_state``): SFT is a new run with fresh Adam
  moments, so the LoRA adapter of stage 03 keeps training. The paper trained a second adapter
  and merged the two linearly; Tinker trains one adapter per client, and continuing it is the
  nearest equivalent there.
* **Loss on every assistant turn, never on a system or user turn**
  (`supervised_datum` with ``train_on="all_assistant"``): each reply and its end-of-turn token
  carry weight 1, everything else 0. In a self-interaction the "user" turns were also written
  by the model, but as the other instance; training on them would teach the assistant to
  speak as its interlocutor. The original code trained on a transcript whose last turn was a
  user turn; a transcript must end on an assistant turn here.
* **Per-token loss over the batch.** Weights are divided by the number of loss tokens in the
  whole batch, so the ``cross_entropy`` sum is the mean negative log-likelihood per loss token
  and every token counts the same, whichever transcript it sits in (a ten-turn
  self-interaction outweighs a short reflection in proportion to its length). This is the
  quantity tinker-cookbook logs as its mean NLL (``-sum(w * lp) / sum(w)`` over the batch);
  note that the cookbook's *training* default (``reduction="mean"``) instead normalises each
  example to weight 1, which weighs a short reflection's tokens more.
* **Too-long transcripts lose whole turns from the end** until they fit ``sft.max_length`` and
  still end on an assistant turn; only when even the first reply does not fit is it cut
  mid-turn (that reply then has no end-of-turn token to learn). Both are counted. A transcript
  left with fewer than two loss tokens is dropped and recorded.
* **No template text leaks in.** A ``{placeholder}`` (the original data kept a literal
  ``{NAME}``) in a sampled turn drops the transcript; in a system line it is a template bug
  and stops the stage, as does a system line that carries constitution text.
* **Resumable and reproducible.** Batches are a seeded shuffle per epoch of stable transcript
  ids; a resumed run reloads weights and optimiser from ``progress.json`` and redoes only the
  steps after it, ending with the adapter an uninterrupted run ends with.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tinker import types
from tqdm.auto import tqdm

from ..config import RunParams
from ..constitutions import load_constitution
from ..errors import ConfigError, DataError
from ..metrics import JsonlLogger
from ..prompts import assistant_name_for
from ..renderers import get_renderer, renderer_for_model
from ..renderers.conversation import supervised_datum
from ..store import StageDir, find_checkpoint, stage_dir, write_jsonl
from ..training import (
    finish_checkpoint,
    learning_rate_at,
    open_training_client,
    save_if_due,
    step_record,
    truncate_metrics,
)
from .dpo import loss_positions, truncate_datum

logger = logging.getLogger(__name__)

STAGE = "05_sft"
INTROSPECTION_STAGE = "04_introspection"
START_CHECKPOINT = "dpo"
CHECKPOINT = "final"
REFLECTION = "reflection"
INTERACTION = "self_interaction"
MIN_LOSS_TOKENS = 2

PLACEHOLDER = re.compile(r"\{\{?\s*[A-Za-z_][A-Za-z0-9_]*\s*\}\}?")
"""A template field left unfilled: ``{NAME}``, ``{name}``, ``{{ persona }}``."""


@dataclass(frozen=True)
class Config:
    """Stage 05 settings, derived from `RunParams` (see `config.SFTParams` for each field)."""

    student: str
    student_renderer: str
    lora_rank: int
    learning_rate: float
    batch_size: int
    epochs: int
    warmup_fraction: float
    schedule: str
    max_length: int
    save_every: int
    seed: int
    start_state: str = ""
    data_digest: str = ""

    @classmethod
    def from_params(
        cls, params: RunParams, start_state: str = "", data_digest: str = ""
    ) -> "Config":
        s = params.sft
        return cls(
            student=params.student,
            student_renderer=params.renderers.get(params.student)
            or renderer_for_model(params.student),
            lora_rank=params.lora_rank,
            learning_rate=s.learning_rate,
            batch_size=s.batch_size,
            epochs=s.epochs,
            warmup_fraction=s.warmup_fraction,
            schedule=s.schedule,
            max_length=s.max_length,
            save_every=s.save_every,
            seed=params.seed,
            start_state=start_state,
            data_digest=data_digest,
        )

    def fingerprint(self) -> str:
        return hashlib.sha256(repr(sorted(asdict(self).items())).encode()).hexdigest()[:12]


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


@dataclass(frozen=True)
class Result:
    stage_dir: Path
    counts: dict[str, Any]
    checkpoint: Any
    by_kind: dict[str, dict[str, int]] = field(default_factory=dict)


# -- pure helpers --------------------------------------------------------------------------------
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


def check_system_lines(
    transcripts: Sequence[Transcript], constitution_texts: Sequence[str] = ()
) -> None:
    """Refuse a system line with an unfilled placeholder or with constitution text.

    System lines come from stage 04's template, not from sampling, so either is a bug there
    that would reach every self-interaction: stop in one line instead of training on it.
    """
    for transcript in transcripts:
        first = transcript.messages[0] if transcript.messages else None
        if not isinstance(first, Mapping) or first.get("role") != "system":
            continue
        content = str(first.get("content", ""))
        match = PLACEHOLDER.search(content)
        if match:
            raise DataError(
                f"{transcript.id}: the system line holds an unfilled placeholder "
                f"{match.group(0)!r}; fix stage 04's template and rerun notebook 04"
            )
        leaked = next((t for t in constitution_texts if t and t in content), None)
        if leaked is not None:
            raise DataError(
                f"{transcript.id}: the system line carries constitution text ({leaked[:60]!r}); "
                "SFT trains without the constitution: fix stage 04 and rerun notebook 04"
            )


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


def epoch_batches(ids: Sequence[str], batch_size: int, epochs: int, seed: int) -> list[list[str]]:
    """Every optimiser step's transcript ids: a seeded shuffle per epoch, cut into batches.

    Batches never cross epochs (the last one of an epoch may be smaller), and the order
    depends only on the ids and the seed, so a resumed run sees the same steps.
    """
    steps: list[list[str]] = []
    for epoch in range(epochs):
        order = list(ids)
        random.Random(f"{seed}:sft-epoch:{epoch}").shuffle(order)
        steps += [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    return steps


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


def data_digest(transcripts: Sequence[Transcript]) -> str:
    blob = json.dumps(
        [[t.id, t.kind, [dict(m) for m in t.messages]] for t in transcripts],
        sort_keys=True,
        ensure_ascii=False,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


# -- the stage -----------------------------------------------------------------------------------
def assistant_name(params: RunParams) -> str:
    """The NAME stage 04 filled into its prompts (``assistant_name`` or the student's family)."""
    return params.assistant_name or assistant_name_for(params.student)


def load_conversations(params: RunParams) -> list[Any]:
    """Stage 04's training transcripts (constitution removed), via `introspect`.

    Fails in one line naming notebook 04 when its files are missing.
    """
    from . import introspect  # stage 04's module; imported here so stage 05 loads without it

    return list(introspect.sft_conversations(params.run_dir, assistant_name(params)))


def introspection_counts(params: RunParams) -> dict[str, int]:
    """What stage 04 left out of the training transcripts, by reason (for the notebook)."""
    from . import introspect

    return dict(introspect.sft_counts(params.run_dir, assistant_name(params)))


def run(
    params: RunParams,
    service_client: Any,
    on_existing: str = "resume",
    conversations: Sequence[Any] | None = None,
) -> Result:
    """Fine-tune the "dpo" weights on stage 04's transcripts; records checkpoint "final".

    ``conversations`` overrides what stage 04 wrote (tests, ablations); by default they come
    from `load_conversations`. Resumable (see the module docstring).
    """
    start = find_checkpoint(params.run_dir, START_CHECKPOINT)
    if not start.state_path:
        raise DataError(
            f"checkpoint {START_CHECKPOINT!r} has no training state to continue from: rerun "
            "notebook 03_dpo"
        )
    raw = load_conversations(params) if conversations is None else list(conversations)
    transcripts = as_transcripts(raw)
    if not transcripts:
        left_out = ""
        if conversations is None:  # say what stage 04 left out (e.g. every reply cut)
            counts = introspection_counts(params)
            left_out = (
                " (stage 04 left out: "
                + ", ".join(f"{k}={v}" for k, v in counts.items() if v and k != "transcripts")
                + ")"
            )
        raise DataError(
            f"{INTROSPECTION_STAGE}: no transcripts to train on{left_out}: check "
            "introspection.response_tokens and rerun notebook 04_introspection"
        )
    constitution = load_constitution(
        params.constitution_ref, allow_opt_in=params.allow_misaligned, prompts_per_assertion=None
    )
    check_system_lines(transcripts, [a.text for a in constitution.assertions])

    config = Config.from_params(params, start.state_path, data_digest(transcripts))
    stage: StageDir = stage_dir(params.run_dir, STAGE)
    stage.prepare(config.fingerprint(), on_existing, asdict(config))
    finished = stage.manifest()
    if finished.get("status") == "done":
        counts = finished.get("counts", {})
        return Result(
            stage.path,
            counts,
            find_checkpoint(params.run_dir, CHECKPOINT),
            counts.get("by_kind", {}),
        )

    client, done_steps = open_training_client(
        service_client,
        stage,
        base_model=config.student,
        rank=config.lora_rank,
        seed=config.seed,
        init_state=start.state_path,
    )
    rank = getattr(client, "rank", None)
    if isinstance(rank, int) and rank != config.lora_rank:
        raise ConfigError(
            f"lora_rank={config.lora_rank} but the {START_CHECKPOINT!r} adapter has rank {rank}: "
            "SFT continues that adapter; set lora_rank to match or retrain notebook 03"
        )
    renderer = get_renderer(config.student_renderer, client.get_tokenizer())
    examples, dropped = build_examples(transcripts, renderer, config.max_length)
    by_kind = counts_by_kind(transcripts, examples, dropped)
    write_jsonl(stage.file("data.jsonl"), (e.record() for e in examples))
    write_jsonl(stage.file("dropped.jsonl"), dropped)
    if not examples:
        raise DataError(
            f"none of the {len(transcripts)} stage-04 transcripts is trainable (see "
            f"{stage.file('dropped.jsonl')}): check notebook 04_introspection's output"
        )
    by_id = {e.id: e for e in examples}

    steps = epoch_batches(list(by_id), config.batch_size, config.epochs, config.seed)
    metrics_path = stage.file("metrics.jsonl")
    truncate_metrics(metrics_path, done_steps)
    log = JsonlLogger(metrics_path)
    total = len(steps)
    bar = tqdm(total=total, initial=done_steps, desc="SFT", unit="step")
    for step in range(done_steps + 1, total + 1):
        batch = [by_id[i] for i in steps[step - 1]]
        started = time.perf_counter()
        data, loss_tokens = normalise_batch([e.datum for e in batch])
        out = client.forward_backward(data, "cross_entropy").result()
        lr = learning_rate_at(
            step, total, config.learning_rate, config.warmup_fraction, config.schedule
        )
        optim = client.optim_step(types.AdamParams(learning_rate=lr)).result()
        elapsed = time.perf_counter() - started
        tokens = sum(e.tokens for e in batch)
        row: dict[str, Any] = batch_losses(batch, out.loss_fn_outputs)
        row.update(step_record(step, total, config.epochs, lr, optim, tokens, elapsed))
        row.update(
            {
                "train/transcripts": len(batch),
                "train/loss_tokens": loss_tokens,
            }
        )
        log.log(step, row)
        save_if_due(client, stage, step, total, config.save_every)
        bar.update(1)
    bar.close()

    checkpoint = finish_checkpoint(client, params.run_dir, CHECKPOINT, STAGE, config.student)
    counts = {
        "transcripts": len(transcripts),
        "trained": len(examples),
        "dropped": len(dropped),
        "turns_removed": sum(e.turns_removed > 0 for e in examples),
        "cut_mid_turn": sum(e.cut for e in examples),
        "tokens": sum(e.tokens for e in examples),
        "loss_tokens": sum(e.loss_tokens for e in examples),
        "steps": total,
        "by_kind": by_kind,
    }
    stage.finish(**counts)
    return Result(stage.path, counts, checkpoint, by_kind)
