"""Shared fixtures for the local-engine tests.

Loading a model is the expensive part of these tests, so service clients, the tokenizer and
base-model sampling clients live for the whole session. A service client only caches frozen
base models; every test that trains builds its own training client, so no test sees another
test's weights.

Everything runs in fp32: the tests compare the engine's numbers with hand computations, and
``precision="auto"`` would pick bf16 on a CPU with native bf16.
"""

from __future__ import annotations

import os

# With the default (active) OpenMP wait policy, torch's worker threads spin while idle; when
# other processes share this small CPU, a LoRA step then takes 10x longer. Must be set before
# torch is first imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest
import torch
from character_training.backends.local import (
    SMOLLM2_NAME,
    TINY_RANDOM_NAME,
    LocalServiceClient,
)
from character_training.backends.local.lora import lora_scale
from character_training.renderers import get_renderer

TINY = TINY_RANDOM_NAME
SMOLLM2 = SMOLLM2_NAME


@pytest.fixture(scope="session")
def engine_root(tmp_path_factory):
    """One checkpoint root for every service client of the session."""
    return tmp_path_factory.mktemp("local_engine")


@pytest.fixture(scope="session")
def tiny_service(engine_root):
    """fp32 service for the two-layer random Llama (``tiny-random``)."""
    return LocalServiceClient(root_dir=str(engine_root), precision="fp32")


@pytest.fixture(scope="session")
def smollm2_service(engine_root):
    """fp32 service for SmolLM2-135M-Instruct."""
    return LocalServiceClient(root_dir=str(engine_root), precision="fp32")


@pytest.fixture(scope="session")
def tokenizer(tiny_service):
    """SmolLM2's tokenizer (``tiny-random`` shares it)."""
    return tiny_service.engine.tokenizer(TINY)


@pytest.fixture(scope="session")
def renderer(tokenizer):
    return get_renderer("smollm2", tokenizer)


@pytest.fixture(scope="session")
def tiny_sampler(tiny_service):
    """Sampling client on the frozen ``tiny-random`` base model."""
    return tiny_service.create_sampling_client(base_model=TINY).result()


@pytest.fixture(scope="session")
def smollm2_sampler(smollm2_service):
    """Sampling client on the frozen SmolLM2 base model (loads it on first use)."""
    return smollm2_service.create_sampling_client(base_model=SMOLLM2).result()


def randomize_lora(training_client, seed: int, scale: float) -> None:
    """Give every LoRA ``B`` matrix seeded random values.

    PEFT starts ``B`` at zero, which makes the adapter a no-op and the gradient of every ``A``
    matrix exactly zero; a gradient comparison on such a model would check half the
    parameters against zeros. Random ``B`` makes both factors carry signal. ``scale`` is the
    size of the *effective* update ``(alpha / rank) * B``, so the adapter perturbs the model by
    the same amount whatever the LoRA scale convention.
    """
    scale = scale / lora_scale(training_client.rank)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in training_client.model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * scale)


@pytest.fixture(scope="session")
def new_tiny_trainer(tiny_service):
    """Factory: a fresh ``tiny-random`` LoRA client with seeded, non-zero adapter weights."""

    def make(service=None, *, seed: int = 0, rank: int = 4, scale: float = 0.3):
        service = service or tiny_service
        client = service.create_lora_training_client(TINY, rank=rank, seed=seed).result()
        randomize_lora(client, seed, scale)
        return client

    return make
