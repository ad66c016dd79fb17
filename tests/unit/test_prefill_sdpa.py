"""Prefill at SDPA speed: the exact chunk through a fused SDPA kernel, merged by log-sum-exp.

What is pinned down here (CPU always; CUDA too when a GPU is present):

* ``sdpa_with_lse``: the aten kernels' outputs *and* log-sum-exps equal a float64 dense
  reference (natural log of the scaled, masked scores), for GQA, causal, padding masks;
* ``merge_partials``: splitting the keys arbitrarily into two parts and merging equals
  attention over all of them (hypothesis), empty parts included, never NaN;
* ``spectral_attention`` with the chunk through SDPA equals the dense reference over an
  already compressed cache (chunked prefill, decode, first prefill), for both key spaces,
  both codecs, every coefficient width, GQA 1/4/8, left padding, and its returned LSE;
* softcap (SDPA has none) stays on the torch path; the decode path reads no tensor on the host.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.unit.test_attention_reference import make_state, padded_causal_mask

import spectralcache.attention.reference as ref
from spectralcache.attention.reference import (
    dense_reference,
    merge_partials,
    reconstruct_dense_kv,
    sdpa_with_lse,
    spectral_attention,
)
from spectralcache.cache.state import ColdBlocks, SpectralLayerState

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _to(state: SpectralLayerState, device: str, dtype: torch.dtype | None = None) -> SpectralLayerState:
    """The same state on ``device`` (exact tiers cast to ``dtype`` when given)."""

    def mv(x, cast=False):
        if not isinstance(x, torch.Tensor):
            return x
        x = x.to(device)
        return x.to(dtype) if cast and dtype is not None and x.is_floating_point() else x

    fields = {}
    for name, value in vars(state).items():
        if isinstance(value, ColdBlocks):
            cold = {k: mv(v) for k, v in vars(value).items()}
            cold["outlier_keys"] = mv(value.outlier_keys, True)
            cold["outlier_values"] = mv(value.outlier_values, True)
            fields[name] = ColdBlocks(**cold)
        elif name in (
            "landmark_keys",
            "landmark_values",
            "hot_keys",
            "hot_values",
            "chunk_keys",
            "chunk_values",
        ):
            fields[name] = mv(value, True)
        else:
            fields[name] = mv(value)
    return SpectralLayerState(**fields)


def _query(state: SpectralLayerState, q_heads: int, q_len: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    b, _, _, d = state.hot_keys.shape
    return torch.randn(b, q_heads, q_len, d, generator=g)


def _dense64(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    keep: torch.Tensor,
    scale: float,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 attention and natural-log LSE; ``keep`` [B|1, 1, q, n] bool; empty rows -> (0, -inf)."""
    groups = query.shape[1] // keys.shape[1]
    k = keys.double().repeat_interleave(groups, 1)
    v = values.double().repeat_interleave(groups, 1)
    s = query.double() @ k.transpose(-1, -2) * scale
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    s = s.masked_fill(~keep, -math.inf)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - torch.where(torch.isfinite(lse), lse, 0.0)[..., None])
    return p @ v, lse


def _keep_from(mask: torch.Tensor | None, q_len: int, kv_len: int) -> torch.Tensor:
    if mask is not None:
        return mask[..., :kv_len]
    q_pos = torch.arange(kv_len - q_len, kv_len)
    return (torch.arange(kv_len)[None, :] <= q_pos[:, None])[None, None]


def _state_lse(query, state, mask, scale, softcap=None):
    keys, values = reconstruct_dense_kv(state)
    return _dense64(
        query.cpu(), keys.cpu(), values.cpu(), _keep_from(mask, query.shape[2], state.seq_len), scale, softcap
    )


# --------------------------------------------------------------------------- sdpa_with_lse


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("groups", [1, 4, 8])
@pytest.mark.parametrize("case", ["causal", "padded", "suffix", "full"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_sdpa_lse_matches_float64(device: str, groups: int, case: str, dtype: torch.dtype) -> None:
    """The aten kernels' LSE: natural log, of the *scaled* scores, per (batch, query head, row)."""
    if device == "cpu" and dtype == torch.float16:
        pytest.skip("fp16 SDPA on CPU is not a configuration models run")
    g = torch.Generator().manual_seed(groups)
    b, hkv, d, n = 2, 2, 64, 37
    q_len = 12 if case == "suffix" else n
    q = torch.randn(b, hkv * groups, q_len, d, generator=g) * 2
    k = torch.randn(b, hkv, n, d, generator=g)
    v = torch.randn(b, hkv, n, d, generator=g)
    scale = 0.11
    keep = _keep_from(None, q_len, n)
    bias = None
    is_causal = case == "causal"
    if case == "padded":
        keep = padded_causal_mask(b, q_len, n, pads=[0, 9])
        keep[1, :, 3] = False  # a padding query: sees nothing
    elif case == "full":
        keep = torch.ones(1, 1, q_len, n, dtype=torch.bool)
    if case in ("padded", "suffix"):
        bias = torch.where(keep, 0.0, -math.inf).to(dtype).to(device)
    qd, kd, vd = (x.to(device, dtype) for x in (q, k, v))
    res = sdpa_with_lse(qd, kd, vd, bias=bias, is_causal=is_causal, scale=scale)
    assert res is not None, "a fused SDPA kernel with LSE exists on CPU and CUDA"
    out, lse, backend = res
    assert backend in ("flash_cpu", "flash", "efficient")
    want_out, want_lse = _dense64(qd.cpu().float(), kd.cpu().float(), vd.cpu().float(), keep, scale)
    seen = torch.isfinite(want_lse).expand_as(lse.cpu())
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert lse.dtype == torch.float32 and lse.shape == (b, hkv * groups, q_len)
    torch.testing.assert_close(lse.cpu()[seen].double(), want_lse.expand_as(seen)[seen], rtol=tol, atol=tol)
    got = out.cpu().double()[seen]
    torch.testing.assert_close(got, want_out[seen], rtol=tol, atol=tol * (1 if dtype == torch.float32 else 2))


def test_efficient_kernel_bias_layout() -> None:
    """The bias handed to the CUDA memory-efficient kernel: full [B, H, q, n] shape even for a mask
    shared by the batch (a size-1 batch was refused on the H100), rows 16-aligned, same values."""
    bias = torch.where(padded_causal_mask(1, 5, 37, pads=[3]), 0.0, -math.inf)  # [1, 1, 5, 37]
    out = ref._aligned_bias(bias, 2, 8)
    assert out.shape == (2, 8, 5, 37) and out.stride(-2) % 16 == 0 and out.stride(-1) == 1
    assert torch.equal(out, bias.expand(2, 8, 5, 37))


# --------------------------------------------------------------------------- merge_partials


def _partial(s: torch.Tensor, v: torch.Tensor, part: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 softmax attention over the keys selected by ``part`` [n] bool."""
    s = s.masked_fill(~part, -math.inf)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - torch.where(torch.isfinite(lse), lse, 0.0)[..., None])
    return p @ v, lse


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 40),
    seed=st.integers(0, 2**31 - 1),
    spread=st.floats(0.1, 60.0),
    masked_frac=st.floats(0.0, 1.0),
)
def test_merge_partials_equals_attention_over_all(
    n: int, seed: int, spread: float, masked_frac: float
) -> None:
    g = torch.Generator().manual_seed(seed)
    rows, d = 5, 8
    s = torch.randn(rows, n, generator=g, dtype=torch.float64) * spread
    v = torch.randn(n, d, generator=g, dtype=torch.float64)
    s = s.masked_fill(
        torch.rand(rows, n, generator=g) < masked_frac, -math.inf
    )  # masked keys, even whole rows
    part = torch.rand(n, generator=g) < torch.rand((), generator=g)  # arbitrary split, possibly empty
    out_a, lse_a = _partial(s, v, part)
    out_b, lse_b = _partial(s, v, ~part)
    out_all, lse_all = _partial(s, v, torch.ones(n, dtype=torch.bool))
    # an empty part's output is garbage that must be ignored
    out_a = torch.where(torch.isfinite(lse_a)[:, None], out_a, math.nan)
    out, lse = merge_partials(out_a.float(), lse_a.float(), out_b.float(), lse_b.float())
    assert out.dtype == lse.dtype == torch.float32
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    torch.testing.assert_close(lse.double(), lse_all.float().double(), rtol=1e-5, atol=1e-5)
    empty = ~torch.isfinite(lse_all)
    assert torch.all(out[empty] == 0) and torch.all(lse[empty] == -math.inf)
    torch.testing.assert_close(out.double(), out_all.float().double(), rtol=1e-5, atol=1e-5)
    # symmetric, and merging an empty part is the identity
    out2, lse2 = merge_partials(out_b.float(), lse_b.float(), out_a.float(), lse_a.float())
    torch.testing.assert_close(out2, out, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lse2, lse)
    out3, lse3 = merge_partials(out, lse, torch.full_like(out, math.nan), torch.full_like(lse, -math.inf))
    torch.testing.assert_close(out3, out)
    torch.testing.assert_close(lse3, lse)


def test_merge_partials_both_empty_is_zero_not_nan() -> None:
    out = torch.full((1, 2, 3, 4), math.nan)
    lse = torch.full((1, 2, 3), -math.inf)
    merged, merged_lse = merge_partials(out, lse, out, lse)
    assert torch.all(merged == 0) and torch.all(merged_lse == -math.inf)


# --------------------------------------------------------------------------- spectral_attention


def _close32(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a.float().cpu(), b.float().cpu(), rtol=1e-4, atol=3e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("key_space", ["post_rope", "pre_rope"])
@pytest.mark.parametrize("bits", [16, 8, 4])
@pytest.mark.parametrize("codec", ["lowrank", "identity"])
@pytest.mark.parametrize("groups", [1, 4, 8])
def test_chunked_prefill_over_compressed_cache_equals_dense(
    device: str, key_space: str, bits: int, codec: str, groups: int
) -> None:
    """A 40-token chunk that starts inside the last cold block, every tier populated, fp32."""
    identity = codec == "identity"
    state = make_state(
        key_space=key_space,
        bits=bits,
        chunk=40,
        hot=30,
        seed=bits + groups,
        identity_keys=identity,
        identity_values=identity,
    )
    state = _to(state, device)
    query = _query(state, 2 * groups, 40).to(device)
    got, lse = spectral_attention(query, state, None, chunk_backend="sdpa", return_lse=True)
    torch_path, torch_lse = spectral_attention(query, state, None, chunk_backend="torch", return_lse=True)
    dense_tiers, dense_lse = spectral_attention(
        query, state, None, chunk_backend="sdpa", tier_backend="dense_sdpa", return_lse=True
    )
    want = dense_reference(query, state, None)
    want64, want_lse = _state_lse(query, state, None, query.shape[-1] ** -0.5)
    for out, out_lse in ((got, lse), (torch_path, torch_lse), (dense_tiers, dense_lse)):
        _close32(out, want)
        _close32(out, want64)
        torch.testing.assert_close(out_lse.cpu().double(), want_lse, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("key_space", ["post_rope", "pre_rope"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_chunked_prefill_half_precision_is_close(device: str, key_space: str, dtype: torch.dtype) -> None:
    if device == "cpu" and dtype == torch.float16:
        pytest.skip("fp16 SDPA on CPU is not a configuration models run")
    state = _to(make_state(key_space=key_space, bits=8, chunk=48, hot=30, seed=7, head_dim=64), device, dtype)
    query = (_query(state, 8, 48) * 2).to(device, dtype)
    got = spectral_attention(query, state, None, chunk_backend="sdpa")
    assert got.dtype == dtype and torch.isfinite(got).all()
    want = dense_reference(query.float(), state, None)  # fp32 math on the same half inputs
    torch.testing.assert_close(got.float().cpu(), want.cpu(), rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("key_space", ["post_rope", "pre_rope"])
@pytest.mark.parametrize("mask_kind", ["bool", "float"])
def test_left_padding_through_sdpa(device: str, key_space: str, mask_kind: str) -> None:
    state = _to(make_state(batch=3, key_space=key_space, bits=8, chunk=24, hot=20, seed=3), device)
    seq = state.seq_len
    # row 1 pads into the first block, row 2 pads past the landmarks only
    mask = padded_causal_mask(3, 24, seq, pads=[0, 9, 2])
    mask[2, :, 0] = False  # a query that sees nothing at all (a padding query)
    if mask_kind == "float":
        mask = torch.where(mask, 0.0, torch.finfo(torch.float32).min)
    mask = mask.to(device)
    query = _query(state, 8, 24).to(device)
    keep = mask if mask_kind == "bool" else mask > torch.finfo(torch.float32).min / 2
    _, want_lse = _state_lse(query, state, keep.cpu(), query.shape[-1] ** -0.5)
    for tiers in ("compressed", "dense_sdpa"):
        got, lse = spectral_attention(
            query, state, mask, chunk_backend="sdpa", tier_backend=tiers, return_lse=True
        )
        assert torch.isfinite(got).all()
        assert torch.all(got[2, :, 0] == 0) and torch.all(lse[2, :, 0] == -math.inf)
        _close32(got, dense_reference(query, state, mask))
        torch.testing.assert_close(lse.cpu().double(), want_lse, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("key_space", ["post_rope", "pre_rope"])
@pytest.mark.parametrize("masked", [False, True])
def test_first_prefill_is_plain_sdpa(device: str, key_space: str, masked: bool) -> None:
    """chunk_start == 0: every tier lies inside the chunk; the result is SDPA over the chunk."""
    probe = make_state(key_space=key_space, bits=8, seed=11)
    state = _to(make_state(key_space=key_space, bits=8, seed=11, chunk=probe.seq_len), device)
    assert state.chunk_start == 0
    q_len = state.seq_len
    mask = padded_causal_mask(2, q_len, q_len, pads=[0, 6]).to(device) if masked else None
    query = _query(state, 8, q_len).to(device)
    got, lse = spectral_attention(query, state, mask, chunk_backend="sdpa", return_lse=True)
    _close32(got, dense_reference(query, state, mask))
    _, want_lse = _state_lse(query, state, None if mask is None else mask.cpu(), query.shape[-1] ** -0.5)
    torch.testing.assert_close(lse.cpu().double(), want_lse, rtol=1e-5, atol=1e-5)
    # without the LSE it is the same numbers
    _close32(spectral_attention(query, state, mask, chunk_backend="sdpa"), got)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("key_space", ["post_rope", "pre_rope"])
@pytest.mark.parametrize("backend", ["auto", "sdpa", "torch"])
def test_decode_equals_dense(device: str, key_space: str, backend: str) -> None:
    """q = 1: the chunk is the new token."""
    state = _to(make_state(key_space=key_space, bits=4, chunk=1, seed=2), device)
    query = _query(state, 8, 1).to(device)
    got, lse = spectral_attention(query, state, None, chunk_backend=backend, return_lse=True)
    _close32(got, dense_reference(query, state, None))
    _, want_lse = _state_lse(query, state, None, query.shape[-1] ** -0.5)
    torch.testing.assert_close(lse.cpu().double(), want_lse, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("key_space", ["post_rope", "pre_rope"])
def test_softcap_stays_on_the_torch_path(key_space: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """SDPA has no logit softcapping (Gemma 2): the chunk is attended in the torch softmax."""
    state = make_state(key_space=key_space, bits=8, chunk=40, hot=30, seed=9)
    query = _query(state, 4, 40) * 3

    def no_sdpa(*args, **kwargs):
        raise AssertionError("softcap must not reach SDPA")

    monkeypatch.setattr(ref, "sdpa_with_lse", no_sdpa)
    got, lse = spectral_attention(
        query, state, None, softcap=5.0, scaling=0.3, chunk_backend="sdpa", return_lse=True
    )
    _close32(got, dense_reference(query, state, None, softcap=5.0, scaling=0.3))
    _, want_lse = _state_lse(query, state, None, 0.3, softcap=5.0)
    torch.testing.assert_close(lse.double(), want_lse, rtol=1e-5, atol=1e-5)


def test_auto_routes_long_chunks_to_sdpa_and_decode_to_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = ref.sdpa_with_lse

    def counting(*args, **kwargs):
        res = real(*args, **kwargs)
        calls.append(None if res is None else res[2])
        return res

    monkeypatch.setattr(ref, "sdpa_with_lse", counting)
    long_chunk = make_state(bits=8, chunk=80, hot=70, seed=1)
    spectral_attention(_query(long_chunk, 4, 80), long_chunk, None)
    assert calls == ["flash_cpu"]
    decode = make_state(bits=8, chunk=1, seed=1)
    spectral_attention(_query(decode, 4, 1), decode, None)
    assert calls == ["flash_cpu"]  # decode stays in the one torch softmax


def test_query_tiles_with_sdpa_chunk() -> None:
    state = make_state(key_space="pre_rope", bits=8, chunk=30, hot=25, seed=4)
    query = _query(state, 4, 30)
    mask = padded_causal_mask(2, 30, state.seq_len, pads=[0, 5])
    one = spectral_attention(query, state, mask, chunk_backend="sdpa")
    tiled = spectral_attention(
        query, state, mask, chunk_backend="sdpa", max_score_elements=2 * 4 * state.seq_len * 7
    )
    torch.testing.assert_close(one, tiled, rtol=1e-5, atol=1e-6)
    _close32(tiled, dense_reference(query, state, mask))


def test_mask_longer_than_cache_and_bad_backend() -> None:
    state = make_state(chunk=20, hot=16)
    query = _query(state, 4, 20)
    mask = torch.ones(2, 1, 20, state.seq_len + 5, dtype=torch.bool)
    mask[..., : state.seq_len] = padded_causal_mask(2, 20, state.seq_len, pads=[0, 0])
    _close32(
        spectral_attention(query, state, mask, chunk_backend="sdpa"), dense_reference(query, state, None)
    )
    with pytest.raises(ValueError, match="chunk_backend"):
        spectral_attention(query, state, None, chunk_backend="flash")
    with pytest.raises(ValueError, match="tier_backend"):
        spectral_attention(query, state, None, tier_backend="dense")
    with pytest.raises(ValueError, match="covers"):
        spectral_attention(query, state, mask[..., :5], chunk_backend="sdpa")


# --------------------------------------------------------------------------- no host sync at decode


_HOST_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__")


@pytest.mark.parametrize("key_space", ["post_rope", "pre_rope"])
@pytest.mark.parametrize("identity", [False, True])
def test_decode_reads_no_tensor_on_the_host(
    key_space: str, identity: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No .item() / bool(t) / int(t) / .tolist() on the decode path (each is a device sync on CUDA)."""
    state = make_state(
        key_space=key_space, bits=8, chunk=1, seed=6, identity_keys=identity, identity_values=identity
    )
    query = _query(state, 4, 1)
    mask = torch.ones(2, 1, 1, state.seq_len, dtype=torch.bool)
    want = dense_reference(query, state, None)

    def host_read(self, *args, **kwargs):
        raise AssertionError("host read of a tensor on the decode path")

    with monkeypatch.context() as m:
        for name in _HOST_READS:
            m.setattr(torch.Tensor, name, host_read)
        got = spectral_attention(query, state, None)
        got_masked = spectral_attention(query, state, mask)
    _close32(got, want)
    _close32(got_masked, want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("key_space", ["post_rope", "pre_rope"])
def test_decode_does_not_synchronize_cuda(key_space: str) -> None:
    state = _to(make_state(key_space=key_space, bits=8, chunk=1, seed=6), "cuda")
    query = _query(state, 4, 1).cuda()
    spectral_attention(query, state, None)  # warm-up (lazy inits may sync once)
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = spectral_attention(query, state, None)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    _close32(out, dense_reference(query, state, None))


# --------------------------------------------------------------------------- cold blocks read in tiles


@pytest.mark.parametrize("key_space", ["post_rope", "pre_rope"])
@pytest.mark.parametrize("phase", ["decode", "prefill_chunk"])
@pytest.mark.parametrize("tile_tokens", [16, 32, 1 << 20])
@pytest.mark.parametrize("identity", [False, True])
def test_block_tiles_merge_exactly(key_space: str, phase: str, tile_tokens: int, identity: bool) -> None:
    """Cold blocks decoded tile by tile (1, 2 or all 5 blocks at a time), merged by log-sum-exp,
    with per-row scales applied on the scores (decode: few rows) or folded (prefill: many)."""
    chunk = 1 if phase == "decode" else 24
    state = make_state(
        key_space=key_space,
        blocks=5,
        bits=8,
        chunk=chunk,
        hot=20,
        seed=12,
        identity_keys=identity,
        identity_values=identity,
    )
    mask = padded_causal_mask(2, chunk, state.seq_len, pads=[0, 21])  # row 1 pads into block 1
    query = _query(state, 4, chunk)
    for m in (None, mask):
        got, lse = spectral_attention(query, state, m, tile_tokens=tile_tokens, return_lse=True)
        _close32(got, dense_reference(query, state, m))
        _, want_lse = _state_lse(query, state, m, query.shape[-1] ** -0.5)
        torch.testing.assert_close(lse.double(), want_lse, rtol=1e-5, atol=1e-5)


def test_prefill_query_tiles_share_one_decode_or_tile_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """Several query tiles share one decoded copy of the cold tier; past the size limit they decode
    it tile by tile instead. Same numbers either way."""
    state = make_state(key_space="pre_rope", blocks=4, bits=4, chunk=30, hot=25, seed=13)
    query = _query(state, 4, 30)
    small = 2 * 4 * state.seq_len * 7  # 7 query rows per tile
    shared = spectral_attention(query, state, None, max_score_elements=small, chunk_backend="sdpa")
    monkeypatch.setattr(ref, "_SHARED_PREP_MAX_ELEMENTS", 0)
    tiled = spectral_attention(
        query, state, None, max_score_elements=small, chunk_backend="sdpa", tile_tokens=16
    )
    torch.testing.assert_close(shared, tiled, rtol=1e-5, atol=1e-6)
    _close32(tiled, dense_reference(query, state, None))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("masked", [False, True])
def test_first_prefill_is_bit_exact_with_transformers_sdpa(
    device: str, dtype: torch.dtype, masked: bool
) -> None:
    """A one-call prefill gives exactly what a DynamicCache layer gets from transformers' SDPA path
    (same kernel, same inputs), so ``lossless`` prefill logits cannot differ there."""
    import types

    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    probe = make_state(seed=1, head_dim=64)
    state = _to(make_state(seed=1, head_dim=64, chunk=probe.seq_len, dtype=dtype), device)
    q_len = state.seq_len
    query = _query(state, 8, q_len).to(device, dtype)
    mask = padded_causal_mask(2, q_len, q_len, pads=[0, 5]).to(device) if masked else None
    module = types.SimpleNamespace(num_key_value_groups=4, is_causal=True)
    want, _ = sdpa_attention_forward(module, query, state.chunk_keys, state.chunk_values, mask, scaling=0.125)
    got = spectral_attention(query, state, mask, scaling=0.125).transpose(1, 2)
    # padding queries (batch row 1, positions < 5) see nothing: spectral gives zeros, SDPA kernels differ
    assert torch.equal(got[0], want[0]) and torch.equal(got[1, 5:], want[1, 5:])


@pytest.mark.parametrize("bits", [16, 8])
@pytest.mark.parametrize("key_space", ["post_rope", "pre_rope"])
def test_attention_never_writes_the_cache(bits: int, key_space: str) -> None:
    """Every route works on copies: the state's tensors are bit-identical afterwards (16-bit float32
    coefficients with the identity codec are the case where a decode is the tensor itself)."""
    state = make_state(
        key_space=key_space, bits=bits, chunk=24, hot=20, seed=14, identity_keys=True, identity_values=True
    )
    tensors = {k: v for k, v in vars(state).items() if isinstance(v, torch.Tensor)}
    tensors.update({f"cold.{k}": v for k, v in vars(state.cold).items() if isinstance(v, torch.Tensor)})
    before = {k: v.clone() for k, v in tensors.items()}
    query = _query(state, 4, 24)
    for chunk_backend in ("sdpa", "torch"):
        for tiers in ("compressed", "dense_sdpa"):
            for tile_tokens in (16, None):
                spectral_attention(
                    query,
                    state,
                    None,
                    chunk_backend=chunk_backend,
                    tier_backend=tiers,
                    tile_tokens=tile_tokens,
                )
    spectral_attention(query[:, :, -1:], make_state(key_space=key_space, bits=bits, chunk=1, seed=14), None)
    for name, t in tensors.items():
        assert torch.equal(t, before[name]), name
