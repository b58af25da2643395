"""Service pipelining: clock cycles per training step and sampling round trips, before and after.

Every number this script prints is *simulated* service time from
`character_training.testing.SimulatedService` (virtual time: nothing sleeps, nothing depends on
this machine's speed); the local engine, on the two-layer ``tiny-random`` model by default, only
computes what the loops need (losses, replies), unchanged. The model of time, in short: the
service trains in clock cycles of ``--cycle`` seconds, each cycle running at most one model pass
per training client followed by its ``optim_step`` if that was submitted before the cycle began;
sampling runs ``--slots`` requests at once, each taking ``--latency`` seconds. See the module
docstring of `testing.simulated_service`.

Workloads, each "before" and "after" on a fresh simulated service:

* **05 SFT** (``cross_entropy``), ``--steps`` steps with a resume point every ``--save-every``
  and the final checkpoint. Before: the loop every stage had up to commit 2317907
  (``forward_backward(...).result()``, then ``optim_step(...).result()``). After:
  `training.run_training` (both calls back to back, step s+1 submitted before step s is read).
* **03 DPO**: stage 03's reference pass (``compute_reference_logprobs``, one ``forward`` per 16
  pairs) and its client-side DPO loss (``make_dpo_loss_fn`` in ``forward_backward_custom``),
  before and after as for SFT. A client-side loss is two passes (forward, then the backward
  of the surrogate once the loss is known), so it cannot go below 2 cycles a step.
* **02 / 07 sampling**: ``--requests`` chat requests. Before: one request at a time, and the
  loop `sampling.sample_chat` had up to issue 18 (chunks of ``DEFAULT_CHUNK_SIZE``, every chunk
  read before the next was issued). After: `sampling.sample_chat` as stages 02 and 07 call it
  (a window of ``DEFAULT_CHUNK_SIZE`` requests in flight, the next issued as each result is
  read, in order), and with ``chunk_size=--window``; against the slot bound
  ``ceil(N / slots)`` latencies.

Training runs twice: with an instant client (``arrival_delay_s=0``, the model's default) and with
``--delay`` cycles between a call and its arrival (network, client work), where a request sent
on reading an answer misses the cycle that began with it.

Usage: python bench/service_pipelining.py [--steps 40] [--save-every 20] [--cycle 10]
       [--delay 0.05] [--requests 512] [--slots 32 96 128 512] [--latency 15] [--window 512]
       [--only training|sampling]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench/README.md
os.environ.setdefault("TQDM_DISABLE", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "lib"))

from character_training.backends.local import TINY_RANDOM_NAME, LocalServiceClient  # noqa: E402
from character_training.metrics import JsonlLogger  # noqa: E402
from character_training.renderers import get_renderer  # noqa: E402
from character_training.renderers.conversation import (  # noqa: E402
    generation_prompt,
    supervised_datum,
)
from character_training.sampling import (  # noqa: E402
    DEFAULT_CHUNK_SIZE,
    SampleRequest,
    derive_seed,
    sample_chat,
)
from character_training.stages import dpo  # noqa: E402
from character_training.store import stage_dir  # noqa: E402
from character_training.testing import SimulatedService  # noqa: E402
from character_training.training import (  # noqa: E402
    CheckpointTarget,
    LRSchedule,
    StepBatch,
    TrainingPlan,
    finish_checkpoint,
    run_training,
    save_progress,
)
from tinker import types  # noqa: E402

LEARNING_RATE = 1e-4
RANK = 4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="optimiser steps per training run")
    parser.add_argument("--save-every", type=int, default=20, help="steps between resume points")
    parser.add_argument("--batch", type=int, default=4, help="examples (SFT) or pairs (DPO)")
    parser.add_argument("--cycle", type=float, default=10.0, help="clock cycle, seconds")
    parser.add_argument("--delay", type=float, default=0.05, help="client delay, in cycles")
    parser.add_argument("--requests", type=int, default=512, help="sampling requests")
    parser.add_argument("--slots", type=int, nargs="+", default=[32, 96, 128, 512])
    parser.add_argument("--latency", type=float, default=15.0, help="seconds per request")
    parser.add_argument("--window", type=int, default=512, help="a wider sample_chat window")
    parser.add_argument("--max-tokens", type=int, default=8, help="local reply budget")
    parser.add_argument("--model", default=TINY_RANDOM_NAME)
    parser.add_argument("--only", choices=["training", "sampling"], help="one half only")
    parser.add_argument(
        "--out", default=str(ROOT / "bench" / "results" / "service_pipelining.jsonl")
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        local = LocalServiceClient(root_dir=str(Path(tmp) / "engine"), precision="fp32")
        renderer = get_renderer("smollm2", local.engine.tokenizer(args.model))
        prompts = general_prompts(max(args.requests, args.steps * args.batch))
        records = []
        if args.only != "sampling":
            records += training_rows(args, local, renderer, prompts, Path(tmp))
        if args.only != "training":
            records += sampling_rows(args, local, renderer, prompts)
    log = JsonlLogger(args.out)
    for record in records:
        log.log(0, record)
    print(f"\nrecorded {len(records)} rows in {args.out}")


def general_prompts(count: int) -> list[str]:
    path = ROOT / "lib" / "character_training" / "data" / "general_prompts.jsonl"
    rows = [json.loads(line)["prompt"] for line in path.read_text().splitlines() if line]
    return [rows[i % len(rows)] for i in range(count)]


# -- training ------------------------------------------------------------------------------------
def sequential_training(client, stage, plan: TrainingPlan, make_batch) -> None:
    """The stages' loop before `run_training`: every result read before the next call."""
    for step in range(1, plan.total_steps + 1):
        batch = make_batch(step)
        if callable(batch.loss):
            client.forward_backward_custom(list(batch.data), batch.loss).result()
        else:
            client.forward_backward(list(batch.data), batch.loss).result()
        client.optim_step(types.AdamParams(learning_rate=LEARNING_RATE)).result()
        if step % plan.save_every == 0 and step < plan.total_steps:
            save_progress(client, stage, step)
    target = plan.target
    finish_checkpoint(client, target.run_dir, target.checkpoint, target.stage_name, plan.base_model)


def sft_batches(renderer, prompts, steps: int, batch: int):
    data = [
        supervised_datum(
            renderer,
            [{"role": "user", "content": p}, {"role": "assistant", "content": f"Reply {i}."}],
        )
        for i, p in enumerate(prompts[: steps * batch])
    ]
    return lambda step: StepBatch(data[(step - 1) * batch : step * batch], "cross_entropy")


def dpo_batches(client, renderer, prompts, steps: int, batch: int, folder: Path):
    """Stage 03's reference pass on the client, then its loss per step's pairs."""
    rows = [
        {"id": f"p{i}", "prompt": p, "chosen": f"Gladly: answer {i}.", "rejected": f"No. {i}"}
        for i, p in enumerate(prompts[: steps * batch])
    ]
    pairs, _ = dpo.build_pair_data(rows, renderer, max_length=512)
    references = dpo.compute_reference_logprobs(client, pairs, folder / "reference.jsonl")

    def make_batch(step: int) -> StepBatch:
        chunk = pairs[(step - 1) * batch : step * batch]
        loss = dpo.make_dpo_loss_fn(
            [references[p.pair_id] for p in chunk], beta=0.1, nll_coef=0.1, kl_coef=0.001
        )
        return StepBatch([d for p in chunk for d in (p.chosen, p.rejected)], loss)

    return make_batch


def training_cycles(service) -> tuple[int, int]:
    """(reference forwards, cycles from the first training pass to the last optimiser step)."""
    timed = [e for e in service.events if e.cycle is not None]
    forwards = sum(e.op == "forward" for e in timed)
    trained = [e.cycle for e in timed if e.op != "forward"]
    return forwards, (max(trained) - min(trained) + 1) if trained else 0


def training_rows(args, local, renderer, prompts, tmp: Path) -> list[dict]:
    rows = []
    print(
        f"training: {args.steps} steps, resume point every {args.save_every}, cycle "
        f"{args.cycle:g} s (simulated)"
    )
    print(
        f"{'workload':<8} {'delay':>6} {'ref fwd':>7} {'cyc/step before':>15} "
        f"{'after':>6} {'wall before':>11} {'after':>9} {'ratio':>6}"
    )
    for workload in ("05 SFT", "03 DPO"):
        for delay in (0.0, args.delay):
            result = {}
            for side in ("before", "after"):
                service = SimulatedService(
                    local, cycle_s=args.cycle, arrival_delay_s=delay * args.cycle
                )
                client = service.create_lora_training_client(args.model, rank=RANK, seed=0)
                client = client.result()
                folder = tmp / f"{workload[:2]}-{delay}-{side}"
                stage = stage_dir(folder, "stage")
                stage.path.mkdir(parents=True)
                if workload == "05 SFT":
                    make_batch = sft_batches(renderer, prompts, args.steps, args.batch)
                else:
                    make_batch = dpo_batches(
                        client, renderer, prompts, args.steps, args.batch, stage.path
                    )
                plan = TrainingPlan(
                    name=workload,
                    total_steps=args.steps,
                    schedule=LRSchedule(LEARNING_RATE),
                    save_every=args.save_every,
                    target=CheckpointTarget(folder, "stage", "bench"),
                    base_model=args.model,
                )
                if side == "before":
                    sequential_training(client, stage, plan, make_batch)
                else:
                    run_training(client, stage, plan, make_batch, done_steps=0)
                forwards, span = training_cycles(service)
                result[side] = {
                    "reference_forwards": forwards,
                    "cycles_per_step": span / args.steps,
                    "wall_s": service.now(),
                }
            ratio = result["before"]["wall_s"] / result["after"]["wall_s"]
            print(
                f"{workload:<8} {delay:>6g} {result['after']['reference_forwards']:>7} "
                f"{result['before']['cycles_per_step']:>15.2f} "
                f"{result['after']['cycles_per_step']:>6.2f} "
                f"{result['before']['wall_s']:>10.0f}s {result['after']['wall_s']:>8.0f}s "
                f"{ratio:>5.2f}x"
            )
            rows.append(
                {
                    "bench": "service_pipelining",
                    "workload": workload,
                    "model": args.model,
                    "steps": args.steps,
                    "save_every": args.save_every,
                    "cycle_s": args.cycle,
                    "arrival_delay_cycles": delay,
                    "before": result["before"],
                    "after": result["after"],
                    "wall_ratio": ratio,
                }
            )
    return rows


# -- sampling ------------------------------------------------------------------------------------
def one_at_a_time(sampler, renderer, requests, settings) -> None:
    for request in requests:
        sampler.sample(*sample_call(renderer, request, settings)).result()


def chunked(sampler, renderer, requests, settings, chunk: int) -> None:
    """``sample_chat``'s loop before issue 18: a chunk issued whole, then read whole."""
    for start in range(0, len(requests), chunk):
        issued = [
            sampler.sample(*sample_call(renderer, request, settings))
            for request in requests[start : start + chunk]
        ]
        for future in issued:
            future.result()


def sample_call(renderer, request: SampleRequest, settings: dict):
    prompt = generation_prompt(renderer, request.messages)
    params = types.SamplingParams(
        max_tokens=settings["max_tokens"],
        temperature=settings["temperature"],
        top_p=settings["top_p"],
        seed=derive_seed(settings["seed"], request.key),
        stop=renderer.get_stop_sequences(),
    )
    return prompt, 1, params


def sampling_rows(args, local, renderer, prompts) -> list[dict]:
    requests = [
        SampleRequest(key=f"r{i}", messages=[{"role": "user", "content": p}])
        for i, p in enumerate(prompts[: args.requests])
    ]
    settings = dict(max_tokens=args.max_tokens, temperature=1.0, top_p=1.0, seed=0)
    print(
        f"\nsampling: {len(requests)} requests, {args.latency:g} s each (simulated), "
        f"window (chunk) {DEFAULT_CHUNK_SIZE}; in latencies"
    )
    print(
        f"{'slots':>6} {'one at a time':>13} {'chunks before':>13} {'sample_chat':>11} "
        f"{f'window {args.window}':>11} {'slot bound':>10} {'chunks/bound':>12} "
        f"{'chat/bound':>10} {'wide/bound':>10}"
    )

    def latencies(slots: int, run) -> float:
        service = SimulatedService(local, sampling_slots=slots, sample_latency_s=args.latency)
        client = service.create_sampling_client(base_model=args.model).result()
        client._sampler.show_progress = False  # the local decoder's bar (not a measurement)
        run(client)
        return service.now() / args.latency

    sequential = latencies(1, lambda s: one_at_a_time(s, renderer, requests, settings))
    rows = []
    for slots in args.slots:
        before = latencies(
            slots, lambda s: chunked(s, renderer, requests, settings, DEFAULT_CHUNK_SIZE)
        )
        chat = latencies(slots, lambda s: sample_chat(s, renderer, requests, **settings))
        window = latencies(
            slots,
            lambda s: sample_chat(s, renderer, requests, **settings, chunk_size=args.window),
        )
        bound = math.ceil(len(requests) / slots)
        print(
            f"{slots:>6} {sequential:>13.0f} {before:>13.0f} {chat:>11.0f} {window:>11.0f} "
            f"{bound:>10} {before / bound:>11.2f}x {chat / bound:>9.2f}x {window / bound:>9.2f}x"
        )
        rows.append(
            {
                "bench": "service_pipelining",
                "workload": "02/07 sampling",
                "requests": len(requests),
                "slots": slots,
                "latency_s": args.latency,
                "chunk_size": DEFAULT_CHUNK_SIZE,
                "window": args.window,
                "latencies": {
                    "one_at_a_time": sequential,
                    "chunks_before": before,
                    "sample_chat": chat,
                    "sample_chat_wide_window": window,
                    "slot_bound": bound,
                },
            }
        )
    return rows


if __name__ == "__main__":
    main()
