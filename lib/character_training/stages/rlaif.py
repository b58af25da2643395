"""Stage 09: RLAIF, the alternative to DPO + SFT that the public Tinker replication tried.

The replication trained a reward model on teacher-vs-student pairs, ran RL against it without
a KL penalty, and got a policy that collapsed onto short, stylised replies ("A bold ..."): the
reward model had learnt a style detector and RL found it. This stage runs the same experiment
with the knobs that replication lacked, so notebook 09 can compare it with DPO + SFT on the
same evaluations (`rl.compare`).

Inputs: ``02_distillation/pairs.jsonl`` (training prompts and chosen/rejected pairs) and
``02_distillation/heldout.jsonl`` (probe prompts, never trained on). Outputs
(``runs/<persona>/<size>/09_rlaif/``), one sub-folder per trainer, each with its own
fingerprint of the settings it uses (so changing an RL knob does not retrain the preference
model):

* ``sft_init/`` (``rl.init: sft``): the SFT start on the chosen replies (`rl.sft_start`),
  checkpoint "rlaif_sft_init";
* ``preference_model/`` (``rl.signal: preference_model``): ``data.jsonl``, ``dropped.jsonl``,
  ``metrics.jsonl``, checkpoint "rlaif_pm", a LoRA on the judge's base
  (`rl.preference_model_training`);
* ``accuracy.json``: held-out pairwise accuracy of the signals (the prompted judge always, the
  preference model when trained) per source, with prompt-level 95% intervals (`rl.signals`);
* ``rl/``: ``samples/step-NNNNNN.jsonl`` (the shared sampler's logs, exact tokens and
  log-probs), ``matchups.jsonl`` (every verdict, cached by key and signal), ``rollouts.jsonl``
  (per reply: text, tokens, win rate, advantage, KL), ``metrics.jsonl`` (per step),
  ``probes.jsonl`` + ``probe_samples.jsonl`` (win rate against the starting policy on held-out
  prompts, with the checkpoint of each probe step, `rl.probes`), ``reference.json``,
  ``progress.json``; checkpoint "rlaif". One RL step is described in `rl.loop`.

Logged per step: spread of win rates within groups and the share of decided matchups (the
*mean* win rate inside a group is 0.5 by construction, so it is not a reward curve), KL (mean
per reply token of ``logp_policy - logp_ref``), entropy proxy (mean ``-logp`` of the sampled
tokens), reply length (mean and median tokens, share cut at the budget), mean |advantage|,
learning rate, gradient norm, and the time of the rollout (``time/rollout``: sampling, judging,
both forwards) apart from that of the update (``time/step``). The reward curve is the probe.

All three trainers go through `training.run_training` and are resumable like stages 03 and 05:
``progress.json`` every ``rl.save_every`` steps; a restart reloads weights and optimiser, drops
later rows and redoes those steps. Logged samples and verdicts of redone steps are reused (same
keys, same seeds), so a resumed run ends where one uninterrupted run ends, within numerics. A
probe runs before its step's resume point is saved, so an interruption inside a probe redoes
it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..artifacts import RLAIF_STAGE, load_pairs
from ..config import AdherenceParams, EvalParams, RLParams, RunParams, SFTParams
from ..constitutions import load_constitution
from ..errors import ConfigError
from ..evaluate.heldout import load_heldout
from ..evaluate.preference_model import Comparator
from ..metrics import read_metrics
from ..rl.loop import train_rl, training_prompts
from ..rl.preference_model_training import pm_examples, train_preference_model
from ..rl.probes import PROBE_LABEL
from ..rl.sft_start import train_sft_start
from ..rl.signals import signal_accuracy, signal_comparator
from ..stage_config import StageConfig, section_setting
from ..store import Checkpoint, read_jsonl, resolve_path, stage_dir
from ..training import CheckpointTarget

logger = logging.getLogger(__name__)

STAGE = RLAIF_STAGE
SFT_INIT_DIR = "sft_init"
PM_DIR = "preference_model"
RL_DIR = "rl"
SIGNALS_DIR = "signals"
CHECKPOINT = "rlaif"
SFT_INIT_CHECKPOINT = "rlaif_sft_init"
PM_CHECKPOINT = "rlaif_pm"
ACCURACY_FILE = "accuracy.json"


@dataclass(frozen=True)
class Config(StageConfig):
    """Stage 09 settings: the ``rl`` section (see `config.RLParams`), the ``sft`` section (the
    SFT start's recipe), ``evals`` (``rl_steps``, ``rl_group_size``, ``rl_prompts_per_step``),
    ``adherence`` (its bootstrap sizes the probe intervals), the student and the judge with
    their chat formats, the LoRA rank and seed, and the digest of the pairs trained on.

    Each sub-folder fingerprints only what its trainer uses (``settings_used`` in
    `rl.sft_start`, `rl.preference_model_training` and `rl.loop`)."""

    rl: RLParams
    sft: SFTParams
    evals: EvalParams
    adherence: AdherenceParams
    student: str
    student_renderer: str
    judge: str
    judge_renderer: str
    lora_rank: int
    seed: int
    pairs_digest: str = ""

    def __post_init__(self) -> None:
        if self.group_size < 2:
            raise ConfigError(
                f"evals.rl_group_size={self.group_size}: expected >= 2 (a group needs two "
                "replies to compare)"
            )

    steps = section_setting("evals", "rl_steps")
    group_size = section_setting("evals", "rl_group_size")
    prompts_per_step = section_setting("evals", "rl_prompts_per_step")
    bootstrap = section_setting("adherence", "bootstrap")


@dataclass
class Result:
    """What the stage produced; ``probes`` and ``accuracy`` are plain records."""

    stage_dir: Path
    config: Config
    checkpoint: Checkpoint
    start: Checkpoint | None
    preference_model: Checkpoint | None
    accuracy: list[dict[str, Any]]
    probes: list[dict[str, Any]]
    counts: dict[str, Any] = field(default_factory=dict)

    @property
    def rl_dir(self) -> Path:
        return self.stage_dir / RL_DIR

    def metrics(self) -> list[dict[str, Any]]:
        return read_metrics(self.rl_dir / "metrics.jsonl")

    def rollouts(self) -> list[dict[str, Any]]:
        return read_jsonl(self.rl_dir / "rollouts.jsonl")

    def probe_models(self) -> dict[str, str]:
        """``{"rl-step-0000": sampler path, ...}``: the policy at every probe step."""
        return {
            PROBE_LABEL.format(p["step"]): resolve_path(self.stage_dir.parent, p["sampler_path"])
            for p in self.probes
        }


def pairs_digest(pairs: Sequence[Mapping[str, Any]]) -> str:
    blob = "\n".join(f"{p['id']}\t{p['prompt']}\t{p['chosen']}\t{p['rejected']}" for p in pairs)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def probe_prompts(run_dir: Path, n: int) -> list[dict[str, str]]:
    """The first ``n`` held-out prompts of stage 02 (never trained on), in file order."""
    heldout = load_heldout(run_dir)
    return [{"id": h.prompt_id, "prompt": h.prompt} for h in heldout[:n]]


def run(
    params: RunParams,
    service_client: Any,
    on_existing: str = "resume",
    comparator: Comparator | None = None,
) -> Result:
    """SFT start (optional), preference model (optional), then RL; records checkpoint "rlaif".

    ``comparator`` replaces the configured signal (tests: a plain function as the judge; the
    held-out accuracy table then covers it alone). Resumable (see the module docstring).
    """
    pairs = load_pairs(params.run_dir)
    config = Config.from_params(params, pairs_digest=pairs_digest(pairs))
    constitution = load_constitution(
        params.constitution_ref, allow_opt_in=params.allow_misaligned, prompts_per_assertion=None
    )
    prompts = training_prompts(pairs)
    probe_set = probe_prompts(params.run_dir, config.rl.probe_prompts)  # fails before training
    root = stage_dir(params.run_dir, STAGE)

    def target(checkpoint: str) -> CheckpointTarget:
        return CheckpointTarget(params.run_dir, STAGE, checkpoint)

    start = None
    if config.rl.init == "sft":
        start = train_sft_start(
            service_client,
            stage_dir(params.run_dir, f"{STAGE}/{SFT_INIT_DIR}"),
            config,
            pairs,
            target(SFT_INIT_CHECKPOINT),
            on_existing,
        )
    examples = pm_examples(config, pairs)
    preference_model: Checkpoint | None = None
    comparators: dict[str, Comparator] = {}
    if comparator is not None:
        signal: Comparator = comparator
        comparators["custom"] = comparator
    else:
        signal = signal_comparator(config, service_client, constitution, desc="judge")
        comparators["judge"] = signal
        if config.rl.signal == "preference_model":
            trained = train_preference_model(
                service_client,
                stage_dir(params.run_dir, f"{STAGE}/{PM_DIR}"),
                config,
                examples,
                constitution.description,
                target(PM_CHECKPOINT),
                on_existing,
            )
            preference_model = trained.checkpoint
            signal = signal_comparator(
                config, service_client, constitution, preference_model, params.run_dir, "pm"
            )
            comparators["preference_model"] = signal
    accuracy = signal_accuracy(
        comparators,
        examples,
        root.file(f"{SIGNALS_DIR}/cache.jsonl"),
        config.bootstrap,
        config.seed,
    )
    root.path.mkdir(parents=True, exist_ok=True)
    (root.path / ACCURACY_FILE).write_text(json.dumps(accuracy, indent=2))

    rl = train_rl(
        service_client,
        stage_dir(params.run_dir, f"{STAGE}/{RL_DIR}"),
        config,
        prompts=prompts,
        probe_prompts=probe_set,
        signal=signal,
        start=start,
        target=target(CHECKPOINT),
        on_existing=on_existing,
        signal_name="custom" if comparator is not None else "",
    )
    return Result(
        root.path, config, rl.checkpoint, start, preference_model, accuracy, rl.probes, rl.counts
    )


__all__ = ["CHECKPOINT", "STAGE", "Config", "Result", "run"]
