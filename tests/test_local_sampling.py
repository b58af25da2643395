"""Local engine, sampling side: `LocalSamplingClient` keeps the Tinker sampling contract.

RL and DPO both compare the sampler's log-probabilities with the learner's, and the pipeline
relies on seeds for reproducible data. Bugs pinned here:

* sampled log-probabilities that disagree with `compute_logprobs` for the same tokens, most
  likely from left padding or the KV cache in a batch of prompts of different lengths, or
  that are tempered (the contract is the untempered model distribution);
* seeds that do not reproduce, samples that change with whatever else shares the batch, and
  ``num_samples`` copies that are all the same sequence;
* stop handling: a stop string or stop token not ending the sequence, or dropped from the
  returned tokens; ``max_tokens`` off by one; temperature 0 that is not greedy;
* a sampling client that changes when its training client keeps training;
* an async path that returns something other than the sync path.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch
from character_training.backends.local import SMOLLM2_NAME, LocalServiceClient
from character_training.renderers.conversation import generation_prompt
from tinker import types

PROMPT_TEXTS = (
    "Once upon a time there was",
    "The",
    "In the first week of the long winter, the villagers gathered in the hall and",
)


def as_input(tokenizer, text: str) -> types.ModelInput:
    return types.ModelInput.from_ints(tokenizer.encode(text))


def seqs_equal(a: types.SampledSequence, b: types.SampledSequence) -> bool:
    return a.tokens == b.tokens and np.array_equal(np.asarray(a.logprobs), np.asarray(b.logprobs))


@pytest.fixture(scope="module")
def tiny_snapshot(new_tiny_trainer):
    """A sampling client on ``tiny-random`` with a random LoRA merged in.

    The bare random model's greedy chain repeats one token forever; the adapter makes it vary,
    so a greedy comparison checks more than one argmax.
    """
    return new_tiny_trainer(seed=1, scale=0.5).save_weights_and_get_sampling_client().result()


# -- sampled log-probabilities ------------------------------------------------------------------
def _sample_then_rescore(sampler, prompts, temperature: float):
    """Sample all prompts in one flush, then score every prompt+sample in one flush."""
    futures = [
        sampler.sample(
            p,
            3,
            types.SamplingParams(max_tokens=10, temperature=temperature, seed=i),
            include_prompt_logprobs=(i == 0),
        )
        for i, p in enumerate(prompts)
    ]
    responses = [f.result() for f in futures]
    scored = [
        (
            p.length,
            seq,
            sampler.compute_logprobs(types.ModelInput.from_ints(p.to_ints() + seq.tokens)),
        )
        for p, response in zip(prompts, responses)
        for seq in response.sequences
    ]
    prompt_scores = sampler.compute_logprobs(prompts[0]).result()
    gap = max(
        float(np.abs(np.asarray(f.result()[start:]) - np.asarray(seq.logprobs)).max())
        for start, seq, f in scored
    )
    prompt_gap = float(
        np.abs(responses[0].prompt_logprobs_np[1:] - np.asarray(prompt_scores[1:])).max()
    )
    return responses, gap, prompt_gap


@pytest.mark.slow
def test_compute_logprobs_of_prompt_plus_sample_equals_the_sampled_logprobs_in_a_padded_batch(
    smollm2_sampler, renderer, engine_root, capsys
):
    questions = (
        "Hi!",
        "Name three colours of the rainbow, please.",
        "In one sentence, why does the moon show phases to us on Earth?",
    )
    prompts = [generation_prompt(renderer, [{"role": "user", "content": q}]) for q in questions]
    assert len({p.length for p in prompts}) == 3  # left padding in the shared prefill
    # temperature 0.7: the returned logprobs must still be those of the untempered model
    responses, gap, prompt_gap = _sample_then_rescore(smollm2_sampler, prompts, temperature=0.7)
    assert all(len(r.sequences) == 3 for r in responses)
    assert sum(len(s.tokens) for r in responses for s in r.sequences) >= 45
    assert gap <= 1e-4
    assert prompt_gap <= 1e-4

    bf16 = LocalServiceClient(root_dir=str(engine_root), precision="bf16")
    _, bf16_gap, bf16_prompt_gap = _sample_then_rescore(
        bf16.create_sampling_client(base_model=SMOLLM2_NAME).result(), prompts, temperature=0.7
    )
    with capsys.disabled():
        print(
            f"\n[sampled vs compute_logprobs] max |gap| fp32 {gap:.2e}, bf16 {bf16_gap:.2e} "
            f"(prompt logprobs: fp32 {prompt_gap:.2e}, bf16 {bf16_prompt_gap:.2e})"
        )


# -- seeds and batching ------------------------------------------------------------------------
def test_the_same_seed_reproduces_samples_and_a_different_seed_changes_them(
    tiny_sampler, tokenizer
):
    prompt = as_input(tokenizer, PROMPT_TEXTS[0])

    def run(seed):
        params = types.SamplingParams(max_tokens=8, temperature=1.0, seed=seed)
        return tiny_sampler.sample(prompt, 2, params).result().sequences

    first, again, other = run(5), run(5), run(6)
    assert all(seqs_equal(a, b) for a, b in zip(first, again))
    assert all(a.tokens != c.tokens for a, c in zip(first, other))


def test_num_samples_from_one_seed_are_distinct_sequences(tiny_sampler, tokenizer):
    params = types.SamplingParams(max_tokens=8, temperature=1.0, seed=5)
    seqs = tiny_sampler.sample(as_input(tokenizer, PROMPT_TEXTS[0]), 4, params).result().sequences
    assert len(seqs) == 4
    assert len({tuple(s.tokens) for s in seqs}) == 4


def test_a_seeded_request_gets_the_same_samples_whatever_else_shares_the_batch(
    tiny_snapshot, engine_root, tokenizer
):
    short, mid, long = (
        as_input(tokenizer, t) for t in (PROMPT_TEXTS[1], PROMPT_TEXTS[0], PROMPT_TEXTS[2])
    )

    def params(seed):
        return types.SamplingParams(max_tokens=8, temperature=1.0, seed=seed)

    alone = tiny_snapshot.sample(mid, 2, params(7)).result().sequences
    futures = [
        tiny_snapshot.sample(long, 3, params(1)),
        tiny_snapshot.sample(mid, 1, params(99)),  # same prompt, other seed: shared prefill
        tiny_snapshot.sample(mid, 2, params(7)),
        tiny_snapshot.sample(short, 2, params(3)),
    ]
    crowded = futures[2].result().sequences
    # the same request again, decoded by a sampler that splits rows into batches of 3
    small_batches = LocalServiceClient(
        root_dir=str(engine_root), precision="fp32", max_batch_size=3
    )
    other_sampler = small_batches.create_sampling_client(
        model_path=tiny_snapshot.model_path
    ).result()
    split = [other_sampler.sample(long, 3, params(1)), other_sampler.sample(mid, 2, params(7))]
    split_seqs = split[1].result().sequences

    for seqs in (crowded, split_seqs):
        for a, b in zip(alone, seqs):
            assert a.tokens == b.tokens
            np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5, rtol=0)


# -- stopping ------------------------------------------------------------------------------------
def _reference(sampler, prompt, max_tokens=12):
    """A seeded temperature-1 sample with stopping disabled."""
    params = types.SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=11, stop=[])
    return sampler.sample(prompt, 1, params).result().sequences[0]


def test_a_stop_string_ends_the_sequence_at_the_token_that_completes_it(tiny_sampler, tokenizer):
    prompt = as_input(tokenizer, PROMPT_TEXTS[0])
    ref = _reference(tiny_sampler, prompt)
    pieces = [tokenizer.decode([t]) for t in ref.tokens]
    k = next(
        i
        for i in range(2, len(pieces) - 1)
        if all(p.isascii() and p.strip() for p in pieces[i - 1 : i + 1]) and len(pieces[i]) >= 2
    )
    # a stop string that straddles the boundary between token k-1 and token k
    stop = tokenizer.decode(ref.tokens[: k + 1])[-(len(pieces[k]) + 2) :]
    expected = next(
        j for j in range(1, len(ref.tokens) + 1) if stop in tokenizer.decode(ref.tokens[:j])
    )
    params = types.SamplingParams(max_tokens=12, temperature=1.0, seed=11, stop=[stop])
    seq = tiny_sampler.sample(prompt, 1, params).result().sequences[0]

    assert seq.stop_reason == "stop"
    assert seq.tokens == ref.tokens[:expected]
    assert len(seq.tokens) < len(ref.tokens)
    assert tokenizer.decode(seq.tokens).endswith(stop)
    assert stop not in tokenizer.decode(seq.tokens[:-1])


def test_a_stop_token_ends_the_sequence_and_is_included(tiny_sampler, tokenizer):
    prompt = as_input(tokenizer, PROMPT_TEXTS[0])
    ref = _reference(tiny_sampler, prompt)
    stop_token = ref.tokens[4]
    first = ref.tokens.index(stop_token)
    params = types.SamplingParams(max_tokens=12, temperature=1.0, seed=11, stop=[stop_token])
    seq = tiny_sampler.sample(prompt, 1, params).result().sequences[0]
    assert seq.stop_reason == "stop"
    assert seq.tokens == ref.tokens[: first + 1]
    assert seq.tokens[-1] == stop_token
    np.testing.assert_array_equal(seq.logprobs, ref.logprobs[: first + 1])


def test_max_tokens_ends_the_sequence_with_length_after_exactly_that_many_tokens(
    tiny_sampler, tokenizer
):
    prompt = as_input(tokenizer, PROMPT_TEXTS[0])
    for stop, max_tokens in (([], 7), (None, 5)):
        params = types.SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=2, stop=stop)
        seq = tiny_sampler.sample(prompt, 1, params).result().sequences[0]
        assert seq.stop_reason == "length"
        assert len(seq.tokens) == len(seq.logprobs) == max_tokens


def test_temperature_zero_is_the_argmax_chain_computed_by_hand(tiny_snapshot, tokenizer):
    prompts = [as_input(tokenizer, t) for t in (PROMPT_TEXTS[0], PROMPT_TEXTS[2])]
    params = types.SamplingParams(max_tokens=6, temperature=0.0, stop=[])
    futures = [tiny_snapshot.sample(p, 1, params) for p in prompts]  # one left-padded batch
    for prompt, future in zip(prompts, futures):
        seq = future.result().sequences[0]
        ids, chain, chain_lps = list(prompt.to_ints()), [], []
        with torch.no_grad():
            for _ in range(6):
                logits = tiny_snapshot.model(input_ids=torch.tensor([ids])).logits[0, -1].float()
                lps = torch.log_softmax(logits, dim=-1)
                token = int(torch.argmax(lps))
                chain.append(token)
                chain_lps.append(float(lps[token]))
                ids.append(token)
        assert seq.tokens == chain
        assert len(set(chain)) > 1  # a chain that actually moves
        np.testing.assert_allclose(seq.logprobs, chain_lps, atol=1e-4, rtol=0)


# -- snapshots and async --------------------------------------------------------------------------
def test_a_sampling_client_is_a_frozen_snapshot_that_later_training_does_not_change(
    new_tiny_trainer, tokenizer
):
    trainer = new_tiny_trainer(seed=4)
    tokens = tokenizer.encode(PROMPT_TEXTS[2])
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={
            "target_tokens": torch.tensor(tokens[1:]),
            "weights": torch.ones(len(tokens) - 1),
        },
    )
    full = types.ModelInput.from_ints(tokens)
    prompt = as_input(tokenizer, PROMPT_TEXTS[0])
    params = types.SamplingParams(max_tokens=8, temperature=1.0, seed=1)

    snapshot = trainer.save_weights_and_get_sampling_client().result()
    before = snapshot.compute_logprobs(full).result()
    sample_before = snapshot.sample(prompt, 2, params).result().sequences
    # the snapshot scores exactly what the training client computes
    trained_view = trainer.forward([datum], "cross_entropy").result().loss_fn_outputs[0]
    np.testing.assert_allclose(before[1:], trained_view["logprobs"].to_torch().numpy(), atol=1e-4)

    for _ in range(2):
        trainer.forward_backward([datum], "cross_entropy").result()
        trainer.optim_step(types.AdamParams(learning_rate=5e-2)).result()

    assert snapshot.compute_logprobs(full).result() == before
    assert all(
        seqs_equal(a, b)
        for a, b in zip(snapshot.sample(prompt, 2, params).result().sequences, sample_before)
    )
    later = trainer.save_weights_and_get_sampling_client().result()
    later = later.compute_logprobs(full).result()
    assert max(abs(a - b) for a, b in zip(later[1:], before[1:])) > 1e-2  # training did move


def test_asyncio_gather_of_sample_async_returns_what_the_sync_path_returns(tiny_sampler, tokenizer):
    requests = [
        (as_input(tokenizer, t), n, types.SamplingParams(max_tokens=6, seed=seed))
        for t, n, seed in zip(PROMPT_TEXTS, (2, 1, 3), (21, 22, 23))
    ]
    scored = as_input(tokenizer, PROMPT_TEXTS[2])

    sync_futures = [tiny_sampler.sample(p, n, sp) for p, n, sp in requests]
    sync = [f.result() for f in sync_futures]
    sync_scores = tiny_sampler.compute_logprobs(scored).result()

    async def gather():
        return await asyncio.gather(
            *(tiny_sampler.sample_async(p, n, sp) for p, n, sp in requests),
            tiny_sampler.compute_logprobs_async(scored),
        )

    with pytest.warns(FutureWarning, match="deprecated in the Tinker SDK"):  # as on Tinker
        *async_results, async_scores = asyncio.run(gather())
    for s, a in zip(sync, async_results):
        assert len(s.sequences) == len(a.sequences)
        assert all(seqs_equal(x, y) for x, y in zip(s.sequences, a.sequences))
    assert async_scores == sync_scores


def test_sequences_that_differ_only_in_the_last_token_share_one_forward(tiny_sampler, tokenizer):
    """Forced-choice judging scores "prompt + A" and "prompt + B": the engine runs one forward
    over the shared prompt and reads both answers from its last position. The numbers must be
    those of scoring each sequence alone (by hand: log-softmax of the model's logits), and
    the forward must see each shared prefix once."""
    import torch

    prompt = as_input(tokenizer, "Which reply is clearer, A or B? Answer:").to_ints()
    other = as_input(tokenizer, "An unrelated sentence to score.").to_ints()
    answers = as_input(tokenizer, " A B C").to_ints()[-3:]
    sequences = [prompt + [a] for a in answers] + [other, other[:1]]
    model = tiny_sampler.model
    before = tiny_sampler.engine.stats()["scoring"]
    futures = [tiny_sampler.compute_logprobs(types.ModelInput.from_ints(s)) for s in sequences]
    scores = [f.result() for f in futures]
    after = tiny_sampler.engine.stats()["scoring"]
    # the shared prompt once, the other sentence once; a 1-token sequence: nothing
    assert after["computed"] - before["computed"] == len(prompt) + len(other) - 1
    assert after["requested"] - before["requested"] == 3 * len(prompt) + len(other) - 1
    assert scores[-1] == [None]
    with torch.inference_mode():
        for seq, got in zip(sequences[:-1], scores[:-1]):
            logits = model(input_ids=torch.tensor([seq])).logits[0].float()
            expected = torch.log_softmax(logits, -1)[torch.arange(len(seq) - 1), seq[1:]]
            assert got[0] is None and len(got) == len(seq)
            assert np.allclose(got[1:], expected.numpy(), atol=1e-4)
    assert len({s[-1] for s in scores[:3]}) == 3  # three answers, three different numbers


def test_last_n_scores_only_the_tail_with_the_same_numbers(tiny_sampler, tokenizer):
    """``prompt_logprobs_last_n`` (what `reply_logprobs` sends: only the reply's positions)
    returns None before the tail and the full scoring's numbers on it."""
    seq = as_input(tokenizer, "A short prompt, then a reply of several tokens to score.").to_ints()
    full = tiny_sampler.compute_logprobs(types.ModelInput.from_ints(seq)).result()
    for last_n in (1, 3, len(seq) - 1):
        tail = tiny_sampler.compute_logprobs(
            types.ModelInput.from_ints(seq), prompt_logprobs_last_n=last_n
        ).result()
        cut = len(seq) - last_n
        assert tail[:cut] == [None] * cut
        assert np.allclose(tail[cut:], full[cut:], atol=1e-5)


def test_the_engine_reports_what_it_picked_and_its_prefill_counters(tiny_service, caplog):
    """What the lead records in manifests: the runtime the engine chose (dtype, threads,
    kernels, CPU flags), logged once per process and settings, and the prefill counters."""
    import logging

    from character_training.backends.local.settings import log_runtime_once, runtime_info

    info = runtime_info(tiny_service.config)
    assert info["compute_dtype"] == "float32" and info["threads"] == torch.get_num_threads()
    assert set(info["cpu_flags"]) >= {"avx2", "avx512f", "avx512_bf16", "amx_bf16"}
    assert {"decoder", "F.linear"} <= set(info.get("products", {"decoder": 0, "F.linear": 0}))
    with caplog.at_level(logging.INFO):
        log_runtime_once(tiny_service.config)  # already logged when the engine was made
    assert "local engine runtime" not in caplog.text
    stats = tiny_service.engine.stats()
    for kind in ("sampling", "scoring"):
        assert {"requested", "computed", "reused", "padded", "entries_built", "hits"} <= set(
            stats[kind]
        )
    assert {"entries", "bytes"} == set(stats["prefix_store"])


def test_a_run_without_logging_still_prints_what_the_engine_picked_once(monkeypatch, capsys):
    """A notebook kernel configures no logging: the runtime summary goes to stderr, once."""
    import logging

    from character_training.backends.local import settings

    monkeypatch.setattr(settings, "_logged", set())
    monkeypatch.setattr(logging.getLogger(settings.__name__), "propagate", False)
    config = settings.LocalEngineConfig(device="cpu", precision="fp32")
    info = settings.log_runtime_once(config)
    settings.log_runtime_once(config)
    printed = capsys.readouterr().err.splitlines()
    assert printed == [settings.runtime_summary(info)]
    assert printed[0].startswith("local engine: cpu float32 (precision=fp32), ")
    assert f"{torch.get_num_threads()} threads" in printed[0]
