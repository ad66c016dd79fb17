"""``key_zero_point``: per-channel zero points for channel-codec keys, on fresh random inputs.

The quantizer's guarantee with a zero point (every level used, ``|x - x̂| <= scale / 2``, no
clipping against the *stored* offset), why it exists (a channel far from zero keeps a fraction of
the symmetric error at the same bits), ``compress_blocks`` keeping the exact outliers out of the
channel ranges, the config's refusals and the bytes the offsets hold in a model's cache. The
torch reference and the decode kernel are checked against dense attention in
``test_channel_codec.py`` (parametrized over ``zero_point``)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.tiny_models import prefill_both, tiny_model

from spectralcache import SpectralCache, SpectralConfig
from spectralcache.cache.block import compress_blocks, reconstruct
from spectralcache.cache.layer import tokens_contiguous_stride
from spectralcache.linalg.quant import dequantize_rows, quantize_cols, unpack_int4

T, D = 32, 16


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def offset_keys(lead: tuple[int, ...], seed: int, rows: int = T, cols: int = D) -> torch.Tensor:
    """Keys whose channels sit at offsets up to 20x their spread (a slow RoPE channel barely
    turns over a block), spreads over two decades."""
    g = gen(seed)
    spread = torch.logspace(-1, 1, cols)
    offset = 20.0 * spread * (2 * torch.rand(cols, generator=g) - 1)
    return offset + spread * torch.randn(*lead, rows, cols, generator=g)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    bits=st.sampled_from([4, 8]),
    rows=st.integers(1, 40),
    cols=st.integers(1, 9),
    shift=st.floats(-1e4, 1e4, allow_nan=False),
    spread=st.floats(1e-3, 1e3),
)
def test_zero_point_bound_and_levels(seed, bits, rows, cols, shift, spread):
    x = shift + spread * torch.randn(2, rows, cols, generator=gen(seed))
    q = quantize_cols(x, bits, zero_point=True)
    assert q.offsets.shape == (2, 1, cols) and q.offsets.dtype == torch.float32
    assert q.scales.shape == (2, 1, cols) and q.scales.dtype == torch.float16
    ints = q.data if bits == 8 else unpack_int4(q.data, cols)
    lo, hi = (-8, 7) if bits == 4 else (-128, 127)
    assert int(ints.min()) >= lo and int(ints.max()) <= hi
    err = (dequantize_rows(q) - x).abs()
    # scale / 2 from rounding, plus float32 rounding of values up to |shift| + spread
    tol = q.scales.float() / 2 * (1 + 1e-5) + 4e-7 * (abs(shift) + 8 * spread)
    assert torch.all(err <= tol)


@pytest.mark.parametrize("bits", [4, 8])
def test_zero_point_uses_the_whole_range_and_constant_columns_are_exact(bits):
    x = torch.tensor([[1.0, 5.0], [3.0, 5.0], [9.0, 5.0]])
    q = quantize_cols(x, bits, zero_point=True)
    ints = q.data if bits == 8 else unpack_int4(q.data, 2)
    lo, hi = (-8, 7) if bits == 4 else (-128, 127)
    assert int(ints[0, 0]) == lo and int(ints[2, 0]) == hi  # min and max land on the end levels
    assert float(q.scales[0, 1]) == 0.0 and torch.all(dequantize_rows(q)[:, 1] == 5.0)
    with pytest.raises(ValueError, match="NaN or inf"):
        quantize_cols(torch.tensor([[1.0, float("inf")], [0.0, 1.0]]), bits, zero_point=True)


def test_zero_point_beats_symmetric_on_offset_channels():
    """The reason for the switch: a symmetric scale spans [-max|x|, max|x|], most of it empty
    for a channel far from zero; the zero point maps the channel's own range onto the levels."""
    k = offset_keys((8,), seed=1)
    sym = (dequantize_rows(quantize_cols(k, 4)) - k).norm()
    zp = (dequantize_rows(quantize_cols(k, 4, zero_point=True)) - k).norm()
    assert zp < 0.5 * sym


@pytest.mark.parametrize("bits", [4, 8])
def test_compress_blocks_offsets_with_the_outliers_left_out_of_the_range(bits):
    k = offset_keys((2, 3), seed=2)
    k[0, 1, 7, 5] = 500.0  # one token far out on channel 5: an outlier
    v = torch.randn(2, 3, T, D, generator=gen(3))
    c = SpectralConfig(
        block_size=T, hot_size=4, landmarks=2, outliers_per_block=3, key_codec="channel",
        value_codec="identity", coeff_bits=bits, key_zero_point=True,
    )  # fmt: skip
    blocks = compress_blocks(k, v, c, D, D)
    assert blocks.key_offsets.shape == (2, 3, 1, D) and blocks.key_offsets.dtype == torch.float32
    assert 7 in blocks.outlier_index[0, 1].tolist()
    others = torch.ones(T, dtype=torch.bool)
    others[blocks.outlier_index[0, 1]] = False
    kept = k[0, 1, others, 5]
    levels = 15 if bits == 4 else 255
    # channel 5's step is set by the kept tokens' range, not by the outlier's 500
    assert float(blocks.key_scales[0, 1, 0, 5]) <= float(kept.max() - kept.min()) / levels * 1.01
    rec_k, _ = reconstruct(blocks)
    low = (rec_k[0, 1, others] - k[0, 1, others]).abs()
    assert torch.all(low <= blocks.key_scales[0, 1, 0].float() / 2 * (1 + 1e-5) + 1e-5)
    torch.testing.assert_close(rec_k[0, 1, 7], k[0, 1, 7])  # served exactly
    # without the switch: no offsets, the symmetric layout as before
    plain = compress_blocks(k, v, c.replace(key_zero_point=False), D, D)
    assert plain.key_offsets is None
    rec_plain, _ = reconstruct(plain)
    assert (rec_k - k).norm() < 0.5 * (rec_plain - k).norm()


def test_config_refusals():
    with pytest.raises(ValueError, match="key_zero_point=True needs key_codec='channel'"):
        SpectralConfig(key_zero_point=True)  # low-rank keys have no per-channel range
    with pytest.raises(ValueError, match="coeff_bits 4 or 8"):
        SpectralConfig(key_codec="channel", coeff_bits=16, key_zero_point=True)
    with pytest.raises(TypeError, match="key_zero_point must be a bool"):
        SpectralConfig(key_codec="channel", key_zero_point=1)


def test_the_default_preset_has_zero_points_and_moving_off_channel_keys_drops_them():
    """Since stop 18 the default stores zero points; overriding its key codec (or 16-bit keys)
    without naming the switch turns them off instead of failing validation, while naming it
    keeps the refusal."""
    default = SpectralConfig.from_preset("default")
    assert default.key_zero_point and default.key_codec == "channel"
    assert SpectralConfig.from_preset("default", coeff_bits=8).key_zero_point
    low = SpectralConfig.from_preset("default", key_codec="lowrank", rank_keys=16)
    assert not low.key_zero_point and low.rank_keys == 16
    assert not default.replace(coeff_bits=16).key_zero_point
    assert not SpectralConfig.from_preset("default", key_zero_point=False).key_zero_point
    with pytest.raises(ValueError, match="key_zero_point=True needs key_codec='channel'"):
        default.replace(key_codec="identity", key_zero_point=True)
    assert not SpectralConfig.from_preset("lowrank").replace(key_codec="channel").key_zero_point


def test_bytes_held_and_a_model_end_to_end():
    """Tiny Llama with the default preset plus zero points: the cache holds one float32 offset
    per key channel and block on top of the scales, the next token's logits stay close to
    DynamicCache's, and generation runs through it."""
    model = tiny_model("llama")
    torch.manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (1, 300))
    c = SpectralConfig.from_preset("default").replace(
        block_size=64, hot_size=16, landmarks=4, key_zero_point=True
    )
    cache, a, b = prefill_both(model, c, ids)
    st_ = cache.layers[0].state()
    nb, h, d = st_.cold.num_blocks, st_.hot_keys.shape[1], st_.hot_keys.shape[-1]
    assert nb >= 3 and st_.cold.key_offsets.shape == (1, h, nb, 1, d)
    tiers = cache.memory_report()["layers"][0]["tiers"]
    t = st_.cold.block_size
    # per block and head: float16 key scale and float32 offset per channel, float16 value scale per row
    # (the rows padded to 16 tokens like the value rows: stop 23, padded_token_rows)
    assert tiers["scales"] == h * nb * (d * 2 + d * 4 + tokens_contiguous_stride(t) * 2)
    assert (a - b).norm() / b.norm() < 0.1
    gen_ids = model.generate(ids, past_key_values=SpectralCache(model, c), max_new_tokens=4, do_sample=False)
    assert gen_ids.shape == (1, 304)
