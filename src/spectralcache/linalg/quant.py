"""Symmetric per-row quantization of low-rank coefficients (int8, or int4 packed in uint8).

Why per row: a cold block's coefficient row ``t`` holds token ``t``'s coordinates in
the block's basis, and token norms vary a lot (attention sinks, outliers), so one scale
per token keeps every token's relative error bounded.

Layout (the contract attention relies on, see ``cache/state.py``):

* ``bits=8``: ``data`` is ``int8 [..., rows, cols]`` with values in ``[-127, 127]``.
* ``bits=4``: ``data`` is ``uint8 [..., rows, ceil(cols / 2)]``; column ``2j`` is the low
  nibble of byte ``j`` and column ``2j + 1`` the high nibble, each a two's-complement
  4-bit value in ``[-7, 7]``; an odd last column is padded with 0.
* ``scales``: ``[..., rows, 1]`` in ``scale_dtype`` (float16 by default), so
  ``x ≈ data * scales`` broadcasts (:func:`quantize_cols`: ``[..., 1, cols]``, one per column,
  for keys stored with ``key_codec="channel"``; only the scale differs). Because the scale is
  per row, attention can multiply the raw integer coefficients (cast to float) first and apply
  the scale afterwards:
  keys ``scores[..., t] = (q @ Bᵀ) @ C[t]ᵀ * s[t]``, values ``p @ (s * C) = (p * sᵀ) @ C``.

Guarantee: ``|x - dequantize(quantize(x))| <= scale / 2`` per element (plus float32
rounding), with ``scale`` the *stored* scale: the scale is rounded up to the next
representable value of ``scale_dtype`` before the integers are computed, so no value
is clipped. A zero row gets scale 0 and zero data (no NaN or inf).

Zero points (:func:`quantize_cols` with ``zero_point=True``, ``key_zero_point`` in the config):
``x ≈ data * scales + offsets`` with ``offsets [..., 1, cols]`` float32, one per column, and
the integers using every level of the width (``[-8, 7]`` / ``[-128, 127]``): the column's range
``[lo, hi]`` is mapped onto the levels instead of ``[-max|x|, max|x|]``. A key channel whose
values sit far from zero in a block (RoPE's slow dimensions barely turn over 512 tokens) keeps
up to ~2x less error per element at the same bytes (measured on Gemma 3 270M's keys:
``docs/fidelity.md``). The integers are computed against the *stored* offset and the scale is
rounded up after it is known, so the guarantee above holds unchanged.
Attention folds the offset into one dot product per block: ``q·(s ⊙ c_t + z) = (q ⊙ s)·c_t + q·z``.

Column groups (:func:`quantize_cols` with ``group_rows``, ``key_group_size`` in the config): the
rows are split into ``G = ceil(rows / group_rows)`` groups of ``L = ceil(rows / G)`` rows (the last
one shorter), each with its own column scales (and offsets): ``scales [..., G, cols]``; row ``t``
uses group ``t // L`` (:func:`expand_col_groups`). The guarantee holds per group.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "QuantizedRows",
    "dequantize_rows",
    "expand_col_groups",
    "pack_int4",
    "quantize_cols",
    "quantize_rows",
    "split_row_groups",
    "unpack_int4",
]

_QMAX = {8: 127, 4: 7}
# the levels a zero-point column uses: [-2**(bits-1), 2**(bits-1) - 1]
_QMIN_ASYM = {8: -128, 4: -8}
_SCALE_DTYPES = (torch.float16, torch.float32)


@dataclass(frozen=True)
class QuantizedRows:
    """Integer rows plus their scales; see the module docstring for the layout. ``scales`` is
    ``[..., rows, 1]`` (one per row, :func:`quantize_rows`) or ``[..., 1, cols]`` (one per
    column, :func:`quantize_cols`); either way ``x ≈ data * scales`` broadcasts."""

    data: torch.Tensor
    scales: torch.Tensor
    bits: int
    n_cols: int
    # zero points, [..., 1, cols] float32 (quantize_cols(zero_point=True)); None: symmetric
    offsets: torch.Tensor | None = None

    @property
    def shape(self) -> torch.Size:
        """Shape of the tensor this represents."""
        return torch.Size((*self.data.shape[:-1], self.n_cols))

    def nbytes(self) -> int:
        return sum(
            t.numel() * t.element_size() for t in (self.data, self.scales, self.offsets) if t is not None
        )


def _check_bits(bits: int) -> int:
    if bits not in _QMAX:
        raise ValueError(f"bits must be 8 or 4, got {bits!r}")
    return _QMAX[bits]


def pack_int4(values: torch.Tensor) -> torch.Tensor:
    """int8 values in [-8, 7] ``[..., cols]`` -> uint8 ``[..., ceil(cols/2)]`` (two per byte)."""
    if values.dtype != torch.int8:
        raise ValueError(f"pack_int4 expects int8 values, got {values.dtype}")
    if values.numel() and (int(values.min()) < -8 or int(values.max()) > 7):
        raise ValueError("pack_int4 values must lie in [-8, 7]")
    return _pack(values)


def _pack(values: torch.Tensor) -> torch.Tensor:
    if values.shape[-1] % 2:
        values = torch.nn.functional.pad(values, (0, 1))
    nib = values.to(torch.uint8) & 0xF  # two's complement nibble
    return nib[..., 0::2] | (nib[..., 1::2] << 4)


def unpack_int4(data: torch.Tensor, n_cols: int) -> torch.Tensor:
    """uint8 ``[..., ceil(n_cols/2)]`` -> int8 ``[..., n_cols]`` in [-8, 7] (sign-extended)."""
    if data.dtype != torch.uint8:
        raise ValueError(f"unpack_int4 expects uint8 data, got {data.dtype}")
    if data.shape[-1] != (n_cols + 1) // 2:
        raise ValueError(
            f"data has {data.shape[-1]} bytes per row, {n_cols} columns need {(n_cols + 1) // 2}"
        )
    lo = (data & 0xF).to(torch.int16)
    hi = (data >> 4).to(torch.int16)
    both = torch.stack((lo, hi), dim=-1).flatten(-2)[..., :n_cols]
    return ((both ^ 8) - 8).to(torch.int8)


def _round_up_scale(s32: torch.Tensor, scale_dtype: torch.dtype) -> torch.Tensor:
    s = s32.to(scale_dtype)
    if scale_dtype == torch.float32:
        return s
    up = torch.nextafter(s, torch.full_like(s, float("inf")))
    return torch.where(s.float() < s32, up, s)


def _quantize(
    x: torch.Tensor,
    bits: int,
    scale_dtype: torch.dtype,
    check_finite: bool,
    dim: int,
    name: str,
    what: str,
    zero_point: bool = False,
) -> QuantizedRows:
    """Quantization of ``x [..., rows, cols]`` with one scale per slice along ``dim`` (-1: per
    row, -2: per column), symmetric or with a float32 zero point per slice; the integers always
    packed along the columns."""
    qmax = _check_bits(bits)
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ValueError(f"{name} needs a floating tensor, got {getattr(x, 'dtype', type(x))}")
    if x.ndim < -dim or any(x.shape[k] == 0 for k in range(dim, 0)):
        raise ValueError(f"{name} needs {what}, got shape {tuple(x.shape)}")
    if scale_dtype not in _SCALE_DTYPES:
        raise ValueError(f"scale_dtype must be torch.float16 or torch.float32, got {scale_dtype}")
    xf = x.float()
    lo, hi = torch.aminmax(xf, dim=dim, keepdim=True)  # max |x| without a full-size abs() temporary
    amax = torch.maximum(hi, -lo)
    if check_finite and not bool(torch.isfinite(amax).all()):
        raise ValueError(f"{name} input contains NaN or inf")
    if zero_point:
        offsets, (qmin, qmax), need = _zero_point(lo, hi, bits)
        centred = xf - offsets
    else:
        offsets, qmin, need, centred = None, -qmax, amax / qmax, xf
    scales = _round_up_scale(need, scale_dtype)
    if check_finite and not bool(torch.isfinite(scales).all()):
        kind = "row" if dim == -1 else "column"
        raise ValueError(
            f"{kind} magnitude {float(amax.max()):.3g} overflows {scale_dtype} scales; use float32"
        )
    s = scales.float()
    q = torch.round(centred / torch.where(s > 0, s, 1.0)).clamp_(qmin, qmax).to(torch.int8)
    data = q if bits == 8 else _pack(q)
    return QuantizedRows(data=data, scales=scales, bits=bits, n_cols=x.shape[-1], offsets=offsets)


def _zero_point(
    lo: torch.Tensor, hi: torch.Tensor, bits: int
) -> tuple[torch.Tensor, tuple[int, int], torch.Tensor]:
    """``(offsets, (qmin, qmax), scale needed)`` of ``x ≈ data * scale + offset`` on the levels
    ``[qmin, qmin + 2**bits - 1]``.

    The offset is fixed first (float32: ``lo - qmin * (hi - lo) / (2**bits - 1)``), then the scale
    needed is the smallest one that maps ``[lo, hi]`` into the levels *around that offset* (rounded
    up to the scale dtype by the caller): no value is clipped and ``|x - x̂| <= scale / 2`` holds
    exactly as for the symmetric quantizer. A constant slice gets scale 0, data 0 and the constant
    as offset."""
    qmin = _QMIN_ASYM[bits]
    qmax = qmin + (1 << bits) - 1
    offsets = lo - qmin * ((hi - lo) / (qmax - qmin))
    need = torch.maximum((hi - offsets) / qmax, (offsets - lo) / -qmin).clamp_min(0.0)
    return offsets, (qmin, qmax), need


def quantize_rows(
    x: torch.Tensor, bits: int = 8, scale_dtype: torch.dtype = torch.float16, *, check_finite: bool = True
) -> QuantizedRows:
    """Quantize each row (last dim) of ``x [..., rows, cols]`` symmetrically to ``bits`` bits.

    ``check_finite=False`` skips the two host-side checks (NaN/inf input, scale overflow), which
    synchronize on CUDA, for a caller that has already refused such rows (``compress_blocks``);
    the result is the same for every input those checks pass."""
    return _quantize(x, bits, scale_dtype, check_finite, -1, "quantize_rows", "rows with at least one column")


def quantize_cols(
    x: torch.Tensor,
    bits: int = 8,
    scale_dtype: torch.dtype = torch.float16,
    *,
    check_finite: bool = True,
    zero_point: bool = False,
    group_rows: int | None = None,
) -> QuantizedRows:
    """Quantize ``x [..., rows, cols]`` symmetrically to ``bits`` bits with one scale per
    *column*: ``scales [..., 1, cols]``; the integers are stored and packed exactly as
    :func:`quantize_rows` stores them (int8, or two int4 per byte along the columns), so every
    reader of the row layout reads them, multiplying by the column scales instead.

    Why: keys carry a few channels far larger than the rest, the same in every token (KIVI,
    Liu et al. 2024); one scale per token is set by those channels and rounds the others to
    nothing at 4 bits, one scale per channel does not. Same guarantee as :func:`quantize_rows`
    per element: ``|x - dequantize| <= scale / 2`` with the stored (rounded-up) scale;
    ``check_finite`` as there. ``zero_point``: a float32 offset per column as well (module
    docstring), every integer level used. ``group_rows``: one scale (and offset) per column
    and group of rows instead (module docstring): ``scales [..., G, cols]``."""
    what = "[..., rows, cols] with rows, cols >= 1"
    rows = x.shape[-2] if isinstance(x, torch.Tensor) and x.ndim >= 2 else 0
    if group_rows is not None and group_rows < 1:
        raise ValueError(f"quantize_cols: group_rows must be >= 1, got {group_rows}")
    if group_rows is None or rows <= group_rows:
        return _quantize(x, bits, scale_dtype, check_finite, -2, "quantize_cols", what, zero_point)
    q = _quantize(
        split_row_groups(x, group_rows),
        bits,
        scale_dtype,
        check_finite,
        -2,
        "quantize_cols",
        what,
        zero_point,
    )
    # the padding rows' integers are cut off again
    data = q.data.reshape(*x.shape[:-2], -1, q.data.shape[-1])[..., :rows, :]
    offsets = None if q.offsets is None else q.offsets.squeeze(-2)
    return QuantizedRows(
        data=data.contiguous(), scales=q.scales.squeeze(-2), bits=bits, n_cols=q.n_cols, offsets=offsets
    )


def split_row_groups(x: torch.Tensor, group_rows: int | None) -> torch.Tensor:
    """``x [..., rows, cols]`` -> ``[..., G, L, cols]``, the row groups of :func:`quantize_cols`
    (one group when ``group_rows`` is None or ``rows <= group_rows``). The last group is padded by
    repeating the last row: inside that group's range, so per-group ranges are the real rows'."""
    rows = x.shape[-2]
    groups = 1 if group_rows is None or rows <= group_rows else -(-rows // group_rows)
    length = -(-rows // groups)
    pad = groups * length - rows
    if pad:
        x = torch.cat([x, x[..., -1:, :].expand(*x.shape[:-2], pad, x.shape[-1])], dim=-2)
    return x.reshape(*x.shape[:-2], groups, length, x.shape[-1])


def expand_col_groups(t: torch.Tensor | None, rows: int) -> torch.Tensor | None:
    """Column scales or offsets of :func:`quantize_cols` ``[..., G, cols]`` -> a tensor that
    broadcasts against ``[..., rows, cols]``: unchanged for one group (``[..., 1, cols]``), per-row
    scales (``[..., rows, 1]``) or ``G == rows``; else group ``g`` repeated over its rows
    ``[g·L, (g+1)·L)``, ``L = ceil(rows / G)``."""
    if t is None or t.shape[-2] in (1, rows):
        return t
    length = -(-rows // t.shape[-2])
    return t.repeat_interleave(length, dim=-2)[..., :rows, :]


def dequantize_rows(q: QuantizedRows, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Back to floats: ``data * scales (+ offsets)`` (computed in float32, returned in ``dtype``)."""
    _check_bits(q.bits)
    ints = q.data if q.bits == 8 else unpack_int4(q.data, q.n_cols)
    if ints.dtype != torch.int8:
        raise ValueError(f"8-bit QuantizedRows data must be int8, got {ints.dtype}")
    rows = ints.shape[-2]
    out = ints.float() * expand_col_groups(q.scales, rows).float()
    if q.offsets is not None:
        out = out + expand_col_groups(q.offsets, rows).float()
    return out.to(dtype)
