"""The local clients keep the installed Tinker SDK's public surface: "one code path, really".

Pipeline code, tinker-cookbook and notebooks are written against ``tinker.ServiceClient``,
``TrainingClient`` and ``SamplingClient``; the local engine must accept exactly the same calls.
The method list and every signature are read from the installed ``tinker`` classes with
``inspect``, so an SDK upgrade that adds a method or a parameter fails here first.

Counts against tinker 0.38.0: the SDK's three clients have 56 public members (ServiceClient
17, TrainingClient 27, SamplingClient 12); the local clients have all 56 with the same
parameter names, kinds, defaults and annotations, the same sync/async nature and the same
deprecations (before this test, 30 of them were missing). 9 of them are Tinker-only and fail
in one line: ServiceClient.get_console_url, holder, create_rest_client; TrainingClient
.get_console_url, save_weights_external(_async); SamplingClient.get_sampler_handle,
from_sampler_handle, create. The three ``get_telemetry`` return None, the SDK's answer when no
telemetry is collected.

Bugs pinned here:

* a local method missing, or taking other parameters than the SDK's, or swallowing unknown
  ones in ``**kwargs``; a sync method where the SDK's is async, or the reverse;
* ``create_*`` returning the client where the SDK returns a future of it (or a future that
  cannot stand in for the client, as the SDK's still can);
* ``loss_fn_config`` ignored: ppo / cispo / dro checked against a hand computation, clip
  thresholds included;
* custom-loss log-probabilities handed over differently from the SDK (device, dtype, leaf), and
  a loss that leaves some log-probabilities without a gradient passing silently;
* unsupported arguments and Tinker-only methods that do anything but fail in one line;
* tinker-cookbook's completers and evaluators not running on a local sampling client.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import math
import re
import warnings
from pathlib import Path
from typing import get_args

import numpy as np
import pytest
import tinker
import torch
from character_training.backends import resolve_client
from character_training.backends.local import (
    TINY_RANDOM_NAME,
    LocalSamplingClient,
    LocalSamplingClientFuture,
    LocalServiceClient,
    LocalTrainingClient,
    LocalTrainingClientFuture,
)
from character_training.backends.local.losses import (
    BUILTIN_LOSSES,
    TINKER_LOSS_TYPES,
    UNSUPPORTED_LOSSES,
)
from character_training.backends.local.sdk_arguments import (
    ARGUMENT_RULES,
    DEPRECATED_ARGUMENTS,
    literal_values,
)
from character_training.errors import BackendError, DataError

# the engine-side gradient helpers the training tests use (one definition, in their module)
from test_local_training import hand_logprobs, make_datum, take_grads, trainable
from tinker import types
from tinker.lib.api_future_impl import QueueState
from tinker.lib.public_interfaces.api_future import APIFuture

TINY = TINY_RANDOM_NAME
TEXTS = (
    "The lighthouse keeper counted ships until dawn.",
    "Seven quiet herons stood in the reeds, watching the river rise.",
)

# -- the surface, derived from the installed SDK --------------------------------------------------
CLIENT_PAIRS = {
    "ServiceClient": (tinker.ServiceClient, LocalServiceClient),
    "TrainingClient": (tinker.TrainingClient, LocalTrainingClient),
    "SamplingClient": (tinker.SamplingClient, LocalSamplingClient),
}
# SDK class names in annotations -> the local classes that play their part.
LOCAL_NAMES = {
    "TrainingClient": "LocalTrainingClient",
    "SamplingClient": "LocalSamplingClient",
    "BackcompatTrainingClientFuture": "LocalTrainingClientFuture",
    "BackcompatSamplingClientFuture": "LocalSamplingClientFuture",
}
TINKER_ONLY = {
    "ServiceClient": ("get_console_url", "holder", "create_rest_client"),
    "TrainingClient": ("get_console_url", "save_weights_external", "save_weights_external_async"),
    "SamplingClient": ("get_sampler_handle", "from_sampler_handle", "create"),
}


def public_members(cls: type) -> list[str]:
    return sorted(name for name, _ in inspect.getmembers(cls) if not name.startswith("_"))


SURFACE = [
    (client, name) for client, (sdk, _) in CLIENT_PAIRS.items() for name in public_members(sdk)
]


def descriptor_kind(cls: type, name: str) -> str:
    raw = inspect.getattr_static(cls, name)
    if isinstance(raw, (staticmethod, classmethod, property)):
        return type(raw).__name__
    return "method" if callable(raw) else type(raw).__name__


def is_async(function) -> bool:
    """Async by the innermost function: the SDK wraps coroutines in plain deprecation wrappers."""
    return inspect.iscoroutinefunction(inspect.unwrap(function))


def normalise_annotation(annotation, rename: bool) -> str:
    if annotation is inspect.Parameter.empty:
        return "<none>"
    text = str(annotation).replace("'", '"').replace(" ", "")
    if rename:
        for sdk_name, local_name in LOCAL_NAMES.items():
            text = re.sub(rf"\b{sdk_name}\b", local_name, text)
    return text


def signature_facts(function, rename: bool) -> list[tuple]:
    signature = inspect.signature(function)
    params = [
        (p.name, p.kind, p.default, normalise_annotation(p.annotation, rename))
        for p in signature.parameters.values()
    ]
    return params + [("->", normalise_annotation(signature.return_annotation, rename))]


def test_the_docstring_counts_match_the_installed_sdk():
    """An SDK upgrade that changes the surface must update the counts quoted above."""
    per_client = {client: len(public_members(sdk)) for client, (sdk, _) in CLIENT_PAIRS.items()}
    assert per_client == {"ServiceClient": 17, "TrainingClient": 27, "SamplingClient": 12}
    assert len(SURFACE) == 56
    assert sum(len(names) for names in TINKER_ONLY.values()) == 9


def test_every_argument_rule_names_a_parameter_the_sdk_still_has():
    """The checks are keyed by SDK parameter name: a rename in the SDK would silently drop one."""
    parameters = {
        (name, parameter.name): parameter
        for sdk, _ in CLIENT_PAIRS.values()
        for name in public_members(sdk)
        if descriptor_kind(sdk, name) == "method"
        for parameter in inspect.signature(getattr(sdk, name)).parameters.values()
    }
    assert set(ARGUMENT_RULES) <= {parameter for _, parameter in parameters}
    assert set(DEPRECATED_ARGUMENTS) <= set(parameters)
    literals = {key for key, p in parameters.items() if literal_values(p.annotation) is not None}
    assert literals == {
        ("close", "status"),
        ("forward_backward_custom", "loss_type_input"),
        ("forward_backward_custom_async", "loss_type_input"),
    }


@pytest.mark.parametrize(("client", "name"), SURFACE, ids=[f"{c}.{n}" for c, n in SURFACE])
def test_every_public_sdk_member_exists_locally_with_the_same_contract(client, name):
    sdk_cls, local_cls = CLIENT_PAIRS[client]
    assert hasattr(local_cls, name), f"Local{client} lacks {name}"
    assert descriptor_kind(local_cls, name) == descriptor_kind(sdk_cls, name)
    if descriptor_kind(sdk_cls, name) == "property":
        return
    sdk_fn = inspect.getattr_static(sdk_cls, name)
    local_fn = inspect.getattr_static(local_cls, name)
    if isinstance(sdk_fn, staticmethod):
        sdk_fn, local_fn = sdk_fn.__func__, local_fn.__func__
    assert is_async(local_fn) == is_async(sdk_fn), "sync/async nature differs"
    assert bool(getattr(local_fn, "__deprecated__", None)) == bool(
        getattr(sdk_fn, "__deprecated__", None)
    ), "deprecation differs"
    assert signature_facts(local_fn, rename=False) == signature_facts(sdk_fn, rename=True)
    local_params = inspect.signature(local_fn).parameters.values()
    assert all(p.kind is not inspect.Parameter.VAR_KEYWORD for p in local_params)


# -- fixtures and helpers -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def trainer(new_tiny_trainer) -> LocalTrainingClient:
    return new_tiny_trainer(seed=7, scale=0.4)


def assert_grads_close(engine: list[torch.Tensor], hand: list[torch.Tensor]) -> None:
    """Every LoRA gradient matches to fp32 summation noise, relative to the largest entry
    (batched and single-sequence passes add in different orders)."""
    assert len(engine) == len(hand) > 0
    scale = max(float(h.abs().max()) for h in hand)
    assert scale > 1e-3  # not a comparison of zeros
    for e, h in zip(engine, hand):
        torch.testing.assert_close(e, h, atol=2e-6 * scale, rtol=1e-4)


def one_line_error(call, error_type=BackendError) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # deprecated methods warn, as in the SDK
        with pytest.raises(error_type) as caught:
            result = call()
            if inspect.iscoroutine(result):
                asyncio.run(result)
    message = str(caught.value)
    assert "\n" not in message
    return message


# -- futures and async twins --------------------------------------------------------------------
def test_create_methods_return_futures_that_give_the_client_and_stand_in_for_it(tiny_service):
    cases = [
        (
            tiny_service.create_lora_training_client(TINY, rank=4, seed=0),
            LocalTrainingClientFuture,
            LocalTrainingClient,
            tinker.TrainingClient,
        ),
        (
            tiny_service.create_sampling_client(base_model=TINY),
            LocalSamplingClientFuture,
            LocalSamplingClient,
            tinker.SamplingClient,
        ),
    ]
    trainer_client = cases[0][0].result()
    cases.append(
        (
            trainer_client.save_weights_and_get_sampling_client(),
            LocalSamplingClientFuture,
            LocalSamplingClient,
            tinker.SamplingClient,
        )
    )
    for future, future_type, client_type, sdk_type in cases:
        assert isinstance(future, APIFuture) and isinstance(future, future_type)
        client = future.result()
        assert isinstance(client, client_type)
        assert resolve_client(future) is client and resolve_client(client) is client
        assert asyncio.run(future.result_async()) is client
        for name in public_members(sdk_type):
            if (
                name in TINKER_ONLY[sdk_type.__name__]
                or descriptor_kind(sdk_type, name) != "method"
            ):
                continue
            with pytest.warns(FutureWarning, match="Using the future as the"):
                forwarded = getattr(future, name)
            assert forwarded == getattr(client, name), name


def test_async_twins_return_what_the_sdk_returns_and_warn_as_deprecated(tiny_service, tokenizer):
    tokens = tokenizer.encode(TEXTS[0])
    datum = make_datum(tokens, weights=[1.0] * (len(tokens) - 1))

    async def run():
        trainer_client = await tiny_service.create_lora_training_client_async(TINY, rank=4)
        sampler = await trainer_client.save_weights_and_get_sampling_client_async()
        forward = await trainer_client.forward_async([datum], "cross_entropy")
        response = await sampler.sample_async(
            types.ModelInput.from_ints(tokens), 1, types.SamplingParams(max_tokens=3, seed=0)
        )
        scores = await sampler.compute_logprobs_async(types.ModelInput.from_ints(tokens))
        info = await trainer_client.get_info_async()
        return trainer_client, sampler, forward, response, scores, info

    with pytest.warns(FutureWarning, match="deprecated in the Tinker SDK"):
        trainer_client, sampler, forward, response, scores, info = asyncio.run(run())
    assert isinstance(trainer_client, LocalTrainingClient)
    assert isinstance(sampler, LocalSamplingClient)
    assert isinstance(forward, APIFuture)  # as in the SDK: awaiting gives the future
    assert forward.result().metrics["loss:sum"] > 0
    assert isinstance(response, types.SampleResponse) and len(response.sequences) == 1
    assert scores[0] is None and len(scores) == len(tokens)
    assert info.model_name == TINY


def test_tinker_only_methods_fail_in_one_line_and_telemetry_is_none(tiny_service, trainer):
    sampler = tiny_service.create_sampling_client(base_model=TINY).result()
    calls = {
        "ServiceClient.get_console_url": lambda: tiny_service.get_console_url(),
        "ServiceClient.holder": lambda: tiny_service.holder,
        "ServiceClient.create_rest_client": lambda: tiny_service.create_rest_client(),
        "TrainingClient.get_console_url": lambda: trainer.get_console_url(),
        "TrainingClient.save_weights_external": lambda: trainer.save_weights_external("x"),
        "TrainingClient.save_weights_external_async": lambda: trainer.save_weights_external_async(
            "x"
        ),
        "SamplingClient.get_sampler_handle": lambda: sampler.get_sampler_handle(),
        "SamplingClient.from_sampler_handle": lambda: LocalSamplingClient.from_sampler_handle("h"),
        "SamplingClient.create": lambda: LocalSamplingClient.create(None, base_model=TINY),
    }
    assert sorted(calls) == sorted(f"{c}.{n}" for c, names in TINKER_ONLY.items() for n in names)
    for name, call in calls.items():
        assert "is Tinker-only" in one_line_error(call), name
    assert tiny_service.get_telemetry() is None
    assert trainer.get_telemetry() is None and sampler.get_telemetry() is None


def test_local_only_answers_keep_the_sdk_types(tiny_service, trainer, tmp_path, caplog):
    with pytest.warns(FutureWarning):
        capabilities = tiny_service.get_server_capabilities()
    assert isinstance(capabilities, types.GetServerCapabilitiesResponse)
    assert TINY in [m.model_name for m in capabilities.supported_models]

    source = trainer.save_state("to-copy", ttl_seconds=7200, user_metadata={"k": "v"}).result()
    copy = tiny_service.copy_weights(source.path).result()
    manifest = json.loads((Path(copy) / "engine_checkpoint.json").read_text())
    assert copy != source.path and manifest["kind"] == "state"
    assert manifest["copied_from"] == source.path and manifest["user_metadata"] == {"k": "v"}
    restored = tiny_service.create_training_client_from_state(copy).result()
    assert restored.base_model == TINY and restored.run_id != trainer.run_id
    # as on Tinker, a client resumed from a state is a new run: the source's names are free
    resumed = tiny_service.create_training_client_from_state(source.path).result()
    assert resumed.run_id != trainer.run_id and resumed.steps == trainer.steps
    assert resumed.save_state("to-copy").result().path != source.path

    sampler = tiny_service.create_sampling_client(base_model=TINY).result()
    sampler.on_queue_state_change(QueueState.ACTIVE, None)
    sampler.on_queue_state_change(QueueState.PAUSED_CAPACITY, "busy")
    sampler.on_queue_state_change(QueueState.PAUSED_CAPACITY, "busy")  # rate-limited
    assert [r.getMessage() for r in caplog.records if "paused" in r.getMessage()] == [
        f"sampling is paused for {TINY}: busy"
    ]

    closing = LocalServiceClient(root_dir=str(tmp_path), precision="fp32")
    assert closing.close("success").result() is None
    assert "closed" in one_line_error(lambda: closing.create_sampling_client(base_model=TINY))


# -- arguments the local engine cannot honour fail in one line ----------------------------------
def _bad_calls(service, trainer, sampler, tokenizer) -> dict[str, tuple]:
    tokens = tokenizer.encode(TEXTS[0])
    prompt = types.ModelInput.from_ints(tokens)
    params = types.SamplingParams(max_tokens=2)
    sft = [make_datum(tokens, weights=[1.0] * (len(tokens) - 1))]
    rl = [
        make_datum(
            tokens, logprobs=[-1.0] * (len(tokens) - 1), advantages=[1.0] * (len(tokens) - 1)
        )
    ]
    state = trainer.save_state("bad-calls", overwrite=True).result().path
    ids = torch.full((len(tokens) - 1, 8), -1, dtype=torch.long)  # wide: sparse saves space
    ids[-1, 0] = tokens[-1]
    return {
        "access_token": (
            lambda: service.create_training_client_from_state(state, weights_access_token="t"),
            "weights_access_token is Tinker-only",
        ),
        "access_token_to_an_async_twin": (
            lambda: trainer.load_state_async(state, weights_access_token="t"),
            "load_state: weights_access_token is Tinker-only",
        ),
        "loss_type_input_outside_its_literal": (
            lambda: trainer.forward_backward_custom(sft, _weighted_square, loss_type_input="x"),
            "loss_type_input='x', expected one of ('logprobs', None)",
        ),
        "other_base_model": (
            lambda: service.create_training_client_from_state(state, base_model="other"),
            "base_model='other' but checkpoint",
        ),
        "dimuon": (
            lambda: service.create_lora_training_client(
                TINY, optimizer=types.DimuonOptimizerConfig()
            ),
            "optimizer 'dimuon' is not supported",
        ),
        "bad_user_metadata": (
            lambda: service.create_lora_training_client(TINY, user_metadata={"a": 1}),
            "user_metadata must be a dict of str to str",
        ),
        "stability_info": (
            lambda: service.create_sampling_client(base_model=TINY, record_stability_info=True),
            "record_stability_info=True is Tinker-only",
        ),
        "bad_retry_config": (
            lambda: service.create_sampling_client(base_model=TINY, retry_config={"max": 3}),
            "retry_config must be a tinker RetryConfig",
        ),
        "inflight": (
            lambda: trainer.save_weights_and_get_sampling_client(kind="inflight"),
            "implements 'snapshot' only",
        ),
        "short_ttl": (
            lambda: trainer.save_state("ttl", ttl_seconds=60),
            "ttl_seconds=60, expected None or an integer between 3600",
        ),
        "existing_state": (
            lambda: trainer.save_state("bad-calls"),
            "already exists at",
        ),
        "existing_sampler_weights": (
            lambda: [trainer.save_weights_for_sampler("twice") for _ in range(2)],
            "pick a new name",
        ),
        "both_optim_params": (
            lambda: trainer.optim_step(types.AdamParams(), adam_params=types.AdamParams()),
            "not both",
        ),
        "no_optim_params": (lambda: trainer.optim_step(), "got NoneType"),
        "dimuon_step": (
            lambda: trainer.optim_step(types.DimuonParams(learning_rate=1e-3)),
            "expects tinker.types.AdamParams",
        ),
        "unknown_config_key": (
            lambda: trainer.forward(rl, "ppo", {"clip_epsilon": 0.2}),
            "keys ['clip_epsilon'] are not accepted by loss 'ppo'",
        ),
        "config_for_cross_entropy": (
            lambda: trainer.forward(sft, "cross_entropy", {"beta": 0.1}),
            "are not accepted by loss 'cross_entropy': expected none",
        ),
        "dro_without_beta": (lambda: trainer.forward(rl, "dro"), "needs loss_fn_config['beta']"),
        "string_threshold": (
            lambda: trainer.forward(rl, "cispo", {"clip_low_threshold": "0.8"}),
            "expected a number",
        ),
        "crossed_thresholds": (
            lambda: trainer.forward(rl, "ppo", {"clip_low_threshold": 1.3}),
            "expected 0 <= clip_low_threshold <= clip_high_threshold",
        ),
        "topk_sample_logprobs": (
            lambda: sampler.sample(prompt, 1, params, topk_sample_logprobs=2),
            "topk_sample_logprobs is not supported",
        ),
        "prompt_alt_tokens": (
            lambda: sampler.sample(prompt, 1, params, prompt_alt_tokens_k=2),
            "prompt_alt_tokens_k is not supported",
        ),
        "last_n_without_prompt_logprobs": (
            lambda: sampler.sample(prompt, 1, params, prompt_logprobs_last_n=2),
            "set include_prompt_logprobs=True",
        ),
        "last_n_too_long": (
            lambda: sampler.compute_logprobs(prompt, prompt_logprobs_last_n=len(tokens)),
            f"expected None or an integer between 1 and len(prompt) - 1 = {len(tokens) - 1}",
        ),
        "sparse_target": (
            lambda: sampler.sample(
                prompt,
                1,
                params,
                target_prompt_logprobs=types.TensorData.from_torch_sparse(ids, pad_value=-1),
            ),
            "a sparse target_prompt_logprobs is not supported",
        ),
        "target_rows": (
            lambda: sampler.sample(
                prompt, 1, params, target_prompt_logprobs=types.TensorData.from_torch(ids[1:])
            ),
            f"must have shape [len(prompt) - 1, K] = [{len(tokens) - 1}, K]",
        ),
        "bad_close_status": (lambda: service.close("done"), "status='done', expected one of"),
        "rest_client": (lambda: service.create_rest_client(), "is Tinker-only"),
    }


def test_unsupported_arguments_fail_in_one_line_saying_what_was_expected(
    tiny_service, trainer, tiny_sampler, tokenizer
):
    for name, (call, fragment) in _bad_calls(
        tiny_service, trainer, tiny_sampler, tokenizer
    ).items():
        try:
            message = one_line_error(call)
        except pytest.fail.Exception as failure:
            raise AssertionError(f"{name}: {failure}") from None
        assert fragment in message, f"{name}: {message}"


def test_every_tinker_loss_type_is_implemented_or_fails_in_one_line(trainer, tokenizer):
    """An SDK upgrade that adds a loss type shows up here."""
    assert set(TINKER_LOSS_TYPES) == set(BUILTIN_LOSSES) | set(UNSUPPORTED_LOSSES)
    tokens = tokenizer.encode(TEXTS[0])
    n = len(tokens) - 1
    datum = make_datum(tokens, weights=[1.0] * n, logprobs=[-2.0] * n, advantages=[1.0] * n)
    for loss_fn in get_args(types.LossFnType):
        config = {"beta": 0.1} if loss_fn == "dro" else None
        if loss_fn in BUILTIN_LOSSES:
            assert math.isfinite(
                trainer.forward([datum], loss_fn, config).result().metrics["loss:sum"]
            )
        else:
            message = one_line_error(lambda name=loss_fn: trainer.forward([datum], name))
            assert f"loss_fn={loss_fn!r} is not supported" in message
    per_token = make_datum(
        tokens, logprobs=[-2.0] * n, advantages=[1.0] * n, clip_low_threshold=[0.5] * n
    )
    assert "per-token loss_fn_inputs ['clip_low_threshold']" in one_line_error(
        lambda: trainer.forward([per_token], "ppo"), DataError
    )


# -- loss_fn_config against hand computations ----------------------------------------------------
def test_ppo_cispo_and_dro_per_token_losses_equal_the_documented_formulas_on_literal_numbers():
    """Two tokens by hand: ratio 1.5 with advantage +1, ratio 0.5 with advantage -1."""
    lp = torch.tensor([math.log(1.5) - 1.0, math.log(0.5) - 1.0])
    inputs = {"logprobs": torch.tensor([-1.0, -1.0]), "advantages": torch.tensor([1.0, -1.0])}
    ppo, cispo, dro = (BUILTIN_LOSSES[name].fn for name in ("ppo", "cispo", "dro"))
    default = {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}
    tight = {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1}
    # ppo: -min(r A, clip(r) A): token 0 -> -min(1.5, 1.2), token 1 -> -min(-0.5, -0.8)
    assert ppo(lp, inputs, default)[1]["elementwise_loss"].tolist() == pytest.approx([-1.2, 0.8])
    assert ppo(lp, inputs, tight)[1]["elementwise_loss"].tolist() == pytest.approx([-1.1, 0.9])
    # cispo: -clip(r) * lp * A
    expected = [-1.2 * float(lp[0]), 0.8 * float(lp[1])]
    assert cispo(lp, inputs, default)[1]["elementwise_loss"].tolist() == pytest.approx(expected)
    # dro: -(lp A - beta / 2 (lp - q)^2) with beta 0.5
    expected = [
        -(float(lp[0]) - 0.25 * math.log(1.5) ** 2),
        -(-float(lp[1]) - 0.25 * math.log(0.5) ** 2),
    ]
    assert dro(lp, inputs, {"beta": 0.5})[1]["elementwise_loss"].tolist() == pytest.approx(expected)


RATIO_CYCLE = (0.55, 0.85, 0.97, 1.04, 1.15, 1.45)  # each side of every threshold used below


@pytest.mark.parametrize(
    ("loss_fn", "config"),
    [
        ("importance_sampling", None),
        ("ppo", None),
        ("ppo", {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1}),
        ("cispo", None),
        ("cispo", {"clip_low_threshold": 0.95, "clip_high_threshold": 1.05}),
        ("dro", {"beta": 0.3}),
    ],
)
def test_loss_fn_config_gives_the_loss_and_lora_gradients_of_a_hand_computation(
    loss_fn, config, new_tiny_trainer, tokenizer
):
    client = new_tiny_trainer(seed=11)
    low = (config or {}).get("clip_low_threshold", 0.8)
    high = (config or {}).get("clip_high_threshold", 1.2)
    data = []
    for i, text in enumerate(TEXTS):
        tokens = tokenizer.encode(text)
        n = len(tokens) - 1
        with torch.no_grad():
            lp = hand_logprobs(client.model, make_datum(tokens))
        ratios = torch.tensor([RATIO_CYCLE[(t + i) % len(RATIO_CYCLE)] for t in range(n)])
        advantages = torch.tensor([1.0 if (t // 2) % 2 == 0 else -0.7 for t in range(n)])
        data.append(make_datum(tokens, logprobs=lp - torch.log(ratios), advantages=advantages))

    out = client.forward_backward(data, loss_fn, config).result()
    engine_grads = take_grads(client)

    hand_total, clipped_tokens = torch.zeros(()), 0
    for datum, output in zip(data, out.loss_fn_outputs):
        lp = hand_logprobs(client.model, datum)
        q = datum.loss_fn_inputs["logprobs"].to_torch()
        adv = datum.loss_fn_inputs["advantages"].to_torch()
        ratio = torch.exp(lp - q)
        clipped = ratio.clamp(low, high)
        clipped_tokens += int(((ratio < low) | (ratio > high)).sum())
        per_token = {
            "importance_sampling": -ratio * adv,
            "ppo": -torch.min(ratio * adv, clipped * adv),
            "cispo": -clipped.detach() * lp * adv,
            "dro": -(lp * adv - 0.5 * (config or {}).get("beta", 0.0) * (lp - q) ** 2),
        }[loss_fn]
        torch.testing.assert_close(
            output["elementwise_loss"].to_torch(), per_token.detach(), atol=1e-5, rtol=1e-5
        )
        hand_total = hand_total + per_token.sum()
    assert clipped_tokens > 0  # the thresholds are exercised
    assert out.metrics["loss:sum"] == pytest.approx(float(hand_total.detach()), abs=1e-4)
    hand_total.backward()
    assert_grads_close(engine_grads, take_grads(client))


# -- custom losses ---------------------------------------------------------------------------
def _weighted_square(batch, logprobs):
    loss = sum(
        (((lp + 3.0) ** 2) * d.loss_fn_inputs["weights"].to_torch()).sum()
        for d, lp in zip(batch, logprobs)
    )
    return loss, {"custom/square:sum": float(loss.detach())}


def square(logprobs, weights):
    loss = (((logprobs + 3.0) ** 2) * weights).sum()
    return loss, {"custom/square:sum": loss}


def test_custom_losses_get_the_sdk_tensors_and_give_the_gradient_of_the_loss(
    new_tiny_trainer, tiny_service, tokenizer, tmp_path
):
    client = new_tiny_trainer(seed=12)
    data = []
    for i, text in enumerate(TEXTS):
        tokens = tokenizer.encode(text)
        data.append(make_datum(tokens, weights=[0.0] + [1.0 + 0.1 * i] * (len(tokens) - 2)))
    seen: list[torch.Tensor] = []

    def recording_loss(batch, logprobs):
        seen.extend(logprobs)
        return _weighted_square(batch, logprobs)

    out = client.forward_backward_custom(data, recording_loss).result()
    engine_grads = take_grads(client)
    for lp, datum in zip(seen, data):  # what the SDK hands the loss
        assert (lp.device.type, lp.dtype, lp.is_leaf, lp.requires_grad) == (
            "cpu",
            torch.float32,
            True,
            True,
        )
        assert tuple(lp.shape) == (datum.model_input.length,)

    hand_lps = [hand_logprobs(client.model, d) for d in data]
    hand_loss, _ = _weighted_square(data, hand_lps)
    hand_loss.backward()
    assert out.metrics["loss:sum"] == pytest.approx(float(hand_loss.detach()), abs=1e-3)
    assert out.metrics["custom/square:sum"] == pytest.approx(out.metrics["loss:sum"])
    # the service's linear surrogate sum(dLoss/dlogprob * logprob), reported as on Tinker
    surrogate = sum(
        float((2 * (lp + 3.0) * d.loss_fn_inputs["weights"].to_torch() * lp).sum().detach())
        for lp, d in zip(hand_lps, data)
    )
    assert out.metrics["surrogate_loss:sum"] == pytest.approx(surrogate, rel=1e-5)
    assert_grads_close(engine_grads, take_grads(client))

    # the same loss as a LossHandle from create_custom_loss: same numbers, same gradients
    handle = tiny_service.create_custom_loss(square, {"logprobs": 1, "weights": 1}).result()
    assert isinstance(handle, tinker.LossHandle) and handle.loss_id is None
    by_handle = client.forward_backward_custom(data, handle).result()
    assert by_handle.metrics["custom/square:sum"] == pytest.approx(out.metrics["loss:sum"])
    assert_grads_close(take_grads(client), engine_grads)

    other = LocalServiceClient(root_dir=str(tmp_path), precision="fp32")
    foreign = other.create_custom_loss(square, {"logprobs": 1, "weights": 1}).result()
    assert "created by another service client" in one_line_error(
        lambda: client.forward_backward_custom(data, foreign)
    )


def test_a_custom_loss_that_leaves_log_probabilities_without_gradient_fails_as_on_tinker(
    trainer, tiny_service, tokenizer
):
    data = [make_datum(tokenizer.encode(t), weights=[1.0] * 8) for t in ("a b c d e f g h i",) * 2]

    def first_only(batch, logprobs):
        return (logprobs[0] ** 2).sum(), {}

    def constant(batch, logprobs):
        return torch.tensor(1.0), {}

    def per_token(batch, logprobs):
        return logprobs[0] * 2, {}

    def leaves_torch(logprobs, weights):
        return (logprobs * weights).sum(), {"custom/x:sum": (logprobs * weights).sum().item()}

    assert "no gradient reached the log-probabilities of datum 1" in one_line_error(
        lambda: trainer.forward_backward_custom(data, first_only)
    )
    assert "the loss has no gradient" in one_line_error(
        lambda: trainer.forward_backward_custom(data, constant)
    )
    assert "scalar torch.Tensor" in one_line_error(
        lambda: trainer.forward_backward_custom(data, per_token)
    )
    assert "calls item(), which leaves torch" in one_line_error(
        lambda: tiny_service.create_custom_loss(leaves_torch, {"logprobs": 1, "weights": 1})
    )
    assert all(p.grad is None for p in trainable(trainer))  # failed calls left no gradient


# -- prompt-side sampling options -------------------------------------------------------------
def test_prompt_side_sampling_options_agree_with_compute_logprobs(trainer, tokenizer):
    sampler = trainer.save_weights_and_get_sampling_client().result()
    tokens = tokenizer.encode(TEXTS[1])
    length = len(tokens)
    prompt = types.ModelInput.from_ints(tokens)
    full = sampler.compute_logprobs(prompt).result()
    tail = sampler.compute_logprobs(prompt, prompt_logprobs_last_n=3).result()
    assert tail[: length - 3] == [None] * (length - 3)  # only the tail is unembedded locally
    np.testing.assert_allclose(tail[-3:], full[-3:], atol=1e-5)

    ids = torch.full((length - 1, 2), -1, dtype=torch.long)
    ids[:, 0] = torch.tensor(tokens[1:])  # the prompt's own next tokens ...
    ids[::3, 1] = 42  # ... and, on some rows, one other token
    response = sampler.sample(
        prompt,
        2,
        types.SamplingParams(max_tokens=3, seed=5),
        include_prompt_logprobs=True,
        topk_prompt_logprobs=5,
        target_prompt_logprobs=types.TensorData.from_torch(ids),
        prompt_logprobs_last_n=4,
    ).result()
    assert len(response.sequences) == 2
    assert response.prompt_logprobs[: length - 4] == [None] * (length - 4)
    np.testing.assert_allclose(response.prompt_logprobs[-4:], full[-4:], atol=1e-4)

    topk = response.topk_prompt_logprobs
    assert topk[: length - 4] == [None] * (length - 4)
    for position in range(length - 4, length):
        row = topk[position]
        assert len(row) == 5 and [lp for _, lp in row] == sorted(
            (lp for _, lp in row), reverse=True
        )
        assert sum(math.exp(lp) for _, lp in row) <= 1 + 1e-5
        for token, lp in row:
            if token == tokens[position]:
                assert lp == pytest.approx(full[position], abs=1e-4)

    target = response.target_prompt_logprobs.to_numpy()
    assert target.shape == (length - 1, 2) and target.dtype == np.float32
    np.testing.assert_allclose(target[:, 0], full[1:], atol=1e-4)  # not limited by last_n
    assert (target[1::3, 1] == 0.0).all() and (target[::3, 1] < 0).all()


# -- tinker-cookbook on the local engine -----------------------------------------------------
@pytest.mark.filterwarnings("ignore::FutureWarning")  # the cookbook calls deprecated SDK methods
def test_tinker_cookbook_completers_and_evaluators_run_on_a_local_sampling_client(
    trainer, tokenizer
):
    """Token and message completers, and the NLL evaluators on both client kinds.

    (``tinker_cookbook.eval.custom_evaluators`` cannot be imported offline: it builds an
    evaluator for a hub model at import time.)
    """
    from tinker_cookbook import renderers
    from tinker_cookbook.completers import TinkerMessageCompleter, TinkerTokenCompleter
    from tinker_cookbook.supervised.nll_evaluator import NLLEvaluator, SamplerNLLEvaluator

    sampler = trainer.save_weights_and_get_sampling_client().result()
    renderer = renderers.get_renderer("role_colon", tokenizer)
    conversation = [{"role": "user", "content": "Name a colour."}]

    completion = asyncio.run(
        TinkerTokenCompleter(sampler, max_tokens=6, temperature=1.0)(
            renderer.build_generation_prompt(conversation), renderer.get_stop_sequences()
        )
    )
    assert 1 <= len(completion.tokens) <= 6 and len(completion.logprobs) == len(completion.tokens)

    reply = asyncio.run(TinkerMessageCompleter(sampler, renderer, max_tokens=6)(conversation))
    assert reply["role"] == "assistant" and isinstance(reply["content"], str)

    # held-out NLL through the sampling client equals the training client's (same weights)
    data = []
    for text in TEXTS:
        tokens = tokenizer.encode(text)
        data.append(make_datum(tokens, weights=[0.0] * 3 + [1.0] * (len(tokens) - 4)))
    via_sampler = asyncio.run(SamplerNLLEvaluator(data, tokenizer=tokenizer)(sampler))
    via_trainer = asyncio.run(NLLEvaluator(data, tokenizer=tokenizer)(trainer))
    assert via_sampler.keys() == via_trainer.keys() == {"test/nll", "test/bpb"}
    assert via_sampler["test/nll"] == pytest.approx(via_trainer["test/nll"], abs=1e-4)
    assert via_sampler["test/nll"] > 1.0  # a random model: the number means something
