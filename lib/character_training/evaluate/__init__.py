"""Evaluations shared by notebooks 03-09: pure functions over records plus thin I/O wrappers.

`adherence` is the persona-adherence measure ("teacher-likeness") that notebooks 03, 05, 06,
08 and 09 all report, so they compare models on one scale; it is built from the sentence
encoder (`sentence_encoder`), the teacher-vs-student head (`teacher_classifier`), the held-out
prompts of stage 02 (`heldout`) and the bootstrap intervals (`intervals`).
"""

from __future__ import annotations

from .adherence import (
    AdherenceDifference,
    AdherenceReport,
    AdherenceRow,
    checkpoint_models,
    measure,
    samples_table,
)
from .heldout import HeldoutPrompt, load_heldout, split_prompt_ids
from .intervals import Estimate, bootstrap_mean, paired_bootstrap_difference
from .sentence_encoder import (
    PoolingSpec,
    SentenceEncoder,
    embed_texts,
    load_encoder,
    minilm_dir,
    read_pooling_spec,
)
from .teacher_classifier import ClassifierSummary, LogisticHead, accuracy, fit_logistic, roc_auc

__all__ = [
    "AdherenceDifference",
    "AdherenceReport",
    "AdherenceRow",
    "ClassifierSummary",
    "Estimate",
    "HeldoutPrompt",
    "LogisticHead",
    "PoolingSpec",
    "SentenceEncoder",
    "accuracy",
    "bootstrap_mean",
    "checkpoint_models",
    "embed_texts",
    "fit_logistic",
    "load_encoder",
    "load_heldout",
    "measure",
    "minilm_dir",
    "paired_bootstrap_difference",
    "read_pooling_spec",
    "roc_auc",
    "samples_table",
    "split_prompt_ids",
]
