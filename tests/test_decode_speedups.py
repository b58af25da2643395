"""The decode step's and token choice's speed-ups change no number.

`FastDecoder.decode` now runs its element-wise work on one thread between products on all
threads (`threads.ThreadSwitch`), rotates q and k together with the sign of rotate-half moved
onto the sine table, and normalises, gates and adds residuals in place;
`BatchedSampler._choose` skips the argmax and the sub-batch copies a batch does not need. Each
is meant to give the same bits as the plain computation it replaced, which these tests write
out (the old step, op for op) and compare exactly, on a tiny random Llama, with and without
LoRA updates, with a shared prefix (cascade attention), for greedy, top-k, nucleus and mixed
batches. A bug here would show as sampled tokens that depend on the engine version.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from character_training.backends.local import threads
from character_training.backends.local.adapters import LowRankUpdate
from character_training.backends.local.fast_decode import (
    FastDecoder,
    StaticCache,
    attend_with_shared,
)
from character_training.backends.local.generation import (
    BatchedSampler,
    GeneratedSequence,
    GenerationRequest,
    _Row,
    _row_generator,
    sample_tokens,
)
from character_training.backends.local.prefix_cache import PrefixKV
from test_snapshot_fidelity import _tiny_llama


@pytest.fixture(autouse=True)
def switch_even_for_tiny_shapes(monkeypatch):
    """The switch only turns on where torch would split an element-wise op; the tiny model's
    tensors never are that large, so the threshold is lowered for every test here."""
    monkeypatch.setattr(threads, "GRAIN_SIZE", 1)


def tiny_llama(dtype: torch.dtype = torch.float32):
    """A random two-layer Llama with SmolLM2's grouping (three query heads per K/V head)."""
    model = _tiny_llama(vocab_size=96, hidden_size=48, intermediate_size=80, num_attention_heads=6)
    return model.to(dtype)


def plain_decode(dec: FastDecoder, cache: StaticCache, tokens, positions, column: int):
    """The decode step as it was written before the speed-ups: out-of-place ops, q and k
    rotated apart with ``cat([-x2, x1])``, separate residual adds, torch's thread count."""
    b, d = tokens.shape[0], dec.head_dim
    groups, half = dec.heads // dec.kv_heads, dec.head_dim // 2
    cos, sin = dec._rotary(positions)
    cos, sin = cos[:, None, None], sin[:, None, None]

    def norm(x, weight):
        h = x.float()
        return weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + dec.eps)).to(x.dtype)

    def rope(x):
        return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin

    def linear(x, weight, bias, update):
        """The product, then the update added as a separate tensor, on torch's threads."""
        out = dec._linear(x, weight, bias)
        return out if update is None else (out.float() + update(x)).to(dec.act_dtype)

    cache.valid[:, column] = True
    mask = cache.valid[:, None, None, : column + 1]
    cascade = cache.shared_len is not None and bool((cache.shared_len > 0).any())
    h = F.embedding(tokens, dec.embed)
    for i, lay in enumerate(dec.layers):
        mixed = linear(norm(h, lay.norm_in), lay.qkv, lay.qkv_bias, lay.qkv_update)
        q, k, v = mixed.split([dec.q_size, dec.kv_size, dec.kv_size], dim=-1)
        q = rope(q.view(b, dec.kv_heads, groups, d)).to(dec.cache_dtype)
        cache.keys[i, :, :, column] = rope(k.view(b, dec.kv_heads, 1, d))[:, :, 0]
        cache.values[i, :, :, column] = v.view(b, dec.kv_heads, d)
        keys, values = cache.keys[i, :, :, : column + 1], cache.values[i, :, :, : column + 1]
        if cascade:
            shared = (cache.shared_keys[i], cache.shared_values[i], cache.shared_len)
            attn = attend_with_shared(q, keys, values, mask, *shared, dec.scale)
        else:
            attn = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=dec.scale)
        attn = attn.to(dec.act_dtype).reshape(b, dec.q_size)
        h = h + linear(attn, lay.out, None, lay.out_update)
        gate, up = linear(norm(h, lay.norm_post), lay.gate_up, None, lay.gate_up_update).chunk(
            2, dim=-1
        )
        h = h + linear(F.silu(gate) * up, lay.down, None, lay.down_update)
    return linear(norm(h, dec.final_norm), dec.lm_head, None, dec.lm_head_update).float()


def filled_cache(dec: FastDecoder, rows: int, width: int, shared: PrefixKV | None = None):
    """A cache whose first ``width`` columns hold random keys/values, some masked out."""
    gen = torch.Generator().manual_seed(rows)
    cache = dec.new_cache(rows, width + 8, shared=shared)
    cache.keys.copy_(torch.randn(cache.keys.shape, generator=gen))
    cache.values.copy_(torch.randn(cache.values.shape, generator=gen))
    cache.valid[:, :width] = torch.rand((rows, width), generator=gen) < 0.8
    cache.valid[:, 0] = True
    if shared is not None:
        cache.shared_len[:] = torch.arange(rows) % (shared.length + 1)
    return cache


def copy_of(cache: StaticCache) -> StaticCache:
    shared_len = None if cache.shared_len is None else cache.shared_len.clone()
    return StaticCache(
        cache.keys.clone(),
        cache.values.clone(),
        cache.valid.clone(),
        cache.shared_keys,
        cache.shared_values,
        shared_len,
    )


def assert_steps_equal(dec: FastDecoder, cache: StaticCache, steps: int = 3) -> None:
    """Several decode steps of ``dec`` and of `plain_decode` from the same cache: the same
    logits and the same cache contents, bit for bit."""
    rows, width = cache.valid.shape[0], int(cache.valid.shape[1]) - 8
    ours, theirs = cache, copy_of(cache)
    gen = torch.Generator().manual_seed(7)
    positions = torch.randint(width, 2 * width, (rows,), generator=gen)
    with torch.inference_mode():
        for step in range(steps):
            tokens = torch.randint(0, dec.vocab, (rows,), generator=gen)
            got = dec.decode(ours, tokens, positions + step, width + step)
            want = plain_decode(dec, theirs, tokens, positions + step, width + step)
            assert torch.equal(got, want), float((got - want).abs().max())
    assert torch.equal(ours.keys, theirs.keys) and torch.equal(ours.values, theirs.values)


@pytest.mark.parametrize("rows", [1, 5, 12])
def test_the_decode_step_gives_the_plain_steps_logits_bit_for_bit(rows):
    dec = FastDecoder(tiny_llama())
    threads_before = torch.get_num_threads()
    assert_steps_equal(dec, filled_cache(dec, rows, width=11))
    assert torch.get_num_threads() == threads_before  # the switch puts the count back


def test_the_decode_step_with_lora_updates_and_a_shared_prefix_is_unchanged():
    """Adapted layers, the head included (their updates summed inside the up-projection's
    product, `LowRankUpdate.add_to`), give the bits of the separate add; cascade attention
    reads a shared prefix."""
    dec = FastDecoder(tiny_llama())
    gen = torch.Generator().manual_seed(3)

    def update(n_in: int, n_out: int) -> LowRankUpdate:
        down = torch.randn(4, n_in, generator=gen) * 0.1
        return LowRankUpdate(down=down, up=torch.randn(n_out, 4, generator=gen) * 0.1)

    hidden, inter = dec.embed.shape[1], dec.layers[0].gate_up.shape[0] // 2
    dec.layers[0].out_update = update(dec.q_size, hidden)
    dec.layers[1].down_update = update(inter, hidden)
    dec.layers[1].qkv_update = update(hidden, dec.q_size + 2 * dec.kv_size)
    dec.layers[0].gate_up_update = update(hidden, 2 * inter)
    dec.lm_head_update = update(hidden, dec.vocab)
    prefix = 9
    shape = (len(dec.layers), dec.kv_heads, prefix, dec.head_dim)
    shared = PrefixKV(
        tokens=torch.arange(prefix).numpy(),
        keys=torch.randn(shape, generator=gen),
        values=torch.randn(shape, generator=gen),
    )
    assert_steps_equal(dec, filled_cache(dec, 6, width=7, shared=shared))


def test_compacting_a_cache_moves_the_live_rows_in_place_and_decodes_the_same_bits():
    """A wave that sheds finished rows keeps them in its own tensors (a second copy of the
    cache set a run's peak memory), holds what an index-select held, and decodes on."""
    dec = FastDecoder(tiny_llama())
    cache = filled_cache(dec, 6, width=7)
    want = copy_of(cache)
    rows = torch.tensor([1, 3, 4])
    storage = cache.keys.data_ptr()
    kept = cache.compact(rows)
    assert kept.keys.data_ptr() == storage and kept.keys.shape[1] == 3
    assert torch.equal(kept.keys, want.keys[:, rows]) and torch.equal(
        kept.values, want.values[:, rows]
    )
    assert torch.equal(kept.valid, want.valid[rows])
    assert_steps_equal(dec, kept)  # a view of the first rows vs a fresh contiguous copy
    with pytest.raises(ValueError, match="strictly increasing"):
        kept.compact(torch.tensor([2, 0]))


def test_bf16_weights_with_fp32_activations_decode_as_before():
    """A bf16 sampling model (`adapters.sampling_model`): products in bf16, residual fp32."""
    from character_training.backends.local.adapters import sampling_model

    dec = FastDecoder(sampling_model(tiny_llama(), torch.bfloat16))
    assert dec.dtype == torch.bfloat16 and dec.act_dtype == torch.float32
    assert_steps_equal(dec, filled_cache(dec, 4, width=9), steps=2)


def test_serial_element_wise_work_gives_the_numbers_of_torchs_own_threading(monkeypatch):
    dec = FastDecoder(tiny_llama())
    cache = filled_cache(dec, 8, width=10)
    tokens, positions = torch.arange(8), torch.arange(10, 18)
    with torch.inference_mode():
        serial = dec.decode(copy_of(cache), tokens, positions, 10)
        monkeypatch.setattr(threads, "SERIAL_ROWS", 0)  # every op on torch's usual threads
        usual = dec.decode(copy_of(cache), tokens, positions, 10)
    assert torch.equal(serial, usual)


def test_serial_attention_moves_logits_by_float_noise_only():
    """The opt-in `serial_attention` runs the flash kernel on one thread: another summation
    order, nothing more."""
    dec = FastDecoder(tiny_llama())
    cache = filled_cache(dec, 9, width=12)
    tokens, positions = torch.arange(9), torch.arange(12, 21)
    with torch.inference_mode():
        exact = dec.decode(copy_of(cache), tokens, positions, 12)
        dec.serial_attention = True
        serial = dec.decode(copy_of(cache), tokens, positions, 12)
    torch.testing.assert_close(serial, exact, atol=1e-5, rtol=0)


def test_an_error_inside_a_decode_step_leaves_the_thread_count_as_it_was(monkeypatch):
    dec = FastDecoder(tiny_llama())
    before = torch.get_num_threads()
    calls = []

    def failing(*args):
        calls.append(torch.get_num_threads())
        raise RuntimeError("product failed")

    monkeypatch.setattr(dec, "_linear", failing)
    with pytest.raises(RuntimeError, match="product failed"), torch.inference_mode():
        dec.decode(filled_cache(dec, 3, width=5), torch.arange(3), torch.arange(5, 8), 5)
    assert calls == [before]  # the product itself ran on every thread
    assert torch.get_num_threads() == before


def test_switch_runs_products_on_all_threads_and_the_rest_on_one():
    switch = threads.ThreadSwitch(threads=2, enabled=True)
    seen = []
    switch.serial()
    try:
        seen.append(torch.get_num_threads())
        seen.append(switch.run(torch.get_num_threads))
        seen.append(torch.get_num_threads())
    finally:
        switch.restore()
    assert seen == [1, 2, 1]
    assert not threads.ThreadSwitch(threads=1, enabled=True).enabled


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_in_place_rms_norm_equals_the_hf_formula(dtype):
    dec = FastDecoder(tiny_llama(dtype))
    x = torch.randn(5, dec.embed.shape[1]).to(dtype)
    weight = dec.layers[0].norm_in
    h = x.float()
    want = weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + dec.eps)).to(dtype)
    assert torch.equal(dec._rms(x, weight), want)


# -- token choice -------------------------------------------------------------------------------
def plain_choose(rows: list[_Row], logits: torch.Tensor):
    """`_choose` before the speed-up: argmax for every row, then the sampling rows copied out."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    temps = torch.tensor([r.params.temperature for r in rows], dtype=torch.float32)
    tokens = torch.argmax(logprobs, dim=-1)
    sampling = (temps > 0).nonzero().squeeze(-1)
    if sampling.numel():
        uniforms = torch.stack([torch.rand((), generator=rows[int(i)].generator) for i in sampling])
        tokens[sampling] = sample_tokens(
            logprobs[sampling],
            temps[sampling],
            torch.tensor([rows[int(i)].params.top_k for i in sampling]),
            torch.tensor([rows[int(i)].params.top_p for i in sampling], dtype=torch.float32),
            uniforms,
        )
    return tokens.tolist(), logprobs.gather(-1, tokens[:, None]).squeeze(-1).tolist()


def make_rows(settings: list[tuple[float, int, float]]) -> list[_Row]:
    rows = []
    for i, (temperature, top_k, top_p) in enumerate(settings):
        params = GenerationRequest(
            prompt=(1,), num_samples=1, max_tokens=4, temperature=temperature, top_k=top_k,
            top_p=top_p, seed=40 + i,
        )  # fmt: skip
        rows.append(_Row(0, i, (1,), params, _row_generator(params.seed, i), GeneratedSequence()))
    return rows


MIXED = [(0.0, -1, 1.0), (0.7, -1, 0.95), (1.0, 5, 1.0), (0.0, -1, 1.0), (1.3, 300, 0.9)]


@pytest.mark.parametrize(
    "settings",
    [MIXED, [(0.7, -1, 0.95)] * 6, [(0.0, -1, 1.0)] * 3, [(1.0, -1, 0.5), (0.5, 40, 0.8)]],
    ids=["mixed", "all-nucleus", "all-greedy", "top-k-and-top-p"],
)
def test_token_choice_picks_and_scores_what_the_plain_choice_did(settings):
    gen = torch.Generator().manual_seed(len(settings))
    for step in range(4):  # peaky and flat rows, new draws from the same generators each step
        logits = torch.randn((len(settings), 3000), generator=gen) * (1 + 4 * (step % 2))
        ours, theirs = make_rows(settings), make_rows(settings)
        for _ in range(step + 1):
            tokens = BatchedSampler._choose(None, ours, logits)  # type: ignore[arg-type]
            want_tokens, want_logprobs = plain_choose(theirs, logits)
            assert tokens.tolist() == want_tokens
        assert [r.out.tokens[-1] for r in ours] == want_tokens
        assert [r.out.logprobs[-1] for r in ours] == want_logprobs
        assert all(isinstance(r.out.tokens[-1], int) for r in ours)


@pytest.mark.parametrize("shape", [(64, 576), (3, 7, 576), (1, 576)])
@pytest.mark.parametrize("out_features", [960, 49152])
def test_an_update_summed_inside_its_product_gives_the_separate_sums_bits(shape, out_features):
    """`LowRankUpdate.add_to` (one ``addmm``) against ``out + update(x)``: SmolLM2's layer and
    head widths, decode rows and prefill blocks."""
    gen = torch.Generator().manual_seed(out_features + len(shape))
    update = LowRankUpdate(
        down=torch.randn(8, shape[-1], generator=gen) * 0.1,
        up=torch.randn(out_features, 8, generator=gen) * 0.1,
    )
    x = torch.randn(shape, generator=gen)
    out = torch.randn((*shape[:-1], out_features), generator=gen)
    assert torch.equal(update.add_to(out, x), out + update(x))
