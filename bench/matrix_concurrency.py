"""Matrix concurrency: a 2 x 2 persona x size matrix with ``--jobs 4`` against its slowest chain.

What is measured is the runner (`runner.run_matrix`: its chain threads, lock files, live table
and index rebuilds), not a model: each "notebook" is a workload driven against its chain's own
`character_training.testing.SimulatedService` in **scaled time** (``--time-scale`` real seconds
per simulated second), so waiting on the service takes real wall time while the local engine,
on the two-layer ``tiny-random`` model, computes the answers (its compute is client-side time,
as on Tinker). A chain is four stages shaped like the pipeline's:

* ``02_distillation`` and ``07_preferences``: ``--requests`` chat requests through
  `sampling.sample_chat` on ``--slots`` sampling slots of ``--latency`` simulated seconds;
* ``03_dpo`` and ``05_sft``: `training.run_training` steps (cross-entropy on chat examples,
  a resume point every ``--save-every``), ``--steps`` of them on the larger size and half as
  many on the smaller, so the two sizes' chains differ in length and one is the slowest.

Every chain gets its own service wrapper and local engine (a chain is one user of Tinker; its
sampling slots are not shared with the other chains here). The script times each chain alone
(``--jobs 1``, a fresh service), then the matrix with ``--jobs 1`` (the runner before issue 18:
one chain after another) and with ``--jobs 4``, and prints each matrix's wall time over the
slowest chain's. The target (issue 18): ``--jobs 4`` at most 1.3x. Timing is wall clock, so a
loaded CPU inflates every side; the load average and the CPU are printed with the result.

Usage: python bench/matrix_concurrency.py [--steps 6] [--save-every 3] [--requests 32]
       [--slots 32] [--cycle 10] [--latency 15] [--time-scale 0.25] [--repeats 1] [--serial]
"""

from __future__ import annotations

import argparse
import copy
import io
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench/README.md
os.environ.setdefault("TQDM_DISABLE", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "lib"))
sys.path.insert(0, str(ROOT / "bench"))

import nbformat  # noqa: E402
from character_training.backends.local import TINY_RANDOM_NAME, LocalServiceClient  # noqa: E402
from character_training.live_table import MatrixTable  # noqa: E402
from character_training.metrics import JsonlLogger  # noqa: E402
from character_training.renderers import get_renderer  # noqa: E402
from character_training.renderers.conversation import supervised_datum  # noqa: E402
from character_training.runner import NotebookResult, run_matrix  # noqa: E402
from character_training.sampling import SampleRequest, sample_chat  # noqa: E402
from character_training.store import stage_dir  # noqa: E402
from character_training.testing import SimulatedService  # noqa: E402
from character_training.training import (  # noqa: E402
    CheckpointTarget,
    LRSchedule,
    StepBatch,
    TrainingPlan,
    run_training,
)
from service_pipelining import LEARNING_RATE, RANK  # noqa: E402

PERSONAS = ("sarcastic", "loving")
SIZES = ("qwen3.5-4b", "qwen3.5-9b")  # Tinker presets: no local-CPU warning; nothing is paid
STAGES = ("02_distillation", "03_dpo", "05_sft", "07_preferences")
SAMPLING_STAGES = ("02_distillation", "07_preferences")


@dataclass
class Chain:
    """One chain's service, its engine's renderer, and how long its training stages are."""

    service: SimulatedService
    renderer: Any
    steps: int
    folder: Path


class StageWorkloads:
    """The runner's notebook executor: runs the stage's workload on the chain's service."""

    def __init__(self, chains: dict[tuple[str, str], Chain], args: argparse.Namespace):
        self.chains = chains
        self.args = args

    def __call__(self, params, notebook: str) -> NotebookResult:
        chain = self.chains[(params.persona, params.size)]
        started = time.perf_counter()
        if notebook in SAMPLING_STAGES:
            self.sample(chain, notebook)
        else:
            self.train(
                chain, notebook, chain.steps if notebook == "03_dpo" else -(-chain.steps // 2)
            )
        return NotebookResult(
            params.persona, params.size, notebook, "ok", seconds=time.perf_counter() - started
        )

    def sample(self, chain: Chain, notebook: str) -> None:
        client = chain.service.create_sampling_client(base_model=self.args.model).result()
        client._sampler.show_progress = False  # the local decoder's bar (not a measurement)
        requests = [
            SampleRequest(key=f"{notebook}-{i}", messages=[{"role": "user", "content": f"Hi {i}."}])
            for i in range(self.args.requests)
        ]
        sample_chat(
            client, chain.renderer, requests, max_tokens=4, temperature=1.0, top_p=1.0, seed=0
        )

    def train(self, chain: Chain, notebook: str, steps: int) -> None:
        client = chain.service.create_lora_training_client(self.args.model, rank=RANK, seed=0)
        client = client.result()
        folder = chain.folder / notebook
        stage = stage_dir(folder, "stage")
        stage.path.mkdir(parents=True)
        plan = TrainingPlan(
            name=notebook,
            total_steps=steps,
            schedule=LRSchedule(LEARNING_RATE),
            save_every=self.args.save_every,
            target=CheckpointTarget(folder, "stage", "bench"),
            base_model=self.args.model,
        )
        data = [
            supervised_datum(
                chain.renderer,
                [{"role": "user", "content": f"Hi {i}."}, {"role": "assistant", "content": "Ok."}],
            )
            for i in range(2 * steps)
        ]
        make_batch = lambda step: StepBatch(data[2 * step - 2 : 2 * step], "cross_entropy")  # noqa: E731
        run_training(client, stage, plan, make_batch, done_steps=0)


def new_chains(args, root: Path, personas, sizes) -> dict[tuple[str, str], Chain]:
    """A fresh local engine and simulated service per chain (made before the clock starts)."""
    chains = {}
    for persona in personas:
        for size in sizes:
            folder = Path(tempfile.mkdtemp(prefix=f"{persona}-{size}-", dir=root))
            local = LocalServiceClient(root_dir=str(folder / "engine"), precision="fp32")
            service = SimulatedService(
                local,
                cycle_s=args.cycle,
                sampling_slots=args.slots,
                sample_latency_s=args.latency,
                time_scale=args.time_scale,
            )
            # load the model now: transformers' loading is not thread-safe (chains loading at
            # once fail on meta tensors), and a load is no part of what is timed
            local.engine.sampling_base(args.model)
            local.engine.load_trainable_base(args.model)
            # and a tokenizer of its own: the engine caches one per model for the process, and
            # a fast tokenizer used from two threads at once fails ("Already borrowed")
            tokenizer = copy.deepcopy(local.engine.tokenizer(args.model))
            local.engine.tokenizer = lambda base_model, tokenizer=tokenizer: tokenizer
            renderer = get_renderer("smollm2", tokenizer)
            steps = args.steps if size == SIZES[-1] else -(-args.steps // 2)
            chains[(persona, size)] = Chain(service, renderer, steps, folder)
    return chains


def timed_matrix(args, root: Path, personas, sizes, jobs: int) -> tuple[float, dict]:
    """Wall seconds of ``run_matrix`` over these chains, and the services' counters."""
    chains = new_chains(args, root, personas, sizes)
    out = Path(tempfile.mkdtemp(prefix="matrix-", dir=root))
    notebooks = out / "notebooks"
    notebooks.mkdir()
    for name in STAGES:
        nbformat.write(nbformat.v4.new_notebook(), str(notebooks / f"{name}.ipynb"))
    overrides = {"runs_dir": str(out / "runs"), "reports_dir": str(out / "reports")}
    started = time.perf_counter()
    results = run_matrix(
        personas,
        sizes,
        None,
        overrides,
        notebooks_dir=notebooks,
        on_result=lambda result: None,
        jobs=jobs,
        execute=StageWorkloads(chains, args),
        table=MatrixTable(io.StringIO(), live=False),
    )
    wall = time.perf_counter() - started
    assert all(r.status == "ok" for r in results), [r.describe() for r in results]
    reports = {f"{p}/{s}": chain.service.report() for (p, s), chain in chains.items()}
    return wall, reports


OPTIONS = (  # flag, type, default, help
    ("--steps", int, 6, "03's steps on the larger size (05: half; the smaller size: half)"),
    ("--save-every", int, 3, "steps between resume points"),
    ("--requests", int, 32, "requests per sampling stage"),
    ("--slots", int, 32, "sampling slots per chain"),
    ("--cycle", float, 10.0, "clock cycle, simulated s"),
    ("--latency", float, 15.0, "per sampling request, simulated s"),
    ("--time-scale", float, 0.25, "real s per simulated s"),
    ("--repeats", int, 1, "measurements"),
)


def cycles_text(reports: dict[str, dict]) -> str:
    """Training cycles per step of each chain's stages (1 = one cycle a step, pipelined)."""
    per_step = [
        t["cycles_per_step"]
        for report in reports.values()
        for t in report["training"].values()
        if t["cycles_per_step"] is not None
    ]
    return f"cycles per training step {min(per_step):.2f}-{max(per_step):.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for flag, kind, default, text in OPTIONS:
        parser.add_argument(flag, type=kind, default=default, help=text)
    parser.add_argument("--model", default=TINY_RANDOM_NAME)
    parser.add_argument(
        "--out", default=str(ROOT / "bench" / "results" / "matrix_concurrency.jsonl")
    )
    parser.add_argument(
        "--serial", action="store_true", help="also time the matrix with --jobs 1 (slow)"
    )
    args = parser.parse_args()
    cycle_real = args.cycle * args.time_scale
    print(
        f"2 x 2 matrix, 4 stages a chain, cycle {args.cycle:g} s simulated = {cycle_real:.2f} s "
        f"real; CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"load {os.getloadavg()[0]:.1f}"
    )
    log = JsonlLogger(args.out)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for repeat in range(args.repeats):
            # the two personas' chains of a size are the same workload: one of each is timed
            alone = {size: timed_matrix(args, root, PERSONAS[:1], [size], 1) for size in SIZES}
            for size, (wall, reports) in alone.items():
                print(f"  a {size} chain alone: {wall:.1f}s, {cycles_text(reports)}", flush=True)
            slowest = max(wall for wall, _ in alone.values())
            serial = sum(len(PERSONAS) * wall for wall, _ in alone.values())
            if args.serial:
                serial = timed_matrix(args, root, PERSONAS, SIZES, 1)[0]
            concurrent, reports = timed_matrix(args, root, PERSONAS, SIZES, 4)
            print(f"  the matrix, --jobs 4: {concurrent:.1f}s, {cycles_text(reports)}")
            print(
                f"slowest chain {slowest:.1f}s | --jobs 1: {serial:.1f}s = {serial / slowest:.2f}x"
                f"{'' if args.serial else ' (sum of the chains alone)'} | --jobs 4: "
                f"{concurrent:.1f}s = {concurrent / slowest:.2f}x (target <= 1.3x); load "
                f"{os.getloadavg()[0]:.1f}"
            )
            log.log(
                repeat,
                {
                    "bench": "matrix_concurrency",
                    "alone_s": {size: wall for size, (wall, _) in alone.items()},
                    "slowest_s": slowest,
                    "jobs1_s": serial,
                    "jobs1_measured": args.serial,
                    "jobs4_s": concurrent,
                    "jobs1_ratio": serial / slowest,
                    "jobs4_ratio": concurrent / slowest,
                    "settings": {k: v for k, v in vars(args).items() if k != "out"},
                    "load_1min": os.getloadavg()[0],
                    "cpu_count": os.cpu_count(),
                },
            )
    print(f"recorded in {args.out}")


if __name__ == "__main__":
    main()
