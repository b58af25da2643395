"""The calibration table of a preset: its sample sizes, its cases, one row per statistic.

`design_sizes` reads the sizes the evaluations will actually use from the resolved parameters
(and the persona's constitution, which sets how many held-out prompts stage 02 keeps):
matches, traits and bootstrap resamples of stage 07, the probe prompts of the teacher-likeness
measure, the held-out comparisons of stage 08 and the probes of stage 09. `calibrate` runs
every case at those sizes and `format_table` prints the result.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

from ..config import RunParams
from ..constitutions import load_constitution
from ..evaluate.preference_matches import load_traits
from . import elo_cases, reply_cases
from .elo_world import Design
from .harness import Case, Row, calibrate_case

HAND_WRITTEN_PER_ASSERTION = 5  # stage 01 keeps 5 hand-written prompts per assertion


@dataclass(frozen=True)
class Sizes:
    """The sample sizes a preset's evaluations run at."""

    traits: int
    matches: int
    elo_bootstrap: int
    probe_prompts: int
    samples_per_probe: int
    adherence_bootstrap: int
    heldout_comparisons: int
    robustness_bootstrap: int
    robustness_splits: int
    rl_probe_prompts: int

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def design_sizes(params: RunParams) -> Sizes:
    """Sizes from the parameters: the headline teacher-likeness probes are every prompt of the
    ``distill.heldout_assertions`` assertions held out whole (without any, the held-out
    siblings: ``distill.heldout_fraction`` per assertion, less the classifier's share
    ``adherence.classifier_fraction``); stage 08 holds out ``1 - evals.robustness_train_fraction``
    of its prompts."""
    e = params.evals
    vocabulary = len(load_traits())
    traits = e.elo_traits or vocabulary
    constitution = load_constitution(
        params.constitution_ref, allow_opt_in=True, prompts_per_assertion=None
    )
    per_assertion = HAND_WRITTEN_PER_ASSERTION + params.prompts.generated_per_assertion
    unseen = min(params.distill.heldout_assertions, len(constitution.assertions) - 1)
    if unseen > 0:  # the headline probes: every prompt of the assertions held out whole
        probes = unseen * per_assertion
    else:  # the held-out siblings, less the classifier's share
        heldout = len(constitution.assertions) * max(
            1, round(per_assertion * params.distill.heldout_fraction)
        )
        probes = max(1, round(heldout * (1 - params.adherence.classifier_fraction)))
    return Sizes(
        traits=traits,
        matches=e.elo_comparisons,
        elo_bootstrap=e.elo_bootstrap,
        probe_prompts=probes,
        samples_per_probe=params.adherence.samples_per_probe,
        adherence_bootstrap=params.adherence.bootstrap,
        heldout_comparisons=max(1, round(e.robustness_prompts * (1 - e.robustness_train_fraction))),
        robustness_bootstrap=e.robustness_bootstrap,
        robustness_splits=e.robustness_splits,
        rl_probe_prompts=params.rl.probe_prompts,
    )


def cases(sizes: Sizes) -> list[Case]:
    """Every headline statistic (and the calibrated judge mode's check), at ``sizes``."""
    design = Design(sizes.traits, sizes.matches)
    boot = sizes.elo_bootstrap
    return [
        elo_cases.spread_change_case(design, boot),
        elo_cases.spearman_case(design, boot),
        elo_cases.spread_case(design, boot),
        *(elo_cases.calibrated_spread_case(design, boot, slope) for slope in (0.0, 0.5, 1.0, 1.5)),
        reply_cases.teacher_likeness_case(
            sizes.probe_prompts, sizes.samples_per_probe, sizes.adherence_bootstrap
        ),
        reply_cases.f1_difference_case(  # the headline: mean over the adversarial splits
            sizes.heldout_comparisons, sizes.robustness_bootstrap, sizes.robustness_splits
        ),
        reply_cases.f1_difference_case(
            sizes.heldout_comparisons, sizes.robustness_bootstrap, 1, ", no instruction"
        ),
        reply_cases.coherence_case(sizes.heldout_comparisons),
        reply_cases.hacking_verdict_case(
            sizes.rl_probe_prompts, sizes.probe_prompts, sizes.adherence_bootstrap
        ),
    ]


def calibrate(
    params: RunParams,
    reps: int,
    seed: int,
    progress: Callable[[str], None] | None = None,
) -> tuple[Sizes, list[Row]]:
    """Run every case; ``progress(statistic)`` is called before each."""
    sizes = design_sizes(params)
    rows = []
    for index, case in enumerate(cases(sizes)):
        if progress:
            progress(case.statistic)
        rows.append(calibrate_case(case, reps, seed + 1000 * index))
    return sizes, rows


def _fmt(value: float, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if math.isinf(value):
        return "not reached"
    return f"{value:.{digits}g}"


def format_table(rows: Sequence[Row]) -> str:
    """A plain-text table: statistic, false-positive rate, coverage (each with its Monte Carlo
    standard error), detectable effect."""
    header = (
        "statistic",
        "FPR (5%)",
        "coverage (95%)",
        "no meas.",
        "detectable (80%)",
        "power",
    )

    def with_se(rate: float, se: float) -> str:
        return f"{_fmt(rate, 2)} +-{se:.3f}" if math.isfinite(se) else _fmt(rate, 2)

    body = [
        (
            r.statistic,
            with_se(r.false_positive_rate, r.false_positive_mc_se),
            with_se(r.coverage, r.coverage_mc_se),
            _fmt(r.no_measurement_rate, 2),
            f"{_fmt(r.detectable_effect)} {r.unit}"
            if math.isfinite(r.detectable_effect)
            else "not reached",
            _fmt(r.power_at_detectable, 2),
        )
        for r in rows
    ]
    widths = [max(len(str(x)) for x in column) for column in zip(header, *body)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(line, widths)) for line in (header, *body)]
    lines.insert(1, "  ".join("-" * w for w in widths))
    reps = rows[0].reps if rows else 0
    legend = [
        f"+- : Monte Carlo standard error of the rate over {reps} simulated experiments "
        "(coverage: the lower of no effect and the detectable effect); a shortfall within 2 "
        "of them may be noise, rerun with more --reps."
    ]
    notes = [f"- {r.statistic}: {r.note}" for r in rows if r.note]
    return "\n".join(lines + [""] + legend + ([""] + notes if notes else []))
