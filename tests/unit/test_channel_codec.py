"""``key_codec="channel"``: keys stored as their own rows, quantized with one scale per channel
of each block (KIVI-style), on fresh random inputs: the quantizer's bound, why it exists (a
large channel ruins per-token int4 keys, not per-channel ones), compress_blocks' layout with
the outliers left out of the scales, the torch reference against dense attention over the
state's own decompression, the decode kernel against it, bytes held, and a model end to end."""

from __future__ import annotations

import pytest
import torch
from tests.layer_states import state_around
from tests.tiny_models import tiny_model
from transformers import DynamicCache

from spectralcache import SpectralCache, SpectralConfig
from spectralcache.attention.reference import dense_reference, spectral_attention
from spectralcache.cache.block import compress_blocks, reconstruct
from spectralcache.cache.state import SpectralLayerState
from spectralcache.linalg.quant import dequantize_rows, quantize_cols, quantize_rows

T, D = 32, 32


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def keys_with_a_big_channel(lead: tuple[int, ...], seed: int, big: float = 30.0) -> torch.Tensor:
    """Random keys whose channel 3 is ``big`` times larger in every token (the structure real
    keys have: a few channels that dominate every token's magnitude)."""
    k = torch.randn(*lead, T, D, generator=gen(seed))
    k[..., 3] = big * (1.0 + 0.1 * k[..., 3])
    return k


def cfg(**kw) -> SpectralConfig:
    base = dict(
        block_size=T, hot_size=4, landmarks=2, outliers_per_block=3, key_codec="channel", rank_values=16
    )
    base.update(kw)
    return SpectralConfig(**base)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_cols_bound_and_layout(bits):
    x = torch.randn(3, 2, 40, 17, generator=gen(bits)) * torch.linspace(0.01, 50.0, 17)
    q = quantize_cols(x, bits)
    assert q.scales.shape == (3, 2, 1, 17) and q.scales.dtype == torch.float16
    assert q.data.shape == ((3, 2, 40, 17) if bits == 8 else (3, 2, 40, 9))
    assert q.shape == x.shape
    err = (dequantize_rows(q) - x).abs()
    assert torch.all(err <= q.scales.float() / 2 * (1 + 1e-5) + 1e-7)
    zero = quantize_cols(torch.zeros(4, 6), bits)
    assert torch.all(zero.scales == 0) and torch.all(dequantize_rows(zero) == 0)
    with pytest.raises(ValueError, match="NaN or inf"):
        quantize_cols(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), bits)


def test_per_channel_scales_keep_the_small_channels_at_4_bits():
    """The reason for the codec: one scale per token is set by the big channel and rounds the
    other 31 to a few levels; one per channel quantizes each at its own range."""
    k = keys_with_a_big_channel((4,), seed=1)
    small = [c for c in range(D) if c != 3]
    by_row = dequantize_rows(quantize_rows(k, 4))[..., small]
    by_col = dequantize_rows(quantize_cols(k, 4))[..., small]
    err_row = (by_row - k[..., small]).norm() / k[..., small].norm()
    err_col = (by_col - k[..., small]).norm() / k[..., small].norm()
    assert err_col < 0.2 < 0.5 < err_row


@pytest.mark.parametrize("bits", [8, 4])
def test_compress_blocks_layout_and_outliers_left_out_of_the_scales(bits):
    k = keys_with_a_big_channel((2, 3), seed=2)
    k[0, 1, 7, 11] = 400.0  # one token far out on a small channel: an outlier
    v = torch.randn(2, 3, T, D, generator=gen(3))
    c = cfg(coeff_bits=bits, value_codec="identity")
    rk, rv = c.ranks_for(D)
    assert (rk, rv) == (D, D)
    blocks = compress_blocks(k, v, c, rk, rv)
    assert blocks.key_basis is None and blocks.key_scales_per_channel
    assert blocks.key_scales.shape == (2, 3, 1, D) and blocks.key_coeffs.shape[-2] == T
    assert 7 in blocks.outlier_index[0, 1].tolist()
    # the outlier's 400 did not set channel 11's scale: the other tokens' range did
    others = torch.ones(T, dtype=torch.bool)
    others[blocks.outlier_index[0, 1]] = False
    amax = k[0, 1, others, 11].abs().max()
    qmax = 127 if bits == 8 else 7
    assert float(blocks.key_scales[0, 1, 0, 11]) <= float(amax) / qmax * 1.001
    rec_k, _ = reconstruct(blocks)
    low = rec_k[0, 1, others] - k[0, 1, others]
    assert torch.all(low.abs() <= blocks.key_scales[0, 1, 0].float() / 2 * (1 + 1e-5) + 1e-6)
    torch.testing.assert_close(rec_k[0, 1, 7], k[0, 1, 7])  # served exactly


def test_config_and_block_refusals():
    with pytest.raises(ValueError, match="value_codec='channel'"):
        SpectralConfig(value_codec="channel")
    k = torch.randn(1, T, D, generator=gen(4))
    with pytest.raises(ValueError, match="channel codec for keys"):
        compress_blocks(k, k, cfg(), 8, D)


def channel_state(
    bits: int, key_space: str, chunk: int, seed: int, zero_point: bool = False
) -> SpectralLayerState:
    """A state whose cold keys were compressed with the channel codec (compress_blocks on
    random K/V with a big key channel; ``zero_point``: with per-channel zero points, the big
    channel far from zero as real keys' slow RoPE channels are), landmarks / hot / chunk random."""
    b, h, nb, lm, hot = 2, 2, 3, 4, 7
    k = keys_with_a_big_channel((b, h, nb), seed=seed)
    v = torch.randn(b, h, nb, T, D, generator=gen(seed + 1))
    c = cfg(coeff_bits=bits, value_codec="identity", value_coeff_bits=4, key_zero_point=zero_point)
    starts = torch.arange(nb) * T + lm
    cold = compress_blocks(k, v, c, D, D, block_starts=starts)
    return state_around(cold, landmarks=lm, hot=hot, chunk=chunk, seed=seed + 2, key_space=key_space)


@pytest.mark.parametrize("zero_point", [False, True])
@pytest.mark.parametrize("key_space", ["post_rope", "pre_rope"])
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("chunk", [1, 2, 27])  # decode (scales never go on the scores), a few rows, prefill
def test_reference_matches_dense_attention_over_its_decompression(key_space, bits, chunk, zero_point):
    state = channel_state(bits, key_space, chunk, seed=10 * bits + chunk, zero_point=zero_point)
    assert (state.cold.key_offsets is not None) == zero_point
    q = torch.randn(2, 6, chunk, D, generator=gen(chunk))  # GQA: 3 query heads per KV head
    got = spectral_attention(q, state, None)
    want = dense_reference(q, state, None)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("zero_point", [False, True])
@pytest.mark.parametrize("key_space", ["post_rope", "pre_rope"])
@pytest.mark.parametrize("bits", [8, 4])
def test_decode_kernel_reads_per_channel_scales(key_space, bits, zero_point):
    """The Triton decode kernel (interpreter on CPU) on states compress_blocks wrote with the
    channel codec (with and without zero points): the same attention as the torch reference,
    decode and 2 speculative rows."""
    pytest.importorskip("triton")
    import os

    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    from spectralcache.attention.triton.decode import decode_attention

    for chunk in (1, 2):
        state = channel_state(bits, key_space, chunk, seed=5 + bits + chunk, zero_point=zero_point)
        q = torch.randn(2, 6, chunk, D, generator=gen(5 + chunk))
        got = decode_attention(q, state, None, None, None, block_t=16)
        want = spectral_attention(q, state, None)
        err = float((got - want).norm() / want.norm())
        assert err < 1e-5, f"relative error {err:.2e}"


def test_bytes_held_and_a_model_end_to_end():
    """Tiny Llama, 4-bit channel keys + 4-bit identity values: prefill, 8 greedy tokens; the
    cache holds packed int4 rows, one float16 scale per key channel and block, and the next
    token's logits stay close to DynamicCache's."""
    model = tiny_model("llama")
    torch.manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (1, 300))
    c = SpectralConfig(
        block_size=64, hot_size=16, landmarks=4, outliers_per_block=4, key_codec="channel",
        coeff_bits=4, value_codec="identity", value_coeff_bits=4,
    )  # fmt: skip
    cache = SpectralCache(model, c)
    with torch.no_grad():
        out = model(ids, past_key_values=cache, use_cache=True)
        ref = model(ids, past_key_values=DynamicCache(), use_cache=True)
    layer = cache.layers[0]
    st = layer.state()
    nb, d = st.cold.num_blocks, st.hot_keys.shape[-1]
    h = st.hot_keys.shape[1]
    assert nb >= 3 and st.cold.key_scales_per_channel
    assert st.cold.key_coeffs.dtype == torch.uint8 and st.cold.key_coeffs.shape[-1] == d // 2
    assert st.cold.key_scales.shape == (1, h, nb, 1, d)
    tiers = cache.memory_report()["layers"][0]["tiers"]
    assert tiers["bases"] == 0
    assert tiers["scales"] == h * nb * (d + 64) * 2  # key: one per channel; values: one per row
    a, b = out.logits[:, -1].float(), ref.logits[:, -1].float()
    assert (a - b).norm() / b.norm() < 0.1
    gen_ids = model.generate(ids, past_key_values=SpectralCache(model, c), max_new_tokens=8, do_sample=False)
    assert gen_ids.shape == (1, 308)
