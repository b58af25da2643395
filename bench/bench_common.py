"""What the benchmark scripts share: the engine's LoRA for a peer, and how a result is reported.

Not a benchmark itself (``make bench`` does not run it): the scripts import it, so a peer
trains exactly the adapter the engine trains (`engine_lora`), and every record carries the
same machine fields under the same names and is appended and printed the same way
(``bench/results/*.jsonl`` through the package's `JsonlLogger`).
"""

from __future__ import annotations

import os
import platform
from typing import Any

import torch
from character_training.backends.local.lora import LORA_ALPHA, lora_target_modules
from character_training.metrics import JsonlLogger


def engine_lora(model: torch.nn.Module, rank: int, parts: tuple[str, ...]) -> Any:
    """A peft ``LoraConfig`` of the adapter the engine trains on ``model``: its alpha, no
    dropout, on the linear layers of ``parts`` (`lora.lora_target_modules`)."""
    from peft import LoraConfig

    return LoraConfig(
        r=rank,
        lora_alpha=LORA_ALPHA,
        lora_dropout=0.0,
        target_modules=lora_target_modules(model, parts),
        bias="none",
        task_type="CAUSAL_LM",
    )


def machine_fields() -> dict[str, Any]:
    """The settings that move a CPU timing besides the code: OpenMP's wait policy (see
    bench/README.md), torch's thread count and the processor."""
    return {
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "torch_threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
    }


def report(record: dict[str, Any], out: str, width: int) -> None:
    """Append ``record`` to ``out`` (step 0) and print it, keys right-aligned to ``width``."""
    JsonlLogger(out).log(0, record)
    for key, value in record.items():
        print(f"{key:>{width}}: {value}")
