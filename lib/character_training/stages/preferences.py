"""Stage 07: revealed preferences over ~144 character traits, before and after training.

The model under test gets a system prompt offering two single-word traits and asking it to
write in the manner of one, without saying which, then answers a general user prompt. A
separate judge reads the reply and names the trait; every verdict is a match the chosen trait
wins, and Elo over many random pairs ranks the traits by how often the model chooses to show
them. Character training should widen the spread of ratings and move the persona's traits up.

Inputs: ``01_prompts/general_eval.jsonl`` (prompts never trained on) and the run's checkpoints
(``dpo`` and ``final`` when recorded; a missing one is skipped with a note). Outputs
(``runs/<persona>/<size>/07_preferences/``):

* ``matches.jsonl``: the drawn matches. Pairs and prompts are drawn once from the run seed and
  shared by every condition and every model, so models are compared on identical matches (and
  their bootstrap resamples are paired). The order the pair is offered to a model is its own
  (`preference_matches.offered_first`), and the judge reads every reply in both listing
  orders: an order shared by every model let a judge's or a model's leaning towards the first
  option make unrelated models agree (issue 16);
* ``responses/<label>-<digest>.jsonl`` and ``judge/<label>-<digest>-{generative,logprob}
  .jsonl``: resumable logs (the shared sampler's for replies and generative verdicts, an
  append-only score log for forced choice, keyed by match and listing order). ``<digest>``
  hashes the model's identity and the settings, so a retrained checkpoint under the same label
  never reuses old replies;
* ``judgements.jsonl``: one row per (model, match): the pair, the trait offered as Option 1,
  the reply, each listing order's raw answer or margin and verdict, and each mode's combined
  verdict (`preference_judging`);
* ``elo_table.csv``: one row per (model, condition, judge mode, trait): ``elo, ci_low, ci_high,
  bt, wins, games``;
* ``judge_prior.csv``: with a forced-choice mode, the Elo table of the judge's own leaning
  between the two words when the reply is empty (one both-order margin per match, shared by
  every model). A ranking that correlates with it reflects the judge's taste in words;
* ``summary.json``: per (model, condition, mode) the spread of Elo beyond the coin-flip floor
  with its interval, the raw std, the reliability of the ranking and whether the instrument
  measured (`preference_stats`); per two models the paired change of the spread and Spearman
  with its interval, reliabilities, ceiling and disattenuated value; correlations with the
  judge's prior and the calibrated mode's fitted slopes; the judge's parse rate, decided
  share, position bias and order inconsistency.

Where the instrument cannot measure (the generative judge parses under half its answers; the
two listing orders disagree on most matches; a forced-choice ranking follows the judge's
prior, |rho| > 0.7) the statistics say "no measurement" with the reason, and the headline
withholds the numbers (`intervals.withhold`).

The judge is always the untrained ``params.judge`` model, never a checkpoint. On Tinker the
parameters refuse a judge equal to the student. The tiny preset uses SmolLM2 for both, so there
the judge is the *base* student (not the trained model under test, but the model it started
from), which the notebook states.

The traits and matches are drawn in `evaluate.preference_matches`, the judge's verdicts given
(and logged) in `evaluate.preference_judging`, the headline statistics computed in
`evaluate.preference_stats`; this module samples the replies, rates every (model, condition,
judge mode) and builds the tables and the headline from the ratings.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any

from ..artifacts import PROMPTS_STAGE
from ..config import EvalParams, RunParams, SamplingParams
from ..evaluate import elo as elo_math
from ..evaluate import elo_stats
from ..evaluate import judge as judging
from ..evaluate.intervals import withhold
from ..evaluate.judge_prior import explained_by_prior
from ..evaluate.preference_judging import (
    judge_replies,
    judge_report,
    needs_forced_choice,
    prior_ratings,
    prior_scores,
    record_log,
    single_order_mode,
)
from ..evaluate.preference_matches import (
    Match,
    bootstrap_seed,
    choose_traits,
    draw_matches,
    load_traits,
    offered_pair,
    outcomes,
)
from ..evaluate.preference_stats import (
    ModelStatistics,
    PairStatistics,
    model_statistics,
    pair_statistics,
)
from ..prompt_sources import read_prompt_file
from ..prompts import preference_messages
from ..sampler_setup import SAMPLING_PREFIXES, LazySampler, model_sampler, sampler_settings
from ..sampling import SampleRequest, sample_chat
from ..stage_config import StageConfig, digest
from ..store import (
    StageDir,
    json_safe,
    list_checkpoints,
    model_identity,
    stage_dir,
    write_jsonl,
)

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
    the digest of the prompts. ``judge_orders`` and ``offer_order`` name the protocol (both
    listing orders for the judge, an offered order per model); they are fixed, and recorded so
    that a folder made with the earlier shared orders is refused rather than mixed.

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
    judge_orders: str = "both"
    offer_order: str = "per model"

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
    """What the stage measured. ``elo`` keeps the per-trait tables (with their bootstraps),
    ``stats`` the headline statistics per (model, condition, mode) and ``pairs`` those of two
    models per (a, b, condition, mode), ``a`` listed before ``b`` in ``models``."""

    stage_dir: Path
    config: Config
    models: dict[str, str | None]
    notes: list[str]
    judgements: list[dict]
    elo: dict[tuple[str, str, str], elo_math.EloResult] = field(default_factory=dict)
    stats: dict[tuple[str, str, str], ModelStatistics] = field(default_factory=dict)
    pairs: dict[tuple[str, str, str, str], PairStatistics] = field(default_factory=dict)
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

    def spread(self, mode: str | None = None) -> list[dict]:
        """Per (model, condition): the raw Elo std, the coin-flip floor (root mean square, and
        the null's 95% point), the spread beyond noise with its interval, the reliability of
        the ranking, decided verdicts, Elo-BT agreement and the measurement status."""
        mode = mode or self.config.primary_mode
        return [
            {
                **stats.row(),
                "null_std_high": self.elo[key].null_std_high,
                "elo_bt_spearman": self.elo[key].elo_bt_spearman,
            }
            for key, stats in self.stats.items()
            if key[2] == mode
        ]

    def spread_changes(self, mode: str | None = None) -> list[dict]:
        """Change of the Elo std from the base model to each other model, per condition, with
        a paired bootstrap interval (a positive change: stronger preferences after training)."""
        mode = mode or self.config.primary_mode
        return [
            {
                "model": pair.b,
                "condition": pair.condition,
                "std_change": pair.std_change,
                "ci_low": pair.change_low,
                "ci_high": pair.change_high,
                **pair.measurement.to_dict(),
            }
            for (a, _, _, md), pair in self.pairs.items()
            if md == mode and a == BASE
        ]

    def model_correlations(self, mode: str | None = None) -> list[dict]:
        """Spearman of Elo over traits between every two models, per condition, with its paired
        interval, both models' split-half reliabilities, the ceiling sqrt(rel_a * rel_b) (what
        unchanged preferences would show) and the disattenuated rho."""
        mode = mode or self.config.primary_mode
        rows = []
        for (_, _, _, md), pair in self.pairs.items():
            if md == mode:
                row = pair.row()
                del row["mode"], row["std_change"], row["change_low"], row["change_high"]
                rows.append(row)
        return rows

    def prior_correlations(self) -> list[dict]:
        """Spearman of every table with the judge's prior table (its forced choices after an
        empty reply), and the calibrated mode's fitted slope of the margins on the prior.

        A ranking correlating beyond 0.7 either way is flagged ``explained``: it reflects which
        of two words the judge likes (or the calibration's over-correction of it), whatever
        the reply. In a forced-choice mode, which reads exactly those word scores, that makes
        the table "no measurement"; a generative table is flagged only.
        """
        if self.judge_prior is None:
            return []
        prior = [r["elo"] for r in self.judge_prior.rows]
        rows = []
        for (m, c, mode), res in self.elo.items():
            rho, p = elo_math.spearman([r["elo"] for r in res.rows], prior)
            rows.append(
                {
                    "model": m,
                    "condition": c,
                    "mode": mode,
                    "spearman": rho,
                    "p_value": p,
                    "slope": self.stats[(m, c, mode)].prior_slope,
                    "explained": explained_by_prior(rho),
                }
            )
        return rows

    def no_measurements(self, mode: str | None = None) -> list[dict]:
        """Every (model, condition) of ``mode`` (all modes when None) whose statistics the
        instrument could not measure, with the one-line reason."""
        return [
            {"model": m, "condition": c, "mode": md, "reason": stats.measurement.reason}
            for (m, c, md), stats in self.stats.items()
            if (mode is None or md == mode) and not stats.measurement.measured
        ]

    def no_measurement_lines(self, mode: str | None = None) -> list[str]:
        """``NO MEASUREMENT: <model> (<condition>, <mode>): <reason>`` per `no_measurements`."""
        return [
            f"NO MEASUREMENT: {r['model']} ({r['condition']}, {r['mode']}): {r['reason']}"
            for r in self.no_measurements(mode)
        ]

    def judge_rows(self) -> list[dict]:
        """Per model and judge mode: decided share, parse rate, the judge's position bias and
        order inconsistency, the leaning towards Option 1, mode agreement."""
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
                        "decided_share": part["decided_share"],
                        "parse_rate": report["parse_rate"] if mode == "generative" else None,
                        "order_inconsistent": part["order_inconsistent"]["value"],
                        "picks_listed_first": bias["value"],
                        "picks_listed_first_ci": (bias["low"], bias["high"]),
                        "picks_offered_first": offer["value"],
                        "mode_agreement": agreement.get("value", math.nan),
                        "reasons": part["reasons"],
                    }
                )
        return rows

    def headline(self) -> dict[str, Any]:
        """The numbers for `runner.write_summary` (first condition, primary judge mode).

        A value derived from a measurement that failed is None, and ``no_measurement`` maps
        its key to the reason (`intervals.withhold`).
        """
        config = self.config
        condition, mode = config.conditions[0], config.primary_mode
        out: dict[str, Any] = {
            "condition": condition,
            "judge_mode": mode,
            "judge_orders": config.judge_orders,
            "elo_comparisons": config.evals.elo_comparisons,
            "elo_traits": len(config.traits),
            "games_per_trait": 2 * config.evals.elo_comparisons / len(config.traits),
        }
        reasons: dict[str, str] = {}
        for label in self.models:
            stats = self.stats[(label, condition, mode)]
            out[f"elo_std_{label}"] = stats.std
            out[f"elo_std_{label}_null95"] = self.elo[(label, condition, mode)].null_std_high
            out[f"elo_noise_floor_{label}"] = stats.noise_floor
            out[f"elo_spread_beyond_noise_{label}"] = stats.beyond_noise
            out[f"elo_spread_beyond_noise_{label}_ci"] = [stats.beyond_low, stats.beyond_high]
            out[f"elo_reliability_{label}"] = stats.reliability
            if not stats.measurement.measured:
                for key in ("elo_std", "elo_spread_beyond_noise", "elo_reliability"):
                    reasons[f"{key}_{label}"] = stats.measurement.reason
                reasons[f"elo_spread_beyond_noise_{label}_ci"] = stats.measurement.reason
        for label in self.models:
            pair = self.pairs.get((BASE, label, condition, mode))
            if pair is None:
                continue
            out[f"elo_std_change_{label}"] = pair.std_change
            out[f"elo_std_change_{label}_ci"] = [pair.change_low, pair.change_high]
            out[f"spearman_base_{label}"] = pair.spearman
            out[f"spearman_base_{label}_p"] = pair.p_value
            out[f"spearman_base_{label}_ci"] = [pair.ci_low, pair.ci_high]
            out[f"spearman_ceiling_{label}"] = pair.ceiling
            out[f"spearman_disattenuated_{label}"] = pair.disattenuated
            if pair.measurement.measured and not pair.agreement.measured:
                for key in ("", "_ci", "_p"):
                    reasons[f"spearman_base_{label}{key}"] = pair.agreement.reason
                reasons[f"spearman_disattenuated_{label}"] = pair.agreement.reason
            if not pair.measurement.measured:
                for key in (
                    f"elo_std_change_{label}",
                    f"elo_std_change_{label}_ci",
                    f"spearman_base_{label}",
                    f"spearman_base_{label}_ci",
                    f"spearman_base_{label}_p",
                    f"spearman_ceiling_{label}",
                    f"spearman_disattenuated_{label}",
                ):
                    reasons[key] = pair.measurement.reason
        for row in self.prior_correlations():
            if row["condition"] == condition:
                infix = "" if row["mode"] == mode else f"{row['mode']}_"
                out[f"judge_prior_spearman_{infix}{row['model']}"] = row["spearman"]
                if row["mode"] == "calibrated":
                    out[f"judge_prior_slope_{row['model']}"] = row["slope"]
        judge = self.summary.get("judge", {})
        inconsistent = judge.get(mode, {}).get("order_inconsistent", {})
        out["judge_order_inconsistent_rate"] = inconsistent.get("value")
        out["judge_parse_rate"] = judge.get("parse_rate")
        out["mode_agreement"] = judge.get("mode_agreement", {}).get("value")
        out["judge_is_base_student"] = config.judge == config.student
        return withhold(json_safe(out), reasons)


# -- sampling (I/O) ------------------------------------------------------------------------------
def _sample_responses(
    config: Config,
    service_client: Any,
    label: str,
    path: str | None,
    matches: Sequence[Match],
    folder: Path,
    identity: str,
) -> tuple[str, dict[str, Any]]:
    """One model's replies to every match, offered in the model's own order, through the shared
    sampler (resumable); returns the log's name (the judge's logs are named after it) and the
    completions by match key. ``identity`` (`store.model_identity`) names the log, so a moved run
    folder keeps its replies."""
    settings = sampler_settings(config.sampling, config.evals.elo_response_tokens, config.seed)
    name = f"{label}-{digest({'model': identity, **settings})}"
    record_log(folder / "responses", f"{name}.jsonl", {"model": identity, **settings})
    requests = [
        SampleRequest(
            key=m.key,
            messages=preference_messages(
                *offered_pair(m, config.seed, label), m.condition, m.prompt
            ),
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
        identities[label] = model_identity(params.run_dir, path, config.student)
        log_name, responses = _sample_responses(
            config, service_client, label, path, matches, stage.path, identities[label]
        )
        verdicts = judge_replies(
            config, judge_client, label, log_name, matches, responses, stage.path, prior
        )
        for m in matches:
            reply = responses[m.key]
            judgements.append(
                {
                    "model": label,
                    **asdict(m),
                    "offered_first": offered_pair(m, config.seed, label)[0],
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
    rate_all(result)
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


def rate_all(result: Result) -> None:
    """Fill ``result.elo``, ``result.stats`` and ``result.pairs`` from its judgements.

    Per (condition, mode) one bootstrap seed serves every model (paired resamples); the
    per-trait table is `elo.rate`, the headline statistics `preference_stats`'.
    """
    config = result.config
    prior = [r["elo"] for r in result.judge_prior.rows] if result.judge_prior else None
    for condition in config.conditions:
        for mode in config.evals.judge_modes:
            seed = bootstrap_seed(config.seed, condition, mode)
            played: dict[str, elo_stats.Outcomes] = {}
            for label in result.models:
                records = [
                    r
                    for r in result.judgements
                    if r["model"] == label and r["condition"] == condition
                ]
                pairs = outcomes(records, mode)
                table = elo_math.rate(pairs, config.traits, config.evals.elo_bootstrap, seed)
                result.elo[(label, condition, mode)] = table
                played[label] = elo_stats.Outcomes.from_pairs(pairs, config.traits)
                slopes = {r.get("calibrated_slope") for r in records} - {None}
                result.stats[(label, condition, mode)] = model_statistics(
                    label,
                    condition,
                    mode,
                    played[label],
                    config.evals.elo_bootstrap,
                    seed,
                    parse_rate=judging.parse_rate(records) if mode == "generative" else math.nan,
                    order_inconsistent=judging.order_inconsistency(
                        records, single_order_mode(mode)
                    ).value,
                    prior_spearman=elo_math.spearman([r["elo"] for r in table.rows], prior)[0]
                    if prior is not None
                    else math.nan,
                    prior_slope=slopes.pop() if mode == "calibrated" and slopes else math.nan,
                )
            for a, b in combinations(result.models, 2):
                result.pairs[(a, b, condition, mode)] = pair_statistics(
                    result.stats[(a, condition, mode)],
                    result.stats[(b, condition, mode)],
                    played[a],
                    played[b],
                    config.evals.elo_bootstrap,
                    seed,
                )


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
        "judge_orders": config.judge_orders,
        "offer_order": config.offer_order,
        "traits": len(config.traits),
        "conditions": list(config.conditions),
        "judge_modes": list(modes),
        "matches_per_condition": config.evals.elo_comparisons,
        "bootstrap": config.evals.elo_bootstrap,
        "notes": list(result.notes),
        "spread": {mode: result.spread(mode) for mode in modes},
        "spread_changes": {mode: result.spread_changes(mode) for mode in modes},
        "model_correlations": {mode: result.model_correlations(mode) for mode in modes},
        "no_measurement": result.no_measurements(),
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
    "rate_all",
    "run",
]
