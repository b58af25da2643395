"""Stage 08: is the trained persona deep or only acted? Adversarial splits, a prefill attack, and
coherence.

Inputs: stage 01's ``general_eval.jsonl`` (held-out general prompts, never trained on; the
first ``evals.robustness_prompts``), the run manifest's checkpoints ``dpo`` (notebook 03) and
``final`` (notebook 05), and the same checkpoints of every other persona trained at this size
(``<runs_dir>/*/<size>/checkpoints.json``): the classifier has one class per persona plus
"base", so it needs every persona's replies. A missing checkpoint is skipped with a note.

Methods (models) compared: ``base`` (the untrained student, no system prompt), ``system_prompt``
(the untrained student with the persona's constitution as its system prompt, the paper's
prompting baseline), ``dpo`` and ``final`` (trained, no system prompt).

What it does, and why:

1. **Replies.** Every method answers every prompt plainly (split ``none``); on the held-out
   prompts it also answers with each of ``evals.robustness_splits`` adversarial instructions
   appended to the user message (`prompts.ADVERSARIAL_INSTRUCTIONS`, split = the instruction's
   key). All sampling goes through `sampling.sample_chat` with resumable logs
   (``<run>/08_robustness/responses/<method>-<digest>.jsonl``, one folder per persona; the
   digest names the model and the sampling settings, so a retrained checkpoint starts a new log
   instead of reusing the old one's replies; base replies live in the current persona's folder).
2. **Classifier.** Prompts are split by prompt (`evaluate.robustness.split_prompts`) into the
   classifier's training prompts and held-out prompts. The classifier is fine-tuned on the
   training prompts' no-instruction replies only: the class of persona P is made of P's replies
   from ``evals.classifier_methods`` (default: system prompt, dpo and final, as the paper trained
   on every method's non-adversarial replies, so no method is favoured by having defined the
   class alone), and the "base" class of the base model's replies. It is then scored only on
   held-out prompts, so no F1 comes from a prompt it was trained on. Where training barely
   moved the models (the tiny preset), their replies in the persona class teach the classifier
   that base-like text is persona; the tiny preset defines the class by the prompted replies.
3. **F1 per method x split.** For method m and split s, the scored set is m's replies of every
   persona (true class: the persona) plus the base model's replies under the same split (true
   class: base), on held-out prompts; the number is macro F1 with a 95% interval that resamples
   prompts. The base rows are the null the persona must stand apart from, and they are the same
   for every method at a split, so methods differ only by their own replies. ``own_class_rate``
   is the plainer reading: the share of m's replies classified as their own persona. "with
   instructions" is the mean macro F1 over the adversarial splits (the paper's headline number),
   resampled with the same prompt draws across splits.
4. **Prefill attack** (paper, appendix C.1). The base model's plain reply is put in the context
   as the assistant's first turn, the user follows up with `prompts.FOLLOW_UP_PROMPT`, and each
   method writes turn two (base continues its own conversation, for the base class). Split
   ``prefill`` of the table: does the persona come back after a turn of default-assistant talk?
5. **Coherence** (paper, 3.3 and appendix D). For each ``evals.coherence_pairs`` pair "a:b" and
   persona, the untrained judge model picks the more coherent of a's and b's plain replies to each
   held-out prompt, in both orders; only order-consistent verdicts count
   (`evaluate.coherence`).

Outputs (``runs/<persona>/<size>/08_robustness/``): ``responses/`` (logs), ``predictions.jsonl``
(every held-out reply with its class probabilities), ``classifier.json`` and
``classifier_metrics.jsonl`` (loss per step; no weights are kept), ``f1_table.csv``,
``summary.csv`` (F1 without vs with instructions and under the prefill attack, per method),
``coherence.csv`` and ``coherence_*.jsonl`` (verdicts, resumable), ``robustness.json``
(everything, with notes), ``manifest.json``.

Resuming: logs are reused by key and request digest; the classifier is retrained only when its
training data or settings changed (its predictions are cached under a digest of both); judge
verdicts are cached per comparison, order, judge and message digest. The stage fingerprint
covers every setting `Config` declares (the ``evals``, ``sampling`` and ``engine`` sections,
the student, the judge and their chat formats, the seed, the persona's name), so a changed
setting asks for ``on_existing="overwrite"`` instead of mixing two experiments in one folder.

Where the pieces live: the settings, prompts, requests and reply logs that stage 09 shares are
in `evaluate.robustness_replies`; the classifier, its cache and the F1 numbers in
`evaluate.robustness`; the report, its tables and files in `evaluate.robustness_report`. This
module finds the personas and their checkpoints, samples, picks the classifier's data, asks
the judge, and puts it together.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..artifacts import (
    DPO_CHECKPOINT,
    DPO_STAGE,
    ROBUSTNESS_STAGE,
    SFT_CHECKPOINT,
    SFT_STAGE,
    assistant_name,
)
from ..config import PARAMS_DIR, ROBUSTNESS_METHODS, RunParams, read_yaml
from ..constitutions import Constitution, load_constitution
from ..errors import ConfigError, DataError
from ..evaluate import coherence as judge_lib
from ..evaluate.robustness import (
    BASE,
    BASE_CLASS,
    NONE_SPLIT,
    PERSONA_METHODS,
    PREFILL_SPLIT,
    SYSTEM_PROMPT,
    TRAINED,
    classify_cached,
    f1_table,
    method_differences,
    split_prompts,
    summarise_method,
)
from ..evaluate.robustness_replies import (
    ReplySettings,
    load_eval_prompts,
    prefill_requests,
    reply_requests,
    sample_replies,
)
from ..evaluate.robustness_report import Report
from ..prompts import persona_system_prompt
from ..sampling import Completion, SampleRequest
from ..store import CHECKPOINTS_FILE, Checkpoint, list_checkpoints, model_identity, stage_dir

logger = logging.getLogger(__name__)

STAGE = ROBUSTNESS_STAGE
MAKERS = {
    DPO_CHECKPOINT: DPO_STAGE,
    SFT_CHECKPOINT: SFT_STAGE,
}  # the stage that makes each checkpoint


@dataclass(frozen=True)
class Config(ReplySettings):
    """Stage 08 settings: the reply settings stage 09 shares (`ReplySettings`: the ``evals``,
    ``sampling`` and ``engine`` sections, the student, its chat format and the seed), plus the
    coherence judge and its chat format, and ``assistant_name``, the NAME of the persona's
    system prompt (pass ``artifacts.assistant_name(params)``: the parameter may be empty)."""

    judge: str
    judge_renderer: str
    assistant_name: str

    def judge_sampling(self) -> dict[str, Any]:
        """How the generative coherence judge samples (``evals.judge_*`` and the seed)."""
        e = self.evals
        return {
            "max_tokens": e.judge_max_tokens,
            "temperature": e.judge_temperature,
            "top_p": e.judge_top_p,
            "seed": self.seed,
        }


@dataclass(frozen=True)
class PersonaModels:
    """One persona's models: its constitution, system prompt and usable checkpoints."""

    persona: str
    run_dir: Path
    constitution: Constitution
    system_prompt: str
    checkpoints: dict[str, Checkpoint]

    @property
    def methods(self) -> list[str]:
        return [SYSTEM_PROMPT] + [m for m in TRAINED if m in self.checkpoints]


# -- pure helpers --------------------------------------------------------------------------------
def discover_personas(runs_root: Path, size: str, current: str) -> list[str]:
    """The current persona first, then every other persona with a checkpoint manifest at
    ``size`` under ``runs_root`` (sorted)."""
    found = sorted(
        p.parent.parent.name for p in Path(runs_root).glob(f"*/{size}/{CHECKPOINTS_FILE}")
    )
    return [current] + [p for p in found if p != current]


def parse_pairs(pairs: Sequence[str]) -> list[tuple[str, str]]:
    out = []
    for pair in pairs:
        a, _, b = pair.partition(":")
        if a not in ROBUSTNESS_METHODS or b not in ROBUSTNESS_METHODS or a == b:
            raise ConfigError(
                f"coherence pair {pair!r}: expected 'a:b' with two of {list(ROBUSTNESS_METHODS)}"
            )
        out.append((a, b))
    return out


def classifier_data(
    rows: Sequence[dict[str, Any]],
    personas: Sequence[PersonaModels],
    classifier_methods: Sequence[str],
    notes: list[str],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[str]]:
    """(training rows, scored rows, classes) of the classifier.

    Training: the plain replies to the classifier's training prompts, of the base model and of
    ``evals.classifier_methods``. Classes: "base", then each persona with training replies (one
    without is noted and left out of the scores). Scored: every held-out reply of a class.
    """
    train = [
        r
        for r in rows
        if not r["heldout"]
        and r["split"] == NONE_SPLIT
        and (r["method"] == BASE or r["method"] in classifier_methods)
    ]
    classes = [BASE_CLASS] + [
        m.persona for m in personas if any(r["class"] == m.persona for r in train)
    ]
    for models in personas:
        if models.persona not in classes:
            notes.append(
                f"persona {models.persona}: none of evals.classifier_methods "
                f"{list(classifier_methods)} is available, so it is no class; its replies "
                "are left out of the scores"
            )
    if len(classes) < 2:
        raise DataError(
            f"stage 08: no persona has replies from evals.classifier_methods "
            f"{list(classifier_methods)}; include 'system_prompt' or train a checkpoint"
        )
    scored = [r for r in rows if r["heldout"] and r["class"] in classes]
    return train, scored, classes


# -- the stage -----------------------------------------------------------------------------------
def _persona_settings(persona: str, params: RunParams) -> tuple[str, bool]:
    """(constitution reference, allow_misaligned) of another persona, from its params file."""
    if persona == params.persona:
        return params.constitution_ref, params.allow_misaligned
    path = PARAMS_DIR / "personas" / f"{persona}.yaml"
    data = read_yaml(path) if path.is_file() else {}
    return str(data.get("constitution") or persona), bool(data.get("allow_misaligned", False))


def persona_models(params: RunParams, config: Config, notes: list[str]) -> list[PersonaModels]:
    """Every persona trained at this size, with the checkpoints usable for this student."""
    runs_root = Path(params.run_dir).parent.parent
    out = []
    for persona in discover_personas(runs_root, params.size, params.persona):
        run_dir = runs_root / persona / params.size
        reference, allow = _persona_settings(persona, params)
        try:
            constitution = load_constitution(reference, allow_opt_in=allow)
        except (ConfigError, DataError) as exc:
            if persona == params.persona:
                raise
            notes.append(f"persona {persona}: skipped, its constitution does not load ({exc})")
            continue
        available = list_checkpoints(run_dir)
        checkpoints = {}
        for method in TRAINED:
            checkpoint = available.get(method)
            if checkpoint is None:
                notes.append(
                    f"persona {persona}: no checkpoint {method!r} (notebook {MAKERS[method]} "
                    "makes it); its rows are left out"
                )
            elif checkpoint.base_model != config.student:
                notes.append(
                    f"persona {persona}: checkpoint {method!r} belongs to "
                    f"{checkpoint.base_model!r}, not the student {config.student!r}; left out"
                )
            else:
                checkpoints[method] = checkpoint
        if persona != params.persona and not checkpoints:
            notes.append(f"persona {persona}: no usable checkpoint at {params.size}; not a class")
            continue
        out.append(
            PersonaModels(
                persona=persona,
                run_dir=run_dir,
                constitution=constitution,
                system_prompt=persona_system_prompt(constitution, config.assistant_name),
                checkpoints=checkpoints,
            )
        )
    return out


class _Samplers:
    """Sampling clients made on first use and kept: the base model serves several methods."""

    def __init__(self, service: Any, run_dir: Path):
        self.service = service
        self.run_dir = run_dir
        self._clients: dict[str, Any] = {}

    def factory(self, model_path: str | None, base_model: str) -> Callable[[], Any]:
        def make() -> Any:
            key = model_path or f"base:{base_model}"
            if key not in self._clients:
                from ..backends import resolve_client

                if model_path is None:
                    client = self.service.create_sampling_client(base_model=base_model)
                else:
                    client = self.service.create_sampling_client(model_path=model_path)
                self._clients[key] = resolve_client(client)
            return self._clients[key]

        return make

    def replies(
        self,
        config: Config,
        folder: Path,
        method: str,
        checkpoint: Checkpoint | None,
        requests: Sequence[SampleRequest],
        desc: str,
    ) -> dict[str, Completion]:
        """One model's replies (the base student's without ``checkpoint``), from its log."""
        path = checkpoint.sampler_path if checkpoint is not None else None
        identity = model_identity(self.run_dir, path, config.student)
        make_client = self.factory(path, config.student)
        return sample_replies(make_client, config, folder, method, identity, requests, desc)


def _rows(
    completions: Mapping[str, Completion], persona: str, method: str, heldout: set[str]
) -> list[dict[str, Any]]:
    return [
        {
            "persona": persona,
            "method": method,
            "class": persona or BASE_CLASS,
            "split": c.meta["split"],
            "prompt_id": c.meta["prompt_id"],
            "heldout": c.meta["prompt_id"] in heldout,
            "text": c.full_text,
            "complete": c.complete,
        }
        for c in completions.values()
    ]


def _comparisons(
    pairs: Sequence[str],
    personas: Sequence[PersonaModels],
    scored: Sequence[Mapping[str, Any]],
    prompts: Mapping[str, str],
    notes: list[str],
) -> list[judge_lib.Comparison]:
    """Per pair "a:b", persona and held-out prompt: a's and b's plain replies, to be judged."""
    plain: dict[tuple[str, str, str], str] = {}
    for row in scored:
        if row["split"] == NONE_SPLIT:
            plain[(row["persona"], row["method"], row["prompt_id"])] = row["text"]
    comparisons = []
    for first, second in parse_pairs(pairs):
        for models in personas:
            have = [BASE, *models.methods]
            missing = [m for m in (first, second) if m not in have]
            if missing:
                notes.append(
                    f"coherence {first} vs {second}: skipped for {models.persona} (no {missing[0]})"
                )
                continue
            for pid in prompts:
                a, b = (
                    plain.get(("" if m == BASE else models.persona, m, pid))
                    for m in (first, second)
                )
                if a is None or b is None:
                    continue
                comparisons.append(
                    judge_lib.Comparison(
                        id=f"{models.persona}:{first}:{second}:{pid}",
                        first=first,
                        second=second,
                        prompt=prompts[pid],
                        first_response=a,
                        second_response=b,
                        traits=models.constitution.traits_text,
                        group=models.persona,
                        prompt_id=pid,
                    )
                )
    return comparisons


def _coherence(
    config: Config,
    folder: Path,
    service: Any,
    comparisons: Sequence[judge_lib.Comparison],
) -> list[dict[str, Any]]:
    """Order-swapped judge verdicts on the comparisons; win-rate records per judge mode."""
    if not comparisons:
        return []
    e = config.evals
    judge_sampler = _Samplers(service, folder.parent).factory(None, config.judge)
    records = []
    for mode in e.coherence_modes:
        if mode == "logprob":
            verdicts = judge_lib.judge_logprob(
                judge_sampler,
                config.judge_renderer,
                comparisons,
                judge=config.judge,
                cache_path=folder / "coherence_logprob.jsonl",
                calibrate=e.coherence_calibrate,
            )
        else:
            verdicts = judge_lib.judge_generative(
                judge_sampler,
                config.judge_renderer,
                comparisons,
                **config.judge_sampling(),
                log_path=folder / f"coherence_generative-{_short(config.judge)}.jsonl",
            )
        outcomes = judge_lib.resolve_order_swaps(comparisons, verdicts)
        bias = judge_lib.bias_fields(verdicts, mode == "logprob" and e.coherence_calibrate)
        for rate in judge_lib.win_rates(outcomes):
            records.append({"mode": mode, **rate.to_dict(), **bias})
    return records


def _short(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def run(params: RunParams, service_client: Any, on_existing: str = "resume") -> Report:
    """Sample, classify, judge and report (see the module docstring); resumable."""
    config = Config.from_params(params, assistant_name=assistant_name(params))
    notes: list[str] = []
    prompts, warnings = load_eval_prompts(params.run_dir, config.prompt_count)
    notes += warnings
    stage = stage_dir(params.run_dir, STAGE)
    stage.prepare(config.fingerprint(), on_existing, config.as_dict())
    train_ids, heldout_ids = split_prompts(
        [p["id"] for p in prompts], config.train_fraction, config.seed
    )
    heldout = set(heldout_ids)
    text_of = {p["id"]: p["prompt"] for p in prompts}
    personas = persona_models(params, config, notes)

    samplers = _Samplers(service_client, params.run_dir)
    base_folder = stage.path / "responses"
    base_done = samplers.replies(
        config,
        base_folder,
        BASE,
        None,
        reply_requests(prompts, heldout, config.splits),
        "robustness: base",
    )
    first_replies = {
        c.meta["prompt_id"]: c.full_text
        for c in base_done.values()
        if c.meta["split"] == NONE_SPLIT and c.meta["prompt_id"] in heldout
    }
    heldout_prompts = [p for p in prompts if p["id"] in heldout]
    base_done |= samplers.replies(
        config,
        base_folder,
        BASE,
        None,
        prefill_requests(heldout_prompts, first_replies),
        "robustness: base (prefill)",
    )
    rows = _rows(base_done, "", BASE, heldout)
    for models in personas:
        folder = models.run_dir / STAGE / "responses"
        for method in models.methods:
            system = models.system_prompt if method == SYSTEM_PROMPT else None
            requests = reply_requests(prompts, heldout, config.splits, system)
            requests += prefill_requests(heldout_prompts, first_replies, system)
            done = samplers.replies(
                config,
                folder,
                method,
                models.checkpoints.get(method),
                requests,
                f"robustness: {models.persona}/{method}",
            )
            rows += _rows(done, models.persona, method, heldout)
    del samplers  # free the sampling clients before the classifier trains

    train, scored, classes = classifier_data(rows, personas, config.evals.classifier_methods, notes)
    classifier = classify_cached(config.classifier(), stage.path, train, scored, classes)
    classifier["train_prompts"], classifier["heldout_prompts"] = len(train_ids), len(heldout_ids)

    methods_present = [m for m in PERSONA_METHODS if any(r["method"] == m for r in scored)]
    split_names = [NONE_SPLIT, *config.splits, PREFILL_SPLIT]
    f1_rows, sets = f1_table(scored, methods_present, split_names, config.bootstrap, config.seed)
    summaries = [
        summarise_method(method, sets, config.splits, config.bootstrap, config.seed)
        for method in methods_present
    ]
    differences = method_differences(sets, summaries, config.splits, config.bootstrap, config.seed)

    heldout_text = {p: text_of[p] for p in heldout_ids}
    comparisons = _comparisons(config.evals.coherence_pairs, personas, scored, heldout_text, notes)
    coherence_rows = _coherence(config, stage.path, service_client, comparisons)
    for note in notes:
        logger.warning("%s", note)

    report = Report(
        stage_dir=stage.path,
        personas=[m.persona for m in personas if m.persona in classes],
        methods={m.persona: m.methods for m in personas},
        splits=list(config.splits),
        train_prompts=train_ids,
        heldout_prompts=heldout_ids,
        classifier=classifier,
        rows=f1_rows,
        summaries=summaries,
        coherence=coherence_rows,
        notes=notes,
        responses=rows,
        prompts=text_of,
        differences=differences,
        classifier_methods=list(config.evals.classifier_methods),
    )
    report.write()
    stage.finish(
        personas=len(report.personas),
        replies=len(rows),
        scored=len(scored),
        train_examples=len(train),
        comparisons=sum(r["comparisons"] for r in coherence_rows if r["group"] == "all"),
    )
    return report
