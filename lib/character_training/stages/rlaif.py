"""Stage 09: RLAIF, the alternative to DPO + SFT that the public Tinker replication tried.

The replication trained a reward model on teacher-vs-student pairs, ran RL against it without
a KL penalty, and got a policy that collapsed onto short, stylised replies ("A bold ..."): the
reward model had learnt a style detector and RL found it. This stage runs the same experiment
with the knobs that replication lacked, so notebook 09 can compare it with DPO + SFT on the
same evaluations.

Inputs: ``02_distillation/pairs.jsonl`` (training prompts and chosen/rejected pairs) and
``02_distillation/heldout.jsonl`` (probe prompts, never trained on). Outputs
(``runs/<persona>/<size>/09_rlaif/``):

* ``sft_init/`` (``rl.init: sft``): ``rl.sft_init_steps`` steps of SFT on the chosen replies
  from the instruct model (stage 05's helpers: rendering, per-token batch loss, seeded
  batches), checkpoint "rlaif_sft_init";
* ``preference_model/`` (``rl.signal: preference_model``): ``data.jsonl`` (every comparison
  with its split and the letter the chosen reply was shown as), ``metrics.jsonl``, checkpoint
  "rlaif_pm" (a LoRA on the judge's base); see `evaluate.preference_model`;
* ``accuracy.json``: held-out pairwise accuracy of the signals (the prompted judge always, the
  preference model when trained) per source, with prompt-level 95% intervals;
* ``rl/``: ``samples/step-NNNNNN.jsonl`` (the shared sampler's logs, exact tokens and
  log-probs), ``matchups.jsonl`` (every verdict, cached by key and signal), ``rollouts.jsonl``
  (per reply: text, tokens, win rate, advantage, KL), ``metrics.jsonl`` (per step),
  ``probes.jsonl`` + ``probe_samples.jsonl`` (win rate against the starting policy on held-out
  prompts, with the checkpoint of each probe step), ``reference.json``, ``progress.json``;
  checkpoint "rlaif".

One RL step, and why each piece is the way it is:

1. ``evals.rl_prompts_per_step`` prompts (the pair prompts: constitution training prompts and
   general training prompts; a seeded shuffle per pass) get ``evals.rl_group_size`` replies
   each from the current policy, through `sampling.sample_chat` with ``return_tokens=True`` and
   keys ``"<step>:<prompt_id>:<k>"`` (temperature ``rl.temperature``, no top-p/top-k: the
   policy gradient is taken on the distribution that was sampled).
2. Matchups within each group (every pair, or a seeded subset of ``rl.matchups_per_group``)
   are judged by the signal in both orders (`evaluate.preference_model`). A reply's reward is
   its win rate over its matchups (a reply in no matchup gets the group mean).
3. Advantages are group-centred win rates (``rl.advantage: center``, the default), or also
   divided by the group's standard deviation (``std``). Centring only is the default because
   win rates already live on one scale for every prompt; dividing by a small spread would
   blow up near-ties into full-size updates on the prompts the judge cannot tell apart.
4. Old log-probs are *recomputed* with the learner's forward on the sampled tokens rather
   than taken from the sampler: sampling runs in another precision (bf16 samplers differ from
   the learner by ~0.02 nats per token on average, tests/test_snapshot_fidelity.py), and the
   importance ratio ``exp(logp - old)`` must be exactly 1 at the update for the loss to be the
   policy gradient. The sampler-learner gap is logged as a diagnostic.
5. KL penalty: per token, ``-rl.kl_coef * (logp_policy - logp_ref)`` is added to the reply's
   advantage (reward shaping, no reward-to-go). The reference is the frozen starting weights,
   held by a second *training* client loaded from the saved starting state and used for
   ``forward`` only: it computes in the learner's precision, so at step 1 policy and reference
   agree exactly and the KL starts at 0, where a sampler's ``compute_logprobs`` would add the
   ~0.02-nat precision gap as phantom KL.
6. The loss is the built-in ``importance_sampling`` (``-sum_t exp(logp - old) * A_t``) with
   advantages on reply tokens only (0 on the prompt), divided by the number of reply tokens in
   the step's batch, so the loss is a per-token mean and its scale does not grow with the group
   size or the reply length. One optimiser step per batch (strictly on-policy).

Logged per step: spread of win rates within groups and the share of decided matchups (the
*mean* win rate inside a group is 0.5 by construction, so it is not a reward curve), KL (mean
per reply token of ``logp_policy - logp_ref``), entropy proxy (mean ``-logp`` of the sampled
tokens), reply length (mean and median tokens, share cut at the budget), mean |advantage|,
learning rate, gradient norm. The reward curve is the probe: every ``rl.probe_every`` steps
(and at the start and end) the policy answers ``rl.probe_prompts`` held-out prompts and the
same signal compares each reply with the starting policy's reply to the same prompt (both
orders); its win rate, with a prompt-level bootstrap interval, is what RL is pushing up. The
probe's weights are saved, so notebook 09 can measure adherence at the same points and check
for reward hacking (reward up while the independent measures go down).

Resumable like stages 03 and 05 (`training`): ``progress.json`` every ``rl.save_every``
steps; a restart reloads weights and optimiser, drops later metric/rollout/probe rows and
redoes those steps. Logged samples and verdicts of redone steps are reused (same keys, same
seeds), so a resumed run ends where one uninterrupted run ends, within numerics.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import shutil
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tinker import types
from tqdm.auto import tqdm

from ..backends import resolve_client
from ..config import RunParams
from ..constitutions import Constitution, load_constitution
from ..errors import ConfigError, DataError
from ..evaluate.adherence import bootstrap_mean, load_heldout
from ..evaluate.preference_model import (
    Comparator,
    ForcedChoiceComparator,
    Judgement,
    Matchup,
    PMExample,
    answer_datum,
    load_helpfulness_pairs,
    pairwise_accuracy,
    render_pm_examples,
)
from ..metrics import JsonlLogger, read_metrics
from ..prompts import student_messages
from ..renderers import get_renderer, renderer_for_model
from ..renderers.conversation import generation_prompt
from ..sampling import Completion, SampleRequest, sample_chat
from ..store import (
    Checkpoint,
    StageDir,
    append_jsonl,
    find_checkpoint,
    read_jsonl,
    stage_dir,
    write_jsonl,
)
from ..training import (
    finish_checkpoint,
    learning_rate_at,
    open_training_client,
    read_progress,
    save_progress,
    truncate_metrics,
)
from . import sft
from .dpo import load_pairs

logger = logging.getLogger(__name__)

STAGE = "09_rlaif"
SFT_INIT_DIR = "sft_init"
PM_DIR = "preference_model"
RL_DIR = "rl"
CHECKPOINT = "rlaif"
SFT_INIT_CHECKPOINT = "rlaif_sft_init"
PM_CHECKPOINT = "rlaif_pm"
ACCURACY_FILE = "accuracy.json"
PROBE_LABEL = "rl-step-{:04d}"


# -- config --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Config:
    """Stage 09 settings, derived from `RunParams` (`config.RLParams`, ``evals.rl_*``, and
    ``sft.*`` for the SFT start)."""

    student: str
    student_renderer: str
    judge: str
    judge_renderer: str
    lora_rank: int
    seed: int
    signal: str
    init: str
    steps: int
    group_size: int
    prompts_per_step: int
    kl_coef: float
    learning_rate: float
    schedule: str
    advantage: str
    matchups_per_group: int
    response_tokens: int
    temperature: float
    save_every: int
    probe_every: int
    probe_prompts: int
    sft_init_steps: int
    sft_learning_rate: float
    sft_batch_size: int
    sft_max_length: int
    sft_warmup_fraction: float
    sft_schedule: str
    pm_epochs: int
    pm_learning_rate: float
    pm_batch_size: int
    pm_heldout_fraction: float
    pm_helpfulness_pairs: bool
    pm_max_length: int
    bootstrap: int
    pairs_digest: str = ""

    @classmethod
    def from_params(cls, params: RunParams, pairs_digest: str = "") -> "Config":
        r, e, s = params.rl, params.evals, params.sft
        if e.rl_group_size < 2:
            raise ConfigError(
                f"evals.rl_group_size={e.rl_group_size}: expected >= 2 (a group needs two "
                "replies to compare)"
            )
        return cls(
            student=params.student,
            student_renderer=params.renderers.get(params.student)
            or renderer_for_model(params.student),
            judge=params.judge,
            judge_renderer=params.renderers.get(params.judge) or renderer_for_model(params.judge),
            lora_rank=params.lora_rank,
            seed=params.seed,
            signal=r.signal,
            init=r.init,
            steps=e.rl_steps,
            group_size=e.rl_group_size,
            prompts_per_step=e.rl_prompts_per_step,
            kl_coef=r.kl_coef,
            learning_rate=r.learning_rate,
            schedule=r.schedule,
            advantage=r.advantage,
            matchups_per_group=r.matchups_per_group,
            response_tokens=r.response_tokens,
            temperature=r.temperature,
            save_every=r.save_every,
            probe_every=r.probe_every,
            probe_prompts=r.probe_prompts,
            sft_init_steps=r.sft_init_steps,
            sft_learning_rate=s.learning_rate,
            sft_batch_size=s.batch_size,
            sft_max_length=s.max_length,
            sft_warmup_fraction=s.warmup_fraction,
            sft_schedule=s.schedule,
            pm_epochs=r.pm_epochs,
            pm_learning_rate=r.pm_learning_rate,
            pm_batch_size=r.pm_batch_size,
            pm_heldout_fraction=r.pm_heldout_fraction,
            pm_helpfulness_pairs=r.pm_helpfulness_pairs,
            pm_max_length=r.pm_max_length,
            bootstrap=params.adherence.bootstrap,
            pairs_digest=pairs_digest,
        )

    def part(self, *prefixes: str, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The fields a sub-stage depends on (its fingerprint), plus ``extra``."""
        common = ("student", "student_renderer", "lora_rank", "seed", "pairs_digest")
        out = {k: v for k, v in asdict(self).items() if k in common or k.startswith(prefixes)}
        return {**out, **(extra or {})}


def fingerprint(payload: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


# -- pure helpers --------------------------------------------------------------------------------
def training_prompts(pairs: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    """The distinct prompts of the pairs, in file order: what RL trains on (stage 02 chose them:
    constitution training prompts plus general training prompts, never a held-out one)."""
    seen: dict[str, dict[str, str]] = {}
    for row in pairs:
        pid = str(row["prompt_id"])
        if pid not in seen:
            seen[pid] = {"id": pid, "prompt": row["prompt"], "source": str(row.get("source", ""))}
    return list(seen.values())


def step_prompts(
    prompt_ids: Sequence[str], per_step: int, steps: int, seed: int
) -> list[list[str]]:
    """Every step's prompt ids: seeded shuffles of all prompts, one pass after another.

    A step takes the next ``per_step`` ids (wrapping into the next pass, never repeating an id
    within a step), so every prompt is used before any is used twice, and the schedule depends
    only on the ids and the seed (a resumed run sees the same prompts).
    """
    ids = sorted(set(prompt_ids))
    if not ids:
        raise DataError("no training prompts for RL")
    per_step = min(per_step, len(ids))
    stream: list[str] = []
    passes = 0
    schedule: list[list[str]] = []
    for _ in range(steps):
        while len(stream) < per_step:
            order = list(ids)
            random.Random(f"{seed}:rl-pass:{passes}").shuffle(order)
            passes += 1
            stream += [i for i in order if i not in stream[:per_step]]
        schedule.append(stream[:per_step])
        stream = stream[per_step:]
    return schedule


def draw_matchups(group_size: int, n: int, seed: int, key: str) -> list[tuple[int, int]]:
    """The pairs (i, j), i < j, a group plays: all of them when ``n`` is 0 or covers them all,
    else ``n`` drawn without replacement from a seed of (run seed, ``key``)."""
    every = [(i, j) for i in range(group_size) for j in range(i + 1, group_size)]
    if n <= 0 or n >= len(every):
        return every
    picked = random.Random(f"{seed}:rl-matchups:{key}").sample(every, n)
    return sorted(picked)


def group_win_rates(
    group_size: int, matchups: Sequence[tuple[int, int]], credits: Sequence[float]
) -> list[float]:
    """Each reply's mean credit over the matchups it played (as first: credit, as second:
    1 - credit); a reply that played none gets the mean of the others, i.e. no advantage."""
    if len(matchups) != len(credits):
        raise DataError(f"{len(matchups)} matchups but {len(credits)} verdicts")
    totals = [0.0] * group_size
    counts = [0] * group_size
    for (i, j), credit in zip(matchups, credits):
        totals[i] += credit
        totals[j] += 1.0 - credit
        counts[i] += 1
        counts[j] += 1
    rates = [t / c if c else math.nan for t, c in zip(totals, counts)]
    played = [r for r in rates if not math.isnan(r)]
    fill = statistics.fmean(played) if played else 0.5
    return [fill if math.isnan(r) else r for r in rates]


def group_advantages(win_rates: Sequence[float], mode: str, eps: float = 1e-6) -> list[float]:
    """``center``: win rate minus the group mean; ``std``: that divided by the group's
    (population) standard deviation, and all zeros when the spread is below ``eps``."""
    mean = statistics.fmean(win_rates)
    centred = [w - mean for w in win_rates]
    if mode == "center":
        return centred
    if mode == "std":
        std = statistics.pstdev(win_rates)
        return [c / std for c in centred] if std > eps else [0.0] * len(centred)
    raise ConfigError(f"rl.advantage={mode!r}: expected 'center' or 'std'")


def kl_shaped_advantages(
    advantage: float,
    policy_logprobs: Sequence[float],
    reference_logprobs: Sequence[float],
    kl_coef: float,
) -> list[float]:
    """Per reply token: ``advantage - kl_coef * (logp_policy - logp_ref)``."""
    if len(policy_logprobs) != len(reference_logprobs):
        raise DataError(
            f"policy and reference log-probs differ in length "
            f"({len(policy_logprobs)} vs {len(reference_logprobs)})"
        )
    return [advantage - kl_coef * (p - r) for p, r in zip(policy_logprobs, reference_logprobs)]


def rl_datum(
    prompt_tokens: Sequence[int],
    reply_tokens: Sequence[int],
    reply_logprobs: Sequence[float] | None = None,
    reply_advantages: Sequence[float] | None = None,
) -> types.Datum:
    """The ``importance_sampling`` datum of one sampled reply.

    ``model_input`` is prompt + reply without its last token; target ``i`` is token ``i + 1``.
    The reply's targets are the last ``len(reply_tokens)`` positions: they carry the old
    log-probs and advantages given (zeros when None: a scoring forward), the prompt's carry 0.
    """
    if not prompt_tokens or not reply_tokens:
        raise DataError("an RL datum needs a non-empty prompt and a non-empty reply")
    n = len(reply_tokens)
    for name, values in (("logprobs", reply_logprobs), ("advantages", reply_advantages)):
        if values is not None and len(values) != n:
            raise DataError(f"{name}: {len(values)} values for {n} reply tokens")
    full = list(prompt_tokens) + list(reply_tokens)
    pad = [0.0] * (len(prompt_tokens) - 1)
    logprobs = pad + [float(v) for v in (reply_logprobs or [0.0] * n)]
    advantages = pad + [float(v) for v in (reply_advantages or [0.0] * n)]
    return types.Datum(
        model_input=types.ModelInput.from_ints(full[:-1]),
        loss_fn_inputs={
            "target_tokens": types.TensorData(data=full[1:], dtype="int64", shape=[len(full) - 1]),
            "logprobs": types.TensorData(data=logprobs, dtype="float32", shape=[len(logprobs)]),
            "advantages": types.TensorData(
                data=advantages, dtype="float32", shape=[len(advantages)]
            ),
        },
    )


def reply_logprobs_of(output: Mapping[str, Any], n_reply: int) -> list[float]:
    """The last ``n_reply`` target log-probs of a forward output (the reply's tokens)."""
    values = output["logprobs"].to_torch().reshape(-1).float().tolist()
    return values[len(values) - n_reply :]


def probe_steps(steps: int, every: int) -> list[int]:
    """Steps after which the probe runs: 0 (the start), every ``every``-th, and the last."""
    points = {0, steps}
    if every > 0:
        points |= set(range(every, steps + 1, every))
    return sorted(points)


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


# -- signals -------------------------------------------------------------------------------------
def judge_comparator(
    config: Config, service: Any, constitution: Constitution, desc: str | None = None
) -> ForcedChoiceComparator:
    """The prompted judge: the untrained ``judge`` model with the whole constitution."""
    return ForcedChoiceComparator(
        lambda: service.create_sampling_client(base_model=config.judge),
        config.judge_renderer,
        constitution.traits_text,
        identity=f"judge:{config.judge}",
        soft=False,
        desc=desc,
    )


def pm_comparator(
    config: Config,
    service: Any,
    constitution: Constitution,
    checkpoint: Checkpoint,
    desc: str | None = None,
) -> ForcedChoiceComparator:
    """The trained preference model: its LoRA on the judge's base, the constitution summary."""
    return ForcedChoiceComparator(
        lambda: service.create_sampling_client(model_path=checkpoint.sampler_path),
        config.judge_renderer,
        constitution.description,
        identity=f"pm:{checkpoint.sampler_path}",
        soft=True,
        desc=desc,
    )


def judge_cached(
    comparator: Comparator, matchups: Sequence[Matchup], path: Path
) -> list[Judgement]:
    """Verdicts for ``matchups``, reusing rows of ``path`` made by the same signal on the same
    texts (digest of identity, prompt and both replies); new ones are appended."""
    digests = {m.key: fingerprint({"signal": comparator.identity, **asdict(m)}) for m in matchups}
    done: dict[str, Judgement] = {}
    for row in read_jsonl(path):
        key = row.get("key")
        if key in digests and row.get("digest") == digests[key]:
            done[key] = Judgement(key, float(row["credit"]), row.get("detail") or {})
    missing = [m for m in matchups if m.key not in done]
    if missing:
        for judgement in comparator(missing):
            append_jsonl(
                path,
                {
                    "key": judgement.key,
                    "digest": digests[judgement.key],
                    "credit": judgement.credit,
                    "detail": dict(judgement.detail),
                },
            )
            done[judgement.key] = judgement
    return [done[m.key] for m in matchups]


# -- SFT start -----------------------------------------------------------------------------------
def sft_init(
    params: RunParams,
    service: Any,
    config: Config,
    pairs: Sequence[Mapping[str, Any]],
    on_existing: str = "resume",
) -> Checkpoint:
    """``rl.sft_init_steps`` SFT steps on the chosen replies, from the instruct model.

    The public replication started RL from such a model. Stage 05's helpers render and batch
    the data (loss on the reply and its end-of-turn token, per-token mean over the batch);
    learning rate, batch size, warm-up and schedule are ``sft.*``. Resumable.
    """
    stage = stage_dir(params.run_dir, f"{STAGE}/{SFT_INIT_DIR}")
    part = config.part("sft_")
    stage.prepare(fingerprint(part), on_existing, part)
    if stage.manifest().get("status") == "done":
        return find_checkpoint(params.run_dir, SFT_INIT_CHECKPOINT)
    client, done_steps = open_training_client(
        service, stage, base_model=config.student, rank=config.lora_rank, seed=config.seed
    )
    renderer = get_renderer(config.student_renderer, client.get_tokenizer())
    transcripts = sft.as_transcripts(
        [
            {
                "id": p["id"],
                "kind": "chosen",
                "messages": [
                    {"role": "user", "content": p["prompt"]},
                    {"role": "assistant", "content": p["chosen"]},
                ],
            }
            for p in pairs
        ]
    )
    examples, dropped = sft.build_examples(transcripts, renderer, config.sft_max_length)
    if not examples:
        raise DataError("no chosen reply of 02_distillation/pairs.jsonl is trainable")
    by_id = {e.id: e for e in examples}
    total = config.sft_init_steps
    epochs = math.ceil(total * config.sft_batch_size / len(examples))
    batches = sft.epoch_batches(list(by_id), config.sft_batch_size, epochs, config.seed, "sft")[
        :total
    ]
    metrics_path = stage.file("metrics.jsonl")
    truncate_metrics(metrics_path, done_steps)
    log = JsonlLogger(metrics_path)
    for step in tqdm(range(done_steps + 1, total + 1), desc="RL start: SFT", unit="step"):
        batch = [by_id[i] for i in batches[step - 1]]
        data, loss_tokens = sft.normalise_batch([e.datum for e in batch])
        out = client.forward_backward(data, "cross_entropy").result()
        lr = learning_rate_at(
            step, total, config.sft_learning_rate, config.sft_warmup_fraction, config.sft_schedule
        )
        optim = client.optim_step(types.AdamParams(learning_rate=lr)).result()
        row = sft.batch_losses(batch, out.loss_fn_outputs)
        row.update(
            {
                "optim/lr": lr,
                "optim/grad_norm": (optim.metrics or {}).get("optim/grad_norm"),
                "train/loss_tokens": loss_tokens,
            }
        )
        log.log(step, row)
        if step % config.save_every == 0 and step < total:
            save_progress(client, stage, step)
    checkpoint = finish_checkpoint(
        client, params.run_dir, SFT_INIT_CHECKPOINT, STAGE, config.student
    )
    stage.finish(examples=len(examples), dropped=len(dropped), steps=total)
    return checkpoint


# -- preference model ----------------------------------------------------------------------------
@dataclass
class PMResult:
    checkpoint: Checkpoint
    examples: list[PMExample]
    dropped: list[dict[str, Any]]


def pm_examples(config: Config, pairs: Sequence[Mapping[str, Any]]) -> list[PMExample]:
    helpfulness = load_helpfulness_pairs() if config.pm_helpfulness_pairs else []
    return render_pm_examples(pairs, config.pm_heldout_fraction, config.seed, helpfulness)


def train_preference_model(
    params: RunParams,
    service: Any,
    config: Config,
    pairs: Sequence[Mapping[str, Any]],
    constitution: Constitution,
    on_existing: str = "resume",
) -> PMResult:
    """Cross-entropy on the answer letter of every training comparison, a LoRA on the judge's
    base; resumable. Comparisons longer than ``rl.pm_max_length`` tokens are left out and
    recorded."""
    examples = pm_examples(config, pairs)
    stage = stage_dir(params.run_dir, f"{STAGE}/{PM_DIR}")
    part = config.part(
        "pm_", extra={"judge": config.judge, "judge_renderer": config.judge_renderer}
    )
    part["character"] = constitution.description
    stage.prepare(fingerprint(part), on_existing, part)
    write_jsonl(stage.file("data.jsonl"), (e.record() for e in examples))
    if stage.manifest().get("status") == "done":
        return PMResult(
            find_checkpoint(params.run_dir, PM_CHECKPOINT),
            examples,
            read_jsonl(stage.file("dropped.jsonl")),
        )
    client, done_steps = open_training_client(
        service, stage, base_model=config.judge, rank=config.lora_rank, seed=config.seed
    )
    renderer = get_renderer(config.judge_renderer, client.get_tokenizer())
    train = [e for e in examples if e.split == "train"]
    datums: dict[str, types.Datum] = {}
    dropped = []
    for e in train:
        datum = answer_datum(renderer, e.messages(constitution.description), e.chosen_as)
        if datum.model_input.length > config.pm_max_length:
            dropped.append(
                {"id": e.id, "reason": f"{datum.model_input.length} tokens > rl.pm_max_length"}
            )
            continue
        datums[e.id] = datum
    write_jsonl(stage.file("dropped.jsonl"), dropped)
    if not datums:
        raise DataError("no preference-model comparison fits rl.pm_max_length")
    steps: list[list[str]] = []
    for epoch in range(config.pm_epochs):
        order = sorted(datums)
        random.Random(f"{config.seed}:pm-epoch:{epoch}").shuffle(order)
        steps += [
            order[i : i + config.pm_batch_size] for i in range(0, len(order), config.pm_batch_size)
        ]
    total = len(steps)
    metrics_path = stage.file("metrics.jsonl")
    truncate_metrics(metrics_path, done_steps)
    log = JsonlLogger(metrics_path)
    for step in tqdm(range(done_steps + 1, total + 1), desc="preference model", unit="step"):
        ids = steps[step - 1]
        data, _ = sft.normalise_batch([datums[i] for i in ids])
        out = client.forward_backward(data, "cross_entropy").result()
        lr = learning_rate_at(step, total, config.pm_learning_rate, 0.1, "linear")
        optim = client.optim_step(types.AdamParams(learning_rate=lr)).result()
        letter_lp = [
            float(
                (
                    o["logprobs"].to_torch().reshape(-1) * d.loss_fn_inputs["weights"].to_torch()
                ).sum()
            )
            for o, d in zip(out.loss_fn_outputs, (datums[i] for i in ids))
        ]
        log.log(
            step,
            {
                "pm/loss": -statistics.fmean(letter_lp),
                "pm/p_answer": statistics.fmean(math.exp(v) for v in letter_lp),
                "optim/lr": lr,
                "optim/grad_norm": (optim.metrics or {}).get("optim/grad_norm"),
                "train/comparisons": len(ids),
            },
        )
        if step % config.save_every == 0 and step < total:
            save_progress(client, stage, step)
    checkpoint = finish_checkpoint(client, params.run_dir, PM_CHECKPOINT, STAGE, config.judge)
    stage.finish(examples=len(examples), trained=len(datums), dropped=len(dropped), steps=total)
    return PMResult(checkpoint, examples, dropped)


def signal_accuracy(
    comparators: Mapping[str, Comparator],
    examples: Sequence[PMExample],
    cache_path: Path,
    bootstrap: int,
    seed: int,
) -> list[dict[str, Any]]:
    """Held-out pairwise accuracy of each signal, per source and overall, with 95% intervals
    that resample prompts. Every held-out comparison is asked in both orders (a signal that
    always answers "A" scores 0.5)."""
    heldout = [e for e in examples if e.split == "heldout"]
    rows = []
    for name, comparator in comparators.items():
        judgements = judge_cached(
            comparator,
            [e.matchup() for e in heldout],
            cache_path.with_name(f"{name}-heldout.jsonl"),
        )
        credit = {j.key: j.credit for j in judgements}
        for source in [*dict.fromkeys(e.source for e in heldout), "all"]:
            part = [e for e in heldout if source in ("all", e.source)]
            if not part:
                continue
            groups: dict[str, list[float]] = {}
            for e in part:
                groups.setdefault(e.prompt_id, []).append(float(credit[e.id] > 0.5))
            estimate = bootstrap_mean(groups.values(), bootstrap, seed)
            rows.append(
                {
                    "signal": name,
                    "source": source,
                    **pairwise_accuracy(part, judgements),
                    "low": estimate.low,
                    "high": estimate.high,
                }
            )
    return rows


# -- the stage -----------------------------------------------------------------------------------
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
        return {PROBE_LABEL.format(p["step"]): p["sampler_path"] for p in self.probes}

    def reward_change(self) -> dict[str, float]:
        """Probe win rate at the last step minus 0.5 (the start), with its interval."""
        last = self.probes[-1]
        return {
            "value": last["win_rate"] - 0.5,
            "low": last["low"] - 0.5,
            "high": last["high"] - 0.5,
        }


def _pairs_digest(pairs: Sequence[Mapping[str, Any]]) -> str:
    blob = "\n".join(f"{p['id']}\t{p['prompt']}\t{p['chosen']}\t{p['rejected']}" for p in pairs)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _probe_prompts(run_dir: Path, n: int) -> list[dict[str, str]]:
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
    config = Config.from_params(params, _pairs_digest(pairs))
    constitution = load_constitution(
        params.constitution_ref, allow_opt_in=params.allow_misaligned, prompts_per_assertion=None
    )
    prompts = training_prompts(pairs)
    probes_at = probe_steps(config.steps, config.probe_every)
    probe_set = _probe_prompts(params.run_dir, config.probe_prompts)
    root = stage_dir(params.run_dir, STAGE)

    start = (
        sft_init(params, service_client, config, pairs, on_existing)
        if config.init == "sft"
        else None
    )
    pm: PMResult | None = None
    comparators: dict[str, Comparator] = {}
    if comparator is not None:
        signal, examples = comparator, pm_examples(config, pairs)
        comparators["custom"] = comparator
    else:
        judge = judge_comparator(config, service_client, constitution, desc="judge")
        comparators["judge"] = judge
        signal = judge
        examples = pm_examples(config, pairs)
        if config.signal == "preference_model":
            pm = train_preference_model(
                params, service_client, config, pairs, constitution, on_existing
            )
            signal = pm_comparator(config, service_client, constitution, pm.checkpoint, "pm")
            comparators["preference_model"] = signal
    accuracy = signal_accuracy(
        comparators, examples, root.file("signals/cache.jsonl"), config.bootstrap, config.seed
    )
    root.path.mkdir(parents=True, exist_ok=True)
    (root.path / ACCURACY_FILE).write_text(json.dumps(accuracy, indent=2))

    stage = stage_dir(params.run_dir, f"{STAGE}/{RL_DIR}")
    part = config.part(
        "",
        extra={
            "signal_identity": signal.identity,
            "start_state": start.state_path if start else "",
            "probe_set": [p["id"] for p in probe_set],
        },
    )
    stage.prepare(fingerprint(part), on_existing, part)
    if stage.manifest().get("status") == "done":
        return Result(
            root.path,
            config,
            find_checkpoint(params.run_dir, CHECKPOINT),
            start,
            pm.checkpoint if pm else None,
            accuracy,
            read_jsonl(stage.file("probes.jsonl")),
            stage.manifest().get("counts", {}),
        )

    client, done_steps = open_training_client(
        service_client,
        stage,
        base_model=config.student,
        rank=config.lora_rank,
        seed=config.seed,
        init_state=start.state_path if start else None,
    )
    reference_file = stage.file("reference.json")
    if done_steps == 0 and read_progress(stage) is None:
        # the frozen reference is the weights RL starts from, saved before any update
        state = client.save_state("rl-start").result().path
        reference_file.write_text(json.dumps({"state_path": str(state)}))
    if not reference_file.is_file():
        raise DataError(
            f"{reference_file} is missing but RL already ran {done_steps} steps; rerun with "
            "on_existing='overwrite'"
        )
    reference = resolve_client(
        service_client.create_training_client_from_state(
            json.loads(reference_file.read_text())["state_path"]
        )
    )
    renderer = get_renderer(config.student_renderer, client.get_tokenizer())
    text_of = {p["id"]: p["prompt"] for p in prompts}
    prompt_tokens = {
        pid: generation_prompt(renderer, student_messages(text)).to_ints()
        for pid, text in text_of.items()
    }
    schedule = step_prompts(list(text_of), config.prompts_per_step, config.steps, config.seed)

    metrics_path = stage.file("metrics.jsonl")
    truncate_metrics(metrics_path, done_steps)
    for name in ("rollouts.jsonl", "probes.jsonl"):
        rows = [r for r in read_jsonl(stage.file(name)) if int(r["step"]) <= done_steps]
        write_jsonl(stage.file(name), rows)
    log = JsonlLogger(metrics_path)
    sampling = {
        "max_tokens": config.response_tokens,
        "temperature": config.temperature,
        "top_p": 1.0,
        "top_k": -1,
        "seed": config.seed,
    }

    def snapshot() -> Any:
        return client.save_weights_and_get_sampling_client()

    def probe(step: int) -> None:
        """Sample the probe prompts from the policy after ``step`` and judge each reply
        against the starting policy's reply to the same prompt (its own replies at step 0)."""
        logged = {int(r["step"]): r for r in read_jsonl(stage.file("probes.jsonl"))}
        if step in logged:
            return
        path = str(client.save_weights_for_sampler(PROBE_LABEL.format(step)).result().path)
        start_path = path if step == 0 else logged[0]["sampler_path"]
        replies = {}
        for at, model_path in ((step, path), (0, start_path)):
            replies[at] = sample_chat(
                lambda model_path=model_path: service_client.create_sampling_client(
                    model_path=model_path
                ),
                renderer,
                [
                    SampleRequest(
                        key=f"probe:{at}:{p['id']}", messages=student_messages(p["prompt"])
                    )
                    for p in probe_set
                ],
                **sampling,
                log_path=stage.file("probe_samples.jsonl"),
                desc=f"probe at step {at}",
            )
        row: dict[str, Any] = {"step": step, "sampler_path": path, "n": len(probe_set)}
        if step == 0:
            row.update(win_rate=0.5, low=0.5, high=0.5, decided=None)
        else:
            matchups = [
                Matchup(
                    f"probe:{step}:{p['id']}",
                    p["prompt"],
                    replies[step][f"probe:{step}:{p['id']}"].full_text,
                    replies[0][f"probe:0:{p['id']}"].full_text,
                )
                for p in probe_set
            ]
            verdicts = judge_cached(signal, matchups, stage.file("matchups.jsonl"))
            estimate = bootstrap_mean(
                [[v.credit] for v in verdicts], config.bootstrap, config.seed + step
            )
            row.update(
                win_rate=estimate.value,
                low=estimate.low,
                high=estimate.high,
                decided=sum(v.decided for v in verdicts) / len(verdicts),
            )
        row["reply_tokens_mean"] = statistics.fmean(c.num_tokens for c in replies[step].values())
        append_jsonl(stage.file("probes.jsonl"), row)

    if done_steps == 0:
        probe(0)
    bar = tqdm(total=config.steps, initial=done_steps, desc="RL", unit="step")
    for step in range(done_steps + 1, config.steps + 1):
        started = time.perf_counter()
        row = _rl_step(
            config,
            client,
            reference,
            renderer,
            stage,
            step,
            schedule[step - 1],
            text_of,
            prompt_tokens,
            signal,
            sampling,
            snapshot,
        )
        lr = learning_rate_at(step, config.steps, config.learning_rate, 0.0, config.schedule)
        optim = client.optim_step(types.AdamParams(learning_rate=lr)).result()
        row.update(
            {
                "optim/lr": lr,
                "optim/grad_norm": (optim.metrics or {}).get("optim/grad_norm"),
                "time/step": time.perf_counter() - started,
            }
        )
        log.log(step, row)
        if step % config.save_every == 0 and step < config.steps:
            save_progress(client, stage, step)
        if step in probes_at:
            probe(step)
        bar.update(1)
    bar.close()

    checkpoint = finish_checkpoint(client, params.run_dir, CHECKPOINT, STAGE, config.student)
    probes = read_jsonl(stage.file("probes.jsonl"))
    counts = {
        "steps": config.steps,
        "prompts": len(prompts),
        "replies": config.steps * len(schedule[0]) * config.group_size if schedule else 0,
        "signal": config.signal if comparator is None else "custom",
        "init": config.init,
    }
    stage.finish(**counts)
    return Result(
        root.path,
        config,
        checkpoint,
        start,
        pm.checkpoint if pm else None,
        accuracy,
        probes,
        counts,
    )


def _rl_step(
    config: Config,
    client: Any,
    reference: Any,
    renderer: Any,
    stage: StageDir,
    step: int,
    prompt_ids: Sequence[str],
    text_of: Mapping[str, str],
    prompt_tokens: Mapping[str, list[int]],
    signal: Comparator,
    sampling: Mapping[str, Any],
    snapshot: Any,
) -> dict[str, Any]:
    """Sample, judge, score and accumulate the gradient of one step (no optimiser step)."""
    g = config.group_size
    requests = [
        SampleRequest(
            key=f"{step}:{pid}:{k}",
            messages=student_messages(text_of[pid]),
            meta={"prompt_id": pid, "k": k},
        )
        for pid in prompt_ids
        for k in range(g)
    ]
    replies = sample_chat(
        snapshot,
        renderer,
        requests,
        **sampling,
        log_path=stage.file(f"samples/step-{step:06d}.jsonl"),
        desc=f"RL step {step}: sampling",
        return_tokens=True,
    )
    group: dict[str, list[Completion]] = {
        pid: [replies[f"{step}:{pid}:{k}"] for k in range(g)] for pid in prompt_ids
    }
    plan = {
        pid: draw_matchups(g, config.matchups_per_group, config.seed, f"{step}:{pid}")
        for pid in prompt_ids
    }
    matchups = [
        Matchup(
            f"{step}:{pid}:{i}-{j}", text_of[pid], group[pid][i].full_text, group[pid][j].full_text
        )
        for pid in prompt_ids
        for i, j in plan[pid]
    ]
    verdicts = {v.key: v for v in judge_cached(signal, matchups, stage.file("matchups.jsonl"))}

    win, adv = {}, {}
    for pid in prompt_ids:
        credits = [verdicts[f"{step}:{pid}:{i}-{j}"].credit for i, j in plan[pid]]
        win[pid] = group_win_rates(g, plan[pid], credits)
        adv[pid] = group_advantages(win[pid], config.advantage)

    order = [(pid, k) for pid in prompt_ids for k in range(g)]
    tokens = {(pid, k): list(group[pid][k].tokens or []) for pid, k in order}
    empty = [f"{step}:{pid}:{k}" for (pid, k), t in tokens.items() if not t]
    if empty:
        raise DataError(f"RL step {step}: the sampler returned no tokens for {empty[:3]}")
    scoring = [rl_datum(prompt_tokens[pid], tokens[(pid, k)]) for pid, k in order]
    policy_out = client.forward(scoring, "importance_sampling").result().loss_fn_outputs
    reference_out = reference.forward(scoring, "importance_sampling").result().loss_fn_outputs
    n_tokens = sum(len(t) for t in tokens.values())

    data, records = [], []
    kl_sum = entropy_sum = gap_sum = 0.0
    gap_n = 0
    for index, (pid, k) in enumerate(order):
        n = len(tokens[(pid, k)])
        lp = reply_logprobs_of(policy_out[index], n)
        ref = reply_logprobs_of(reference_out[index], n)
        shaped = kl_shaped_advantages(adv[pid][k], lp, ref, config.kl_coef)
        data.append(
            rl_datum(prompt_tokens[pid], tokens[(pid, k)], lp, [a / n_tokens for a in shaped])
        )
        kl = sum(p - r for p, r in zip(lp, ref))
        kl_sum += kl
        entropy_sum -= sum(lp)
        sampled = group[pid][k].token_logprobs
        if sampled and len(sampled) == n:
            gap_sum += sum(abs(a - b) for a, b in zip(sampled, lp))
            gap_n += n
        records.append(
            {
                "step": step,
                "prompt_id": pid,
                "k": k,
                "text": group[pid][k].full_text,
                "tokens": n,
                "complete": group[pid][k].complete,
                "win_rate": win[pid][k],
                "advantage": adv[pid][k],
                "kl": kl / n,
            }
        )
    client.forward_backward(data, "importance_sampling").result()
    for record in records:
        append_jsonl(stage.file("rollouts.jsonl"), record)

    lengths = [len(t) for t in tokens.values()]
    spreads = [statistics.pstdev(w) for w in win.values()]
    decided = [v.decided for v in verdicts.values()]
    return {
        "rl/win_rate_std": statistics.fmean(spreads),
        "rl/decided": sum(decided) / len(decided),
        "rl/kl": kl_sum / n_tokens,
        "rl/entropy": entropy_sum / n_tokens,
        "rl/length_mean": statistics.fmean(lengths),
        "rl/length_median": statistics.median(lengths),
        "rl/truncated": sum(not r["complete"] for r in records) / len(records),
        "rl/advantage_abs": statistics.fmean(abs(a) for v in adv.values() for a in v),
        "rl/sampler_gap": gap_sum / gap_n if gap_n else None,
        "rl/matchups": len(matchups),
        "train/replies": len(order),
        "train/reply_tokens": n_tokens,
    }


# -- comparison with DPO + SFT (notebook 09) -----------------------------------------------------
COMPARE_REPORT = "rlaif"
START_LABEL = PROBE_LABEL.format(0)


def comparison_models(params: RunParams, result: Result) -> dict[str, str | None]:
    """What notebook 09 measures: ``base`` (None), ``final`` when notebook 05 recorded it,
    ``rlaif``, and the policy at every probe step but the last (``rl-step-NNNN``; the last
    one is ``rlaif`` itself)."""
    recorded = {c: find_checkpoint(params.run_dir, c) for c in ("final",) if _has(params, c)}
    models: dict[str, str | None] = {"base": None}
    models |= {label: c.sampler_path for label, c in recorded.items()}
    models["rlaif"] = result.checkpoint.sampler_path
    for probe in result.probes[:-1]:
        models[PROBE_LABEL.format(probe["step"])] = probe["sampler_path"]
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


def probe_series(result: Result, report: Any, probe_set: str = "constitution") -> list[dict]:
    """Per probe step: the training reward (probe win rate against the start) next to the
    teacher-like share of the policy at that step, each with its 95% interval."""
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


def reply_lengths(
    report: Any, labels: Sequence[str], bootstrap: int, seed: int
) -> list[dict[str, Any]]:
    """Words per reply of each model on the adherence probes: mean with a prompt-level 95%
    interval, median, and the share cut at the token budget (a cut reply's length is a
    floor). A collapse onto short stylised replies shows here first."""
    from .samples import word_count

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
) -> list[dict[str, Any]]:
    """Order-swapped coherence verdicts of the untrained judge (`evaluate.coherence`, stage 08's
    judge) on the adherence probe replies (first sample per prompt) of each pair; one record per
    pair with the win rate of its first model, its standard error and a Wilson 95% interval."""
    from ..evaluate import coherence as judge_lib

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
        params.renderers.get(judge) or renderer_for_model(judge),
        comparisons,
        judge=judge,
        cache_path=Path(params.run_dir) / STAGE / "coherence_logprob.jsonl",
        calibrate=params.evals.coherence_calibrate,
    )
    outcomes = judge_lib.resolve_order_swaps(comparisons, verdicts)
    bias = judge_lib.bias_fields(verdicts, params.evals.coherence_calibrate)
    out = []
    for rate in judge_lib.win_rates(outcomes, by_group=False):
        record = rate.to_record() | {"mode": "logprob", **bias}  # low/high: Wilson 95% interval
        out.append(record)
    return out


def robustness_f1(
    params: RunParams, service: Any, models: Mapping[str, str | None]
) -> dict[str, Any]:
    """Persona-vs-base classifier F1 of each trained model, plainly and under the adversarial
    instructions, with stage 08's prompts, splits, sampling, classifier and intervals.

    Stage 08's ``run`` measures its fixed methods (and every persona); this asks the same
    question of the models given here, for this persona only: the classifier has two classes,
    the persona (trained on the plain replies of every model but ``base`` on the classifier's
    training prompts, so no model is favoured by having defined the class alone) and ``base``;
    F1 of model m at a split is macro F1 over m's replies and the base model's replies at that
    split, on held-out prompts. Replies are logged under ``09_rlaif/robustness/``.
    """
    from ..evaluate import robustness as rob
    from . import robustness as r08

    config = r08.Config.from_params(params)
    prompts, notes = r08.load_eval_prompts(params.run_dir, config.prompts)
    train_ids, heldout_ids = rob.split_prompts(
        [p["id"] for p in prompts], config.train_fraction, config.seed
    )
    heldout = set(heldout_ids)
    folder = Path(params.run_dir) / STAGE / "robustness"
    settings = config.sampling()
    rows = []
    for label, path in models.items():
        identity = path or f"base:{config.student}"
        name = r08.log_name(label, identity, settings)
        # Stage 08 already sampled base and final with the same requests, seeds and settings
        # (the log name hashes model and settings): start from its log instead of again.
        sampled_by_08 = Path(params.run_dir) / r08.STAGE / "responses" / name
        if sampled_by_08.is_file() and not (folder / name).is_file():
            folder.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(sampled_by_08, folder / name)
        replies = sample_chat(
            (lambda path=path: service.create_sampling_client(model_path=path))
            if path
            else (lambda: service.create_sampling_client(base_model=config.student)),
            config.student_renderer,
            r08.reply_requests(prompts, heldout, config.splits),
            **settings,
            log_path=folder / name,
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
    train = [r for r in rows if not r["heldout"] and r["split"] == r08.NONE_SPLIT]
    classifier, trained = rob.train_classifier(
        [r["text"] for r in train],
        [r["class"] for r in train],
        classes,
        config.classifier(),
        log_path=folder / "classifier_metrics.jsonl",
    )
    scored = [r for r in rows if r["heldout"]]
    for row, predicted in zip(scored, classifier.predict([r["text"] for r in scored])):
        row["predicted"] = predicted
    del classifier
    by: dict[tuple[str, str], list[tuple[str, str, str]]] = {}
    for r in scored:
        by.setdefault((r["method"], r["split"]), []).append(
            (r["prompt_id"], r["class"], r["predicted"])
        )
    base = [label for label, path in models.items() if path is None]
    table, summary = [], []
    for method in (m for m, path in models.items() if path is not None):
        sets = {
            split: by.get((method, split), []) + [x for b in base for x in by.get((b, split), [])]
            for split in [r08.NONE_SPLIT, *config.splits]
        }
        for split, split_rows in sets.items():
            own = by.get((method, split), [])
            estimate = rob.bootstrap_macro_f1(split_rows, config.bootstrap, config.seed)
            table.append(
                {
                    "method": method,
                    "split": split,
                    "macro_f1": estimate.value,
                    "low": estimate.low,
                    "high": estimate.high,
                    "own_class_rate": sum(t == p for _, t, p in own) / len(own) if own else None,
                }
            )
        attacked = {s: v for s, v in sets.items() if s != r08.NONE_SPLIT}
        plain = rob.bootstrap_macro_f1(sets[r08.NONE_SPLIT], config.bootstrap, config.seed)
        attack = (
            rob.bootstrap_macro_f1(attacked, config.bootstrap, config.seed) if attacked else None
        )
        summary.append(
            {
                "method": method,
                "no_instruction": plain.value,
                "no_instruction_ci": [plain.low, plain.high],
                "with_instructions": attack.value if attack else None,
                "with_instructions_ci": [attack.low, attack.high] if attack else None,
            }
        )
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


def hacking_check(
    result: Result, report: Any, coherence: Sequence[Mapping[str, Any]]
) -> dict[str, Any]:
    """`reward_hacking_verdict` from the stage's probes, the adherence report (rlaif minus its
    start, paired over prompts, persona probes) and the coherence of rlaif against its start;
    the three estimates are returned with the verdict."""
    adherence = next(
        (
            d.teacher_like.to_dict()
            for d in report.differences
            if (d.a, d.b, d.probe_set) == ("rlaif", START_LABEL, "constitution")
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
    reward = result.reward_change()
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


__all__ = [
    "CHECKPOINT",
    "comparison_models",
    "comparison_pairs",
    "hacking_check",
    "overview_rows",
    "coherence_rates",
    "probe_series",
    "reply_lengths",
    "robustness_f1",
    "STAGE",
    "Config",
    "PMResult",
    "Result",
    "draw_matchups",
    "group_advantages",
    "group_win_rates",
    "judge_cached",
    "kl_shaped_advantages",
    "probe_steps",
    "reward_hacking_verdict",
    "rl_datum",
    "run",
    "signal_accuracy",
    "step_prompts",
    "training_prompts",
]
