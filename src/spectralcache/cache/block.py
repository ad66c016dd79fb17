"""Compression of full blocks of keys and values (batched over any leading dims).

One block is ``T`` tokens of one KV head: ``K, V [T, D]``. It becomes

* a low-rank fit per matrix, ``K ≈ C_K B_K`` with coefficients ``C_K = U S [T, rk]`` and an
  orthonormal basis ``B_K = Vh [rk, D]`` (likewise values with ``rv``);
* coefficients quantized per row (int8, or packed int4, with a float16 scale per row; or
  kept in the model dtype when ``coeff_bits == 16``); the basis in the storage dtype;
* ``o`` outlier tokens kept exact (keys and values, with their in-block index).

With ``key_codec`` / ``value_codec == "identity"`` that side has no basis (stored as None):
the rows themselves are the coefficients, ``[T, D]`` quantized per token, so only the
quantization error remains. On Gemma 3 270M prose blocks the post-RoPE keys lose needle
retrieval at rank 32-64 (layer 11 alone was enough to break it), while int8 rows of the same
blocks keep the baseline's answers (``docs/fidelity.md``). ``key_codec == "channel"`` stores
the key rows likewise but with one scale per channel of the block (``[..., 1, D]``), set without
the block's outlier tokens (the keys are quantized once the outliers are chosen).

Outlier score: the per-token reconstruction error *of the stored representation* (after
quantization and basis rounding), keys and values each normalised by the block's mean
squared token norm, summed::

    score_t = ||k_t - k̂_t||² / mean_s ||k_s||²  +  ||v_t - v̂_t||² / mean_s ||v_s||²

A needle token whose direction is outside the block's dominant subspace has a residual of
about its whole energy; a massive-activation / attention-sink token (large key norm) has a
large *absolute* residual from both the truncated spectrum and int8 rounding (which is
relative to the row maximum), so absolute (not per-token relative) residuals are what is
ranked. The normalisation by the block mean only makes keys and values commensurable.
With ``key_codec="channel"`` the key term is ``max_c (|k_tc| / rms_c)²`` instead (rms_c: the
channel's RMS over the block): the token that sets a channel's range is the one stored best,
so its residual would never pick it; this term is ~10-100 where the value term is ~0.01-0.1, so
there outliers are chosen by the keys.

With ``refit_after_outliers`` the basis is fitted again on the block with the outlier rows
zeroed: they are served exactly, so the rank is spent on the remaining tokens (optional:
it doubles the compression cost for a small gain on real K/V).

Measured on real Gemma 3 270M K/V (3 full-attention layers, 7 blocks of 512, rank 32/64
int8, 32 outliers; relative attention-output error of the last 256 real queries), this
score was as good as or better than key-only, value-only, key-norm-weighted and
per-token-relative variants; value-only doubled the error on the last layer.

Compression is deterministic for a given seed and independent of how many blocks are
compressed together: the random test matrix of the randomized SVD is drawn once per call
with shape ``[D, rank + oversample]`` and shared by every block of the batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from spectralcache.cache.deferred import DeferredCheck, should_defer
from spectralcache.cache.state import ColdBlocks
from spectralcache.config import BASISLESS_CODECS, SpectralConfig

__all__ = [
    "compress_blocks",
    "dequantize_coeffs",
    "low_rank_fit",
    "reconstruct",
    "reconstruct_keys",
    "reconstruct_values",
]


# --------------------------------------------------------------------------- linalg glue


def _rsvd_module():  # late import keeps ``import spectralcache.cache.block`` cheap
    from spectralcache.linalg import rsvd

    return rsvd


def _quant_module():
    from spectralcache.linalg import quant

    return quant


def fit_solver(config: SpectralConfig, device: torch.device) -> str:
    """Which randomized solver ``config.svd_solver`` means on ``device``: ``"auto"`` is the
    eigensolver-free subspace iteration on CUDA (no host sync; the rsvd's batched ``l x l``
    eigenproblems were most of a layer's compression there) and the rsvd elsewhere."""
    if config.svd_solver == "auto":
        return "subspace" if device.type == "cuda" else "rsvd"
    return config.svd_solver


def low_rank_fit(
    m: torch.Tensor,
    rank: int,
    config: SpectralConfig,
    generator: torch.Generator | None,
    *,
    bounded: bool = False,
    lowp: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``m [N, T, D]`` (compute dtype) -> coefficients ``[N, T, r]`` and orthonormal basis ``[N, r, D]``.

    Exact and rsvd fits return ``U S`` and ``Vh`` (ordered by singular value); the subspace
    solver returns ``M Z`` and ``Zᵀ`` for an orthonormal ``Z`` in no particular order. Callers
    use only the product and the basis' orthonormality (nothing reads singular values).

    For the subspace solver: ``bounded`` says the caller bounded ``m``'s magnitude (its float32
    Gram cannot overflow), which saves its pre-scaling pass; ``lowp`` is a half-precision copy
    holding exactly ``m``'s values, for tensor-core GEMMs (see ``subspace_fit``)."""
    rsvd = _rsvd_module()
    if config.svd_method == "exact" or rank >= min(m.shape[-2], m.shape[-1]):
        u, s, vh = rsvd.truncated_svd(m, rank)
    elif fit_solver(config, m.device) == "subspace":
        from spectralcache.linalg.subspace import subspace_fit

        fit = subspace_fit(
            m,
            rank,
            n_iter=config.svd_subspace_iter,
            generator=generator,
            prescale=not bounded,
            lowp=lowp if bounded else None,
        )
        return fit.coeffs, fit.basis
    else:
        u, s, vh = rsvd.randomized_svd(
            m,
            rank,
            n_iter=config.svd_n_iter,
            oversample=config.svd_oversample,
            orth=config.svd_orth,
            generator=generator,
        )
    return u * s.unsqueeze(-2), vh


def _quantize(
    coeffs: torch.Tensor,
    bits: int,
    model_dtype: torch.dtype,
    per_channel: bool = False,
    zero_point: bool = False,
    group_rows: int | None = None,
):
    """-> (stored coeffs, float16 scales [..., T, 1] or None, float32 offsets [..., 1, D] or None)
    via the project's quantizer (``per_channel``: scales ``[..., 1, D]``, one per column of each
    block, ``key_codec="channel"``; ``zero_point``: with a per-column offset, ``key_zero_point``;
    ``group_rows``: ``[..., G, D]``, one per column and group of rows, ``key_group_size``).

    On CUDA without ``quantize_rows``' two host-side checks (``check_finite=False``):
    ``compress_blocks`` has already refused non-finite blocks and taken rows whose scale could
    overflow out of the fit, so those checks cannot fire there and would only cost two
    synchronizations per side."""
    if bits == 16:
        # copy=True: with the identity codec the "coefficients" are the input rows themselves,
        # and the cold tier must own its storage (no aliasing of, or pinning, the hot buffer)
        return coeffs.to(model_dtype, copy=True), None, None
    quant = _quant_module()
    finite = not coeffs.is_cuda
    if per_channel:
        q = quant.quantize_cols(
            coeffs,
            bits=bits,
            scale_dtype=torch.float16,
            check_finite=finite,
            zero_point=zero_point,
            group_rows=group_rows,
        )
    else:
        q = quant.quantize_rows(coeffs, bits=bits, scale_dtype=torch.float16, check_finite=finite)
    return q.data, q.scales, q.offsets


def dequantize_coeffs(
    coeffs: torch.Tensor,
    scales: torch.Tensor | None,
    bits: int,
    rank: int,
    dtype: torch.dtype = torch.float32,
    offsets: torch.Tensor | None = None,
) -> torch.Tensor:
    """Stored coefficients -> ``[..., T, rank]`` in ``dtype`` (scales and zero points applied)."""
    if bits == 16:
        return coeffs.to(dtype)
    quant = _quant_module()
    return quant.dequantize_rows(
        quant.QuantizedRows(data=coeffs, scales=scales, bits=bits, n_cols=rank, offsets=offsets), dtype
    )


_HALF = (torch.float16, torch.bfloat16)
_SCALE_MARGIN = 0.99  # headroom for the rounding of the fit and of the scale (rounded up)


def _coeff_limit(bits: int, model_dtype: torch.dtype) -> float:
    """Largest |coefficient| a stored row may hold: ``max|row| / qmax`` must be a finite
    float16 scale (int8 / int4), or the coefficient itself finite in the model dtype (16 bits)."""
    if bits == 16:
        return torch.finfo(model_dtype).max * _SCALE_MARGIN
    qmax = 127 if bits == 8 else 7
    return torch.finfo(torch.float16).max * qmax * _SCALE_MARGIN


def _overflowing_rows(
    x: torch.Tensor, bits: int, codec: str, model_dtype: torch.dtype, dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ``x [N, T, D]`` whose coefficients could exceed :func:`_coeff_limit`, and rows
    holding NaN or inf: two ``[N, T]`` bools (an inf row is in both).

    A low-rank coefficient row is the row projected on an orthonormal basis, so each entry is
    at most the row's norm, itself at most ``sqrt(D) * max|x|`` (computed without squaring, so
    it cannot overflow); an identity-codec row's coefficients are its own entries. ``x`` may
    be the model-dtype rows the compute-dtype ones came from (half the bytes to read); the
    bound is evaluated in ``dtype`` (default x's)."""
    lo, hi = torch.aminmax(x, dim=-1)  # max |x| per row without a full-size abs() temporary
    amax = torch.maximum(hi, -lo).to(dtype or x.dtype)  # NaN if the row holds one (aminmax propagates NaN)
    bound = amax if codec in BASISLESS_CODECS else amax * math.sqrt(x.shape[-1])
    return bound > _coeff_limit(bits, model_dtype), ~torch.isfinite(amax)


def _row_sq_norm(x: torch.Tensor) -> torch.Tensor:
    return x.square().sum(-1)


def _block_energy(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Mean squared row norm of each block of ``x [N, T, D]``, ``[N, 1]`` in ``dtype`` (one
    reduction, accumulated in ``dtype`` whatever x's storage dtype)."""
    return (
        torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True, dtype=dtype).square().squeeze(-1)
        / x.shape[-2]
    )


def _row_sq_norm_fused(x: torch.Tensor) -> torch.Tensor:
    """``_row_sq_norm`` as one reduction kernel (no full-size ``square()`` temporary)."""
    return torch.linalg.vector_norm(x, dim=-1).square()


def outlier_score(
    keys: torch.Tensor, keys_rec: torch.Tensor, values: torch.Tensor, values_rec: torch.Tensor
) -> torch.Tensor:
    """Per-token score ``[N, T]``: squared residuals of the stored representation, keys and
    values each normalised by the block's mean squared token norm (see the module docstring)."""
    eps = torch.finfo(keys.dtype).tiny
    k_energy = _row_sq_norm(keys).mean(-1, keepdim=True).clamp_min(eps)
    v_energy = _row_sq_norm(values).mean(-1, keepdim=True).clamp_min(eps)
    return _row_sq_norm(keys - keys_rec) / k_energy + _row_sq_norm(values - values_rec) / v_energy


def _fit_and_store(
    m: torch.Tensor,
    rank: int,
    config: SpectralConfig,
    generator: torch.Generator | None,
    model_dtype: torch.dtype,
    basis_dtype: torch.dtype,
    codec: str = "lowrank",
    bits: int | None = None,
    residuals: bool = True,
    lowp: torch.Tensor | None = None,
    zero_point: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Fit + quantize (``bits`` default ``config.coeff_bits``); returns (stored coeffs, scales,
    stored basis or None for the identity codec, per-row squared residual ``||m_t - m̂_t||²``
    of the stored representation ``[N, T]`` in compute dtype, or None without ``residuals``,
    per-channel zero points or None: ``zero_point`` with the channel codec).

    The residual is formed by one GEMM with ``m`` as its addend (``m - C B``), not by
    materializing the reconstruction and subtracting it: on a 128K-token layer each full-size
    ``[N, T, D]`` float32 pass is ~0.5 GB of memory traffic."""
    bits = config.coeff_bits if bits is None else bits
    if codec in BASISLESS_CODECS:
        channel = codec == "channel"
        q, scales, offsets = _quantize(
            m,
            bits,
            model_dtype,
            per_channel=channel,
            zero_point=channel and zero_point,
            group_rows=config.key_group_size if channel else None,
        )
        res = None
        if residuals:
            res = _row_sq_norm_fused(m - dequantize_coeffs(q, scales, bits, m.shape[-1], m.dtype, offsets))
        return q.contiguous(), None if scales is None else scales.contiguous(), None, res, offsets
    # int8 / int4 coefficients: compress_blocks took every row whose coefficients could pass
    # _coeff_limit (~8e6) out of the fit, so |m| and hence its float32 Gram are bounded
    coeffs, basis = low_rank_fit(m, rank, config, generator, bounded=bits in (4, 8), lowp=lowp)
    q, scales, _ = _quantize(coeffs, bits, model_dtype)
    basis_stored = basis.to(basis_dtype).contiguous()
    res = None
    if residuals:
        c = dequantize_coeffs(q, scales, bits, rank, m.dtype)
        res = _row_sq_norm_fused(torch.baddbmm(m, c, basis_stored.to(m.dtype), alpha=-1.0))
    return q.contiguous(), None if scales is None else scales.contiguous(), basis_stored, res, None


def _outside_range(
    kf: torch.Tensor, drop: torch.Tensor, zero_point: bool, group_rows: int | None = None
) -> torch.Tensor:
    """``kf [N, T, D]`` with the rows ``drop [N, T, 1]`` (served exactly) made neutral for the
    channel quantizer: 0 for symmetric scales (inside every range), the middle of the kept rows'
    range with zero points (a 0 would stretch a channel whose values sit far from zero) -- of
    the rows' own group with ``group_rows`` (the groups of ``quant.quantize_cols``)."""
    if not zero_point:
        return kf.masked_fill(drop, 0.0)
    n, t, d = kf.shape
    # the quantizer's own groups (its padding repeats the last row and its flag: no range changes)
    split = _quant_module().split_row_groups
    kp, dp = split(kf, group_rows), split(drop, group_rows)
    lo = kp.masked_fill(dp, float("inf")).amin(-2, keepdim=True)
    hi = kp.masked_fill(dp, float("-inf")).amax(-2, keepdim=True)
    # a group whose rows are all served exactly has no range to keep: any finite value will do
    mid = torch.where(lo <= hi, (lo + hi) * 0.5, torch.zeros_like(lo))
    return torch.where(dp, mid, kp).reshape(n, -1, d)[:, :t]


def _top_outliers(
    score: torch.Tensor, o: int, spans: int, forced: torch.Tensor | None, per_span: int
) -> torch.Tensor:
    """Sorted indices ``[N, o]`` of each block's exact tokens: the ``o`` highest ``score [N, T]``;
    with ``spans > 1`` first the ``per_span`` highest of each of ``spans``
    near-equal spans (span ``j`` = the rows ``t`` with ``t·spans // T == j``, each at least ``o /
    spans`` long as ``o < T``), then the highest of the remaining rows up to ``o``. ``forced [N, T]``:
    rows that must be kept (too large to quantize; their score is inf); a block whose forced rows are
    not all chosen so takes the plain top ``o``, which holds them all (``compress_blocks`` refused
    blocks with more than ``o``)."""
    top = score.topk(o, dim=-1).indices
    if spans > 1 and per_span > 0:
        t = score.shape[-1]
        span_of = (torch.arange(t, device=score.device) * spans) // t  # [T]
        parts = [
            score.masked_fill(span_of != j, float("-inf")).topk(per_span, dim=-1).indices
            for j in range(spans)
        ]
        spread = torch.cat(parts, dim=-1)
        rest = o - spans * per_span
        if rest:
            taken = torch.zeros_like(score, dtype=torch.bool).scatter_(1, spread, True)
            spread = torch.cat(
                [spread, score.masked_fill(taken, float("-inf")).topk(rest, dim=-1).indices], -1
            )
        if forced is not None:
            kept = torch.zeros_like(forced).scatter_(1, spread, True)
            lost = (forced & ~kept).any(-1, keepdim=True)
            spread = torch.where(lost, top, spread)
        top = spread
    return top.sort(dim=-1).values


def _within_block_rank(x: torch.Tensor) -> torch.Tensor:
    """Rank of each row of ``x [N, T]`` within its block, scaled to [0, 1] (1 = largest)."""
    t = x.shape[-1]
    ranks = x.argsort(dim=-1).argsort(dim=-1).to(x.dtype)
    return ranks / max(t - 1, 1)


def _selection_score(residual: torch.Tensor, importance: torch.Tensor, selection: str) -> torch.Tensor:
    """Outlier score ``[N, T]`` for ``SpectralConfig.outlier_selection`` (largest = kept exact).

    ``"attention"``: the importance itself. ``"mixed"``: within-block rank of the residual plus
    that of the importance (ranks, because the two scales are incommensurable: importance is a
    sum of softmax weights, the residual a normalised squared error)."""
    if importance.shape != residual.shape:
        raise ValueError(
            f"importance has {tuple(importance.shape)} rows for blocks of {tuple(residual.shape)} tokens"
        )
    if selection == "attention":
        return importance
    if selection == "mixed":
        return _within_block_rank(residual) + _within_block_rank(importance)
    raise ValueError(f"unknown outlier_selection {selection!r}")


def compress_blocks(
    keys: torch.Tensor,
    values: torch.Tensor,
    config: SpectralConfig,
    rank_keys: int,
    rank_values: int,
    *,
    basis_dtype: torch.dtype | None = None,
    exact_keys: torch.Tensor | None = None,
    block_starts: torch.Tensor | None = None,
    block_size: int | None = None,
    importance: torch.Tensor | None = None,
    deferred_checks: list[DeferredCheck] | None = None,
) -> ColdBlocks:
    """Compress blocks ``keys, values [..., T, D]`` in one batched call (no loop over blocks or heads).

    ``keys`` is what the low-rank fit sees (pre-RoPE keys in ``pre_rope`` mode); ``exact_keys``
    (default ``keys``) is what outliers store, i.e. the post-RoPE keys as the model cached
    them. Stored dtypes follow ``values.dtype`` (the model dtype). ``block_starts`` (the cache
    index of each block along the last leading dim; default ``0, T, 2T, ...``) is stored as is.
    ``block_size`` (default ``config.block_size``) is the block length the caller means: a layer
    re-blocked by ``SpectralConfig.compress_tail`` passes its own ``T'``.
    ``importance`` (``[..., T]``, any non-negative float; optional): per-token attention received
    (``SpectralConfig.outlier_selection``). With ``"attention"`` the outliers are the ``o`` most
    important tokens, with ``"mixed"`` those with the largest sum of within-block ranks of
    importance and residual (each scaled to [0, 1]); without it, or with ``"residual"``, the
    residual alone ranks them. Overflowing rows are forced outliers whatever the selection.

    Rows too large for the stored coefficients (a per-row float16 scale would overflow, or a
    16-bit coefficient the model dtype; see :func:`_overflowing_rows`) are kept exact as
    outliers and left out of the fit. A block with more such rows than ``outliers_per_block``
    cannot be stored: ValueError (nothing is returned, so a caller's cache stays unchanged).

    ``deferred_checks`` (a list, from a forward that reads its checks at its end; see
    :mod:`spectralcache.cache.deferred`): on a device where checks are deferred, that refusal is
    appended to it as a device flag instead of being read here (no host synchronization), and
    the blocks are returned in any case: rows holding NaN / inf are then kept out of the fit like
    huge ones, and the caller must discard the result if the flag comes back set.
    """
    if keys.shape != values.shape:
        raise ValueError(f"keys {tuple(keys.shape)} and values {tuple(values.shape)} differ in shape")
    if keys.ndim < 2:
        raise ValueError(f"blocks must be [..., T, D], got shape {tuple(keys.shape)}")
    exact_keys = keys if exact_keys is None else exact_keys
    if exact_keys.shape != keys.shape:
        raise ValueError("exact_keys must have the shape of keys")
    *lead, t, d = keys.shape
    expected_t = config.block_size if block_size is None else block_size
    if t != expected_t:
        raise ValueError(f"a block has {t} tokens but block_size is {expected_t}")
    if importance is not None and tuple(importance.shape) != (*lead, t):
        raise ValueError(
            f"importance must be {(*lead, t)} (one score per token), got {tuple(importance.shape)}"
        )
    if config.outliers_per_block >= t:
        raise ValueError(f"outliers_per_block={config.outliers_per_block} must be < the block's {t} tokens")
    for rank, codec, side in (
        (rank_keys, config.key_codec, "keys"),
        (rank_values, config.value_codec, "values"),
    ):
        if codec in BASISLESS_CODECS:
            if rank != d:
                raise ValueError(f"{codec} codec for {side}: rank must be head_dim={d}, got {rank}")
        elif rank > min(t, d):
            raise ValueError(f"ranks ({rank_keys}, {rank_values}) exceed min(T, D) = {min(t, d)}")
    model_dtype = values.dtype
    basis_dtype = config.basis_torch_dtype(model_dtype) if basis_dtype is None else basis_dtype
    cdt = config.compute_torch_dtype()
    n = 1
    for s in lead:
        n *= s
    kf = keys.reshape(n, t, d).to(cdt)
    vf = values.reshape(n, t, d).to(cdt)
    o = config.outliers_per_block
    vbits = config.value_bits
    # read from the caller's tensors (kf / vf hold exactly their values, converted)
    k_huge, k_bad = _overflowing_rows(
        keys.reshape(n, t, d), config.coeff_bits, config.key_codec, model_dtype, cdt
    )
    v_huge, v_bad = _overflowing_rows(values.reshape(n, t, d), vbits, config.value_codec, model_dtype, cdt)
    huge = k_huge | v_huge  # [N, T]
    n_huge = huge.sum(-1)
    bad_rows = k_bad | v_bad

    def refusal(nonfinite: bool, worst: int, max_abs: float | None) -> str:
        # small arguments only: a deferred message must not keep the blocks' float copies alive
        if nonfinite:
            return (
                "keys/values contain NaN or inf; compress_blocks needs finite blocks (nothing was compressed)"
            )
        largest = "" if max_abs is None else f"max |value| {max_abs:.3g}; "
        return (
            f"a block has {worst} rows too large for {config.coeff_bits}/{vbits}-bit coefficients "
            f"({largest}per-row float16 scales overflow); at most outliers_per_block={o} such rows "
            "per block can be kept exact"
        )

    if deferred_checks is not None and should_defer(keys):
        # read at the forward's end: bad rows join the huge ones (kept out of the fit, served
        # exactly) so nothing below sees a NaN; the caller discards the blocks if this is set
        nonfinite_t = bad_rows.any()
        worst_t = n_huge.max() if n_huge.numel() else n_huge.new_zeros(())
        deferred_checks.append(
            DeferredCheck(nonfinite_t | (worst_t > o), lambda: refusal(bool(nonfinite_t), int(worst_t), None))
        )
        huge = huge | bad_rows
        any_huge = True
    else:
        # The one host synchronization of a call (everything after it, fit and quantization
        # included, is queued without reading anything back on CUDA): it refuses what cannot be
        # stored before anything is computed, so a caller's cache stays unchanged.
        nonfinite, excess, any_huge = torch.stack([bad_rows.any(), (n_huge > o).any(), n_huge.any()]).tolist()
        if nonfinite or excess:
            max_abs = None if nonfinite else float(torch.maximum(kf.abs().amax(), vf.abs().amax()))
            raise ValueError(refusal(nonfinite, int(n_huge.max()), max_abs))
    # the fit's half-precision copies (tensor-core GEMMs on CUDA): the model-dtype K/V that
    # kf / vf were converted from, so they hold exactly the same values
    low_ok = kf.is_cuda and cdt == torch.float32
    k_low = keys.reshape(n, t, d) if low_ok and keys.dtype in _HALF else None
    v_low = values.reshape(n, t, d) if low_ok and values.dtype in _HALF else None
    if any_huge:
        # huge rows are served exactly (forced outliers below): keep them out of the fit and the
        # scales (out of place: kf / vf may be the caller's tensors; only paid when it happens)
        kf = kf.masked_fill(huge.unsqueeze(-1), 0.0)
        vf = vf.masked_fill(huge.unsqueeze(-1), 0.0)
        k_low = None if k_low is None else k_low.masked_fill(huge.unsqueeze(-1), 0.0)
        v_low = None if v_low is None else v_low.masked_fill(huge.unsqueeze(-1), 0.0)

    def gen() -> torch.Generator:
        return torch.Generator(device=kf.device).manual_seed(config.seed)

    kc, vc = config.key_codec, config.value_codec
    want = o > 0  # residuals only rank outliers
    # per-channel key scales (quantized keys): outliers ranked by channel range, not by the key
    # residual, and the keys quantized without them once chosen
    channel_keys = kc == "channel" and config.coeff_bits != 16
    zp = config.key_zero_point
    if channel_keys and want:
        # quantized once, below, after the outliers are chosen (they stay out of the channel scales)
        kq = ks = kb = kres = ko = None
    else:
        kq, ks, kb, kres, ko = _fit_and_store(
            kf, rank_keys, config, gen(), model_dtype, basis_dtype, kc, None, want, k_low, zp
        )
    vq, vs, vb, vres, _ = _fit_and_store(
        vf, rank_values, config, gen(), model_dtype, basis_dtype, vc, vbits, want, v_low
    )

    if o > 0:
        # outlier_score(kf, k̂, vf, v̂) from the residuals _fit_and_store formed in place
        eps = torch.finfo(cdt).tiny
        # mean squared row norm per block; read from the half-precision copies where the fit had
        # them (same values, masked alike; half the bytes)
        v_energy = _block_energy(vf if v_low is None else v_low, cdt).clamp_min(eps)
        if channel_keys:
            # a token's quantization residual says nothing here: the token that sets a channel's
            # range is stored well and every other token pays for it; so rank keys by how far a
            # token stretches its channels: max over channels of |k| / the channel's RMS
            k_rms = kf.square().mean(-2, keepdim=True).sqrt().clamp_min(eps)  # [N, 1, D]
            k_term = (kf.abs() / k_rms).amax(-1).square()
        else:
            k_term = kres / _block_energy(kf if k_low is None else k_low, cdt).clamp_min(eps)
        score = k_term + vres / v_energy  # [N, T]
        if importance is not None and config.outlier_selection != "residual":
            score = _selection_score(score, importance.reshape(n, t).to(cdt), config.outlier_selection)
        score = score.masked_fill(huge, float("inf"))
        forced = huge if any_huge else None
        idx = _top_outliers(score, o, config.outlier_spans, forced, config.outliers_each_span)  # [N, o]
        if config.refit_after_outliers:
            # only a fitted basis can be re-spent; identity rows stay as they are
            keep = torch.ones(n, t, 1, dtype=cdt, device=kf.device)
            keep.scatter_(1, idx.unsqueeze(-1), 0.0)
            if kc == "lowrank":
                kq, ks, kb, _, _ = _fit_and_store(
                    kf * keep, rank_keys, config, gen(), model_dtype, basis_dtype, residuals=False
                )
            if vc == "lowrank":
                vq, vs, vb, _, _ = _fit_and_store(
                    vf * keep, rank_values, config, gen(), model_dtype, basis_dtype, "lowrank", vbits, False
                )
        if channel_keys:
            # the outliers are served exactly: their (largest) entries must not set the channel
            # scales every other token is rounded with, so the keys are quantized without them
            drop = torch.zeros(n, t, 1, dtype=torch.bool, device=kf.device)
            drop.scatter_(1, idx.unsqueeze(-1), True)
            kq, ks, kb, _, ko = _fit_and_store(
                _outside_range(kf, drop, zp, config.key_group_size),
                rank_keys,
                config,
                None,
                model_dtype,
                basis_dtype,
                kc,
                None,
                False,
                zero_point=zp,
            )
        gather = idx.unsqueeze(-1).expand(n, o, d)
        out_k = torch.gather(exact_keys.reshape(n, t, d), 1, gather)
        out_v = torch.gather(values.reshape(n, t, d), 1, gather)
    else:
        idx = torch.zeros(n, 0, dtype=torch.int64, device=kf.device)
        out_k = exact_keys.new_zeros(n, 0, d)
        out_v = values.new_zeros(n, 0, d)

    # the outlier rows' value scales set to -1 (their compressed rows are never read): a reader that loads a
    # tile's per-row scales knows its outlier rows from them (ColdBlocks.value_scales_flag_outliers; the
    # decode kernel's OUT_FLAG masks with them instead of a per-block bit mask: stop 24)
    flag_outliers = vs is not None and vs.dim() == 3 and vs.shape[1] == t and vs.shape[2] == 1
    if flag_outliers and idx.shape[1]:
        vs = vs.scatter(1, idx.unsqueeze(-1), -1.0)

    if block_starts is None:
        nb = lead[-1] if lead else 1
        block_starts = t * torch.arange(nb, dtype=torch.int64, device=kf.device)

    def shaped(x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None else x.reshape(*lead, *x.shape[1:]).contiguous()

    return ColdBlocks(
        key_coeffs=shaped(kq),
        key_scales=shaped(ks),
        key_offsets=shaped(ko),
        key_basis=shaped(kb),
        value_coeffs=shaped(vq),
        value_scales=shaped(vs),
        value_basis=shaped(vb),
        outlier_keys=shaped(out_k.to(exact_keys.dtype)),
        outlier_values=shaped(out_v.to(values.dtype)),
        outlier_index=shaped(idx.to(torch.int64)),
        block_starts=block_starts,
        value_scales_flag_outliers=flag_outliers,
        block_size=t,
        coeff_bits=config.coeff_bits,
        rank_keys=rank_keys,
        rank_values=rank_values,
        value_coeff_bits=None if vbits == config.coeff_bits else vbits,
    )


# --------------------------------------------------------------------------- reference decode


def _scatter_outliers(recon: torch.Tensor, index: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    if index.shape[-1] == 0:
        return recon
    gather = index.unsqueeze(-1).expand(*index.shape, recon.shape[-1])
    return recon.scatter(-2, gather, exact.to(recon.dtype))


def reconstruct_keys(
    blocks: ColdBlocks,
    rotate: Callable[[torch.Tensor], torch.Tensor] | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Reference decode of the keys ``[..., T, D]``: low-rank part (rotated with ``rotate`` for
    pre-RoPE blocks), then the exact outlier rows written over it."""
    c = dequantize_coeffs(
        blocks.key_coeffs, blocks.key_scales, blocks.coeff_bits, blocks.rank_keys, dtype, blocks.key_offsets
    )
    recon = c if blocks.key_basis is None else c @ blocks.key_basis.to(dtype)
    if rotate is not None:
        recon = rotate(recon).to(dtype)
    return _scatter_outliers(recon, blocks.outlier_index, blocks.outlier_keys)


def reconstruct_values(blocks: ColdBlocks, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    c = dequantize_coeffs(
        blocks.value_coeffs, blocks.value_scales, blocks.value_bits, blocks.rank_values, dtype
    )
    recon = c if blocks.value_basis is None else c @ blocks.value_basis.to(dtype)
    return _scatter_outliers(recon, blocks.outlier_index, blocks.outlier_values)


def reconstruct(
    blocks: ColdBlocks,
    rotate: Callable[[torch.Tensor], torch.Tensor] | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference decode of keys and values ``[..., T, D]`` (for tests and for crop)."""
    return reconstruct_keys(blocks, rotate, dtype), reconstruct_values(blocks, dtype)
