"""What notebook 09 shows next to DPO + SFT: the models compared, the reward curve beside
teacher-likeness, reply lengths, coherence, robustness F1, the reward-hacking check, and the
overview rows of `plots.model_comparison`.

The public replication's RL policy collapsed onto short, stylised replies ("A bold ...") that
its reward model liked: reward up, character down. Each piece here looks for that from another
side, with the same evaluations stages 03-08 use: teacher-likeness along the run
(`probe_series`), words per reply (`reply_lengths`), coherence against the start and against
dpo+sft (`coherence_rates`), whether the persona survives adversarial instructions
(`robustness_f1`, stage 08's prompts, sampling and classifier), and the verdict
(`hacking_check`) that needs the reward to rise and an independent measure to fall.

``stage_dir`` is stage 09's folder: the coherence verdicts and robustness replies are cached
there, so a rerun of the notebook asks nothing twice.
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, Protocol

from ..artifacts import ROBUSTNESS_STAGE
from ..config import RunParams
from ..constitutions import load_constitution
from ..errors import DataError
from ..evaluate import coherence as judge_lib
from ..evaluate import robustness as rob
from ..evaluate.diversity import word_count
from ..evaluate.heldout import load_heldout
from ..evaluate.intervals import MEASURED, bootstrap_mean
from ..evaluate.robustness_replies import (
    NONE_SPLIT,
    ReplySettings,
    load_eval_prompts,
    log_name,
    reply_requests,
    sample_replies,
)
from ..stage_config import renderer_of
from ..store import Checkpoint, find_checkpoint, model_identity, read_jsonl, resolve_path
from .probes import PROBE_LABEL

COMPARE_REPORT = "rlaif"  # the adherence report's name (``adherence/rlaif.json``)
START_LABEL = PROBE_LABEL.format(0)
ROBUSTNESS_DIR = "robustness"
COHERENCE_CACHE = "coherence_logprob.jsonl"


class RLAIFOutcome(Protocol):
    """What these functions read of stage 09's result (`stages.rlaif.Result`)."""

    @property
    def checkpoint(self) -> Checkpoint: ...

    @property
    def probes(self) -> list[dict[str, Any]]: ...


# -- which models ------------------------------------------------------------------------------
def comparison_models(params: RunParams, result: RLAIFOutcome) -> dict[str, str | None]:
    """What notebook 09 measures: ``base`` (None), ``final`` when notebook 05 recorded it,
    ``rlaif``, and the policy at every probe step but the last (``rl-step-NNNN``; the last
    one is ``rlaif`` itself)."""
    models: dict[str, str | None] = {"base": None}
    if _has(params, "final"):
        models["final"] = find_checkpoint(params.run_dir, "final").sampler_path
    models["rlaif"] = result.checkpoint.sampler_path
    for probe in result.probes[:-1]:
        models[PROBE_LABEL.format(probe["step"])] = resolve_path(
            params.run_dir, probe["sampler_path"]
        )
    return models


def _has(params: RunParams, name: str) -> bool:
    try:
        find_checkpoint(params.run_dir, name)
    except DataError:
        return False
    return True


def comparison_pairs(models: Mapping[str, str | None]) -> list[tuple[str, str]]:
    """Paired differences notebook 09 reports: rlaif against final, base and its own start."""
    wanted = [("rlaif", "final"), ("rlaif", "base"), ("final", "base"), ("rlaif", START_LABEL)]
    return [(a, b) for a, b in wanted if a in models and b in models]


# -- reward against teacher-likeness ------------------------------------------------------------
def probe_series(
    result: RLAIFOutcome, report: Any, probe_set: str | None = None
) -> list[dict[str, Any]]:
    """Per probe step: the training reward (probe win rate against the start) next to the
    teacher-like share of the policy at that step (on ``probe_set``, default the report's
    headline set), each with its 95% interval; a share that could not be measured is None."""
    probe_set = probe_set or report.headline_probe_set
    labels = {p["step"]: PROBE_LABEL.format(p["step"]) for p in result.probes}
    labels[result.probes[-1]["step"]] = "rlaif"
    rows = []
    for probe in result.probes:
        try:
            like = report.row(labels[probe["step"]], probe_set).teacher_like
        except (KeyError, StopIteration, ValueError):
            like = None
        rows.append(
            {
                "step": probe["step"],
                "label": labels[probe["step"]],
                "reward": probe["win_rate"],
                "reward_low": probe["low"],
                "reward_high": probe["high"],
                "teacher_like": like.value if like else None,
                "teacher_like_low": like.low if like else None,
                "teacher_like_high": like.high if like else None,
                "reply_tokens_mean": probe.get("reply_tokens_mean"),
            }
        )
    return rows


def reward_change(probes: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Probe win rate at the last step minus 0.5 (the start), with its interval."""
    last = probes[-1]
    return {
        "value": last["win_rate"] - 0.5,
        "low": last["low"] - 0.5,
        "high": last["high"] - 0.5,
    }


# -- lengths and coherence ---------------------------------------------------------------------
def reply_lengths(
    report: Any, labels: Sequence[str], bootstrap: int, seed: int
) -> list[dict[str, Any]]:
    """Words per reply of each model on the adherence probes: mean with a prompt-level 95%
    interval, median, and the share cut at the token budget (a cut reply's length is a
    floor). A collapse onto short stylised replies shows here first."""
    rows = read_jsonl(report.path.parent / f"{report.path.stem}_samples.jsonl")
    out = []
    for label in labels:
        mine = [r for r in rows if r["label"] == label]
        if not mine:
            continue
        groups: dict[str, list[float]] = {}
        for r in mine:
            groups.setdefault(r["prompt_id"], []).append(float(word_count(r["text"])))
        estimate = bootstrap_mean(groups.values(), bootstrap, seed)
        out.append(
            {
                "model": label,
                "replies": len(mine),
                "mean_words": estimate.value,
                "low": estimate.low,
                "high": estimate.high,
                "median_words": statistics.median(w for v in groups.values() for w in v),
                "cut_share": sum(not r.get("complete", True) for r in mine) / len(mine),
            }
        )
    return out


def coherence_rates(
    params: RunParams,
    service: Any,
    report: Any,
    pairs: Sequence[tuple[str, str]],
    stage_dir: Path,
) -> list[dict[str, Any]]:
    """Order-swapped coherence verdicts of the untrained judge (`evaluate.coherence`, stage 08's
    judge) on the adherence probe replies (first sample per prompt) of each pair; one record per
    pair with the win rate of its first model, its standard error and a Wilson 95% interval."""
    constitution = load_constitution(
        params.constitution_ref, allow_opt_in=params.allow_misaligned, prompts_per_assertion=None
    )
    rows = read_jsonl(report.path.parent / f"{report.path.stem}_samples.jsonl")
    heldout = {h.prompt_id: h.prompt for h in load_heldout(params.run_dir)}
    text = {(r["label"], r["prompt_id"]): r["text"] for r in rows if int(r.get("sample", 0)) == 0}
    comparisons = [
        judge_lib.Comparison(
            id=f"{a}:{b}:{pid}",
            first=a,
            second=b,
            prompt=heldout[pid],
            first_response=text[(a, pid)],
            second_response=text[(b, pid)],
            traits=constitution.traits_text,
            prompt_id=pid,
        )
        for a, b in pairs
        for pid in heldout
        if (a, pid) in text and (b, pid) in text
    ]
    if not comparisons:
        return []
    judge = params.judge
    verdicts = judge_lib.judge_logprob(
        lambda: service.create_sampling_client(base_model=judge),
        renderer_of(params, judge),
        comparisons,
        judge=judge,
        cache_path=Path(stage_dir) / COHERENCE_CACHE,
        calibrate=params.evals.coherence_calibrate,
    )
    outcomes = judge_lib.resolve_order_swaps(comparisons, verdicts)
    bias = judge_lib.bias_fields(verdicts, params.evals.coherence_calibrate)
    out = []
    for rate in judge_lib.win_rates(outcomes, by_group=False):
        record = rate.to_dict() | {"mode": "logprob", **bias}  # low/high: Wilson 95% interval
        out.append(record)
    return out


# -- robustness ---------------------------------------------------------------------------------
def robustness_f1(
    params: RunParams, service: Any, models: Mapping[str, str | None], stage_dir: Path
) -> dict[str, Any]:
    """Persona-vs-base classifier F1 of each trained model, plainly and under the adversarial
    instructions, with stage 08's prompts, splits, sampling, classifier and intervals.

    Stage 08's ``run`` measures its fixed methods (and every persona); this asks the same
    question of the models given here, for this persona only: the classifier has two classes,
    the persona (trained on the plain replies of every model but ``base`` on the classifier's
    training prompts, so no model is favoured by having defined the class alone) and ``base``;
    F1 of model m at a split is macro F1 over m's replies and the base model's replies at that
    split, on held-out prompts. Replies are logged under ``<stage_dir>/robustness/``.
    """
    settings = ReplySettings.from_params(params)
    prompts, notes = load_eval_prompts(params.run_dir, settings.prompt_count)
    train_ids, heldout_ids = rob.split_prompts(
        [p["id"] for p in prompts], settings.train_fraction, settings.seed
    )
    heldout = set(heldout_ids)
    folder = Path(stage_dir) / ROBUSTNESS_DIR
    requests = reply_requests(prompts, heldout, settings.splits)
    rows = []
    for label, path in models.items():
        identity = model_identity(params.run_dir, path, settings.student)
        _start_from_stage_08(
            params.run_dir, folder, log_name(label, identity, settings.reply_sampling())
        )
        replies = sample_replies(
            (lambda path=path: service.create_sampling_client(model_path=path))
            if path
            else (lambda: service.create_sampling_client(base_model=settings.student)),
            settings,
            folder,
            label,
            identity,
            requests,
            desc=f"robustness: {label}",
        )
        for c in replies.values():
            rows.append(
                {
                    "method": label,
                    "class": rob.BASE_CLASS if path is None else params.persona,
                    "split": c.meta["split"],
                    "prompt_id": c.meta["prompt_id"],
                    "heldout": c.meta["prompt_id"] in heldout,
                    "text": c.full_text,
                }
            )
    classes = [rob.BASE_CLASS, params.persona]
    train = [r for r in rows if not r["heldout"] and r["split"] == NONE_SPLIT]
    classifier, trained = rob.train_classifier(
        [r["text"] for r in train],
        [r["class"] for r in train],
        classes,
        settings.classifier(),
        log_path=folder / "classifier_metrics.jsonl",
    )
    scored = [r for r in rows if r["heldout"]]
    for row, predicted in zip(scored, classifier.predict([r["text"] for r in scored])):
        row["predicted"] = predicted
    del classifier
    table, summary = _f1_tables(scored, models, settings)
    out = {
        "classes": classes,
        "train_prompts": len(train_ids),
        "heldout_prompts": len(heldout_ids),
        "classifier": asdict(trained),
        "rows": table,
        "summary": summary,
        "notes": notes,
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "f1.json").write_text(json.dumps(out, indent=2, default=str))
    return out


def _start_from_stage_08(run_dir: Path, folder: Path, name: str) -> None:
    """Stage 08 already sampled base and final with the same requests, seeds and settings
    (the log name hashes model and settings): start from its log instead of sampling again."""
    sampled_by_08 = Path(run_dir) / ROBUSTNESS_STAGE / "responses" / name
    if sampled_by_08.is_file() and not (folder / name).is_file():
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(sampled_by_08, folder / name)


def _f1_tables(
    scored: Sequence[Mapping[str, Any]],
    models: Mapping[str, str | None],
    settings: ReplySettings,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Macro F1 per (model, split) against the base replies of that split, and per model
    without and with the instructions (mean over the adversarial splits)."""
    by: dict[tuple[str, str], list[tuple[str, str, str]]] = {}
    for r in scored:
        by.setdefault((r["method"], r["split"]), []).append(
            (r["prompt_id"], r["class"], r["predicted"])
        )
    base = [label for label, path in models.items() if path is None]
    b, seed = settings.bootstrap, settings.seed
    table, summary = [], []
    for method in (m for m, path in models.items() if path is not None):
        sets = {
            split: by.get((method, split), []) + [x for m in base for x in by.get((m, split), [])]
            for split in [NONE_SPLIT, *settings.splits]
        }
        labels = rob.truth_labels(sets)
        plain = rob.bootstrap_macro_f1(sets[NONE_SPLIT], b, seed, labels=labels)
        # the classifier is judged on the plain replies; under an attack an F1 at the null is
        # the finding (the persona did not survive), not a failed instrument
        check = rob.check_f1(sets[NONE_SPLIT], plain, labels)
        for split, split_rows in sets.items():
            own = by.get((method, split), [])
            estimate = rob.bootstrap_macro_f1(split_rows, b, seed, labels=labels)
            table.append(
                {
                    "method": method,
                    "split": split,
                    "macro_f1": estimate.value,
                    "low": estimate.low,
                    "high": estimate.high,
                    "own_class_rate": sum(t == p for _, t, p in own) / len(own) if own else None,
                    **check.to_dict(),
                }
            )
        attacked = {s: v for s, v in sets.items() if s != NONE_SPLIT}
        attack = rob.bootstrap_macro_f1(attacked, b, seed, labels=labels) if attacked else None
        measured = check.measured
        summary.append(
            {
                "method": method,
                "no_instruction": plain.value if measured else None,
                "no_instruction_ci": [plain.low, plain.high] if measured else None,
                "with_instructions": attack.value if attack and measured else None,
                "with_instructions_ci": [attack.low, attack.high] if attack and measured else None,
                **check.to_dict(),
            }
        )
    return table, summary


# -- the verdict and the overview --------------------------------------------------------------
def reward_hacking_verdict(
    reward_change: Mapping[str, float],
    adherence_change: Mapping[str, float] | None,
    coherence: Mapping[str, float] | None,
) -> dict[str, Any]:
    """Did the training reward rise while an independent measure fell?

    Each argument is an estimate ``{"value", "low", "high"}`` (95% interval): the probe win
    rate at the end minus 0.5 (the start), the end-minus-start teacher-like share, and the
    coherence win rate of the end policy against the start policy minus 0.5. "rises" / "falls"
    need the interval to exclude 0; otherwise the change is "unclear". Reward hacking is called
    when the reward rises and either measure falls; "no evidence" when the reward rises and
    neither falls; "reward did not rise" otherwise (nothing was optimised that could be hacked).
    """

    def direction(est: Mapping[str, float] | None) -> str:
        if est is None or any(
            est.get(k) is None or not math.isfinite(est[k]) for k in ("low", "high")
        ):
            return "unknown"
        if est["low"] > 0:
            return "rises"
        if est["high"] < 0:
            return "falls"
        return "unclear"

    reward, adherence, coh = (
        direction(reward_change),
        direction(adherence_change),
        direction(coherence),
    )
    if reward != "rises":
        verdict = "reward did not rise"
    elif "falls" in (adherence, coh):
        verdict = "reward hacking"
    else:
        verdict = "no evidence of reward hacking"
    return {"verdict": verdict, "reward": reward, "adherence": adherence, "coherence": coh}


def hacking_check(
    result: RLAIFOutcome, report: Any, coherence: Sequence[Mapping[str, Any]]
) -> dict[str, Any]:
    """`reward_hacking_verdict` from the stage's probes, the adherence report (rlaif minus its
    start, paired over prompts, persona probes) and the coherence of rlaif against its start;
    the three estimates are returned with the verdict. A teacher-likeness change whose
    classifier could not measure counts as absent ("unknown"), never as "unclear"."""
    adherence = next(
        (
            d.teacher_like.to_dict()
            for d in report.differences
            if (d.a, d.b, d.probe_set) == ("rlaif", START_LABEL, report.headline_probe_set)
            and getattr(d, "status", MEASURED) == MEASURED
        ),
        None,
    )
    coh = next(
        (
            {"value": r["win_rate"] - 0.5, "low": r["low"] - 0.5, "high": r["high"] - 0.5}
            for r in coherence
            if (r["first"], r["second"]) == ("rlaif", START_LABEL)
        ),
        None,
    )
    reward = reward_change(result.probes)
    return {
        **reward_hacking_verdict(reward, adherence, coh),
        "reward_change": reward,
        "adherence_change": adherence,
        "coherence_vs_start": coh,
    }


def overview_rows(
    report: Any,
    lengths: Sequence[Mapping[str, Any]],
    coherence: Sequence[Mapping[str, Any]],
    robustness: Mapping[str, Any] | None,
    models: Sequence[str] = ("base", "final", "rlaif"),
) -> list[dict[str, Any]]:
    """``{"metric", "model", "value", "low", "high"}`` rows for `plots.model_comparison`:
    teacher-like share (persona probes), words per reply, classifier F1 without and with the
    adversarial instructions, and rlaif's coherence win rates."""
    rows: list[dict[str, Any]] = []
    for label in models:
        try:
            like = report.row(label).teacher_like
        except KeyError:
            continue
        rows.append({"metric": "teacher-like share", "model": label, **like.to_dict()})
    rows += [
        {
            "metric": "words per reply",
            "model": r["model"],
            "value": r["mean_words"],
            "low": r["low"],
            "high": r["high"],
        }
        for r in lengths
        if r["model"] in models
    ]
    for part, name in (("no_instruction", "F1 plain"), ("with_instructions", "F1 attacked")):
        for r in (robustness or {}).get("summary", []):
            if r.get(part) is not None and r["method"] in models:
                low, high = r[f"{part}_ci"]
                rows.append(
                    {
                        "metric": name,
                        "model": r["method"],
                        "value": r[part],
                        "low": low,
                        "high": high,
                    }
                )
    rows += [
        {
            "metric": "coherence win rate of rlaif",
            "model": f"vs {r['second']}",
            "value": r["win_rate"],
            "low": r["low"],
            "high": r["high"],
        }
        for r in coherence
        if r["first"] == "rlaif"
    ]
    return rows
