"""Evaluations shared by notebooks 03-09: pure functions over records plus thin I/O wrappers.

`adherence` is the persona-adherence measure ("teacher-likeness") that notebooks 03, 05, 06,
08 and 09 all report, so they compare models on one scale.
"""

from __future__ import annotations

from .adherence import (
    AdherenceDifference,
    AdherenceReport,
    AdherenceRow,
    ClassifierSummary,
    Estimate,
    HeldoutPrompt,
    LogisticHead,
    PoolingSpec,
    SentenceEncoder,
    accuracy,
    bootstrap_mean,
    checkpoint_models,
    embed_texts,
    fit_logistic,
    load_encoder,
    load_heldout,
    measure,
    minilm_dir,
    paired_bootstrap_difference,
    read_pooling_spec,
    roc_auc,
    samples_table,
    split_prompt_ids,
)

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
