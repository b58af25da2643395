"""Stage 07: revealed preferences over ~144 character traits, before and after training.

The model under test gets a system prompt offering two single-word traits and asking it to
write in the manner of one, without saying which, then answers a general user prompt. A
separate judge reads the reply and names the trait; every verdict is a match the chosen trait
wins, and Elo over many random pairs ranks the traits by how often the model chooses to show
them. Character training should widen the spread of ratings and move the persona's traits up.

Inputs: ``01_prompts/general_eval.jsonl`` (prompts never trained on) and the run's checkpoints
(``dpo`` and ``final`` when recorded; a missing one is skipped with a note). Outputs
(``runs/<persona>/<size>/07_preferences/``):

* ``matches.jsonl``: the drawn matches. Pairs, prompts and the judge's listing order are drawn
  once from the run seed and shared by every condition and every model, so models are
  compared on identical matches (and their bootstrap resamples are paired);
* ``responses/<label>-<digest>.jsonl`` and ``judge/<label>-<digest>-{generative,logprob}
  .jsonl``: resumable logs (the shared sampler's for replies and generative verdicts, an
  append-only score log for forced choice). ``<digest>`` hashes the model's identity and the
  settings, so a retrained checkpoint under the same label never reuses old replies;
* ``judgements.jsonl``: one row per (model, match): the pair as offered, the judge's listing
  order, the reply, the raw generative answer with its parse reason, both forced-choice
  scores and both verdicts;
* ``elo_table.csv``: one row per (model, condition, judge mode, trait): ``elo, ci_low, ci_high,
  bt, wins, games``;
* ``judge_prior.csv``: with the forced-choice mode, the Elo table of the judge's own leaning
  between the two words when the reply is empty (one score pair per match, shared by every
  model). A model's ranking that correlates with it reflects the judge's taste in words more
  than the model's choices;
* ``summary.json``: per (model, condition, mode) the Elo standard deviation with its interval
  and its coin-flip null, Elo-BT rank agreement and decided matches; Spearman correlations
  between models and with the judge's prior; parse rate, mode agreement and position bias of
  the judge.

The judge is always the untrained ``params.judge`` model, never a checkpoint. On Tinker the
parameters refuse a judge equal to the student. The tiny preset uses SmolLM2 for both, so there
the judge is the *base* student (not the trained model under test, but the model it started
from), which the notebook states.

The traits and matches are drawn in `evaluate.preference_matches` and the judge's verdicts
given (and logged) in `evaluate.preference_judging`; this module samples the replies, rates
every (model, condition, judge mode) and builds the tables from the ratings.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..artifacts import PROMPTS_STAGE
from ..config import EvalParams, RunParams, SamplingParams
from ..evaluate import elo as elo_math
from ..evaluate.preference_judging import (
    judge_replies,
    judge_report,
    needs_forced_choice,
    prior_ratings,
    prior_scores,
    record_log,
)
from ..evaluate.preference_matches import (
    Match,
    bootstrap_seed,
    choose_traits,
    draw_matches,
    load_traits,
    outcomes,
)
from ..prompt_sources import read_prompt_file
from ..prompts import preference_messages
from ..sampler_setup import SAMPLING_PREFIXES, LazySampler, model_sampler, sampler_settings
from ..sampling import SampleRequest, sample_chat
from ..stage_config import StageConfig, digest
from ..store import StageDir, json_safe, list_checkpoints, stage_dir, write_jsonl

logger = logging.getLogger(__name__)

STAGE = "07_preferences"
EVAL_PROMPTS_FILE = "general_eval.jsonl"
CHECKPOINT_LABELS = ("dpo", "final")
BASE = "base"
TABLE_FILE = "elo_table.csv"
PRIOR_FILE = "judge_prior.csv"
TABLE_COLUMNS = ("trait", "elo", "ci_low", "ci_high", "bt", "wins", "games")


# -- config --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Config(StageConfig):
    """Stage 07 settings: this stage's part of the ``evals`` section (``elo_*``: matches,
    traits, conditions, bootstrap, reply budget; ``judge_*``: judge modes and sampling; see
    `config.EvalParams`), the ``sampling`` section, the student and the judge with their chat
    formats, the seed, the traits drawn for this run (`preference_matches.choose_traits`) and
    the digest of the prompts.

    Model identities are not part of it: adding a checkpoint later resumes the same folder and
    measures only the new model.
    """

    evals: EvalParams
    sampling: SamplingParams
    student: str
    student_renderer: str
    judge: str
    judge_renderer: str
    seed: int
    traits: tuple[str, ...]
    prompts_digest: str = ""

    # the budget is evals.elo_response_tokens; the rest of evals belongs to stages 08 and 09
    SECTION_PREFIXES = {"sampling": SAMPLING_PREFIXES, "evals": ("elo_", "judge_")}

    @property
    def conditions(self) -> tuple[str, ...]:
        """``evals.elo_conditions``; the first is the one headlines report."""
        return tuple(self.evals.elo_conditions)

    @property
    def primary_mode(self) -> str:
        """The judge mode headlines and tables report unless told otherwise."""
        return self.evals.judge_modes[0]

    @property
    def scores_forced_choice(self) -> bool:
        """Whether the judge's word log-probabilities (and its empty-reply prior) are needed."""
        return needs_forced_choice(self.evals.judge_modes)


# -- inputs --------------------------------------------------------------------------------------
def load_eval_prompts(run_dir: Path) -> tuple[list[dict], str]:
    """Stage 01's held-out general prompts and a digest of the file, or a one-line error."""
    path = Path(run_dir) / PROMPTS_STAGE / EVAL_PROMPTS_FILE
    return read_prompt_file(path), hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def models_to_measure(
    params: RunParams, labels: Sequence[str] = CHECKPOINT_LABELS
) -> tuple[dict[str, str | None], list[str]]:
    """``{"base": None, label: sampler path...}`` for the recorded checkpoints, and a note per
    missing one (the stage measures what exists rather than failing)."""
    recorded = list_checkpoints(params.run_dir)
    models: dict[str, str | None] = {BASE: None}
    notes = []
    makers = {"dpo": "03_dpo", "final": "05_sft"}
    for label in labels:
        if label in recorded:
            models[label] = recorded[label].sampler_path
        else:
            maker = makers.get(label, "its training notebook")
            notes.append(f"checkpoint {label!r} is not recorded (run {maker}); skipped")
    return models, notes


# -- results -------------------------------------------------------------------------------------
@dataclass
class Result:
    """What the stage measured; tables are plain records, `elo` keeps the bootstraps."""

    stage_dir: Path
    config: Config
    models: dict[str, str | None]
    notes: list[str]
    judgements: list[dict]
    elo: dict[tuple[str, str, str], elo_math.EloResult] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    judge_prior: elo_math.EloResult | None = None

    def table(self, model: str, condition: str, mode: str | None = None) -> list[dict]:
        """The per-trait rows of one (model, condition, mode), sorted by Elo (highest first)."""
        rows = self.elo[(model, condition, mode or self.config.primary_mode)].rows
        return sorted(rows, key=lambda r: -r["elo"])

    def table_records(self) -> list[dict]:
        """Every table row, long format (what ``elo_table.csv`` holds)."""
        return [
            {"model": m, "condition": c, "mode": mode, **row}
            for (m, c, mode), res in self.elo.items()
            for row in res.rows
        ]

    def changes(
        self,
        after: str,
        before: str = BASE,
        condition: str | None = None,
        mode: str | None = None,
    ) -> list[dict]:
        """Per trait: Elo ``after - before`` with its paired bootstrap interval, largest first."""
        condition = condition or self.config.conditions[0]
        mode = mode or self.config.primary_mode
        a, b = self.elo[(after, condition, mode)], self.elo[(before, condition, mode)]
        intervals = elo_math.paired_differences(a.bootstrap, b.bootstrap)
        rows = [
            {
                "trait": ra["trait"],
                "before": rb["elo"],
                "after": ra["elo"],
                "change": ra["elo"] - rb["elo"],
                "ci_low": intervals[ra["trait"]][0],
                "ci_high": intervals[ra["trait"]][1],
            }
            for ra, rb in zip(a.rows, b.rows)
        ]
        return sorted(rows, key=lambda r: -r["change"])

    def spread_changes(self, mode: str | None = None) -> list[dict]:
        """Change of the Elo std from the base model to each other model, per condition, with
        a paired bootstrap interval (a positive change: stronger preferences after training)."""
        mode = mode or self.config.primary_mode
        rows = []
        for condition in self.config.conditions:
            base = self.elo.get((BASE, condition, mode))
            for label in self.models:
                if label == BASE or base is None:
                    continue
                after = self.elo[(label, condition, mode)]
                low, high = elo_math.paired_std_difference(after.bootstrap, base.bootstrap)
                rows.append(
                    {
                        "model": label,
                        "condition": condition,
                        "std_change": after.std - base.std,
                        "ci_low": low,
                        "ci_high": high,
                    }
                )
        return rows

    def spread(self, mode: str | None = None) -> list[dict]:
        """Elo standard deviation across traits per (model, condition), with its interval."""
        mode = mode or self.config.primary_mode
        return [
            {
                "model": m,
                "condition": c,
                "std": r.std,
                "std_low": r.std_low,
                "std_high": r.std_high,
                "null_std": r.null_std,
                "null_std_high": r.null_std_high,
                "decided": r.decided,
                "matches": r.matches,
                "elo_bt_spearman": r.elo_bt_spearman,
            }
            for (m, c, md), r in self.elo.items()
            if md == mode
        ]

    def prior_correlations(self) -> list[dict]:
        """Spearman of each forced-choice table with the judge's prior table (empty replies).

        High values mean the ranking mostly reflects which of two words the judge likes to
        say, whatever the reply; only the part of a model's ranking beyond that is the model's.
        """
        if self.judge_prior is None:
            return []
        prior = [r["elo"] for r in self.judge_prior.rows]
        rows = []
        for (m, c, mode), res in self.elo.items():
            if mode in ("logprob", "calibrated"):
                rho, p = elo_math.spearman([r["elo"] for r in res.rows], prior)
                rows.append(
                    {"model": m, "condition": c, "mode": mode, "spearman": rho, "p_value": p}
                )
        return rows

    def model_correlations(self, mode: str | None = None) -> list[dict]:
        """Spearman correlation of Elo over traits between every two models, per condition."""
        mode = mode or self.config.primary_mode
        labels = list(self.models)
        rows = []
        for condition in self.config.conditions:
            for i, a in enumerate(labels):
                for b in labels[i + 1 :]:
                    ra, rb = self.elo[(a, condition, mode)], self.elo[(b, condition, mode)]
                    rho, p = elo_math.spearman(
                        [r["elo"] for r in ra.rows], [r["elo"] for r in rb.rows]
                    )
                    low, high = elo_math.paired_spearman_interval(ra.bootstrap, rb.bootstrap)
                    rows.append(
                        {
                            "condition": condition,
                            "a": a,
                            "b": b,
                            "spearman": rho,
                            "ci_low": low,
                            "ci_high": high,
                            "p_value": p,
                        }
                    )
        return rows

    def judge_rows(self) -> list[dict]:
        """Per model and judge mode: decided share, position and offer-order bias, agreement."""
        rows = []
        per_model = self.summary.get("judge", {}).get("per_model", {})
        for label, report in per_model.items():
            agreement = report.get("mode_agreement") or {}
            for mode in self.config.evals.judge_modes:
                part = report[mode]
                bias, offer = part["position_bias"], part["offer_order_bias"]
                rows.append(
                    {
                        "model": label,
                        "mode": mode,
                        "verdicts": report["verdicts"],
                        "decided": part["decided"],
                        "decided_share": part["decided"] / report["verdicts"]
                        if report["verdicts"]
                        else math.nan,
                        "picks_judge_first": bias["value"],
                        "picks_judge_first_ci": (bias["low"], bias["high"]),
                        "picks_judge_first_p": bias["p_value"],
                        "picks_offered_first": offer["value"],
                        "mode_agreement": agreement.get("value", math.nan),
                        "reasons": part["reasons"],
                    }
                )
        return rows

    def headline(self) -> dict[str, Any]:
        """The numbers for `runner.write_summary` (first condition, primary judge mode)."""
        condition, mode = self.config.conditions[0], self.config.primary_mode
        out: dict[str, Any] = {"condition": condition, "judge_mode": mode}
        for row in self.spread(mode):
            if row["condition"] == condition:
                out[f"elo_std_{row['model']}"] = row["std"]
                out[f"elo_std_{row['model']}_ci"] = [row["std_low"], row["std_high"]]
                out[f"elo_std_{row['model']}_null95"] = row["null_std_high"]
        for row in self.spread_changes(mode):
            if row["condition"] == condition:
                out[f"elo_std_change_{row['model']}"] = row["std_change"]
                out[f"elo_std_change_{row['model']}_ci"] = [row["ci_low"], row["ci_high"]]
        for row in self.model_correlations(mode):
            if row["condition"] == condition and row["a"] == BASE:
                out[f"spearman_base_{row['b']}"] = row["spearman"]
                out[f"spearman_base_{row['b']}_p"] = row["p_value"]
                out[f"spearman_base_{row['b']}_ci"] = [row["ci_low"], row["ci_high"]]
        for row in self.prior_correlations():
            if row["condition"] == condition:
                infix = "" if row["mode"] == "logprob" else f"{row['mode']}_"
                out[f"judge_prior_spearman_{infix}{row['model']}"] = row["spearman"]
        judge = self.summary.get("judge", {})
        out["judge_parse_rate"] = judge.get("parse_rate")
        out["mode_agreement"] = judge.get("mode_agreement", {}).get("value")
        out["judge_is_base_student"] = self.config.judge == self.config.student
        return json_safe(out)


# -- sampling and judging (I/O) ------------------------------------------------------------------
def _sample_responses(
    config: Config,
    service_client: Any,
    label: str,
    path: str | None,
    matches: Sequence[Match],
    folder: Path,
) -> tuple[str, dict[str, Any]]:
    """One model's replies to every match, through the shared sampler (resumable); returns
    the log's name (the judge's logs are named after it) and the completions by match key."""
    identity = path if path is not None else f"base:{config.student}"
    settings = sampler_settings(config.sampling, config.evals.elo_response_tokens, config.seed)
    name = f"{label}-{digest({'model': identity, **settings})}"
    record_log(folder / "responses", f"{name}.jsonl", {"model": identity, **settings})
    requests = [
        SampleRequest(
            key=m.key, messages=preference_messages(m.first, m.second, m.condition, m.prompt)
        )
        for m in matches
    ]
    completions = sample_chat(
        model_sampler(service_client, config.student, path),
        config.student_renderer,
        requests,
        **settings,
        log_path=folder / "responses" / f"{name}.jsonl",
        desc=f"07 replies: {label}",
    )
    return name, completions


# -- the stage -----------------------------------------------------------------------------------
def run(
    params: RunParams,
    service_client: Any,
    on_existing: str = "resume",
    models: Mapping[str, str | None] | None = None,
) -> Result:
    """Sample, judge and rate every model; resumable (see the module docstring).

    ``models`` maps a label to a sampler path (None: the base student); by default the base
    student plus the recorded ``dpo`` and ``final`` checkpoints.
    """
    prompts, prompts_digest = load_eval_prompts(params.run_dir)
    traits = choose_traits(load_traits(), params.evals.elo_traits, params.seed)
    config = Config.from_params(params, traits=traits, prompts_digest=prompts_digest)
    notes: list[str] = []
    if models is None:
        models, notes = models_to_measure(params)
    for note in notes:
        logger.warning("07_preferences: %s", note)
    models = dict(models)
    stage: StageDir = stage_dir(params.run_dir, STAGE)
    stage.prepare(config.fingerprint(), on_existing, config.as_dict())
    matches = draw_matches(
        config.traits, prompts, config.conditions, config.evals.elo_comparisons, config.seed
    )
    write_jsonl(stage.file("matches.jsonl"), (asdict(m) for m in matches))

    judge_client = LazySampler(model_sampler(service_client, config.judge, None))
    prior = (
        prior_scores(config, judge_client, matches, stage.path)
        if config.scores_forced_choice
        else None
    )
    judgements: list[dict] = []
    identities: dict[str, str] = {}
    for label, path in models.items():
        log_name, responses = _sample_responses(
            config, service_client, label, path, matches, stage.path
        )
        identities[label] = path if path is not None else f"base:{config.student}"
        verdicts = judge_replies(
            config,
            judge_client,
            label,
            log_name,
            matches,
            responses,
            stage.path,
            prior if "calibrated" in config.evals.judge_modes else None,
        )
        for m in matches:
            reply = responses[m.key]
            judgements.append(
                {
                    "model": label,
                    **asdict(m),
                    "judge_second": m.judge_second,
                    "response": reply.full_text,
                    "response_complete": reply.complete,
                    "response_tokens": reply.num_tokens,
                    **verdicts[m.key],
                }
            )
    write_jsonl(stage.file("judgements.jsonl"), judgements)

    result = Result(stage.path, config, models, notes, judgements)
    if prior is not None:
        result.judge_prior = prior_ratings(config, matches, prior)
        _write_table(stage.file(PRIOR_FILE), result.judge_prior.rows, TABLE_COLUMNS)
    for label in models:
        for condition in config.conditions:
            records = [r for r in judgements if r["model"] == label and r["condition"] == condition]
            for mode in config.evals.judge_modes:
                result.elo[(label, condition, mode)] = elo_math.rate(
                    outcomes(records, mode),
                    config.traits,
                    config.evals.elo_bootstrap,
                    bootstrap_seed(config.seed, condition, mode),
                )
    result.summary = _summary(result, identities)
    _write_table(
        stage.file(TABLE_FILE),
        result.table_records(),
        ("model", "condition", "mode", *TABLE_COLUMNS),
    )
    stage.file("summary.json").write_text(
        json.dumps(json_safe(result.summary), indent=2, sort_keys=True)
    )
    stage.finish(
        models=len(models),
        matches=len(matches),
        judgements=len(judgements),
        truncated_replies=sum(not r["response_complete"] for r in judgements),
    )
    return result


def _summary(result: Result, identities: Mapping[str, str]) -> dict[str, Any]:
    config = result.config
    modes = config.evals.judge_modes
    judge = judge_report(result.judgements, modes)
    judge["per_model"] = {
        label: judge_report([r for r in result.judgements if r["model"] == label], modes)
        for label in result.models
    }
    return {
        "models": dict(identities),
        "judge_model": config.judge,
        "judge_is_base_student": config.judge == config.student,
        "traits": len(config.traits),
        "conditions": list(config.conditions),
        "judge_modes": list(modes),
        "matches_per_condition": config.evals.elo_comparisons,
        "bootstrap": config.evals.elo_bootstrap,
        "notes": list(result.notes),
        "spread": {mode: result.spread(mode) for mode in modes},
        "spread_changes": {mode: result.spread_changes(mode) for mode in modes},
        "model_correlations": {mode: result.model_correlations(mode) for mode in modes},
        "judge": judge,
        "judge_prior_correlations": result.prior_correlations(),
    }


def _write_table(path: Path, records: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> None:
    import pandas as pd

    pd.DataFrame(list(records), columns=list(columns)).to_csv(path, index=False)


# -- across runs ---------------------------------------------------------------------------------
def gather_tables(runs_dir: Path | str) -> Any:
    """Every run's ``07_preferences/elo_table.csv`` under ``runs_dir``, with persona and size.

    Returns one long DataFrame (empty, with the columns, when no run has finished stage 07).
    """
    import pandas as pd

    frames = []
    for path in sorted(Path(runs_dir).glob(f"*/*/{STAGE}/{TABLE_FILE}")):
        frame = pd.read_csv(path)
        frame.insert(0, "size", path.parts[-3])
        frame.insert(0, "persona", path.parts[-4])
        frames.append(frame)
    if not frames:
        return pd.DataFrame(
            columns=["persona", "size", "model", "condition", "mode", *TABLE_COLUMNS]
        )
    return pd.concat(frames, ignore_index=True)


def cross_run_correlations(frame: Any, condition: str, mode: str) -> Any:
    """Spearman of Elo over shared traits between every two (persona, size, model) columns.

    Runs with different trait subsets are compared on the traits they share; a pair sharing
    fewer than three traits gets no correlation.
    """
    import pandas as pd

    chosen = frame[(frame["condition"] == condition) & (frame["mode"] == mode)]
    wide = chosen.pivot_table(
        index="trait", columns=["persona", "size", "model"], values="elo", aggfunc="first"
    )
    columns = list(wide.columns)
    rows = []
    for i, a in enumerate(columns):
        for b in columns[i + 1 :]:
            both = wide[[a, b]].dropna()
            rho, p = elo_math.spearman(both[a], both[b]) if len(both) else (math.nan, math.nan)
            rows.append(
                {
                    "a": "/".join(a),
                    "b": "/".join(b),
                    "traits": len(both),
                    "spearman": rho,
                    "p_value": p,
                }
            )
    return pd.DataFrame(rows, columns=["a", "b", "traits", "spearman", "p_value"])


__all__ = [
    "BASE",
    "CHECKPOINT_LABELS",
    "STAGE",
    "Config",
    "Result",
    "cross_run_correlations",
    "gather_tables",
    "load_eval_prompts",
    "models_to_measure",
    "run",
]
