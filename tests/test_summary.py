"""Cross-run summary (reports/summary.html) from fabricated run folders; no model is loaded.

Pins: the page shows each run's numbers with their intervals (stage outputs first, headline
summaries as the fallback), orders sizes by parameters, answers the size question only from
runs that exist and says which metrics are missing and why, and a malformed or half-finished
run is reported on the page instead of crashing it. Issue 16: the size answer compares the
paired changes from base (teacher-likeness on each run's reference scale), not absolute levels,
so a base-model difference is not taken for a size effect; it refuses sizes evaluated
differently, and Holm's correction runs over every persona x measure; a Spearman is read as
"training reordered the preferences" only below a high ceiling; "no measurement" is shown with
its reason and never used. `fabricate_run` is shared with test_publish.py.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import pytest
from character_training.cli import main
from character_training.config import load_params
from character_training.runner import build_index
from character_training.summary import build_summary, gather, load_run
from character_training.summary_records import Interval
from character_training.summary_sections import spearman_reading
from character_training.summary_sizes import (
    Z95,
    difference_test,
    holm,
    scaled_change,
    scaled_share,
    size_comparisons,
    size_findings,
    size_key,
)

T0 = 1_780_000_000.0  # a fixed "run date" (2026-05-28)


def _write(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else json.dumps(data, indent=1))


def _write_headline(runs: Path, notebook: str, headline: dict) -> None:
    """A notebook's summary file of the sycophantic/tiny run holding only ``headline``."""
    _write(runs / "sycophantic" / "tiny" / "summaries" / f"{notebook}.json", {"headline": headline})


def fabricate_run(
    runs: Path,
    reports: Path,
    persona: str,
    size: str,
    scale: float,
    *,
    commit: str = "abc1234",
    record_params: bool = True,
    rlaif: bool = True,
    report_html: str | None = None,
    base_elo: float = 40.0,
    judge_mode: str = "logprob",
    headlines: dict[str, dict] | None = None,
) -> None:
    """A finished-looking run: stage 07/08 outputs, adherence reports, summaries, manifests,
    status files, optionally an executed notebook recording its parameters, and a report.

    Numbers grow with ``scale`` so two sizes give distinguishable values; the final model's
    paired changes (Elo spread and teacher-likeness from base) grow with it too, while
    ``base_elo`` moves the base model's spread alone (a different base model). ``judge_mode``
    is stage 07's primary mode; ``headlines`` adds or replaces headline keys per notebook
    (evaluation settings, "no_measurement" entries).
    """
    run = runs / persona / size
    headlines = headlines or {}
    models = {"base": base_elo, "dpo": 60.0, "final": 70.0 * scale}
    spread = [
        {
            "model": m,
            "condition": "adopt",
            "std": v,
            "std_low": v - 5,
            "std_high": v + 5,
            "decided": 50,
            "matches": 60,
            "elo_bt_spearman": 0.9,
        }
        for m, v in models.items()
    ]
    spread.append({**spread[0], "condition": "random", "std": 999.0})  # other condition: ignored
    correlations = [
        {"condition": "adopt", "a": "base", "b": "dpo", "spearman": 0.61, "p_value": 0.01},
        {
            "condition": "adopt",
            "a": "base",
            "b": "final",
            "spearman": 0.42,
            "ci_low": 0.1,
            "ci_high": 0.7,
            "p_value": 0.03,
        },
        {"condition": "adopt", "a": "dpo", "b": "final", "spearman": 0.9, "p_value": 0.0},
    ]
    changes = [
        {
            "model": m,
            "condition": "adopt",
            "std_change": v - models["base"],
            "ci_low": v - models["base"] - 8,
            "ci_high": v - models["base"] + 8,
        }
        for m, v in models.items()
        if m != "base"
    ]
    _write(
        run / "07_preferences" / "summary.json",
        {
            "judge_modes": [judge_mode, "generative"],
            "conditions": ["adopt", "random"],
            "traits": 16,
            "matches_per_condition": 40,
            "spread": {judge_mode: spread, "generative": []},
            "spread_changes": {judge_mode: changes},
            "model_correlations": {judge_mode: correlations},
        },
    )
    f1 = [
        {
            "method": "base",
            "no_instruction": math.nan,
            "no_instruction_low": math.nan,
            "no_instruction_high": math.nan,
            "with_instructions": math.nan,
        },
        *(
            {
                "method": m,
                "no_instruction": 0.7 * scale,
                "no_instruction_low": 0.65 * scale,
                "no_instruction_high": 0.75 * scale,
                "with_instructions": 0.5 * scale,
                "with_instructions_low": 0.4 * scale,
                "with_instructions_high": 0.6 * scale,
            }
            for m in ("system_prompt", "dpo", "final")
        ),
    ]
    _write(run / "08_robustness" / "robustness.json", json.dumps({"summary": f1}))  # NaN kept

    def rows(labels: dict[str, float]) -> list[dict]:
        return [
            {
                "label": label,
                "kind": "reference" if label.endswith("_ref") else "model",
                "probe_set": probe_set,
                "teacher_like": share,
                "teacher_like_low": share - 0.1,
                "teacher_like_high": share + 0.1,
            }
            for label, share in labels.items()
            for probe_set in ("constitution", "general")
        ]

    _write(
        run / "adherence" / "adherence.json",
        {"rows": rows({"base": 0.1, "dpo": 0.3, "teacher_ref": 0.9, "student_ref": 0.05})},
    )
    final_minus_base = 0.4 * scale - 0.1
    _write(
        run / "adherence" / "final.json",
        {
            "rows": rows({"base": 0.1, "dpo": 0.31, "final": 0.4 * scale}),
            "differences": [
                {
                    "a": "final",
                    "b": "base",
                    "probe_set": probe_set,
                    "teacher_like": final_minus_base,
                    "teacher_like_low": final_minus_base - 0.1,
                    "teacher_like_high": final_minus_base + 0.1,
                }
                for probe_set in ("constitution", "general")
            ],
        },
    )
    stamp = {"persona": persona, "size": size, "fingerprint": "f00d", "written": T0 + 50}
    preferences = {
        "elo_std_final": 1.0,  # the stage summary wins over this
        "condition": "adopt",
        "judge_mode": judge_mode,
        "games_per_trait": 5,
        "elo_traits": 16,
        "elo_comparisons": 40,
        "judge_orders": "both",
        "elo_reliability_base": 0.9,
        "elo_reliability_base_ci": [0.8, 0.95],
        "elo_reliability_dpo": 0.85,
        "elo_reliability_final": 0.8,
        "spearman_ceiling_dpo": math.sqrt(0.9 * 0.85),
        "spearman_ceiling_final": math.sqrt(0.9 * 0.8),
        "spearman_disattenuated_final": 0.42 / math.sqrt(0.9 * 0.8),
        "elo_spread_beyond_noise_final": 70.0 * scale - 45,
        "elo_spread_beyond_noise_final_ci": [70.0 * scale - 52, 70.0 * scale - 38],
    }
    robustness = {
        "personas": 1,
        "classifier": "all-MiniLM-L6-v2",
        "classifier_methods": ["system_prompt"],
        "heldout_prompts": 6,
        **{
            f"f1_diff_{m}_{v}": 0.0
            for m in ("dpo", "final")
            for v in ("no_instruction", "with_instructions")
        },
        **{
            f"f1_diff_{m}_{v}_ci": [-0.05, 0.05]
            for m in ("dpo", "final")
            for v in ("no_instruction", "with_instructions")
        },
    }
    sft = {
        "teacher_like_final": 0.4 * scale,
        "teacher_like_final_ci": [0.4 * scale - 0.1, 0.4 * scale + 0.1],
        "final_minus_base": {
            "value": final_minus_base,
            "low": final_minus_base - 0.1,
            "high": final_minus_base + 0.1,
        },
        "teacher_reference": 0.9,
        "teacher_reference_ci": [0.8, 1.0],
        "student_reference": 0.05,
        "student_reference_ci": [-0.05, 0.15],
        "probe_prompts": 13,
    }
    for notebook, headline in (
        ("05_sft", sft),
        ("07_preferences", preferences),
        ("08_robustness", robustness),
    ):
        _write(
            run / "summaries" / f"{notebook}.json",
            {**stamp, "notebook": notebook, "headline": headline | headlines.get(notebook, {})},
        )
    statuses = {"07_preferences": "ok", "08_robustness": "ok"}
    if rlaif:
        _write(
            run / "summaries" / "09_rlaif_compare.json",
            {
                **stamp,
                "notebook": "09_rlaif_compare",
                "headline": {
                    "signal": "judge",
                    "init": "sft",
                    "kl_coef": 0.05,
                    "steps": 20,
                    "reward_end": 0.64,
                    "reward_end_ci": [0.55, 0.73],
                    "teacher_like_final": 0.4 * scale,
                    "teacher_like_rlaif": 0.47,
                    "teacher_like_rlaif_ci": [0.37, 0.57],
                    "rlaif_minus_final": {"value": 0.07, "low": -0.02, "high": 0.16, "level": 0.95},
                    "elo_std": {"final": 70.0 * scale, "rlaif": 81.0},
                    "f1": {"final": [0.8, 0.5], "rlaif": [0.85, 0.66]},
                    "verdict": "no reward hacking",
                },
            },
        )
        statuses["09_rlaif_compare"] = "ok"
    else:
        statuses["09_rlaif_compare"] = "failed"
    for notebook, status in statuses.items():
        error = "RuntimeError: judge output unparseable" if status == "failed" else ""
        _write(
            run / "notebooks" / f"{notebook}.status.json",
            {"notebook": notebook, "status": status, "error": error},
        )
    for stage, offset in (("07_preferences", 0), ("08_robustness", 200)):
        _write(
            run / stage / "manifest.json",
            {
                "git_commit": commit,
                "fingerprint": "stage",
                "status": "done",
                "started": T0 + offset,
                "finished": T0 + offset + 100,
            },
        )
        _write(run / stage / "config.json", {"seed": 0, "stage": stage})
    if record_params:
        params = load_params("tiny", persona).to_dict()
        notebook = {
            "cells": [],
            "metadata": {
                "papermill": {
                    "parameters": {
                        "persona": persona,
                        "size": size,
                        "params_json": json.dumps(params),
                        "smoke": True,
                    }
                }
            },
            "nbformat": 4,
            "nbformat_minor": 5,
        }
        _write(run / "notebooks" / "07_preferences.ipynb", notebook)
    report = reports / persona / size / "07_preferences.html"
    _write(report, report_html or f"<html><body><p>report {persona}/{size}</p></body></html>")


@pytest.fixture
def two_sizes(tmp_path: Path) -> tuple[Path, Path]:
    runs, reports = tmp_path / "runs", tmp_path / "reports"
    fabricate_run(runs, reports, "sycophantic", "qwen3.5-9b", 1.3, rlaif=False, record_params=False)
    fabricate_run(runs, reports, "sycophantic", "tiny", 1.0)
    return runs, reports


def tiny_and_9b(tmp_path: Path, scale: float = 1.5, **nine_b: Any) -> tuple[Path, Path]:
    """The sycophantic persona at tiny (scale 1.0) and at qwen3.5-9b (``scale``, with
    `fabricate_run`'s keyword arguments ``nine_b``); returns the runs and reports folders."""
    runs, reports = tmp_path / "runs", tmp_path / "reports"
    fabricate_run(runs, reports, "sycophantic", "tiny", 1.0)
    fabricate_run(runs, reports, "sycophantic", "qwen3.5-9b", scale, **nine_b)
    return runs, reports


def test_sizes_sort_by_parameters_with_tiny_first_through_its_student():
    sizes = ["qwen3.5-397b", "zeta", "qwen3.5-9b", "tiny", "qwen3.5-4b"]
    students = {"tiny": "HuggingFaceTB/SmolLM2-135M-Instruct"}
    ordered = sorted(sizes, key=lambda s: size_key(s, students.get(s, "")))
    assert ordered == ["tiny", "qwen3.5-4b", "qwen3.5-9b", "qwen3.5-397b", "zeta"]


def test_a_run_is_read_from_stage_outputs_with_intervals(two_sizes):
    runs, reports = two_sizes
    run = load_run(runs, "sycophantic", "tiny", reports)
    assert run.elo == {
        "base": Interval(40.0, 35.0, 45.0),
        "dpo": Interval(60.0, 55.0, 65.0),
        "final": Interval(70.0, 65.0, 75.0),
        "rlaif": Interval(81.0),  # from 09's headline, which has no interval
    }  # first condition only, stage summary preferred over the headline's 1.0
    assert run.elo_setting == "condition adopt, judge mode logprob"
    assert run.spearman == {"dpo": (0.61, 0.01), "final": (0.42, 0.03)}
    assert run.spearman_ci == {"final": (0.1, 0.7)}  # dpo's row has no interval: none shown
    assert "base" not in run.f1  # NaN macro F1 is not a number to show
    assert run.f1["final"]["with_instructions"] == Interval(0.5, 0.4, 0.6)
    assert run.teacher_like["dpo"].value == 0.31  # the later report (05's) wins
    assert run.teacher_like["final"].value == 0.4 and run.teacher_like["teacher_ref"].value == 0.9
    assert run.rlaif["verdict"] == "no reward hacking"
    assert run.rlaif["rlaif_minus_final"] == Interval(0.07, -0.02, 0.16)
    assert run.params["persona"] == "sycophantic" and "papermill" in run.params_source
    assert run.reports == ["sycophantic/tiny/07_preferences.html"]
    assert not run.missing and not run.problems


def test_summary_page_shows_both_runs_numbers_figures_and_what_is_missing(two_sizes):
    runs, reports = two_sizes
    text = build_summary(runs, reports).read_text()
    assert text.index("sycophantic/tiny") < text.index("sycophantic/qwen3.5-9b")
    # Elo std with intervals for both sizes, F1 and teacher-likeness of the larger one
    assert "70 [65, 75]" in text and "91 [86, 96]" in text
    assert "0.65 [0.52, 0.78]" in text and "0.52 [0.42, 0.62]" in text
    assert "0.61 (p=0.01)" in text and "no reward hacking" in text
    assert text.count('src="data:image/png;base64,') == 3  # Elo, F1, teacher-likeness
    assert "09_rlaif_compare failed: RuntimeError: judge output unparseable" in text
    assert 'href="sycophantic/tiny/07_preferences.html"' in text
    assert "http://" not in text and "https://" not in text
    # the size answer names the runs it rests on and compares smallest with largest
    assert "Runs found: 2 (sycophantic/tiny, sycophantic/qwen3.5-9b)" in text
    assert "Elo spread of the final model: tiny 70 [65, 75]; qwen3.5-9b 91 [86, 96]" in text
    # ... but the two sizes were judged by different models: no comparison of their changes
    assert (
        "Elo spread change from base (final - base): tiny 30 [22, 38]; qwen3.5-9b 51 [43, 59] "
        "-&gt; not compared: the evaluation of tiny and qwen3.5-9b differs in judge model"
    ) in text
    assert "without a comparable change from base this cannot be told from a difference" in text


def test_size_findings_say_when_no_persona_has_two_sizes(tmp_path):
    runs, reports = tmp_path / "runs", tmp_path / "reports"
    assert "No runs exist yet" in size_findings(gather(runs, reports))[0]
    fabricate_run(runs, reports, "sycophantic", "tiny", 1.0)
    fabricate_run(runs, reports, "loving", "tiny", 1.0)
    lines = size_findings(gather(runs, reports))
    assert "No persona has been run at two or more sizes" in lines[-1]


def test_close_sizes_resolve_no_size_effect(tmp_path):
    runs, reports = tmp_path / "runs", tmp_path / "reports"
    fabricate_run(runs, reports, "sycophantic", "tiny", 1.0)
    fabricate_run(runs, reports, "sycophantic", "qwen3.5-4b", 1.05)
    lines = size_findings(gather(runs, reports))
    elo = next(line for line in lines if "Elo spread change from base" in line)
    assert "tiny 30 [22, 38]; qwen3.5-4b 34 [26, 42]" in elo
    assert elo.endswith("no size effect resolved at 5%.")
    assert any("the intervals of tiny and qwen3.5-4b overlap" in line for line in lines)
    assert lines[-1].endswith("none survives, so these runs resolve no effect of model size.")


def test_a_malformed_or_half_finished_run_is_reported_not_fatal(two_sizes):
    runs, reports = two_sizes
    broken = runs / "loving" / "tiny"
    _write(broken / "07_preferences" / "summary.json", "{not json")
    _write(broken / "08_robustness" / "robustness.json", {"summary": [{"no_method": 1}]})
    _write(broken / "adherence" / "adherence.json", {"rows": "nope"})
    _write(broken / "notebooks" / "07_preferences.status.json", {"status": "failed", "error": "x"})
    _write(
        broken / "summaries" / "03_dpo.json",
        {"headline": {"teacher_like_dpo": 0.25, "teacher_like_dpo_ci": [0.2, 0.3]}},
    )
    (reports / "stoic" / "tiny").mkdir(parents=True)
    (reports / "stoic" / "tiny" / "01_prompts.html").write_text("<p>only a report</p>")
    text = build_summary(runs, reports).read_text()
    assert "Files that could not be read" in text
    assert "loving/tiny/07_preferences/summary.json: unreadable (JSONDecodeError)" in text
    assert "loving/tiny/08_robustness/robustness.json: unexpected layout (KeyError" in text
    assert "Elo spread: 07_preferences failed: x" in text
    assert "0.25 [0.20, 0.30]" in text  # teacher-likeness from 03's headline as the fallback
    assert "stoic/tiny" in text and "no run folder (reports only)" in text


def test_headlines_are_the_fallback_when_stage_outputs_are_gone(tmp_path):
    runs = tmp_path / "runs"
    _write_headline(
        runs,
        "07_preferences",
        {
            "condition": "adopt",
            "judge_mode": "generative",
            "elo_std_final": 55.0,
            "elo_std_final_ci": [50.0, 61.0],
            "spearman_base_final": 0.3,
            "spearman_base_final_p": 0.2,
            "spearman_base_final_ci": [-0.1, 0.6],
        },
    )
    _write_headline(
        runs,
        "08_robustness",
        {"f1_dpo_with_instructions": 0.6, "f1_dpo_with_instructions_ci": [0.5, 0.7]},
    )
    run = load_run(runs, "sycophantic", "tiny")
    assert run.elo == {"final": Interval(55.0, 50.0, 61.0)}
    assert run.spearman == {"final": (0.3, 0.2)}
    assert run.spearman_ci == {"final": (-0.1, 0.6)}
    assert run.f1 == {"dpo": {"with_instructions": Interval(0.6, 0.5, 0.7)}}
    assert run.partial["elo"] == "no base, dpo"
    assert run.missing["teacher_like"] == "03_dpo has not run"


def test_index_links_the_summary_once_it_exists(two_sizes):
    runs, reports = two_sizes
    assert "summary.html" not in build_index(reports, runs).read_text()
    build_summary(runs, reports)
    assert '<a href="summary.html">' in build_index(reports, runs).read_text()


def test_cli_summary_writes_the_page_and_the_index(two_sizes, capsys):
    runs, reports = two_sizes
    started = time.time()
    assert main(["summary", "--runs-dir", str(runs), "--reports-dir", str(reports)]) == 0
    assert capsys.readouterr().out.strip() == str(reports / "summary.html")
    assert (reports / "summary.html").stat().st_mtime >= started - 1
    assert '<a href="summary.html">' in (reports / "index.html").read_text()


def test_a_spread_below_its_bootstrap_interval_still_draws(tmp_path):
    """Resampling inflates an Elo spread, so a std can sit below its own percentile interval
    (a real tiny run: dpo 27.9 [28.5, 50.0]); the page must render, not raise on a negative
    error bar."""
    runs = tmp_path / "runs"
    _write_headline(
        runs,
        "07_preferences",
        {
            "condition": "adopt",
            "judge_mode": "calibrated",
            "elo_std_base": 40.0,
            "elo_std_base_ci": [36.1, 59.1],
            "elo_std_dpo": 27.9,
            "elo_std_dpo_ci": [28.5, 50.0],
        },
    )
    text = build_summary(runs, tmp_path / "reports").read_text()
    assert "27.9 [28.5, 50.0]" in text or "28 [28, 50]" in text
    assert text.count('src="data:image/png;base64,') >= 1


# -- the size answer: paired changes, settings, Holm --------------------------------------------
def test_a_real_size_difference_in_training_survives_holm(tmp_path):
    """Both sizes evaluated alike; training widens the Elo spread by 30 at tiny and 65 at 9b."""
    runs, reports = tiny_and_9b(tmp_path)
    found = gather(runs, reports)
    elo, teacher_like, f1 = size_comparisons(found)
    se = math.hypot(8 / Z95, 8 / Z95)  # each change's interval is +-8
    assert elo.difference.value == pytest.approx(35.0)
    assert elo.p_value == pytest.approx(math.erfc(35 / se / math.sqrt(2)))
    assert elo.adjusted == pytest.approx(3 * elo.p_value) and elo.survives
    assert not teacher_like.survives and not f1.survives and f1.p_value == pytest.approx(1.0)
    assert not elo.settings.defining and not elo.settings.caveats and not elo.settings.unchecked
    lines = size_findings(found)
    line = next(x for x in lines if "Elo spread change from base" in x)
    assert "tiny 30 [22, 38]; qwen3.5-9b 65 [57, 73] -> qwen3.5-9b minus tiny: 35 [24, 46]" in line
    assert line.endswith(
        "(3 comparisons): a larger change at qwen3.5-9b than at tiny, survives at 5%."
    )
    assert lines[-1] == (
        "Holm's correction over 3 size comparisons (persona x measure) at 5%: 1 survives: "
        "sycophantic: Elo spread change from base (final - base)."
    )
    assert any("the levels are apart, and so are the changes from base" in x for x in lines)


def test_a_base_model_difference_is_not_taken_for_a_size_effect(tmp_path):
    """The larger final model's spread is higher only because its base model's is: the same
    change from base at both sizes."""
    runs, reports = tiny_and_9b(tmp_path, 1.3, base_elo=61.0)
    found = gather(runs, reports)
    elo = size_comparisons(found)[0]
    assert elo.difference.value == pytest.approx(0.0) and not elo.survives
    assert (
        "sycophantic, Elo spread of the final model: tiny 70 [65, 75]; qwen3.5-9b 91 [86, 96] "
        "(base: tiny 40 [35, 45]; qwen3.5-9b 61 [56, 66]) -> the levels are apart, but the "
        "changes from base are not resolved apart, so these runs cannot tell a size effect of "
        "training from a difference of the base models."
    ) in size_findings(found)


def test_sizes_evaluated_differently_are_not_compared_and_counts_are_a_caveat(tmp_path):
    runs, reports = tiny_and_9b(
        tmp_path,
        judge_mode="generative",
        headlines={
            "08_robustness": {"classifier": "answerdotai/ModernBERT-base"},
            "05_sft": {"probe_prompts": 40},
        },
    )
    found = gather(runs, reports)
    elo, teacher_like, f1 = size_comparisons(found)
    assert elo.p_value is None and f1.p_value is None  # refused, not tested: not in Holm
    assert elo.settings.defining == ["judge mode (logprob at tiny, generative at qwen3.5-9b)"]
    assert f1.settings.defining == [
        "classifier model (all-MiniLM-L6-v2 at tiny, answerdotai/ModernBERT-base at qwen3.5-9b)"
    ]
    assert teacher_like.settings.caveats == ["probe prompts (13 at tiny, 40 at qwen3.5-9b)"]
    lines = size_findings(found)
    text = "\n".join(lines)
    assert (
        "not compared: the evaluation of tiny and qwen3.5-9b differs in judge mode (logprob at "
        "tiny, generative at qwen3.5-9b), so a difference would not be the size's."
    ) in text
    assert "Caveat: the sizes also differ in probe prompts (13 at tiny, 40 at qwen3.5-9b)" in text
    assert lines[-1].startswith("Holm's correction over 1 size comparison (persona x measure)")


def test_settings_a_run_did_not_record_are_named_as_unchecked(tmp_path):
    runs, reports = tiny_and_9b(tmp_path)
    headline = runs / "sycophantic" / "tiny" / "summaries" / "07_preferences.json"
    data = json.loads(headline.read_text())
    del data["headline"]["games_per_trait"], data["headline"]["judge_orders"]  # an older 07
    headline.write_text(json.dumps(data))
    elo = size_comparisons(gather(runs, reports))[0]
    assert elo.settings.unchecked == ["games per trait", "judge orders"] and elo.survives
    line = next(x for x in size_findings(gather(runs, reports)) if "Elo spread change" in x)
    assert line.endswith(
        "Not recorded by both runs, so not checked: games per trait, judge orders."
    )


def test_holm_corrects_over_every_persona_and_measure(tmp_path):
    """loving's Elo change differs between sizes at p ~ 0.03, which six comparisons do not
    let through; sycophantic's much larger difference survives."""
    runs, reports = tmp_path / "runs", tmp_path / "reports"
    for persona, scale in (("sycophantic", 1.5), ("loving", 1.181)):
        fabricate_run(runs, reports, persona, "tiny", 1.0)
        fabricate_run(runs, reports, persona, "qwen3.5-9b", scale)
    comparisons = size_comparisons(gather(runs, reports))
    assert len([c for c in comparisons if c.p_value is not None]) == 6
    loving = next(c for c in comparisons if c.persona == "loving" and c.measure.key == "elo")
    assert 0.02 < loving.p_value < 0.04 and loving.adjusted > 0.05 and not loving.survives
    assert [c.name for c in comparisons if c.survives] == [
        "sycophantic: Elo spread change from base (final - base)"
    ]
    assert size_findings(gather(runs, reports))[-1].startswith(
        "Holm's correction over 6 size comparisons (persona x measure) at 5%: 1 survives"
    )


def test_holm_matches_the_step_down_by_hand():
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([]) == []


def test_teacher_likeness_on_the_scale_of_its_own_references():
    student, teacher = Interval(0.1, 0.05, 0.15), Interval(0.9, 0.85, 0.95)
    share = scaled_share(Interval(0.5, 0.4, 0.6), student, teacher)
    # the ends: (0.4 - 0.15) / (0.95 - 0.15) and (0.6 - 0.05) / (0.85 - 0.05)
    assert share == Interval(pytest.approx(0.5), pytest.approx(0.3125), pytest.approx(0.6875))
    change = scaled_change(Interval(0.2, 0.1, 0.3), student, teacher)
    assert change == Interval(
        pytest.approx(0.25), pytest.approx(0.1 / 0.9), pytest.approx(0.3 / 0.7)
    )
    apart_not = scaled_change(Interval(0.2, 0.1, 0.3), student, Interval(0.3, 0.12, 0.5))
    assert apart_not == (
        "the teacher reference 0.30 [0.12, 0.50] and the student reference 0.10 [0.05, 0.15] "
        "are not apart"
    )


def test_a_difference_of_two_runs_uses_the_wider_half_of_each_interval():
    tested = difference_test(Interval(10.0, 6.0, 20.0), Interval(30.0, 28.0, 32.0))
    se = math.hypot(10 / Z95, 2 / Z95)
    assert tested is not None
    assert tested[0] == Interval(20.0, pytest.approx(20 - Z95 * se), pytest.approx(20 + Z95 * se))
    assert tested[1] == pytest.approx(math.erfc(20 / se / math.sqrt(2)))
    assert difference_test(Interval(10.0), Interval(30.0, 28.0, 32.0)) is None


# -- no measurement ------------------------------------------------------------------------------
def test_no_measurement_shows_its_reason_and_is_never_used(tmp_path):
    auc = "classifier AUC 0.55 [0.41, 0.69] includes 0.5"
    runs, reports = tiny_and_9b(
        tmp_path,
        rlaif=False,  # 09 measures final again, with its own classifier fit
        headlines={
            "05_sft": {"final_minus_base": None, "no_measurement": {"final_minus_base": auc}},
            "07_preferences": {
                "no_measurement": {
                    "elo_std_change_final": "the judge decided 3 of 40 matches",
                    "spearman_base_final": "the judge decided 3 of 40 matches",
                    "spearman_ceiling_dpo": "the split halves share no trait",
                }
            },
        },
    )
    big = runs / "sycophantic" / "qwen3.5-9b"
    robustness = json.loads((big / "08_robustness" / "robustness.json").read_text())
    for record in robustness["summary"]:
        if record["method"] == "final":
            record |= {"status": "no measurement", "reason": "every reply classed as base"}
    _write(big / "08_robustness" / "robustness.json", robustness)
    adherence = json.loads((big / "adherence" / "final.json").read_text())
    for row in adherence["rows"]:
        if row["label"] == "final":
            row |= {"status": "no measurement", "reason": auc}
    _write(big / "adherence" / "final.json", adherence)

    run = load_run(runs, "sycophantic", "qwen3.5-9b")
    # the stage outputs still hold the numbers; the page takes none of them
    assert "final" not in run.elo_change and "final" not in run.spearman
    assert "final" not in run.spearman_ci and "final" not in run.f1
    assert "final" not in run.teacher_like and "final" not in run.teacher_like_change
    assert run.elo_change["dpo"] == Interval(20.0, 12.0, 28.0)  # only what was withheld goes
    assert run.no_measurement("f1_final_with_instructions") == "every reply classed as base"

    text = build_summary(runs, reports).read_text()
    assert f"no measurement ({auc})" in text  # teacher-likeness of final, and final - base
    assert "no measurement (every reply classed as base)" in text  # F1 of final
    assert "no measurement (the judge decided 3 of 40 matches)" in text  # Spearman, change
    assert (
        "07_preferences: elo_std_change_final, spearman_base_final: no measurement (the judge"
        in text
    )  # one line per failed instrument, naming every value it withheld
    assert "no measurement (the split halves share no trait)" in text  # not sqrt(0.9 * 0.85)
    assert "no ceiling recorded (the split halves share no trait), so a low rho cannot" in text
    lines = size_findings(gather(runs, reports))
    elo = next(x for x in lines if "Elo spread change" in x)
    assert elo == (
        "sycophantic, Elo spread change from base (final - base): tiny 30 [22, 38]; qwen3.5-9b "
        "no measurement (the judge decided 3 of 40 matches) -> measured at fewer than two "
        "sizes, so no comparison."
    )
    assert lines[-1].startswith("Holm's correction over 1 size comparison")  # F1 diff only


# -- Spearman beside its ceiling -----------------------------------------------------------------
def test_spearman_reads_as_reordering_only_below_a_high_ceiling(tmp_path):
    runs, reports = tmp_path / "runs", tmp_path / "reports"
    fabricate_run(runs, reports, "sycophantic", "tiny", 1.0)
    low = math.sqrt(0.3 * 0.8)
    fabricate_run(
        runs,
        reports,
        "loving",
        "tiny",
        1.0,
        headlines={
            "07_preferences": {
                "elo_reliability_base": 0.3,
                "elo_reliability_base_ci": [0.1, 0.5],
                "spearman_ceiling_dpo": math.sqrt(0.3 * 0.85),
                "spearman_ceiling_final": low,
                "spearman_disattenuated_final": 0.42 / low,
            }
        },
    )
    text = build_summary(runs, reports).read_text()
    rows = [row for row in text.split("<tr>") if "<td>base vs final</td>" in row]
    assert len(rows) == 2
    high = next(row for row in rows if "sycophantic/tiny" in row)
    noisy = next(row for row in rows if "loving/tiny" in row)
    assert "0.42 [0.10, 0.70] (p=0.03)" in high and "0.90 [0.80, 0.95]" in high
    assert "<td>0.85</td>" in high and "<td>0.49</td>" in high  # ceiling, rho / ceiling
    assert "the ceiling 0.85 is well above the interval: low means training reordered" in high
    assert "the measurement&#x27;s ceiling is 0.49, so a low rho cannot be told from noise" in noisy
    assert "reordered" not in noisy and "<td>0.86</td>" in noisy  # 0.42 / 0.49


def test_spearman_wording_without_reliabilities_and_near_the_ceiling():
    assert spearman_reading(0.3, (0.0, 0.6), None, None) == (
        "no ceiling recorded (no reliabilities), so a low rho cannot be told from noise"
    )
    assert "does not agree with itself (split-half reliability -0.10)" in spearman_reading(
        0.3, None, None, -0.1
    )
    assert spearman_reading(0.3, (0.0, 0.55), 0.9, 0.95).endswith("reordered the preferences")
    assert spearman_reading(0.3, (0.0, 0.85), 0.9, 0.95) == (
        "the measurement's ceiling is 0.90, so a low rho cannot be told from noise"
    )
    # the tiny run: base vs dpo 0.61 [0.10, 0.87] against a ceiling of 0.17
    assert spearman_reading(0.61, (0.10, 0.87), 0.17, 0.38).startswith(
        "rho is above its ceiling 0.17: the rankings share the judge's reading"
    )


def test_teacher_likeness_is_read_on_the_probe_set_the_headline_uses(tmp_path):
    """With prompts of held-out assertions ("unseen") the headline reads those: a classifier
    that fails on the sibling ("constitution") probes must not withhold the unseen numbers."""
    from character_training.summary import load_run, report_probe_set

    failed = "classifier AUC 0.68 [0.24, 0.96] on the constitution probe prompts includes 0.5"

    def row(label: str, probe_set: str, share: float) -> dict:
        measured = probe_set == "unseen"
        return {
            "label": label,
            "probe_set": probe_set,
            "teacher_like": share,
            "teacher_like_low": share - 0.1,
            "teacher_like_high": share + 0.1,
            "status": "measured" if measured else "no measurement",
            "reason": "" if measured else failed,
        }

    shares = {"teacher_ref": 0.93, "student_ref": 0.57, "base": 0.54, "dpo": 0.54}
    rows = [row(label, ps, v) for label, v in shares.items() for ps in ("unseen", "constitution")]
    _write(tmp_path / "runs" / "p" / "tiny" / "adherence" / "adherence.json", {"rows": rows})
    assert report_probe_set(rows) == "unseen"
    assert report_probe_set([r for r in rows if r["probe_set"] != "unseen"]) == "constitution"
    run = load_run(tmp_path / "runs", "p", "tiny")
    assert run.teacher_like["base"].value == 0.54 and run.teacher_like["teacher_ref"].value == 0.93
    assert run.no_measurement("teacher_like_base") is None
