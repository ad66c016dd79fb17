"""``key_group_size``: per-channel key scales (and zero points) for each group of rows of a block.

The quantizer's guarantee per group (``|x - x̂| <= scale / 2`` with the row's own group scale, no
clipping, every level with zero points), the group layout (``G = ceil(T / g)`` groups of ``L =
ceil(T / G)`` rows, the last shorter), why it exists (channels that drift over a block keep a
fraction of the one-range error), ``compress_blocks`` keeping exact outliers out of their own
group's range, the torch reference against dense attention over keys rebuilt *here* group by
group, the refusals (config, decode kernel, graphed decoder) and the bytes a model's cache holds."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.layer_states import state_around
from tests.tiny_models import prefill_both, tiny_model

from spectralcache import SpectralCache, SpectralConfig
from spectralcache.attention.reference import dense_attention, dense_reference, spectral_attention
from spectralcache.cache.block import compress_blocks, reconstruct
from spectralcache.cache.layer import tokens_contiguous_stride
from spectralcache.cache.state import SpectralLayerState
from spectralcache.linalg.quant import dequantize_rows, expand_col_groups, quantize_cols, unpack_int4

T, D = 40, 16  # 40 rows in groups of 16 -> 3 groups of 14 rows, the last one 12


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def drifting_keys(lead: tuple[int, ...], seed: int, rows: int = T, cols: int = D) -> torch.Tensor:
    """Keys whose channels sit far from zero and drift across the block (a RoPE channel turning
    slowly over the block's tokens), spreads over two decades."""
    g = gen(seed)
    spread = torch.logspace(-1, 1, cols)
    offset = 10.0 * spread * (2 * torch.rand(cols, generator=g) - 1)
    drift = 8.0 * spread * torch.linspace(-1, 1, rows).unsqueeze(-1)
    return offset + drift + spread * torch.randn(*lead, rows, cols, generator=g)


def by_group(ints: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None) -> torch.Tensor:
    """Rows rebuilt group by group with an explicit loop (independent of ``expand_col_groups``)."""
    rows, groups = ints.shape[-2], scales.shape[-2]
    length = -(-rows // groups)
    out = torch.empty(ints.shape, dtype=torch.float32)
    for g in range(groups):
        sl = slice(g * length, min((g + 1) * length, rows))
        part = ints[..., sl, :].float() * scales[..., g : g + 1, :].float()
        out[..., sl, :] = part if offsets is None else part + offsets[..., g : g + 1, :].float()
    return out


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    bits=st.sampled_from([4, 8]),
    zero_point=st.booleans(),
    rows=st.integers(1, 60),
    cols=st.integers(1, 9),
    group=st.integers(1, 25),
    shift=st.floats(-1e3, 1e3, allow_nan=False),
    spread=st.floats(1e-3, 1e3),
)
def test_grouped_bound_layout_and_levels(seed, bits, zero_point, rows, cols, group, shift, spread):
    x = shift + spread * torch.randn(2, rows, cols, generator=gen(seed))
    q = quantize_cols(x, bits, zero_point=zero_point, group_rows=group)
    groups = -(-rows // group) if rows > group else 1
    assert q.scales.shape == (2, groups, cols) and q.scales.dtype == torch.float16
    assert q.data.shape[-2] == rows
    assert (q.offsets is None) != zero_point
    if zero_point:
        assert q.offsets.shape == (2, groups, cols) and q.offsets.dtype == torch.float32
    ints = q.data if bits == 8 else unpack_int4(q.data, cols)
    lo, hi = (
        ((-8, 7) if bits == 4 else (-128, 127)) if zero_point else ((-7, 7) if bits == 4 else (-127, 127))
    )
    assert int(ints.min()) >= lo and int(ints.max()) <= hi
    rebuilt = by_group(ints, q.scales, q.offsets)
    torch.testing.assert_close(dequantize_rows(q), rebuilt, rtol=0, atol=0)
    step = by_group(torch.ones_like(ints), q.scales, None)  # each row's own group scale
    tol = step / 2 * (1 + 1e-5) + 4e-7 * (abs(shift) + 8 * spread)
    assert torch.all((rebuilt - x).abs() <= tol)
    if groups == 1:  # one group is the ungrouped layout, bit for bit
        plain = quantize_cols(x, bits, zero_point=zero_point)
        assert torch.equal(plain.data, q.data) and torch.equal(plain.scales, q.scales)


def test_expand_col_groups_maps_rows_to_their_group():
    s = torch.tensor([[1.0, 10.0], [2.0, 20.0], [3.0, 30.0]])  # 3 groups of 2 columns
    got = expand_col_groups(s, 7)  # L = ceil(7 / 3) = 3: rows 0-2, 3-5, 6
    assert got[:, 0].tolist() == [1, 1, 1, 2, 2, 2, 3]
    one, per_row = torch.ones(1, 2), torch.ones(7, 1)
    assert expand_col_groups(one, 7) is one and expand_col_groups(per_row, 7) is per_row
    assert expand_col_groups(None, 7) is None
    with pytest.raises(ValueError, match="group_rows must be >= 1"):
        quantize_cols(torch.randn(4, 3), 8, group_rows=0)


@pytest.mark.parametrize(("zero_point", "bound"), [(False, 0.8), (True, 0.45)])
def test_groups_follow_channels_that_drift_over_the_block(zero_point, bound):
    """512 rows, 4 groups of 128, int4: a group's range covers a quarter of the drift (measured
    0.70-0.73x the one-range error symmetric, where the offset still sets the range; 0.38x with
    zero points, which follow the drift)."""
    k = drifting_keys((8,), seed=1, rows=512)
    one = dequantize_rows(quantize_cols(k, 4, zero_point=zero_point))
    grouped = dequantize_rows(quantize_cols(k, 4, zero_point=zero_point, group_rows=128))
    assert (grouped - k).norm() < bound * (one - k).norm()


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("zero_point", [False, True])
def test_compress_blocks_groups_with_outliers_left_out_of_their_group(bits, zero_point):
    k = drifting_keys((2, 3), seed=2)
    k[0, 1, 7, 5] = 500.0  # one token far out on channel 5, in group 0: an outlier
    v = torch.randn(2, 3, T, D, generator=gen(3))
    c = SpectralConfig(
        block_size=T, hot_size=4, landmarks=2, outliers_per_block=3, key_codec="channel",
        value_codec="identity", coeff_bits=bits, key_zero_point=zero_point, key_group_size=16,
    )  # fmt: skip
    blocks = compress_blocks(k, v, c, D, D)
    assert blocks.key_scales.shape == (2, 3, 3, D) and blocks.key_scales_per_channel
    assert (blocks.key_offsets is not None) == zero_point
    if zero_point:
        assert blocks.key_offsets.shape == (2, 3, 3, D)
    assert 7 in blocks.outlier_index[0, 1].tolist()
    kept = torch.ones(T, dtype=torch.bool)
    kept[blocks.outlier_index[0, 1]] = False
    group0 = kept.clone()
    group0[14:] = False
    ch = k[0, 1, group0, 5]
    levels = (15 if bits == 4 else 255) if zero_point else (14 if bits == 4 else 254)
    width = float(ch.max() - ch.min()) if zero_point else 2 * float(ch.abs().max())
    # channel 5's step in group 0 is set by that group's kept tokens, not by the outlier's 500
    assert float(blocks.key_scales[0, 1, 0, 5]) <= width / levels * 1.01
    ints = blocks.key_coeffs if bits == 8 else unpack_int4(blocks.key_coeffs, D)
    manual = by_group(ints, blocks.key_scales, blocks.key_offsets)
    rec_k, _ = reconstruct(blocks)
    torch.testing.assert_close(rec_k[0, 1, kept], manual[0, 1, kept], rtol=0, atol=0)
    step = by_group(torch.ones_like(ints), blocks.key_scales, None)
    assert torch.all((rec_k[0, 1, kept] - k[0, 1, kept]).abs() <= step[0, 1, kept] / 2 * (1 + 1e-5) + 1e-4)
    torch.testing.assert_close(rec_k[0, 1, 7], k[0, 1, 7])  # served exactly
    ungrouped = compress_blocks(k, v, c.replace(key_group_size=None), D, D)
    assert ungrouped.key_scales.shape == (2, 3, 1, D)
    rec_one, _ = reconstruct(ungrouped)
    # 3 groups each covering a third of the drift (the symmetric ranges still hold the offsets)
    assert (rec_k - k).norm() < (0.5 if zero_point else 0.8) * (rec_one - k).norm()


def grouped_state(bits: int, key_space: str, chunk: int, seed: int, zero_point: bool) -> SpectralLayerState:
    b, h, nb, lm, hot = 2, 2, 3, 4, 7
    k = drifting_keys((b, h, nb), seed=seed)
    v = torch.randn(b, h, nb, T, D, generator=gen(seed + 1))
    c = SpectralConfig(
        block_size=T, hot_size=4, landmarks=2, outliers_per_block=2, key_codec="channel",
        value_codec="identity", coeff_bits=bits, value_coeff_bits=4, key_zero_point=zero_point,
        key_group_size=16,
    )  # fmt: skip
    starts = torch.arange(nb) * T + lm
    cold = compress_blocks(k, v, c, D, D, block_starts=starts)
    return state_around(cold, landmarks=lm, hot=hot, chunk=chunk, seed=seed + 2, key_space=key_space)


@pytest.mark.parametrize("zero_point", [False, True])
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("chunk", [1, 5])  # decode, a few rows (prefill: the pre-RoPE test)
def test_reference_matches_dense_attention_over_keys_rebuilt_by_group(bits, chunk, zero_point):
    """Post-RoPE: the reference against plain dense attention over K/V rebuilt here group by
    group (outliers written over their rows), not through the library's own decompression."""
    st_ = grouped_state(bits, "post_rope", chunk, seed=10 * bits + chunk, zero_point=zero_point)
    cold = st_.cold
    kints = cold.key_coeffs if bits == 8 else unpack_int4(cold.key_coeffs, D)
    keys = by_group(kints, cold.key_scales, cold.key_offsets)
    vals = unpack_int4(cold.value_coeffs, D).float() * cold.value_scales.float()
    idx = cold.outlier_index.unsqueeze(-1).expand(*cold.outlier_index.shape, D)
    keys = keys.scatter(-2, idx, cold.outlier_keys.float())
    vals = vals.scatter(-2, idx, cold.outlier_values.float())
    b, h = keys.shape[:2]
    hot = st_.chunk_start - st_.hot_start  # the tiers hold indices < chunk_start, the chunk the rest
    dense_k = torch.cat(
        [st_.landmark_keys, keys.reshape(b, h, -1, D), st_.hot_keys[:, :, :hot], st_.chunk_keys], dim=2
    ).float()
    dense_v = torch.cat(
        [st_.landmark_values, vals.reshape(b, h, -1, D), st_.hot_values[:, :, :hot], st_.chunk_values], dim=2
    ).float()
    assert dense_k.shape[2] == st_.seq_len
    q = torch.randn(2, 6, chunk, D, generator=gen(chunk))  # GQA: 3 query heads per KV head
    n = dense_k.shape[2]
    causal = torch.ones(chunk, n, dtype=torch.bool).tril(n - chunk)
    want = dense_attention(q, dense_k, dense_v, causal.view(1, 1, chunk, n))
    got = spectral_attention(q, st_, None)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("zero_point", [False, True])
def test_reference_matches_its_dense_oracle_pre_rope(zero_point):
    for chunk in (1, 27):
        st_ = grouped_state(4, "pre_rope", chunk, seed=7 + chunk, zero_point=zero_point)
        q = torch.randn(2, 6, chunk, D, generator=gen(chunk))
        torch.testing.assert_close(
            spectral_attention(q, st_, None), dense_reference(q, st_, None), rtol=1e-4, atol=2e-5
        )


def test_config_refusals_and_replace():
    with pytest.raises(ValueError, match="key_group_size needs key_codec='channel'"):
        SpectralConfig(key_group_size=128)  # low-rank keys have no per-channel ranges
    with pytest.raises(ValueError, match="coeff_bits 4 or 8"):
        SpectralConfig(key_codec="channel", coeff_bits=16, key_group_size=128)
    with pytest.raises(ValueError, match="key_group_size must be >= 2"):
        SpectralConfig(key_codec="channel", key_group_size=1)
    with pytest.raises(TypeError, match="key_group_size must be an int"):
        SpectralConfig(key_codec="channel", key_group_size=128.0)
    grouped = SpectralConfig.from_preset("default", key_group_size=128)
    assert grouped.key_group_size == 128 and SpectralConfig.from_preset("default").key_group_size is None
    assert grouped.replace(key_codec="lowrank").key_group_size is None  # moves off channel keys
    with pytest.raises(ValueError, match="key_group_size needs"):
        grouped.replace(key_codec="lowrank", key_group_size=128)


def test_decode_kernel_and_graphed_decoder_refuse_groups():
    pytest.importorskip("triton")
    import os

    from spectralcache.integrations.graphed import GraphedDecoder

    model = tiny_model("llama")
    c = SpectralConfig.from_preset("default", block_size=32, hot_size=8, landmarks=2, key_group_size=16)
    cache = SpectralCache(model, c)
    with pytest.raises(ValueError, match="key_group_size"):
        GraphedDecoder(model, cache, mode="static")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the kernel's own refusal needs CUDA or TRITON_INTERPRET=1")
    from spectralcache.attention.triton.decode import decode_attention
    from spectralcache.attention.triton.dispatch import attend

    st_ = grouped_state(4, "post_rope", 1, seed=3, zero_point=True)
    q = torch.randn(2, 6, 1, D, generator=gen(1))
    with pytest.raises(ValueError, match="3 groups"):
        decode_attention(q, st_, None, None, None)
    with pytest.raises(ValueError, match="key_group_size"):
        attend(q, st_, None, None, None, backend="triton")


def test_bytes_held_and_a_model_end_to_end():
    """Tiny Llama, the default preset with 2 key groups per 64-token block: the cache holds a
    float16 scale and a float32 zero point per key channel and group, the next token's logits
    stay close to DynamicCache's (closer than one range per block), and generation runs."""
    model = tiny_model("llama")
    torch.manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (1, 300))
    one = SpectralConfig.from_preset("default", block_size=64, hot_size=16, landmarks=4)
    c = one.replace(key_group_size=32)
    cache, a, b = prefill_both(model, c, ids)
    st_ = cache.layers[0].state()
    nb, h, d = st_.cold.num_blocks, st_.hot_keys.shape[1], st_.hot_keys.shape[-1]
    t = st_.cold.block_size
    groups = -(-t // 32)
    assert nb >= 3 and st_.cold.key_scales.shape == (1, h, nb, groups, d)
    assert st_.cold.key_offsets.shape == (1, h, nb, groups, d)
    tiers = cache.memory_report()["layers"][0]["tiers"]
    # the value scales' blocks are padded to 16 tokens like their rows (stop 23: padded_token_rows)
    assert tiers["scales"] == h * nb * (groups * d * (2 + 4) + tokens_contiguous_stride(t) * 2)
    assert (a - b).norm() / b.norm() < 0.1
    gen_ids = model.generate(ids, past_key_values=SpectralCache(model, c), max_new_tokens=4, do_sample=False)
    assert gen_ids.shape == (1, 304)
