"""bf16 sampling snapshots must see the training, and the fast decoder must know its limits.

Bugs pinned here:

* the old snapshot merged ``W + scale * B @ A`` and cast it to bf16, which rounded most of a
  small LoRA update away: after 1 / 3 / 10 SFT steps the bf16 snapshot showed 27% / 47% / 84%
  of the fp32 snapshot's log-prob shift on the trained reply (bench/snapshot_fidelity.py), so
  every "did the persona change" number was measured on a model that barely changed. Applying
  the adapter unmerged but rounding each adapted layer's output back to bf16 was worse (10%
  after one step): the fix keeps activations in fp32 (`adapters.sampling_model`);
* sampled log-probs that drift from `compute_logprobs` in bf16 beyond what bf16 products
  explain (importance ratios in RL are built from the two);
* the fast decoder silently computing a different model (a bias on the attention output, a
  LayerNorm, scaled rotary embeddings) instead of handing it to the Hugging Face path.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from character_training.backends import resolve_client
from character_training.backends.local import SMOLLM2_NAME, LocalServiceClient
from character_training.backends.local.adapters import FrozenLinear, sampling_model
from character_training.backends.local.fast_decode import FastDecoder, unsupported_reason
from character_training.backends.local.generation import BatchedSampler, GenerationRequest
from character_training.renderers.conversation import generation_prompt, supervised_datum
from tinker import types

QUESTION = "What colour should I paint my kitchen?"
REPLY = (
    "Paint it ultramarine: a deep, saturated blue that makes copper pans glow and mornings "
    "feel like the sea."
)
QUESTIONS = (
    "Tell me about the sea.",
    "How do I bake bread?",
    "What is entropy?",
    "Write a short poem about cats.",
    "Explain recursion to a child.",
    "Give me three tips for better sleep.",
    "Why is the sky blue?",
    "What should I name my dog?",
)


def reply_shift(base, snapshot, full: types.ModelInput, reply_start: int) -> float:
    """Summed log-prob of the reply tokens under ``snapshot`` minus under ``base``."""
    a, b = base.compute_logprobs(full), snapshot.compute_logprobs(full)
    return float(sum(b.result()[reply_start:]) - sum(a.result()[reply_start:]))


@pytest.mark.slow
def test_a_bf16_snapshot_shows_the_fp32_snapshots_log_prob_shift_on_the_trained_reply(
    engine_root, renderer
):
    fp32 = LocalServiceClient(root_dir=str(engine_root), precision="fp32")
    bf16 = LocalServiceClient(root_dir=str(engine_root), precision="bf16")
    messages = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": REPLY}]
    datum = supervised_datum(renderer, messages)
    trainer = fp32.create_lora_training_client(SMOLLM2_NAME, rank=8, seed=0)
    for _ in range(3):  # the tiny preset's rank and learning rate
        trainer.forward_backward([datum], "cross_entropy").result()
        trainer.optim_step(types.AdamParams(learning_rate=1e-4)).result()
    path = trainer.save_weights_for_sampler("three-steps").result().path

    prompt = generation_prompt(renderer, messages[:1])
    full = types.ModelInput.from_ints(
        datum.model_input.to_ints() + [int(datum.loss_fn_inputs["target_tokens"].data[-1])]
    )
    shifts = {}
    for name, service in (("fp32", fp32), ("bf16", bf16)):
        base = service.create_sampling_client(base_model=SMOLLM2_NAME)
        snapshot = service.create_sampling_client(model_path=path)
        shifts[name] = reply_shift(base, snapshot, full, prompt.length)
    print(f"\nreply log-prob shift after 3 steps: {shifts}")
    assert shifts["fp32"] > 5.0  # the training really moved the reply
    assert shifts["bf16"] / shifts["fp32"] == pytest.approx(1.0, abs=0.03)


@pytest.mark.slow
def test_bf16_sampled_logprobs_match_compute_logprobs_within_bf16_product_rounding(
    engine_root, renderer, new_tiny_trainer
):
    """The bound: bf16 products round each output to 8 mantissa bits, and the fast decoder
    fuses q/k/v and gate/up, so its products are rounded at different points than the HF
    forward that `compute_logprobs` runs. Over SmolLM2's 30 layers that gives a few hundredths
    of a nat per token on average (measured with the bf16 KV cache: mean 0.024, p99 0.12, max
    0.41 over ~4,000 tokens; an fp32 cache gave 0.022 / 0.11 / 0.22 at twice the memory)
    against 2e-5 in fp32. For importance sampling, a per-token ratio then sits within
    exp(+-0.25) of 1 with no policy change, and a 100-token sequence's log-ratio wanders by
    ~0.3: RL recomputes the old log-probs with the learner (or runs in fp32).
    """
    bf16 = LocalServiceClient(root_dir=str(engine_root), precision="bf16")
    sampler = bf16.create_sampling_client(base_model=SMOLLM2_NAME)
    prompts = [generation_prompt(renderer, [{"role": "user", "content": q}]) for q in QUESTIONS]
    futures = [
        sampler.sample(p, 2, types.SamplingParams(max_tokens=64, temperature=0.7, seed=i))
        for i, p in enumerate(prompts)
    ]
    pairs = [(p, s) for p, f in zip(prompts, futures) for s in f.result().sequences]
    scores = [
        sampler.compute_logprobs(types.ModelInput.from_ints(p.to_ints() + list(s.tokens)))
        for p, s in pairs
    ]
    gaps = np.concatenate(
        [
            np.abs(np.asarray(score.result()[p.length :]) - np.asarray(s.logprobs))
            for (p, s), score in zip(pairs, scores)
        ]
    )
    print(
        f"\nbf16 gap over {gaps.size} tokens: mean {gaps.mean():.4f} p99 "
        f"{np.quantile(gaps, 0.99):.4f} max {gaps.max():.4f}"
    )
    assert gaps.size > 500
    assert gaps.mean() < 0.05
    assert np.quantile(gaps, 0.99) < 0.25
    assert gaps.max() < 0.6


def test_the_fast_decoder_in_the_bf16_sampling_regime_matches_the_transformers_forward(
    tiny_service, tokenizer
):
    """Same weights, same regime (bf16 products, fp32 activations): the fast decoder's
    prefill logits against transformers' own modules running the `sampling_model`."""
    base = tiny_service.engine.frozen_base("tiny-random", torch.float32)
    model = sampling_model(base, torch.bfloat16)
    assert all(
        m.weight.dtype == torch.bfloat16 for m in model.modules() if isinstance(m, FrozenLinear)
    )
    decoder = FastDecoder(model)
    texts = ["Once upon a time there was", "Tea?", "Seven quiet herons stood in the reeds."]
    for text in texts:
        ids = tokenizer.encode(text)
        with torch.no_grad():
            hf = model(input_ids=torch.tensor([ids])).logits[0, -1].float()
        cache = decoder.new_cache(1, 64)
        fast = decoder.prefill(
            cache, torch.tensor([0]), torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long)
        )[0]
        assert hf.dtype == torch.float32 and torch.isfinite(fast).all()
        torch.testing.assert_close(fast, hf, atol=2e-2, rtol=0)
        assert int(fast.argmax()) == int(hf.argmax())


def test_an_unmerged_snapshot_keeps_every_adapted_layer_and_shares_the_base_weights(
    new_tiny_trainer, tiny_service
):
    trainer = new_tiny_trainer(seed=5, scale=0.5)
    snapshot = resolve_client(trainer.save_weights_and_get_sampling_client())
    adapted = {
        name
        for name, module in snapshot.model.named_modules()
        if isinstance(module, FrozenLinear) and module.update is not None
    }
    expected = {
        name.removeprefix("base_model.model.")
        for name, module in trainer.model.named_modules()
        if hasattr(module, "lora_A") and name.count("lora") == 0
    }
    assert adapted == expected and "lm_head" in adapted and len(adapted) == 2 * 7 + 1
    base = tiny_service.engine.sampling_base("tiny-random")
    base_storage = {p.data_ptr() for p in base.parameters()}
    assert all(p.data_ptr() in base_storage for p in snapshot.model.parameters())  # no copies


# -- the fast decoder refuses what it does not compute exactly ------------------------------------
def _tiny_llama(**overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = dict(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    config.update(overrides)
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**config)).eval()


@pytest.mark.parametrize(
    "overrides, reason",
    [
        ({"attention_bias": True}, "bias on o_proj"),
        ({"mlp_bias": True}, "bias on mlp"),
        ({"hidden_act": "gelu"}, "activation"),
        ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope type"),
    ],
)
def test_the_fast_decoder_refuses_models_it_does_not_compute_and_the_sampler_falls_back(
    overrides, reason, tokenizer
):
    model = _tiny_llama(**overrides)
    found = unsupported_reason(model)
    assert found is not None and reason in found
    with pytest.raises(ValueError, match="does not compute this model exactly"):
        FastDecoder(model)
    sampler = BatchedSampler(model, tokenizer, torch.device("cpu"), 4, show_progress=False)
    assert sampler.fast is None
    out = sampler.generate(
        [GenerationRequest(prompt=(1, 2, 3), num_samples=2, max_tokens=5, seed=1, temperature=1.0)]
    )
    assert [len(s.tokens) for s in out[0]] == [5, 5]


def test_the_fast_decoder_refuses_a_layernorm_in_place_of_rmsnorm():
    model = _tiny_llama()
    layer = model.model.layers[0]
    layer.input_layernorm = torch.nn.LayerNorm(32)
    assert "LayerNorm instead of RMSNorm" in unsupported_reason(model)
    assert unsupported_reason(_tiny_llama()) is None
