"""Cross-run summary: one page comparing every persona x size run, for "does model size matter?".

Each run answers the blog's questions for one persona at one size; the scaling question needs
them side by side. `build_summary` reads what the runs left on disk and writes
``reports/summary.html``: which runs exist and which notebooks finished, then, per run and with
intervals where the stage measured them,

* Elo spread (07): standard deviation of Elo across traits per model, with its bootstrap
  interval (first condition, primary judge mode, as in 07's headline), its paired change from
  the base model and the spread beyond the coin-flip noise;
* Spearman of Elo over traits between the base model and dpo / final / rlaif (07), beside the
  split-half reliabilities of the Elo rankings, the ceiling they put on the correlation and the
  disattenuated correlation; whether a low value reads as "training reordered the preferences"
  depends on that ceiling (`summary_sections.spearman_reading`);
* classifier macro F1 (08) without and with the adversarial instructions, per method, and each
  method's paired difference from the system-prompted model;
* teacher-likeness (the adherence reports of 03, 05, 09): share of teacher-like replies of
  base, dpo, final and rlaif, with the teacher and student references, the paired change of
  final from base, and both on the run's student-to-teacher scale;
* RLAIF vs DPO+SFT (09's headline numbers);

and the answer to the size question (`summary_sizes`), which says which runs it rests on.
Figures (matplotlib, inlined as base64 PNG) plot Elo spread, F1 and teacher-likeness by size,
one panel per persona.

Why it reads files instead of importing the stages' results: the page must build from
whatever exists, including runs that stopped half-way, runs made by an older version, and
fabricated folders in tests. Every read is defensive: a missing file is a missing metric
(reported with the reason, taken from the notebook's status file), an unreadable or oddly
shaped file is a listed problem, and neither stops the page. Stage outputs are preferred
over the notebooks' headline summaries (they hold every model, including ``rlaif`` that
notebook 09 adds to stage 07's folder); the headlines are the fallback, and the only source of
the numbers the stage outputs do not hold (reliabilities, ceilings, F1 differences). A value a
notebook could not measure (its headline's ``no_measurement``, or a report row whose status is
"no measurement") is shown as "no measurement (<reason>)", never as a number, even when a
stage output still holds the number for diagnosis.

Where the rest lives: the records (`summary_records`), the metric sections, their figures and
the page frame that `publish` reuses (`summary_sections`), and the size answer
(`summary_sizes`) only read the records; this module reads the files and lays out the page.

Length (just over 800 lines): five defensive readers, each following one stage's file layouts,
old and new (stage output, headline fallback, "no measurement" entries, recorded evaluation
settings); split, one stage's file conventions would be spread over two modules.

Length: the readers of every stage's files (one small function per notebook's outputs) and the
page's layout live together so that what the page shows and where it reads it from are checked
side by side; the size answer, the records and the sections are already their own modules.
"""

from __future__ import annotations

import csv
import hashlib
import html
import json
import logging
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .probe_sets import headline_probe_set
from .spend import run_line
from .summary_records import (
    ADHERENCE_NOTEBOOKS,
    BASE,
    F1_VARIANTS,
    MODEL_ORDER,
    NO_MEASUREMENT,
    PREFERENCES,
    REFERENCES,
    RLAIF,
    ROBUSTNESS,
    TRAINED,
    Interval,
    PairedChange,
    RunSummary,
    finite,
    interval,
    teacher_like_key,
)
from .summary_sections import metric_sections, page, run_cell, table
from .summary_sizes import size_findings, size_key

logger = logging.getLogger(__name__)

SUMMARY_FILE = "summary.html"
F1_FIELDS = (*F1_VARIANTS, "prefill")  # every summary field of stage 08


def report_probe_set(rows: Sequence[Mapping[str, Any]]) -> str:
    """The probe set an adherence report's headline uses (`probe_sets.headline_probe_set` over
    its JSON rows, the rule `AdherenceReport` applied when writing it)."""
    return headline_probe_set(str(row.get("probe_set")) for row in rows)


# Adherence reports in the order the notebooks write them (03, 05, 09: ADHERENCE_NOTEBOOKS); a
# later one wins for a model measured twice (it is the newer measurement of the same
# checkpoint), unless only the earlier one could measure.
ADHERENCE_REPORTS = ("adherence", "final", "rlaif")
# The evaluation settings a notebook's headline records (see `summary_sizes.Setting`).
SETTING_KEYS = {
    PREFERENCES: (
        "judge_mode",
        "condition",
        "games_per_trait",
        "elo_traits",
        "elo_comparisons",
        "judge_orders",
    ),
    ROBUSTNESS: ("classifier", "classifier_methods", "heldout_prompts"),
}

METRICS = (
    ("elo", "Elo spread", PREFERENCES),
    ("spearman", "Spearman vs base", PREFERENCES),
    ("f1", "Classifier F1", ROBUSTNESS),
    ("teacher_like", "Teacher-likeness", "03_dpo"),
    ("rlaif", "RLAIF vs DPO+SFT", RLAIF),
)

# Where each metric's numbers live in a run folder (the headlines are in summaries/).
METRIC_FOLDERS = {
    "elo": PREFERENCES,
    "spearman": PREFERENCES,
    "f1": ROBUSTNESS,
    "teacher_like": "adherence",
    "rlaif": "09_rlaif",
}

# Malformed artifacts raise these while being picked apart; anything else is a bug here.
_SHAPE_ERRORS = (KeyError, TypeError, ValueError, AttributeError, IndexError)
# Suffixes of headline keys that qualify another key (interval, p-value, noise bound).
_QUALIFIERS = ("_ci", "_p", "_null95")


# -- reading -------------------------------------------------------------------------------------
def _pair(values: Any) -> tuple[Any, Any]:
    """``[low, high]`` from a headline, or (None, None) when it is not a pair."""
    if isinstance(values, (list, tuple)) and len(values) == 2:
        return values[0], values[1]
    return None, None


def _read_json(path: Path, problems: list[str], root: Path) -> Any:
    """Parsed JSON, or None when the file is missing (silently) or unreadable (a problem)."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        problems.append(f"{_rel(path, root)}: unreadable ({type(exc).__name__})")
        return None


def _rel(path: Path, root: Path) -> str:
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return Path(path).name


def _headline(run_dir: Path, notebook: str, problems: list[str], root: Path) -> dict[str, Any]:
    data = _read_json(run_dir / "summaries" / f"{notebook}.json", problems, root)
    headline = data.get("headline") if isinstance(data, dict) else None
    return headline if isinstance(headline, dict) else {}


def _family(
    headline: Mapping[str, Any], prefix: str, skip: tuple[str, ...] = ()
) -> dict[str, Interval]:
    """``<prefix><name>`` headline values with their ``_ci`` pairs, by name; qualifier keys
    (``_ci``, ``_p``, ...) and names starting with ``skip`` (another family) are left out."""
    out = {}
    for key, value in headline.items():
        name = key[len(prefix) :] if key.startswith(prefix) else ""
        if not name or name.endswith(_QUALIFIERS) or name.startswith(skip):
            continue
        estimate = interval(value, *_pair(headline.get(f"{key}_ci")))
        if estimate:
            out[name] = estimate
    return out


def _row_reason(row: Mapping[str, Any]) -> str | None:
    """The reason of a report row whose instrument could not measure, else None."""
    if str(row.get("status") or "").startswith(NO_MEASUREMENT):
        return str(row.get("reason") or "no reason recorded")
    return None


def params_fingerprint(params: Mapping[str, Any]) -> str:
    """The same short hash as `RunParams.fingerprint`, computed on the plain dict."""
    blob = json.dumps(params, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def load_run_params(run_dir: Path, persona: str, size: str) -> tuple[dict[str, Any] | None, str]:
    """The resolved parameters a run used, and where they were found.

    In order: a ``config.json`` at the run's root, then the ``params_json`` that papermill
    recorded in the newest executed notebook (exactly what the runner injected), then the
    parameter files as they are now (``load_params``), which may differ from what ran; the
    source string says which, so the provenance page can tell them apart.
    """
    root_config = Path(run_dir) / "config.json"
    if root_config.is_file():
        try:
            data = json.loads(root_config.read_text(encoding="utf-8"))
            if isinstance(data, dict) and "persona" in data:
                return data, "config.json at the run's root"
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            pass
    executed = sorted(
        (Path(run_dir) / "notebooks").glob("*.ipynb"), key=lambda p: p.stat().st_mtime
    )
    for notebook in reversed(executed):
        parameters = notebook_parameters(notebook)
        text = parameters.get("params_json")
        if isinstance(text, str) and text:
            try:
                data = json.loads(text)
            except json.JSONDecodeError:
                continue
            if isinstance(data, dict):
                return data, f"papermill parameters of notebooks/{notebook.name}"
    from .config import load_params
    from .errors import CharacterTrainingError
    from .store import without_root

    try:
        params = load_params(size, persona)
    except CharacterTrainingError as exc:
        reason = without_root(str(exc))
        return None, f"not recorded, and the parameter files do not resolve ({reason})"
    return params.to_dict(), "re-resolved now from params/ (not recorded by the run; may differ)"


def notebook_parameters(path: Path) -> dict[str, Any]:
    """The parameters papermill injected into an executed notebook (empty when unreadable)."""
    try:
        nb = json.loads(Path(path).read_text(encoding="utf-8"))
        parameters = nb["metadata"]["papermill"]["parameters"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        return {}
    return parameters if isinstance(parameters, dict) else {}


def _statuses(run: RunSummary, run_dir: Path, root: Path) -> None:
    for path in sorted((run_dir / "notebooks").glob("*.status.json")):
        data = _read_json(path, run.problems, root)
        if isinstance(data, dict) and data.get("status"):
            name = path.name[: -len(".status.json")]
            run.notebooks[name] = str(data["status"])
            if data.get("error"):
                run.errors[name] = str(data["error"])
    for path in sorted((run_dir / "summaries").glob("*.json")):
        run.notebooks.setdefault(path.stem, "summary only")


def _read_no_measurement(run: RunSummary, run_dir: Path, root: Path) -> None:
    """Every headline's ``no_measurement`` entries (key -> reason), before any number is read,
    so that the readers below can leave those values out."""
    for path in sorted((run_dir / "summaries").glob("*.json")):
        headline = _headline(run_dir, path.stem, run.problems, root)
        listed = headline.get("no_measurement")
        if isinstance(listed, dict):
            for key, reason in listed.items():
                run.withhold(path.stem, str(key), str(reason))


def _read_elo(run: RunSummary, run_dir: Path, root: Path) -> None:
    """Elo std per model, its change from base and Spearman vs base, from stage 07's
    summary.json or its headline; reliabilities and ceilings from the headline."""
    path = run_dir / PREFERENCES / "summary.json"
    data = _read_json(path, run.problems, root)
    if isinstance(data, dict):
        try:
            mode = (data.get("judge_modes") or list(data["spread"]))[0]
            condition = (data.get("conditions") or [None])[0]
            for row in data["spread"][mode]:
                if condition is None or row.get("condition") == condition:
                    condition = row.get("condition")
                    estimate = interval(row.get("std"), row.get("std_low"), row.get("std_high"))
                    if estimate:
                        run.elo[str(row["model"])] = estimate
            for row in (data.get("spread_changes") or {}).get(mode, []):
                change = interval(row.get("std_change"), row.get("ci_low"), row.get("ci_high"))
                if row.get("condition") == condition and change:
                    run.elo_change[str(row["model"])] = change
            for row in (data.get("model_correlations") or {}).get(mode, []):
                if row.get("condition") != condition or BASE not in (row.get("a"), row.get("b")):
                    continue
                other = row["b"] if row["a"] == BASE else row["a"]
                rho = finite(row.get("spearman"))
                if rho is not None:
                    run.spearman[str(other)] = (rho, finite(row.get("p_value")))
                    _set_spearman_ci(run, str(other), row.get("ci_low"), row.get("ci_high"))
            run.elo_setting = f"condition {condition}, judge mode {mode}"
            run.settings.update(judge_mode=mode, condition=condition)
            for setting, key in (
                ("elo_traits", "traits"),
                ("elo_comparisons", "matches_per_condition"),
            ):
                if finite(data.get(key)) is not None:
                    run.settings[setting] = data[key]
            run.sources["elo"] = run.sources["spearman"] = _rel(path, root)
        except _SHAPE_ERRORS as exc:
            run.problems.append(f"{_rel(path, root)}: unexpected layout ({_why(exc)})")
    headline = _headline(run_dir, PREFERENCES, run.problems, root)
    if not run.elo:
        _elo_from_headline(run, headline)
    for name, estimate in _family(headline, "elo_std_change_").items():
        run.elo_change.setdefault(name, estimate)
    run.elo_beyond_noise.update(_family(headline, "elo_spread_beyond_noise_"))
    run.elo_reliability.update(_family(headline, "elo_reliability_"))
    run.spearman_disattenuated.update(_family(headline, "spearman_disattenuated_"))
    for name, estimate in _family(headline, "spearman_ceiling_").items():
        run.spearman_ceiling[name] = estimate.value
    _record_settings(run, headline, PREFERENCES)
    _withhold_values(run, PREFERENCES)


def _elo_from_headline(run: RunSummary, headline: Mapping[str, Any]) -> None:
    run.elo.update(_family(headline, "elo_std_", skip=("change_",)))
    for model, estimate in _family(headline, "spearman_base_").items():
        run.spearman[model] = (estimate.value, finite(headline.get(f"spearman_base_{model}_p")))
        if estimate.has_interval:
            run.spearman_ci[model] = (estimate.low, estimate.high)  # type: ignore[assignment]
    if run.elo or run.spearman:
        run.elo_setting = (
            f"condition {headline.get('condition', '?')}, "
            f"judge mode {headline.get('judge_mode', '?')}"
        )
        run.sources["elo"] = run.sources["spearman"] = f"summaries/{PREFERENCES}.json"


def _set_spearman_ci(run: RunSummary, model: str, low: Any, high: Any) -> None:
    """Record a bootstrap interval of Spearman vs base when both ends are numbers."""
    low, high = finite(low), finite(high)
    if low is not None and high is not None:
        run.spearman_ci[model] = (low, high)


def _record_settings(run: RunSummary, headline: Mapping[str, Any], notebook: str) -> None:
    """The evaluation settings ``notebook``'s headline records (a stage output read first wins)."""
    for key in SETTING_KEYS.get(notebook, ()):
        if headline.get(key) is not None:
            run.settings.setdefault(key, headline[key])


# Per notebook, headline key prefixes and the `RunSummary` field holding their values; a longer
# prefix first, so that ``elo_std_change_final`` is not taken for model "change_final".
_WITHHELD_FIELDS = {
    PREFERENCES: (
        ("elo_std_change_", "elo_change"),
        ("elo_spread_beyond_noise_", "elo_beyond_noise"),
        ("elo_reliability_", "elo_reliability"),
        ("spearman_disattenuated_", "spearman_disattenuated"),
        ("spearman_ceiling_", "spearman_ceiling"),
        ("spearman_base_", "spearman"),
        ("elo_std_", "elo"),
    ),
    ROBUSTNESS: (("f1_diff_", "f1_diff"), ("f1_", "f1")),
}


def _withhold_values(run: RunSummary, notebook: str) -> None:
    """Drop every value ``notebook``'s headline lists as not measured, whichever file the value
    was read from (a stage output keeps the raw number for diagnosis; the page never shows it)."""
    for key in run.unmeasured.get(notebook, {}):
        key = key[: -len("_ci")] if key.endswith("_ci") else key
        for prefix, attr in _WITHHELD_FIELDS.get(notebook, ()):
            if not key.startswith(prefix):
                continue
            name, values = key[len(prefix) :], getattr(run, attr)
            variant = re.fullmatch(rf"(.+)_({'|'.join(F1_FIELDS)})", name)
            if notebook == ROBUSTNESS and variant:
                values.get(variant.group(1), {}).pop(variant.group(2), None)
            else:
                values.pop(name, None)
                if attr == "spearman":
                    run.spearman_ci.pop(name, None)
            break
    for attr in ("f1", "f1_diff"):
        for method in [m for m, v in getattr(run, attr).items() if not v]:
            del getattr(run, attr)[method]


def _read_f1(run: RunSummary, run_dir: Path, root: Path) -> None:
    """Macro F1 per method without / with instructions: robustness.json, summary.csv, headline;
    F1 differences from the system-prompted model and classifier settings from the headline."""
    stage = run_dir / ROBUSTNESS
    records: list[Mapping[str, Any]] = []
    source = ""
    path = stage / "robustness.json"
    data = _read_json(path, run.problems, root)
    if isinstance(data, dict) and isinstance(data.get("summary"), list):
        records, source = data["summary"], _rel(path, root)
        classifier = data.get("classifier")
        if isinstance(classifier, dict) and classifier.get("model"):
            run.settings["classifier"] = classifier["model"]
        heldout = (data.get("split_prompts") or {}).get("heldout")
        if isinstance(heldout, list):
            run.settings["heldout_prompts"] = len(heldout)
    elif (stage / "summary.csv").is_file():
        path = stage / "summary.csv"
        try:
            with path.open(encoding="utf-8", newline="") as handle:
                records, source = list(csv.DictReader(handle)), _rel(path, root)
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            run.problems.append(f"{_rel(path, root)}: unreadable ({type(exc).__name__})")
    try:
        for record in records:
            method = str(record["method"])
            reason = _row_reason(record)
            for variant in F1_VARIANTS:
                if reason:
                    run.withhold(ROBUSTNESS, f"f1_{method}_{variant}", reason)
                    continue
                estimate = interval(
                    record.get(variant), record.get(f"{variant}_low"), record.get(f"{variant}_high")
                )
                if estimate:
                    run.f1.setdefault(method, {})[variant] = estimate
    except _SHAPE_ERRORS as exc:
        run.problems.append(f"{_rel(path, root)}: unexpected layout ({_why(exc)})")
    headline = _headline(run_dir, ROBUSTNESS, run.problems, root)
    if run.f1:
        run.sources["f1"] = source
    else:
        for name, estimate in _family(headline, "f1_", skip=("diff_",)).items():
            match = re.fullmatch(rf"(.+)_({'|'.join(F1_VARIANTS)})", name)
            if match:
                run.f1.setdefault(match.group(1), {})[match.group(2)] = estimate
        if run.f1:
            run.sources["f1"] = f"summaries/{ROBUSTNESS}.json"
    for name, estimate in _family(headline, "f1_diff_").items():
        match = re.fullmatch(rf"(.+)_({'|'.join(F1_FIELDS)})", name)
        if match:
            run.f1_diff.setdefault(match.group(1), {})[match.group(2)] = estimate
    _record_settings(run, headline, ROBUSTNESS)
    _withhold_values(run, ROBUSTNESS)


# A teacher-like reading: the estimate (None when not measured), the reason, the source file.
_Found = dict[str, tuple[Interval | None, str, str]]


def _keep(found: _Found, label: str, estimate: Interval | None, reason: str, src: str) -> None:
    """A later reading replaces an earlier one, except that "no measurement" never replaces a
    measured value (the same checkpoint, measured where the instrument could)."""
    if estimate is None and label in found and found[label][0] is not None:
        return
    found[label] = (estimate, reason, src)


def _read_teacher_like(run: RunSummary, run_dir: Path, root: Path) -> None:
    """Teacher-like share per model and the paired change of each trained model from base, from
    the adherence reports (later reports win); models no report holds come from the headlines
    of notebooks 03, 05 and 09."""
    found: _Found = {}
    changes: dict[str, tuple[Interval, str, str]] = {}  # model -> (change, notebook, source)
    report_refs: dict[str, dict[str, Interval]] = {}  # notebook -> this report's references
    for name, notebook in zip(ADHERENCE_REPORTS, ADHERENCE_NOTEBOOKS):
        path = run_dir / "adherence" / f"{name}.json"
        data = _read_json(path, run.problems, root)
        if data is None:
            continue
        src, listed = _rel(path, root), run.unmeasured.get(notebook, {})
        try:
            probe_set = report_probe_set(data["rows"])
            for row in data["rows"]:
                label = str(row["label"])
                if row.get("probe_set") != probe_set:
                    continue
                if label not in MODEL_ORDER and label not in REFERENCES:
                    continue  # rl-step-* probes and other extras
                reason = _row_reason(row) or listed.get(teacher_like_key(label))
                if reason:
                    run.withhold(notebook, teacher_like_key(label), reason)
                    _keep(found, label, None, reason, src)
                    continue
                estimate = interval(
                    row.get("teacher_like"),
                    row.get("teacher_like_low"),
                    row.get("teacher_like_high"),
                )
                if estimate:
                    _keep(found, label, estimate, "", src)
                    if label in REFERENCES:
                        report_refs.setdefault(notebook, {})[label] = estimate
            for row in data.get("differences") or []:
                model = str(row["a"])
                if row.get("probe_set") != probe_set or row.get("b") != BASE:
                    continue
                reason = _row_reason(row) or listed.get(f"{model}_minus_base")
                change = interval(
                    row.get("teacher_like"),
                    row.get("teacher_like_low"),
                    row.get("teacher_like_high"),
                )
                if reason:
                    run.withhold(notebook, f"{model}_minus_base", reason)
                    changes.pop(model, None)
                elif change and model in TRAINED:
                    changes[model] = (change, notebook, src)
            _adherence_settings(run, data)
        except _SHAPE_ERRORS as exc:
            run.problems.append(f"{_rel(path, root)}: unexpected layout ({_why(exc)})")
    headline_refs = _teacher_like_headlines(run, run_dir, root, found, changes)
    for label, (estimate, _, _) in found.items():
        if estimate is not None:
            run.teacher_like[label] = estimate
    for model, (change, notebook, src) in changes.items():
        refs = report_refs.get(notebook) or headline_refs.get(notebook) or run.teacher_like
        run.teacher_like_change[model] = PairedChange(
            change, refs.get("teacher_ref"), refs.get("student_ref"), src
        )
    sources = [src for estimate, _, src in found.values() if estimate is not None]
    if sources:
        run.sources["teacher_like"] = ", ".join(dict.fromkeys(sources))


def _teacher_like_headlines(
    run: RunSummary,
    run_dir: Path,
    root: Path,
    found: _Found,
    changes: dict[str, tuple[Interval, str, str]],
) -> dict[str, dict[str, Interval]]:
    """Fill in, from the headlines of 03, 05 and 09, the shares and changes no report holds;
    returns each headline's reference shares (``teacher_reference``/``student_reference``)."""
    refs: dict[str, dict[str, Interval]] = {}
    for notebook in ADHERENCE_NOTEBOOKS:
        headline = _headline(run_dir, notebook, run.problems, root)
        src, listed = f"summaries/{notebook}.json", run.unmeasured.get(notebook, {})
        for label in (*TRAINED, BASE, *REFERENCES):
            key = teacher_like_key(label)
            estimate = interval(headline.get(key), *_pair(headline.get(f"{key}_ci")))
            if key in listed:
                _keep(found, label, None, listed[key], src)
                continue
            if estimate and label in REFERENCES:
                refs.setdefault(notebook, {})[label] = estimate
            if estimate and (label not in found or found[label][0] is None):
                found[label] = (estimate, "", src)
        for model in TRAINED:
            key = f"{model}_minus_base"
            diff = headline.get(key)
            if key in listed or model in changes or not isinstance(diff, dict):
                continue
            change = interval(diff.get("value"), diff.get("low"), diff.get("high"))
            if change:
                changes[model] = (change, notebook, src)
        if headline.get("probe_prompts") is not None:
            run.settings.setdefault("probe_prompts", headline["probe_prompts"])
    return refs


def _adherence_settings(run: RunSummary, data: Mapping[str, Any]) -> None:
    """Encoder, samples per probe and probe prompts of an adherence report (a later report's
    replace an earlier one's: the size answer compares the latest, final's, change)."""
    settings = data.get("settings") if isinstance(data.get("settings"), dict) else {}
    classifier = data.get("classifier") if isinstance(data.get("classifier"), dict) else {}
    for setting, value in (
        ("adherence_encoder", settings.get("encoder")),
        ("samples_per_probe", settings.get("samples_per_probe")),
        ("probe_prompts", classifier.get("probe_prompts")),
    ):
        if value is not None:
            run.settings[setting] = value


def _read_rlaif(run: RunSummary, run_dir: Path, root: Path) -> None:
    headline = _headline(run_dir, RLAIF, run.problems, root)
    if not headline:
        return
    out: dict[str, Any] = {}
    for key in ("signal", "init", "kl_coef", "steps", "verdict"):
        if headline.get(key) is not None:
            out[key] = headline[key]
    reward = interval(headline.get("reward_end"), *_pair(headline.get("reward_end_ci")))
    if reward:
        out["reward_end"] = reward
    for label in ("final", "rlaif"):
        low, high = _pair(headline.get(f"teacher_like_{label}_ci"))
        estimate = interval(headline.get(f"teacher_like_{label}"), low, high)
        if estimate:
            out[f"teacher_like_{label}"] = estimate
    diff = headline.get("rlaif_minus_final")
    if isinstance(diff, dict):
        estimate = interval(diff.get("value"), diff.get("low"), diff.get("high"))
        if estimate:
            out["rlaif_minus_final"] = estimate
    for name in ("elo_std", "f1", "coherence", "words"):
        if isinstance(headline.get(name), dict):
            out[name] = headline[name]
    run.rlaif = out
    run.sources["rlaif"] = f"summaries/{RLAIF}.json"
    # 09 adds rlaif to stage 07's folder; when that summary predates it, keep 09's number
    # (no interval: the headline holds none).
    rlaif_std = finite((out.get("elo_std") or {}).get("rlaif"))
    if run.elo and "rlaif" not in run.elo and rlaif_std is not None:
        run.elo["rlaif"] = Interval(rlaif_std)


def _why(exc: BaseException) -> str:
    from .store import without_root

    return without_root(f"{type(exc).__name__}: {exc}").splitlines()[0][:120]


def _explain_missing(run: RunSummary, run_dir: Path) -> None:
    """Why each absent metric is absent, and which models lack it.

    The notebook's status says most (failed, skipped, not run); a stage folder without usable
    numbers is named as such, because another notebook can fill it (09 runs stage 07) and
    "not run" would then be wrong.
    """
    for key, _name, notebook in METRICS:
        if run.has(key):
            continue
        status = run.notebooks.get(notebook)
        folder = METRIC_FOLDERS[key]
        if not run.has_run_dir:
            reason = "no run folder (reports only)"
        elif status in ("failed", "skipped"):
            error = run.errors.get(notebook, "")
            reason = f"{notebook} {status}" + (f": {error}" if error else "")
        elif (run_dir / folder).is_dir():
            reason = f"{folder}/ holds no finite numbers for it"
        elif status:
            reason = f"{notebook} ran but left no readable numbers for it"
        else:
            reason = f"{notebook} has not run"
        run.missing[key] = reason
    expected = {
        "elo": ("base", "dpo", "final"),
        "teacher_like": ("base", "dpo", "final"),
        "f1": ("system_prompt", "dpo", "final"),
    }
    for key, labels in expected.items():
        if run.has(key):
            lacking = [m for m in labels if m not in getattr(run, key)]
            if lacking:
                run.partial[key] = "no " + ", ".join(lacking)


def load_run(
    runs_dir: Path, persona: str, size: str, reports_dir: Path | None = None
) -> RunSummary:
    """Read one run's artifacts; never raises for missing or malformed files."""
    runs_dir = Path(runs_dir)
    run_dir = runs_dir / persona / size
    run = RunSummary(persona, size, has_run_dir=run_dir.is_dir())
    if run.has_run_dir:
        _statuses(run, run_dir, runs_dir)
        run.spend = run_line(run_dir)
        run.params, run.params_source = load_run_params(run_dir, persona, size)
        readers = (_read_no_measurement, _read_elo, _read_f1, _read_teacher_like, _read_rlaif)
        for reader in readers:
            try:
                reader(run, run_dir, runs_dir)
            except _SHAPE_ERRORS + (OSError,) as exc:  # a reader must never take the page down
                run.problems.append(f"{persona}/{size}: {reader.__name__[6:]} ({_why(exc)})")
    if reports_dir is not None:
        run.reports = sorted(
            str(p.relative_to(reports_dir))
            for p in (Path(reports_dir) / persona / size).glob("*.html")
        )
    _explain_missing(run, run_dir)
    return run


def discover_runs(runs_dir: Path, reports_dir: Path | None = None) -> list[tuple[str, str]]:
    """Every (persona, size) with a run folder, or with reports only."""
    found: set[tuple[str, str]] = set()
    for root, pattern in ((runs_dir, "*/*"), (reports_dir, "*/*")):
        if root is None or not Path(root).is_dir():
            continue
        for path in Path(root).glob(pattern):
            if path.is_dir() and not any(part.startswith(".") for part in path.parts[-2:]):
                if root == reports_dir and not any(path.glob("*.html")):
                    continue
                found.add((path.parts[-2], path.parts[-1]))
    return sorted(found)


def gather(runs_dir: Path, reports_dir: Path | None = None) -> list[RunSummary]:
    """Every run, ordered by persona, then by model size (smallest first)."""
    runs = [load_run(runs_dir, p, s, reports_dir) for p, s in discover_runs(runs_dir, reports_dir)]
    return sorted(runs, key=lambda r: (r.persona, size_key(r.size, r.student)))


def _notebook_cell(run: RunSummary, known: Sequence[str]) -> str:
    parts = []
    for name in _ordered_notebooks(known, run.notebooks):
        status = run.notebooks.get(name)
        number = name.split("_", 1)[0]
        if status is None:
            parts.append(f'<span class="missing" title="not run">{html.escape(number)}</span>')
            continue
        css = {"ok": "ok", "summary only": "ok", "failed": "failed", "skipped": "missing"}.get(
            status, ""
        )
        tip = html.escape(f"{name}: {status}")
        parts.append(f'<span class="{css}" title="{tip}">{html.escape(number)}</span>')
    return " ".join(parts)


def _ordered_notebooks(known: Sequence[str], seen: Mapping[str, str]) -> list[str]:
    return sorted(set(known) | set(seen))


def _known_notebooks() -> list[str]:
    from .runner import available_notebooks

    try:
        return available_notebooks()
    except OSError:
        return []


def _no_measurement_lines(run: RunSummary) -> list[str]:
    """``<notebook>: <key>, <key>: no measurement (<reason>)``: the withheld headline values
    of a notebook grouped by their reason, so one failed instrument is one line, not one per
    value it withheld (a key's ``_ci`` twin is not listed again)."""
    lines = []
    for notebook, listed in sorted(run.unmeasured.items()):
        by_reason: dict[str, list[str]] = {}
        for key, reason in listed.items():
            if key.endswith("_ci") and key[: -len("_ci")] in listed:
                continue
            by_reason.setdefault(reason, []).append(key)
        for reason, keys in by_reason.items():
            lines.append(f"{notebook}: {', '.join(keys)}: {NO_MEASUREMENT} ({reason})")
    return lines


def render_summary(runs: Sequence[RunSummary], generated: str | None = None) -> str:
    """The summary page for ``runs`` (see the module docstring for what it shows)."""
    generated = generated or time.strftime("%Y-%m-%d %H:%M")
    known = _known_notebooks()
    parts = [
        f'<p class="note">Generated {html.escape(generated)} from the run folders on disk by '
        "<code>python -m character_training summary</code>. Intervals are 95% (bootstrap over "
        "prompts or matches, as each stage measured them); a dash means not measured, and "
        "'no measurement' that the instrument could not measure (with the notebook's reason)."
        "</p>"
    ]
    parts.append("<h2>Does model size matter?</h2>")
    parts.append("".join(f"<p>{html.escape(line)}</p>" for line in size_findings(runs)))

    parts.append("<h2>Runs</h2>")
    parts.append(
        '<p class="note">Notebook numbers: <span class="ok">green</span> finished, '
        '<span class="failed">red</span> failed, <span class="missing">grey</span> skipped or '
        "not run (hover for the status).</p>"
    )
    rows = []
    for run in runs:
        params = run.params or {}
        missing = (
            [f"{name}: {run.missing[key]}" for key, name, _ in METRICS if key in run.missing]
            + [
                f"{name}: partial ({run.partial[key]})"
                for key, name, _ in METRICS
                if key in run.partial
            ]
            + _no_measurement_lines(run)
        )
        rows.append(
            [
                run_cell(run),
                html.escape(str(params.get("backend", "?"))),
                html.escape(run.student or "?"),
                _notebook_cell(run, known),
                ", ".join(html.escape(name) for key, name, _ in METRICS if run.has(key))
                or '<span class="missing">none</span>',
                "<br>".join(html.escape(m) for m in missing) or "none",
                html.escape(run.spend or "-"),
            ]
        )
    if rows:
        parts.append(
            table(
                ["run", "backend", "student", "notebooks", "metrics present", "missing", "spent"],
                rows,
            )
        )
    else:
        parts.append("<p>No runs found.</p>")

    parts.extend(metric_sections(runs))
    problems = [p for run in runs for p in run.problems]
    if problems:
        parts.append("<h2>Files that could not be read</h2>")
        parts.append("<ul>" + "".join(f"<li>{html.escape(p)}</li>" for p in problems) + "</ul>")
    nav = [("index.html", "All reports")]
    return page("Cross-run summary: personas x model sizes", "".join(parts), nav)


def build_summary(runs_dir: Path, reports_dir: Path) -> Path:
    """Write ``<reports_dir>/summary.html`` from every run under ``runs_dir``; returns its path.

    Links to reports are relative and only to reports present in ``reports_dir``, so the page
    works inside ``reports/`` and inside a published bundle alike.
    """
    reports_dir = Path(reports_dir)
    runs = gather(Path(runs_dir), reports_dir)
    reports_dir.mkdir(parents=True, exist_ok=True)
    target = reports_dir / SUMMARY_FILE
    target.write_text(render_summary(runs), encoding="utf-8")
    logger.debug("wrote %s (%d runs)", target, len(runs))
    return target


__all__ = [
    "Interval",
    "PREFERENCES",
    "RunSummary",
    "build_summary",
    "discover_runs",
    "gather",
    "load_run",
    "load_run_params",
    "notebook_parameters",
    "page",
    "params_fingerprint",
    "render_summary",
    "size_findings",
    "size_key",
    "table",
]
