"""Settings of the in-process engine and the hardware facts they depend on.

The engine picks bf16 where the hardware computes it natively (CUDA with bf16, or a CPU with
AVX512-BF16 / AMX), because that is measured to be ~1.5x faster for generation and ~1.4x for
LoRA steps on this project's CPU; otherwise fp32. Tests that compare numbers to a hand
computation ask for fp32 explicitly.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from ...errors import ConfigError

PRECISIONS = ("auto", "bf16", "fp32")
DEVICES = ("auto", "cpu", "cuda")


# oneDNN's ISA caps (``ONEDNN_MAX_CPU_ISA``) below which it has no bf16 dot-product
# instructions: a process capped there computes bf16 products by conversion, ~50x slower.
_ONEDNN_ISAS_WITHOUT_BF16 = frozenset(
    {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"}
)


@lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """True when the CPU advertises bf16 arithmetic (Linux: /proc/cpuinfo flags) and oneDNN
    is allowed to use it: ``ONEDNN_MAX_CPU_ISA=AVX2`` (how the benches and the README's AVX2
    numbers emulate a CPU without AVX512-BF16) makes ``precision: auto`` pick fp32, as it
    would on that CPU."""
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "").strip().upper()
    if cap in _ONEDNN_ISAS_WITHOUT_BF16:
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


@dataclass(frozen=True)
class LocalEngineConfig:
    """How the local engine runs.

    root_dir: where checkpoints (``save_state``, ``save_weights_for_sampler``) are written.
    device: "auto" (cuda when present, else cpu), "cpu" or "cuda".
    precision: "auto" (bf16 where native, else fp32), "bf16" or "fp32". Training keeps fp32
        master weights and runs bf16 autocast; sampling clients hold the base in bf16 and apply
        LoRA unmerged in fp32 (see `adapters`).
    max_batch_size: sequences decoded together by the sampler.
    micro_batch_tokens: padded tokens per forward pass when training or scoring; bounds memory.
    prefix_cache_mb: memory for the keys and values of prompt prefixes shared by many
        requests, computed once and reused (`prefix_cache`); 0 turns reuse off.
    kv_cache_mb: the sampler's key/value cache (rows x columns); a batch of long prompts gets
        fewer rows rather than more memory. A prefix the rows share is kept once, outside it.
    activation_mb: activations a training micro-batch may keep for its backward pass; bounds
        the tokens per micro-batch when training (a longer sequence is checkpointed instead).
    """

    root_dir: str = "runs/.local_engine"
    device: str = "auto"
    precision: str = "auto"
    max_batch_size: int = 64
    micro_batch_tokens: int = 8192
    prefix_cache_mb: int = 256
    kv_cache_mb: int = 1024
    activation_mb: int = 768

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise ConfigError(f"local engine device={self.device!r}: expected one of {DEVICES}")
        if self.precision not in PRECISIONS:
            raise ConfigError(
                f"local engine precision={self.precision!r}: expected one of {PRECISIONS}"
            )
        for name in ("max_batch_size", "micro_batch_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"local engine {name}={value!r}: expected a positive integer")
        if not isinstance(self.kv_cache_mb, int) or self.kv_cache_mb < 1:
            raise ConfigError(
                f"local engine kv_cache_mb={self.kv_cache_mb!r}: expected a positive integer"
            )
        if not isinstance(self.activation_mb, int) or self.activation_mb < 1:
            raise ConfigError(
                f"local engine activation_mb={self.activation_mb!r}: expected a positive integer"
            )
        if not isinstance(self.prefix_cache_mb, int) or self.prefix_cache_mb < 0:
            raise ConfigError(
                f"local engine prefix_cache_mb={self.prefix_cache_mb!r}: expected an integer >= 0"
            )
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("local engine device='cuda' but torch sees no CUDA device")

    @property
    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    @property
    def use_bf16(self) -> bool:
        if self.precision != "auto":
            return self.precision == "bf16"
        if self.torch_device.type == "cuda":
            return torch.cuda.is_bf16_supported()
        return cpu_has_native_bf16()

    @property
    def compute_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.use_bf16 else torch.float32


# Environment variables that change which kernels the math libraries pick (recorded with
# every run, since they decide the speed and, in the last bits, the numbers).
_KERNEL_ENV = (
    "OMP_NUM_THREADS",
    "OMP_WAIT_POLICY",
    "MKL_ENABLE_INSTRUCTIONS",
    "ONEDNN_MAX_CPU_ISA",
    "ATEN_CPU_CAPABILITY",
    "THP_MEM_ALLOC_ENABLE",
    "CHARACTER_TRAINING_PANEL_KERNEL",
    "CC",
)
_CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


_THP_ENABLED = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def transparent_hugepage_mode(path: Path = _THP_ENABLED) -> str | None:
    """The kernel's transparent huge page mode (always, madvise or never: the bracketed word of
    ``path``), or None off Linux.

    torch's ``THP_MEM_ALLOC_ENABLE`` asks for huge pages with ``madvise``: "never" ignores it.
    """
    try:
        text = path.read_text()
    except OSError:
        return None
    chosen = [word[1:-1] for word in text.split() if word.startswith("[")]
    return chosen[0] if chosen else None


@lru_cache(maxsize=1)
def cpu_flags() -> dict[str, bool]:
    """Which of the instruction-set flags that decide the engine's speed the CPU advertises."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    line = next((x for x in text.splitlines() if x.startswith("flags")), "")
    present = set(line.split(":", 1)[-1].split())
    return {flag: flag in present for flag in _CPU_FLAGS}


def runtime_info(config: LocalEngineConfig) -> dict:
    """What the engine picked on this machine: device, compute dtype, threads, kernel path,
    the CPU flags and library settings behind them. The pipeline records it in manifests."""

    device = config.torch_device
    info = {
        "device": device.type,
        "precision": config.precision,
        "compute_dtype": str(config.compute_dtype).replace("torch.", ""),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "decoder": "fast_decode (fused projections, static KV cache, continuous batching)",
        "prefix_cache_mb": config.prefix_cache_mb,
        "kv_cache_mb": config.kv_cache_mb,
        "activation_mb": config.activation_mb,
        "cpu_flags": cpu_flags(),
        "env": {name: os.environ[name] for name in _KERNEL_ENV if name in os.environ},
        "transparent_hugepage": transparent_hugepage_mode(),
    }
    if device.type == "cpu":
        from . import panel_linear
        from .fast_decode import products_layout

        dtype = config.compute_dtype
        onednn = torch.backends.mkldnn.is_available()
        info["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
        layout = products_layout(torch.empty(0, dtype=dtype))
        info["products"] = {
            # the sampler's and compute_logprobs' decoder (`fast_decode`)
            "decoder": _DECODER_PRODUCTS[layout],
            # training (autocast) and the Hugging Face path: F.linear
            "F.linear": ("onednn" if onednn else "aten")
            if dtype == torch.bfloat16
            else ("mkl" if torch.backends.mkl.is_available() else "aten"),
        }
        if dtype == torch.float32 and info["cpu_capability"] == "AVX2" and layout != "panel":
            info["products"]["panel_kernel"] = panel_linear.disabled_reason(dtype, device)
    return info


_DECODER_PRODUCTS = {
    "panel": "panel kernel (fp32 on bf16-stored weights, AVX2)",
    "onednn": "onednn prepacked",
    "plain": "F.linear",
}
_logged: set[tuple] = set()


def runtime_summary(info: dict) -> str:
    """`runtime_info` as one line a person reads: device, dtype, threads, kernels, CPU flags."""
    flags = info.get("cpu_flags", {})
    has = ",".join(flag for flag, present in flags.items() if present) or "unknown"
    products = info.get("products", {})
    kernels = f", products: decoder {products['decoder']}, training {products['F.linear']}"
    return (
        f"local engine: {info['device']} {info['compute_dtype']} "
        f"(precision={info['precision']}), {info['threads']} threads"
        + (kernels if products else "")
        + (f", CPU {info['cpu_capability']} [{has}]" if "cpu_capability" in info else "")
    )


def log_runtime_once(config: LocalEngineConfig) -> dict:
    """`runtime_info`, logged once per process and settings (INFO, this module's logger).

    Where nothing would show that record (a notebook kernel configures no logging), its
    one-line summary is printed to stderr instead, so every run states what it picked.
    """
    import json
    import logging
    import sys

    info = runtime_info(config)
    key = (info["device"], info["compute_dtype"], info["threads"])
    if key not in _logged:
        _logged.add(key)
        log = logging.getLogger(__name__)
        log.info("local engine runtime: %s", json.dumps(info))
        if not (log.isEnabledFor(logging.INFO) and log.hasHandlers()):
            print(runtime_summary(info), file=sys.stderr)
    return info
