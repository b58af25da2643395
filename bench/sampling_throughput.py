"""Sampling throughput: the local engine vs transformers' `generate`, same model, same run.

Both sides get the same frozen model object, the same chat prompts (the first user turns of
tinker-cookbook's bundled example conversations), the same sampling settings (temperature,
top_p, token budget, stop at end-of-turn) and the same batch size. Throughput counts only the
tokens each side actually generated up to and including its stop token, so padding that
`generate` keeps decoding for finished rows is not counted in its favour or against the engine.

The engine decodes with continuous batching (a finished row's slot is refilled from the queue),
so its batch size is the number of rows decoded together, as for `generate`; the record also
gives its batch occupancy (share of decoded rows that were unfinished). With ``--repeats N``
the two sides alternate N times and the totals are compared, so a change in machine load
during the run hits both; the 1-minute load average is recorded around each side.

Usage: python bench/sampling_throughput.py [--prompts 64] [--batch-size 32] [--max-tokens 128]
                                           [--repeats 1]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "lib"))

from character_training.backends.local import SMOLLM2_NAME, LocalServiceClient  # noqa: E402
from character_training.metrics import JsonlLogger  # noqa: E402
from character_training.renderers import get_renderer  # noqa: E402
from character_training.renderers.conversation import generation_prompt  # noqa: E402
from tinker import types  # noqa: E402


def example_prompts(count: int) -> list[list[dict]]:
    """First user turns of the conversations shipped inside the tinker-cookbook wheel."""
    import tinker_cookbook

    path = Path(tinker_cookbook.__file__).parent / "example_data" / "conversations.jsonl"
    turns = []
    for line in path.read_text().splitlines():
        messages = json.loads(line)["messages"]
        first_user = next(m for m in messages if m["role"] == "user")
        turns.append([{"role": "user", "content": first_user["content"]}])
    return (turns * (count // len(turns) + 1))[:count]


def run_engine(client, prompts, params: types.SamplingParams) -> tuple[int, float]:
    started = time.perf_counter()
    futures = [client.sample(p, 1, params) for p in prompts]
    results = [f.result() for f in futures]
    elapsed = time.perf_counter() - started
    return sum(len(r.sequences[0].tokens) for r in results), elapsed


def run_generate(model, tokenizer, prompts, batch_size, params, eos_id) -> tuple[int, float]:
    """`model.generate` over left-padded batches; counts tokens up to the first EOS per row."""
    generated = 0
    started = time.perf_counter()
    with torch.inference_mode():
        for start in range(0, len(prompts), batch_size):
            chunk = [p.to_ints() for p in prompts[start : start + batch_size]]
            width = max(len(c) for c in chunk)
            ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, tokens in enumerate(chunk):
                ids[row, width - len(tokens) :] = torch.tensor(tokens)
                mask[row, width - len(tokens) :] = 1
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                do_sample=True,
                temperature=params.temperature,
                top_p=params.top_p,
                top_k=0,
                max_new_tokens=params.max_tokens,
                eos_token_id=eos_id,
                pad_token_id=tokenizer.pad_token_id,
            )
            for row in out[:, width:].tolist():
                generated += row.index(eos_id) + 1 if eos_id in row else len(row)
    return generated, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    parser.add_argument(
        "--repeats", type=int, default=1, help="alternate engine and generate runs this many times"
    )
    parser.add_argument(
        "--single-prompt-peer",
        action="store_true",
        help="also time generate() one prompt at a time (slow)",
    )
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "sampling.jsonl"))
    args = parser.parse_args()

    service = LocalServiceClient(
        root_dir=str(ROOT / "runs" / ".bench"),
        precision=args.precision,
        max_batch_size=args.batch_size,
    )
    client = service.create_sampling_client(base_model=SMOLLM2_NAME)
    client._sampler.show_progress = False  # keep the output to the record
    tokenizer = client.get_tokenizer()
    renderer = get_renderer("smollm2", tokenizer)
    prompts = [generation_prompt(renderer, m) for m in example_prompts(args.prompts)]
    params = types.SamplingParams(max_tokens=args.max_tokens, temperature=0.7, top_p=0.95, seed=0)
    eos_id = int(tokenizer.eos_token_id)

    run_engine(client, prompts[: min(4, len(prompts))], params)  # warm-up both paths
    run_generate(client.model, tokenizer, prompts[:2], 2, params, eos_id)

    engine_tokens = peer_tokens = 0
    engine_s = peer_s = 0.0
    loads: dict[str, list[float]] = {"engine": [], "generate": []}
    for _ in range(args.repeats):
        loads["engine"].append(os.getloadavg()[0])
        tokens, seconds = run_engine(client, prompts, params)
        engine_tokens, engine_s = engine_tokens + tokens, engine_s + seconds
        stats = client._sampler.stats
        loads["generate"].append(os.getloadavg()[0])
        tokens, seconds = run_generate(
            client.model, tokenizer, prompts, args.batch_size, params, eos_id
        )
        peer_tokens, peer_s = peer_tokens + tokens, peer_s + seconds
    loads["generate"].append(os.getloadavg()[0])
    record = {
        "bench": "sampling_throughput",
        "model": SMOLLM2_NAME,
        "dtype": str(service.engine.compute_dtype),
        "prompts": args.prompts,
        "batch_size": args.batch_size,
        "max_tokens": args.max_tokens,
        "engine_tokens": engine_tokens,
        "engine_seconds": round(engine_s, 2),
        "engine_tok_per_s": round(engine_tokens / engine_s, 1),
        "generate_tokens": peer_tokens,
        "generate_seconds": round(peer_s, 2),
        "generate_tok_per_s": round(peer_tokens / peer_s, 1),
        "ratio_vs_generate_same_batch": round(
            (engine_tokens / engine_s) / (peer_tokens / peer_s), 2
        ),
        "repeats": args.repeats,
        "engine_occupancy": round(stats.occupancy, 3),
        "engine_steps": stats.steps,
        "engine_mean_span": round(stats.span_columns / max(1, stats.steps), 1),
        "engine_waves": stats.waves,
        "engine_admissions": stats.admissions,
        "engine_shifts": stats.shifts,
        "load_avg_1m_engine_start": [round(v, 2) for v in loads["engine"]],
        "load_avg_1m_generate_start_end": [round(v, 2) for v in loads["generate"]],
        "torch_threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
    }
    if args.single_prompt_peer:
        single_tokens, single_s = run_generate(client.model, tokenizer, prompts, 1, params, eos_id)
        record["generate_batch1_tok_per_s"] = round(single_tokens / single_s, 1)
        record["ratio_vs_generate_batch1"] = round(
            (engine_tokens / engine_s) / (single_tokens / single_s), 2
        )
    JsonlLogger(args.out).log(0, record)
    for key, value in record.items():
        print(f"{key:>32}: {value}")


if __name__ == "__main__":
    main()
