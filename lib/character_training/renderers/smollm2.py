"""SmolLM2 chat renderer: ChatML with SmolLM2's default system prompt.

SmolLM2-Instruct speaks ChatML, the same wire format as Qwen3's instruct models, so this renderer
builds on the cookbook's `Qwen3InstructRenderer`:

    <|im_start|>system
    You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>
    <|im_start|>user
    Hi<|im_end|>
    <|im_start|>assistant
    Hello!<|im_end|>

Design decision: the renderer reproduces SmolLM2's own chat template, including the default
system prompt (`SMOLLM2_DEFAULT_SYSTEM_PROMPT`) that the template inserts when a conversation has
no system message. That is the context the model was instruction-tuned in, and it is what "the
student without a constitution" sees when deployed with its stock template. A conversation that
starts with a system message (for example a constitution) renders that message instead. Both
`build_generation_prompt` and `build_supervised_example` insert the default, so a trained reply
always follows the same prefix that sampling gives the model.

Where the tokens differ from `tokenizer.apply_chat_template`, and why:

* A supervised example ends at the final `<|im_end|>`. The template also writes a newline after
  it, which the model never produces (sampling stops at `<|im_end|>`), so training on it would
  only waste a position.
* The template tokenizes the whole conversation as one string, so leading whitespace in a
  message's content can merge with the newline that ends its `<|im_start|>role\\n` header (two
  newlines become one token). For system and user messages we tokenize header and content
  together, as the template does. For assistant messages we keep them apart, as the cookbook
  does: at sampling time the header's newline is already a separate token in the prompt, so the
  merged form is a sequence the model can never produce and we should not train on it.
"""

from __future__ import annotations

import tinker
import torch
from tinker_cookbook.renderers.base import (
    Message,
    ParseTermination,
    RenderContext,
    RenderedMessage,
    Role,
    ToolSpec,
    TrainOnWhat,
    parse_response_for_stop_token,
)
from tinker_cookbook.renderers.qwen3 import Qwen3InstructRenderer

from ..errors import RendererError

RENDERER_NAME = "smollm2"

SMOLLM2_DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
)
"""Inserted by SmolLM2-Instruct's chat template when a conversation has no system message."""


def with_default_system_prompt(messages: list[Message]) -> list[Message]:
    """Prepend SmolLM2's default system message unless the conversation already has one.

    An empty conversation stays empty, as in the chat template (its loop never runs).
    """
    if not messages or messages[0]["role"] == "system":
        return list(messages)
    return [Message(role="system", content=SMOLLM2_DEFAULT_SYSTEM_PROMPT), *messages]


class SmolLM2Renderer(Qwen3InstructRenderer):
    """ChatML renderer that matches SmolLM2-Instruct's chat template (see module docstring)."""

    def build_generation_prompt(
        self, messages: list[Message], role: Role = "assistant", prefill: str | None = None
    ) -> tinker.ModelInput:
        """Prompt for sampling, with the default system prompt when none is given."""
        return super().build_generation_prompt(
            with_default_system_prompt(messages), role=role, prefill=prefill
        )

    def build_supervised_example(
        self,
        messages: list[Message],
        train_on_what: TrainOnWhat = TrainOnWhat.LAST_ASSISTANT_MESSAGE,
    ) -> tuple[tinker.ModelInput, torch.Tensor]:
        """Tokens and weights for training, with the same system prefix as sampling uses."""
        return super().build_supervised_example(
            with_default_system_prompt(messages), train_on_what=train_on_what
        )

    def render_message(self, message: Message, ctx: RenderContext) -> RenderedMessage:
        """Render one turn; system and user turns are tokenized the way the template does."""
        content = message["content"]
        if message["role"] == "assistant" or not isinstance(content, str):
            return super().render_message(message, ctx)
        return self._render_prompt_turn(message["role"], content, ctx)

    def _render_prompt_turn(self, role: str, content: str, ctx: RenderContext) -> RenderedMessage:
        """Tokenize `role\\ncontent` as one string so leading whitespace merges as in HF.

        The header chunk is cut at the last token boundary that does not pass the end of
        `role\\n`; a token that straddles the boundary (merged newlines) goes to the output.
        Special-token text inside the content stays plain text, as in the parent renderer.
        """
        opener = self.tokenizer.encode(
            ("\n" if ctx.idx > 0 else "") + "<|im_start|>", add_special_tokens=False
        )
        head_text = f"{role}\n"
        body = self.tokenizer.encode(
            head_text + content, add_special_tokens=False, split_special_tokens=True
        )
        cut = 0
        while cut < len(body) and len(self.tokenizer.decode(body[: cut + 1])) <= len(head_text):
            cut += 1
        header = tinker.types.EncodedTextChunk(tokens=opener + body[:cut])
        output: list[tinker.ModelInputChunk] = [
            tinker.types.EncodedTextChunk(tokens=body[cut:]),
            tinker.types.EncodedTextChunk(tokens=[self._end_message_token]),
        ]
        return RenderedMessage(header=header, output=output)

    def parse_response(self, response: list[int]) -> tuple[Message, ParseTermination]:
        """Decode a sampled reply up to `<|im_end|>`.

        SmolLM2 has no thinking or tool-call syntax, so unlike the Qwen3 parent we do not look
        for `<think>` or `<tool_call>` blocks: the reply is always returned as plain text.
        """
        return parse_response_for_stop_token(response, self.tokenizer, self._end_message_token)

    def create_conversation_prefix_with_tools(
        self, tools: list[ToolSpec], system_prompt: str = ""
    ) -> list[Message]:
        """SmolLM2-135M's template has no tool format; refuse rather than emit Qwen's."""
        raise RendererError(
            "the smollm2 renderer does not support tools: SmolLM2's chat template has no tool "
            "format; use a renderer for a tool-calling model"
        )
