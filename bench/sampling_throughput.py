"""Sampling throughput: the local engine vs transformers' `generate` and llama.cpp, same run.

Every side gets the same chat prompts (the first user turns of tinker-cookbook's bundled
example conversations, rendered once by the SmolLM2 renderer, so every side decodes the same
prompt token ids), the same sampling settings (temperature, top_p, no top-k, token budget, stop
at end-of-turn) and the same batch size. Throughput counts only the tokens each side actually
generated up to and including its stop token, so padding that `generate` keeps decoding for
finished rows is not counted in its favour or against the engine.

The sides:

* engine: `LocalSamplingClient.sample`. Its model is the engine's *sampling model* (fp32
  activations, bf16 linear weights, so LoRA snapshots keep their training); it decodes with
  continuous batching (a finished row's slot is refilled from the queue), so its batch size is
  the number of rows decoded together; the record gives its batch occupancy (share of decoded
  rows that were unfinished).
* generate: transformers' ``model.generate`` over left-padded batches, on the plain Hugging Face
  model in the engine's compute dtype (``engine.frozen_base``: bf16 on a CPU with bf16 support,
  the same weights), which is what a user would run with transformers. It does not run on the
  engine's fp32-activation sampling model, which would slow it down and flatter the ratio.
* llama.cpp (optional: needs ``pip install llama-cpp-python``, which compiles from source;
  skipped with one line when absent), on the GGUF file the engine's weights come from. That
  file is Q4_1 (Q8_0 embeddings/head): llama.cpp runs 4-bit kernels on it, while the engine and
  `generate` run the dequantized weights in bf16, so llama.cpp moves a third as many weight
  bytes per token. llama-cpp-python's high-level API decodes one sequence at a time, so two
  llama.cpp peers are timed:

  - parallel (``--llama-cpp parallel``): the low-level API, as llama.cpp's server does with
    parallel slots and continuous batching: one context with ``batch size`` sequences
    (``n_seq_max``, a per-sequence KV cache), every step one ``llama_decode`` of each live
    sequence's next token plus the prompts of newly admitted sequences, a finished sequence's
    slot refilled from the queue; sampling with llama.cpp's sampler chain (temperature, then
    top-p, then a seeded draw: the engine's order).
  - sequential (``--llama-cpp sequential``): ``Llama.generate`` one prompt at a time, what a
    llama-cpp-python user writes (top_k=0, min_p=0, no penalties; this API applies top-p before
    temperature, which keeps a few more tokens than the engine's order).

  Both use ``n_threads`` = torch's thread count (2 here).

With ``--repeats N`` the sides alternate N times and the totals are compared, so a change in
machine load during the run hits them all; the 1-minute load average is recorded before each
side. ``OMP_WAIT_POLICY`` defaults to PASSIVE (torch's and llama.cpp's OpenMP threads would
otherwise busy-wait against each other and against anything else running).

Usage: python bench/sampling_throughput.py [--prompts 64] [--batch-size 32] [--max-tokens 128]
                                           [--repeats 1] [--llama-cpp both]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "lib"))

from bench_common import machine_fields, report  # noqa: E402
from character_training.backends.local import SMOLLM2_NAME, LocalServiceClient  # noqa: E402
from character_training.backends.local.model_files import find_smollm2_gguf  # noqa: E402
from character_training.renderers import get_renderer  # noqa: E402
from character_training.renderers.conversation import generation_prompt  # noqa: E402
from tinker import types  # noqa: E402

LLAMA_CPP_MISSING = (
    "llama.cpp peer skipped: llama-cpp-python is not installed "
    "(`.venv/bin/pip install llama-cpp-python`; it compiles from source, ~12 min on 2 cores)"
)


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


def import_llama_cpp():
    """The ``llama_cpp`` module with its native log quietened, or None when not installed."""
    try:
        import llama_cpp
        from llama_cpp._logger import set_verbose
    except ImportError:
        return None
    set_verbose(False)
    return llama_cpp


class LlamaCppParallel:
    """llama.cpp decoding ``slots`` sequences together through the low-level API.

    The scheme of llama.cpp's server with ``--parallel slots`` and continuous batching: one
    context whose KV cache holds ``slots`` sequences (not unified: each sequence attends only to
    its own cells), one ``llama_decode`` per step holding every live sequence's last token and
    the whole prompt of each sequence admitted into a free slot, a logit row only where a token
    is to be sampled. Sampling is llama.cpp's own sampler chain.
    """

    def __init__(
        self,
        llama_cpp,
        gguf: Path,
        slots: int,
        ctx_per_seq: int,
        threads: int,
        params: types.SamplingParams,
        seed: int = 0,
    ):
        self.lib = llama_cpp
        llama_cpp.llama_backend_init()
        self.model = llama_cpp.llama_model_load_from_file(
            str(gguf).encode(), llama_cpp.llama_model_default_params()
        )
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {gguf}")
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_seq_max = slots
        cparams.n_ctx = slots * ctx_per_seq
        cparams.n_batch = cparams.n_ctx  # the first step submits every slot's whole prompt
        cparams.n_threads = cparams.n_threads_batch = threads
        cparams.kv_unified = False
        cparams.no_perf = True
        self.ctx = llama_cpp.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create a context")
        self.slots, self.ctx_per_seq, self.n_batch = slots, ctx_per_seq, int(cparams.n_ctx)
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self.sampler = llama_cpp.llama_sampler_chain_init(
            llama_cpp.llama_sampler_chain_default_params()
        )
        for stage in (
            llama_cpp.llama_sampler_init_temp(params.temperature),
            llama_cpp.llama_sampler_init_top_p(params.top_p, 1),
            llama_cpp.llama_sampler_init_dist(seed),
        ):
            llama_cpp.llama_sampler_chain_add(self.sampler, stage)

    def close(self) -> None:
        lib = self.lib
        lib.llama_sampler_free(self.sampler)
        lib.llama_batch_free(self.batch)
        lib.llama_free(self.ctx)
        lib.llama_model_free(self.model)

    def run(self, prompts: list[list[int]], max_tokens: int, eos_id: int) -> tuple[int, float]:
        lib, batch = self.lib, self.batch
        for prompt in prompts:
            if len(prompt) + max_tokens > self.ctx_per_seq:
                raise ValueError(f"a prompt of {len(prompt)} tokens does not fit ctx_per_seq")
        started = time.perf_counter()
        queue = collections.deque(prompts)
        # per slot: [next position, tokens generated, last sampled token] or None when free
        state: list[list[int] | None] = [None] * self.slots
        pending: list[list[int] | None] = [None] * self.slots  # prompt tokens to submit
        generated = 0
        while queue or any(s is not None for s in state):
            for slot in range(self.slots):
                if state[slot] is None and queue:
                    lib.llama_memory_seq_rm(self.memory, slot, -1, -1)
                    pending[slot] = queue.popleft()
                    state[slot] = [0, 0, -1]
            n, sample_at = 0, []
            for slot in range(self.slots):
                if state[slot] is None:
                    continue
                tokens = pending[slot] if pending[slot] is not None else [state[slot][2]]
                pending[slot] = None
                pos = state[slot][0]
                for offset, token in enumerate(tokens):
                    batch.token[n] = token
                    batch.pos[n] = pos + offset
                    batch.n_seq_id[n] = 1
                    batch.seq_id[n][0] = slot
                    batch.logits[n] = offset == len(tokens) - 1
                    n += 1
                state[slot][0] = pos + len(tokens)
                sample_at.append((slot, n - 1))
            batch.n_tokens = n
            code = lib.llama_decode(self.ctx, batch)
            if code != 0:
                raise RuntimeError(f"llama_decode returned {code}")
            for slot, index in sample_at:
                token = lib.llama_sampler_sample(self.sampler, self.ctx, index)
                generated += 1
                state[slot][1] += 1
                state[slot][2] = token
                if token == eos_id or state[slot][1] >= max_tokens:
                    state[slot] = None
        return generated, time.perf_counter() - started


class LlamaCppSequential:
    """llama-cpp-python's high-level ``Llama.generate``, one prompt after another."""

    def __init__(self, llama_cpp, gguf: Path, ctx: int, threads: int, seed: int = 0):
        self.llm = llama_cpp.Llama(
            model_path=str(gguf),
            n_ctx=ctx,
            n_threads=threads,
            n_threads_batch=threads,
            seed=seed,
            verbose=False,
        )

    def run(self, prompts, params: types.SamplingParams, eos_id: int) -> tuple[int, float]:
        generated = 0
        started = time.perf_counter()
        for prompt in prompts:
            count = 0
            for token in self.llm.generate(
                prompt,
                top_k=0,
                top_p=params.top_p,
                min_p=0.0,
                typical_p=1.0,
                temp=params.temperature,
                repeat_penalty=1.0,
            ):
                count += 1
                if token == eos_id or count >= params.max_tokens:
                    break
            generated += count
        return generated, time.perf_counter() - started


def check_llama_tokens(llama_cpp, gguf: Path, text: str, ids: list[int]) -> bool:
    """Whether llama.cpp's own tokenizer turns the rendered prompt into the engine's ids."""
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    model = llama_cpp.llama_model_load_from_file(str(gguf).encode(), params)
    try:
        data = text.encode()
        out = (llama_cpp.llama_token * (len(data) + 8))()
        vocab = llama_cpp.llama_model_get_vocab(model)
        n = llama_cpp.llama_tokenize(vocab, data, len(data), out, len(out), False, True)
        return list(out[:n]) == ids
    finally:
        llama_cpp.llama_model_free(model)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    parser.add_argument(
        "--repeats", type=int, default=1, help="alternate the sides this many times"
    )
    parser.add_argument(
        "--single-prompt-peer",
        action="store_true",
        help="also time generate() one prompt at a time (slow)",
    )
    parser.add_argument(
        "--llama-cpp",
        default="both",
        choices=["both", "parallel", "sequential", "off"],
        help="which llama.cpp peers to time (needs llama-cpp-python)",
    )
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "sampling.jsonl"))
    args = parser.parse_args()

    service = LocalServiceClient(
        root_dir=str(ROOT / "runs" / ".bench"),
        precision=args.precision,
        max_batch_size=args.batch_size,
    )
    client = service.create_sampling_client(base_model=SMOLLM2_NAME).result()
    client._sampler.show_progress = False  # keep the output to the record
    # generate's peer: the plain HF model, same weights, in the engine's compute dtype
    peer_model = service.engine.frozen_base(SMOLLM2_NAME, service.engine.compute_dtype)
    tokenizer = client.get_tokenizer()
    renderer = get_renderer("smollm2", tokenizer)
    prompts = [generation_prompt(renderer, m) for m in example_prompts(args.prompts)]
    prompt_ids = [p.to_ints() for p in prompts]
    params = types.SamplingParams(max_tokens=args.max_tokens, temperature=0.7, top_p=0.95, seed=0)
    eos_id = int(tokenizer.eos_token_id)
    threads = torch.get_num_threads()

    sides: dict[str, object] = {
        "engine": lambda: run_engine(client, prompts, params),
        "generate": lambda: run_generate(
            peer_model, tokenizer, prompts, args.batch_size, params, eos_id
        ),
    }
    run_engine(client, prompts[: min(4, len(prompts))], params)  # warm-up every side
    run_generate(peer_model, tokenizer, prompts[:2], 2, params, eos_id)

    llama_info: dict[str, object] = {}
    llama_cpp = import_llama_cpp() if args.llama_cpp != "off" else None
    if args.llama_cpp != "off" and llama_cpp is None:
        print(LLAMA_CPP_MISSING)
    parallel = None
    if llama_cpp is not None:
        gguf = find_smollm2_gguf()
        ctx_per_seq = -(-(max(map(len, prompt_ids)) + args.max_tokens + 1) // 256) * 256
        llama_info = {
            "llama_cpp_version": llama_cpp.__version__,
            "llama_cpp_gguf": gguf.name,
            "llama_cpp_threads": threads,
            "llama_cpp_same_prompt_ids": check_llama_tokens(
                llama_cpp, gguf, tokenizer.decode(prompt_ids[0]), prompt_ids[0]
            ),
        }
        if args.llama_cpp in ("both", "parallel"):
            parallel = LlamaCppParallel(
                llama_cpp, gguf, args.batch_size, ctx_per_seq, threads, params
            )
            parallel.run(prompt_ids[:2], 8, eos_id)
            sides["llama_cpp_parallel"] = lambda: parallel.run(prompt_ids, args.max_tokens, eos_id)
        if args.llama_cpp in ("both", "sequential"):
            sequential = LlamaCppSequential(llama_cpp, gguf, ctx_per_seq, threads)
            sequential.run(prompt_ids[:1], params, eos_id)
            sides["llama_cpp_sequential"] = lambda: sequential.run(prompt_ids, params, eos_id)

    totals = {name: [0, 0.0] for name in sides}
    loads: dict[str, list[float]] = {name: [] for name in sides}
    stats = None
    for _ in range(args.repeats):
        for name, side in sides.items():
            loads[name].append(round(os.getloadavg()[0], 2))
            tokens, seconds = side()
            totals[name][0] += tokens
            totals[name][1] += seconds
            if name == "engine":
                stats = client._sampler.stats
    load_end = round(os.getloadavg()[0], 2)
    rate = {name: tokens / seconds for name, (tokens, seconds) in totals.items()}

    record: dict[str, object] = {
        "bench": "sampling_throughput",
        "model": SMOLLM2_NAME,
        "dtype": str(service.engine.compute_dtype),
        "generate_model": f"frozen_base ({peer_model.dtype})",
        "prompts": args.prompts,
        "batch_size": args.batch_size,
        "max_tokens": args.max_tokens,
        "repeats": args.repeats,
    }
    for name, (tokens, seconds) in totals.items():
        record[f"{name}_tokens"] = tokens
        record[f"{name}_seconds"] = round(seconds, 2)
        record[f"{name}_tok_per_s"] = round(rate[name], 1)
    record["ratio_vs_generate_same_batch"] = round(rate["engine"] / rate["generate"], 2)
    for name in ("llama_cpp_parallel", "llama_cpp_sequential"):
        if name in rate:
            record[f"ratio_vs_{name}"] = round(rate["engine"] / rate[name], 2)
    record.update(
        {
            "engine_occupancy": round(stats.occupancy, 3),
            "engine_steps": stats.steps,
            "engine_mean_span": round(stats.span_columns / max(1, stats.steps), 1),
            "engine_waves": stats.waves,
            "engine_admissions": stats.admissions,
            "engine_shifts": stats.shifts,
        }
    )
    record.update(llama_info)
    record.update({f"load_avg_1m_{name}_start": values for name, values in loads.items()})
    record["load_avg_1m_end"] = load_end
    record.update(machine_fields())
    if args.single_prompt_peer:
        single_tokens, single_s = run_generate(peer_model, tokenizer, prompts, 1, params, eos_id)
        record["generate_batch1_tok_per_s"] = round(single_tokens / single_s, 1)
        record["ratio_vs_generate_batch1"] = round(rate["engine"] / (single_tokens / single_s), 2)
    if parallel is not None:
        parallel.close()
    report(record, args.out, 32)


if __name__ == "__main__":
    main()
