"""The calibration harness measures what it claims (issue 16, item 9).

`calibrate` is only useful if its own arithmetic is right: on a statistic whose interval is
exactly right it must report about 5% false positives, about 95% coverage and the textbook
detectable effect (2.8 standard errors at 80% power); on a statistic with an interval that is
too narrow it must say so. Both cases are pure numpy and take well under a second.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from character_training.calibration.harness import Case, Trial, calibrate_case, mc_se
from character_training.cli import main

SE = 0.1


def normal_case(width: float) -> Case:
    """An estimate ~ N(knob, SE^2) with interval estimate +- width * 1.96 * SE."""

    def simulate(knob: float, reps: int, rng: np.random.Generator, intervals: bool) -> Trial:
        estimate = knob + SE * rng.standard_normal(reps)
        half = width * 1.96 * SE
        return Trial(estimate, estimate - half, estimate + half, np.full(reps, knob))

    return Case("toy mean", "units", 0.0, simulate, (0.0, 1.0))


def test_a_correct_interval_gets_its_nominal_rates_and_the_textbook_effect():
    row = calibrate_case(normal_case(1.0), reps=2000, seed=1)
    assert abs(row.false_positive_rate - 0.05) < 0.02
    assert abs(row.coverage - 0.95) < 0.02
    assert abs(row.detectable_effect - 2.8 * SE) < 0.03
    assert abs(row.power_at_detectable - 0.8) < 0.05


def test_a_too_narrow_interval_is_caught():
    row = calibrate_case(normal_case(0.5), reps=2000, seed=2)
    assert row.false_positive_rate > 0.25  # 1 - P(|z| < 0.98) = 0.33
    assert row.coverage < 0.75


def test_an_effect_out_of_reach_is_reported_as_not_reached():
    def simulate(knob, reps, rng, intervals):
        estimate = 0.01 * knob + SE * rng.standard_normal(reps)
        return Trial(estimate, estimate - 0.196, estimate + 0.196, np.full(reps, 0.01 * knob))

    row = calibrate_case(Case("weak", "units", 0.0, simulate, (0.0, 1.0)), reps=500, seed=3)
    assert math.isinf(row.detectable_effect) and "not reached" in row.note


def test_the_command_prints_one_json_row_per_statistic(capsys):
    assert main(["calibrate", "--size", "tiny", "--reps", "10", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    names = [r["statistic"] for r in rows]
    for expected in (
        "Elo spread change (final - base)",
        "Spearman vs base",
        "teacher-likeness difference (dpo - base)",
        "F1 difference (final - system prompt)",
        "coherence win rate",
        "RLAIF reward-hacking verdict",
    ):
        assert expected in names
    for row in rows:
        assert {"statistic", "false_positive_rate", "coverage", "detectable_effect"} <= set(row)
        assert row["reps"] == 10


def test_the_teacher_likeness_difference_keeps_its_level_on_few_probe_prompts():
    """BCa over 14 prompts with one binary reply each rejected a true null 12% of the time;
    below 30 prompts the paired difference now uses Student's t on per-prompt differences."""
    from character_training.calibration.reply_cases import teacher_likeness_case

    row = calibrate_case(teacher_likeness_case(14, 1, 200), reps=400, seed=5)
    assert row.false_positive_rate <= 0.08
    assert row.coverage >= 0.92


def test_rates_carry_their_monte_carlo_error_into_the_table():
    from character_training.calibration.table import format_table

    assert mc_se(0.95, 200) == pytest.approx(0.0154, abs=1e-4)
    row = calibrate_case(normal_case(1.0), reps=400, seed=4)
    assert row.coverage_mc_se == pytest.approx(mc_se(row.coverage, 400))
    assert row.as_dict()["false_positive_mc_se"] == pytest.approx(
        mc_se(row.false_positive_rate, 400)
    )
    text = format_table([row])
    assert f"{row.coverage:.2g} +-{row.coverage_mc_se:.3f}" in text
    assert "Monte Carlo standard error" in text


def test_the_fitted_prior_slope_invents_no_spread_where_subtracting_all_of_it_does():
    """Issue 16, item 2, on a model without preferences and a judge whose taste for trait words
    survives a reply at 0.5 or 1.5 times its empty-reply strength: removing the fitted slope
    keeps false positives near 5%; the retired one-for-one subtraction invents spreads at 0.5;
    no calibration at 1.5 is caught as a ranking explained by the judge's prior."""
    from character_training.calibration.elo_cases import calibrated_spread_case
    from character_training.calibration.elo_world import Design

    design = Design(traits=12, matches=600)

    def null(slope: float, mode: str) -> Trial:
        case = calibrated_spread_case(design, 60, slope, mode)
        return case.simulate(0.0, 150, np.random.default_rng(3), True)

    for slope in (0.5, 1.5):
        fitted = null(slope, "fitted")
        assert fitted.excludes(0.0).mean() <= 0.07 and fitted.measured().mean() > 0.95
    assert null(0.5, "slope1").excludes(0.0).mean() > 0.1
    assert null(1.5, "plain").measured().mean() < 0.1
