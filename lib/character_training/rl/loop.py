"""One RL step (sample, judge, score, datums) and the RL trainer that repeats it.

One step, and why each piece is the way it is:

1. ``evals.rl_prompts_per_step`` prompts (the pair prompts: constitution training prompts and
   general training prompts; a seeded shuffle per pass, `step_prompts`) get
   ``evals.rl_group_size`` replies each from the current policy, through `sampling.sample_chat`
   with ``return_tokens=True`` and keys ``"<step>:<prompt_id>:<k>"`` (temperature
   ``rl.temperature``, no top-p/top-k: the policy gradient is taken on the distribution that
   was sampled).
2. Matchups within each group are judged by the signal in both orders (`signals`); win rates
   become group-centred advantages (`advantages`).
3. Old log-probs are *recomputed* with the learner's forward on the sampled tokens rather than
   taken from the sampler: sampling runs in another precision (bf16 samplers differ from the
   learner by ~0.02 nats per token on average, tests/test_snapshot_fidelity.py), and the
   importance ratio ``exp(logp - old)`` must be exactly 1 at the update for the loss to be the
   policy gradient. The sampler-learner gap is logged as a diagnostic.
4. KL penalty: per token, ``-rl.kl_coef * (logp_policy - logp_ref)`` is added to the reply's
   advantage. The reference is the frozen starting weights, held by a second *training* client
   loaded from the saved starting state and used for ``forward`` only: it computes in the
   learner's precision, so at step 1 policy and reference agree exactly and the KL starts at
   0, where a sampler's ``compute_logprobs`` would add the ~0.02-nat precision gap as phantom
   KL.
5. The loss is the built-in ``importance_sampling`` (``-sum_t exp(logp - old) * A_t``) with
   advantages on reply tokens only (0 on the prompt), divided by the number of reply tokens in
   the step's batch, so the loss is a per-token mean and its scale does not grow with the group
   size or the reply length. One optimiser step per batch (strictly on-policy).

The trainer runs these steps through `training.run_training` (`RLStep.make_batch` builds a
step, `RLStep.read_metrics` writes its rollouts once the step has run) and the probes as the
loop's ``after_step`` hook, so a probe always sees the updated weights and is logged before
the step's resume point is saved.
"""

from __future__ import annotations

import json
import random
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tinker import types

from .. import training
from ..backends import resolve_client
from ..errors import DataError
from ..evaluate.preference_model import Comparator, Matchup
from ..prompts import student_messages
from ..renderers.conversation import generation_prompt
from ..sampling import Completion, SampleRequest, sample_chat
from ..stage_config import digest, json_ready
from ..store import (
    Checkpoint,
    StageDir,
    append_jsonl,
    find_checkpoint,
    portable_path,
    read_jsonl,
    resolve_path,
    write_jsonl,
)
from . import sft_start
from .advantages import draw_matchups, group_advantages, group_win_rates, kl_shaped_advantages
from .probes import PROBES_FILE, Prober, probe_steps
from .settings import RLAIFSettings
from .signals import judge_cached

ROLLOUTS_FILE = "rollouts.jsonl"
REFERENCE_FILE = "reference.json"


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


def policy_sampling(config: RLAIFSettings) -> dict[str, Any]:
    """How the policy is sampled, in training and in the probes: its own distribution."""
    return {
        "max_tokens": config.rl.response_tokens,
        "temperature": config.rl.temperature,
        "top_p": 1.0,
        "top_k": -1,
        "seed": config.seed,
    }


# -- one step ------------------------------------------------------------------------------------
@dataclass
class RLStep:
    """Builds RL steps for `training.run_training` (see the module docstring).

    ``client`` is the policy being trained, ``reference`` the frozen start (forward only),
    ``prompts`` the training prompts (``id``, ``prompt``). Derived from them: ``schedule``
    holds every step's prompt ids, ``prompt_tokens`` each prompt rendered for generation, and
    ``sampling`` the policy's sampling settings (`policy_sampling`, shared with the probes).
    """

    config: RLAIFSettings
    client: Any
    reference: Any
    renderer: Any
    stage: StageDir
    prompts: Sequence[Mapping[str, str]]
    signal: Comparator
    text_of: dict[str, str] = field(init=False)
    prompt_tokens: dict[str, list[int]] = field(init=False)
    schedule: list[list[str]] = field(init=False)
    sampling: dict[str, Any] = field(init=False)

    def __post_init__(self) -> None:
        config = self.config
        self.text_of = {p["id"]: p["prompt"] for p in self.prompts}
        self.prompt_tokens = {
            pid: generation_prompt(self.renderer, student_messages(text)).to_ints()
            for pid, text in self.text_of.items()
        }
        self.schedule = step_prompts(
            list(self.text_of), config.prompts_per_step, config.steps, config.seed
        )
        self.sampling = policy_sampling(config)

    def snapshot(self) -> Any:
        return self.client.save_weights_and_get_sampling_client()

    def make_batch(self, step: int) -> training.StepBatch:
        """Sample, judge and score step ``step``; the rollout statistics go in its metrics and
        its rollout rows in its payload (written by `read_metrics`)."""
        started = time.perf_counter()
        config, prompt_ids, g = self.config, self.schedule[step - 1], self.config.group_size
        requests = [
            SampleRequest(
                key=f"{step}:{pid}:{k}",
                messages=student_messages(self.text_of[pid]),
                meta={"prompt_id": pid, "k": k},
            )
            for pid in prompt_ids
            for k in range(g)
        ]
        replies = sample_chat(
            self.snapshot,
            self.renderer,
            requests,
            **self.sampling,
            log_path=self.stage.file(f"samples/step-{step:06d}.jsonl"),
            desc=f"RL step {step}: sampling",
            return_tokens=True,
        )
        group: dict[str, list[Completion]] = {
            pid: [replies[f"{step}:{pid}:{k}"] for k in range(g)] for pid in prompt_ids
        }
        plan = {
            pid: draw_matchups(g, config.rl.matchups_per_group, config.seed, f"{step}:{pid}")
            for pid in prompt_ids
        }
        matchups = [
            Matchup(
                f"{step}:{pid}:{i}-{j}",
                self.text_of[pid],
                group[pid][i].full_text,
                group[pid][j].full_text,
            )
            for pid in prompt_ids
            for i, j in plan[pid]
        ]
        verdicts = {
            v.key: v for v in judge_cached(self.signal, matchups, self.stage.file("matchups.jsonl"))
        }

        win, adv = {}, {}
        for pid in prompt_ids:
            credits = [verdicts[f"{step}:{pid}:{i}-{j}"].credit for i, j in plan[pid]]
            win[pid] = group_win_rates(g, plan[pid], credits)
            adv[pid] = group_advantages(win[pid], config.rl.advantage)

        order = [(pid, k) for pid in prompt_ids for k in range(g)]
        tokens = {(pid, k): list(group[pid][k].tokens or []) for pid, k in order}
        empty = [f"{step}:{pid}:{k}" for (pid, k), t in tokens.items() if not t]
        if empty:
            raise DataError(f"RL step {step}: the sampler returned no tokens for {empty[:3]}")
        scoring = [rl_datum(self.prompt_tokens[pid], tokens[(pid, k)]) for pid, k in order]
        policy_out = self.client.forward(scoring, "importance_sampling").result().loss_fn_outputs
        reference_out = (
            self.reference.forward(scoring, "importance_sampling").result().loss_fn_outputs
        )
        n_tokens = sum(len(t) for t in tokens.values())

        data, records = [], []
        kl_sum = entropy_sum = gap_sum = 0.0
        gap_n = 0
        for index, (pid, k) in enumerate(order):
            n = len(tokens[(pid, k)])
            lp = reply_logprobs_of(policy_out[index], n)
            ref = reply_logprobs_of(reference_out[index], n)
            shaped = kl_shaped_advantages(adv[pid][k], lp, ref, config.rl.kl_coef)
            data.append(
                rl_datum(
                    self.prompt_tokens[pid], tokens[(pid, k)], lp, [a / n_tokens for a in shaped]
                )
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

        lengths = [len(t) for t in tokens.values()]
        spreads = [statistics.pstdev(w) for w in win.values()]
        decided = [v.decided for v in verdicts.values()]
        metrics = {
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
            "time/rollout": time.perf_counter() - started,
        }
        return training.StepBatch(data, "importance_sampling", metrics=metrics, payload=records)

    def read_metrics(self, batch: training.StepBatch, out: Any) -> dict[str, Any]:
        """Write the step's rollouts once it has run (with its metrics row, so a resumed run
        drops and redoes both together)."""
        for record in batch.payload:
            append_jsonl(self.stage.file(ROLLOUTS_FILE), record)
        return {}


# -- the trainer ---------------------------------------------------------------------------------
@dataclass
class RLRun:
    """A finished RL run: its checkpoint, its probe rows and the counts of its manifest."""

    checkpoint: Checkpoint
    probes: list[dict[str, Any]]
    counts: dict[str, Any]


def settings_used(config: RLAIFSettings) -> dict[str, Any]:
    """What RL depends on besides its run-time inputs (signal, start, probe prompts): the
    whole ``rl`` section, its ``evals.rl_*`` sizes, the models and the SFT start's settings."""
    return {
        **sft_start.settings_used(config),
        "judge": config.judge,
        "judge_renderer": config.judge_renderer,
        "rl": config.rl,
        "steps": config.steps,
        "group_size": config.group_size,
        "prompts_per_step": config.prompts_per_step,
        "bootstrap": config.bootstrap,
    }


def open_reference(service: Any, client: Any, stage: StageDir, done_steps: int) -> Any:
    """The frozen starting weights as a training client (forward only).

    A fresh run saves the weights it starts from before any update; a resumed run reloads
    them (never its resumed weights)."""
    reference_file = stage.file(REFERENCE_FILE)
    if done_steps == 0 and training.read_progress(stage) is None:
        state = client.save_state("rl-start").result().path
        reference_file.write_text(
            json.dumps({"state_path": portable_path(stage.run_dir, str(state))})
        )
    if not reference_file.is_file():
        raise DataError(
            f"{reference_file} is missing but RL already ran {done_steps} steps; rerun with "
            "on_existing='overwrite'"
        )
    stored = json.loads(reference_file.read_text())["state_path"]
    return resolve_client(
        service.create_training_client_from_state(resolve_path(stage.run_dir, stored))
    )


def train_rl(
    service: Any,
    stage: StageDir,
    config: RLAIFSettings,
    *,
    prompts: Sequence[Mapping[str, str]],
    probe_prompts: Sequence[Mapping[str, str]],
    signal: Comparator,
    start: Checkpoint | None,
    target: training.CheckpointTarget,
    on_existing: str = "resume",
    signal_name: str = "",
) -> RLRun:
    """RL from ``start`` (or the student) on ``prompts`` against ``signal``, probing on
    ``probe_prompts``; records ``target``. Resumable: a restart reloads weights and optimiser,
    drops later metric, rollout and probe rows and redoes those steps (logged samples and
    verdicts are reused); a probe due at the resumed step that is missing is run first."""
    used = settings_used(config) | {
        "signal_identity": signal.identity,
        "start_state": portable_path(stage.run_dir, start.state_path) if start else "",
        "probe_set": [p["id"] for p in probe_prompts],
    }
    stage.prepare(digest(used), on_existing, json_ready(used))
    if stage.manifest().get("status") == "done":
        return RLRun(
            find_checkpoint(target.run_dir, target.checkpoint),
            read_jsonl(stage.file(PROBES_FILE)),
            stage.manifest().get("counts", {}),
        )

    client, done_steps, renderer = training.open_trainer(
        service, stage, config, init_state=start.state_path if start else None
    )
    reference = open_reference(service, client, stage, done_steps)
    rl_step = RLStep(config, client, reference, renderer, stage, prompts, signal)
    for name in (ROLLOUTS_FILE, PROBES_FILE):
        rows = [r for r in read_jsonl(stage.file(name)) if int(r["step"]) <= done_steps]
        write_jsonl(stage.file(name), rows)

    probe = Prober(
        stage,
        service,
        renderer,
        probe_prompts,
        signal,
        rl_step.sampling,
        config.bootstrap,
        config.seed,
    )
    due = probe_steps(config.steps, config.rl.probe_every)
    for step in probe.missing(due, done_steps):  # at most done_steps: the weights held now
        probe(step, client)

    plan = training.TrainingPlan.for_section("RL", config.rl, config.steps, target, config.student)
    checkpoint = training.run_training(
        client,
        stage,
        plan,
        rl_step.make_batch,
        done_steps=done_steps,
        read_metrics=rl_step.read_metrics,
        after_step=lambda step: probe(step, client),
        hook_steps=[s for s in due if s > 0],
    )
    assert checkpoint is not None  # the plan names one
    counts = {
        "steps": config.steps,
        "prompts": len(prompts),
        "replies": (
            config.steps * len(rl_step.schedule[0]) * config.group_size if rl_step.schedule else 0
        ),
        "signal": signal_name or config.rl.signal,
        "init": config.rl.init,
    }
    stage.finish(**counts)
    return RLRun(checkpoint, read_jsonl(stage.file(PROBES_FILE)), counts)
