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
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from ..config import RunParams
from ..errors import DataError
from ..evaluate import elo as elo_math
from ..evaluate import judge as judging
from ..prompts import preference_judge_messages, preference_messages
from ..renderers import get_renderer, renderer_for_model
from ..sampling import SampleRequest, sample_chat
from ..store import (
    StageDir,
    append_jsonl,
    json_safe,
    list_checkpoints,
    read_jsonl,
    stage_dir,
    write_jsonl,
)

logger = logging.getLogger(__name__)

STAGE = "07_preferences"
PROMPTS_STAGE = "01_prompts"
EVAL_PROMPTS_FILE = "general_eval.jsonl"
CHECKPOINT_LABELS = ("dpo", "final")
BASE = "base"
TABLE_FILE = "elo_table.csv"
PRIOR_FILE = "judge_prior.csv"
TABLE_COLUMNS = ("trait", "elo", "ci_low", "ci_high", "bt", "wins", "games")


# -- config --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Config:
    """Stage 07 settings, derived from `RunParams` (see `config.EvalParams` for each field).

    Model identities are not part of it: adding a checkpoint later resumes the same folder and
    measures only the new model.
    """

    student: str
    student_renderer: str
    judge: str
    judge_renderer: str
    traits: tuple[str, ...]
    conditions: tuple[str, ...]
    comparisons: int
    judge_modes: tuple[str, ...]
    response_tokens: int
    temperature: float
    top_p: float
    top_k: int
    judge_temperature: float
    judge_top_p: float
    judge_max_tokens: int
    bootstrap: int
    seed: int
    prompts_digest: str = ""

    @classmethod
    def from_params(cls, params: RunParams, prompts_digest: str = "") -> "Config":
        e = params.evals
        return cls(
            student=params.student,
            student_renderer=params.renderers.get(params.student)
            or renderer_for_model(params.student),
            judge=params.judge,
            judge_renderer=params.renderers.get(params.judge) or renderer_for_model(params.judge),
            traits=choose_traits(load_traits(), e.elo_traits, params.seed),
            conditions=tuple(e.elo_conditions),
            comparisons=e.elo_comparisons,
            judge_modes=tuple(e.judge_modes),
            response_tokens=e.elo_response_tokens,
            temperature=params.sampling.temperature,
            top_p=params.sampling.top_p,
            top_k=params.sampling.top_k,
            judge_temperature=e.judge_temperature,
            judge_top_p=e.judge_top_p,
            judge_max_tokens=e.judge_max_tokens,
            bootstrap=e.elo_bootstrap,
            seed=params.seed,
            prompts_digest=prompts_digest,
        )

    def fingerprint(self) -> str:
        return hashlib.sha256(repr(sorted(asdict(self).items())).encode()).hexdigest()[:12]

    @property
    def primary_mode(self) -> str:
        return self.judge_modes[0]

    @property
    def scores_forced_choice(self) -> bool:
        """Whether the judge's word log-probabilities (and its empty-reply prior) are needed:
        the calibrated mode is built on the plain forced-choice scores."""
        return bool({"logprob", "calibrated"} & set(self.judge_modes))


# -- traits and matches (pure) -------------------------------------------------------------------
def load_traits(path: Path | None = None) -> tuple[str, ...]:
    """The trait vocabulary (package data ``data/traits.yaml`` unless ``path`` is given)."""
    if path is None:
        text = resources.files("character_training").joinpath("data/traits.yaml").read_text()
        where = "character_training/data/traits.yaml"
    else:
        text, where = Path(path).read_text(encoding="utf-8"), str(path)
    data = yaml.safe_load(text) or {}
    traits = data.get("traits") if isinstance(data, Mapping) else None
    if not isinstance(traits, list) or len(traits) < 2:
        raise DataError(f"{where}: expected a 'traits' list of at least two words")
    for trait in traits:
        if not isinstance(trait, str) or not trait.isalpha() or trait != trait.lower():
            raise DataError(f"{where}: trait {trait!r}: expected one lowercase word of letters")
    if len(set(traits)) != len(traits):
        raise DataError(f"{where}: a trait is listed twice")
    return tuple(traits)


def choose_traits(vocabulary: Sequence[str], n: int, seed: int) -> tuple[str, ...]:
    """``n`` traits drawn with the run seed (0: all), in vocabulary order."""
    if n == 0 or n >= len(vocabulary):
        return tuple(vocabulary)
    picked = set(random.Random(f"{seed}:elo-traits").sample(list(vocabulary), n))
    return tuple(t for t in vocabulary if t in picked)


@dataclass(frozen=True)
class Match:
    """One comparison: the two traits as offered (``first`` is Option 1), the user prompt, and
    the trait the judge sees listed first (drawn independently)."""

    condition: str
    match_id: str
    first: str
    second: str
    prompt_id: str
    prompt: str
    judge_first: str

    @property
    def key(self) -> str:
        return f"{self.condition}:{self.match_id}"

    @property
    def judge_second(self) -> str:
        return self.second if self.judge_first == self.first else self.first


def draw_matches(
    traits: Sequence[str],
    prompts: Sequence[Mapping[str, Any]],
    conditions: Sequence[str],
    n: int,
    seed: int,
) -> list[Match]:
    """``n`` matches per condition; the same draws (pair, order, prompt, judge order) for all.

    Every draw comes from one stream seeded by the run seed alone, so a rerun, another model or
    another condition sees exactly the same matches.
    """
    if len(traits) < 2:
        raise DataError(f"draw_matches: expected at least two traits, found {len(traits)}")
    if n and not prompts:
        raise DataError("draw_matches: no user prompts to draw from")
    rng = random.Random(f"{seed}:elo-matches")
    draws = []
    for i in range(n):
        first, second = rng.sample(list(traits), 2)
        prompt = prompts[rng.randrange(len(prompts))]
        judge_first = first if rng.random() < 0.5 else second
        draws.append((f"m{i:05d}", first, second, prompt, judge_first))
    return [
        Match(condition, mid, a, b, str(p["id"]), str(p["prompt"]), jf)
        for condition in conditions
        for mid, a, b, p, jf in draws
    ]


def outcomes(records: Sequence[Mapping[str, Any]], mode: str) -> list[elo_math.Outcome]:
    """``(winner, loser)`` per record in order, None where ``mode`` gave no verdict."""
    result: list[elo_math.Outcome] = []
    for r in records:
        choice = r.get(f"{mode}_choice")
        if choice is None:
            result.append(None)
        else:
            result.append((choice, r["second"] if choice == r["first"] else r["first"]))
    return result


def bootstrap_seed(seed: int, condition: str, mode: str) -> int:
    """Resampling seed of one (condition, mode): independent of the model, so that every model
    judged on the same matches is resampled identically (paired)."""
    digest = hashlib.sha256(f"{seed}:elo-bootstrap:{condition}:{mode}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


# -- inputs --------------------------------------------------------------------------------------
def load_eval_prompts(run_dir: Path) -> tuple[list[dict], str]:
    """Stage 01's held-out general prompts and a digest of the file, or a one-line error."""
    path = Path(run_dir) / PROMPTS_STAGE / EVAL_PROMPTS_FILE
    if not path.is_file():
        raise DataError(f"{path} is missing: run notebook 01_prompts first")
    rows = read_jsonl(path)
    if not rows:
        raise DataError(f"{path} holds no prompts: run notebook 01_prompts first")
    for number, row in enumerate(rows, start=1):
        if not row.get("id") or not row.get("prompt"):
            raise DataError(f"{path}:{number}: expected 'id' and 'prompt' fields")
    return rows, hashlib.sha256(path.read_bytes()).hexdigest()[:16]


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
            for mode in self.config.judge_modes:
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
def _digest(payload: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def _note_index(folder: Path, name: str, entry: Mapping[str, Any]) -> None:
    """Keep ``index.json`` saying which log file belongs to which model and settings."""
    path = folder / "index.json"
    index = json.loads(path.read_text()) if path.is_file() else {}
    if index.get(name) != dict(entry):
        index[name] = dict(entry)
        folder.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(index, indent=2, sort_keys=True))


class _Lazy:
    """A sampling client made on first use (a fully logged rerun loads no model)."""

    def __init__(self, make: Any) -> None:
        self._make, self._client = make, None

    def __call__(self) -> Any:
        if self._client is None:
            from ..backends import resolve_client

            self._client = resolve_client(self._make())
        return self._client


def _sample_responses(
    config: Config,
    service_client: Any,
    label: str,
    path: str | None,
    matches: Sequence[Match],
    folder: Path,
) -> tuple[str, dict[str, Any]]:
    identity = path if path is not None else f"base:{config.student}"
    settings = {
        "max_tokens": config.response_tokens,
        "temperature": config.temperature,
        "top_p": config.top_p,
        "top_k": config.top_k,
        "seed": config.seed,
    }
    name = f"{label}-{_digest({'model': identity, **settings})}"
    _note_index(folder / "responses", f"{name}.jsonl", {"model": identity, **settings})
    requests = [
        SampleRequest(
            key=m.key, messages=preference_messages(m.first, m.second, m.condition, m.prompt)
        )
        for m in matches
    ]

    def make() -> Any:
        if path is None:
            return service_client.create_sampling_client(base_model=config.student)
        return service_client.create_sampling_client(model_path=path)

    completions = sample_chat(
        make,
        config.student_renderer,
        requests,
        **settings,
        log_path=folder / "responses" / f"{name}.jsonl",
        desc=f"07 replies: {label}",
    )
    return name, completions


def _judge(
    config: Config,
    judge_client: _Lazy,
    label: str,
    response_log: str,
    matches: Sequence[Match],
    responses: Mapping[str, Any],
    folder: Path,
    prior: Mapping[str, tuple[float, float]] | None = None,
) -> dict[str, dict[str, Any]]:
    """The judge modes for one model's replies; returns key -> verdict fields.

    ``prior`` (match id -> the judge's forced-choice scores with an empty reply) is needed for
    the "calibrated" mode: the verdict is the trait whose log-probability rose more over the
    judge's own leaning, i.e. the sign of ``(s1 - s2) - (p1 - p2)``.
    """
    out: dict[str, dict[str, Any]] = {m.key: {} for m in matches}
    conversations = {
        m.key: preference_judge_messages(
            m.prompt, responses[m.key].full_text, m.judge_first, m.judge_second
        )
        for m in matches
    }
    base_name = f"{label}-{_digest({'judge': config.judge, 'responses': response_log})}"
    if "generative" in config.judge_modes:
        settings = {
            "max_tokens": config.judge_max_tokens,
            "temperature": config.judge_temperature,
            "top_p": config.judge_top_p,
            "top_k": -1,
            "seed": config.seed,
        }
        name = f"{base_name}-generative.jsonl"
        _note_index(
            folder / "judge", name, {"judge": config.judge, "responses": response_log, **settings}
        )
        verdicts = sample_chat(
            judge_client,
            config.judge_renderer,
            [SampleRequest(key=m.key, messages=conversations[m.key]) for m in matches],
            **settings,
            log_path=folder / "judge" / name,
            desc=f"07 judge (generative): {label}",
        )
        for m in matches:
            completion = verdicts[m.key]
            verdict = judging.parse_judgement(completion.full_text, m.first, m.second)
            out[m.key].update(
                generative_raw=completion.full_text,
                generative_complete=completion.complete,
                generative_choice=verdict.choice,
                generative_reason=verdict.reason,
            )
    if config.scores_forced_choice:
        name = f"{base_name}-logprob.jsonl"
        _note_index(folder / "judge", name, {"judge": config.judge, "responses": response_log})
        scores = _forced_choice(
            config, judge_client, matches, conversations, folder / "judge" / name
        )
        for m in matches:
            lp_first, lp_second = scores[m.key]
            verdict = judging.forced_choice(lp_first, lp_second, m.judge_first, m.judge_second)
            out[m.key].update(
                logprob_judge_first=lp_first,
                logprob_judge_second=lp_second,
                logprob_choice=verdict.choice,
                logprob_reason=verdict.reason,
            )
            if prior is not None:
                p_first, p_second = prior[m.match_id]
                calibrated = judging.forced_choice(
                    lp_first - p_first, lp_second - p_second, m.judge_first, m.judge_second
                )
                out[m.key].update(
                    calibrated_prior_first=p_first,
                    calibrated_prior_second=p_second,
                    calibrated_choice=calibrated.choice,
                    calibrated_reason=calibrated.reason,
                )
    return out


def _forced_choice(
    config: Config,
    judge_client: _Lazy,
    matches: Sequence[Match],
    conversations: Mapping[str, list[dict[str, str]]],
    log_path: Path,
) -> dict[str, tuple[float, float]]:
    """Forced-choice scores, appended to ``log_path`` per chunk and reused on a rerun.

    A logged row is reused only when its digest (judge conversation and candidates) matches;
    any other row under the same key means the inputs changed and the log is refused.
    """
    digests = {
        m.key: _digest(
            {"messages": conversations[m.key], "candidates": [m.judge_first, m.judge_second]}
        )
        for m in matches
    }
    done: dict[str, tuple[float, float]] = {}
    for row in read_jsonl(log_path):
        key = row.get("key")
        if key not in digests:
            continue
        if row.get("digest") != digests[key]:
            raise DataError(
                f"{log_path}: the logged scores for {key!r} were made from a different judge "
                "prompt; delete the log or use a new stage folder"
            )
        done[key] = (float(row["first"]), float(row["second"]))
    missing = [m for m in matches if m.key not in done]
    if missing:
        client = judge_client()
        renderer = get_renderer(config.judge_renderer, client.get_tokenizer())
        chunk = 64
        for start in range(0, len(missing), chunk):
            part = missing[start : start + chunk]
            scores = judging.forced_choice_scores(
                client,
                renderer,
                [(conversations[m.key], m.judge_first, m.judge_second) for m in part],
                desc="07 judge (forced choice)" if start == 0 else None,
            )
            for m, (first, second) in zip(part, scores):
                append_jsonl(
                    log_path,
                    {"key": m.key, "digest": digests[m.key], "first": first, "second": second},
                )
                done[m.key] = (first, second)
    return done


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
    config = Config.from_params(params, prompts_digest)
    notes: list[str] = []
    if models is None:
        models, notes = models_to_measure(params)
    for note in notes:
        logger.warning("07_preferences: %s", note)
    models = dict(models)
    stage: StageDir = stage_dir(params.run_dir, STAGE)
    stage.prepare(config.fingerprint(), on_existing, asdict(config))
    matches = draw_matches(
        config.traits, prompts, config.conditions, config.comparisons, config.seed
    )
    write_jsonl(stage.file("matches.jsonl"), (asdict(m) for m in matches))

    judge_client = _Lazy(lambda: service_client.create_sampling_client(base_model=config.judge))
    prior_scores = (
        _prior_scores(config, judge_client, matches, stage.path)
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
        verdicts = _judge(
            config,
            judge_client,
            label,
            log_name,
            matches,
            responses,
            stage.path,
            prior_scores if "calibrated" in config.judge_modes else None,
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
    if prior_scores is not None:
        result.judge_prior = _judge_prior(config, matches, prior_scores)
        _write_table(stage.file(PRIOR_FILE), result.judge_prior.rows, TABLE_COLUMNS)
    for label in models:
        for condition in config.conditions:
            records = [r for r in judgements if r["model"] == label and r["condition"] == condition]
            for mode in config.judge_modes:
                result.elo[(label, condition, mode)] = elo_math.rate(
                    outcomes(records, mode),
                    config.traits,
                    config.bootstrap,
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


def judge_report(records: Sequence[Mapping[str, Any]], modes: Sequence[str]) -> dict[str, Any]:
    """Parse rate and reasons, decided counts, agreement and position biases of the judge."""
    report: dict[str, Any] = {"verdicts": len(records)}
    for mode in modes:
        decided = sum(r.get(f"{mode}_choice") is not None for r in records)
        report[mode] = {
            "decided": decided,
            "reasons": judging.parse_counts(records, mode),
            "position_bias": judging.position_bias(records, mode).to_dict(),
            "offer_order_bias": judging.offer_order_bias(records, mode).to_dict(),
        }
    if "generative" in modes:
        report["parse_rate"] = report["generative"]["decided"] / len(records) if records else None
    else:
        report["parse_rate"] = None
    if set(modes) >= {"generative", "logprob"}:
        report["mode_agreement"] = judging.mode_agreement(
            records, "generative", "logprob"
        ).to_dict()
    return report


def _prior_scores(
    config: Config, judge_client: _Lazy, matches: Sequence[Match], folder: Path
) -> dict[str, tuple[float, float]]:
    """The judge's forced-choice scores with an empty reply, per match id: its leaning between
    the two words before reading anything.

    Conditions share their draws (pair, prompt, listing order), so one score pair per match id
    covers every condition and every model; the log is keyed by match and reused like the
    others.
    """
    firsts = [m for m in matches if m.condition == config.conditions[0]]
    conversations = {
        m.key: preference_judge_messages(m.prompt, "", m.judge_first, m.judge_second)
        for m in firsts
    }
    name = f"prior-{_digest({'judge': config.judge})}-logprob.jsonl"
    _note_index(folder / "judge", name, {"judge": config.judge, "responses": "(empty)"})
    scores = _forced_choice(config, judge_client, firsts, conversations, folder / "judge" / name)
    return {m.match_id: scores[m.key] for m in firsts}


def _judge_prior(
    config: Config, matches: Sequence[Match], prior: Mapping[str, tuple[float, float]]
) -> elo_math.EloResult:
    """Elo of the judge's empty-reply forced choices: the ranking its word preferences alone
    would produce (compare with each model's table in `Result.prior_correlations`)."""
    records = []
    for m in matches:
        if m.condition != config.conditions[0]:
            continue
        verdict = judging.forced_choice(*prior[m.match_id], m.judge_first, m.judge_second)
        records.append({"first": m.first, "second": m.second, "logprob_choice": verdict.choice})
    return elo_math.rate(
        outcomes(records, "logprob"),
        config.traits,
        config.bootstrap,
        bootstrap_seed(config.seed, "judge_prior", "logprob"),
    )


def _summary(result: Result, identities: Mapping[str, str]) -> dict[str, Any]:
    config = result.config
    judge = judge_report(result.judgements, config.judge_modes)
    judge["per_model"] = {
        label: judge_report(
            [r for r in result.judgements if r["model"] == label], config.judge_modes
        )
        for label in result.models
    }
    return {
        "models": dict(identities),
        "judge_model": config.judge,
        "judge_is_base_student": config.judge == config.student,
        "traits": len(config.traits),
        "conditions": list(config.conditions),
        "judge_modes": list(config.judge_modes),
        "matches_per_condition": config.comparisons,
        "bootstrap": config.bootstrap,
        "notes": list(result.notes),
        "spread": {mode: result.spread(mode) for mode in config.judge_modes},
        "spread_changes": {mode: result.spread_changes(mode) for mode in config.judge_modes},
        "model_correlations": {
            mode: result.model_correlations(mode) for mode in config.judge_modes
        },
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
    "Match",
    "Result",
    "bootstrap_seed",
    "choose_traits",
    "cross_run_correlations",
    "draw_matches",
    "gather_tables",
    "judge_report",
    "load_eval_prompts",
    "load_traits",
    "models_to_measure",
    "outcomes",
    "run",
]
