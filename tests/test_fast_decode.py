"""The sampler's fast path: `FastDecoder` numerics and continuous batching (slot refill).

`FastDecoder` re-implements the Llama forward over a static cache whose rows ("slots") are
reused: a finished sequence's slot gets a new prompt prefilled in front of the current column
while the other rows keep decoding, and columns nobody needs are shifted out. Bugs pinned here:

* logits that drift from the Hugging Face model's: rotary positions taken from cache columns
  instead of each row's own token count, left padding or a previous occupant's stale columns
  leaking into attention, a shift that moves keys without their validity;
* a refill that changes what a request samples: its tokens must be those it gets when run
  alone, whichever slot, column or wave it lands in, including prompts shared by several
  samples (one prefill, copied);
* sampled log-probabilities of refilled rows that disagree with `compute_logprobs`;
* the generic Hugging Face path (models the fast decoder does not cover) drifting away from
  the fast path.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from character_training.backends.local import SMOLLM2_NAME, LocalServiceClient
from character_training.backends.local.fast_decode import FastDecoder
from character_training.backends.local.generation import BatchedSampler, GenerationRequest
from character_training.backends.local.prefix_cache import PrefixCounters, PrefixKV, PrefixStore
from character_training.renderers.conversation import generation_prompt
from tinker import types

TEXTS = (
    "Tea?",
    "Seven quiet herons stood in the reeds, watching the river rise after the long storm.",
    "The lighthouse keeper counted ships until dawn.",
    "Once upon a time there was",
)


@pytest.fixture(scope="module")
def smollm2_fp32(smollm2_service):
    return smollm2_service.engine.frozen_base(SMOLLM2_NAME, torch.float32)


def hf_last_logits(model, tokens: list[int]) -> torch.Tensor:
    """The HF model's next-token logits after ``tokens``, run alone (no padding, no cache)."""
    with torch.no_grad():
        return model(input_ids=torch.tensor([tokens])).logits[0, -1].float()


def left_pad(prompts: list[list[int]], pad_id: int):
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt)
        mask[row, width - len(prompt) :] = 1
    return ids, mask


# -- FastDecoder vs the Hugging Face forward ---------------------------------------------------
def test_fast_decoder_logits_equal_the_hf_model_through_prefill_decode_refill_and_shift(
    smollm2_fp32, tokenizer
):
    model, pad = smollm2_fp32, int(tokenizer.pad_token_id)
    decoder = FastDecoder(model)
    seqs = [tokenizer.encode(t) for t in TEXTS[:3]]
    assert len({len(s) for s in seqs}) == 3  # a left-padded batch of three lengths
    continuation = tokenizer.encode(" and then the quiet tide came back to the harbour again")
    cache = decoder.new_cache(4, 96)  # slot 3 stays free: it must still give finite logits
    gaps = []

    def steps(count, column, positions):
        nonlocal seqs
        for _ in range(count):
            token = continuation[len(seqs[0]) % len(continuation)]
            seqs = [s + [token] for s in seqs]
            tokens = torch.tensor([token] * 3 + [pad])
            logits = decoder.decode(cache, tokens, torch.cat([positions, positions[:1]]), column)
            assert torch.isfinite(logits).all()
            for row, tokens_so_far in enumerate(seqs):
                gaps.append(float((logits[row] - hf_last_logits(model, tokens_so_far)).abs().max()))
            positions, column = positions + 1, column + 1
        return column, positions

    with torch.no_grad():
        ids, mask = left_pad(seqs, pad)
        logits = decoder.prefill(cache, torch.arange(3), ids, mask)
        gaps += [
            float((logits[r] - hf_last_logits(model, s)).abs().max()) for r, s in enumerate(seqs)
        ]
        width = ids.shape[1]
        starts = [width - len(s) for s in seqs]
        column, positions = steps(3, width, torch.tensor([len(s) for s in seqs]))

        # refill slot 1 (the longest row: it starts at column 0) with a shorter prompt ending at
        # the current column; its old columns are stale now, the other rows go on
        new_prompt = tokenizer.encode(TEXTS[3])
        ids, mask = left_pad([new_prompt], pad)
        logits = decoder.prefill(
            cache, torch.tensor([1]), ids, mask, start=column - len(new_prompt)
        )
        gaps.append(float((logits[0] - hf_last_logits(model, new_prompt)).abs().max()))
        seqs[1], positions[1], starts[1] = (
            list(new_prompt),
            len(new_prompt),
            column - len(new_prompt),
        )
        column, positions = steps(3, column, positions)

        # no live row needs the columns before min(starts) any more: shift them out
        offset = min(starts)
        assert offset > 0
        cache.shift_left(offset, column)
        column, positions = steps(3, column - offset, positions)

    assert max(gaps) <= 1e-3, max(gaps)


# -- refill keeps every request's samples --------------------------------------------------------
def _requests(tokenizer):
    """Six requests of very different prompt lengths and budgets, one sampled three times."""
    texts = (TEXTS[1], TEXTS[0], TEXTS[2], TEXTS[3], TEXTS[1] + " " + TEXTS[2], "Why?")
    budgets = (3, 40, 7, 25, 1, 16)
    samples = (1, 1, 3, 1, 1, 1)
    return [
        (
            types.ModelInput.from_ints(tokenizer.encode(text)),
            n,
            types.SamplingParams(max_tokens=budget, temperature=1.0, seed=100 + i, stop=[]),
        )
        for i, (text, budget, n) in enumerate(zip(texts, budgets, samples))
    ]


def test_refilled_slots_sample_exactly_what_each_request_samples_alone(
    new_tiny_trainer, engine_root, tokenizer
):
    path = new_tiny_trainer(seed=2, scale=0.5).save_weights_for_sampler("refill").result().path
    two_slots = LocalServiceClient(root_dir=str(engine_root), precision="fp32", max_batch_size=2)
    sampler = two_slots.create_sampling_client(model_path=path).result()
    requests = _requests(tokenizer)

    futures = [sampler.sample(p, n, sp) for p, n, sp in requests]
    together = [f.result().sequences for f in futures]
    stats = sampler._sampler.stats
    alone = [sampler.sample(p, n, sp).result().sequences for p, n, sp in requests]

    assert stats.waves == 1 and stats.admissions >= 4  # rows joined a running batch
    assert stats.admitted_rows == 8
    for (_, n, params), got, ref in zip(requests, together, alone):
        assert len(got) == len(ref) == n
        for a, b in zip(got, ref):
            assert len(a.tokens) == params.max_tokens
            assert a.tokens == b.tokens
            np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5, rtol=0)
    triple = together[2]
    assert len({tuple(s.tokens) for s in triple}) == 3  # shared prefill, distinct samples


def test_the_hf_fallback_path_samples_what_the_fast_path_samples(new_tiny_trainer, tokenizer):
    sampler = new_tiny_trainer(seed=3, scale=0.5).save_weights_and_get_sampling_client().result()
    requests = [
        GenerationRequest(
            prompt=tuple(p.to_ints()),
            num_samples=n,
            max_tokens=sp.max_tokens,
            temperature=1.0,
            seed=sp.seed,
        )
        for p, n, sp in _requests(tokenizer)
    ]

    def run(fast: bool):
        engine = BatchedSampler(
            sampler.model,
            tokenizer,
            torch.device("cpu"),
            max_batch_size=3,
            show_progress=False,
            use_fast_decoder=fast,
        )
        assert (engine.fast is not None) == fast
        return engine.generate(requests)

    for fast_seqs, hf_seqs in zip(run(True), run(False)):
        for a, b in zip(fast_seqs, hf_seqs):
            assert a.tokens == b.tokens and a.stop_reason == b.stop_reason
            np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-4, rtol=0)


# -- refilled rows are scored like any other ------------------------------------------------------
@pytest.mark.slow
def test_compute_logprobs_equals_the_sampled_logprobs_of_rows_admitted_by_refill(
    engine_root, renderer
):
    questions = (
        "In one sentence, why does the moon show phases to us on Earth?",
        "Hi!",
        "Name three colours of the rainbow, please.",
        "What is two plus two?",
        "Write a haiku about a quiet harbour at night.",
    )
    two_slots = LocalServiceClient(root_dir=str(engine_root), precision="fp32", max_batch_size=2)
    sampler = two_slots.create_sampling_client(base_model=SMOLLM2_NAME).result()
    prompts = [generation_prompt(renderer, [{"role": "user", "content": q}]) for q in questions]
    budgets = (24, 4, 12, 2, 18)
    futures = [
        sampler.sample(p, 1, types.SamplingParams(max_tokens=b, temperature=0.7, seed=i))
        for i, (p, b) in enumerate(zip(prompts, budgets))
    ]
    sequences = [f.result().sequences[0] for f in futures]
    stats = sampler._sampler.stats
    assert stats.admitted_rows == 5 and stats.admissions >= 3 and stats.waves == 1
    scores = [
        sampler.compute_logprobs(types.ModelInput.from_ints(p.to_ints() + s.tokens))
        for p, s in zip(prompts, sequences)
    ]
    for prompt, seq, score in zip(prompts, sequences, scores):
        rescored = np.asarray(score.result()[prompt.length :])
        assert len(seq.tokens) >= 1
        np.testing.assert_allclose(rescored, np.asarray(seq.logprobs), atol=1e-4, rtol=0)


# -- shared prefixes: computed once, reused exactly ----------------------------------------------
SYSTEM = "You are a careful assistant. Answer briefly, kindly and with one concrete example. " * 4
QUESTIONS = ("What is tea?", "Why is the sky blue?", "Name a bird.", "Count to three, slowly.")


OTHER_SYSTEM = "Reply as a ship's cook: short, salty, cheerful, and always about food. " * 4


def _prefix_prompts(tokenizer):
    """Four prompts on one system prompt, one sharing its first 40 tokens, an unrelated short
    one, and two on another system prompt (a second family in the same call)."""
    system, other = tokenizer.encode(SYSTEM), tokenizer.encode(OTHER_SYSTEM)
    prompts = [system + tokenizer.encode(q) for q in QUESTIONS]
    prompts += [system[:40] + tokenizer.encode(" Tea?"), tokenizer.encode("Hi.")]
    return system, prompts + [other + tokenizer.encode(q) for q in QUESTIONS[:2]]


class _NoReuse:
    """Turns the engine's prefix store off (and empties it) for the block: every request is
    then prefilled alone, the reference the reuse must reproduce."""

    def __init__(self, engine):
        self.store = engine.prefixes

    def __enter__(self):
        self.saved, self.store.max_bytes = self.store.max_bytes, 0
        self.store.clear()

    def __exit__(self, *exc):
        self.store.max_bytes = self.saved


def _sample_all(sampler, prompts, budget=10, only=None):
    """Sample every prompt (the second one twice) in one flush, or only prompt ``only``, with
    the seed and sample count it has in the full list."""
    futures = [
        sampler.sample(
            types.ModelInput.from_ints(p),
            2 if i == 1 else 1,
            types.SamplingParams(max_tokens=budget, temperature=1.0, seed=50 + i, stop=[]),
        )
        for i, p in enumerate(prompts)
        if only is None or i == only
    ]
    return [f.result().sequences for f in futures]


def test_prompts_sharing_a_prefix_sample_exactly_what_each_samples_alone(
    new_tiny_trainer, engine_root, tokenizer
):
    path = new_tiny_trainer(seed=4, scale=0.5).save_weights_for_sampler("prefix").result().path
    three_slots = LocalServiceClient(root_dir=str(engine_root), precision="fp32", max_batch_size=3)
    sampler = three_slots.create_sampling_client(model_path=path).result()
    engine = three_slots.engine
    system, prompts = _prefix_prompts(tokenizer)
    assert len(system) >= 64

    together = _sample_all(sampler, prompts)  # refills: prefixes copied at several columns
    first = engine.stats()["sampling"]
    again = _sample_all(sampler, prompts[:2])  # the next chunk of a stage
    second = engine.stats()["sampling"]
    with _NoReuse(engine):
        alone = [_sample_all(sampler, prompts, only=i)[0] for i in range(len(prompts))]
        plain = engine.stats()["sampling"]

    pairs = [
        (a, b) for got, ref in zip(together + again, alone + alone[:2]) for a, b in zip(got, ref)
    ]
    assert len(pairs) == sum(len(r) for r in alone + alone[:2])
    assert_same_draws(pairs, atol=1e-5)
    # the system prompt, rounded down to a block, built once (on top of the 32 tokens that
    # the prompt sharing only 40 tokens shares with the others) and used by the four prompts
    # that start with it; the one sharing 40 tokens takes them from it; the short prompt is
    # computed alone; the other family's prefix is built once too. The rows that start with
    # the first system prompt read it from the wave's one copy (cascade attention); the
    # other family's rows get copies of theirs.
    block = len(system) // 16 * 16
    other = len(tokenizer.encode(OTHER_SYSTEM)) // 16 * 16
    assert first["entries_built"] == 3 and first["hits"] == 7
    assert first["reused"] == 4 * block + 40 + 2 * other
    assert first["requested"] == sum(len(p) for p in prompts)
    # computed: the two prefixes, then the suffixes (the twice-sampled prompt's suffix twice
    # when its two rows join the batch at different admissions)
    suffixes = first["computed"] - (block + other)
    lower = first["requested"] - first["reused"]
    assert lower <= suffixes <= lower + len(prompts[1]) - block
    # the next call finds the stored prefix: nothing rebuilt, only suffixes computed
    assert second["entries_built"] == 3
    assert second["computed"] - first["computed"] == sum(len(p) - block for p in prompts[:2])
    assert plain["reused"] == second["reused"]  # with the store off nothing is reused


def test_scores_sharing_a_prefix_equal_scores_computed_alone(tiny_snapshot_for_prefix, tokenizer):
    sampler = tiny_snapshot_for_prefix
    engine = sampler.engine
    _, prompts = _prefix_prompts(tokenizer)
    reply = tokenizer.encode(" The answer is short and kind.")
    sequences = [p + reply for p in prompts]

    def score(last_n):
        futures = [
            sampler.compute_logprobs(types.ModelInput.from_ints(s), prompt_logprobs_last_n=last_n)
            for s in sequences
        ]
        return [f.result() for f in futures]

    before = engine.stats()["scoring"]
    tails = score(len(reply))
    full = score(None)  # every position scored: nothing can come from a stored prefix
    after = engine.stats()["scoring"]
    with _NoReuse(engine):
        tails_alone = [score(len(reply))[i] for i in range(len(sequences))]
        full_alone = score(None)
    for got, ref in zip(tails + full, tails_alone + full_alone):
        assert [g is None for g in got] == [r is None for r in ref]
        values = [(g, r) for g, r in zip(got, ref) if g is not None]
        np.testing.assert_allclose(*zip(*values), atol=1e-5, rtol=0)
    assert after["hits"] - before["hits"] == 7 and after["reused"] > before["reused"]
    assert after["computed"] - before["computed"] < after["requested"] - before["requested"]


@pytest.fixture(scope="module")
def tiny_snapshot_for_prefix(new_tiny_trainer):
    return new_tiny_trainer(seed=5, scale=0.5).save_weights_and_get_sampling_client().result()


def test_smollm2_samples_and_scores_the_same_with_a_shared_system_prompt(smollm2_sampler, renderer):
    """The real model, fp32: chat prompts sharing a system prompt, sampled together (the
    system prompt computed once) and each alone, give the same tokens."""
    system = {"role": "system", "content": SYSTEM}
    prompts = [
        generation_prompt(renderer, [system, {"role": "user", "content": q}]).to_ints()
        for q in QUESTIONS[:3]
    ]
    engine = smollm2_sampler.engine
    before = engine.stats()["sampling"]
    together = _sample_all(smollm2_sampler, prompts, budget=8)
    after = engine.stats()["sampling"]
    with _NoReuse(engine):
        alone = [_sample_all(smollm2_sampler, prompts, 8, only=i)[0] for i in range(len(prompts))]
    assert after["hits"] - before["hits"] == 3
    assert_same_draws([(a, b) for got, ref in zip(together, alone) for a, b in zip(got, ref)], 1e-4)


def _fake_build(calls):
    """A `PrefixStore.plan` builder that records what it is asked and stores 1 KB per token."""

    def build(tokens, parent, reuse):
        calls.append((len(tokens), reuse))
        kv = torch.zeros((1, 1, len(tokens), 128))  # 512 bytes per token, keys and values
        return PrefixKV(tokens=tokens.copy(), keys=kv, values=kv.clone())

    return build


def test_the_prefix_store_builds_each_shared_block_prefix_once_shortest_first():
    store = PrefixStore(max_bytes=1 << 20, block=16, min_tokens=32)
    owner = type("Owner", (), {})()
    name = store.namespace(owner, "fp32")
    family_a = [list(range(100)) + [1000 + i] * 5 for i in range(3)]  # share 100 tokens
    family_b = [[7] * 70 + [2000 + i] for i in range(2)]  # share 70 tokens
    nested = [family_a[0] + [42] * 20 + [3000 + i] for i in range(2)]  # share 125
    calls: list[tuple[int, int]] = []
    counters = PrefixCounters()
    prompts = family_a + family_b + nested + [[5] * 40]
    plan = store.plan(name, prompts, [len(p) - 1 for p in prompts], _fake_build(calls), counters)

    # rounded down to 16-token blocks: 64 for family b, 96 for family a; the nested pair
    # shares 125 tokens, so 112, built on top of family a's 96-token entry. Each prompt then
    # takes the longest stored prefix it starts with, up to its limit: family a also shares
    # 100-104 tokens with the 112-token entry
    assert calls == [(64, 0), (96, 0), (112, 96)]
    assert [length for _, length in plan] == [104, 100, 100, 64, 64, 112, 112, 0]
    assert counters.entries_built == 3 and counters.computed == 64 + 96 + 16
    # a later call sharing a stored prefix builds nothing (and may take an unrounded length)
    again = store.plan(name, [list(range(90)) + [9]], [90], _fake_build(calls), counters)
    assert again[0][1] == 90 and len(calls) == 3
    # a prompt seen before (history) is worth a prefix when it comes back
    store.plan(name, [[3] * 50], [49], _fake_build(calls), counters)
    store.plan(name, [[3] * 50 + [4]], [50], _fake_build(calls), counters)
    assert calls[-1] == (48, 0)


def test_the_prefix_store_evicts_least_recently_used_and_forgets_a_dead_clients_prefixes():
    import gc

    store = PrefixStore(max_bytes=3 * 64 * 1024, block=16, min_tokens=32)  # three entries
    owner = type("Owner", (), {})()
    name = store.namespace(owner, "fp32")
    for first in range(4):  # four families of two: the first is evicted by the fourth
        family = [[first] * 64 + [i] for i in range(2)]
        store.plan(name, family, [64, 64], _fake_build([]), PrefixCounters())
    assert len(store) == 3 and store.nbytes == 3 * 64 * 1024
    assert store.longest(name, np.array([0] * 64), 64)[1] == 0
    assert store.longest(name, np.array([3] * 64), 64)[1] == 64
    del owner
    gc.collect()
    assert len(store) == 0 and store.nbytes == 0


def test_prepacked_bf16_products_give_the_numbers_of_f_linear_bit_for_bit():
    """bf16 decoders run their products on weights reordered once for oneDNN; that must be a
    speed change only: the same numbers as `F.linear` at every row count."""
    from character_training.backends.local.fast_decode import can_pack, shared_weight

    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(96, 64, generator=gen).to(torch.bfloat16)
    if not can_pack(weight):
        pytest.skip("no oneDNN prepacking on this build")
    packed = shared_weight([weight], layout="onednn")
    assert shared_weight([weight], layout="onednn") is packed  # built once, shared
    for shape in ((1, 64), (8, 64), (33, 64), (3, 5, 64)):
        x = torch.randn(*shape, generator=gen).to(torch.bfloat16)
        got = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
        assert torch.equal(got, torch.nn.functional.linear(x, weight))


def test_snapshots_share_the_base_decoders_weights_instead_of_copying_them(
    tiny_sampler, new_tiny_trainer
):
    """Every snapshot of a training run gets its own decoder; its fused (and prepacked)
    weights must be the base decoder's, not a copy per snapshot (a model's size each)."""
    snapshot = new_tiny_trainer(seed=6).save_weights_and_get_sampling_client().result()
    base, snap = tiny_sampler._sampler.fast, snapshot._sampler.fast
    for ours, theirs in zip(snap.layers, base.layers):
        assert ours.qkv is theirs.qkv and ours.gate_up is theirs.gate_up
        assert ours.out is theirs.out and ours.down is theirs.down
    assert snap.lm_head is base.lm_head
    assert snap.layers[0].qkv_update is not None  # the adapter itself is the snapshot's own


def assert_same_draws(pairs, atol: float, max_edge_flips: int = 1) -> None:
    """Each (got, ref) pair of sequences sampled with the same seed: the same tokens and
    log-probs within ``atol``, except that a sequence may part from its reference where the
    seeded uniform fell within float noise of a bin edge of the id-ordered CDF (`draw`): the
    two tokens there are then neighbours in id order (a random model's flat distributions put
    such edges everywhere; it happened once in ~100 draws with AVX2-only kernels). Everything
    before that step must agree, and at most ``max_edge_flips`` sequences may part at all."""
    flips = 0
    for got, ref in pairs:
        same = [a == b for a, b in zip(got.tokens, ref.tokens)]
        cut = same.index(False) if False in same else len(same)
        if cut < len(same):
            flips += 1
            assert abs(got.tokens[cut] - ref.tokens[cut]) == 1, (got.tokens, ref.tokens)
        else:
            assert got.tokens == ref.tokens
        np.testing.assert_allclose(got.logprobs[:cut], ref.logprobs[:cut], atol=atol, rtol=0)
    assert flips <= max_edge_flips
