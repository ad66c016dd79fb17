"""Per-row int8 / packed int4 quantization: storage, round-trip bound, edge cases."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spectralcache.linalg import QuantizedRows, dequantize_rows, pack_int4, quantize_rows, unpack_int4

SCALE_DTYPES = [torch.float16, torch.float32]


def assert_bound(x: torch.Tensor, q: QuantizedRows) -> None:
    """|x - deq(q)| <= stored scale / 2 per element (plus float32 rounding of x and q·s)."""
    y = dequantize_rows(q)
    s = q.scales.float()
    slack = 4 * torch.finfo(torch.float32).eps * x.float().abs()
    assert torch.all((x.float() - y).abs() <= s / 2 + slack), float(((x.float() - y).abs() - s / 2).max())


@pytest.mark.parametrize("scale_dtype", SCALE_DTYPES)
@pytest.mark.parametrize("bits", [8, 4])
def test_storage_layout(bits, scale_dtype):
    x = torch.randn(2, 3, 5, 7)
    q = quantize_rows(x, bits=bits, scale_dtype=scale_dtype)
    if bits == 8:
        assert q.data.dtype == torch.int8 and q.data.shape == (2, 3, 5, 7)
        assert int(q.data.abs().max()) == 127  # the row maximum maps to the top code
    else:
        assert q.data.dtype == torch.uint8 and q.data.shape == (2, 3, 5, 4)  # odd 7 -> 4 bytes
    assert q.scales.dtype == scale_dtype and q.scales.shape == (2, 3, 5, 1)
    assert q.shape == x.shape and q.n_cols == 7
    assert q.nbytes() == q.data.numel() * q.data.element_size() + q.scales.numel() * q.scales.element_size()
    assert_bound(x, q)


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 6),
    cols=st.integers(1, 13),
    log_mag=st.floats(-9, 4),
    bits=st.sampled_from([8, 4]),
    half_scale=st.booleans(),
    zero_row=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_round_trip_error_at_most_half_a_scale(rows, cols, log_mag, bits, half_scale, zero_row, seed):
    g = torch.Generator().manual_seed(seed)
    # per-row magnitudes spread over 3 decades around 10^log_mag
    mags = 10 ** (log_mag + 3 * torch.rand(rows, 1, generator=g, dtype=torch.float64))
    x = (torch.randn(rows, cols, generator=g, dtype=torch.float64) * mags).float()
    if zero_row:
        x[0] = 0
    scale_dtype = torch.float16 if half_scale else torch.float32
    qmax = 127 if bits == 8 else 7
    if half_scale and float(x.abs().max()) / qmax > torch.finfo(torch.float16).max:
        # Scales that do not fit float16 must be refused clearly, never stored as inf.
        with pytest.raises(ValueError, match="overflows"):
            quantize_rows(x, bits=bits, scale_dtype=scale_dtype)
        return
    q = quantize_rows(x, bits=bits, scale_dtype=scale_dtype)
    assert_bound(x, q)
    assert torch.isfinite(q.scales).all()


@pytest.mark.parametrize("bits", [8, 4])
def test_zero_rows_give_zero_scale_no_nan(bits):
    x = torch.zeros(3, 6)
    x[1] = torch.arange(6.0)
    q = quantize_rows(x, bits=bits)
    assert q.scales[0].item() == 0 and q.scales[2].item() == 0
    y = dequantize_rows(q)
    assert torch.isfinite(y).all() and torch.equal(y[0], torch.zeros(6))


def test_int4_pack_unpack_every_value_and_odd_length():
    vals = torch.arange(-8, 8, dtype=torch.int8)
    for n in (16, 15, 1):
        v = vals[:n].reshape(1, n)
        packed = pack_int4(v)
        assert packed.dtype == torch.uint8 and packed.shape == (1, (n + 1) // 2)
        assert torch.equal(unpack_int4(packed, n), v)
    # nibble order: column 2j low, 2j+1 high
    assert pack_int4(torch.tensor([[1, 2]], dtype=torch.int8)).item() == 0x21


def test_scale_rounded_up_to_fp16_never_clips():
    """Row maxima whose amax/qmax rounds *down* in fp16 would clip without the round-up."""
    x = torch.tensor([[1.0 + 2**-9, 0.3], [65504.0 * 127 / 128, -1.0]])
    for bits in (8, 4):
        q = quantize_rows(x, bits=bits)
        assert_bound(x, q)


def test_attention_path_applies_scales_after_integer_product():
    """What attention does: (q·Bᵀ)·C_intᵀ, then the per-row scale; equals using dequantized C."""
    g = torch.Generator().manual_seed(0)
    C = torch.randn(2, 32, 8, generator=g)  # [heads, tokens, rank]
    Bas = torch.randn(2, 8, 16, generator=g)  # basis [rank, head_dim]
    qv = torch.randn(2, 1, 16, generator=g)
    for bits in (8, 4):
        qc = quantize_rows(C, bits=bits)
        ints = qc.data if bits == 8 else unpack_int4(qc.data, qc.n_cols)
        scores = ((qv @ Bas.mT) @ ints.float().mT) * qc.scales.float().mT
        ref = (qv @ Bas.mT) @ dequantize_rows(qc).mT
        torch.testing.assert_close(scores, ref, rtol=1e-5, atol=1e-5)


def test_bf16_and_half_input():
    x = torch.randn(4, 9).to(torch.bfloat16)
    q = quantize_rows(x)
    assert_bound(x, q)
    assert dequantize_rows(q, torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize(
    "x,kw,match",
    [
        (torch.tensor([[1.0, float("nan")]]), {}, "NaN or inf"),
        (torch.tensor([[1.0, float("inf")]]), {}, "NaN or inf"),
        (torch.ones(2, 3, dtype=torch.int32), {}, "floating"),
        (torch.ones(2, 3), {"bits": 3}, "bits must be 8 or 4"),
        (torch.ones(2, 3), {"scale_dtype": torch.int8}, "scale_dtype"),
        (torch.ones(2, 0), {}, "at least one column"),
        (torch.full((1, 2), 1e9), {}, "overflows"),
    ],
)
def test_bad_input_is_a_value_error(x, kw, match):
    with pytest.raises(ValueError, match=match):
        quantize_rows(x, **kw)


def test_pack_rejects_out_of_range_and_unpack_checks_width():
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        pack_int4(torch.tensor([[9]], dtype=torch.int8))
    with pytest.raises(ValueError, match="bytes per row"):
        unpack_int4(torch.zeros(1, 3, dtype=torch.uint8), 8)
