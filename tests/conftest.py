"""Shared fixtures for the local-engine tests.

Loading a model is the expensive part of these tests, so service clients, the tokenizer and
base-model sampling clients live for the whole session. A service client only caches frozen
base models; every test that trains builds its own training client, so no test sees another
test's weights.

Everything runs in fp32: the tests compare the engine's numbers with hand computations, and
``precision="auto"`` would pick bf16 on a CPU with native bf16.

The stage tests share their setup here too: run parameters on the tiny model (`tiny_params`,
also as the `tiny_run_params` fixture), a training loop that dies at a chosen step
(`interrupt_training`), the comparison of two runs' adapters (`assert_same_adapter`) and a
service that counts the sampling clients it makes (`counting_service`).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

# With the default (active) OpenMP wait policy, torch's worker threads spin while idle; when
# other processes share this small CPU, a LoRA step then takes 10x longer. Must be set before
# torch is first imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# What the package sets on import (huge pages for torch's large allocations), before torch.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import pytest
import torch
from character_training import training
from character_training.backends.local import (
    SMOLLM2_NAME,
    TINY_RANDOM_NAME,
    LocalServiceClient,
)
from character_training.backends.local.lora import lora_scale
from character_training.config import RunParams, load_params, notebook_params, with_overrides
from character_training.renderers import get_renderer
from character_training.sampling import Completion
from character_training.store import find_checkpoint
from safetensors.torch import load_file

TINY = TINY_RANDOM_NAME
SMOLLM2 = SMOLLM2_NAME
TINY_MODELS = dict.fromkeys(("student", "teacher", "generator", "judge"), TINY)


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


# -- stage tests ---------------------------------------------------------------------------------
def completion(key: str, text: str, *, complete: bool = True, **fields: Any) -> Completion:
    """A sampled reply as `sampling.sample_chat` returns it, for tests of what a stage makes of
    one: 5 tokens after a 9-token prompt, seed 1, ended on the stop sequence, or with
    ``complete=False`` cut off by ``max_tokens``; ``fields`` set any other `Completion` field."""
    values = {
        "key": key,
        "text": text,
        "prefill": "",
        "complete": complete,
        "stop_reason": "stop" if complete else "length",
        "num_tokens": 5,
        "prompt_tokens": 9,
        "logprob_sum": None,
        "seed": 1,
    }
    return Completion(**(values | fields))


def tiny_params(
    folder, overrides=None, *, persona: str = "sycophantic", smoke: bool = False
) -> RunParams:
    """Run parameters with every model the tiny random one, in fp32, with runs and reports
    under ``folder``: the ``tiny`` preset of ``persona``, or with ``smoke`` the notebooks'
    parameters at smoke sizes; ``overrides`` (dotted keys) on top."""
    if smoke:
        params = notebook_params(persona, "tiny", smoke=True)
    else:
        params = load_params("tiny", persona)
    folder = Path(folder)
    values = {
        **TINY_MODELS,
        "runs_dir": str(folder / "runs"),
        "reports_dir": str(folder / "reports"),
        "engine.precision": "fp32",
        **(overrides or {}),
    }
    return with_overrides(params, values)


@pytest.fixture(scope="session")
def tiny_run_params():
    """Factory: `tiny_params`, for tests that take their setup as fixtures."""
    return tiny_params


@pytest.fixture(scope="session")
def quick_training():
    """Factory: settings of a training section (``dpo``, ``sft``) for the tiny model: batches
    of 4, a constant ``learning_rate`` without warm-up for ``epochs``, and a resume point every
    2 steps, so that a resume test has one before its interruption."""

    def settings(section: str, learning_rate: float, epochs: int) -> dict:
        return {
            f"{section}.batch_size": 4,
            f"{section}.learning_rate": learning_rate,
            f"{section}.warmup_fraction": 0.0,
            f"{section}.schedule": "constant",
            f"{section}.epochs": epochs,
            f"{section}.save_every": 2,
        }

    return settings


@pytest.fixture
def interrupt_training(monkeypatch):
    """``with interrupt_training(step): ...``: inside the block the training loop dies, as a
    killed process would (KeyboardInterrupt), when it asks for ``step``'s learning rate; the
    block must end that way, and the loop is whole again after it."""

    @contextlib.contextmanager
    def interrupt(at: int):
        real = training.learning_rate_at

        def dying(step, *args):
            if step == at:
                raise KeyboardInterrupt("simulated interruption")
            return real(step, *args)

        with monkeypatch.context() as patch:
            patch.setattr(training, "learning_rate_at", dying)
            with pytest.raises(KeyboardInterrupt):
                yield

    return interrupt


@pytest.fixture(scope="session")
def assert_same_adapter():
    """Check that checkpoint ``name`` of two runs holds the same LoRA weights, to ``atol`` and
    ``rtol`` (a resumed run against an uninterrupted one)."""

    def check(run_a: Path, run_b: Path, name: str, atol: float, rtol: float) -> None:
        weights = "adapter/adapter_model.safetensors"
        a = load_file(f"{find_checkpoint(run_a, name).sampler_path}/{weights}")
        b = load_file(f"{find_checkpoint(run_b, name).sampler_path}/{weights}")
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], atol=atol, rtol=rtol)

    return check


class CountingService:
    """The real local service, counting the sampling clients it is asked for."""

    def __init__(self, inner):
        self.inner = inner
        self.created: list[dict] = []

    def create_sampling_client(self, **kwargs):
        self.created.append(kwargs)
        return self.inner.create_sampling_client(**kwargs)


@pytest.fixture(scope="session")
def counting_service():
    """Factory: ``counting_service(inner)`` wraps a service so a test can assert which
    sampling clients (``.created``) a run asked for, e.g. none on a resumed run."""
    return CountingService


def write_parameterised_notebook(path: Path, *code: str) -> Path:
    """A notebook at ``path`` with the runner's parameters cell (persona, size, params_json,
    smoke) followed by one code cell per ``code`` string: what the runner tests execute."""
    import nbformat

    nb = nbformat.v4.new_notebook()
    parameters = 'persona = "x"\nsize = "y"\nparams_json = ""\nsmoke = False'
    nb.cells = [nbformat.v4.new_code_cell(parameters, metadata={"tags": ["parameters"]})]
    nb.cells += [nbformat.v4.new_code_cell(source) for source in code]
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    nbformat.write(nb, str(path))
    return path
