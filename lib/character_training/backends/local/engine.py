"""Shared state of one local "service": settings, loaded base models, tokenizers, run ids.

Training and sampling clients both come from here, the way the Tinker SDK's clients come from
one `ServiceClient`. Frozen base models are loaded once and shared by every sampling client
that samples from the base; training clients get their own copy (LoRA wraps it in place).
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import os
import time
from functools import lru_cache
from pathlib import Path

import torch

from ... import engine_record
from ...errors import BackendError
from .model_files import resolve_model_dir
from .prefix_cache import PrefixCounters, PrefixStore
from .settings import LocalEngineConfig, log_runtime_once, runtime_info

logger = logging.getLogger(__name__)

_META_FILE = "engine_checkpoint.json"


@lru_cache(maxsize=8)
def load_tokenizer(model_dir: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


class LocalEngine:
    """Loads models and hands out checkpoint directories for one local service session."""

    def __init__(self, config: LocalEngineConfig):
        self.config = config
        self.device = config.torch_device
        self.compute_dtype = config.compute_dtype
        self.root = Path(config.root_dir)
        self._frozen: dict[tuple[str, torch.dtype], torch.nn.Module] = {}
        self._sampling: dict[tuple, torch.nn.Module] = {}
        self._run_counter = itertools.count()
        # Keys and values of prompt prefixes shared by many requests, for every client of this
        # engine (`prefix_cache`); and the prefill work asked for vs. done, for the manifests.
        self.prefixes = PrefixStore(config.prefix_cache_mb * 2**20)
        self.counters = {"sampling": PrefixCounters(), "scoring": PrefixCounters()}
        log_runtime_once(config)
        engine_record.register(self)  # its settings and prefill counters reach the manifests
        self._session = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"

    # -- models -------------------------------------------------------------------------------
    def model_dir(self, base_model: str) -> Path:
        return resolve_model_dir(base_model)

    def tokenizer(self, base_model: str):
        return load_tokenizer(str(self.model_dir(base_model)))

    def load_trainable_base(self, base_model: str) -> torch.nn.Module:
        """A private copy of the fp32 base model's module tree for a training client to wrap
        with LoRA. The frozen weights are shared, not copied (LoRA only adds modules and never
        writes them), so a training client costs its adapter and optimiser, not a model."""
        model = self._load(base_model, torch.float32)
        shared = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
        return copy.deepcopy(model, memo=shared)

    def frozen_base(self, base_model: str, dtype: torch.dtype) -> torch.nn.Module:
        """A shared, read-only base model in ``dtype`` for sampling and scoring."""
        return self._load(base_model, dtype)

    def sampling_base(self, base_model: str) -> torch.nn.Module:
        """The shared frozen model sampling clients run: fp32 activations, linear weights in
        the compute dtype (`adapters.sampling_model`); snapshots add their adapter to it."""
        key = (str(self.model_dir(base_model)), "sampling", self.compute_dtype)
        if key not in self._sampling:
            from .adapters import sampling_model

            self._sampling[key] = sampling_model(
                self._load(base_model, torch.float32), self.compute_dtype
            )
        return self._sampling[key]

    def _load(self, base_model: str, dtype: torch.dtype) -> torch.nn.Module:
        key = (str(self.model_dir(base_model)), dtype)
        if key not in self._frozen:
            from transformers import AutoModelForCausalLM
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()  # keeps notebook and CI logs readable
            started = time.perf_counter()
            model = AutoModelForCausalLM.from_pretrained(key[0], dtype=dtype)
            model.to(self.device).eval()
            for param in model.parameters():
                param.requires_grad_(False)
            self._frozen[key] = model
            logger.info("loaded %s (%s) in %.1fs", base_model, dtype, time.perf_counter() - started)
        return self._frozen[key]

    def runtime_info(self) -> dict:
        """What this engine picked on this machine (`settings.runtime_info`)."""
        return runtime_info(self.config)

    def stats(self) -> dict:
        """Cumulative prefill counters of this engine's clients (tokens requested, computed,
        reused from stored prefixes, padded; prefixes built; prompts that hit one) for
        ``sampling`` (prompts prefilled by ``sample``) and ``scoring``
        (``compute_logprobs``), and the prefix store's size. Take the difference of two
        calls to get one stage's numbers."""
        return {
            **{kind: counters.as_dict() for kind, counters in self.counters.items()},
            "prefix_store": {"entries": len(self.prefixes), "bytes": self.prefixes.nbytes},
        }

    # -- the session ----------------------------------------------------------------------------
    @property
    def session_id(self) -> str:
        """The local stand-in for a Tinker session id: one per engine (so per service client).

        ``LossHandle``s carry it, so a handle is only accepted by clients of the service client
        that created it, as on Tinker.
        """
        return f"local-{self._session}-{id(self):x}"

    # -- checkpoints --------------------------------------------------------------------------
    def new_run_id(self) -> str:
        return f"{self._session}-{next(self._run_counter)}"

    def checkpoint_dir(self, run_id: str, kind: str, name: str) -> Path:
        if not name or "/" in name or name.startswith("."):
            raise BackendError(f"checkpoint name {name!r}: expected a plain, non-empty file name")
        return self.root / run_id / kind / name


@lru_cache(maxsize=1)
def _libc():
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


def release_free_memory() -> None:
    """Give the pages freed by the last large computation back to the operating system.

    glibc keeps freed heap memory for reuse; after a decode wave or a training step that is
    hundreds of MB of activations, and the next step's allocations (other sizes, other
    threads' arenas) do not always fit in it, so the process's resident size ratchets up
    from phase to phase. ``malloc_trim`` returns it (a few ms); elsewhere a no-op.
    """
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def write_checkpoint_meta(path: Path, **meta) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / _META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))


def read_checkpoint_meta(path: str | Path) -> dict:
    meta_file = Path(path) / _META_FILE
    if not meta_file.is_file():
        raise BackendError(
            f"{path} is not a local-engine checkpoint (no {_META_FILE}); pass a path returned by "
            "save_state or save_weights_for_sampler"
        )
    return json.loads(meta_file.read_text())
