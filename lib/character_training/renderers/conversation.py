"""The only path from chat messages to tokens (and back) that the pipeline uses.

Every stage that samples or trains goes through these pure functions, so the checks live in one
place and a malformed conversation fails with a `DataError` naming the message at fault, instead
of an assertion deep inside the cookbook or, worse, a silently wrong training example.

Two choices here differ from tinker-cookbook's `conversation_to_datum`:

* A conversation that does not end in an assistant message is refused. The original character
  training code trained on conversations whose last turn was a user turn, which puts loss on an
  earlier reply with the wrong context or on nothing at all.
* A conversation longer than `max_length` is refused rather than truncated: a cut reply teaches
  the model to stop mid-sentence without `<|im_end|>`.

Weights are left as 0/1 (the cookbook's reduction "none"); how the loss is normalised across a
batch is the trainer's decision, not the data's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import tinker
import torch
from tinker import types
from tinker_cookbook.exceptions import RendererError as CookbookRendererError
from tinker_cookbook.renderers import Message, Renderer, TrainOnWhat, get_text_content
from tinker_cookbook.supervised.common import datum_from_model_input_weights

from ..errors import ConfigError, DataError, RendererError

ROLES = ("system", "user", "assistant")

TRAIN_ON: dict[str, TrainOnWhat] = {
    "last_assistant": TrainOnWhat.LAST_ASSISTANT_MESSAGE,
    "all_assistant": TrainOnWhat.ALL_ASSISTANT_MESSAGES,
}
"""Accepted `train_on` values and the cookbook mode each stands for."""


def validate_messages(messages: Sequence[Mapping[str, Any]]) -> list[Message]:
    """Check a conversation and return clean copies holding only `role` and `content`.

    Raises `DataError` (one line: which message, what was expected, what was found) when the
    conversation is empty, a role is not system/user/assistant, a content is not a string, or a
    system message is anywhere but first. Extra keys are dropped so that metadata carried in
    the records (ids, scores, a stray `trainable`) never changes how the cookbook renders.
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise DataError(
            f"expected a conversation as a list of messages, found {type(messages).__name__}"
        )
    if not messages:
        raise DataError("expected at least one message, found an empty conversation")
    clean: list[Message] = []
    for idx, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise DataError(
                f"message {idx}: expected a dict with 'role' and 'content', "
                f"found {type(message).__name__}"
            )
        role = message.get("role")
        if role not in ROLES:
            raise DataError(
                f"message {idx}: expected role 'system', 'user' or 'assistant', found {role!r}"
            )
        content = message.get("content")
        if not isinstance(content, str):
            raise DataError(
                f"message {idx}: expected content to be a str, found {type(content).__name__}"
            )
        if role == "system" and idx != 0:
            raise DataError(
                f"message {idx}: a system message must be the first message, "
                f"found one at index {idx}"
            )
        clean.append(Message(role=role, content=content))
    return clean


def generation_prompt(
    renderer: Renderer, messages: Sequence[Mapping[str, Any]], prefill: str | None = None
) -> tinker.ModelInput:
    """Tokens to sample the next assistant reply from, optionally starting it with `prefill`."""
    return renderer.build_generation_prompt(validate_messages(messages), prefill=prefill)


def supervised_datum(
    renderer: Renderer,
    messages: Sequence[Mapping[str, Any]],
    train_on: str = "last_assistant",
    max_length: int | None = None,
) -> tinker.types.Datum:
    """Turn a conversation ending in an assistant reply into a next-token training datum.

    `train_on` is "last_assistant" (loss on the final reply only; the default, and what every
    SFT and DPO stage uses) or "all_assistant" (every reply in the conversation). The datum's
    `model_input` is tokens[:-1]; its `loss_fn_inputs` hold `target_tokens` = tokens[1:]
    (int64) and `weights` = per-token weights[1:] (float32, 0 or 1), as the cookbook shifts them.
    """
    if train_on not in TRAIN_ON:
        raise ConfigError(
            f"train_on must be one of {', '.join(repr(k) for k in TRAIN_ON)}, found {train_on!r}"
        )
    clean = validate_messages(messages)
    if clean[-1]["role"] != "assistant":
        raise DataError(
            f"message {len(clean) - 1}: expected the last message to be an assistant reply to "
            f"train on, found role {clean[-1]['role']!r}; drop the trailing turn or add the reply"
        )
    model_input, weights = renderer.build_supervised_example(
        clean, train_on_what=TRAIN_ON[train_on]
    )
    length = model_input.length
    if max_length is not None and length > max_length:
        raise DataError(
            f"conversation is {length} tokens, longer than max_length={max_length}; "
            "raise max_length or drop this example (it is not truncated)"
        )
    datum = datum_from_model_input_weights(
        model_input, weights.to(torch.float32), max_length=None, reduction="none"
    )
    if not any(w > 0 for w in datum.loss_fn_inputs["weights"].data):
        raise DataError(
            f"no token has positive weight with train_on={train_on!r}; "
            "the conversation has nothing to train on"
        )
    return datum


def parse_reply(renderer: Renderer, tokens: Sequence[int]) -> tuple[str, bool]:
    """Return a sampled reply's text and whether it ended properly on the stop token.

    The flag is False when the reply was cut off (for example by `max_tokens`); callers
    decide whether to keep such replies. Anything after the first stop token is ignored, since
    a sampler may hand back tokens past it. Reasoning blocks, for renderers that have them, are
    not part of the returned text.
    """
    tokens = list(tokens)
    stops = renderer.get_stop_sequences()
    if stops and all(isinstance(s, int) for s in stops):
        cut = next((i for i, t in enumerate(tokens) if t in stops), None)
        if cut is not None:
            tokens = tokens[: cut + 1]
    try:
        message, termination = renderer.parse_response(tokens)
    except CookbookRendererError as exc:
        raise RendererError(f"could not parse a sampled reply: {exc}") from exc
    return get_text_content(message), termination.is_clean


def stop_sequences(renderer: Renderer) -> list[int] | list[str]:
    """What to pass to the sampler as stop condition (token ids for every ChatML model)."""
    return list(renderer.get_stop_sequences())


__all__ = [
    "ROLES",
    "TRAIN_ON",
    "Message",
    "generation_prompt",
    "parse_reply",
    "stop_sequences",
    "supervised_datum",
    "validate_messages",
]


def truncate_datum(datum: types.Datum, max_length: int) -> types.Datum:
    """The datum cut to its first ``max_length`` positions (the end of the reply goes)."""
    if datum.model_input.length <= max_length:
        return datum
    tokens = datum.model_input.to_ints()[:max_length]
    inputs = {
        key: types.TensorData.from_torch(value.to_torch()[:max_length])
        for key, value in datum.loss_fn_inputs.items()
    }
    return types.Datum(model_input=types.ModelInput.from_ints(tokens), loss_fn_inputs=inputs)


def loss_positions(datum: types.Datum) -> torch.Tensor:
    """Indices of the positions whose target carries loss (weight > 0)."""
    weights = datum.loss_fn_inputs["weights"].to_torch().reshape(-1)
    return torch.nonzero(weights > 0).reshape(-1)
