"""Compressed-space attention must equal plain attention over the decompressed K/V.

States are built here directly from random tensors (no cache involved), so these tests
pin down the reader side of the ``SpectralLayerState`` contract on its own: every tier,
both key spaces, every coefficient width, GQA, prefill / chunked prefill / decode, and
the three mask forms transformers passes (None, bool, additive float) with left padding.
"""

from __future__ import annotations

import pytest
import torch

from spectralcache.attention.reference import (
    dense_attention,
    dense_reference,
    reconstruct_dense_kv,
    spectral_attention,
)
from spectralcache.cache.state import ColdBlocks, SpectralLayerState


def _inv_freq(head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    return 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)


def _rope(keys: torch.Tensor, block_starts: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """Rotate-half RoPE of pre-RoPE block keys [B, H, nb, T, D] at their absolute positions."""
    d = keys.shape[-1]
    t = keys.shape[-2]
    inv = _inv_freq(d, theta).to(keys.device)
    pos = (block_starts[:, None].to(keys.device) + torch.arange(t, device=keys.device)).float()  # [nb, T]
    ang = pos[..., None] * inv  # [nb, T, D/2]
    cos = torch.cat([ang.cos(), ang.cos()], -1)
    sin = torch.cat([ang.sin(), ang.sin()], -1)
    x1, x2 = keys[..., : d // 2], keys[..., d // 2 :]
    rot = torch.cat([-x2, x1], -1)
    return (keys.float() * cos + rot.float() * sin).to(keys.dtype)


def _coeffs(g: torch.Generator, shape: tuple[int, ...], bits: int, dtype: torch.dtype):
    if bits == 16:
        return torch.randn(shape, generator=g).to(dtype), None
    scales = (torch.rand((*shape[:-1], 1), generator=g) * 0.05 + 0.01).half()
    if bits == 8:
        return torch.randint(-127, 128, shape, generator=g, dtype=torch.int8), scales
    from spectralcache.linalg import quant

    q = quant.quantize_rows(torch.randn(shape, generator=g), bits=4)
    return q.data, q.scales


def make_state(
    *,
    batch: int = 2,
    kv_heads: int = 2,
    head_dim: int = 32,
    landmarks: int = 4,
    block_size: int = 16,
    blocks: int = 3,
    outliers: int = 3,
    hot: int = 7,
    chunk: int | None = 1,
    key_space: str = "post_rope",
    bits: int = 16,
    rank_keys: int = 8,
    rank_values: int = 12,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    identity_keys: bool = False,
    identity_values: bool = False,
    value_bits: int | None = None,
) -> SpectralLayerState:
    """A random state: landmarks | blocks | hot, with the last ``chunk`` tokens also as the chunk."""
    g = torch.Generator().manual_seed(seed)
    b, h, d, t, nb = batch, kv_heads, head_dim, block_size, blocks

    def rn(*shape):
        return torch.randn(shape, generator=g).to(dtype)

    hot_start = landmarks + nb * t
    seq_len = hot_start + hot
    cold = None
    if identity_keys:  # identity codec: no basis, the coefficient rows are the keys
        rank_keys = d
    if identity_values:
        rank_values = d
    if nb:
        kc, ks = _coeffs(g, (b, h, nb, t, rank_keys), bits, dtype)
        vc, vs = _coeffs(g, (b, h, nb, t, rank_values), bits if value_bits is None else value_bits, dtype)
        basis_dtype = dtype if bits == 16 else torch.float16
        cold = ColdBlocks(
            key_coeffs=kc,
            key_scales=ks,
            key_basis=(torch.randn(b, h, nb, rank_keys, d, generator=g) / rank_keys**0.5).to(basis_dtype),
            value_coeffs=vc,
            value_scales=vs,
            value_basis=(torch.randn(b, h, nb, rank_values, d, generator=g) / rank_values**0.5).to(
                basis_dtype
            ),
            outlier_keys=rn(b, h, nb, outliers, d) * 2,
            outlier_values=rn(b, h, nb, outliers, d),
            outlier_index=torch.rand(b, h, nb, t, generator=g).argsort(-1)[..., :outliers].contiguous(),
            block_starts=torch.arange(nb) * t + landmarks,
            block_size=t,
            coeff_bits=bits,
            rank_keys=rank_keys,
            rank_values=rank_values,
            value_coeff_bits=value_bits,
        )
        if identity_keys:
            cold.key_basis = None
        if identity_values:
            cold.value_basis = None
    chunk_keys = chunk_values = None
    chunk_start = seq_len
    if chunk is not None:
        chunk_start = seq_len - chunk
        chunk_keys, chunk_values = rn(b, h, chunk, d), rn(b, h, chunk, d)
    return SpectralLayerState(
        layer_idx=0,
        seq_len=seq_len,
        landmark_keys=rn(b, h, landmarks, d),
        landmark_values=rn(b, h, landmarks, d),
        cold=cold,
        hot_keys=rn(b, h, hot, d),
        hot_values=rn(b, h, hot, d),
        hot_start=hot_start,
        chunk_keys=chunk_keys,
        chunk_values=chunk_values,
        chunk_start=chunk_start,
        key_space=key_space,
        rope_inv_freq=_inv_freq(head_dim) if key_space == "pre_rope" else None,
    )


def padded_causal_mask(batch: int, q_len: int, seq_len: int, pads: list[int]) -> torch.Tensor:
    """transformers-style bool mask [B, 1, q, kv]: causal by cache index, left padding per row."""
    q_pos = torch.arange(seq_len - q_len, seq_len)
    kv = torch.arange(seq_len)
    causal = kv[None, :] <= q_pos[:, None]
    not_pad = kv[None, :] >= torch.tensor(pads)[:, None]  # [B, kv]
    return (causal[None] & not_pad[:, None, :])[:, None]


def _query(state: SpectralLayerState, q_heads: int, q_len: int, seed: int = 1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    b, _, _, d = state.hot_keys.shape
    return torch.randn(b, q_heads, q_len, d, generator=g).to(dtype)


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a.float(), b.float(), rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("key_space", ["post_rope", "pre_rope"])
@pytest.mark.parametrize("bits", [16, 8, 4])
@pytest.mark.parametrize("phase", ["decode", "prefill_chunk", "full_prefill", "no_chunk"])
def test_matches_dense_reference(key_space: str, bits: int, phase: str) -> None:
    chunk = {"decode": 1, "prefill_chunk": 27, "full_prefill": None, "no_chunk": None}[phase]
    state = make_state(key_space=key_space, bits=bits, chunk=chunk, seed=bits)
    if phase == "full_prefill":  # one forward call: the whole cache is the chunk
        state = make_state(key_space=key_space, bits=bits, chunk=state.seq_len, seed=bits)
    q_len = 1 if chunk is None else chunk
    query = _query(state, q_heads=6, q_len=q_len)  # GQA: 3 query heads per KV head
    got = spectral_attention(query, state, None)
    want = dense_reference(query, state, None)
    assert got.shape == query.shape
    _close(got, want)


@pytest.mark.parametrize("key_space", ["post_rope", "pre_rope"])
@pytest.mark.parametrize("bits", [16, 8, 4])
@pytest.mark.parametrize("codecs", [(True, False), (False, True), (True, True)])
@pytest.mark.parametrize("phase", ["decode", "prefill_chunk"])
def test_identity_codec_matches_dense_reference(key_space: str, bits: int, codecs, phase: str) -> None:
    """key_basis / value_basis None (identity codec): the fast path skips the basis product."""
    chunk = 1 if phase == "decode" else 27
    state = make_state(
        key_space=key_space,
        bits=bits,
        chunk=chunk,
        seed=bits + 5,
        identity_keys=codecs[0],
        identity_values=codecs[1],
    )
    assert (state.cold.key_basis is None) == codecs[0] and (state.cold.value_basis is None) == codecs[1]
    query = _query(state, q_heads=6, q_len=chunk)  # GQA: 3 query heads per KV head
    got = spectral_attention(query, state, None)
    want = dense_reference(query, state, None)
    _close(got, want)
    # the dense reference really reads the rows as keys/values: compare with a hand decode
    _, values = reconstruct_dense_kv(state)
    cold = state.cold
    start = int(cold.block_starts[0])
    o = set(cold.outlier_index[0, 0, 0].tolist())
    row = next(i for i in range(cold.block_size) if i not in o)
    c = cold.value_coeffs[0, 0, 0, row : row + 1]
    if bits == 4:
        from spectralcache.linalg import quant

        c = quant.unpack_int4(c, cold.rank_values)
    v = c.float() * (1.0 if cold.value_scales is None else cold.value_scales[0, 0, 0, row].float())
    if cold.value_basis is not None:
        v = v @ cold.value_basis[0, 0, 0].float()
    torch.testing.assert_close(values[0, 0, start + row], v[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("key_space", ["post_rope", "pre_rope"])
@pytest.mark.parametrize(("bits", "value_bits"), [(8, 4), (4, 8), (16, 8)])
@pytest.mark.parametrize("phase", ["decode", "prefill_chunk"])
def test_value_bits_differ_from_key_bits(key_space: str, bits: int, value_bits: int, phase: str) -> None:
    chunk = 1 if phase == "decode" else 27
    for identity in (False, True):
        state = make_state(
            key_space=key_space,
            bits=bits,
            value_bits=value_bits,
            chunk=chunk,
            seed=bits + value_bits,
            identity_keys=identity,
            identity_values=identity,
        )
        assert state.cold.value_bits == value_bits
        query = _query(state, q_heads=6, q_len=chunk)
        _close(spectral_attention(query, state, None), dense_reference(query, state, None))


@pytest.mark.parametrize("key_space", ["post_rope", "pre_rope"])
@pytest.mark.parametrize("mask_kind", ["bool", "float"])
def test_left_padding_masks(key_space: str, mask_kind: str) -> None:
    state = make_state(batch=3, key_space=key_space, bits=8, chunk=5, seed=3)
    seq = state.seq_len
    # row 1 pads into the first block, row 2 pads past the landmarks only
    mask = padded_causal_mask(3, 5, seq, pads=[0, 9, 2])
    if mask_kind == "float":
        mask = torch.where(mask, 0.0, torch.finfo(torch.float32).min)
    query = _query(state, q_heads=4, q_len=5)
    got = spectral_attention(query, state, mask)
    _close(got, dense_reference(query, state, mask))
    # the padding really changes the result (the mask columns are not ignored)
    unpadded = spectral_attention(query, state, padded_causal_mask(3, 5, seq, pads=[0, 0, 0]))
    assert not torch.allclose(got[1], unpadded[1])
    torch.testing.assert_close(got[0], unpadded[0])


def test_mask_kv_len_longer_than_cache_is_cut() -> None:
    state = make_state(chunk=1)
    mask = torch.ones(2, 1, 1, state.seq_len + 5, dtype=torch.bool)
    mask[..., state.seq_len :] = False
    query = _query(state, 4, 1)
    _close(spectral_attention(query, state, mask), dense_reference(query, state, None))


def test_fully_masked_rows_give_zeros_not_nan() -> None:
    state = make_state(chunk=3, bits=8)
    mask = padded_causal_mask(2, 3, state.seq_len, pads=[0, 0])
    mask[1, :, 0] = False  # a padding query: sees nothing
    query = _query(state, 4, 3)
    out = spectral_attention(query, state, mask)
    assert torch.isfinite(out).all()
    assert torch.all(out[1, :, 0] == 0)
    _close(out, dense_reference(query, state, mask))


@pytest.mark.parametrize("key_space", ["post_rope", "pre_rope"])
def test_softcap_and_scaling(key_space: str) -> None:
    state = make_state(key_space=key_space, bits=8, chunk=4)
    query = _query(state, 4, 4) * 3
    got = spectral_attention(query, state, None, scaling=0.3, softcap=5.0)
    _close(got, dense_reference(query, state, None, scaling=0.3, softcap=5.0))
    plain = spectral_attention(query, state, None, scaling=0.3)
    assert not torch.allclose(got, plain)


def test_outlier_rows_of_blocks_are_not_attended() -> None:
    """A huge low-rank row at an outlier position must not leak: only the exact copy counts."""
    state = make_state(bits=16, chunk=1)
    query = _query(state, 4, 1)
    base = spectral_attention(query, state, None)
    cold = state.cold
    oi = cold.outlier_index[..., None].expand(*cold.outlier_index.shape, cold.rank_keys)
    cold.key_coeffs = cold.key_coeffs.scatter(3, oi, torch.full_like(cold.key_coeffs, 1e4))
    oi_v = cold.outlier_index[..., None].expand(*cold.outlier_index.shape, cold.rank_values)
    cold.value_coeffs = cold.value_coeffs.scatter(3, oi_v, torch.full_like(cold.value_coeffs, 1e4))
    torch.testing.assert_close(spectral_attention(query, state, None), base)


def test_chunk_overrides_tiers() -> None:
    """Tier copies of tokens that are also in the chunk are ignored (chunk is exact)."""
    state = make_state(chunk=20, bits=16)  # chunk starts inside the last block
    query = _query(state, 4, 20)
    base = spectral_attention(query, state, None)
    state.hot_keys = state.hot_keys * 100  # hot lies entirely inside the chunk
    torch.testing.assert_close(spectral_attention(query, state, None), base)


def test_only_landmarks_and_hot() -> None:
    state = make_state(blocks=0, chunk=2)
    query = _query(state, 2, 2)
    _close(spectral_attention(query, state, None), dense_reference(query, state, None))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_are_finite_and_close(dtype: torch.dtype) -> None:
    state32 = make_state(bits=8, chunk=3, seed=5)
    state16 = make_state(bits=8, chunk=3, seed=5, dtype=dtype)
    query = _query(state32, 4, 3) * 4  # large logits
    out16 = spectral_attention(query.to(dtype), state16, None)
    assert out16.dtype == dtype
    assert torch.isfinite(out16).all()
    # fp32 math on the same half-precision inputs: only the output rounding differs
    ref = dense_reference(query.to(dtype).float(), state16, None)
    torch.testing.assert_close(out16.float(), ref, rtol=2e-2, atol=2e-2)


def test_pre_rope_tiles_give_same_result() -> None:
    state = make_state(key_space="pre_rope", blocks=5, bits=8)
    query = _query(state, 4, 1)
    one = spectral_attention(query, state, None)
    tiled = spectral_attention(query, state, None, tile_tokens=32)  # 2 blocks per tile
    torch.testing.assert_close(one, tiled, rtol=1e-5, atol=1e-6)


def test_dense_attention_matches_sdpa() -> None:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 5, 16, generator=g)
    k = torch.randn(2, 2, 9, 16, generator=g)
    v = torch.randn(2, 2, 9, 16, generator=g)
    mask = padded_causal_mask(2, 5, 9, pads=[0, 2])
    want = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=mask
    )
    _close(dense_attention(q, k, v, mask), want)


@pytest.mark.parametrize(
    ("change", "error", "text"),
    [
        (lambda q, m: (q[:, :3], m), ValueError, "multiple"),
        (lambda q, m: (q[..., :16], m), ValueError, "head_dim"),
        (lambda q, m: (q[:1], m), ValueError, "batch"),
        (lambda q, m: (q, m[..., :5]), ValueError, "covers"),
        (lambda q, m: (q, m[:, :, :, None]), ValueError, "4D"),
        (lambda q, m: (q, m.long()), TypeError, "bool or floating"),
        (lambda q, m: (q.long(), m), TypeError, "floating"),
    ],
)
def test_bad_input_is_a_clear_error(change, error, text) -> None:
    state = make_state(chunk=1)
    query = _query(state, 4, 1)
    mask = torch.ones(2, 1, 1, state.seq_len, dtype=torch.bool)
    query, mask = change(query, mask)
    with pytest.raises(error, match=text):
        spectral_attention(query, state, mask)


@pytest.mark.parametrize("bits", [8, 4])
def test_coefficient_decoding_matches_the_quantizer(bits: int) -> None:
    """Attention reads int8 / packed int4 (odd rank) exactly as linalg.quant wrote them."""
    from spectralcache.attention.reference import reconstruct_dense_kv
    from spectralcache.linalg import quant

    state = make_state(kv_heads=3, blocks=1, block_size=16, rank_keys=11, outliers=0, bits=bits)
    cold = state.cold
    q = quant.quantize_rows(
        torch.randn(2, 3, 1, 16, 11, generator=torch.Generator().manual_seed(bits)), bits=bits
    )
    cold.key_coeffs, cold.key_scales = q.data, q.scales
    keys, _ = reconstruct_dense_kv(state)
    want = quant.dequantize_rows(q) @ cold.key_basis.float()
    start = int(cold.block_starts[0])
    torch.testing.assert_close(keys[:, :, start : start + 16], want[:, :, 0], rtol=1e-5, atol=1e-5)
    query = _query(state, 6, 1)
    _close(spectral_attention(query, state, None), dense_reference(query, state, None))


@pytest.mark.parametrize("masked", [False, True])
def test_query_tiles_give_same_result(masked: bool) -> None:
    """A long prefill split into query tiles equals the one-shot computation."""
    state = make_state(key_space="pre_rope", bits=8, chunk=30, seed=4)
    query = _query(state, 4, 30)
    mask = padded_causal_mask(2, 30, state.seq_len, pads=[0, 5]) if masked else None
    one = spectral_attention(query, state, mask)
    tiled = spectral_attention(query, state, mask, max_score_elements=2 * 4 * state.seq_len * 7)  # 7 rows
    torch.testing.assert_close(one, tiled, rtol=1e-5, atol=1e-6)
    _close(tiled, dense_reference(query, state, mask))


def test_rope_rotation_matches_an_independent_rope() -> None:
    """The rotation attention applies to pre-RoPE blocks (cache.rope.rotate_block_keys with the
    state's inv_freq) is plain rotate-half RoPE at the cache index, as written out here."""
    from spectralcache.cache.rope import rotate_block_keys

    g = torch.Generator().manual_seed(0)
    keys = torch.randn(2, 3, 4, 16, 32, generator=g)
    starts = torch.tensor([4, 20, 36, 900])
    torch.testing.assert_close(rotate_block_keys(keys, starts, _inv_freq(32)), _rope(keys, starts))
