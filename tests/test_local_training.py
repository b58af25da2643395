"""Local engine, training side: the numbers `LocalTrainingClient` returns are the right ones.

The engine re-implements Tinker's training contract on torch, so a silent mistake there would
train every local run on a wrong objective while the loss still went down. Bugs pinned here:

* `cross_entropy` and `importance_sampling` losses that are means instead of token sums, drop
  the per-token weights / advantages, or are off by one position; right padding leaking into
  a shorter datum's log-probabilities;
* an `importance_sampling` gradient that is not the policy gradient at ratio 1;
* `forward_backward_custom` (DPO) whose gradients differ from writing the same loss in torch,
  on the single-pass path or on the two-pass surrogate path used for large batches;
* checkpoints that do not round-trip exactly, and an optimiser state that does not resume
  (a resumed run would restart Adam's moments and take a different step);
* LoRA SFT on SmolLM2 that does not learn, or a sampling snapshot that misses what was learned;
* errors that are not one actionable line.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from character_training.backends import get_service_client
from character_training.backends.local import (
    SMOLLM2_NAME,
    TINY_RANDOM_NAME,
    LocalEngineConfig,
    LocalServiceClient,
)
from character_training.backends.local.forward import micro_batches
from character_training.errors import (
    BackendError,
    ConfigError,
    DataError,
    MissingCredentialsError,
)
from character_training.renderers.conversation import generation_prompt, supervised_datum
from tinker import types

TINY = TINY_RANDOM_NAME
SMOLLM2 = SMOLLM2_NAME
TEXTS = (
    "The lighthouse keeper counted ships until dawn.",
    "Seven quiet herons stood in the reeds, watching the river rise after the long storm.",
    "Tea?",
)


# -- helpers ----------------------------------------------------------------------------------
def make_datum(tokens: list[int], **per_position) -> types.Datum:
    """Next-token datum: input ``tokens[:-1]``, targets ``tokens[1:]``, plus float inputs."""
    inputs = {"target_tokens": torch.tensor(tokens[1:], dtype=torch.long)}
    for key, values in per_position.items():
        inputs[key] = torch.as_tensor(values, dtype=torch.float32)
    return types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]), loss_fn_inputs=inputs)


def hand_logprobs(model, datum: types.Datum) -> torch.Tensor:
    """log p(target_t | input_<=t) for one datum, run alone (no padding), graph kept."""
    ids = torch.tensor([datum.model_input.to_ints()])
    logits = model(input_ids=ids).logits[0].float()
    targets = datum.loss_fn_inputs["target_tokens"].to_torch().long()
    return torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None]).squeeze(-1)


def trainable(client) -> list[torch.nn.Parameter]:
    return [p for p in client.model.parameters() if p.requires_grad]


def take_grads(client) -> list[torch.Tensor]:
    """Copy the accumulated LoRA gradients and clear them."""
    grads = [p.grad.detach().clone() for p in trainable(client)]
    for p in trainable(client):
        p.grad = None
    return grads


def assert_grads_close(engine, hand, atol: float, rtol: float = 1e-4) -> None:
    """Every LoRA gradient matches; fp32 summation order differs between the two sides."""
    assert len(engine) == len(hand) > 0
    for e, h in zip(engine, hand):
        torch.testing.assert_close(e, h, atol=atol, rtol=rtol)
    # the comparison means something only if the gradients are not all ~0
    assert min(float(h.abs().max()) for h in hand) > 100 * atol


def tokens_of(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text)


def seeded(seed: int, n: int, kind: str = "normal") -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=gen) if kind == "normal" else torch.rand(n, generator=gen)


# -- built-in losses --------------------------------------------------------------------------
def test_cross_entropy_loss_logprobs_and_gradients_equal_a_hand_computation(
    new_tiny_trainer, tokenizer
):
    client = new_tiny_trainer()
    data = []
    for i, text in enumerate(TEXTS):
        tokens = tokens_of(tokenizer, text)
        weights = seeded(i, len(tokens) - 1, "uniform") * 2.0
        weights[0] = 0.0  # a zero weight must drop that token from the loss
        data.append(make_datum(tokens, weights=weights))
    assert len({d.model_input.length for d in data}) == 3  # ragged: right padding is exercised

    out = client.forward_backward(data, "cross_entropy").result()
    engine_grads = take_grads(client)

    hand_total = torch.zeros(())
    for datum, output in zip(data, out.loss_fn_outputs):
        lp = hand_logprobs(client.model, datum)
        weights = datum.loss_fn_inputs["weights"].to_torch()
        elementwise = -lp * weights
        torch.testing.assert_close(output["logprobs"].to_torch(), lp.detach(), atol=1e-5, rtol=0)
        torch.testing.assert_close(
            output["elementwise_loss"].to_torch(), elementwise.detach(), atol=1e-5, rtol=0
        )
        hand_total = hand_total + elementwise.sum()
    # a token *sum* (about 10 nats a token here), not a mean
    assert float(hand_total.detach()) > 50
    assert out.metrics["loss:sum"] == pytest.approx(float(hand_total.detach()), abs=1e-4)
    hand_total.backward()
    assert_grads_close(engine_grads, take_grads(client), atol=1e-5)

    # forward() returns the same numbers and leaves the gradients alone
    again = client.forward(data, "cross_entropy").result()
    assert again.metrics["loss:sum"] == pytest.approx(out.metrics["loss:sum"], abs=1e-5)
    assert all(p.grad is None for p in trainable(client))


def test_importance_sampling_loss_is_minus_the_ratio_times_advantage_summed_over_tokens(
    new_tiny_trainer, tokenizer
):
    client = new_tiny_trainer()
    data, hand_total = [], 0.0
    for i, text in enumerate(TEXTS[:2]):
        tokens = tokens_of(tokenizer, text)
        n = len(tokens) - 1
        probe = make_datum(tokens)
        with torch.no_grad():
            lp = hand_logprobs(client.model, probe)
        sampling_lp = lp + 0.3 * seeded(10 + i, n)  # an off-policy sampler
        advantages = seeded(20 + i, n)
        datum = make_datum(tokens, logprobs=sampling_lp, advantages=advantages)
        data.append(datum)
        expected = -torch.exp(lp - sampling_lp) * advantages
        hand_total += float(expected.sum())
        out_i = client.forward([datum], "importance_sampling").result()
        torch.testing.assert_close(
            out_i.loss_fn_outputs[0]["elementwise_loss"].to_torch(), expected, atol=1e-5, rtol=1e-5
        )
    out = client.forward_backward(data, "importance_sampling").result()
    assert out.metrics["loss:sum"] == pytest.approx(hand_total, abs=1e-4)


def test_importance_sampling_gradient_on_policy_equals_the_policy_gradient(
    new_tiny_trainer, tokenizer
):
    client = new_tiny_trainer()
    probes = [
        make_datum(tokens_of(tokenizer, t), weights=[0.0] * (len(tokens_of(tokenizer, t)) - 1))
        for t in TEXTS[:2]
    ]
    on_policy = client.forward(probes, "cross_entropy").result()
    data = []
    for i, (probe, output) in enumerate(zip(probes, on_policy.loss_fn_outputs)):
        tokens = probe.model_input.to_ints() + [int(probe.loss_fn_inputs["target_tokens"].data[-1])]
        advantages = seeded(30 + i, probe.model_input.length)
        data.append(
            make_datum(tokens, logprobs=output["logprobs"].to_torch(), advantages=advantages)
        )

    out = client.forward_backward(data, "importance_sampling").result()
    engine_grads = take_grads(client)
    advantages = [d.loss_fn_inputs["advantages"].to_torch() for d in data]
    # at ratio 1 the loss value is -sum(advantages) ...
    assert out.metrics["loss:sum"] == pytest.approx(
        -float(sum(a.sum() for a in advantages)), abs=1e-4
    )
    # ... and its gradient is REINFORCE's: -sum_t adv_t * grad log p_t
    policy_gradient_loss = sum(
        -(adv * hand_logprobs(client.model, d)).sum() for adv, d in zip(advantages, data)
    )
    policy_gradient_loss.backward()
    assert_grads_close(engine_grads, take_grads(client), atol=1e-5)


# -- custom loss (DPO) --------------------------------------------------------------------------
DPO_PAIRS = (
    ("Q: Is the sea salty?\nA:", " Yes, rivers carry dissolved minerals into it.", " No."),
    ("Q: Name a prime.\nA:", " Seven.", " Nine, since it is odd and odd numbers are prime."),
)
DPO_BETA = 0.1


def dpo_data(tokenizer) -> list[types.Datum]:
    """chosen_0, rejected_0, chosen_1, rejected_1; weight 1 on the response tokens only."""
    data = []
    for prompt, chosen, rejected in DPO_PAIRS:
        prompt_ids = tokens_of(tokenizer, prompt)
        for response in (chosen, rejected):
            response_ids = tokens_of(tokenizer, response)
            tokens = prompt_ids + response_ids
            weights = [0.0] * (len(prompt_ids) - 1) + [1.0] * len(response_ids)
            data.append(make_datum(tokens, weights=weights))
    return data


def make_dpo_loss(reference: torch.Tensor):
    """The DPO loss over (chosen, rejected) pairs with constant reference log-probabilities."""

    def loss_fn(data, logprobs):
        sums = torch.stack(
            [(lp * d.loss_fn_inputs["weights"].to_torch()).sum() for d, lp in zip(data, logprobs)]
        )
        margin = DPO_BETA * ((sums[0::2] - reference[0::2]) - (sums[1::2] - reference[1::2]))
        loss = -F.logsigmoid(margin).sum()
        return loss, {"dpo/margin": float(margin.detach().mean())}

    return loss_fn


@pytest.fixture(scope="module")
def small_budget_service(engine_root):
    """Micro-batches of at most 24 padded tokens: every DPO sequence gets its own pass."""
    return LocalServiceClient(root_dir=str(engine_root), precision="fp32", micro_batch_tokens=24)


@pytest.mark.parametrize("path", ["single_pass", "two_pass"])
def test_dpo_custom_loss_gives_the_same_lora_gradients_as_the_loss_written_in_torch(
    path, request, new_tiny_trainer, tokenizer
):
    service = request.getfixturevalue("small_budget_service") if path == "two_pass" else None
    client = new_tiny_trainer(service)
    data = dpo_data(tokenizer)
    lengths = [d.model_input.length for d in data]
    passes = len(micro_batches(lengths, client.engine.config.micro_batch_tokens))
    assert (passes == 1) == (path == "single_pass")
    with torch.no_grad():
        policy_sums = torch.stack(
            [
                (hand_logprobs(client.model, d) * d.loss_fn_inputs["weights"].to_torch()).sum()
                for d in data
            ]
        )
    # constant reference log-probabilities, chosen so the margins are far from zero
    reference = policy_sums + torch.tensor([4.0, -3.0, -6.0, 5.0])
    loss_fn = make_dpo_loss(reference)

    out = client.forward_backward_custom(data, loss_fn).result()
    engine_grads = take_grads(client)

    hand_lps = [hand_logprobs(client.model, d) for d in data]
    hand_loss, hand_metrics = loss_fn(data, hand_lps)
    hand_loss.backward()
    assert out.metrics["loss:sum"] == pytest.approx(float(hand_loss.detach()), abs=1e-5)
    assert out.metrics["dpo/margin"] == pytest.approx(hand_metrics["dpo/margin"], abs=1e-5)
    for output, lp in zip(out.loss_fn_outputs, hand_lps):
        torch.testing.assert_close(output["logprobs"].to_torch(), lp.detach(), atol=1e-5, rtol=0)
    assert_grads_close(engine_grads, take_grads(client), atol=1e-5, rtol=0)


def test_an_activation_budget_splits_and_checkpoints_without_changing_the_gradients(
    new_tiny_trainer, tokenizer, engine_root, monkeypatch
):
    """Training bounds the activations kept for the backward pass (``activation_mb``): a batch
    is split into smaller micro-batches, and a sequence longer than the budget checkpoints some
    layers. Both must leave the loss and the gradients as one big pass computes them."""
    from character_training.backends.local import forward

    # tiny-random keeps ~14 KB per token: 1 MB holds ~73 tokens
    small = LocalServiceClient(root_dir=str(engine_root), precision="fp32", activation_mb=1)
    texts = TEXTS + (" ".join(TEXTS * 4),)
    data = [make_datum(tokens_of(tokenizer, t), weights=[1.0] * (len(tokens_of(tokenizer, t)) - 1))
            for t in texts]  # fmt: skip
    assert max(d.model_input.length for d in data) > 100
    checkpointed: list[int] = []
    real = forward.activation_checkpointing

    def spy(model, layers):
        checkpointed.append(layers)
        return real(model, layers)

    monkeypatch.setattr(forward, "activation_checkpointing", spy)
    outs, grads = [], []
    for service in (None, small):
        client = new_tiny_trainer(service, seed=7)
        outs.append(client.forward_backward(data, "cross_entropy").result())
        grads.append(take_grads(client))
    assert any(layers > 0 for layers in checkpointed)
    assert outs[1].metrics["loss:sum"] == pytest.approx(outs[0].metrics["loss:sum"], abs=1e-4)
    assert_grads_close(grads[1], grads[0], atol=1e-5)


# -- checkpoints --------------------------------------------------------------------------------
def _sft_batch(tokenizer) -> list[types.Datum]:
    return [
        make_datum(tokens_of(tokenizer, t), weights=[1.0] * (len(tokens_of(tokenizer, t)) - 1))
        for t in TEXTS
    ]


def _train_step(client, data, lr: float = 1e-2) -> None:
    client.forward_backward(data, "cross_entropy").result()
    client.optim_step(types.AdamParams(learning_rate=lr)).result()


def _params(client) -> list[torch.Tensor]:
    return [p.detach().clone() for p in trainable(client)]


def test_save_state_then_load_state_reproduces_the_logits_bit_for_bit(
    new_tiny_trainer, tiny_service, tokenizer
):
    client = new_tiny_trainer()
    data = _sft_batch(tokenizer)
    for _ in range(2):
        _train_step(client, data)
    path = client.save_state("after-two-steps").result().path
    ids = torch.tensor([tokens_of(tokenizer, TEXTS[1])])
    with torch.no_grad():
        expected = client.model(input_ids=ids).logits
        restored = tiny_service.create_training_client_from_state(path).result()
        into_fresh = tiny_service.create_lora_training_client(TINY, rank=4, seed=123).result()
        with pytest.warns(FutureWarning, match="deprecated in the Tinker SDK"):  # as on Tinker
            into_fresh.load_state(path).result()
        assert torch.equal(restored.model(input_ids=ids).logits, expected)
        assert torch.equal(into_fresh.model(input_ids=ids).logits, expected)
    assert restored.steps == 2


def test_optimizer_state_resumes_so_the_third_step_matches_uninterrupted_training(
    new_tiny_trainer, tiny_service, tokenizer
):
    data = _sft_batch(tokenizer)
    client = new_tiny_trainer()
    for _ in range(2):
        _train_step(client, data)
    path = client.save_state("resume-me").result().path
    _train_step(client, data)
    third_step = _params(client)

    resumed = tiny_service.create_training_client_from_state_with_optimizer(path).result()
    _train_step(resumed, data)
    assert all(torch.equal(a, b) for a, b in zip(_params(resumed), third_step))

    # without the optimiser state Adam restarts its moments: a visibly different third step
    weights_only = tiny_service.create_training_client_from_state(path).result()
    _train_step(weights_only, data)
    gap = max(float((a - b).abs().max()) for a, b in zip(_params(weights_only), third_step))
    assert gap > 1e-3


# -- learning on the real model ---------------------------------------------------------------
TARGET_REPLY = "My favourite colour is ultramarine, the blue of lapis lazuli."
SFT_QUESTIONS = (
    "What colour do you like best?",
    "Tell me something about yourself.",
    "What is two plus two?",
    "Any advice for a rainy day?",
)


@pytest.mark.slow
def test_lora_sft_on_smollm2_lowers_the_loss_and_moves_samples_to_the_target(
    smollm2_service, smollm2_sampler, renderer, tokenizer
):
    client = smollm2_service.create_lora_training_client(SMOLLM2, rank=8, seed=0).result()
    data = [
        supervised_datum(
            renderer,
            [{"role": "user", "content": q}, {"role": "assistant", "content": TARGET_REPLY}],
        )
        for q in SFT_QUESTIONS
    ]
    prompts = [generation_prompt(renderer, [{"role": "user", "content": q}]) for q in SFT_QUESTIONS]

    def sample_texts(sampler, max_tokens):
        futures = [
            sampler.sample(p, 2, types.SamplingParams(max_tokens=max_tokens, seed=i))
            for i, p in enumerate(prompts)
        ]
        seqs = [s for f in futures for s in f.result().sequences]
        return seqs, [tokenizer.decode(s.tokens) for s in seqs]

    # the reply is 16 tokens + <|im_end|>; 12 tokens are plenty to see that the base differs
    _, before = sample_texts(smollm2_sampler, max_tokens=12)
    losses = []
    for _ in range(7):
        out = client.forward_backward(data, "cross_entropy").result()
        client.optim_step(types.AdamParams(learning_rate=1e-3)).result()
        losses.append(out.metrics["loss:sum"])
    final = client.forward(data, "cross_entropy").result().metrics["loss:sum"]
    seqs, after = sample_texts(
        client.save_weights_and_get_sampling_client().result(), max_tokens=20
    )

    print(f"\nSFT loss:sum by step {[round(v, 1) for v in losses]} -> {final:.2f}")
    assert final < 0.5 * losses[0]
    assert not any("ultramarine" in text for text in before)
    assert sum("ultramarine" in text for text in after) >= 6, after
    # stop=None stops at the end-of-sequence token (<|im_end|>) and keeps it
    finished = [s for s in seqs if s.stop_reason == "stop"]
    assert finished and all(s.tokens[-1] == tokenizer.eos_token_id for s in finished)


# -- errors -----------------------------------------------------------------------------------
def _bad_datum(trainer, kind: str):
    tokens = [1, 2, 3, 4, 5]
    if kind == "short_targets":
        datum = types.Datum(
            model_input=types.ModelInput.from_ints(tokens[:-1]),
            loss_fn_inputs={"target_tokens": torch.tensor(tokens[1:-1]), "weights": torch.ones(4)},
        )
    else:
        datum = types.Datum(
            model_input=types.ModelInput.from_ints(tokens[:-1]),
            loss_fn_inputs={"target_tokens": torch.tensor(tokens[1:])},
        )
    trainer.forward_backward([datum], "cross_entropy")


ERROR_CASES = {
    "unknown_model": (
        lambda env: env["service"].create_lora_training_client("gpt-9", rank=4),
        BackendError,
        (
            "unknown local model 'gpt-9': expected one of HuggingFaceTB/SmolLM2-135M-Instruct, "
            "tiny-random or a directory containing a Hugging Face config.json"
        ),
    ),
    "bad_rank": (
        lambda env: env["service"].create_lora_training_client(TINY, rank=0),
        BackendError,
        "LoRA rank=0: expected a positive integer",
    ),
    "unknown_loss": (
        lambda env: env["trainer"].forward_backward(_sft_batch(env["tokenizer"]), "mse"),
        BackendError,
        (
            "loss_fn='mse' is not supported by the local engine: expected one of "
            "['cispo', 'cross_entropy', 'dro', 'importance_sampling', 'ppo'], or use "
            "forward_backward_custom"
        ),
    ),
    "target_length_mismatch": (
        lambda env: _bad_datum(env["trainer"], "short_targets"),
        DataError,
        (
            "datum 0: loss_fn_inputs['target_tokens'] has 3 entries but model_input has 4 tokens; "
            "they must match position for position"
        ),
    ),
    "missing_weights": (
        lambda env: _bad_datum(env["trainer"], "no_weights"),
        DataError,
        "datum 0: loss 'cross_entropy' needs loss_fn_inputs['weights']; got keys ['target_tokens']",
    ),
    "sampling_client_without_model": (
        lambda env: env["service"].create_sampling_client(),
        BackendError,
        "create_sampling_client: pass exactly one of model_path or base_model",
    ),
    "sampling_client_with_both": (
        lambda env: env["service"].create_sampling_client(model_path="x", base_model=TINY),
        BackendError,
        "create_sampling_client: pass exactly one of model_path or base_model",
    ),
    "load_state_from_a_plain_directory": (
        lambda env: env["trainer"].load_state(str(env["tmp_path"])),
        BackendError,
        (
            "{tmp_path} is not a local-engine checkpoint (no engine_checkpoint.json); pass a path "
            "returned by save_state or save_weights_for_sampler"
        ),
    ),
    "empty_prompt": (
        lambda env: env["sampler"].sample(
            types.ModelInput.from_ints([]), 1, types.SamplingParams(max_tokens=4)
        ),
        BackendError,
        "sample: the prompt is empty",
    ),
    "bad_top_p": (
        lambda env: env["sampler"].sample(
            types.ModelInput.from_ints([1, 2]),
            1,
            types.SamplingParams(max_tokens=4, temperature=0.5, top_p=0.0),
        ),
        BackendError,
        "sample: temperature=0.5 must be >= 0 and top_p=0.0 in (0, 1]",
    ),
    "tinker_without_api_key": (
        lambda env: get_service_client("tinker"),
        MissingCredentialsError,
        (
            "backend 'tinker' needs TINKER_API_KEY in the environment: run "
            "`export TINKER_API_KEY=...` "
            "(key from the Tinker console) or use the offline backend with `backend: local`"
        ),
    ),
    "unknown_backend": (
        lambda env: get_service_client("nope"),
        ConfigError,
        "backend='nope': expected one of ('local', 'tinker')",
    ),
    "fp16_precision": (
        lambda env: LocalEngineConfig(precision="fp16"),
        ConfigError,
        "local engine precision='fp16': expected one of ('auto', 'bf16', 'fp32')",
    ),
}


@pytest.fixture(scope="module")
def plain_tiny_trainer(tiny_service):
    return tiny_service.create_lora_training_client(TINY, rank=4, seed=0).result()


@pytest.mark.filterwarnings("ignore:.*deprecated in the Tinker SDK:FutureWarning")
@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_bad_requests_fail_with_one_line_saying_what_was_expected(
    case, tiny_service, plain_tiny_trainer, tiny_sampler, tokenizer, tmp_path, monkeypatch
):
    monkeypatch.delenv("TINKER_API_KEY", raising=False)
    call, error_type, message = ERROR_CASES[case]
    env = {
        "service": tiny_service,
        "trainer": plain_tiny_trainer,
        "sampler": tiny_sampler,
        "tokenizer": tokenizer,
        "tmp_path": tmp_path,
    }
    with pytest.raises(error_type) as caught:
        call(env)
    assert str(caught.value) == message.replace("{tmp_path}", str(tmp_path))
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("cap", "native"), [("AVX2", False), ("avx512_core", False), ("AVX512_CORE_BF16", True)]
)
def test_a_onednn_isa_cap_without_bf16_makes_auto_precision_pick_fp32(monkeypatch, cap, native):
    """``ONEDNN_MAX_CPU_ISA=AVX2`` is how an AVX2-only CPU is emulated (bench --isa avx2, the
    README's AVX2 times): ``auto`` must then pick fp32, as on that CPU, not bf16 by
    conversion; a cap that keeps bf16 leaves the choice to the CPU's flags."""
    from character_training.backends.local import settings

    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    monkeypatch.setattr(settings.Path, "read_text", lambda self: "flags : avx2 avx512_bf16")
    settings.cpu_has_native_bf16.cache_clear()
    try:
        assert settings.cpu_has_native_bf16() is native
        expected = torch.bfloat16 if native else torch.float32
        assert LocalEngineConfig(device="cpu").compute_dtype == expected
    finally:
        settings.cpu_has_native_bf16.cache_clear()
