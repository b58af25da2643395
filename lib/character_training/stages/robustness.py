"""Stage 08: is the trained persona deep or only acted? Adversarial splits, a prefill attack, and
coherence.

Inputs: stage 01's ``general_eval.jsonl`` (held-out general prompts, never trained on; the
first ``evals.robustness_prompts``), the run manifest's checkpoints ``dpo`` (notebook 03) and
``final`` (notebook 05), and the same checkpoints of every other persona trained at this size
(``<runs_dir>/*/<size>/checkpoints.json``): the classifier has one class per persona plus
"base", so it needs every persona's replies. A missing checkpoint is skipped with a note.

Methods (models) compared: ``base`` (the untrained student, no system prompt), ``system_prompt``
(the untrained student with the persona's constitution as its system prompt, the paper's
prompting baseline), ``dpo`` and ``final`` (trained, no system prompt).

What it does, and why:

1. **Replies.** Every method answers every prompt plainly (split ``none``); on the held-out
   prompts it also answers with each of ``evals.robustness_splits`` adversarial instructions
   appended to the user message (`prompts.ADVERSARIAL_INSTRUCTIONS`, split = the instruction's
   key). All sampling goes through `sampling.sample_chat` with resumable logs
   (``<run>/08_robustness/responses/<method>-<digest>.jsonl``, one folder per persona; the
   digest names the model and the sampling settings, so a retrained checkpoint starts a new log
   instead of reusing the old one's replies; base replies live in the current persona's folder).
2. **Classifier.** Prompts are split by prompt (`evaluate.robustness.split_prompts`) into the
   classifier's training prompts and held-out prompts. The classifier is fine-tuned on the
   training prompts' no-instruction replies only: the class of persona P is made of P's replies
   from ``evals.classifier_methods`` (default: system prompt, dpo and final, as the paper trained
   on every method's non-adversarial replies, so no method is favoured by having defined the
   class alone), and the "base" class of the base model's replies. It is then scored only on
   held-out prompts, so no F1 comes from a prompt it was trained on. Where training barely
   moved the models (the tiny preset), their replies in the persona class teach the classifier
   that base-like text is persona; the tiny preset defines the class by the prompted replies.
3. **F1 per method x split.** For method m and split s, the scored set is m's replies of every
   persona (true class: the persona) plus the base model's replies under the same split (true
   class: base), on held-out prompts; the number is macro F1 with a 95% interval that resamples
   prompts. The base rows are the null the persona must stand apart from, and they are the same
   for every method at a split, so methods differ only by their own replies. ``own_class_rate``
   is the plainer reading: the share of m's replies classified as their own persona. "with
   instructions" is the mean macro F1 over the adversarial splits (the paper's headline number),
   resampled with the same prompt draws across splits.
4. **Prefill attack** (paper, appendix C.1). The base model's plain reply is put in the context
   as the assistant's first turn, the user follows up with `prompts.FOLLOW_UP_PROMPT`, and each
   method writes turn two (base continues its own conversation, for the base class). Split
   ``prefill`` of the table: does the persona come back after a turn of default-assistant talk?
5. **Coherence** (paper, 3.3 and appendix D). For each ``evals.coherence_pairs`` pair "a:b" and
   persona, the untrained judge model picks the more coherent of a's and b's plain replies to each
   held-out prompt, in both orders; only order-consistent verdicts count
   (`evaluate.coherence`).

Outputs (``runs/<persona>/<size>/08_robustness/``): ``responses/`` (logs), ``predictions.jsonl``
(every held-out reply with its class probabilities), ``classifier.json`` and
``classifier_metrics.jsonl`` (loss per step; no weights are kept), ``f1_table.csv``,
``summary.csv`` (F1 without vs with instructions and under the prefill attack, per method),
``coherence.csv`` and ``coherence_*.jsonl`` (verdicts, resumable), ``robustness.json``
(everything, with notes), ``manifest.json``.

Resuming: logs are reused by key and request digest; the classifier is retrained only when its
training data or settings changed (its predictions are cached under a digest of both); judge
verdicts are cached per comparison, order, judge and message digest. The stage fingerprint
covers what the logs depend on (student, sampling settings, seed).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..config import PARAMS_DIR, ROBUSTNESS_METHODS, RunParams, read_yaml
from ..constitutions import Constitution, load_constitution
from ..errors import ConfigError, DataError
from ..evaluate import coherence as judge_lib
from ..evaluate.adherence import Estimate, bootstrap_mean, text_key
from ..evaluate.robustness import (
    BASE_CLASS,
    ClassifierSettings,
    bootstrap_macro_f1,
    class_scores,
    split_prompts,
    train_classifier,
)
from ..prompts import (
    ADVERSARIAL_INSTRUCTIONS,
    assistant_name_for,
    persona_system_prompt,
    prefill_attack_messages,
    robustness_messages,
)
from ..renderers import renderer_for_model
from ..sampling import Completion, SampleRequest, sample_chat
from ..store import (
    CHECKPOINTS_FILE,
    Checkpoint,
    StageDir,
    json_safe,
    list_checkpoints,
    read_jsonl,
    stage_dir,
    write_jsonl,
)

logger = logging.getLogger(__name__)

STAGE = "08_robustness"
PROMPTS_STAGE = "01_prompts"
EVAL_FILE = "general_eval.jsonl"
NONE_SPLIT = "none"
PREFILL_SPLIT = "prefill"
BASE, SYSTEM_PROMPT = "base", "system_prompt"
TRAINED = ("dpo", "final")
PERSONA_METHODS = (SYSTEM_PROMPT, *TRAINED)
MAKERS = {"dpo": "03_dpo", "final": "05_sft"}


@dataclass(frozen=True)
class Config:
    """Stage 08 settings, derived from `RunParams` (see `config.EvalParams` for each field)."""

    persona: str
    size: str
    student: str
    student_renderer: str
    judge: str
    judge_renderer: str
    assistant_name: str
    prompts: int
    splits: tuple[str, ...]
    train_fraction: float
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int
    bootstrap: int
    classifier_model: str
    classifier_epochs: int
    classifier_batch_size: int
    classifier_lr: float
    classifier_methods: tuple[str, ...]
    coherence_pairs: tuple[str, ...]
    coherence_modes: tuple[str, ...]
    coherence_calibrate: bool
    judge_max_tokens: int
    judge_temperature: float
    judge_top_p: float
    device: str

    @classmethod
    def from_params(cls, params: RunParams) -> "Config":
        e = params.evals
        return cls(
            persona=params.persona,
            size=params.size,
            student=params.student,
            student_renderer=params.renderers.get(params.student)
            or renderer_for_model(params.student),
            judge=params.judge,
            judge_renderer=params.renderers.get(params.judge) or renderer_for_model(params.judge),
            assistant_name=params.assistant_name or assistant_name_for(params.student),
            prompts=e.robustness_prompts,
            splits=tuple(list(ADVERSARIAL_INSTRUCTIONS)[: e.robustness_splits]),
            train_fraction=e.robustness_train_fraction,
            max_tokens=e.robustness_max_tokens,
            temperature=params.sampling.temperature,
            top_p=params.sampling.top_p,
            top_k=params.sampling.top_k,
            seed=params.seed,
            bootstrap=e.robustness_bootstrap,
            classifier_model=e.classifier_model,
            classifier_epochs=e.classifier_epochs,
            classifier_batch_size=e.classifier_batch_size,
            classifier_lr=e.classifier_lr,
            classifier_methods=tuple(e.classifier_methods),
            coherence_pairs=tuple(e.coherence_pairs),
            coherence_modes=tuple(e.coherence_modes),
            coherence_calibrate=e.coherence_calibrate,
            judge_max_tokens=e.judge_max_tokens,
            judge_temperature=e.judge_temperature,
            judge_top_p=e.judge_top_p,
            device=params.engine.device,
        )

    def sampling(self) -> dict[str, Any]:
        """What every reply log depends on (with the model and the request itself)."""
        return {
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "seed": self.seed,
        }

    def fingerprint(self) -> str:
        """Hash of what the logs depend on; classifier and judge outputs carry their own."""
        blob = {
            "student": self.student,
            "renderer": self.student_renderer,
            "name": self.assistant_name,
            **self.sampling(),
        }
        return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:12]

    def classifier(self) -> ClassifierSettings:
        return ClassifierSettings(
            model=self.classifier_model,
            epochs=self.classifier_epochs,
            batch_size=self.classifier_batch_size,
            learning_rate=self.classifier_lr,
            seed=self.seed,
            device=self.device,
        )


@dataclass(frozen=True)
class PersonaModels:
    """One persona's models: its constitution, system prompt and usable checkpoints."""

    persona: str
    run_dir: Path
    constitution: Constitution
    system_prompt: str
    checkpoints: dict[str, Checkpoint]

    @property
    def methods(self) -> list[str]:
        return [SYSTEM_PROMPT] + [m for m in TRAINED if m in self.checkpoints]


# -- pure helpers --------------------------------------------------------------------------------
def discover_personas(runs_root: Path, size: str, current: str) -> list[str]:
    """The current persona first, then every other persona with a checkpoint manifest at
    ``size`` under ``runs_root`` (sorted)."""
    found = sorted(
        p.parent.parent.name for p in Path(runs_root).glob(f"*/{size}/{CHECKPOINTS_FILE}")
    )
    return [current] + [p for p in found if p != current]


def load_eval_prompts(run_dir: Path, count: int) -> tuple[list[dict[str, str]], list[str]]:
    """The first ``count`` prompts of stage 01's ``general_eval.jsonl``, and any warning.

    Fails in one line when the file is missing or has fewer than two usable prompts (a split
    needs one on each side).
    """
    path = Path(run_dir) / PROMPTS_STAGE / EVAL_FILE
    if not path.is_file():
        raise DataError(
            f"{path}: not found; run notebook 01 first (it writes the held-out general prompts "
            "stage 08 evaluates on)"
        )
    prompts, seen = [], set()
    for number, row in enumerate(read_jsonl(path), start=1):
        pid, text = row.get("id"), row.get("prompt")
        if not isinstance(pid, str) or not pid or pid in seen:
            raise DataError(f"{path}: record {number}: id {pid!r} is missing or repeated")
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{path}: record {number}: expected a non-empty prompt")
        seen.add(pid)
        prompts.append({"id": pid, "prompt": text})
    warnings = []
    if len(prompts) < count:
        warnings.append(
            f"evals.robustness_prompts={count} but {path} holds {len(prompts)} prompts; using "
            "them all (raise prompts.eval_prompts and rerun notebook 01 for more)"
        )
    prompts = prompts[:count]
    if len(prompts) < 2:
        raise DataError(
            f"{path}: {len(prompts)} prompt(s) to use; stage 08 needs at least 2 (one to train "
            "the classifier, one to evaluate): raise evals.robustness_prompts or "
            "prompts.eval_prompts"
        )
    return prompts, warnings


def reply_requests(
    prompts: Sequence[Mapping[str, str]],
    heldout_ids: set[str],
    splits: Sequence[str],
    system: str | None = None,
) -> list[SampleRequest]:
    """Every prompt plainly (split "none"); held-out prompts also under each adversarial split.

    Keys are ``<prompt_id>:<split>``: the same key (hence the same seed) for every method, so
    methods are compared on common random numbers.
    """
    requests = []
    for row in prompts:
        for split in [NONE_SPLIT, *(splits if row["id"] in heldout_ids else ())]:
            instruction = None if split == NONE_SPLIT else split
            requests.append(
                SampleRequest(
                    key=f"{row['id']}:{split}",
                    messages=robustness_messages(row["prompt"], instruction, system),
                    meta={"prompt_id": row["id"], "split": split},
                )
            )
    return requests


def prefill_requests(
    prompts: Sequence[Mapping[str, str]],
    first_replies: Mapping[str, str],
    system: str | None = None,
) -> list[SampleRequest]:
    """Turn two of the prefill attack for every prompt that has a first (base) reply."""
    return [
        SampleRequest(
            key=f"{row['id']}:{PREFILL_SPLIT}",
            messages=prefill_attack_messages(row["prompt"], first_replies[row["id"]], system),
            meta={"prompt_id": row["id"], "split": PREFILL_SPLIT},
        )
        for row in prompts
        if row["id"] in first_replies
    ]


def log_name(method: str, identity: str, settings: Mapping[str, Any]) -> str:
    blob = json.dumps({"model": identity, **settings}, sort_keys=True)
    return f"{method}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}.jsonl"


def parse_pairs(pairs: Sequence[str]) -> list[tuple[str, str]]:
    out = []
    for pair in pairs:
        a, _, b = pair.partition(":")
        if a not in ROBUSTNESS_METHODS or b not in ROBUSTNESS_METHODS or a == b:
            raise ConfigError(
                f"coherence pair {pair!r}: expected 'a:b' with two of {list(ROBUSTNESS_METHODS)}"
            )
        out.append((a, b))
    return out


# -- report --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class F1Row:
    """Classifier scores for one method under one split, on held-out prompts.

    macro_f1: over the persona classes of the method's replies plus "base" (the base model's
    replies under the same split); own_class_rate: share of the method's replies classified as
    their own class (for ``base``: as base; its macro_f1 is NaN). Intervals resample prompts.
    """

    method: str
    split: str
    n_prompts: int
    n_personas: int
    n_replies: int
    macro_f1: Estimate | None
    own_class_rate: Estimate
    per_class_f1: dict[str, float] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        f1 = self.macro_f1
        return {
            "method": self.method,
            "split": self.split,
            "n_prompts": self.n_prompts,
            "n_personas": self.n_personas,
            "n_replies": self.n_replies,
            "macro_f1": f1.value if f1 else math.nan,
            "macro_f1_low": f1.low if f1 else math.nan,
            "macro_f1_high": f1.high if f1 else math.nan,
            "own_class_rate": self.own_class_rate.value,
            "own_class_rate_low": self.own_class_rate.low,
            "own_class_rate_high": self.own_class_rate.high,
        }


@dataclass(frozen=True)
class MethodSummary:
    """Per method: macro F1 without instructions, mean over the adversarial splits, and under
    the prefill attack (each with a 95% prompt-level interval; None where not measured)."""

    method: str
    no_instruction: Estimate | None
    with_instructions: Estimate | None
    prefill: Estimate | None

    def record(self) -> dict[str, Any]:
        out: dict[str, Any] = {"method": self.method}
        for name in ("no_instruction", "with_instructions", "prefill"):
            value = getattr(self, name)
            out[name] = value.value if value else math.nan
            out[f"{name}_low"] = value.low if value else math.nan
            out[f"{name}_high"] = value.high if value else math.nan
        return out


@dataclass
class Report:
    """Everything stage 08 measured; the notebook shows it, ``robustness.json`` keeps it."""

    stage_dir: Path
    personas: list[str]
    methods: dict[str, list[str]]
    splits: list[str]
    train_prompts: list[str]
    heldout_prompts: list[str]
    classifier: dict[str, Any]
    rows: list[F1Row]
    summaries: list[MethodSummary]
    coherence: list[dict[str, Any]]
    notes: list[str]
    responses: list[dict[str, Any]]
    prompts: dict[str, str]

    # tables
    def f1_frame(self) -> Any:
        import pandas as pd

        return pd.DataFrame([r.record() for r in self.rows])

    def f1_matrix(self, value: str = "macro_f1") -> Any:
        """Methods as rows, splits as columns (no instruction first, prefill last)."""
        frame = self.f1_frame()
        order = [NONE_SPLIT, *self.splits, PREFILL_SPLIT]
        methods = [m for m in (*PERSONA_METHODS, BASE) if m in set(frame["method"])]
        matrix = frame.pivot(index="method", columns="split", values=value)
        return matrix.reindex(index=methods, columns=[s for s in order if s in matrix.columns])

    def summary_frame(self) -> Any:
        import pandas as pd

        return pd.DataFrame([s.record() for s in self.summaries])

    def coherence_frame(self) -> Any:
        import pandas as pd

        return pd.DataFrame(self.coherence)

    def examples(self, split: str = NONE_SPLIT, prompts: int = 4, persona: str = "") -> Any:
        """Held-out prompts as rows, methods as columns: each reply after the class the
        classifier gave it (``[classified <class>]``), for reading the scores against the text."""
        import pandas as pd

        persona = persona or self.personas[0]
        pick = {}
        for r in self.responses:
            if r["split"] == split and r.get("predicted") and r["persona"] in (persona, ""):
                pick[(r["prompt_id"], r["method"])] = r
        ids = [p for p in self.heldout_prompts if any(k[0] == p for k in pick)][:prompts]
        methods = [BASE, *self.methods.get(persona, [])]
        table = []
        for pid in ids:
            row = {"prompt": self.prompts.get(pid, pid)}
            for method in methods:
                r = pick.get((pid, method))
                row[method] = "" if r is None else f"[classified {r['predicted']}] {r['text']}"
            table.append(row)
        return pd.DataFrame(table)

    def headline(self) -> dict[str, Any]:
        """The numbers `runner.write_summary` shows next to the report link."""
        out: dict[str, Any] = {
            "personas": len(self.personas),
            "heldout_prompts": len(self.heldout_prompts),
            "classifier": self.classifier.get("model"),
            "classifier_seconds": self.classifier.get("seconds"),
        }
        for s in self.summaries:
            for name in ("no_instruction", "with_instructions", "prefill"):
                value = getattr(s, name)
                if value is not None:
                    out[f"f1_{s.method}_{name}"] = round(value.value, 4)
                    out[f"f1_{s.method}_{name}_ci"] = [round(value.low, 4), round(value.high, 4)]
        for row in self.coherence:
            if row["group"] == judge_lib.ALL_GROUPS:
                key = f"coherence_{row['mode']}_{row['first']}_vs_{row['second']}"
                out[key] = None if math.isnan(row["win_rate"]) else round(row["win_rate"], 4)
                out[f"{key}_inconsistent"] = row["inconsistent_share"]
        return json_safe(out)

    def to_dict(self) -> dict[str, Any]:
        return {
            "personas": self.personas,
            "methods": self.methods,
            "splits": self.splits,
            "split_prompts": {"train": self.train_prompts, "heldout": self.heldout_prompts},
            "classifier": self.classifier,
            "rows": [r.record() | {"per_class_f1": r.per_class_f1} for r in self.rows],
            "summary": [s.record() for s in self.summaries],
            "coherence": self.coherence,
            "notes": self.notes,
        }


# -- the stage -----------------------------------------------------------------------------------
def _persona_settings(persona: str, params: RunParams) -> tuple[str, bool]:
    """(constitution reference, allow_misaligned) of another persona, from its params file."""
    if persona == params.persona:
        return params.constitution_ref, params.allow_misaligned
    path = PARAMS_DIR / "personas" / f"{persona}.yaml"
    data = read_yaml(path) if path.is_file() else {}
    return str(data.get("constitution") or persona), bool(data.get("allow_misaligned", False))


def persona_models(params: RunParams, config: Config, notes: list[str]) -> list[PersonaModels]:
    """Every persona trained at this size, with the checkpoints usable for this student."""
    runs_root = Path(params.run_dir).parent.parent
    out = []
    for persona in discover_personas(runs_root, params.size, params.persona):
        run_dir = runs_root / persona / params.size
        reference, allow = _persona_settings(persona, params)
        try:
            constitution = load_constitution(reference, allow_opt_in=allow)
        except (ConfigError, DataError) as exc:
            if persona == params.persona:
                raise
            notes.append(f"persona {persona}: skipped, its constitution does not load ({exc})")
            continue
        available = list_checkpoints(run_dir)
        checkpoints = {}
        for method in TRAINED:
            checkpoint = available.get(method)
            if checkpoint is None:
                notes.append(
                    f"persona {persona}: no checkpoint {method!r} (notebook {MAKERS[method]} "
                    "makes it); its rows are left out"
                )
            elif checkpoint.base_model != config.student:
                notes.append(
                    f"persona {persona}: checkpoint {method!r} belongs to "
                    f"{checkpoint.base_model!r}, not the student {config.student!r}; left out"
                )
            else:
                checkpoints[method] = checkpoint
        if persona != params.persona and not checkpoints:
            notes.append(f"persona {persona}: no usable checkpoint at {params.size}; not a class")
            continue
        out.append(
            PersonaModels(
                persona=persona,
                run_dir=run_dir,
                constitution=constitution,
                system_prompt=persona_system_prompt(constitution, config.assistant_name),
                checkpoints=checkpoints,
            )
        )
    return out


class _Samplers:
    """Sampling clients made on first use and kept: the base model serves several methods."""

    def __init__(self, service: Any):
        self.service = service
        self._clients: dict[str, Any] = {}

    def factory(self, model_path: str | None, base_model: str) -> Callable[[], Any]:
        def make() -> Any:
            key = model_path or f"base:{base_model}"
            if key not in self._clients:
                from ..backends import resolve_client

                if model_path is None:
                    client = self.service.create_sampling_client(base_model=base_model)
                else:
                    client = self.service.create_sampling_client(model_path=model_path)
                self._clients[key] = resolve_client(client)
            return self._clients[key]

        return make


def _sample(
    samplers: _Samplers,
    config: Config,
    folder: Path,
    method: str,
    checkpoint: Checkpoint | None,
    requests: Sequence[SampleRequest],
    desc: str,
) -> dict[str, Completion]:
    """One model's replies, resumable from its log (named by model identity and settings)."""
    path = checkpoint.sampler_path if checkpoint is not None else None
    identity = path or f"base:{config.student}"
    settings = config.sampling()
    name = log_name(method, identity, settings)
    index_path = folder / "index.json"
    index = json.loads(index_path.read_text()) if index_path.is_file() else {}
    if index.get(name, {}).get("model") != identity:
        index[name] = {"method": method, "model": identity, **settings}
        folder.mkdir(parents=True, exist_ok=True)
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True))
    return sample_chat(
        samplers.factory(path, config.student),
        config.student_renderer,
        requests,
        **settings,
        log_path=folder / name,
        desc=desc,
    )


def _rows(
    completions: Mapping[str, Completion], persona: str, method: str, heldout: set[str]
) -> list[dict[str, Any]]:
    return [
        {
            "persona": persona,
            "method": method,
            "class": persona or BASE_CLASS,
            "split": c.meta["split"],
            "prompt_id": c.meta["prompt_id"],
            "heldout": c.meta["prompt_id"] in heldout,
            "text": c.full_text,
            "complete": c.complete,
        }
        for c in completions.values()
    ]


def _classify(
    config: Config,
    stage: StageDir,
    train: list[dict[str, Any]],
    scored: list[dict[str, Any]],
    classes: list[str],
) -> dict[str, Any]:
    """Train (or reuse) the classifier and put ``predicted`` and ``p_true`` on ``scored`` rows.

    The cache is keyed by a digest of the settings, the classes and the training texts with
    their labels; any change retrains from scratch (a classifier is never half reused).
    """
    settings = config.classifier()
    blob = json.dumps(
        {
            "settings": asdict(settings),
            "classes": classes,
            "train": sorted((r["class"], text_key(r["text"])) for r in train),
        },
        sort_keys=True,
    )
    digest = hashlib.sha256(blob.encode()).hexdigest()[:16]
    summary_path, predictions_path = stage.file("classifier.json"), stage.file("predictions.jsonl")
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    cached = {}
    if summary.get("digest") == digest:
        cached = {r["text_key"]: r["probabilities"] for r in read_jsonl(predictions_path)}
    needed = list(dict.fromkeys(text_key(r["text"]) for r in scored))
    if not set(needed) <= set(cached):
        texts = {text_key(r["text"]): r["text"] for r in scored}
        classifier, trained = train_classifier(
            [r["text"] for r in train],
            [r["class"] for r in train],
            classes,
            settings,
            log_path=stage.file("classifier_metrics.jsonl"),
        )
        probabilities = classifier.predict_proba([texts[k] for k in needed])
        cached = {k: [float(x) for x in p] for k, p in zip(needed, probabilities)}
        write_jsonl(
            predictions_path, ({"text_key": k, "probabilities": p} for k, p in cached.items())
        )
        summary = {"digest": digest, **asdict(trained), "settings": asdict(settings)}
        _write_json(summary_path, summary)
        del classifier
    for row in scored:
        probabilities = cached[text_key(row["text"])]
        row["predicted"] = classes[int(np.argmax(probabilities))]
        row["p_true"] = probabilities[classes.index(row["class"])]
    return summary


def _f1_rows(
    scored: list[dict[str, Any]], methods: list[str], splits: list[str], n_boot: int, seed: int
) -> tuple[list[F1Row], dict[tuple[str, str], list[tuple[str, str, str]]]]:
    """One `F1Row` per (method, split), plus the scored (prompt, true, predicted) rows."""
    by: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in scored:
        by.setdefault((row["method"], row["split"]), []).append(row)
    out, sets = [], {}
    for split in splits:
        base = by.get((BASE, split), [])
        for method in [*methods, BASE]:
            own = by.get((method, split), [])
            if not own:
                continue
            groups: dict[str, list[float]] = {}
            for r in own:
                groups.setdefault(r["prompt_id"], []).append(float(r["predicted"] == r["class"]))
            rate = bootstrap_mean(groups.values(), n_boot, seed)
            f1, per_class = None, {}
            if method != BASE:
                rows = [(r["prompt_id"], r["class"], r["predicted"]) for r in own + base]
                sets[(method, split)] = rows
                f1 = bootstrap_macro_f1(rows, n_boot, seed)
                per_class = {
                    s.label: s.f1 for s in class_scores([r[1] for r in rows], [r[2] for r in rows])
                }
            out.append(
                F1Row(
                    method=method,
                    split=split,
                    n_prompts=len(groups),
                    n_personas=len({r["persona"] for r in own}),
                    n_replies=len(own),
                    macro_f1=f1,
                    own_class_rate=rate,
                    per_class_f1=per_class,
                )
            )
    return out, sets


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    text = json.dumps(json_safe(data), indent=2, ensure_ascii=False, default=_json_default)
    tmp.write_text(text)
    os.replace(tmp, path)


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _write_csv(path: Path, records: Sequence[Mapping[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = list(dict.fromkeys(k for r in records for k in r))
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(records)


def _coherence(
    config: Config,
    stage: StageDir,
    service: Any,
    personas: list[PersonaModels],
    scored: list[dict[str, Any]],
    prompts: Mapping[str, str],
    notes: list[str],
) -> list[dict[str, Any]]:
    """Order-swapped judge verdicts on plain held-out replies; win-rate records per mode."""
    if not config.coherence_pairs:
        return []
    plain: dict[tuple[str, str, str], str] = {}
    for row in scored:
        if row["split"] == NONE_SPLIT:
            plain[(row["persona"], row["method"], row["prompt_id"])] = row["text"]
    comparisons = []
    for first, second in parse_pairs(config.coherence_pairs):
        for models in personas:
            have = [BASE, *models.methods]
            missing = [m for m in (first, second) if m not in have]
            if missing:
                notes.append(
                    f"coherence {first} vs {second}: skipped for {models.persona} (no {missing[0]})"
                )
                continue
            for pid in prompts:
                a, b = (
                    plain.get(("" if m == BASE else models.persona, m, pid))
                    for m in (first, second)
                )
                if a is None or b is None:
                    continue
                comparisons.append(
                    judge_lib.Comparison(
                        id=f"{models.persona}:{first}:{second}:{pid}",
                        first=first,
                        second=second,
                        prompt=prompts[pid],
                        first_response=a,
                        second_response=b,
                        traits=models.constitution.traits_text,
                        group=models.persona,
                        prompt_id=pid,
                    )
                )
    if not comparisons:
        return []
    samplers = _Samplers(service)
    judge_sampler = samplers.factory(None, config.judge)
    records = []
    for mode in config.coherence_modes:
        if mode == "logprob":
            verdicts = judge_lib.judge_logprob(
                judge_sampler,
                config.judge_renderer,
                comparisons,
                judge=config.judge,
                cache_path=stage.file("coherence_logprob.jsonl"),
                calibrate=config.coherence_calibrate,
            )
        else:
            verdicts = judge_lib.judge_generative(
                judge_sampler,
                config.judge_renderer,
                comparisons,
                max_tokens=config.judge_max_tokens,
                temperature=config.judge_temperature,
                top_p=config.judge_top_p,
                seed=config.seed,
                log_path=stage.file(f"coherence_generative-{_short(config.judge)}.jsonl"),
            )
        outcomes = judge_lib.resolve_order_swaps(comparisons, verdicts)
        bias = judge_lib.bias_fields(verdicts, mode == "logprob" and config.coherence_calibrate)
        for rate in judge_lib.win_rates(outcomes):
            records.append({"mode": mode, **rate.to_record(), **bias})
    return records


def _short(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def run(params: RunParams, service_client: Any, on_existing: str = "resume") -> Report:
    """Sample, classify, judge and report (see the module docstring); resumable."""
    config = Config.from_params(params)
    notes: list[str] = []
    prompts, warnings = load_eval_prompts(params.run_dir, config.prompts)
    notes += warnings
    stage = stage_dir(params.run_dir, STAGE)
    stage.prepare(config.fingerprint(), on_existing, asdict(config))
    train_ids, heldout_ids = split_prompts(
        [p["id"] for p in prompts], config.train_fraction, config.seed
    )
    heldout = set(heldout_ids)
    text_of = {p["id"]: p["prompt"] for p in prompts}
    personas = persona_models(params, config, notes)

    samplers = _Samplers(service_client)
    base_folder = stage.path / "responses"
    base_done = _sample(
        samplers,
        config,
        base_folder,
        BASE,
        None,
        reply_requests(prompts, heldout, config.splits),
        "robustness: base",
    )
    first_replies = {
        c.meta["prompt_id"]: c.full_text
        for c in base_done.values()
        if c.meta["split"] == NONE_SPLIT and c.meta["prompt_id"] in heldout
    }
    heldout_prompts = [p for p in prompts if p["id"] in heldout]
    base_done |= _sample(
        samplers,
        config,
        base_folder,
        BASE,
        None,
        prefill_requests(heldout_prompts, first_replies),
        "robustness: base (prefill)",
    )
    rows = _rows(base_done, "", BASE, heldout)
    for models in personas:
        folder = models.run_dir / STAGE / "responses"
        for method in models.methods:
            system = models.system_prompt if method == SYSTEM_PROMPT else None
            requests = reply_requests(prompts, heldout, config.splits, system)
            requests += prefill_requests(heldout_prompts, first_replies, system)
            done = _sample(
                samplers,
                config,
                folder,
                method,
                models.checkpoints.get(method),
                requests,
                f"robustness: {models.persona}/{method}",
            )
            rows += _rows(done, models.persona, method, heldout)
    del samplers  # free the sampling clients before the classifier trains

    train = [
        r
        for r in rows
        if not r["heldout"]
        and r["split"] == NONE_SPLIT
        and (r["method"] == BASE or r["method"] in config.classifier_methods)
    ]
    classes = [BASE_CLASS] + [
        m.persona for m in personas if any(r["class"] == m.persona for r in train)
    ]
    for models in personas:
        if models.persona not in classes:
            notes.append(
                f"persona {models.persona}: none of evals.classifier_methods "
                f"{list(config.classifier_methods)} is available, so it is no class; its replies "
                "are left out of the scores"
            )
    if len(classes) < 2:
        raise DataError(
            f"stage 08: no persona has replies from evals.classifier_methods "
            f"{list(config.classifier_methods)}; include 'system_prompt' or train a checkpoint"
        )
    scored = [r for r in rows if r["heldout"] and r["class"] in classes]
    classifier = _classify(config, stage, train, scored, classes)
    classifier["train_prompts"], classifier["heldout_prompts"] = len(train_ids), len(heldout_ids)

    methods_present = [m for m in PERSONA_METHODS if any(r["method"] == m for r in scored)]
    split_names = [NONE_SPLIT, *config.splits, PREFILL_SPLIT]
    f1_rows, sets = _f1_rows(scored, methods_present, split_names, config.bootstrap, config.seed)
    summaries = []
    for method in methods_present:
        adversarial = {s: sets[(method, s)] for s in config.splits if (method, s) in sets}
        summaries.append(
            MethodSummary(
                method=method,
                no_instruction=_estimate(sets.get((method, NONE_SPLIT)), config),
                with_instructions=bootstrap_macro_f1(adversarial, config.bootstrap, config.seed)
                if adversarial
                else None,
                prefill=_estimate(sets.get((method, PREFILL_SPLIT)), config),
            )
        )

    coherence_rows = _coherence(
        config, stage, service_client, personas, scored, {p: text_of[p] for p in heldout_ids}, notes
    )
    for note in notes:
        logger.warning("%s", note)

    report = Report(
        stage_dir=stage.path,
        personas=[m.persona for m in personas if m.persona in classes],
        methods={m.persona: m.methods for m in personas},
        splits=list(config.splits),
        train_prompts=train_ids,
        heldout_prompts=heldout_ids,
        classifier=classifier,
        rows=f1_rows,
        summaries=summaries,
        coherence=coherence_rows,
        notes=notes,
        responses=rows,
        prompts=text_of,
    )
    write_jsonl(stage.file("responses.jsonl"), rows)
    _write_csv(stage.file("f1_table.csv"), [r.record() for r in f1_rows])
    _write_csv(stage.file("summary.csv"), [s.record() for s in summaries])
    _write_csv(stage.file("coherence.csv"), coherence_rows)
    _write_json(stage.file("robustness.json"), report.to_dict())
    stage.finish(
        personas=len(report.personas),
        replies=len(rows),
        scored=len(scored),
        train_examples=len(train),
        comparisons=sum(r["comparisons"] for r in coherence_rows if r["group"] == "all"),
    )
    return report


def _estimate(rows: Sequence[tuple[str, str, str]] | None, config: Config) -> Estimate | None:
    return bootstrap_macro_f1(rows, config.bootstrap, config.seed) if rows else None
