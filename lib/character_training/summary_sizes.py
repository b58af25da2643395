"""The summary page's answer to "does model size matter?", in sentences that name their runs.

What is compared. Not the levels a measure reaches at two sizes: a larger student starts from
a different base model, so its trained model can sit higher only because its base did. Each
run already measures what training changed on paired data (the same matches or prompts before
and after), and those paired changes are what the sizes are compared on:

* Elo spread: std of Elo across traits of ``final`` minus the base model's (07, paired
  bootstrap over matches);
* teacher-likeness: ``final``'s teacher-like share minus the base model's on the same probe
  prompts (05), divided by the gap between the teacher and student reference rows of the same
  classifier fit. The adherence classifier is refit for every run, so raw shares of two sizes
  are two instruments' readings; on this scale 0 is the student reference and 1 the teacher
  reference in both. The scaled interval comes from the ends of the change's and both
  references' 95% intervals (`scaled_change`), so each reference's uncertainty widens it, and
  there is no scale (no measurement) when the references' intervals are not apart;
* classifier F1 under the adversarial instructions: ``final``'s macro F1 minus the
  system-prompted model's, paired over prompts (08).

How. Per persona and measure, the smallest and the largest size with a measurement: two
independent runs, so the difference of their changes gets a normal-approximation interval and
two-sided p-value, each run's standard error read off the wider half of its 95% interval
(`difference_test`; bootstrap intervals are asymmetric, and the wider half errs on the side of
"not resolved"). Holm's step-down correction runs over every (persona, measure) comparison the
page tests (`holm`); a comparison "survives" when its Holm-adjusted p-value is at most 5%.

When not. A value a notebook marked "no measurement" is never used. Two sizes whose evaluation
differed in what defines a measure (judge model or mode, Elo condition, traits, games per trait
or judge orders; classifier model, the methods it was trained on, its epochs and learning rate,
the attacks; teacher model or adherence encoder) are not compared on it: the page says which
setting differs. Counts that only change precision (comparisons, probe or held-out prompts,
samples per probe) are a caveat, and settings a run did not record are named as unchecked.
The levels behind each change are listed too: when the final models' levels are apart but
their changes are not resolved apart, the page says the difference may be the base models',
not training's.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .summary_records import (
    ADHERENCE_NOTEBOOKS,
    PREFERENCES,
    ROBUSTNESS,
    Interval,
    RunSummary,
)

Z95 = 1.959963984540054  # two-sided 95% normal quantile
ALPHA = 0.05  # family-wise error rate of the Holm correction


# -- sizes ---------------------------------------------------------------------------------------
_PARAMETER_COUNT = re.compile(r"(\d+(?:\.\d+)?)([bm])(?![a-z0-9])")


def size_key(size: str, student: str = "") -> tuple[int, float, str]:
    """Sort key putting sizes in order of student parameters.

    The count is read from the size slug (``qwen3.5-9b`` -> 9e9), else from the student's
    name (``SmolLM2-135M-Instruct`` -> 1.35e8, which is how ``tiny`` sorts first); sizes with
    neither come last, alphabetically.
    """
    for text in (size, student.rsplit("/", 1)[-1]):
        match = _PARAMETER_COUNT.search(text.lower())
        if match:
            scale = 1e9 if match.group(2) == "b" else 1e6
            return (0, float(match.group(1)) * scale, size)
    return (1, 0.0, size)


def ordered_sizes(runs: Sequence[RunSummary]) -> list[str]:
    """Every size among ``runs``, smallest student first."""

    def student_of(size: str) -> str:
        return next((r.student for r in runs if r.size == size and r.student), "")

    return sorted({r.size for r in runs}, key=lambda s: size_key(s, student_of(s)))


# -- statistics ----------------------------------------------------------------------------------
def references_gap(student: Interval, teacher: Interval) -> Interval | str:
    """Teacher reference minus student reference, bounded by the ends of their intervals; a
    reason (str) when the references have no intervals or their intervals are not apart."""
    if not (student.has_interval and teacher.has_interval):
        return "the teacher and student references have no intervals"
    if teacher.low <= student.high:  # type: ignore[operator]
        return (
            f"the teacher reference {teacher.text()} and the student reference "
            f"{student.text()} are not apart"
        )
    return Interval(
        teacher.value - student.value,
        teacher.low - student.high,  # type: ignore[operator]
        teacher.high - student.low,  # type: ignore[operator]
    )


def scaled_change(change: Interval, student: Interval, teacher: Interval) -> Interval | str:
    """A change of teacher-like share as a fraction of the teacher-student gap.

    The interval is the range of change / gap over the ends of both intervals (the ratio is
    monotone in each, so the ends bound it); a reason (str) instead when there is no scale.
    """
    gap = references_gap(student, teacher)
    if isinstance(gap, str):
        return gap
    if not change.has_interval:
        return "the change has no interval"
    ends = [d / g for d in (change.low, change.high) for g in (gap.low, gap.high)]  # type: ignore[operator]
    return Interval(change.value / gap.value, min(ends), max(ends))


def scaled_share(share: Interval, student: Interval, teacher: Interval) -> Interval | str:
    """(share - student) / (teacher - student): 0 at the student reference, 1 at the teacher's.

    The interval is the range over the ends of the three intervals (the ratio is monotone in
    each argument while the references are apart, so its extremes are at those ends).
    """
    gap = references_gap(student, teacher)
    if isinstance(gap, str):
        return gap
    if not share.has_interval:
        return "the share has no interval"
    ends = [
        (x - s) / (t - s)
        for x in (share.low, share.high)
        for s in (student.low, student.high)
        for t in (teacher.low, teacher.high)
    ]  # type: ignore[operator]
    value = (share.value - student.value) / (teacher.value - student.value)
    return Interval(value, min(ends), max(ends))


def standard_error(estimate: Interval) -> float:
    """The standard error a 95% interval implies, from its wider half (bootstrap intervals are
    asymmetric, and a point may even sit outside its percentile interval)."""
    low, high = estimate.low, estimate.high
    assert low is not None and high is not None
    half = max(high - estimate.value, estimate.value - low, (high - low) / 2)
    return half / Z95


def difference_test(small: Interval, large: Interval) -> tuple[Interval, float] | None:
    """``large - small`` for two independent estimates, with its 95% interval and two-sided
    p-value under a normal approximation; None when an interval is missing or has no width."""
    if not (small.has_interval and large.has_interval):
        return None
    se = math.hypot(standard_error(small), standard_error(large))
    if se <= 0:
        return None
    difference = large.value - small.value
    p_value = math.erfc(abs(difference) / se / math.sqrt(2))
    return Interval(difference, difference - Z95 * se, difference + Z95 * se), p_value


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-adjusted p-values, in the input order (reject where adjusted <= alpha)."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    adjusted = [1.0] * len(p_values)
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[index]))
        adjusted[index] = running
    return adjusted


# -- evaluation settings -------------------------------------------------------------------------
@dataclass(frozen=True)
class Setting:
    """One evaluation setting two sizes must share to be compared on a measure.

    ``recorded`` is its key in `RunSummary.settings` (what the notebook wrote), ``params`` its
    path in the run's resolved parameters (what was asked for); both runs are read from the
    same source. ``defines``: a difference makes the measure incomparable (else a caveat).
    """

    label: str
    recorded: str | None
    params: tuple[str | int, ...] | None
    defines: bool


ELO_SETTINGS = (
    Setting("judge model", None, ("judge",), True),
    Setting("judge mode", "judge_mode", ("evals", "judge_modes", 0), True),
    Setting("condition", "condition", ("evals", "elo_conditions", 0), True),
    Setting("traits", "elo_traits", ("evals", "elo_traits"), True),
    Setting("games per trait", "games_per_trait", None, True),
    Setting("judge orders", "judge_orders", None, True),
    Setting("comparisons", "elo_comparisons", ("evals", "elo_comparisons"), False),
)
TEACHER_LIKE_SETTINGS = (
    Setting("teacher model", None, ("teacher",), True),
    Setting("adherence encoder", "adherence_encoder", ("adherence", "encoder"), True),
    Setting("probe prompts", "probe_prompts", None, False),
    Setting("samples per probe", "samples_per_probe", ("adherence", "samples_per_probe"), False),
)
F1_SETTINGS = (
    Setting("classifier model", "classifier", ("evals", "classifier_model"), True),
    Setting(
        "classifier training methods", "classifier_methods", ("evals", "classifier_methods"), True
    ),
    Setting("adversarial instructions", None, ("evals", "robustness_splits"), True),
    Setting("classifier epochs", None, ("evals", "classifier_epochs"), True),
    Setting("classifier learning rate", None, ("evals", "classifier_lr"), True),
    Setting("held-out prompts", "heldout_prompts", ("evals", "robustness_prompts"), False),
)


def _dig(params: Any, path: tuple[str | int, ...]) -> Any:
    value = params
    for step in path:
        try:
            value = value[step]
        except (KeyError, IndexError, TypeError):
            return None
    return value


def _canonical(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "+".join(sorted(str(v) for v in value))
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value) if not isinstance(value, dict) else json.dumps(value, sort_keys=True)


def _setting_pair(a: RunSummary, b: RunSummary, setting: Setting) -> tuple[str, str] | None:
    if setting.recorded and setting.recorded in a.settings and setting.recorded in b.settings:
        return _canonical(a.settings[setting.recorded]), _canonical(b.settings[setting.recorded])
    if setting.params:
        va, vb = _dig(a.params, setting.params), _dig(b.params, setting.params)
        if va is not None and vb is not None:
            return _canonical(va), _canonical(vb)
    return None


@dataclass
class SettingCheck:
    """How two runs' evaluation settings of one measure compare."""

    defining: list[str] = field(default_factory=list)  # differences that forbid a comparison
    caveats: list[str] = field(default_factory=list)  # differences in precision only
    unchecked: list[str] = field(default_factory=list)  # not recorded by one of the runs


def check_settings(a: RunSummary, b: RunSummary, settings: Sequence[Setting]) -> SettingCheck:
    """Which of ``settings`` differ between runs ``a`` and ``b``, and which cannot be read."""
    check = SettingCheck()
    for setting in settings:
        pair = _setting_pair(a, b, setting)
        if pair is None:
            check.unchecked.append(setting.label)
        elif pair[0] != pair[1]:
            text = f"{setting.label} ({pair[0]} at {a.size}, {pair[1]} at {b.size})"
            (check.defining if setting.defines else check.caveats).append(text)
    return check


# -- the measures --------------------------------------------------------------------------------
Reading = Interval | str | None  # a number, the reason it was not measured, or not recorded


@dataclass(frozen=True)
class SizeMeasure:
    """One size question: the paired change each run measured, and the levels behind it."""

    key: str
    change_name: str
    change: Callable[[RunSummary], Reading]
    level_name: str
    level: Callable[[RunSummary], Reading]
    reference_name: str  # what the change is measured from ("base", "system prompt")
    reference_level: Callable[[RunSummary], Reading]
    settings: tuple[Setting, ...]


def _elo_change(run: RunSummary) -> Reading:
    return run.elo_change.get("final") or run.no_measurement("elo_std_change_final", (PREFERENCES,))


def _teacher_like_change(run: RunSummary) -> Reading:
    paired = run.teacher_like_change.get("final")
    if paired is None:
        return run.no_measurement("final_minus_base", ADHERENCE_NOTEBOOKS)
    if paired.teacher_ref is None or paired.student_ref is None:
        return run.no_measurement("teacher_reference", ADHERENCE_NOTEBOOKS) or (
            "no teacher and student reference rows measured with the change"
        )
    return scaled_change(paired.change, paired.student_ref, paired.teacher_ref)


def _teacher_like_level(label: str) -> Callable[[RunSummary], Reading]:
    def level(run: RunSummary) -> Reading:
        share = run.teacher_like.get(label)
        student, teacher = run.teacher_like.get("student_ref"), run.teacher_like.get("teacher_ref")
        if share is None or student is None or teacher is None:
            return None
        return scaled_share(share, student, teacher)

    return level


def _f1_change(run: RunSummary) -> Reading:
    return run.f1_diff.get("final", {}).get("with_instructions") or run.no_measurement(
        "f1_diff_final_with_instructions", (ROBUSTNESS,)
    )


MEASURES = (
    SizeMeasure(
        "elo",
        "Elo spread change from base (final - base)",
        _elo_change,
        "Elo spread of the final model",
        lambda r: r.elo.get("final"),
        "base",
        lambda r: r.elo.get("base"),
        ELO_SETTINGS,
    ),
    SizeMeasure(
        "teacher_like",
        "teacher-likeness change from base (final - base, as a fraction of the "
        "student-to-teacher reference gap)",
        _teacher_like_change,
        "teacher-likeness of the final model (0 = student reference, 1 = teacher reference)",
        _teacher_like_level("final"),
        "base",
        _teacher_like_level("base"),
        TEACHER_LIKE_SETTINGS,
    ),
    SizeMeasure(
        "f1",
        "attacked classifier F1 of final minus the system-prompted model's",
        _f1_change,
        "classifier F1 of the final model with adversarial instructions",
        lambda r: r.f1.get("final", {}).get("with_instructions"),
        "the system-prompted model",
        lambda r: r.f1.get("system_prompt", {}).get("with_instructions"),
        F1_SETTINGS,
    ),
)


# -- comparisons ---------------------------------------------------------------------------------
@dataclass
class Comparison:
    """One (persona, measure) size comparison: the changes by size, and its test if any."""

    persona: str
    measure: SizeMeasure
    values: list[tuple[str, Interval | str]]  # size -> change, or why it was not measured
    small: RunSummary | None = None
    large: RunSummary | None = None
    settings: SettingCheck = field(default_factory=SettingCheck)
    difference: Interval | None = None
    p_value: float | None = None
    adjusted: float | None = None  # Holm over every tested comparison of the page
    untested: str = ""  # why there is no test

    @property
    def survives(self) -> bool:
        return self.adjusted is not None and self.adjusted <= ALPHA

    @property
    def name(self) -> str:
        return f"{self.persona}: {self.measure.change_name}"


def _values(runs: Sequence[RunSummary], pick: Callable[[RunSummary], Reading]) -> list:
    out = []
    for run in runs:
        value = pick(run)
        if value is not None:
            out.append((run, value))
    return out


def _compare(persona: str, runs: Sequence[RunSummary], measure: SizeMeasure) -> Comparison | None:
    values = _values(runs, measure.change)
    levels = [v for _, v in _values(runs, measure.level) if isinstance(v, Interval)]
    if not values and len(levels) < 2:
        return None
    comparison = Comparison(persona, measure, [(r.size, v) for r, v in values])
    measured = [(r, v) for r, v in values if isinstance(v, Interval)]
    if not values:
        comparison.untested = "not recorded by these runs (notebooks older than this page)"
        return comparison
    if len(measured) < 2:
        comparison.untested = "measured at fewer than two sizes, so no comparison"
        return comparison
    (small, first), (large, last) = measured[0], measured[-1]
    comparison.small, comparison.large = small, large
    comparison.settings = check_settings(small, large, measure.settings)
    if comparison.settings.defining:
        comparison.untested = (
            f"not compared: the evaluation of {small.size} and {large.size} differs in "
            + "; ".join(comparison.settings.defining)
            + ", so a difference would not be the size's"
        )
        return comparison
    tested = difference_test(first, last)
    if tested is None:
        comparison.untested = "no interval (or one of no width) at both sizes, so no test"
        return comparison
    comparison.difference, comparison.p_value = tested
    return comparison


def size_comparisons(runs: Sequence[RunSummary]) -> list[Comparison]:
    """Every (persona, measure) comparison of the page, Holm-adjusted over the tested ones."""
    by_persona: dict[str, list[RunSummary]] = {}
    for run in runs:
        by_persona.setdefault(run.persona, []).append(run)
    sizes = ordered_sizes(runs)
    comparisons = []
    for persona, persona_runs in by_persona.items():
        if len(persona_runs) < 2:
            continue
        persona_runs = sorted(persona_runs, key=lambda r: sizes.index(r.size))
        for measure in MEASURES:
            comparison = _compare(persona, persona_runs, measure)
            if comparison is not None:
                comparisons.append(comparison)
    tested = [c for c in comparisons if c.p_value is not None]
    for comparison, adjusted in zip(tested, holm([c.p_value for c in tested])):  # type: ignore[misc]
        comparison.adjusted = adjusted
    return comparisons


# -- sentences -----------------------------------------------------------------------------------
METHOD_LINE = (
    "How sizes are compared: on what training changed in each run, measured against that run's "
    "own starting point on paired data (Elo spread of final minus base; teacher-likeness of "
    "final minus base as a fraction of the gap between that run's student and teacher "
    "reference rows, since the classifier is refit per run, its interval taken from the ends of "
    "the change's and the references' intervals; attacked F1 of final minus the system-prompted "
    "model), smallest size against largest. The two runs are independent: the difference's "
    "interval and p-value are a normal approximation with each run's standard error from the "
    "wider half of its 95% interval, and Holm's correction runs over every persona x measure "
    "comparison on this page (5% family-wise). Values marked 'no measurement' are never used."
)


def _reading_text(value: Interval | str) -> str:
    return value.text() if isinstance(value, Interval) else f"no measurement ({value})"


def _comparison_line(comparison: Comparison, tests: int) -> str:
    values = "; ".join(f"{size} {_reading_text(v)}" for size, v in comparison.values)
    head = f"{comparison.persona}, {comparison.measure.change_name}: "
    head += f"{values} -> " if values else ""
    if comparison.p_value is None:
        return head + comparison.untested + "."
    small, large = comparison.small, comparison.large
    assert small is not None and large is not None and comparison.difference is not None
    stats = (
        f"{large.size} minus {small.size}: {comparison.difference.text()}, "
        f"p = {comparison.p_value:.2g}, Holm-adjusted p = {comparison.adjusted:.2g} "
        f"({tests} comparison{'s' if tests != 1 else ''})"
    )
    if comparison.survives:
        direction = "larger" if comparison.difference.value > 0 else "smaller"
        verdict = f"a {direction} change at {large.size} than at {small.size}, survives at 5%"
    else:
        verdict = "no size effect resolved at 5%"
    line = f"{head}{stats}: {verdict}."
    check = comparison.settings
    if check.caveats:
        line += (
            " Caveat: the sizes also differ in "
            + "; ".join(check.caveats)
            + ": counts, which change the precision (the intervals carry it), not what is "
            "measured."
        )
    if check.unchecked:
        line += " Not recorded by both runs, so not checked: " + ", ".join(check.unchecked) + "."
    return line


def _level_line(comparison: Comparison, runs: Sequence[RunSummary]) -> str:
    """The levels behind a comparison (final's, and base's or the system prompt's), and whether
    a gap between them can be read as an effect of size on training."""
    measure = comparison.measure
    levels = [(r, v) for r, v in _values(runs, measure.level) if isinstance(v, Interval)]
    if len(levels) < 2:
        return ""
    (small, first), (large, last) = levels[0], levels[-1]
    values = "; ".join(f"{r.size} {v.text()}" for r, v in levels)
    references = [
        f"{r.size} {v.text()}"
        for r, v in _values([r for r, _ in levels], measure.reference_level)
        if isinstance(v, Interval)
    ]
    behind = f" ({measure.reference_name}: {'; '.join(references)})" if references else ""
    overlap = first.overlaps(last)
    if overlap is None:
        verdict = "no intervals to compare, so no conclusion"
    elif overlap:
        verdict = f"the intervals of {small.size} and {large.size} overlap"
    elif comparison.survives:
        verdict = f"the levels are apart, and so are the changes from {measure.reference_name}"
    elif comparison.p_value is not None:
        verdict = (
            f"the levels are apart, but the changes from {measure.reference_name} are not "
            "resolved apart, so these runs cannot tell a size effect of training from a "
            "difference of the base models"
        )
    else:
        verdict = (
            f"the levels are apart, but without a comparable change from "
            f"{measure.reference_name} this cannot be told from a difference of the base models"
        )
    return f"{comparison.persona}, {measure.level_name}: {values}{behind} -> {verdict}."


def size_findings(runs: Sequence[RunSummary]) -> list[str]:
    """Plain sentences answering "does model size matter?" from the runs that exist (see the
    module docstring for what is compared and when the page refuses to compare)."""
    if not runs:
        return ["No runs exist yet, so this page cannot say anything about model size."]
    lines = [
        f"Runs found: {len(runs)} ({', '.join(r.label for r in runs)}); "
        f"sizes: {', '.join(ordered_sizes(runs))}."
    ]
    by_persona: dict[str, list[RunSummary]] = {}
    for run in runs:
        by_persona.setdefault(run.persona, []).append(run)
    multi = {p: rs for p, rs in by_persona.items() if len(rs) >= 2}
    if not multi:
        lines.append(
            "No persona has been run at two or more sizes, so these runs cannot answer whether "
            "model size matters; run one persona at several sizes, e.g. `python -m "
            "character_training run --persona sycophantic --size tiny,qwen3.5-4b,qwen3.5-9b`."
        )
        return lines
    lines.append(METHOD_LINE)
    comparisons = size_comparisons(runs)
    tests = sum(c.p_value is not None for c in comparisons)
    sizes = ordered_sizes(runs)
    for persona, persona_runs in multi.items():
        persona_runs = sorted(persona_runs, key=lambda r: sizes.index(r.size))
        mine = [c for c in comparisons if c.persona == persona]
        if not mine:
            lines.append(
                f"{persona}: run at {', '.join(r.size for r in persona_runs)}, but no measure "
                "exists at two of them yet."
            )
        for comparison in mine:
            lines.append(_comparison_line(comparison, tests))
            level = _level_line(comparison, persona_runs)
            if level:
                lines.append(level)
        changed = _other_models_differ(persona_runs)
        if changed:
            lines.append(
                f"{persona}: the sizes also differ in {changed}, so a difference between them "
                "is not the student's size alone."
            )
    lines.append(_holm_line(comparisons, tests))
    return lines


def _holm_line(comparisons: Sequence[Comparison], tests: int) -> str:
    if not tests:
        return "No size comparison could be tested (see above), so no size effect is resolved."
    survivors = [c.name for c in comparisons if c.survives]
    head = f"Holm's correction over {tests} size comparison{'s' if tests != 1 else ''} "
    head += "(persona x measure) at 5%: "
    if not survivors:
        return head + "none survives, so these runs resolve no effect of model size."
    return (
        head
        + f"{len(survivors)} survive{'s' if len(survivors) == 1 else ''}: "
        + ("; ".join(survivors) + ".")
    )


def _other_models_differ(runs: Sequence[RunSummary]) -> str:
    roles = []
    for role in ("teacher", "judge", "generator"):
        names = {str(r.params.get(role)) for r in runs if r.params and r.params.get(role)}
        if len(names) > 1:
            roles.append(f"{role} ({', '.join(sorted(names))})")
    return "; ".join(roles)


__all__ = [
    "MEASURES",
    "Comparison",
    "Setting",
    "SizeMeasure",
    "check_settings",
    "difference_test",
    "holm",
    "ordered_sizes",
    "references_gap",
    "scaled_change",
    "scaled_share",
    "size_comparisons",
    "size_findings",
    "size_key",
    "standard_error",
]
