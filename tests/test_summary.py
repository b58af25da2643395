"""Cross-run summary (reports/summary.html) from fabricated run folders; no model is loaded.

Pins: the page shows each run's numbers with their intervals (stage outputs first, headline
summaries as the fallback), orders sizes by parameters, answers the size question only from
runs that exist and says which metrics are missing and why, and a malformed or half-finished
run is reported on the page instead of crashing it. `fabricate_run` is shared with
test_publish.py.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
from character_training.cli import main
from character_training.config import load_params
from character_training.runner import build_index
from character_training.summary import (
    Interval,
    build_summary,
    gather,
    load_run,
    size_findings,
    size_key,
)

T0 = 1_780_000_000.0  # a fixed "run date" (2026-05-28)


def _write(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else json.dumps(data, indent=1))


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
) -> None:
    """A finished-looking run: stage 07/08 outputs, adherence reports, summaries, manifests,
    status files, optionally an executed notebook recording its parameters, and a report.

    Numbers grow with ``scale`` so two sizes give distinguishable values.
    """
    run = runs / persona / size
    models = {"base": 40.0, "dpo": 60.0, "final": 70.0 * scale}
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
    _write(
        run / "07_preferences" / "summary.json",
        {
            "judge_modes": ["logprob", "generative"],
            "conditions": ["adopt", "random"],
            "spread": {"logprob": spread, "generative": []},
            "model_correlations": {"logprob": correlations},
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
    _write(
        run / "adherence" / "final.json",
        {"rows": rows({"base": 0.1, "dpo": 0.31, "final": 0.4 * scale})},
    )
    stamp = {"persona": persona, "size": size, "fingerprint": "f00d", "written": T0 + 50}
    _write(
        run / "summaries" / "07_preferences.json",
        {**stamp, "notebook": "07_preferences", "headline": {"elo_std_final": 1.0}},
    )
    _write(
        run / "summaries" / "08_robustness.json",
        {**stamp, "notebook": "08_robustness", "headline": {"personas": 1}},
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
    assert "higher at qwen3.5-9b than at tiny, intervals apart" in text


def test_size_findings_say_when_no_persona_has_two_sizes(tmp_path):
    runs, reports = tmp_path / "runs", tmp_path / "reports"
    assert "No runs exist yet" in size_findings(gather(runs, reports))[0]
    fabricate_run(runs, reports, "sycophantic", "tiny", 1.0)
    fabricate_run(runs, reports, "loving", "tiny", 1.0)
    lines = size_findings(gather(runs, reports))
    assert "No persona has been run at two or more sizes" in lines[-1]


def test_overlapping_intervals_resolve_no_size_effect(tmp_path):
    runs, reports = tmp_path / "runs", tmp_path / "reports"
    fabricate_run(runs, reports, "sycophantic", "tiny", 1.0)
    fabricate_run(runs, reports, "sycophantic", "qwen3.5-4b", 1.05)
    lines = size_findings(gather(runs, reports))
    assert any("overlap: no size effect resolved" in line for line in lines)


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
    _write(
        runs / "sycophantic" / "tiny" / "summaries" / "07_preferences.json",
        {
            "headline": {
                "condition": "adopt",
                "judge_mode": "generative",
                "elo_std_final": 55.0,
                "elo_std_final_ci": [50.0, 61.0],
                "spearman_base_final": 0.3,
                "spearman_base_final_p": 0.2,
                "spearman_base_final_ci": [-0.1, 0.6],
            }
        },
    )
    _write(
        runs / "sycophantic" / "tiny" / "summaries" / "08_robustness.json",
        {"headline": {"f1_dpo_with_instructions": 0.6, "f1_dpo_with_instructions_ci": [0.5, 0.7]}},
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
    _write(
        runs / "sycophantic" / "tiny" / "summaries" / "07_preferences.json",
        {
            "headline": {
                "condition": "adopt",
                "judge_mode": "calibrated",
                "elo_std_base": 40.0,
                "elo_std_base_ci": [36.1, 59.1],
                "elo_std_dpo": 27.9,
                "elo_std_dpo_ci": [28.5, 50.0],
            }
        },
    )
    text = build_summary(runs, tmp_path / "reports").read_text()
    assert "27.9 [28.5, 50.0]" in text or "28 [28, 50]" in text
    assert text.count('src="data:image/png;base64,') >= 1
