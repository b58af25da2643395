"""Tinker presets name models the service serves, and a run checks that before paying.

Pins the failure that retired params/models/8b.yaml and 70b.yaml: Tinker dropped the Llama
models and Qwen3-235B-A22B-Instruct-2507 in June 2026, so those presets failed at their first
paid call. Every preset here must name models tinker-cookbook knows, with a recommended chat
format; the judge must come from another family than the student; and `service_client_for`
compares every model with the service's capability list first, failing in one line. The
capability list here is a real ``types.GetServerCapabilitiesResponse`` handed over by a small
stand-in, so the tests need neither a network nor a key.
"""

from __future__ import annotations

import pytest
from character_training.backends import service_client_for
from character_training.backends.local.lora import LORA_ALPHA
from character_training.backends.tinker_backend import (
    check_models_served,
    check_params_served,
    server_capabilities,
)
from character_training.config import available_sizes, load_params
from character_training.errors import BackendError, ConfigError
from character_training.renderers import renderer_for_model
from tinker import types
from tinker_cookbook import model_info
from tinker_cookbook.hyperparam_utils import get_lr

TINKER_SIZES = [s for s in available_sizes() if load_params(s, "sarcastic").backend == "tinker"]

# The paper (OpenCharacterTraining finetuning scripts): LoRA rank 64, alpha 128, lr 5e-5.
PAPER_LR, PAPER_ALPHA, PAPER_RANK = 5e-5, 128, 64


def _renderer(params, model: str) -> str:
    return params.renderers.get(model) or renderer_for_model(model)


def _served(*models: str, **flags) -> types.GetServerCapabilitiesResponse:
    return types.GetServerCapabilitiesResponse(
        supported_models=[types.SupportedModel(model_name=m, **flags) for m in models]
    )


def _billions(model: str) -> float:
    """Total parameters from the cookbook's size string: "9B" -> 9, "1T-A32B" -> 1000."""
    total = model_info.get_model_attributes(model).size_str.split("-")[0]
    return float(total[:-1]) * {"B": 1, "T": 1000}[total[-1]]


class StandIn:
    """Answers ``get_server_capabilities`` like the SDK: directly, or as a future."""

    def __init__(self, answer, as_future: bool = False):
        self.answer, self.as_future, self.calls = answer, as_future, 0

    def get_server_capabilities(self):
        self.calls += 1
        if isinstance(self.answer, Exception):
            raise self.answer
        if self.as_future:
            return type("Future", (), {"result": lambda _self: self.answer})()
        return self.answer


def test_there_is_a_size_ladder_of_tinker_presets_named_after_their_students():
    assert len(TINKER_SIZES) >= 3
    for size in TINKER_SIZES:
        params = load_params(size, "sarcastic")
        assert size == size.lower() and " " not in size
        assert params.student.split("/")[-1].lower().startswith(size)


@pytest.mark.parametrize("size", TINKER_SIZES)
def test_every_model_is_known_to_the_cookbook_with_a_recommended_renderer(size):
    params = load_params(size, "sarcastic")
    for role, model in params.models().items():
        attributes = model_info.get_model_attributes(model)  # raises for an unknown model
        assert attributes.is_chat, (role, model)
        recommended = model_info.get_recommended_renderer_names(model)
        assert _renderer(params, model) in recommended, (role, model)
    assert set(params.renderers) <= set(params.models().values())  # no stale renderer entries


@pytest.mark.parametrize("size", TINKER_SIZES)
def test_the_judge_is_another_family_than_the_student_and_the_teacher(size):
    params = load_params(size, "sarcastic")
    family = {
        role: model_info.get_model_attributes(m).organization for role, m in params.models().items()
    }
    assert family["judge"] != family["student"]
    assert family["judge"] != family["teacher"]


@pytest.mark.parametrize("size", TINKER_SIZES)
def test_the_teacher_is_bigger_and_thinks_and_the_student_and_generator_do_not(size):
    params = load_params(size, "sarcastic")
    assert params.teacher_thinking
    assert "disable_thinking" not in _renderer(params, params.teacher)
    assert _billions(params.teacher) >= 2 * _billions(params.student)
    assert _renderer(params, params.student).endswith("disable_thinking")
    assert params.renderers[params.generator] == "deepseekv3"  # DeepSeek V3's non-thinking mode


@pytest.mark.parametrize("size", TINKER_SIZES)
def test_every_model_has_a_dated_price(size):
    params = load_params(size, "sarcastic")
    assert params.prices.as_of and params.prices.source
    for model in params.models().values():
        assert model in params.prices.per_million, model


@pytest.mark.parametrize("size", TINKER_SIZES)
def test_learning_rates_keep_the_papers_step_size_and_sit_below_the_cookbook_recommendation(size):
    """Same update size as the paper: lr x alpha / rank matches (our alpha is Tinker's 32)."""
    params = load_params(size, "sarcastic")
    assert params.lora_rank == PAPER_RANK
    paper_step = PAPER_LR * PAPER_ALPHA / PAPER_RANK
    for lr in (params.dpo.learning_rate, params.sft.learning_rate):
        assert lr * LORA_ALPHA / params.lora_rank == pytest.approx(paper_step)
        # the cookbook's supervised LoRA recommendation, offline for Qwen (hidden size baked in)
        assert get_lr(params.student) / 4 < lr < get_lr(params.student)


@pytest.mark.parametrize("size", TINKER_SIZES)
def test_a_preset_passes_the_capability_check_when_everything_is_served(size):
    params = load_params(size, "sarcastic")
    served = _served(*params.models().values(), "Qwen/Qwen3-8B", trainable=True, sampleable=True)
    check_params_served(params, StandIn(served))
    check_params_served(params, StandIn(served, as_future=True))  # RestClient returns a future
    unknown_flags = _served(*params.models().values())  # flags left unset are not held against
    check_params_served(params, StandIn(unknown_flags))


def test_a_retired_model_fails_in_one_line_naming_it_and_what_is_served():
    params = load_params(
        "qwen3.5-9b", "sarcastic", {"teacher": "Qwen/Qwen3-235B-A22B-Instruct-2507"}
    )
    served = _served(params.student, params.generator, "moonshotai/Kimi-K2.6")
    with pytest.raises(ConfigError) as info:
        check_params_served(params, StandIn(served))
    message = str(info.value)
    assert "\n" not in message
    assert "teacher model 'Qwen/Qwen3-235B-A22B-Instruct-2507' is not served by Tinker" in message
    assert "served: Qwen/Qwen3.5-9B, deepseek-ai/DeepSeek-V3.1, moonshotai/Kimi-K2.6" in message
    assert "params/models/qwen3.5-9b.yaml" in message


def test_a_student_that_cannot_be_trained_or_a_model_that_cannot_be_sampled_fails():
    models = {"student": "a/student", "judge": "b/judge"}
    frozen = types.GetServerCapabilitiesResponse(
        supported_models=[
            types.SupportedModel(model_name="a/student", trainable=False),
            types.SupportedModel(model_name="b/judge", trainable=False),
        ]
    )
    with pytest.raises(
        ConfigError, match="student model 'a/student' is served by Tinker but not trainable"
    ):
        check_models_served(models, frozen)
    check_models_served({"judge": "b/judge"}, frozen)  # only the student is trained
    busy = _served("a/student", "b/judge", sampleable=False)
    with pytest.raises(ConfigError, match="not sampleable"):
        check_models_served(models, busy)


def test_a_failed_capability_query_is_one_backend_error_line():
    params = load_params("qwen3.5-4b", "sarcastic")
    with pytest.raises(BackendError) as info:
        check_params_served(params, StandIn(OSError("connection refused\nmore detail")))
    assert "could not read Tinker's capability list" in str(info.value)
    assert "\n" not in str(info.value)
    with pytest.raises(BackendError, match="expected GetServerCapabilitiesResponse"):
        server_capabilities(StandIn({"supported_models": []}))


def test_service_client_for_checks_before_returning_a_tinker_client(monkeypatch):
    monkeypatch.setenv("TINKER_API_KEY", "tml-" + "f" * 40)  # fake; the client makes no call
    params = load_params("qwen3.5-4b", "sarcastic")
    retired = StandIn(_served("meta-llama/Llama-3.1-8B-Instruct"))
    with pytest.raises(ConfigError, match="student model 'Qwen/Qwen3.5-4B' is not served"):
        service_client_for(params, capabilities_source=retired)
    assert retired.calls == 1
    ok = StandIn(_served(*params.models().values()))
    client = service_client_for(params, capabilities_source=ok)
    assert type(client.wrapped).__name__ == "ServiceClient" and ok.calls == 1  # metered


def test_a_missing_key_still_fails_first_without_asking_the_service(monkeypatch):
    from character_training.errors import MissingCredentialsError

    monkeypatch.delenv("TINKER_API_KEY", raising=False)
    source = StandIn(_served())
    with pytest.raises(MissingCredentialsError):
        service_client_for(load_params("qwen3.5-4b", "sarcastic"), capabilities_source=source)
    assert source.calls == 0
