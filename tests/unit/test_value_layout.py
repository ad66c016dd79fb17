"""The cold tier's value coefficient bytes, stored tokens-contiguous for packed int4 identity rows.

``cache/layer.py`` keeps the default preset's value coefficients as the same ``[B, H, nb, T, D/2]``
tensor with its memory ordered ``[B, H, nb, D/2, T]`` (the decode kernel reads it faster; see
``stores_values_tokens_contiguous``). What must hold: the layout survives every operation that
reallocates the cold buffers (growth, batch ops, ``to``), the values are exactly those of a row-major
twin that saw the same calls, and attention -- the torch reference and the Triton kernel (interpreter
on CPU) -- reads the layer's own state with the same answer.
"""

from __future__ import annotations

import os

import pytest
import torch
from tests.layer_helpers import D, H, T, kv

import spectralcache.cache.layer as layer_mod
from spectralcache.attention.reference import spectral_attention
from spectralcache.cache.layer import (
    SpectralLayer,
    is_padded_token_rows,
    is_tokens_contiguous,
    stores_values_tokens_contiguous,
    tokens_contiguous_stride,
)
from spectralcache.config import SpectralConfig, get_preset, list_presets

pytestmark = pytest.mark.usefixtures("one_thread")


def default_like(**overrides) -> SpectralConfig:
    """The default preset's codecs at the small test geometry (blocks fill after a few dozen tokens)."""
    base = dict(block_size=T, hot_size=4, landmarks=3, outliers_per_block=2)
    base.update(overrides)
    return get_preset("default").replace(**base)


def tokens_contiguous(x: torch.Tensor) -> bool:
    """The stored layout: tokens contiguous, every channel row (and every block) starting at a
    multiple of 16 bytes from the buffer's start."""
    aligned = x.stride(-1) % 16 == 0 and x.stride(-3) % 16 == 0 and x.storage_offset() % 16 == 0
    return is_tokens_contiguous(x) and x.stride(-2) == 1 and aligned


def test_rule_over_presets():
    """Only packed int4 identity value rows (the default's) are stored tokens-contiguous."""
    want = {name: False for name in list_presets()}
    want["default"] = True
    assert {name: stores_values_tokens_contiguous(get_preset(name)) for name in list_presets()} == want
    assert not stores_values_tokens_contiguous(get_preset("default").replace(value_coeff_bits=8))
    assert not stores_values_tokens_contiguous(get_preset("lowrank").replace(coeff_bits=4))


def _grow_and_decode(layer: SpectralLayer, k: torch.Tensor, v: torch.Tensor, prefill: int) -> None:
    if prefill:
        layer.update(k[:, :, :prefill], v[:, :, :prefill])
        layer.release_chunk()
    for i in range(prefill, k.shape[2]):
        layer.update(k[:, :, i : i + 1], v[:, :, i : i + 1])
        layer.release_chunk()


def _assert_same_state(a: SpectralLayer, b: SpectralLayer) -> None:
    sa, sb = a.state(), b.state()
    for name, x in sa.cold.tensors().items():
        y = getattr(sb.cold, name)
        assert (x is None and y is None) or torch.equal(x, y), name
    for name in ("landmark_keys", "landmark_values", "hot_keys", "hot_values"):
        assert torch.equal(getattr(sa, name), getattr(sb, name)), name
    assert (sa.seq_len, sa.hot_start) == (sb.seq_len, sb.hot_start)


@pytest.fixture(params=[T, 13], ids=["block16", "block13"])
def twins(monkeypatch, request):
    """(tokens-contiguous layer, row-major layer): the same config; the second built with the layout
    rule switched off while it runs its calls (``run(layer, fn)`` applies ``fn`` under the right rule).
    Blocks of 13 tokens: rows padded to 16 (compress_tail gives such lengths: 511 at 128K)."""
    cfg = default_like(block_size=request.param)
    fast, plain = (
        SpectralLayer(cfg, 0, head_dim=D, num_kv_heads=H),
        SpectralLayer(cfg, 0, head_dim=D, num_kv_heads=H),
    )

    def run(fn):
        fn(fast)
        with monkeypatch.context() as m:
            m.setattr(layer_mod, "stores_values_tokens_contiguous", lambda config: False)
            fn(plain)

    return fast, plain, run


def test_layout_through_growth_and_every_batch_op(twins):
    fast, plain, run = twins
    k, v = kv(3, 3 + 7 * T + 9, seed=1, dtype=torch.bfloat16)
    # a prefill, then decode past the capacity it allocated (the buffers regrow on the way)
    prefill = 3 + 2 * T + 6
    run(lambda layer: (layer.update(k[:, :, :prefill], v[:, :, :prefill]), layer.release_chunk()))
    capacity = fast.cold_capacity
    run(lambda layer: _grow_and_decode(layer, k[:, :, prefill:], v[:, :, prefill:], 0))
    assert fast.num_blocks > capacity
    assert tokens_contiguous(fast.state().cold.value_coeffs)
    scales_padded(fast.state().cold.value_scales)
    assert fast.state().cold.value_coeffs.stride(-1) != 1
    assert plain.state().cold.value_coeffs.stride(-1) == 1  # the twin really is row-major
    _assert_same_state(fast, plain)
    ops = [
        lambda layer: layer.reorder_cache(torch.tensor([2, 0, 0])),
        lambda layer: layer.batch_repeat_interleave(2),
        lambda layer: layer.batch_select_indices(torch.tensor([5, 1, 2])),
        lambda layer: layer.crop(-(T + 5)),  # into the cold tier: drops the last block
        lambda layer: layer.to(dtype=torch.float32),
    ]
    for op in ops:
        run(op)
        assert tokens_contiguous(fast.state().cold.value_coeffs)
        scales_padded(fast.state().cold.value_scales)
        _assert_same_state(fast, plain)
    # and the layer keeps appending blocks into its (re-laid-out) buffers
    k2, v2 = kv(3, 2 * T + 3, seed=2)
    run(lambda layer: _grow_and_decode(layer, k2, v2, 1))
    assert tokens_contiguous(fast.state().cold.value_coeffs)
    scales_padded(fast.state().cold.value_scales)
    _assert_same_state(fast, plain)


def scales_padded(vs: torch.Tensor) -> None:
    """The per-token value scales [.., nb, T, 1]: blocks T rounded up to 16 apart (stop 23), padding zero."""
    t = vs.shape[-2]
    assert is_padded_token_rows(vs) and vs.stride(-3) == tokens_contiguous_stride(t) and vs.stride(-2) == 1
    if t % 16:
        pad = vs.as_strided(
            (*vs.shape[:-2], 16 - t % 16, 1), (*vs.stride()[:-2], 1, 1), vs.storage_offset() + t
        )
        assert not pad.any()


@pytest.mark.parametrize("block", [T, 13])
def test_reference_and_kernel_read_the_layer_state(block):
    """Attention over a real layer's tokens-contiguous state: the torch reference equals its answer on
    the row-major copy of the same state, and the Triton kernel (interpreter on CPU) equals both."""
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs CUDA or TRITON_INTERPRET=1 (set by tests/conftest.py)")
    pytest.importorskip("triton")
    from spectralcache.attention.triton import decode_attention

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    layer = SpectralLayer(default_like(block_size=block, compress_tail=False), 0, head_dim=32, num_kv_heads=2)
    g = torch.Generator().manual_seed(3)
    k, v = (torch.randn(2, 2, 3 + 5 * block + 7, 32, generator=g).to(dev) for _ in range(2))
    _grow_and_decode(layer, k, v, 3 + 3 * block)
    state = layer.state()
    assert state.cold.num_blocks == 5 and tokens_contiguous(state.cold.value_coeffs)
    if block % 16:
        # the rows' padding bytes (never written) hold anything: the kernel reads them (T_V) and
        # must not be changed by them
        pad = state.cold.value_coeffs.transpose(-1, -2).as_strided(
            (*state.cold.value_coeffs.shape[:-2], 16, 16 - block % 16),
            (*state.cold.value_coeffs.stride()[:-2], 16, 1),
            state.cold.value_coeffs.storage_offset() + block,
        )
        pad.fill_(0x77)
        # and the scales' padding (zeros as the layer leaves it) read by the same mask: NaN there must not
        # reach the output either (the kernel zeroes the scales past T in registers)
        vs = state.cold.value_scales
        vs.as_strided(
            (*vs.shape[:-2], 16 - block % 16, 1), (*vs.stride()[:-2], 1, 1), vs.storage_offset() + block
        ).fill_(float("nan"))
    query = torch.randn(2, 8, 1, 32, generator=g).to(dev)
    ref = spectral_attention(query, state)
    row_major = state.cold.value_coeffs.contiguous()
    assert row_major.stride(-1) == 1 and torch.equal(row_major, state.cold.value_coeffs)
    original = state.cold.value_coeffs
    state.cold.value_coeffs = row_major
    try:
        torch.testing.assert_close(spectral_attention(query, state), ref, rtol=0, atol=0)
    finally:
        state.cold.value_coeffs = original
    from tests.kernel_helpers import record_launch

    out, constexprs = record_launch(lambda: decode_attention(query, state, block_t=16))
    assert float((out.float() - ref.float()).norm() / ref.float().norm()) < 1e-5
    # 13-token blocks: the value tile and its scales are masked by 16-token groups (T_V, VS_PAD), reading
    # the padding
    assert (constexprs["T"], constexprs["T_V"], constexprs["VS_PAD"]) == (
        (block, 16, True) if block % 16 else (block, 0, False)
    )


def test_row_stride_is_the_block_length_rounded_up_to_16():
    assert [tokens_contiguous_stride(t) for t in (1, 13, 16, 17, 511, 512)] == [16, 16, 16, 32, 512, 512]
    from spectralcache.cache.layer import tokens_contiguous as relayout

    x = torch.arange(2 * 3 * 511 * 4, dtype=torch.int16).view(2, 3, 511, 4).to(torch.uint8)
    y = relayout(x)
    assert torch.equal(x, y) and y.stride() == (4 * 512 * 3, 4 * 512, 1, 512) and tokens_contiguous(y)
    assert relayout(y) is y  # already laid out: no copy
    assert not is_tokens_contiguous(x) and not is_tokens_contiguous(
        x.transpose(-1, -2).contiguous().transpose(-1, -2)
    )


def test_value_mask_bound_only_where_the_rows_hold_it():
    """``decode._value_tokens_padded``: T rounded up to 16 only for tokens-contiguous integer rows whose
    stride covers it (the cache's padded rows); 0 (mask by T) for unpadded, row-major, 16-bit or aligned
    blocks."""
    pytest.importorskip("triton")
    from types import SimpleNamespace

    from spectralcache.attention.triton.decode import _value_tokens_padded
    from spectralcache.cache.layer import tokens_contiguous as relayout

    def cold(x):
        return SimpleNamespace(value_coeffs=x)

    rows = torch.zeros(1, 2, 3, 511, 64, dtype=torch.uint8)
    assert _value_tokens_padded(cold(relayout(rows)), 511, 4) == 512
    assert _value_tokens_padded(cold(relayout(rows)), 511, 8) == 512
    unpadded = rows.transpose(-1, -2).contiguous().transpose(-1, -2)  # rows 511 bytes apart
    assert _value_tokens_padded(cold(unpadded), 511, 4) == 0
    assert _value_tokens_padded(cold(rows), 511, 4) == 0  # row-major: stride(-1) == 1
    half = relayout(torch.zeros(1, 2, 3, 511, 64, dtype=torch.float16))
    assert _value_tokens_padded(cold(half), 511, 16) == 0  # padding could hold NaN bits
    whole = relayout(torch.zeros(1, 2, 3, 512, 64, dtype=torch.uint8))
    assert _value_tokens_padded(cold(whole), 512, 4) == 0  # already a multiple of 16


def test_scales_mask_only_where_their_blocks_hold_it():
    """``decode._value_scales_padded``: the scales may be read up to T_V only where each block's row of
    per-token scales is dense and at least T_V long, 16-aligned (the cache's padded layout)."""
    pytest.importorskip("triton")
    from types import SimpleNamespace

    from spectralcache.attention.triton.decode import _value_scales_padded
    from spectralcache.cache.layer import padded_token_rows

    scales = torch.ones(1, 2, 3, 511, 1, dtype=torch.float16)
    padded = padded_token_rows(scales)
    assert padded.stride()[-3:] == (512, 1, 1) and torch.equal(padded, scales)
    assert padded_token_rows(padded) is padded  # already laid out: no copy
    assert _value_scales_padded(SimpleNamespace(value_scales=padded), 511, 512)
    assert not _value_scales_padded(SimpleNamespace(value_scales=padded), 511, 0)  # rows not padded
    assert not _value_scales_padded(SimpleNamespace(value_scales=scales), 511, 512)  # blocks 511 apart
    assert not _value_scales_padded(SimpleNamespace(value_scales=None), 511, 512)  # 16-bit values
    per_block = torch.ones(1, 2, 3, 1, 1, dtype=torch.float16)  # not one scale per token
    assert not _value_scales_padded(SimpleNamespace(value_scales=per_block), 511, 512)
