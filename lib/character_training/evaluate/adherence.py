"""Persona adherence as "teacher-likeness": how often a model, with no system prompt, writes
replies that a classifier cannot tell apart from the persona-prompted teacher's.

Why this measure: character training distils the teacher-with-constitution into a student that
no longer sees the constitution. The direct question is therefore "does the trained student,
prompted bare, answer like the prompted teacher?". A classifier trained on held-out teacher vs
student replies answers it on a fixed scale that every notebook (03, 05, 06, 08, 09) reuses,
without a judge model (the paper's robustness classifier, evaluated there on its own training
data; here it is always scored on prompts it never saw).

This module is the measurement and its report: which prompts train the classifier and which
probe the models, sampling the models, scoring, and the rows and paired differences written
out. The pieces it uses each have their own module: `heldout` (stage 02's held-out prompts and
the split of their ids), `sentence_encoder` (MiniLM vectors and their cache),
`teacher_classifier` (the logistic head, its training and validation) and `intervals`
(prompt-level bootstrap intervals).

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
* **Frozen encoder + logistic head.** Replies are embedded with all-MiniLM-L6-v2 and a
  ridge-penalised logistic regression on those vectors is the classifier; the head fits in
  milliseconds and embeddings are cached, so the measure costs seconds on top of sampling and
  every notebook can re-run it (see `sentence_encoder` and `teacher_classifier` for why).
* **Teacher-like share with prompt-level intervals.** A reply is teacher-like when the head
  gives it probability > 0.5. Each row reports the share of teacher-like replies and the mean
  probability, with 95% bootstrap intervals (scipy BCa) that resample *prompts* (replies to one
  prompt are correlated). Differences between two models use a paired bootstrap over the
  prompts both were measured on, which removes prompt difficulty from the noise.
* **References.** The teacher's and the student's own held-out replies on the probe prompts
  are scored the same way. They bound what a model can reach: a student trained perfectly
  would sit at the teacher's share, the untrained student near the student's.
* **An instrument that cannot measure says so.** Per probe set, the classifier measures only
  when its AUC on the references' replies has a prompt-level interval above 0.5 and the
  teacher reference stands above the student reference (paired interval above 0;
  `teacher_classifier.check_instrument`). Otherwise every row of that probe set is "no
  measurement" with the reason: the numbers stay for diagnosis, `AdherenceReport.headline`
  gives None, and the tiny run's AUC 0.55 never reads as "training had no effect".

Truncated model replies (``complete`` false) are scored like the others and counted
(``n_truncated``); dropping them would select a model's short replies only.

Length: the split, the sampling of each model's probe replies, the rows, the paired
differences and the headline are one measurement that notebooks 03, 05 and 09 share; the
classifier, its learning curve, the intervals and the held-out data already have modules.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from ..config import RunParams
from ..errors import ConfigError, DataError
from ..probe_sets import CLASSIFIER_SOURCE, headline_probe_set
from ..prompts import student_messages
from ..renderers import renderer_for_model
from ..sampling import SampleRequest, sample_chat
from ..store import (
    find_checkpoint,
    model_identity,
    model_label,
    portable_path,
    read_jsonl,
    write_jsonl,
)
from .heldout import HeldoutPrompt, heldout_path, load_heldout, split_prompt_ids
from .intervals import (
    MEASURED,
    Estimate,
    Measurement,
    bootstrap_mean,
    paired_bootstrap_difference,
    withhold,
)
from .learning_curve import CurvePoint, curve_text, heldout_curve
from .sentence_encoder import SentenceEncoder, embed_texts, load_encoder
from .teacher_classifier import (
    THRESHOLD,
    ClassifierSummary,
    InstrumentCheck,
    check_instrument,
    train_teacher_head,
    validate,
)

__all__ = [
    "ADHERENCE_DIR",
    "CLASSIFIER_SOURCE",
    "STUDENT_REF",
    "TEACHER_REF",
    "AdherenceDifference",
    "AdherenceReport",
    "AdherenceRow",
    "checkpoint_models",
    "measure",
    "samples_table",
]

logger = logging.getLogger(__name__)

ADHERENCE_DIR = "adherence"
MIN_REPLIES_PER_CLASS = 4  # kept teacher (and student) replies needed to fit the head
TEACHER_REF = "teacher_ref"
STUDENT_REF = "student_ref"
_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


# -- report --------------------------------------------------------------------------------------
def _flat_record(item: Any) -> dict[str, Any]:
    """A row dataclass as one flat dict (one DataFrame row), in field order; each `Estimate`
    field ``x`` becomes ``x``, ``x_low`` and ``x_high``."""
    record: dict[str, Any] = {}
    for spec in fields(item):
        value = getattr(item, spec.name)
        if isinstance(value, Estimate):
            record[spec.name] = value.value
            record[f"{spec.name}_low"] = value.low
            record[f"{spec.name}_high"] = value.high
        else:
            record[spec.name] = value
    return record


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
    status: str = MEASURED  # "no measurement" when the probe set's instrument check failed
    reason: str = ""

    def record(self) -> dict[str, Any]:
        """A flat dict (one DataFrame row)."""
        return _flat_record(self)


@dataclass(frozen=True)
class AdherenceDifference:
    """``a`` minus ``b`` on the prompts of ``probe_set`` both were measured on (paired)."""

    a: str
    b: str
    probe_set: str
    n_prompts: int
    teacher_like: Estimate
    mean_probability: Estimate
    status: str = MEASURED  # as the rows of its probe set
    reason: str = ""

    def record(self) -> dict[str, Any]:
        """A flat dict (one DataFrame row)."""
        return _flat_record(self)


@dataclass(frozen=True)
class AdherenceReport:
    """What `measure` returns and writes to ``<report_name>.json``.

    ``records()`` / ``difference_records()`` are flat dicts for ``pandas.DataFrame``;
    `plots.adherence_bars` takes the report itself. ``instrument`` holds, per probe set, whether
    the classifier could measure there (`InstrumentCheck`); `headline` turns a failed check
    into None values and their reasons.
    """

    classifier: ClassifierSummary
    rows: list[AdherenceRow]
    differences: list[AdherenceDifference]
    split: dict[str, list[str]]
    path: Path
    warnings: list[str] = field(default_factory=list)
    models: dict[str, str] = field(default_factory=dict)  # label -> checkpoint path / base model
    settings: dict[str, Any] = field(default_factory=dict)  # adherence params, seed, sampling
    instrument: dict[str, InstrumentCheck] = field(default_factory=dict)  # by probe set

    def records(self) -> list[dict[str, Any]]:
        return [r.record() for r in self.rows]

    def difference_records(self) -> list[dict[str, Any]]:
        return [d.record() for d in self.differences]

    def row(self, label: str, probe_set: str = CLASSIFIER_SOURCE) -> AdherenceRow:
        for row in self.rows:
            if row.label == label and row.probe_set == probe_set:
                return row
        raise KeyError(f"no row {label!r} on probe set {probe_set!r}")

    def difference(
        self, a: str, b: str, probe_set: str = CLASSIFIER_SOURCE
    ) -> AdherenceDifference | None:
        """``a`` minus ``b`` on ``probe_set``, or None when it was not measured."""
        return next(
            (d for d in self.differences if (d.a, d.b, d.probe_set) == (a, b, probe_set)), None
        )

    def status(self, probe_set: str = CLASSIFIER_SOURCE) -> Measurement:
        """Whether the classifier could measure on ``probe_set`` (failed when unchecked)."""
        check = self.instrument.get(probe_set)
        if check is None:
            return Measurement.failed(f"the classifier was not checked on {probe_set} prompts")
        return check.measurement

    def instrument_text(self) -> str:
        """What a notebook prints above the bars: validation accuracy, AUC and its interval,
        then per probe set "measured" or "no measurement: <reason>"."""
        c = self.classifier
        lines = [
            f"classifier: validation accuracy {c.val_accuracy:.2f}, AUC {c.val_auc:.2f} "
            f"[{c.val_auc_low:.2f}, {c.val_auc_high:.2f}] on probe prompts"
        ]
        lines += c.sampling_notes()
        if c.learning_curve:
            lines.append(curve_text([CurvePoint(**point) for point in c.learning_curve]))
        for probe_set, check in self.instrument.items():
            lines.append(f"{probe_set} probes: {check.measurement.text()}")
        return "\n".join(lines)

    @property
    def headline_probe_set(self) -> str:
        """The probe set headlines report: prompts of assertions never trained on ("unseen")
        when stage 02 held some out, else the held-out siblings of trained prompts."""
        return headline_probe_set(r.probe_set for r in self.rows)

    def headline(
        self,
        labels: Sequence[str],
        compare: Sequence[tuple[str, str]] = (),
        probe_set: str | None = None,
        names: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        """A notebook's headline numbers on ``probe_set`` (default `headline_probe_set`, named
        in the ``probe_set`` key): ``teacher_like_<label>`` and
        ``teacher_like_<label>_ci`` per label, ``<a>_minus_<b>`` (`Estimate.to_dict`) per pair
        of ``compare`` (``names`` renames labels in keys: ``{"rl-step-0000": "start"}``), and
        ``classifier_auc``, ``classifier_auc_ci``, ``classifier_status``, the reference rows'
        shares (``teacher_reference``, ``student_reference`` and their ``_ci``: the ends of the
        scale the summary compares sizes on) and ``probe_prompts``. What was not measured
        is None; when the classifier cannot measure on ``probe_set``, every teacher-likeness
        key is None and listed with the reason under ``no_measurement`` (`intervals.withhold`).
        """
        names = dict(names or {})
        probe_set = probe_set or self.headline_probe_set
        out: dict[str, Any] = {"probe_set": probe_set}
        for label in labels:
            try:
                like: Estimate | None = self.row(label, probe_set).teacher_like
            except KeyError:
                like = None
            key = f"teacher_like_{names.get(label, label)}"
            out[key] = like.value if like else None
            out[f"{key}_ci"] = [like.low, like.high] if like else None
        for a, b in compare:
            diff = self.difference(a, b, probe_set)
            key = f"{names.get(a, a)}_minus_{names.get(b, b)}"
            out[key] = diff.teacher_like.to_dict() if diff else None
        for key, label in (("teacher_reference", TEACHER_REF), ("student_reference", STUDENT_REF)):
            try:  # the scale's ends: the summary puts sizes on a common scale with them
                ref: Estimate | None = self.row(label, probe_set).teacher_like
            except KeyError:
                ref = None
            out[key] = ref.value if ref else None
            out[f"{key}_ci"] = [ref.low, ref.high] if ref else None
        out["probe_prompts"] = max(
            (r.n_prompts for r in self.rows if r.probe_set == probe_set and r.kind == "model"),
            default=0,
        )
        status = self.status(probe_set)
        check = self.instrument.get(probe_set)
        auc = check.auc if check else None
        out["classifier_auc"] = auc.value if auc else None
        out["classifier_auc_ci"] = [auc.low, auc.high] if auc else None
        out["classifier_status"] = status.status
        if status.measured:
            return out
        # the models' shares and differences are withheld; the references and the classifier's
        # own numbers stay, as the diagnosis of why it could not measure
        measured = [
            k
            for k in out
            if (k.startswith("teacher_like_") or "_minus_" in k) and out[k] is not None
        ]
        return withhold(out, {k: status.reason for k in measured})

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
            "instrument": {name: c.record() for name, c in self.instrument.items()},
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


def _comparisons(
    models: Mapping[str, str | None], compare: Sequence[tuple[str, str]] | None
) -> Sequence[tuple[str, str]]:
    """The (a, b) pairs to difference: ``compare``, checked, or every model minus the first
    base model (path None) when ``compare`` is None."""
    if compare is None:
        bases = [label for label, path in models.items() if path is None]
        compare = [(label, bases[0]) for label in models if bases and label != bases[0]]
    for a, b in compare:
        if a not in models or b not in models:
            raise ConfigError(f"compare pair ({a!r}, {b!r}): both must be labels of models")
    return compare


@dataclass(frozen=True)
class _HeldoutSplit:
    """The held-out prompts, split into classifier prompts (``train``) and probe prompts."""

    heldout: list[HeldoutPrompt]
    classifier_ids: list[str]
    train: list[HeldoutPrompt]
    probes: list[HeldoutPrompt]

    @property
    def train_teacher(self) -> list[str]:
        return [h.teacher_reply for h in self.train if h.teacher_reply is not None]

    @property
    def train_student(self) -> list[str]:
        return [h.student_reply for h in self.train if h.student_reply is not None]

    @property
    def val_teacher(self) -> list[HeldoutPrompt]:
        return [h for h in self.probes if h.teacher_reply is not None]

    @property
    def val_student(self) -> list[HeldoutPrompt]:
        return [h for h in self.probes if h.student_reply is not None]

    @property
    def dropped_teacher(self) -> int:
        return sum(h.teacher_reply is None for h in self.heldout)

    @property
    def dropped_student(self) -> int:
        return sum(h.student_reply is None for h in self.heldout)


def _split_heldout(
    heldout: list[HeldoutPrompt], classifier_fraction: float, seed: int
) -> _HeldoutSplit:
    """Constitution prompts split by `split_prompt_ids`; every other source is a probe."""
    classifier_ids, _ = split_prompt_ids(
        [h.prompt_id for h in heldout if h.source == CLASSIFIER_SOURCE], classifier_fraction, seed
    )
    chosen = set(classifier_ids)
    train = [h for h in heldout if h.prompt_id in chosen]
    probes = [h for h in heldout if h.prompt_id not in chosen]
    return _HeldoutSplit(heldout, classifier_ids, train, probes)


def _check_enough_replies(split: _HeldoutSplit, path: Path) -> None:
    """One-line `DataError` (before anything is sampled) when the head cannot be trained or
    validated on the kept replies."""
    n_teacher, n_student = len(split.train_teacher), len(split.train_student)
    n_val_teacher, n_val_student = len(split.val_teacher), len(split.val_student)
    if min(n_teacher, n_student) >= MIN_REPLIES_PER_CLASS and n_val_teacher and n_val_student:
        return
    raise DataError(
        f"{path}: too few kept replies for the adherence classifier ({n_teacher} "
        f"teacher / {n_student} student on {len(split.train)} classifier prompts, "
        f"{n_val_teacher} / {n_val_student} on {len(split.probes)} probe prompts; need >= "
        f"{MIN_REPLIES_PER_CLASS} of each to train and >= 1 of each to validate; "
        f"{split.dropped_teacher} teacher and {split.dropped_student} student replies were "
        "dropped, see *_drop_reason): hold out more prompts (distill.heldout_fraction) or fix "
        "the drops (e.g. raise distill.max_tokens), then rerun notebook 02"
    )


def _reference_rows(split: _HeldoutSplit) -> list[dict[str, Any]]:
    """The teacher's, then the student's, kept replies on the probe prompts, as sample rows."""
    sides = (
        (TEACHER_REF, "teacher_reply", split.val_teacher),
        (STUDENT_REF, "student_reply", split.val_student),
    )
    return [
        {
            "label": label,
            "probe_set": h.source,
            "prompt_id": h.prompt_id,
            "sample": 0,
            "text": getattr(h, reply),
            "complete": True,
        }
        for label, reply, prompts in sides
        for h in prompts
    ]


def _sampling_settings(params: RunParams) -> dict[str, Any]:
    """The settings every model is sampled with (they name its sample log)."""
    return {
        "seed": params.seed,
        "max_tokens": params.distill.max_tokens,
        "temperature": params.sampling.temperature,
        "top_p": params.sampling.top_p,
        "top_k": params.sampling.top_k,
    }


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
    identity = model_identity(params.run_dir, path, params.student)
    settings = _sampling_settings(params)
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


def _by_prompt(rows: Iterable[Mapping[str, Any]], key: Callable[[float], float]) -> dict:
    """``key(p_teacher)`` of each row, grouped by prompt (in order of first appearance)."""
    out: dict[str, list[float]] = {}
    for row in rows:
        out.setdefault(row["prompt_id"], []).append(key(row["p_teacher"]))
    return out


def _is_teacher_like(p: float) -> float:
    """1.0 for a teacher-like probability, else 0.0 (a value the share is the mean of)."""
    return float(p > THRESHOLD)


def _row(
    label: str,
    kind: str,
    probe_set: str,
    model: str,
    rows: Sequence[Mapping[str, Any]],
    n_resamples: int,
    seed: int,
    status: Measurement,
) -> AdherenceRow:
    """One report row from the scored sample rows of one (label, probe set)."""
    by_prompt = _by_prompt(rows, float)
    return AdherenceRow(
        label=label,
        kind=kind,
        probe_set=probe_set,
        model=model,
        n_prompts=len(by_prompt),
        n_samples=len(rows),
        n_truncated=sum(not r.get("complete", True) for r in rows),
        teacher_like=bootstrap_mean(_by_prompt(rows, _is_teacher_like).values(), n_resamples, seed),
        mean_probability=bootstrap_mean(by_prompt.values(), n_resamples, seed),
        status=status.status,
        reason=status.reason,
    )


def _difference(
    a: str,
    b: str,
    probe_set: str,
    rows_a: Sequence[Mapping[str, Any]],
    rows_b: Sequence[Mapping[str, Any]],
    n_resamples: int,
    seed: int,
    status: Measurement,
) -> AdherenceDifference:
    """``a`` minus ``b`` on one probe set, paired over the prompts both were measured on."""
    like, n = paired_bootstrap_difference(
        _by_prompt(rows_a, _is_teacher_like),
        _by_prompt(rows_b, _is_teacher_like),
        n_resamples,
        seed,
    )
    mean, _ = paired_bootstrap_difference(
        _by_prompt(rows_a, float), _by_prompt(rows_b, float), n_resamples, seed
    )
    return AdherenceDifference(a, b, probe_set, n, like, mean, status.status, status.reason)


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
    compare = _comparisons(models, compare)
    heldout = load_heldout(params.run_dir)
    path = heldout_path(params.run_dir)
    split = _split_heldout(heldout, settings.classifier_fraction, params.seed)
    _check_enough_replies(split, path)

    folder = Path(params.run_dir) / ADHERENCE_DIR
    encoder = encoder or load_encoder(settings.encoder, params.engine.device)
    cache_dir = folder / "embeddings"
    head, train_accuracy = train_teacher_head(
        encoder, split.train_teacher, split.train_student, settings.l2, cache_dir
    )

    reference_rows = _reference_rows(split)
    probe_list = [(h.source, h.prompt_id, h.prompt) for h in split.probes]
    identities: dict[str, str] = {}
    model_rows: list[dict[str, Any]] = []
    for label, model_path in models.items():
        identities[label], rows = _sample_model(
            params, service_client, label, model_path, probe_list, folder
        )
        model_rows += rows

    scored = reference_rows + model_rows
    vectors = embed_texts(encoder, [r["text"] for r in scored], cache_dir)
    probabilities = head.predict_proba(vectors)
    for row, p in zip(scored, probabilities):
        row["p_teacher"] = float(p)
        row["teacher_like"] = bool(p > THRESHOLD)
    n_boot, seed = settings.bootstrap, params.seed
    validation = validate(
        probabilities[: len(reference_rows)],
        np.array([float(r["label"] == TEACHER_REF) for r in reference_rows]),
        [r["probe_set"] for r in reference_rows],
        [r["prompt_id"] for r in reference_rows],
        n_boot,
        seed,
    )
    summary = ClassifierSummary(
        encoder=encoder.identity,
        l2=settings.l2,
        heldout_prompts=len(heldout),
        classifier_prompts=len(split.train),
        probe_prompts=len(split.probes),
        train_teacher=len(split.train_teacher),
        train_student=len(split.train_student),
        train_accuracy=train_accuracy,
        val_teacher=len(split.val_teacher),
        val_student=len(split.val_student),
        val_accuracy=validation.accuracy,
        val_auc=validation.auc,
        dropped_teacher=split.dropped_teacher,
        dropped_student=split.dropped_student,
        val_by_source=validation.by_source,
        val_auc_low=validation.auc_interval.low if validation.auc_interval else math.nan,
        val_auc_high=validation.auc_interval.high if validation.auc_interval else math.nan,
        learning_curve=heldout_curve(
            encoder,
            split.train,
            vectors[: len(reference_rows)],
            [r["label"] == TEACHER_REF for r in reference_rows],
            (settings.l2, params.seed),
            cache_dir,
        ),
        teacher_best_of=params.distill.teacher_best_of,
    )

    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in scored:
        groups.setdefault((row["label"], row["probe_set"]), []).append(row)
    probe_sets = list(dict.fromkeys(h.source for h in split.probes))
    instrument = {
        probe_set: check_instrument(
            probe_set,
            groups.get((TEACHER_REF, probe_set), []),
            groups.get((STUDENT_REF, probe_set), []),
            n_boot,
            seed,
        )
        for probe_set in probe_sets
    }
    status = {probe_set: check.measurement for probe_set, check in instrument.items()}
    for probe_set, check in instrument.items():
        if not check.measurement.measured:
            logger.warning("adherence on %s prompts: %s", probe_set, check.measurement.text())
    origins = {TEACHER_REF: f"{path.name}: teacher", STUDENT_REF: f"{path.name}: student"}
    report_rows = [
        _row(
            label,
            "reference" if label in origins else "model",
            probe_set,
            origins.get(label) or model_label(params.run_dir, models[label], params.student),
            rows,
            n_boot,
            seed,
            status[probe_set],
        )
        for (label, probe_set), rows in groups.items()
    ]
    differences = [
        _difference(
            a,
            b,
            probe_set,
            groups[a, probe_set],
            groups[b, probe_set],
            n_boot,
            seed,
            status[probe_set],
        )
        for a, b in compare
        for probe_set in probe_sets
        if groups.get((a, probe_set)) and groups.get((b, probe_set))
    ]

    report = AdherenceReport(
        classifier=summary,
        rows=report_rows,
        differences=differences,
        split={"classifier": split.classifier_ids, "probe": [h.prompt_id for h in split.probes]},
        path=folder / f"{report_name}.json",
        warnings=_warnings(heldout, settings.probe_general_prompts, path),
        models=identities,
        settings={
            **asdict(settings),
            **_sampling_settings(params),
            "heldout": portable_path(params.run_dir, path),
        },
        instrument=instrument,
    )
    folder.mkdir(parents=True, exist_ok=True)
    tmp = report.path.with_name(report.path.name + ".tmp")
    tmp.write_text(json.dumps(report.to_dict(), indent=2, ensure_ascii=False))
    os.replace(tmp, report.path)
    write_jsonl(folder / f"{report_name}_samples.jsonl", scored)
    head.save(folder / f"{report_name}_classifier.npz")
    return report


def _warnings(heldout: Sequence[HeldoutPrompt], wanted_general: int, path: Path) -> list[str]:
    """Logged and reported: stage 02 held out fewer general prompts than the probes ask for."""
    warnings = []
    n_general = sum(h.source != CLASSIFIER_SOURCE for h in heldout)
    if n_general < wanted_general:
        warnings.append(
            f"adherence.probe_general_prompts={wanted_general} but {path} holds "
            f"{n_general} held-out general prompts (rerun notebook 02 after raising "
            "prompts.eval_prompts)"
        )
    for warning in warnings:
        logger.warning("%s", warning)
    return warnings


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
