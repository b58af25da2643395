"""Settings of the in-process engine and the hardware facts they depend on.

The engine picks bf16 where the hardware computes it natively (CUDA with bf16, or a CPU with
AVX512-BF16 / AMX), because that is measured to be ~1.5x faster for generation and ~1.4x for
LoRA steps on this project's CPU; otherwise fp32. Tests that compare numbers to a hand
computation ask for fp32 explicitly.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from ...errors import ConfigError

PRECISIONS = ("auto", "bf16", "fp32")
DEVICES = ("auto", "cpu", "cuda")


@lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """True when the CPU advertises bf16 arithmetic (Linux: /proc/cpuinfo flags)."""
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
    """

    root_dir: str = "runs/.local_engine"
    device: str = "auto"
    precision: str = "auto"
    max_batch_size: int = 64
    micro_batch_tokens: int = 8192

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
