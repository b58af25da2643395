"""Cross-run summary: one page comparing every persona x size run, for "does model size matter?".

Each run answers the blog's questions for one persona at one size; the scaling question needs
them side by side. `build_summary` reads what the runs left on disk and writes
``reports/summary.html``: which runs exist and which notebooks finished, then, per run and with
intervals where the stage measured them,

* Elo spread (07): standard deviation of Elo across traits per model, with its bootstrap
  interval (first condition, primary judge mode, as in 07's headline);
* Spearman of Elo over traits between the base model and dpo / final / rlaif (07);
* classifier macro F1 (08) without and with the adversarial instructions, per method;
* teacher-likeness (the adherence reports of 03, 05, 09): share of teacher-like replies of
  base, dpo, final and rlaif, with the teacher and student references;
* RLAIF vs DPO+SFT (09's headline numbers);

and a short, mechanically written answer to the size question that says which runs it rests on.
Figures (matplotlib, inlined as base64 PNG) plot Elo spread, F1 and teacher-likeness by size,
one panel per persona.

Why it reads files instead of importing the stages' results: the page must build from
whatever exists, including runs that stopped half-way, runs made by an older version, and
fabricated folders in tests. Every read is defensive: a missing file is a missing metric
(reported with the reason, taken from the notebook's status file), an unreadable or oddly
shaped file is a listed problem, and neither stops the page. Stage outputs are preferred
over the notebooks' headline summaries (they hold every model, including ``rlaif`` that
notebook 09 adds to stage 07's folder); the headlines are the fallback.

The figures are drawn here rather than in `plots.py`: they take this module's per-run records
and exist only for this page.

Length: one pipeline over one record type (`RunSummary`): five defensive readers, the size
answer, three figures and the page sections each read the same fields, and `publish` reuses
its page helpers; split, each half would import the other's private field conventions.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import html
import io
import json
import logging
import math
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

SUMMARY_FILE = "summary.html"
PREFERENCES = "07_preferences"
ROBUSTNESS = "08_robustness"
RLAIF = "09_rlaif_compare"
BASE = "base"
# Models in the order the pipeline makes them; anything else is listed after them.
MODEL_ORDER = ("base", "system_prompt", "dpo", "final", "rlaif")
TRAINED = ("dpo", "final", "rlaif")
F1_METHODS = ("system_prompt", "dpo", "final", "rlaif")  # base's macro F1 is undefined
F1_VARIANTS = ("no_instruction", "with_instructions")
REFERENCES = {"teacher_ref": "teacher (reference)", "student_ref": "student (reference)"}
ADHERENCE_PROBE_SET = "constitution"  # evaluate.adherence.CLASSIFIER_SOURCE
# Adherence reports in the order the notebooks write them; a later one wins for a model
# measured twice (it is the newer measurement of the same checkpoint).
ADHERENCE_REPORTS = ("adherence", "final", "rlaif")
TEACHER_LIKE_HEADLINES = ("03_dpo", "05_sft", RLAIF)

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


# -- records -------------------------------------------------------------------------------------
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
            return _num(self.value)
        return f"{_num(self.value)} [{_num(self.low)}, {_num(self.high)}]"

    def overlaps(self, other: "Interval") -> bool | None:
        """Whether two intervals overlap; None when either has no interval."""
        if not (self.has_interval and other.has_interval):
            return None
        return self.low <= other.high and other.low <= self.high  # type: ignore[operator]


@dataclass
class RunSummary:
    """Everything the summary page shows about one persona x size run.

    ``notebooks`` maps a notebook to ``ok``/``failed``/``skipped`` (its status file) or
    ``summary only`` (a headline without a status file); ``missing`` maps a metric key of
    `METRICS` to the reason it is absent; ``partial`` to the models it lacks; ``sources`` to
    the file it was read from; ``problems`` lists unreadable or oddly shaped files.
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
    spearman: dict[str, tuple[float, float | None]] = field(default_factory=dict)
    spearman_ci: dict[str, tuple[float, float]] = field(default_factory=dict)
    f1: dict[str, dict[str, Interval]] = field(default_factory=dict)
    teacher_like: dict[str, Interval] = field(default_factory=dict)
    rlaif: dict[str, Any] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)
    partial: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    reports: list[str] = field(default_factory=list)  # paths relative to the reports folder

    @property
    def label(self) -> str:
        return f"{self.persona}/{self.size}"

    @property
    def student(self) -> str:
        return str((self.params or {}).get("student", ""))

    def has(self, metric: str) -> bool:
        return bool(getattr(self, metric))


# -- reading -------------------------------------------------------------------------------------
def _finite(value: Any) -> float | None:
    """A finite float, or None for None/NaN/inf/non-numbers (JSON nulls, NaN written by CSV)."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _interval(value: Any, low: Any = None, high: Any = None) -> Interval | None:
    point = _finite(value)
    if point is None:
        return None
    return Interval(point, _finite(low), _finite(high))


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


def _read_elo(run: RunSummary, run_dir: Path, root: Path) -> None:
    """Elo std per model and Spearman vs base, from stage 07's summary.json or its headline."""
    path = run_dir / PREFERENCES / "summary.json"
    data = _read_json(path, run.problems, root)
    if isinstance(data, dict):
        try:
            mode = (data.get("judge_modes") or list(data["spread"]))[0]
            condition = (data.get("conditions") or [None])[0]
            for row in data["spread"][mode]:
                if condition is None or row.get("condition") == condition:
                    condition = row.get("condition")
                    estimate = _interval(row.get("std"), row.get("std_low"), row.get("std_high"))
                    if estimate:
                        run.elo[str(row["model"])] = estimate
            for row in (data.get("model_correlations") or {}).get(mode, []):
                if row.get("condition") != condition or BASE not in (row.get("a"), row.get("b")):
                    continue
                other = row["b"] if row["a"] == BASE else row["a"]
                rho = _finite(row.get("spearman"))
                if rho is not None:
                    run.spearman[str(other)] = (rho, _finite(row.get("p_value")))
                    _set_spearman_ci(run, str(other), row.get("ci_low"), row.get("ci_high"))
            run.elo_setting = f"condition {condition}, judge mode {mode}"
            run.sources["elo"] = run.sources["spearman"] = _rel(path, root)
        except _SHAPE_ERRORS as exc:
            run.problems.append(f"{_rel(path, root)}: unexpected layout ({_why(exc)})")
    if not run.elo:
        _elo_from_headline(run, run_dir, root)


def _elo_from_headline(run: RunSummary, run_dir: Path, root: Path) -> None:
    headline = _headline(run_dir, PREFERENCES, run.problems, root)
    for key, value in headline.items():
        name = re.fullmatch(r"elo_std_(.+)", key)
        if name and not name.group(1).endswith("_ci"):
            estimate = _interval(value, *_pair(headline.get(f"{key}_ci")))
            if estimate:
                run.elo[name.group(1)] = estimate
        rho = re.fullmatch(r"spearman_base_(.+)", key)
        if rho and not rho.group(1).endswith(("_p", "_ci")) and _finite(value) is not None:
            run.spearman[rho.group(1)] = (float(value), _finite(headline.get(f"{key}_p")))
            _set_spearman_ci(run, rho.group(1), *_pair(headline.get(f"{key}_ci")))
    if run.elo or run.spearman:
        run.elo_setting = (
            f"condition {headline.get('condition', '?')}, "
            f"judge mode {headline.get('judge_mode', '?')}"
        )
        run.sources["elo"] = run.sources["spearman"] = f"summaries/{PREFERENCES}.json"


def _set_spearman_ci(run: RunSummary, model: str, low: Any, high: Any) -> None:
    """Record a bootstrap interval of Spearman vs base when both ends are numbers."""
    low, high = _finite(low), _finite(high)
    if low is not None and high is not None:
        run.spearman_ci[model] = (low, high)


def _read_f1(run: RunSummary, run_dir: Path, root: Path) -> None:
    """Macro F1 per method without / with instructions: robustness.json, summary.csv, headline."""
    stage = run_dir / ROBUSTNESS
    records: list[Mapping[str, Any]] = []
    source = ""
    path = stage / "robustness.json"
    data = _read_json(path, run.problems, root)
    if isinstance(data, dict) and isinstance(data.get("summary"), list):
        records, source = data["summary"], _rel(path, root)
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
            for variant in F1_VARIANTS:
                estimate = _interval(
                    record.get(variant), record.get(f"{variant}_low"), record.get(f"{variant}_high")
                )
                if estimate:
                    run.f1.setdefault(method, {})[variant] = estimate
    except _SHAPE_ERRORS as exc:
        run.problems.append(f"{_rel(path, root)}: unexpected layout ({_why(exc)})")
    if run.f1:
        run.sources["f1"] = source
        return
    headline = _headline(run_dir, ROBUSTNESS, run.problems, root)
    for key, value in headline.items():
        match = re.fullmatch(r"f1_(.+)_(no_instruction|with_instructions)", key)
        if match:
            estimate = _interval(value, *_pair(headline.get(f"{key}_ci")))
            if estimate:
                run.f1.setdefault(match.group(1), {})[match.group(2)] = estimate
    if run.f1:
        run.sources["f1"] = f"summaries/{ROBUSTNESS}.json"


def _read_teacher_like(run: RunSummary, run_dir: Path, root: Path) -> None:
    """Teacher-like share per model from the adherence reports (later reports win); models
    no report holds come from the headlines of notebooks 03, 05 and 09."""
    found: dict[str, tuple[Interval, str]] = {}
    for name in ADHERENCE_REPORTS:
        path = run_dir / "adherence" / f"{name}.json"
        data = _read_json(path, run.problems, root)
        if data is None:
            continue
        try:
            for row in data["rows"]:
                label = str(row["label"])
                if row.get("probe_set") != ADHERENCE_PROBE_SET:
                    continue
                if label not in MODEL_ORDER and label not in REFERENCES:
                    continue  # rl-step-* probes and other extras
                estimate = _interval(
                    row.get("teacher_like"),
                    row.get("teacher_like_low"),
                    row.get("teacher_like_high"),
                )
                if estimate:
                    found[label] = (estimate, _rel(path, root))
        except _SHAPE_ERRORS as exc:
            run.problems.append(f"{_rel(path, root)}: unexpected layout ({_why(exc)})")
    for notebook in TEACHER_LIKE_HEADLINES:  # headlines fill in models no report holds
        headline = _headline(run_dir, notebook, run.problems, root)
        for key, value in headline.items():
            match = re.fullmatch(r"teacher_like_(base|dpo|final|rlaif)", key)
            if match and match.group(1) not in found:
                estimate = _interval(value, *_pair(headline.get(f"{key}_ci")))
                if estimate:
                    found[match.group(1)] = (estimate, f"summaries/{notebook}.json")
    run.teacher_like = {label: estimate for label, (estimate, _) in found.items()}
    if found:
        run.sources["teacher_like"] = ", ".join(dict.fromkeys(src for _, src in found.values()))


def _read_rlaif(run: RunSummary, run_dir: Path, root: Path) -> None:
    headline = _headline(run_dir, RLAIF, run.problems, root)
    if not headline:
        return
    out: dict[str, Any] = {}
    for key in ("signal", "init", "kl_coef", "steps", "verdict"):
        if headline.get(key) is not None:
            out[key] = headline[key]
    reward = _interval(headline.get("reward_end"), *_pair(headline.get("reward_end_ci")))
    if reward:
        out["reward_end"] = reward
    for label in ("final", "rlaif"):
        low, high = _pair(headline.get(f"teacher_like_{label}_ci"))
        estimate = _interval(headline.get(f"teacher_like_{label}"), low, high)
        if estimate:
            out[f"teacher_like_{label}"] = estimate
    diff = headline.get("rlaif_minus_final")
    if isinstance(diff, dict):
        estimate = _interval(diff.get("value"), diff.get("low"), diff.get("high"))
        if estimate:
            out["rlaif_minus_final"] = estimate
    for name in ("elo_std", "f1", "coherence", "words"):
        if isinstance(headline.get(name), dict):
            out[name] = headline[name]
    run.rlaif = out
    run.sources["rlaif"] = f"summaries/{RLAIF}.json"
    # 09 adds rlaif to stage 07's folder; when that summary predates it, keep 09's number
    # (no interval: the headline holds none).
    rlaif_std = _finite((out.get("elo_std") or {}).get("rlaif"))
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
        run.params, run.params_source = load_run_params(run_dir, persona, size)
        for reader in (_read_elo, _read_f1, _read_teacher_like, _read_rlaif):
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


# -- the size question ---------------------------------------------------------------------------
SIZE_QUESTIONS: tuple[tuple[str, Callable[[RunSummary], Interval | None]], ...] = (
    ("Elo spread of the final model", lambda r: r.elo.get("final")),
    (
        "classifier F1 of the final model with adversarial instructions",
        lambda r: r.f1.get("final", {}).get("with_instructions"),
    ),
    ("teacher-like share of the final model", lambda r: r.teacher_like.get("final")),
)


def size_findings(runs: Sequence[RunSummary]) -> list[str]:
    """Plain sentences answering "does model size matter?" from the runs that exist.

    Per persona with two or more sizes and per measure, the values in size order and whether
    the smallest and largest size's 95% intervals overlap (a deliberately coarse test: apart
    means a difference these runs resolve, overlapping means they do not). When the sizes'
    runs used different teacher, judge or generator models, that is said too, since then a
    difference is not the student's size alone.
    """
    lines: list[str] = []
    by_persona: dict[str, list[RunSummary]] = {}
    for run in runs:
        by_persona.setdefault(run.persona, []).append(run)
    multi = {p: rs for p, rs in by_persona.items() if len(rs) >= 2}
    sizes = sorted({r.size for r in runs}, key=lambda s: size_key(s, _student_of(runs, s)))
    if not runs:
        return ["No runs exist yet, so this page cannot say anything about model size."]
    lines.append(
        f"Runs found: {len(runs)} ({', '.join(r.label for r in runs)}); sizes: {', '.join(sizes)}."
    )
    if not multi:
        lines.append(
            "No persona has been run at two or more sizes, so these runs cannot answer whether "
            "model size matters; run one persona at several sizes, e.g. `python -m "
            "character_training run --persona sycophantic --size tiny,qwen3.5-4b,qwen3.5-9b`."
        )
        return lines
    for persona, persona_runs in multi.items():
        answered = False
        for question, pick in SIZE_QUESTIONS:
            points = [(r.size, pick(r)) for r in persona_runs if pick(r) is not None]
            if len(points) < 2:
                continue
            answered = True
            values = "; ".join(f"{size} {est.text()}" for size, est in points)  # type: ignore[union-attr]
            (small, first), (large, last) = points[0], points[-1]
            overlap = first.overlaps(last)  # type: ignore[union-attr]
            if overlap is None:
                verdict = "no intervals to compare, so no conclusion"
            elif overlap:
                verdict = f"the intervals of {small} and {large} overlap: no size effect resolved"
            else:
                direction = "higher" if last.value > first.value else "lower"  # type: ignore[union-attr]
                verdict = f"{direction} at {large} than at {small}, intervals apart"
            lines.append(f"{persona}, {question}: {values} -> {verdict}.")
        if not answered:
            lines.append(
                f"{persona}: run at {', '.join(r.size for r in persona_runs)}, but no measure "
                "exists at two of them yet."
            )
        changed = _other_models_differ(persona_runs)
        if changed:
            lines.append(
                f"{persona}: the sizes also differ in {changed}, so a difference between them "
                "is not the student's size alone."
            )
    return lines


def _student_of(runs: Sequence[RunSummary], size: str) -> str:
    return next((r.student for r in runs if r.size == size and r.student), "")


def _other_models_differ(runs: Sequence[RunSummary]) -> str:
    roles = []
    for role in ("teacher", "judge", "generator"):
        names = {str(r.params.get(role)) for r in runs if r.params and r.params.get(role)}
        if len(names) > 1:
            roles.append(f"{role} ({', '.join(sorted(names))})")
    return "; ".join(roles)


# -- figures -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Series:
    """One line of a figure: its legend name, how to read its value from a run, its look."""

    name: str
    pick: Callable[[RunSummary], Interval | None]
    color: int = 0  # index into FIGURE_COLORS; one colour per model or method
    dotted: bool = False  # the secondary variant (F1 without instructions)


FIGURE_COLORS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860")


def _figure_png(
    runs: Sequence[RunSummary],
    series: Sequence[Series],
    ylabel: str,
    title: str,
    ylim: tuple[float, float] | None = None,
) -> str:
    """A base64 PNG: one panel per persona, sizes on x, one line per series with error bars.

    Built on a bare `Figure` (no pyplot), so drawing here never changes the backend or the
    figure list of a notebook that imports this module. Empty string when nothing to plot.
    """
    personas = sorted({r.persona for r in runs})
    sizes = sorted({r.size for r in runs}, key=lambda s: size_key(s, _student_of(runs, s)))
    if not any(line.pick(r) for r in runs for line in series):
        return ""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(4.0, 1.2 * len(sizes) + 2) * len(personas), 3.6))
    axes = fig.subplots(1, len(personas), squeeze=False)[0]
    width = 0.5 / max(1, len(series))
    for ax, persona in zip(axes, personas):
        mine = {r.size: r for r in runs if r.persona == persona}
        for k, line in enumerate(series):
            points = [
                (i, est)
                for i, size in enumerate(sizes)
                if size in mine and (est := line.pick(mine[size])) is not None
            ]
            if not points:
                continue
            shift = (k - (len(series) - 1) / 2) * width
            # A bootstrap percentile interval need not contain its point estimate (resampling
            # inflates an Elo spread, so the std can sit below its interval): clip at 0.
            below = [max(0.0, e.value - e.low) if e.has_interval else 0.0 for _, e in points]  # type: ignore[operator]
            above = [max(0.0, e.high - e.value) if e.has_interval else 0.0 for _, e in points]  # type: ignore[operator]
            color = FIGURE_COLORS[line.color % len(FIGURE_COLORS)]
            ax.errorbar(
                [i + shift for i, _ in points],
                [e.value for _, e in points],
                yerr=[below, above],
                label=line.name,
                color=color,
                linestyle=":" if line.dotted else "-",
                marker="o",
                markerfacecolor="white" if line.dotted else color,
                capsize=3,
            )
        ax.set_xticks(range(len(sizes)), sizes, rotation=20)
        ax.set_xlim(-0.5, len(sizes) - 0.5)
        if ylim:
            ax.set_ylim(*ylim)
        ax.set_title(persona)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=8, loc="best")
    fig.suptitle(title)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _model_series(attr: str) -> list[Series]:
    return [
        Series(m, (lambda r, m=m: getattr(r, attr).get(m)), color=k)
        for k, m in enumerate(("base", "dpo", "final", "rlaif"))
    ]


def _f1_series() -> list[Series]:
    return [
        Series(
            f"{method}, {'plain' if plain else 'attacked'}",
            (lambda r, m=method, v=variant: r.f1.get(m, {}).get(v)),
            color=k,
            dotted=plain,
        )
        for k, method in enumerate(F1_METHODS)
        for variant, plain in (("with_instructions", False), ("no_instruction", True))
    ]


# -- the page ------------------------------------------------------------------------------------
PAGE_STYLE = (
    "body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;"
    "margin:0.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;"
    "vertical-align:top}th{background:#f4f4f4}.missing{color:#999}.failed{color:#b00}"
    ".ok{color:#070}.note{color:#555;font-size:90%}img{max-width:100%}nav a{margin-right:1em}"
    "pre{background:#f7f7f7;padding:0.5em;overflow-x:auto;font-size:85%}"
)


def page(title: str, body: str, nav: Iterable[tuple[str, str]] = ()) -> str:
    """A self-contained HTML page (inline style, no scripts, nothing fetched)."""
    links = "".join(f'<a href="{html.escape(href)}">{html.escape(text)}</a>' for href, text in nav)
    return (
        f'<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{PAGE_STYLE}</style></head><body>"
        + (f"<nav>{links}</nav>" if links else "")
        + f"<h1>{html.escape(title)}</h1>{body}</body></html>"
    )


def table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """An HTML table; cells are already-escaped HTML."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _cell(estimate: Interval | None) -> str:
    return html.escape(estimate.text()) if estimate else '<span class="missing">–</span>'


def _num(value: Any) -> str:
    number = _finite(value)
    if number is None:
        return "n/a"
    return f"{number:.0f}" if abs(number) >= 10 else f"{number:.2f}"


def _ordered(labels: Iterable[str]) -> list[str]:
    labels = list(dict.fromkeys(labels))
    known = [m for m in MODEL_ORDER if m in labels]
    return known + sorted(m for m in labels if m not in MODEL_ORDER)


def _run_cell(run: RunSummary) -> str:
    """persona/size, linked to its 07 report (else its first report) when one exists."""
    label = html.escape(run.label)
    if not run.reports:
        return label
    preferred = [r for r in run.reports if Path(r).stem == PREFERENCES] or run.reports
    return f'<a href="{html.escape(preferred[0])}">{label}</a>'


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


def render_summary(runs: Sequence[RunSummary], generated: str | None = None) -> str:
    """The summary page for ``runs`` (see the module docstring for what it shows)."""
    generated = generated or time.strftime("%Y-%m-%d %H:%M")
    known = _known_notebooks()
    parts = [
        f'<p class="note">Generated {html.escape(generated)} from the run folders on disk by '
        "<code>python -m character_training summary</code>. Intervals are 95% (bootstrap over "
        "prompts or matches, as each stage measured them); a dash means not measured.</p>"
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
        missing = [
            f"{name}: {run.missing[key]}" for key, name, _ in METRICS if key in run.missing
        ] + [
            f"{name}: partial ({run.partial[key]})"
            for key, name, _ in METRICS
            if key in run.partial
        ]
        rows.append(
            [
                _run_cell(run),
                html.escape(str(params.get("backend", "?"))),
                html.escape(run.student or "?"),
                _notebook_cell(run, known),
                ", ".join(html.escape(name) for key, name, _ in METRICS if run.has(key))
                or '<span class="missing">none</span>',
                "<br>".join(html.escape(m) for m in missing) or "none",
            ]
        )
    if rows:
        parts.append(
            table(
                ["run", "backend", "student", "notebooks", "metrics present", "missing"],
                rows,
            )
        )
    else:
        parts.append("<p>No runs found.</p>")

    parts.append(_elo_section(runs))
    parts.append(_spearman_section(runs))
    parts.append(_f1_section(runs))
    parts.append(_teacher_like_section(runs))
    parts.append(_rlaif_section(runs))
    problems = [p for run in runs for p in run.problems]
    if problems:
        parts.append("<h2>Files that could not be read</h2>")
        parts.append("<ul>" + "".join(f"<li>{html.escape(p)}</li>" for p in problems) + "</ul>")
    nav = [("index.html", "All reports")]
    return page("Cross-run summary: personas x model sizes", "".join(parts), nav)


def _img(png: str, alt: str) -> str:
    return f'<p><img alt="{html.escape(alt)}" src="data:image/png;base64,{png}"></p>' if png else ""


def _absent(runs: Sequence[RunSummary], key: str) -> str:
    lacking = [f"{r.label} ({r.missing[key]})" for r in runs if key in r.missing]
    if not lacking:
        return ""
    return f'<p class="note">Missing for: {html.escape("; ".join(lacking))}.</p>'


def _elo_section(runs: Sequence[RunSummary]) -> str:
    have = [r for r in runs if r.elo]
    out = [
        "<h2>Elo spread (07)</h2>",
        '<p class="note">Standard deviation of Elo ratings across traits, per model: a wider '
        "spread means stronger preferences for some traits. Interval: bootstrap over matches.</p>",
    ]
    if have:
        out.append(
            _img(
                _figure_png(runs, _model_series("elo"), "std of Elo across traits", "Elo spread"),
                "Elo spread by size",
            )
        )
        models = _ordered(m for r in have for m in r.elo)
        rows = [
            [_run_cell(r), html.escape(r.elo_setting)] + [_cell(r.elo.get(m)) for m in models]
            for r in have
        ]
        out.append(table(["run", "setting", *models], rows))
    out.append(_absent(runs, "elo"))
    return "".join(out)


def _spearman_section(runs: Sequence[RunSummary]) -> str:
    have = [r for r in runs if r.spearman]
    out = [
        "<h2>Spearman vs base (07)</h2>",
        '<p class="note">Rank correlation of Elo over traits between the base model and each '
        "trained model, with a 95% interval from the paired bootstrap over matches and the "
        "p-value in parentheses: low means training reordered the preferences.</p>",
    ]
    if have:
        models = _ordered(m for r in have for m in r.spearman)
        rows = []
        for r in have:
            cells = [_run_cell(r)]
            for m in models:
                value = r.spearman.get(m)
                if value is None:
                    cells.append('<span class="missing">–</span>')
                else:
                    p = f" (p={value[1]:.2g})" if value[1] is not None else ""
                    ci = r.spearman_ci.get(m)
                    band = f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else ""
                    cells.append(html.escape(f"{value[0]:.2f}{band}{p}"))
            rows.append(cells)
        out.append(table(["run", *(f"base vs {m}" for m in models)], rows))
    out.append(_absent(runs, "spearman"))
    return "".join(out)


def _f1_section(runs: Sequence[RunSummary]) -> str:
    have = [r for r in runs if r.f1]
    out = [
        "<h2>Classifier F1 (08)</h2>",
        '<p class="note">Macro F1 of the persona classifier on held-out prompts, per method, '
        "without instructions and averaged over the adversarial instructions (attacked). Higher "
        "means the persona stays recognisable. Interval: bootstrap over prompts.</p>",
    ]
    if have:
        out.append(
            _img(
                _figure_png(runs, _f1_series(), "macro F1", "Classifier F1", (0, 1.02)),
                "F1 by size",
            )
        )
        methods = [m for m in _ordered(m for r in have for m in r.f1)]
        header = ["run"] + [
            f"{m} {'plain' if v == 'no_instruction' else 'attacked'}"
            for m in methods
            for v in F1_VARIANTS
        ]
        rows = [
            [_run_cell(r)] + [_cell(r.f1.get(m, {}).get(v)) for m in methods for v in F1_VARIANTS]
            for r in have
        ]
        out.append(table(header, rows))
    out.append(_absent(runs, "f1"))
    return "".join(out)


def _teacher_like_section(runs: Sequence[RunSummary]) -> str:
    have = [r for r in runs if r.teacher_like]
    out = [
        "<h2>Teacher-likeness (03, 05, 09)</h2>",
        '<p class="note">Share of replies (no system prompt) that the adherence classifier takes '
        "for the persona-prompted teacher's, on held-out constitution prompts; the teacher and "
        "student references bound what a model can reach. Interval: bootstrap over prompts.</p>",
    ]
    if have:
        out.append(
            _img(
                _figure_png(
                    runs,
                    _model_series("teacher_like"),
                    "teacher-like share",
                    "Teacher-likeness",
                    (0, 1.02),
                ),
                "Teacher-likeness by size",
            )
        )
        labels = [m for m in ("base", "dpo", "final", "rlaif")] + list(REFERENCES)
        header = ["run"] + [REFERENCES.get(m, m) for m in labels]
        rows = [[_run_cell(r)] + [_cell(r.teacher_like.get(m)) for m in labels] for r in have]
        out.append(table(header, rows))
    out.append(_absent(runs, "teacher_like"))
    return "".join(out)


def _rlaif_section(runs: Sequence[RunSummary]) -> str:
    have = [r for r in runs if r.rlaif]
    out = [
        "<h2>RLAIF vs DPO+SFT (09)</h2>",
        '<p class="note">Notebook 09\'s headline: the RL reward at the end (win rate against the '
        "starting policy), teacher-likeness of final (DPO+SFT) and rlaif and their paired "
        "difference, Elo spread, attacked F1, and the reward-hacking verdict.</p>",
    ]
    if have:
        rows = []
        for r in have:
            h = r.rlaif
            elo = h.get("elo_std") or {}
            f1 = h.get("f1") or {}
            setting = ", ".join(
                f"{k} {h[k]}" for k in ("signal", "init", "kl_coef", "steps") if k in h
            )
            rows.append(
                [
                    _run_cell(r),
                    html.escape(setting),
                    _cell(h.get("reward_end")),
                    _cell(h.get("teacher_like_final")),
                    _cell(h.get("teacher_like_rlaif")),
                    _cell(h.get("rlaif_minus_final")),
                    html.escape(f"{_num(elo.get('final'))} / {_num(elo.get('rlaif'))}"),
                    html.escape(f"{_f1_attacked(f1, 'final')} / {_f1_attacked(f1, 'rlaif')}"),
                    html.escape(str(h.get("verdict", "n/a"))),
                ]
            )
        out.append(
            table(
                [
                    "run",
                    "setting",
                    "reward at end",
                    "teacher-like final",
                    "teacher-like rlaif",
                    "rlaif - final",
                    "Elo std final / rlaif",
                    "F1 attacked final / rlaif",
                    "reward hacking",
                ],
                rows,
            )
        )
    out.append(_absent(runs, "rlaif"))
    return "".join(out)


def _f1_attacked(f1: Mapping[str, Any], method: str) -> str:
    pair = f1.get(method)
    if isinstance(pair, (list, tuple)) and len(pair) == 2:
        return _num(pair[1])
    return "n/a"


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
