"""What the cross-run summary knows about one persona x size run, and how it prints a number.

`summary` fills these records from the run folders and draws the page; `summary_sizes` answers
"does model size matter?" from them. Both read the same fields, so the records live here,
below both, instead of in either (neither would then import the other).

A value an instrument could not measure is never a number here: the run's value dicts leave it
out and `RunSummary.no_measurement` gives the reason the notebook recorded (a headline's
``no_measurement`` entry, or an adherence / robustness row whose status is "no measurement").
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

# evaluate.intervals.NO_MEASUREMENT, as a literal: importing the evaluate package loads the
# sentence encoder's stack (seconds), which a page built from JSON files does not need.
NO_MEASUREMENT = "no measurement"

# Notebooks whose headlines and stage folders the summary reads.
PREFERENCES = "07_preferences"
ROBUSTNESS = "08_robustness"
RLAIF = "09_rlaif_compare"
ADHERENCE_NOTEBOOKS = ("03_dpo", "05_sft", RLAIF)  # the adherence reports' notebooks, in order
BASE = "base"
# Models in the order the pipeline makes them; anything else is listed after them.
MODEL_ORDER = ("base", "system_prompt", "dpo", "final", "rlaif")
TRAINED = ("dpo", "final", "rlaif")
F1_METHODS = ("system_prompt", "dpo", "final", "rlaif")  # base's macro F1 is undefined
F1_VARIANTS = ("no_instruction", "with_instructions")
REFERENCES = {"teacher_ref": "teacher (reference)", "student_ref": "student (reference)"}
# The headline keys of the reference rows' teacher-like shares (03, 05, 09).
REFERENCE_KEYS = {"teacher_ref": "teacher_reference", "student_ref": "student_reference"}


def teacher_like_key(label: str) -> str:
    """The headline key of a label's teacher-like share (the references have their own)."""
    return REFERENCE_KEYS.get(label, f"teacher_like_{label}")


def finite(value: Any) -> float | None:
    """A finite float, or None for None/NaN/inf/non-numbers (JSON nulls, NaN written by CSV)."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def num(value: Any) -> str:
    """A number as the page prints it: no decimals from 10 up, two below, "n/a" for none."""
    number = finite(value)
    if number is None:
        return "n/a"
    return f"{number:.0f}" if abs(number) >= 10 else f"{number:.2f}"


@dataclass(frozen=True)
class Interval:
    """A measured value with its 95% interval (``low``/``high`` None when none was measured)."""

    value: float
    low: float | None = None
    high: float | None = None

    @property
    def has_interval(self) -> bool:
        return self.low is not None and self.high is not None

    def text(self) -> str:
        if not self.has_interval:
            return num(self.value)
        return f"{num(self.value)} [{num(self.low)}, {num(self.high)}]"

    def overlaps(self, other: "Interval") -> bool | None:
        """Whether two intervals overlap; None when either has no interval."""
        if not (self.has_interval and other.has_interval):
            return None
        return self.low <= other.high and other.low <= self.high  # type: ignore[operator]


def interval(value: Any, low: Any = None, high: Any = None) -> Interval | None:
    """An `Interval` from raw JSON/CSV values, or None when the value is not a finite number."""
    point = finite(value)
    if point is None:
        return None
    return Interval(point, finite(low), finite(high))


@dataclass(frozen=True)
class PairedChange:
    """A model's teacher-like share minus the base model's on the same prompts (paired), with
    the teacher and student reference rows measured by the same classifier: the classifier is
    refit for every run, so a change is put on a scale common to sizes only through the
    references of its own fit (`summary_sizes.scaled_change`)."""

    change: Interval
    teacher_ref: Interval | None
    student_ref: Interval | None
    source: str  # the file the change came from, relative to the runs folder


@dataclass
class RunSummary:
    """Everything the summary page shows about one persona x size run.

    ``notebooks`` maps a notebook to ``ok``/``failed``/``skipped`` (its status file) or
    ``summary only`` (a headline without a status file); ``missing`` maps a metric key of
    `summary.METRICS` to the reason it is absent; ``partial`` to the models it lacks;
    ``sources`` to the file it was read from; ``problems`` lists unreadable or oddly shaped
    files. ``unmeasured`` maps a notebook to the headline keys it could not measure and why;
    ``settings`` holds the evaluation settings the run recorded (headline keys such as
    ``judge_mode``, ``games_per_trait``, ``classifier``, ``probe_prompts``), which decide
    whether two sizes' numbers may be compared.
    """

    persona: str
    size: str
    has_run_dir: bool = True
    notebooks: dict[str, str] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)  # notebook -> one-line error
    params: dict[str, Any] | None = None
    params_source: str = ""
    elo: dict[str, Interval] = field(default_factory=dict)
    elo_setting: str = ""
    # 07: Elo std of a model minus base's (paired bootstrap), std beyond the coin-flip null,
    # split-half reliability of each model's Elo ranking (Spearman-Brown corrected)
    elo_change: dict[str, Interval] = field(default_factory=dict)
    elo_beyond_noise: dict[str, Interval] = field(default_factory=dict)
    elo_reliability: dict[str, Interval] = field(default_factory=dict)
    spearman: dict[str, tuple[float, float | None]] = field(default_factory=dict)
    spearman_ci: dict[str, tuple[float, float]] = field(default_factory=dict)
    # 07: what two measurements of unchanged preferences would give, and rho / ceiling
    spearman_ceiling: dict[str, float] = field(default_factory=dict)
    spearman_disattenuated: dict[str, Interval] = field(default_factory=dict)
    f1: dict[str, dict[str, Interval]] = field(default_factory=dict)
    # 08: macro F1 of a method minus the system-prompted model's, paired over prompts
    f1_diff: dict[str, dict[str, Interval]] = field(default_factory=dict)
    teacher_like: dict[str, Interval] = field(default_factory=dict)
    teacher_like_change: dict[str, PairedChange] = field(default_factory=dict)  # model - base
    rlaif: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    unmeasured: dict[str, dict[str, str]] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)
    partial: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    reports: list[str] = field(default_factory=list)  # paths relative to the reports folder
    spend: str = ""  # what the run's ledger (spend.jsonl) says it spent, one line

    @property
    def label(self) -> str:
        return f"{self.persona}/{self.size}"

    @property
    def student(self) -> str:
        return str((self.params or {}).get("student", ""))

    def has(self, metric: str) -> bool:
        return bool(getattr(self, metric))

    def no_measurement(self, key: str, notebooks: tuple[str, ...] = ()) -> str | None:
        """Why headline ``key`` was not measured (the last of ``notebooks`` that says so, or
        of any notebook when none is given); None when no notebook withheld it."""
        names = notebooks or tuple(self.unmeasured)
        for notebook in reversed(names):
            reason = self.unmeasured.get(notebook, {}).get(key)
            if reason is not None:
                return reason
        return None

    def withhold(self, notebook: str, key: str, reason: str) -> None:
        """Record that ``notebook`` could not measure ``key`` (see `no_measurement`)."""
        self.unmeasured.setdefault(notebook, {})[key] = reason or "no reason recorded"


__all__ = [
    "ADHERENCE_NOTEBOOKS",
    "BASE",
    "F1_METHODS",
    "F1_VARIANTS",
    "MODEL_ORDER",
    "NO_MEASUREMENT",
    "PREFERENCES",
    "REFERENCES",
    "REFERENCE_KEYS",
    "RLAIF",
    "ROBUSTNESS",
    "TRAINED",
    "Interval",
    "PairedChange",
    "RunSummary",
    "finite",
    "interval",
    "num",
    "teacher_like_key",
]
