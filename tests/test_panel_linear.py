"""The panel kernel: fp32 products on bf16-stored weights for AVX2 CPUs (`panel_linear`).

What a user relies on: the kernel computes the product in the one order it documents (so its
numbers do not depend on rows, threads or padding), it halves the weights' bytes only where
that is exact, the decoder gives the same logits on it as on plain `F.linear`, and where it
cannot be built the engine says why and keeps its other path.
"""

from __future__ import annotations

import pytest
import torch
from character_training.backends.local import fast_decode, panel_linear
from test_fast_decode import left_pad


@pytest.fixture
def kernel():
    """The built kernel; a machine without one (no C compiler, not x86-64 with AVX2) skips
    with the reason the engine gives, as the engine itself then decodes on oneDNN."""
    reason = panel_linear.unavailable_reason()
    if reason is not None:
        pytest.skip(f"panel kernel unavailable here: {reason}")
    return panel_linear


def fma_chains(x: torch.Tensor, weight: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """The kernel's documented order, emulated: per output, a chain of fused multiply-adds
    over the inner dimension from zero (the fp32 product of two fp32 values is exact in fp64,
    so each step rounds once, as an FMA does), restarted every ``chunk`` values, the chains
    added left to right in fp32."""
    x64, w64 = x.double(), weight.float().double()
    total = None
    for start in range(0, x.shape[1], chunk):
        acc = torch.zeros(x.shape[0], weight.shape[0], dtype=torch.float32)
        for k in range(start, min(x.shape[1], start + chunk)):
            acc = (acc.double() + x64[:, k, None] * w64[None, :, k]).float()
        total = acc if total is None else total + acc
    return total


@pytest.mark.parametrize("bf16_values", [True, False])
def test_the_kernel_sums_in_its_documented_order_bit_for_bit(kernel, bf16_values):
    gen = torch.Generator().manual_seed(3)
    # 40 outputs: two full panels and a padded one; 1,100 inputs: two chains
    weight = torch.randn(40, 1100, generator=gen) * 0.05
    if bf16_values:
        weight = weight.to(torch.bfloat16).float()
    packed = panel_linear.pack(weight)
    # stored as bf16 bits only where that loses nothing: half the bytes of fp32
    assert packed.bf16 is bf16_values
    assert packed.panels.shape == (3, 1100, 16) and packed.shape == (40, 1100)
    assert packed.panels.element_size() == (2 if bf16_values else 4)
    # 1-6 rows: one register tile; 8: two tiles of 4; 13: widened panels; 70: two row blocks
    for rows in (1, 5, 8, 13, 70):
        x = torch.randn(rows, 1100, generator=gen)
        got = panel_linear.linear(x, packed)
        assert torch.equal(got, fma_chains(x, weight)), rows


def test_the_kernel_takes_leading_dimensions_and_refuses_other_inputs(kernel):
    gen = torch.Generator().manual_seed(4)
    weight = torch.randn(16, 24, generator=gen).to(torch.bfloat16)
    packed = panel_linear.pack(weight)
    x = torch.randn(2, 3, 24, generator=gen)
    got = panel_linear.linear(x, packed)
    assert got.shape == (2, 3, 16)
    assert torch.equal(got.reshape(6, 16), fma_chains(x.reshape(6, 24), weight))
    assert panel_linear.linear(torch.empty(0, 24), packed).shape == (0, 16)
    with pytest.raises(ValueError, match="expected float32 input with 24 features"):
        panel_linear.linear(x.double(), packed)


def test_the_decoder_on_panels_gives_the_logits_of_plain_products(
    kernel, new_tiny_trainer, tokenizer, monkeypatch
):
    """A LoRA snapshot's decoder (fused projections, unmerged updates, a vocabulary head) on
    the kernel against the same decoder on `F.linear`, through prefill and decode steps."""
    snapshot = new_tiny_trainer(seed=9).save_weights_and_get_sampling_client().result()
    model = snapshot._sampler.model
    monkeypatch.setattr(fast_decode, "products_layout", lambda weight: "plain")
    plain = fast_decode.FastDecoder(model)
    monkeypatch.setattr(fast_decode, "products_layout", lambda weight: "panel")
    panel = fast_decode.FastDecoder(model)
    assert isinstance(panel.layers[0].gate_up, panel_linear.PanelWeight)
    assert fast_decode.FastDecoder(model).layers[0].gate_up is panel.layers[0].gate_up  # shared
    prompts = [tokenizer.encode(t) for t in ("Tea?", "The lighthouse keeper counted ships.")]
    ids, mask = left_pad(prompts, int(tokenizer.pad_token_id))
    width = ids.shape[1]
    with torch.no_grad():
        caches = [plain.new_cache(2, width + 4), panel.new_cache(2, width + 4)]
        logits = [d.prefill(c, torch.arange(2), ids, mask) for d, c in zip((plain, panel), caches)]
        positions = torch.tensor([len(p) for p in prompts])
        for step in range(3):
            tokens = logits[0].argmax(-1)
            logits = [
                d.decode(c, tokens, positions + step, width + step)
                for d, c in zip((plain, panel), caches)
            ]
            scale = float(logits[0].abs().max())
            assert float((logits[1] - logits[0]).abs().max()) <= 1e-5 * scale


def test_without_a_working_compiler_the_reason_is_one_line_naming_it(tmp_path, monkeypatch):
    failing = tmp_path / "broken-cc"
    failing.write_text("#!/bin/sh\necho 'cc1: error: unrecognized option' >&2\nexit 1\n")
    failing.chmod(0o755)
    monkeypatch.setenv("CC", str(failing))
    monkeypatch.setenv("CHARACTER_TRAINING_CACHE", str(tmp_path / "cache"))
    with pytest.raises(panel_linear._Unavailable) as caught:
        panel_linear._compiled()
    assert str(caught.value) == (
        f"{failing} failed to build panel_linear.c: cc1: error: unrecognized option"
    )
    assert not list((tmp_path / "cache" / "kernels").iterdir())  # nothing half-built kept
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    monkeypatch.setenv("CHARACTER_TRAINING_CACHE", str(blocked / "cache"))
    with pytest.raises(panel_linear._Unavailable, match="cannot write the kernel to .*a-file"):
        panel_linear._compiled()


def test_the_kernel_is_used_only_for_fp32_on_avx2_and_can_be_switched_off(kernel, monkeypatch):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    cpu = torch.device("cpu")
    assert panel_linear.enabled_for(torch.float32, cpu)
    assert not panel_linear.enabled_for(torch.bfloat16, cpu)
    monkeypatch.setenv(panel_linear.SWITCH_VARIABLE, "0")
    assert not panel_linear.enabled_for(torch.float32, cpu)
    # the engine's runtime record says why (`settings.runtime_info`, products.panel_kernel)
    assert panel_linear.disabled_reason(torch.float32, cpu) == (
        "off (CHARACTER_TRAINING_PANEL_KERNEL=0)"
    )
    monkeypatch.delenv(panel_linear.SWITCH_VARIABLE)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert not panel_linear.enabled_for(torch.float32, cpu)  # oneDNN is faster there
