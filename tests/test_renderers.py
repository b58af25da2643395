"""Renderer tests: the tokens we sample from and train on are the ones the model expects.

Bugs these pin down:

* a prompt that drifts from SmolLM2's chat template, most easily by dropping the default system
  prompt the template inserts when a conversation has none (the model was tuned with it);
* a training example whose prefix differs from the generation prompt, so the model is trained
  in a context it is never sampled in;
* loss on system or user text, or on an earlier turn, instead of only the assistant reply;
* an off-by-one in the next-token shift of the datum;
* training on a conversation whose last turn is a user turn (the original character training
  code did this), and silent truncation of over-long examples;
* a truncated sample reported as a finished reply.
"""

from __future__ import annotations

import inspect
import pickle
import re

import pytest
import tinker_cookbook.renderers as cookbook_renderers
from character_training.backends.local.model_files import smollm2_dir
from character_training.errors import ConfigError, DataError, RendererError
from character_training.renderers import (
    COOKBOOK_RENDERER_NAMES,
    SMOLLM2_DEFAULT_SYSTEM_PROMPT,
    SmolLM2Renderer,
    get_renderer,
    renderer_for_model,
    renderer_names,
)
from character_training.renderers.conversation import (
    generation_prompt,
    parse_reply,
    stop_sequences,
    supervised_datum,
    validate_messages,
)
from transformers import AutoTokenizer

IM_END = 2
SYSTEM = "You are Ada, a curious and candid assistant."
USER_1 = "What is your favourite number?"
REPLY_1 = "Seven, because it is prime and stubborn."
USER_2 = "And why not eight?"
REPLY_2 = "Eight is too agreeable: it halves so easily."

SINGLE = [{"role": "user", "content": USER_1}, {"role": "assistant", "content": REPLY_1}]
WITH_SYSTEM = [{"role": "system", "content": SYSTEM}, *SINGLE]
MULTI_TURN = [
    *WITH_SYSTEM,
    {"role": "user", "content": USER_2},
    {"role": "assistant", "content": REPLY_2},
]
CONVERSATIONS = {"no_system": SINGLE, "with_system": WITH_SYSTEM, "multi_turn": MULTI_TURN}


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(smollm2_dir())


@pytest.fixture(scope="module")
def renderer(tok):
    return get_renderer("smollm2", tok)


def hf_tokens(tok, messages, add_generation_prompt: bool) -> list[int]:
    return list(
        tok.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, return_dict=False
        )
    )


def trained_text(tok, datum) -> str:
    targets = datum.loss_fn_inputs["target_tokens"].data
    weights = datum.loss_fn_inputs["weights"].data
    return tok.decode([t for t, w in zip(targets, weights, strict=True) if w > 0])


# --- the prompt matches SmolLM2's own template ------------------------------------------------


@pytest.mark.parametrize("name", CONVERSATIONS)
def test_generation_prompt_equals_smollm2_chat_template_token_for_token(tok, renderer, name):
    prompt_messages = CONVERSATIONS[name][:-1]
    ours = generation_prompt(renderer, prompt_messages).to_ints()
    assert ours == hf_tokens(tok, prompt_messages, add_generation_prompt=True)


def test_a_conversation_without_system_message_gets_smollm2s_default_system_prompt(tok, renderer):
    text = tok.decode(generation_prompt(renderer, SINGLE[:1]).to_ints())
    assert SMOLLM2_DEFAULT_SYSTEM_PROMPT in tok.chat_template
    assert text == (
        f"<|im_start|>system\n{SMOLLM2_DEFAULT_SYSTEM_PROMPT}<|im_end|>\n"
        f"<|im_start|>user\n{USER_1}<|im_end|>\n<|im_start|>assistant\n"
    )


def test_a_system_message_replaces_the_default_system_prompt(tok, renderer):
    text = tok.decode(generation_prompt(renderer, WITH_SYSTEM[:-1]).to_ints())
    assert text.startswith(f"<|im_start|>system\n{SYSTEM}<|im_end|>\n")
    assert SMOLLM2_DEFAULT_SYSTEM_PROMPT not in text


def test_prefill_is_appended_after_the_assistant_header(tok, renderer):
    prompt = generation_prompt(renderer, SINGLE[:1], prefill="Seven").to_ints()
    assert prompt == hf_tokens(tok, SINGLE[:1], True) + tok.encode("Seven")


@pytest.mark.parametrize("content", ["\n\nHello", "\n\n\nHi", "  two spaces", "\t tab", ""])
def test_system_and_user_text_with_leading_whitespace_tokenize_like_the_template(
    tok, renderer, content
):
    messages = [{"role": "system", "content": content}, {"role": "user", "content": content}]
    ours = generation_prompt(renderer, messages).to_ints()
    assert ours == hf_tokens(tok, messages, add_generation_prompt=True)


# --- the training example matches the template and the generation prompt ----------------------


@pytest.mark.parametrize("name", CONVERSATIONS)
def test_supervised_example_equals_chat_template_of_the_full_conversation(tok, renderer, name):
    messages = CONVERSATIONS[name]
    tokens, _ = renderer.build_supervised_example(messages)
    hf = hf_tokens(tok, messages, add_generation_prompt=False)
    # The template writes "\n" after the final <|im_end|>; sampling stops before it, so we don't.
    assert tokens.to_ints() == hf[:-1]
    assert tok.decode(hf[-1:]) == "\n"


@pytest.mark.parametrize("name", CONVERSATIONS)
def test_supervised_example_is_the_generation_prompt_followed_by_the_reply(tok, renderer, name):
    messages = CONVERSATIONS[name]
    tokens, _ = renderer.build_supervised_example(messages)
    prompt = generation_prompt(renderer, messages[:-1]).to_ints()
    assert tokens.to_ints() == prompt + tok.encode(messages[-1]["content"]) + [IM_END]


def test_a_reply_with_leading_newlines_is_tokenized_as_the_model_would_sample_it(tok, renderer):
    # The template merges the header's "\n" with the reply's "\n\n" into one token; the model
    # can never produce that after a prompt ending in "\n", so we keep the two apart.
    messages = [SINGLE[0], {"role": "assistant", "content": "\n\nSeven."}]
    tokens = supervised_datum(renderer, messages).model_input.to_ints() + [IM_END]
    prompt = generation_prompt(renderer, messages[:1]).to_ints()
    assert tokens == prompt + tok.encode("\n\nSeven.") + [IM_END]
    assert tokens != hf_tokens(tok, messages, add_generation_prompt=False)[:-1]


# --- loss goes only on assistant text --------------------------------------------------------


@pytest.mark.parametrize("name", CONVERSATIONS)
def test_last_assistant_puts_weight_only_on_the_final_reply_and_its_end_token(tok, renderer, name):
    datum = supervised_datum(renderer, CONVERSATIONS[name], train_on="last_assistant")
    text = trained_text(tok, datum)
    assert text == CONVERSATIONS[name][-1]["content"] + "<|im_end|>"
    for leaked in (SYSTEM, USER_1, USER_2, SMOLLM2_DEFAULT_SYSTEM_PROMPT, "user", "system"):
        assert leaked not in text


def test_all_assistant_puts_weight_on_every_reply_and_nothing_else(tok, renderer):
    text = trained_text(tok, supervised_datum(renderer, MULTI_TURN, train_on="all_assistant"))
    assert text == f"{REPLY_1}<|im_end|>{REPLY_2}<|im_end|>"
    for leaked in (SYSTEM, USER_1, USER_2, "user", "system"):
        assert leaked not in text


def test_datum_targets_are_the_tokens_shifted_left_with_weights_aligned(renderer):
    tokens_input, weights = renderer.build_supervised_example(MULTI_TURN)
    tokens = tokens_input.to_ints()
    datum = supervised_datum(renderer, MULTI_TURN)
    targets = datum.loss_fn_inputs["target_tokens"]
    datum_weights = datum.loss_fn_inputs["weights"]
    assert datum.model_input.to_ints() == tokens[:-1]
    assert targets.dtype == "int64" and datum_weights.dtype == "float32"
    assert len(targets.data) == len(datum_weights.data) == len(tokens) - 1
    assert all(targets.data[i] == tokens[i + 1] for i in range(len(tokens) - 1))
    assert datum_weights.data == [float(w) for w in weights.tolist()[1:]]
    assert targets.data[-1] == IM_END and datum_weights.data[-1] == 1.0
    assert set(datum_weights.data) == {0.0, 1.0}


def test_extra_message_keys_are_dropped_before_rendering(renderer):
    messages = [dict(m, trainable=True, id=i) for i, m in enumerate(SINGLE)]
    assert validate_messages(messages) == SINGLE
    with_extras, plain = supervised_datum(renderer, messages), supervised_datum(renderer, SINGLE)
    assert with_extras.model_input == plain.model_input
    for key in ("target_tokens", "weights"):
        assert with_extras.loss_fn_inputs[key].data == plain.loss_fn_inputs[key].data


# --- bad conversations fail with one clear line ---------------------------------------------


def test_a_conversation_ending_in_a_user_turn_is_refused_for_training(renderer):
    with pytest.raises(
        DataError,
        match=r"message 2: expected the last message to be an "
        r"assistant reply to train on, found role 'user'",
    ):
        supervised_datum(renderer, [*SINGLE, {"role": "user", "content": USER_2}])


def test_an_unknown_role_is_refused(renderer):
    messages = [SINGLE[0], {"role": "tool", "content": "42"}]
    with pytest.raises(
        DataError,
        match=r"message 1: expected role 'system', 'user' or "
        r"'assistant', found 'tool'",
    ):
        generation_prompt(renderer, messages)


def test_a_system_message_that_is_not_first_is_refused(renderer):
    messages = [*SINGLE, {"role": "system", "content": SYSTEM}, SINGLE[0]]
    with pytest.raises(DataError, match=r"message 2: a system message must be the first message"):
        generation_prompt(renderer, messages)


def test_content_that_is_not_a_string_is_refused(renderer):
    with pytest.raises(DataError, match=r"message 0: expected content to be a str, found list"):
        generation_prompt(renderer, [{"role": "user", "content": [{"type": "text"}]}])


def test_an_empty_conversation_is_refused(renderer):
    with pytest.raises(DataError, match="empty conversation"):
        generation_prompt(renderer, [])


def test_a_conversation_longer_than_max_length_is_refused_not_truncated(renderer):
    length = renderer.build_supervised_example(SINGLE)[0].length
    assert supervised_datum(renderer, SINGLE, max_length=length).model_input.length == length - 1
    with pytest.raises(
        DataError,
        match=rf"conversation is {length} tokens, longer than "
        rf"max_length={length - 1}",
    ):
        supervised_datum(renderer, SINGLE, max_length=length - 1)


def test_an_unknown_train_on_value_is_refused(renderer):
    with pytest.raises(
        ConfigError,
        match=r"train_on must be one of 'last_assistant', "
        r"'all_assistant', found 'everything'",
    ):
        supervised_datum(renderer, SINGLE, train_on="everything")


def test_an_unknown_renderer_name_is_refused_with_the_valid_names(tok):
    with pytest.raises(RendererError) as info:
        get_renderer("chatml_typo", tok)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("unknown renderer 'chatml_typo': expected one of smollm2, ")
    assert "llama3" in message and "qwen3_instruct" in message


# --- parsing samples -------------------------------------------------------------------------


def test_a_reply_ending_in_im_end_parses_as_finished(tok, renderer):
    assert parse_reply(renderer, tok.encode("Hello there") + [IM_END]) == ("Hello there", True)


def test_a_reply_without_the_stop_token_parses_as_truncated(tok, renderer):
    assert parse_reply(renderer, tok.encode("Hello there")) == ("Hello there", False)


def test_tokens_after_the_stop_token_are_ignored(tok, renderer):
    tokens = tok.encode("Hi") + [IM_END] + tok.encode("junk") + [IM_END]
    assert parse_reply(renderer, tokens) == ("Hi", True)


def test_smollm2_replies_are_plain_text_even_if_they_mention_think_tags(tok, renderer):
    text = "<think>no</think> Seven."
    assert parse_reply(renderer, tok.encode(text) + [IM_END]) == (text, True)


def test_the_stop_sequence_is_the_im_end_token(tok, renderer):
    assert stop_sequences(renderer) == [IM_END] == [tok.convert_tokens_to_ids("<|im_end|>")]


# --- factory, model mapping, cookbook interop -------------------------------------------------


def test_cookbook_renderer_names_match_the_installed_cookbook():
    source = inspect.getsource(cookbook_renderers.get_renderer)
    assert set(re.findall(r'name == "(\w+)"', source)) == set(COOKBOOK_RENDERER_NAMES)
    assert set(COOKBOOK_RENDERER_NAMES) <= set(renderer_names())


def test_cookbook_renderer_names_are_delegated_to_the_cookbook(tok):
    from tinker_cookbook.renderers.qwen3 import Qwen3InstructRenderer

    qwen = get_renderer("qwen3_instruct", tok)
    assert type(qwen) is Qwen3InstructRenderer
    # Without SmolLM2's default system prompt the plain ChatML renderer starts at the user turn.
    assert qwen.build_generation_prompt(SINGLE[:1]).to_ints() == tok.encode(
        f"<|im_start|>user\n{USER_1}<|im_end|>\n<|im_start|>assistant\n"
    )


def test_the_smollm2_renderer_survives_pickling(tok, renderer):
    clone = pickle.loads(pickle.dumps(renderer))
    assert isinstance(clone, SmolLM2Renderer)
    assert generation_prompt(clone, SINGLE[:1]) == generation_prompt(renderer, SINGLE[:1])


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("HuggingFaceTB/SmolLM2-135M-Instruct", "smollm2"),
        ("smollm2", "smollm2"),
        ("tiny-random", "smollm2"),
        ("/cache/character_training/tiny-random-64-128-2-4-2-0-v1", "smollm2"),
        ("meta-llama/Llama-3.1-8B-Instruct", "llama3"),
        ("meta-llama/Meta-Llama-3-8B-Instruct", "llama3"),
        ("Qwen/Qwen3-4B-Instruct-2507", "qwen3_instruct"),
        ("Qwen/Qwen3-8B", "qwen3"),
        ("Qwen/Qwen3-VL-30B-A3B-Instruct", "qwen3_vl_instruct"),
        ("meta-llama/Llama-3.2-1B", "role_colon"),
    ],
)
def test_renderer_for_model_maps_known_models(model, expected):
    assert renderer_for_model(model) == expected


def test_renderer_for_an_unknown_model_asks_for_an_explicit_renderer():
    with pytest.raises(
        RendererError,
        match=r"no renderer known for model 'acme/parrot-7b': "
        r".*set `renderer` explicitly",
    ):
        renderer_for_model("acme/parrot-7b")


def test_llama3_renderer_renders_a_llama3_prompt_with_an_offline_llama3_style_tokenizer():
    # No Llama-3 tokenizer can be downloaded here, so give SmolLM2's BPE Llama-3's control tokens:
    # the renderer only needs each of them to encode as a single token.
    tok = AutoTokenizer.from_pretrained(smollm2_dir())
    markers = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tok.add_special_tokens({"additional_special_tokens": markers})
    llama = get_renderer("llama3", tok)
    prompt = generation_prompt(llama, WITH_SYSTEM[:-1]).to_ints()
    assert tok.decode(prompt) == (
        f"<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n{SYSTEM}<|eot_id|>"
        f"<|start_header_id|>user<|end_header_id|>\n\n{USER_1}<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    assert stop_sequences(llama) == [eot]
    assert parse_reply(llama, tok.encode(REPLY_1) + [eot]) == (REPLY_1, True)
    assert trained_text(tok, supervised_datum(llama, WITH_SYSTEM)) == REPLY_1 + "<|eot_id|>"
