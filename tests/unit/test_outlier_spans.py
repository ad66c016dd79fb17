"""``outlier_spans``: a block's exact outlier tokens spread over equal spans of the block.

Selection (``block._top_outliers``) against a direct per-span top-k on fresh random scores, the
forced rows (too large to quantize) kept whichever span they crowd, ``compress_blocks`` layouts,
the config's refusals, the decode kernel against the torch reference on such blocks, and a tiny
model whose cache holds exactly the bytes of the unspread layout."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.layer_states import state_around
from tests.tiny_models import prefill_both, tiny_model

from spectralcache import SpectralConfig
from spectralcache.attention.reference import spectral_attention
from spectralcache.cache.block import _top_outliers, compress_blocks, reconstruct


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def span_bounds(t: int, spans: int) -> list[tuple[int, int]]:
    """Span j = the rows r with r * spans // t == j: [ceil(j t / spans), ceil((j + 1) t / spans))."""
    return [(-(-j * t // spans), -(-(j + 1) * t // spans)) for j in range(spans)]


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    per=st.integers(1, 4),
    spans=st.integers(1, 5),
    extra=st.integers(1, 60),
)
def test_each_span_keeps_its_own_top_scores(seed, per, spans, extra):
    o = per * spans
    t = o + extra  # compress_blocks needs o < T
    score = torch.rand(3, t, generator=gen(seed))
    idx = _top_outliers(score, o, spans, None, per)
    assert idx.shape == (3, o)
    assert torch.equal(idx, idx.sort(-1).values) and all(len(set(r.tolist())) == o for r in idx)
    for row in range(3):
        for lo, hi in span_bounds(t, spans):
            mine = [i for i in idx[row].tolist() if lo <= i < hi]
            want = (score[row, lo:hi].topk(per).indices + lo).sort().values.tolist()
            assert sorted(mine) == want
    if spans == 1:
        assert torch.equal(idx, score.topk(o, -1).indices.sort(-1).values)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    per=st.integers(0, 2),
    spans=st.integers(2, 4),
    free=st.integers(1, 4),
    extra=st.integers(1, 40),
)
def test_a_floor_per_span_and_the_rest_anywhere(seed, per, spans, free, extra):
    """``outliers_per_span``: each span keeps its own top ``per``, the other ``free`` are the
    highest of what is left, wherever they are."""
    o = per * spans + free
    t = o + extra
    score = torch.rand(2, t, generator=gen(seed))
    idx = _top_outliers(score, o, spans, None, per)
    assert idx.shape == (2, o) and all(len(set(r.tolist())) == o for r in idx)
    for row in range(2):
        chosen = set(idx[row].tolist())
        floor = set()
        for lo, hi in span_bounds(t, spans):
            own = (score[row, lo:hi].topk(per).indices + lo).tolist() if per else []
            assert set(own) <= chosen
            floor |= set(own)
        rest = score[row].clone()
        rest[list(floor)] = float("-inf")
        assert chosen - floor == set(rest.topk(free).indices.tolist())


def test_forced_rows_are_kept_when_they_crowd_one_span():
    t, o, spans = 40, 8, 4
    score = torch.rand(2, t, generator=gen(1))
    forced = torch.zeros(2, t, dtype=torch.bool)
    forced[0, [1, 2, 3, 4, 5]] = True  # 5 rows in span 0, whose quota is 2
    forced[1, [3, 25]] = True  # within the quotas: row 1 keeps its spread
    score = score.masked_fill(forced, float("inf"))
    idx = _top_outliers(score, o, spans, forced, o // spans)
    assert {1, 2, 3, 4, 5} <= set(idx[0].tolist())
    assert torch.equal(idx[0], score[0].topk(o).indices.sort().values)  # the plain top o
    assert {3, 25} <= set(idx[1].tolist())
    assert [sum(lo <= i < hi for i in idx[1].tolist()) for lo, hi in span_bounds(t, spans)] == [2, 2, 2, 2]


def test_replace_keeps_the_floor_that_fits_fewer_outliers():
    spread = SpectralConfig.from_preset("default", outlier_spans=4, outliers_per_span=1)
    assert spread.replace(outliers_per_block=2).outliers_per_span == 0  # 4 spans cannot hold 1 each
    assert spread.replace(outliers_per_block=0).outliers_per_span == 0
    assert spread.replace(outliers_per_block=16).outliers_per_span == 1  # fits: unchanged
    even = SpectralConfig.from_preset("default", outlier_spans=4)
    assert even.replace(outliers_per_block=6).outliers_per_span == 1  # 6 is not 4 x k: floor 1 + 2 free
    with pytest.raises(ValueError, match="exceeds outliers_per_block=2"):
        spread.replace(outliers_per_block=2, outliers_per_span=1)  # named: refused, not adjusted


def test_config_refusals():
    with pytest.raises(ValueError, match="outlier_spans=3 must divide outliers_per_block=8"):
        SpectralConfig.from_preset("default", outlier_spans=3, outliers_per_span=None)
    with pytest.raises(ValueError, match="exceeds outliers_per_block=8"):
        SpectralConfig.from_preset("default", outlier_spans=4, outliers_per_span=3)
    assert SpectralConfig.from_preset("default", outlier_spans=3, outliers_per_span=2).outliers_per_span == 2
    assert SpectralConfig.from_preset("default", outlier_spans=4).outliers_each_span == 2
    assert SpectralConfig.from_preset("default", outlier_spans=4, outliers_per_span=1).outliers_each_span == 1
    with pytest.raises(ValueError, match="outlier_spans must be >= 1"):
        SpectralConfig(outlier_spans=0)
    assert SpectralConfig.from_preset("default", outlier_spans=4).outlier_spans == 4
    assert SpectralConfig.from_preset("default").outlier_spans == 1


@pytest.mark.parametrize("bits", [4, 8])
def test_compress_blocks_spreads_the_outliers_and_serves_them_exactly(bits):
    t, d, spans = 64, 16, 4
    g = gen(2)
    k = torch.randn(2, 3, t, d, generator=g)
    k[..., :16, :] *= 6.0  # the first quarter stretches every channel: plain top-8 lands there
    v = torch.randn(2, 3, t, d, generator=g)
    c = SpectralConfig(
        block_size=t, hot_size=4, landmarks=2, outliers_per_block=8, key_codec="channel",
        value_codec="identity", coeff_bits=bits, key_zero_point=True,
    )  # fmt: skip
    plain = compress_blocks(k, v, c, d, d)
    spread = compress_blocks(k, v, c.replace(outlier_spans=spans), d, d)
    per_span = lambda idx: [int(((idx >= lo) & (idx < hi)).sum()) for lo, hi in span_bounds(t, spans)]  # noqa: E731
    assert per_span(plain.outlier_index[0, 0]) != [2, 2, 2, 2]
    for row in spread.outlier_index.reshape(-1, 8):
        assert per_span(row) == [2, 2, 2, 2]
    floor = compress_blocks(k, v, c.replace(outlier_spans=spans, outliers_per_span=1), d, d)
    for row in floor.outlier_index.reshape(-1, 8):
        assert min(per_span(row)) >= 1 and sum(per_span(row)) == 8
    rec_k, rec_v = reconstruct(spread)
    idx = spread.outlier_index[0, 1]
    torch.testing.assert_close(rec_k[0, 1, idx], k[0, 1, idx])
    torch.testing.assert_close(rec_v[0, 1, idx], v[0, 1, idx])
    for name in ("key_coeffs", "key_scales", "key_offsets", "value_coeffs", "outlier_keys", "outlier_index"):
        assert getattr(spread, name).shape == getattr(plain, name).shape  # same layout, same bytes


def test_decode_kernel_reads_spread_outliers():
    pytest.importorskip("triton")
    import os

    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    from spectralcache.attention.triton.decode import decode_attention

    t, d = 32, 16
    k = torch.randn(2, 2, 3, t, d, generator=gen(3))
    v = torch.randn(2, 2, 3, t, d, generator=gen(4))
    c = SpectralConfig.from_preset("default", block_size=t, outliers_per_block=4, outlier_spans=4)
    cold = compress_blocks(k, v, c, d, d, block_starts=torch.arange(3) * t + 4)
    state = state_around(cold, landmarks=4, hot=5, chunk=1, seed=5)
    q = torch.randn(2, 6, 1, d, generator=gen(6))
    got = decode_attention(q, state, None, None, None, block_t=16)
    want = spectral_attention(q, state, None)
    assert float((got - want).norm() / want.norm()) < 1e-5


def test_a_model_end_to_end_holds_the_same_bytes():
    model = tiny_model("llama")
    torch.manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (1, 300))
    base = SpectralConfig.from_preset(
        "default", block_size=64, hot_size=16, landmarks=4, outlier_spans=1, outliers_per_span=None
    )
    plain_cache, _, _ = prefill_both(model, base, ids)
    cache, a, b = prefill_both(model, base.replace(outlier_spans=4), ids)
    assert (a - b).norm() / b.norm() < 0.1
    assert cache.memory_report()["layers"][0]["tiers"] == plain_cache.memory_report()["layers"][0]["tiers"]
    st_ = cache.layers[0].state()
    t = st_.cold.block_size
    for row in st_.cold.outlier_index.reshape(-1, 8):
        assert [int(((row >= lo) & (row < hi)).sum()) for lo, hi in span_bounds(t, 4)] == [2, 2, 2, 2]
