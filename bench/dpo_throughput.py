"""LoRA DPO throughput: stage 03's engine path vs TRL's ``DPOTrainer``, same model and pairs.

What each side computes, per optimiser step on the same 8 pairs (16 sequences):

* engine (what ``stages/dpo.py`` runs): reference log-probs of every pair are computed once,
  before training, with ``compute_reference_logprobs`` (one no-grad ``forward`` of the training
  client, adapter at its zero init) and reused on every step; a step is one
  ``forward_backward_custom`` over chosen + rejected of all pairs together (one padded forward
  of 16 sequences, full-vocabulary fp32 log-softmax at every position) running
  ``make_dpo_loss_fn`` -> ``objectives.compute_dpo_loss`` with ``nll_coef = kl_coef = 0``,
  then ``optim_step``;
* TRL (``trl.DPOTrainer``, ``loss_type=["sigmoid"]``, no RPO/NLL term): one padded forward of
  the same 16 sequences with its fused LM head (the vocabulary projection only at reply
  positions, in tiles; entropy, mean logit and top-1 accuracy computed too for its logs), and,
  in its default mode, a second no-grad forward of the same batch with the adapter disabled for
  the reference log-probs, every step. With ``precompute_ref_log_probs=True`` the reference
  pass runs once over the dataset when the trainer is built (timed separately, like the
  engine's reference pass) and steps read it from the batch.

Both losses are then the mean over pairs of ``-logsigmoid(beta * ((log pi(chosen) - log
ref(chosen)) - (log pi(rejected) - log ref(rejected))))`` with log-probs summed over the reply
tokens (the reply and its ``<|im_end|>``), beta 0.1. Stage 03 adds ``0.1 * NLL`` (the chosen
reply's mean per-token NLL, per pair) and ``0.001 * KL``; TRL has no term equal to either, so
both are off here. Reference passes use the training batches' grouping (``batch_pairs =
--batch`` on the engine, ``precompute_ref_batch_size = --batch`` in TRL), so at step 1, with the
adapter's B still zero, policy and reference are the same computation and the loss is exactly
``log 2`` on all three. (Stage 03 groups its reference pass differently from its shuffled
training batches; under bf16 autocast a sequence's log-prob depends on its batch's padding, so
the script also reports how far a reference pass grouped in half batches moves the reference
and the step-1 loss.)
Both sides start from the same LoRA weights (TRL's adapter is overwritten with the engine
client's initial A and B) and use the same AdamW (betas 0.9/0.95, eps 1e-12, no weight decay,
constant learning rate 5e-5 as stage 03, no clipping): in fp32 the later losses agree to 4
digits; under bf16 autocast they differ by 0.01-0.03 from step 2 on, because the two forwards
round differently (TRL's tiled reply-only LM head vs the engine's full logits; a sequence's
summed log-prob differs by up to ~0.85 nats between them, 0.0015 in fp32) and one LoRA step's
change is of the same size as bf16 rounding.

Same on both sides: SmolLM2-135M-Instruct loaded from ``resolve_model_dir`` (fp32 master
weights), LoRA rank 8, alpha 32 (the engine's), dropout 0 on the attention and MLP projections
of every block -- not ``lm_head``: TRL 1.x refuses an adapter on the LM head (its fused head
reads ``lm_head.weight`` directly), so the engine runs with ``train_unembed=False`` here --,
bf16 autocast when ``LocalEngineConfig().use_bf16`` (``bf16=True`` for TRL), else fp32 on both,
no gradient checkpointing (TRL turns it on by default), no gradient accumulation, batches taken
in order (TRL's sampler is made sequential), the same ``max_length``. The pairs are built
deterministically: the first ``--pairs`` shipped general prompts, replies of 100-200 tokens
assembled from two constitutions' assertion texts (chosen from one, rejected from another),
rendered by the SmolLM2 renderer; TRL receives the rendered prompt and replies as text and the
script checks that its tokenisation gives exactly the engine's token ids.

Throughput is trained tokens per second: every token of every chosen and rejected sequence
(prompt + reply) of the timed steps, divided by their wall time (warm-up steps excluded); the
same tokens per CPU-second of this process (``time.process_time``, all threads) are reported
too, since on a shared machine they move much less with other processes' load than wall time.
A TRL step is timed from the end of one optimiser step to the end of the next (its whole loop:
collation, both forwards, backward, AdamW, scheduler, logging); an engine step is
``forward_backward_custom`` + ``optim_step`` as stage 03 calls them. Runs alternate engine,
TRL default, TRL precomputed for ``--rounds`` rounds, each on a fresh model over the same
batches. The peak resident memory of the process during each run is reported (the process
also holds the engine's cached base model, ~0.5 GB). ``--replay-check`` adds an engine run per
round with ``micro_batch_tokens`` set to half a step's padded tokens: ``forward_backward_custom``
then scores every micro-batch without a graph and replays it with one (two forwards per step),
which is what stage 03's default batches (32 pairs) do once a step exceeds 8192 padded tokens.
Nothing is asserted.

Usage: python bench/dpo_throughput.py [--pairs 32] [--batch 8] [--warmup 1] [--steps 3]
       [--rounds 2] [--precision auto|bf16|fp32] [--replay-check]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import math
import os
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench/README.md
os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars of datasets, TRL and stage 03

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "lib"))

RANK = 8
PARTS = ("attn", "mlp")  # TRL refuses a LoRA adapter on lm_head


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=32, help="pairs built and trained on")
    parser.add_argument("--batch", type=int, default=8, help="pairs per optimiser step")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per run")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per run")
    parser.add_argument("--rounds", type=int, default=2, help="engine/TRL alternations")
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--learning-rate", type=float, default=5e-5)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--replay-check",
        action="store_true",
        help="also time the engine with a micro-batch budget of half a step (forward replayed)",
    )
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "dpo.jsonl"))
    args = parser.parse_args()
    if importlib.util.find_spec("trl") is None:
        print("dpo_throughput: skipped, TRL is not installed (bench-only peer: pip install trl)")
        return
    if (args.warmup + args.steps) * args.batch > args.pairs:
        parser.error("--pairs must cover (warmup + steps) * batch pairs")
    run(args)


# -- data ----------------------------------------------------------------------------------------
def assertion_sentences(name: str) -> list[str]:
    import yaml

    data = yaml.safe_load((ROOT / "constitutions" / f"{name}.yaml").read_text())
    return [a["text"] for a in data["assertions"]]


def reply(tokenizer, sentences: list[str], start: int, target: int) -> str:
    """Sentences from ``start`` on (cycling) until ``target`` tokens, then cut back word-wise."""
    words: list[str] = []
    i = start
    while len(tokenizer.encode(" ".join(words), add_special_tokens=False)) < target:
        words += sentences[i % len(sentences)].split()
        i += 1
    while len(tokenizer.encode(" ".join(words), add_special_tokens=False)) > target:
        words.pop()
    return " ".join(words)


def build_pairs(tokenizer, count: int, seed: int) -> list[dict]:
    import json

    path = ROOT / "lib" / "character_training" / "data" / "general_prompts.jsonl"
    prompts = [json.loads(line)["prompt"] for line in path.read_text().splitlines()][:count]
    chosen_pool = assertion_sentences("humorous")
    rejected_pool = assertion_sentences("nonchalant")
    pairs = []
    for i, prompt in enumerate(prompts):
        rng = random.Random(f"{seed}:dpo-bench:{i}")
        pairs.append(
            {
                "id": f"bench-{i:03d}",
                "prompt": prompt,
                "chosen": reply(tokenizer, chosen_pool, 3 * i, rng.randint(100, 200)),
                "rejected": reply(tokenizer, rejected_pool, 5 * i, rng.randint(100, 200)),
            }
        )
    return pairs


def full_ids(datum) -> list[int]:
    return datum.model_input.to_ints() + [int(datum.loss_fn_inputs["target_tokens"].data[-1])]


def prompt_length(datum) -> int:
    """Tokens before the first loss token of the rendered sequence."""
    weights = datum.loss_fn_inputs["weights"].data
    return next(i for i, w in enumerate(weights) if w > 0) + 1


def trl_text_rows(tokenizer, data) -> dict[str, list[str]]:
    """Rendered prompt and replies as text (special tokens kept) for TRL's own tokeniser."""
    rows: dict[str, list[str]] = {"prompt": [], "chosen": [], "rejected": []}
    for pair in data:
        ids_c, ids_r = full_ids(pair.chosen), full_ids(pair.rejected)
        cut = prompt_length(pair.chosen)
        assert ids_c[:cut] == ids_r[:cut] and prompt_length(pair.rejected) == cut
        rows["prompt"].append(tokenizer.decode(ids_c[:cut]))
        rows["chosen"].append(tokenizer.decode(ids_c[cut:]))
        rows["rejected"].append(tokenizer.decode(ids_r[cut:]))
    return rows


# -- timing helpers ------------------------------------------------------------------------------
class Stopwatch:
    def __init__(self) -> None:
        self.seconds = 0.0
        self.calls = 0

    @contextlib.contextmanager
    def __call__(self):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds += time.perf_counter() - started
            self.calls += 1


class PeakRss:
    """Peak resident memory of this process while the block runs (sampled every 50 ms)."""

    def __enter__(self):
        import threading

        import psutil

        self.peak = 0
        self._stop = threading.Event()
        process = psutil.Process()

        def sample() -> None:
            while not self._stop.is_set():
                self.peak = max(self.peak, process.memory_info().rss)
                self._stop.wait(0.05)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def mb(self) -> int:
        return round(self.peak / 2**20)


def release_memory() -> None:
    """Collect and hand freed heap back to the OS, so the next run's peak RSS is its own."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# -- the two sides -------------------------------------------------------------------------------
def engine_run(service, data, references, args, lora_init: dict | None):
    """One engine run: a fresh client, ``warmup + steps`` stage-03 steps over the first batches."""
    import torch
    from character_training.backends.local import SMOLLM2_NAME
    from character_training.stages.dpo import compute_reference_logprobs, make_dpo_loss_fn
    from tinker import types

    client = service.create_lora_training_client(
        SMOLLM2_NAME, rank=RANK, seed=args.seed, train_unembed=False
    ).result()
    init = {k: v.detach().clone() for k, v in client.model.named_parameters() if v.requires_grad}
    if lora_init is not None:  # same start every round
        with torch.no_grad():
            for name, param in client.model.named_parameters():
                if name in lora_init:
                    param.copy_(lora_init[name])
    reference_seconds = regrouped_references = None
    if references is None:
        with tempfile.TemporaryDirectory() as tmp:
            # Reference batches = training batches, so that step 1 compares like with like.
            started = time.perf_counter()
            references = compute_reference_logprobs(
                client, data, Path(tmp) / "ref.jsonl", batch_pairs=args.batch
            )
            reference_seconds = time.perf_counter() - started
            # The same pairs grouped differently (half batches), to measure what another batch
            # composition does to the reference under bf16 autocast: stage 03 groups its
            # reference pass (16 pairs) unlike its shuffled training batches. Half batches keep
            # the peak memory below a training step's.
            regrouped_references = compute_reference_logprobs(
                client, data, Path(tmp) / "ref_regrouped.jsonl", batch_pairs=max(1, args.batch // 2)
            )
    losses, times, cpu_times = [], [], []
    for step in range(args.warmup + args.steps):
        batch = data[step * args.batch : (step + 1) * args.batch]
        started, cpu_started = time.perf_counter(), time.process_time()
        loss_fn = make_dpo_loss_fn(
            [references[p.pair_id] for p in batch], beta=args.beta, nll_coef=0.0, kl_coef=0.0
        )
        out = client.forward_backward_custom(
            [d for p in batch for d in (p.chosen, p.rejected)], loss_fn
        ).result()
        client.optim_step(types.AdamParams(learning_rate=args.learning_rate)).result()
        times.append(time.perf_counter() - started)
        cpu_times.append(time.process_time() - cpu_started)
        losses.append(out.metrics["dpo/loss"])
    del client
    release_memory()
    return {
        "losses": losses,
        "step_seconds": times,
        "step_cpu_seconds": cpu_times,
        "reference_seconds": reference_seconds,
        "regrouped_references": regrouped_references,
        "references": references,
        "lora_init": init if lora_init is None else lora_init,
    }


def trl_run(model_dir, text_rows, data, args, lora_init: dict, use_bf16: bool, precompute: bool):
    """One TRL run: a fresh model and trainer, ``trainer.train()`` for ``warmup + steps``."""
    import datasets
    import torch
    import trl.trainer.dpo_trainer as dpo_module
    from bench_common import engine_lora
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback, TrainerCallback
    from transformers.utils import logging as hf_logging
    from trl import DPOConfig, DPOTrainer

    hf_logging.set_verbosity_error()
    # Otherwise a later round's trainer finds the first one's precomputed reference in the
    # datasets cache (same fingerprint) and skips the pass it is meant to time.
    datasets.disable_caching()
    ref_watch, precompute_watch = Stopwatch(), Stopwatch()
    original_use_adapter = dpo_module.use_adapter

    @contextlib.contextmanager
    def timed_use_adapter(*a, **k):  # wraps exactly TRL's reference forward (adapter disabled)
        with ref_watch(), original_use_adapter(*a, **k):
            yield

    step_ends: list[float] = []

    class StepClock(TrainerCallback):
        def on_step_begin(self, args_, state, control, **kwargs):
            if not step_ends:
                step_ends.append((time.perf_counter(), time.process_time()))

        def on_step_end(self, args_, state, control, **kwargs):
            step_ends.append((time.perf_counter(), time.process_time()))

    losses: list[float] = []
    ref_per_step: list[float] = []

    class BenchDPOTrainer(DPOTrainer):
        def _get_train_sampler(self, train_dataset=None):
            return SequentialSampler(
                train_dataset if train_dataset is not None else self.train_dataset
            )

        def _precompute_ref_logps(self, dataset, name, batch_size):
            with precompute_watch():
                return super()._precompute_ref_logps(dataset, name, batch_size)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            before = ref_watch.seconds
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            losses.append(float(loss.detach()))
            ref_per_step.append(ref_watch.seconds - before)
            return loss

    with tempfile.TemporaryDirectory() as tmp:
        config = DPOConfig(
            output_dir=tmp,
            per_device_train_batch_size=args.batch,
            gradient_accumulation_steps=1,
            max_steps=args.warmup + args.steps,
            learning_rate=args.learning_rate,
            lr_scheduler_type="constant",
            warmup_steps=0,
            optim="adamw_torch",
            adam_beta1=0.9,
            adam_beta2=0.95,
            adam_epsilon=1e-12,
            weight_decay=0.0,
            max_grad_norm=0.0,
            beta=args.beta,
            loss_type=["sigmoid"],
            max_length=args.max_length,
            precompute_ref_log_probs=precompute,
            precompute_ref_batch_size=args.batch,  # as the engine's reference pass here
            gradient_checkpointing=False,
            bf16=use_bf16,
            fp16=False,
            use_cpu=True,
            seed=args.seed,
            logging_steps=1,
            report_to="none",
            save_strategy="no",
            disable_tqdm=True,
            dataloader_num_workers=0,
        )
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        lora = engine_lora(model, RANK, PARTS)
        dataset = Dataset.from_dict(text_rows)
        dpo_module.use_adapter = timed_use_adapter
        try:
            started = time.perf_counter()
            trainer = BenchDPOTrainer(
                model=model,
                args=config,
                train_dataset=dataset,
                processing_class=tokenizer,
                peft_config=lora,
                callbacks=[StepClock()],
            )
            build_seconds = time.perf_counter() - started
            trainer.remove_callback(PrinterCallback)  # no log dict printed per step
            ref_watch.seconds = 0.0
            mismatched = token_mismatches(trainer.train_dataset, data)
            copied = 0
            with torch.no_grad():
                for name, param in trainer.model.named_parameters():
                    if name in lora_init:
                        param.copy_(lora_init[name])
                        copied += 1
            ref_sums = None
            if precompute:
                ref_sums = (
                    list(trainer.train_dataset["ref_chosen_logps"]),
                    list(trainer.train_dataset["ref_rejected_logps"]),
                )
            trainer.train()
        finally:
            dpo_module.use_adapter = original_use_adapter
    times = [b[0] - a[0] for a, b in zip(step_ends, step_ends[1:])]
    cpu_times = [b[1] - a[1] for a, b in zip(step_ends, step_ends[1:])]
    del trainer, model
    release_memory()
    return {
        "losses": losses,
        "step_seconds": times,
        "step_cpu_seconds": cpu_times,
        "ref_forward_seconds": ref_per_step,
        "build_seconds": build_seconds,
        "precompute_seconds": precompute_watch.seconds if precompute else None,
        "token_mismatches": mismatched,
        "lora_tensors_copied": copied,
        "lora_tensors_expected": len(lora_init),
        "ref_sums": ref_sums,
    }


def token_mismatches(dataset, data) -> int:
    """Pairs whose TRL token ids differ from the engine's rendered sequences."""
    bad = 0
    for row, pair in zip(dataset, data):
        chosen = row["prompt_ids"] + row["chosen_ids"]
        rejected = row["prompt_ids"] + row["rejected_ids"]
        if chosen != full_ids(pair.chosen) or rejected != full_ids(pair.rejected):
            bad += 1
    return bad + abs(len(dataset) - len(data))


# -- the benchmark -------------------------------------------------------------------------------
def run(args) -> None:
    import torch
    import trl
    from bench_common import machine_fields, report
    from character_training.backends.local import (
        SMOLLM2_NAME,
        LocalServiceClient,
        resolve_model_dir,
    )
    from character_training.objectives import compute_dpo_loss
    from character_training.renderers import get_renderer
    from character_training.stages.dpo import build_pair_data

    load_before = load_average()
    service = LocalServiceClient(root_dir=str(ROOT / "runs" / ".bench"), precision=args.precision)
    use_bf16 = service.engine.compute_dtype == torch.bfloat16
    model_dir = resolve_model_dir(SMOLLM2_NAME)
    tokenizer = service.engine.tokenizer(SMOLLM2_NAME)
    pairs = build_pairs(tokenizer, args.pairs, args.seed)
    data, dropped = build_pair_data(pairs, get_renderer("smollm2", tokenizer), args.max_length)
    if dropped or len(data) != len(pairs):
        raise SystemExit(f"dpo_throughput: {len(dropped)} pairs dropped: {dropped[:3]}")
    text_rows = trl_text_rows(tokenizer, data)
    n_steps = args.warmup + args.steps
    step_tokens = [
        sum(
            len(full_ids(d))
            for p in data[s * args.batch : (s + 1) * args.batch]
            for d in (p.chosen, p.rejected)
        )
        for s in range(n_steps)
    ]
    timed_tokens = sum(step_tokens[args.warmup :])
    reply_lengths = [
        len(full_ids(d)) - prompt_length(d) for p in data for d in (p.chosen, p.rejected)
    ]
    print(
        f"dpo_throughput: {len(data)} pairs, replies {min(reply_lengths)}-{max(reply_lengths)} "
        f"tokens, {n_steps} steps x {args.batch} pairs per run ({args.warmup} warm-up), "
        f"{timed_tokens} timed tokens per run, autocast {service.engine.compute_dtype}, "
        f"trl {trl.__version__}, load {load_before}",
        flush=True,
    )

    replay_service = None
    if args.replay_check:
        # A budget that fits half of a step's sequences: forward_backward_custom then scores
        # without a graph and replays each micro-batch with one, as it does for stage 03's
        # default batches (32 pairs of replies over ~128 tokens exceed 8192 padded tokens).
        budget = args.batch * max(len(full_ids(d)) for p in data for d in (p.chosen, p.rejected))
        replay_service = LocalServiceClient(
            root_dir=str(ROOT / "runs" / ".bench"),
            precision=args.precision,
            micro_batch_tokens=budget,
        )
    rounds = []
    references = lora_init = regrouped_references = None
    first = {}
    for r in range(args.rounds):
        result = {}
        with PeakRss() as rss:
            eng = engine_run(service, data, references, args, lora_init)
        eng["peak_rss_mb"] = rss.mb
        if references is None:
            references, lora_init = eng["references"], eng["lora_init"]
            regrouped_references = eng["regrouped_references"]
            first["engine_reference_seconds"] = round(eng["reference_seconds"], 2)
        result["engine"] = eng
        print(f"round {r + 1} engine: {summary(eng, args, timed_tokens)}", flush=True)
        for name, precompute in (("trl_default", False), ("trl_precomputed", True)):
            with PeakRss() as rss:
                out = trl_run(model_dir, text_rows, data, args, lora_init, use_bf16, precompute)
            out["peak_rss_mb"] = rss.mb
            result[name] = out
            print(f"round {r + 1} {name}: {summary(out, args, timed_tokens)}", flush=True)
        if replay_service is not None:
            with PeakRss() as rss:
                out = engine_run(replay_service, data, references, args, lora_init)
            out["peak_rss_mb"] = rss.mb
            result["engine_replay"] = out
            print(f"round {r + 1} engine_replay: {summary(out, args, timed_tokens)}", flush=True)
        rounds.append(result)

    # Checks: TRL saw the engine's tokens and LoRA init; both start at log 2 and agree.
    first_round = rounds[0]
    ref_diff = None
    sums = first_round["trl_precomputed"]["ref_sums"]
    if sums is not None:
        ref_diff = max(
            abs(float(references[p.pair_id][side].sum()) - float(sums[side][i]))
            for i, p in enumerate(data)
            for side in (0, 1)
        )
    # The step-1 loss with the regrouped reference (what a grouping unlike training gives).
    batch0 = [p.pair_id for p in data[: args.batch]]
    regrouped_first_loss, _ = compute_dpo_loss(
        [references[i][0] for i in batch0],
        [references[i][1] for i in batch0],
        [regrouped_references[i][0] for i in batch0],
        [regrouped_references[i][1] for i in batch0],
        beta=args.beta,
    )
    regrouped_diff = max(
        float((references[p.pair_id][side] - regrouped_references[p.pair_id][side]).sum().abs())
        for p in data
        for side in (0, 1)
    )
    record = {
        "bench": "dpo_throughput",
        "model": SMOLLM2_NAME,
        "trl_version": trl.__version__,
        "autocast_dtype": str(service.engine.compute_dtype),
        "lora": f"rank {RANK}, alpha 32, dropout 0, attn+mlp (no lm_head: TRL refuses it)",
        "pairs": len(data),
        "batch_pairs": args.batch,
        "beta": args.beta,
        "max_length": args.max_length,
        "warmup_steps": args.warmup,
        "timed_steps": args.steps,
        "timed_tokens_per_run": timed_tokens,
        "reply_tokens_min_max": [min(reply_lengths), max(reply_lengths)],
        "engine_reference_pass_s": first["engine_reference_seconds"],
        "trl_precompute_pass_s": [
            round(rd["trl_precomputed"]["precompute_seconds"], 2) for rd in rounds
        ],
        "first_step_loss": {
            name: round(first_round[name]["losses"][0], 6)
            for name in ("engine", "trl_default", "trl_precomputed")
        },
        "log2": round(math.log(2), 6),
        "losses_round1": {
            name: [round(x, 4) for x in first_round[name]["losses"]]
            for name in ("engine", "trl_default", "trl_precomputed")
        },
        "regrouped_reference_max_abs_diff_seq_logp": round(regrouped_diff, 4),
        "regrouped_reference_first_step_loss": round(float(regrouped_first_loss), 6),
        "reference_logp_max_abs_diff_engine_vs_trl": None
        if ref_diff is None
        else round(ref_diff, 4),
        "trl_token_mismatches": first_round["trl_default"]["token_mismatches"],
        "trl_lora_tensors_copied": [
            first_round["trl_default"]["lora_tensors_copied"],
            first_round["trl_default"]["lora_tensors_expected"],
        ],
    }
    if args.replay_check:
        record["engine_replay_micro_batch_tokens"] = replay_service.config.micro_batch_tokens
        record["losses_round1"]["engine_replay"] = [
            round(x, 4) for x in first_round["engine_replay"]["losses"]
        ]
    for r, rd in enumerate(rounds, start=1):
        tps = {name: tokens_per_s(rd[name], args, timed_tokens) for name in rd}
        record[f"round{r}_tok_per_s"] = {k: round(v, 1) for k, v in tps.items()}
        record[f"round{r}_ratio_engine_vs_trl_default"] = round(
            tps["engine"] / tps["trl_default"], 2
        )
        record[f"round{r}_ratio_engine_vs_trl_precomputed"] = round(
            tps["engine"] / tps["trl_precomputed"], 2
        )
        cpu = {name: tokens_per_s(rd[name], args, timed_tokens, "step_cpu_seconds") for name in rd}
        record[f"round{r}_tok_per_cpu_s"] = {k: round(v, 1) for k, v in cpu.items()}
        record[f"round{r}_cpu_ratio_engine_vs_trl_default"] = round(
            cpu["engine"] / cpu["trl_default"], 2
        )
        record[f"round{r}_cpu_ratio_engine_vs_trl_precomputed"] = round(
            cpu["engine"] / cpu["trl_precomputed"], 2
        )
        record[f"round{r}_peak_rss_mb"] = {name: rd[name]["peak_rss_mb"] for name in rd}
        ref = rd["trl_default"]["ref_forward_seconds"][args.warmup :]
        step = rd["trl_default"]["step_seconds"][args.warmup :]
        record[f"round{r}_trl_default_ref_forward_share"] = round(sum(ref) / sum(step), 3)
    for prefix, key in (("", "step_seconds"), ("cpu_", "step_cpu_seconds")):
        totals = {
            name: sum(sum(rd[name][key][args.warmup :]) for rd in rounds) for name in rounds[0]
        }
        for peer in ("trl_default", "trl_precomputed"):
            record[f"{prefix}ratio_engine_vs_{peer}"] = round(totals[peer] / totals["engine"], 2)
        if "engine_replay" in totals:
            record[f"{prefix}ratio_engine_vs_engine_replay"] = round(
                totals["engine_replay"] / totals["engine"], 2
            )
    record.update(
        {
            "load_average_before": load_before,
            "load_average_after": load_average(),
            **machine_fields(),
        }
    )
    report(record, args.out, 40)


def tokens_per_s(result: dict, args, timed_tokens: int, key: str = "step_seconds") -> float:
    return timed_tokens / sum(result[key][args.warmup :])


def summary(result: dict, args, timed_tokens: int) -> str:
    steps = ", ".join(f"{s:.1f}" for s in result["step_seconds"])
    text = (
        f"{tokens_per_s(result, args, timed_tokens):.1f} tok/s "
        f"({tokens_per_s(result, args, timed_tokens, 'step_cpu_seconds'):.1f} per CPU-s), "
        f"steps [{steps}] s, "
        f"first loss {result['losses'][0]:.6f}"
    )
    if result.get("ref_forward_seconds"):
        ref = sum(result["ref_forward_seconds"][args.warmup :])
        text += f", reference forwards {ref:.1f} s of timed steps"
    if result.get("precompute_seconds") is not None:
        text += f", precompute {result['precompute_seconds']:.1f} s"
    if result.get("reference_seconds") is not None:
        text += f", reference pass {result['reference_seconds']:.1f} s"
    return text + f", peak RSS {result['peak_rss_mb']} MB, load {load_average()}"


if __name__ == "__main__":
    main()
