"""What stage 08 (robustness) measured, as the notebook shows it and as its files keep it.

`Report` holds the F1 rows per method and split, the per-method summaries, the coherence win
rates and every reply; its methods give the notebook's tables (F1 matrix, summary, coherence,
replies next to the class the classifier gave them), the headline numbers of the run summary
(None, with the reason under ``no_measurement``, for a method the classifier cannot measure),
and `Report.write` the stage's output files (``responses.jsonl``, ``f1_table.csv``,
``summary.csv``, ``coherence.csv``, ``robustness.json``).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..store import json_safe, write_jsonl
from .coherence import ALL_GROUPS
from .intervals import NO_MEASUREMENT, withhold
from .robustness import (
    BASE,
    NONE_SPLIT,
    PERSONA_METHODS,
    PREFILL_SPLIT,
    SUMMARY_FIELDS,
    F1Row,
    MethodSummary,
    write_json,
)


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
    differences: list[dict[str, Any]] = field(default_factory=list)  # method - system prompt
    # the methods whose plain replies made each persona's class (`evals.classifier_methods`)
    classifier_methods: list[str] = field(default_factory=list)

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

    def no_measurement_lines(self) -> list[str]:
        """``<method>: no measurement (<reason>)`` per method the classifier cannot measure,
        for the notebook to print above the summary chart."""
        return [f"{s.method}: {NO_MEASUREMENT} ({s.reason})" for s in self.summaries if s.reason]

    def headline(self) -> dict[str, Any]:
        """The numbers `runner.write_summary` shows next to the report link.

        ``f1_<method>_<field>`` and ``f1_<method>_<field>_ci`` per summary field; for a method
        the classifier cannot measure (`robustness.method_check`) they are None and listed
        with the reason under ``no_measurement`` (`intervals.withhold`).
        """
        reasons: dict[str, str] = {}
        out: dict[str, Any] = {
            "personas": len(self.personas),
            "heldout_prompts": len(self.heldout_prompts),
            "classifier": self.classifier.get("model"),
            "classifier_seconds": self.classifier.get("seconds"),
        }
        for s in self.summaries:
            for name in SUMMARY_FIELDS:
                value = getattr(s, name)
                if value is not None:
                    key = f"f1_{s.method}_{name}"
                    out[key] = round(value.value, 4)
                    out[f"{key}_ci"] = [round(value.low, 4), round(value.high, 4)]
                    if s.status == NO_MEASUREMENT:
                        reasons[key] = reasons[f"{key}_ci"] = s.reason
        for d in self.differences:  # paired over prompts: trained minus prompted
            key = f"f1_diff_{d['method']}_{d['field']}"
            out[key] = round(d["value"], 4)
            out[f"{key}_ci"] = [round(d["low"], 4), round(d["high"], 4)]
        # what trained the classifier (the summary page's "classifier training methods"), and
        # the methods it scored; until 2026-12-05 the first key held the second list
        out["classifier_methods"] = list(self.classifier_methods)
        out["scored_methods"] = sorted({m for ms in self.methods.values() for m in ms})
        for row in self.coherence:
            if row["group"] == ALL_GROUPS:
                key = f"coherence_{row['mode']}_{row['first']}_vs_{row['second']}"
                out[key] = None if math.isnan(row["win_rate"]) else round(row["win_rate"], 4)
                out[f"{key}_inconsistent"] = row["inconsistent_share"]
        return json_safe(withhold(out, reasons))

    def to_dict(self) -> dict[str, Any]:
        return {
            "personas": self.personas,
            "methods": self.methods,
            "classifier_methods": self.classifier_methods,
            "splits": self.splits,
            "split_prompts": {"train": self.train_prompts, "heldout": self.heldout_prompts},
            "classifier": self.classifier,
            "rows": [r.record() | {"per_class_f1": r.per_class_f1} for r in self.rows],
            "summary": [s.record() for s in self.summaries],
            "coherence": self.coherence,
            "differences": self.differences,
            "notes": self.notes,
        }

    def write(self) -> None:
        """The stage's output files, in ``stage_dir``: every reply (with its class and, when
        held out, its prediction), the F1 table, the summary, the coherence win rates, and
        ``robustness.json`` with all of it but the replies."""
        folder = self.stage_dir
        write_jsonl(folder / "responses.jsonl", self.responses)
        _write_csv(folder / "f1_table.csv", [r.record() for r in self.rows])
        _write_csv(folder / "summary.csv", [s.record() for s in self.summaries])
        _write_csv(folder / "coherence.csv", self.coherence)
        write_json(folder / "robustness.json", self.to_dict())


def _write_csv(path: Path, records: Sequence[Mapping[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = list(dict.fromkeys(k for r in records for k in r))
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(records)
