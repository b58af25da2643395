"""Chat renderers: one name per chat format, turning messages into tokens and back.

We reuse tinker-cookbook's renderers rather than writing our own, and add `smollm2` for the
local default model (see `smollm2.py`). `get_renderer` is the one factory the kit uses; it
accepts our names and every cookbook name. `renderer_for_model` picks a renderer name for a
model name so that params files rarely need to set `renderer` by hand.

Importing this package registers `smollm2` with the cookbook's own registry too. That keeps
renderers made here picklable (the cookbook re-creates a renderer from its name on unpickling)
and lets cookbook helpers that take a renderer name accept ours.
"""

from __future__ import annotations

import re
from pathlib import PurePath
from typing import Any

import tinker_cookbook.model_info as cookbook_model_info
import tinker_cookbook.renderers as cookbook_renderers
from tinker_cookbook.exceptions import RendererError as CookbookRendererError
from tinker_cookbook.renderers import Renderer
from tinker_cookbook.tokenizer_utils import Tokenizer

from ..errors import RendererError
from .smollm2 import RENDERER_NAME as SMOLLM2_RENDERER
from .smollm2 import SMOLLM2_DEFAULT_SYSTEM_PROMPT, SmolLM2Renderer

# Built-in names of tinker-cookbook 0.5.8's `get_renderer`. The cookbook exposes no list, so we
# keep one for error messages; tests/test_renderers.py checks it against the cookbook's source.
COOKBOOK_RENDERER_NAMES: tuple[str, ...] = (
    "role_colon",
    "llama3",
    "qwen3",
    "qwen3_vl",
    "qwen3_vl_instruct",
    "qwen3_disable_thinking",
    "qwen3_instruct",
    "qwen3_5",
    "qwen3_5_disable_thinking",
    "qwen3_5_preserve_thinking",
    "qwen3_8_xhigh_reasoning",
    "qwen3_8_medium_reasoning",
    "qwen3_8_low_reasoning",
    "qwen3_8_disable_thinking",
    "deepseekv3",
    "deepseekv3_disable_thinking",
    "deepseekv3_thinking",
    "deepseekv4_1",
    "deepseekv4_1_low_reasoning",
    "deepseekv4_1_max_reasoning",
    "deepseekv4_1_disable_thinking",
    "deepseekv4_1_preserve_thinking",
    "glm5_3_max_reasoning",
    "glm5_3_low_reasoning",
    "glm5_3_high_reasoning",
    "kimi_k2",
    "kimi_k25",
    "kimi_k25_disable_thinking",
    "kimi_k26",
    "kimi_k26_disable_thinking",
    "kimi_k26_preserve_thinking",
    "nemotron3",
    "nemotron3_low_thinking",
    "nemotron3_disable_thinking",
    "nemotron3_preserve_thinking",
    "nemotron3_ultra",
    "nemotron3_ultra_disable_thinking",
    "nemotron3_ultra_medium_thinking",
    "nemotron3_ultra_preserve_thinking",
    "gpt_oss_no_sysprompt",
    "gpt_oss_low_reasoning",
    "gpt_oss_medium_reasoning",
    "gpt_oss_high_reasoning",
    "tml_v0",
)

# Our own rules come first: the cookbook does not know SmolLM2 or our test model, and it maps
# only the Llama/Qwen checkpoints Tinker serves. Base (non-instruct) Llama-3 and Qwen3 models are
# left to the cookbook, which recommends `role_colon` for them, since they never saw a chat format.
_MODEL_RULES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"smollm2|^tiny-random"), SMOLLM2_RENDERER),
    (re.compile(r"llama-?3.*instruct"), "llama3"),
    (re.compile(r"qwen3-(?!vl-).*instruct"), "qwen3_instruct"),
)


def _smollm2_factory(tokenizer: Tokenizer, image_processor: Any = None) -> Renderer:
    return SmolLM2Renderer(tokenizer)


if not cookbook_renderers.is_renderer_registered(SMOLLM2_RENDERER):
    cookbook_renderers.register_renderer(SMOLLM2_RENDERER, _smollm2_factory)


def renderer_names() -> list[str]:
    """Every name `get_renderer` accepts: ours, the cookbook's, and any registered since."""
    names = [SMOLLM2_RENDERER, *COOKBOOK_RENDERER_NAMES]
    names += [n for n in cookbook_renderers.get_registered_renderer_names() if n not in names]
    return names


def get_renderer(name: str, tokenizer: Tokenizer) -> Renderer:
    """Build the renderer called `name` for `tokenizer`.

    Raises `RendererError` for an unknown name (the message lists the valid ones), and wraps
    the cookbook's own `RendererError` when it refuses to build a known one, so callers catch a
    single class. No image processor is passed: this kit is text-only.
    """
    valid = renderer_names()
    if name not in valid:
        raise RendererError(
            f"unknown renderer {name!r}: expected one of {', '.join(valid)}; "
            "set `renderer` to one of these or register a new one with register_renderer()"
        )
    try:
        return cookbook_renderers.get_renderer(name, tokenizer)
    except CookbookRendererError as exc:
        raise RendererError(f"renderer {name!r} could not be built: {exc}") from exc


def renderer_for_model(model_name: str) -> str:
    """Return the renderer name to use for `model_name` when params do not set one.

    Our rules match, case-insensitively, the part after the last "/": the model id without
    its organisation, or a local directory's own name (so a converted SmolLM2 folder still maps
    to `smollm2`). Anything else is asked of the cookbook's model table.
    """
    key = PurePath(model_name).name.lower()
    for pattern, renderer in _MODEL_RULES:
        if pattern.search(key):
            return renderer
    recommend = getattr(cookbook_model_info, "get_recommended_renderer_name", None)
    if recommend is not None:
        try:
            return recommend(model_name)
        except (KeyError, ValueError) as exc:  # the cookbook's ConfigurationError is a ValueError
            reason = f"tinker-cookbook does not know it ({type(exc).__name__}: {exc})"
    else:
        reason = "this tinker-cookbook has no model table"
    raise RendererError(
        f"no renderer known for model {model_name!r}: {reason}; set `renderer` explicitly "
        "(renderer_names() lists the choices; SmolLM2-style ChatML models use 'smollm2')"
    )


__all__ = [
    "COOKBOOK_RENDERER_NAMES",
    "SMOLLM2_DEFAULT_SYSTEM_PROMPT",
    "Renderer",
    "SmolLM2Renderer",
    "get_renderer",
    "renderer_for_model",
    "renderer_names",
]
