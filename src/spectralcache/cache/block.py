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
blocks keep the baseline's answers (``docs/fidelity.md``).

Outlier score: the per-token reconstruction error *of the stored representation* (after
quantization and basis rounding), keys and values each normalised by the block's mean
squared token norm, summed::

    score_t = ||k_t - k̂_t||² / mean_s ||k_s||²  +  ||v_t - v̂_t||² / mean_s ||v_s||²

A needle token whose direction is outside the block's dominant subspace has a residual of
about its whole energy; a massive-activation / attention-sink token (large key norm) has a
large *absolute* residual from both the truncated spectrum and int8 rounding (which is
relative to the row maximum), so absolute (not per-token relative) residuals are what is
ranked. The normalisation by the block mean only makes keys and values commensurable.

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

from collections.abc import Callable
from dataclasses import dataclass

import torch

from spectralcache.config import SpectralConfig

__all__ = [
    "CompressedBlocks",
    "compress_blocks",
    "dequantize_coeffs",
    "low_rank_fit",
    "reconstruct",
    "reconstruct_keys",
    "reconstruct_values",
]


@dataclass
class CompressedBlocks:
    """Compressed blocks; every tensor has the same leading dims ``[...]`` (e.g. ``[B, H, nb]``)."""

    key_coeffs: torch.Tensor  # [..., T, rk] int8 | [..., T, ceil(rk/2)] uint8 | model dtype
    key_scales: torch.Tensor | None  # [..., T, 1] float16 (None when coeff_bits == 16)
    key_basis: torch.Tensor | None  # [..., rk, D]; None = identity codec (coeffs are the keys, rk = D)
    value_coeffs: torch.Tensor
    value_scales: torch.Tensor | None
    value_basis: torch.Tensor | None  # [..., rv, D]; None = identity codec
    outlier_keys: torch.Tensor  # [..., o, D] exact, model dtype (post-RoPE)
    outlier_values: torch.Tensor  # [..., o, D]
    outlier_index: torch.Tensor  # [..., o] int64, sorted, in 0..T-1
    coeff_bits: int
    rank_keys: int
    rank_values: int
    value_coeff_bits: int | None = None  # None: same as coeff_bits

    @property
    def value_bits(self) -> int:
        return self.coeff_bits if self.value_coeff_bits is None else self.value_coeff_bits

    def tensors(self) -> dict[str, torch.Tensor | None]:
        return {
            "key_coeffs": self.key_coeffs,
            "key_scales": self.key_scales,
            "key_basis": self.key_basis,
            "value_coeffs": self.value_coeffs,
            "value_scales": self.value_scales,
            "value_basis": self.value_basis,
            "outlier_keys": self.outlier_keys,
            "outlier_values": self.outlier_values,
            "outlier_index": self.outlier_index,
        }


# --------------------------------------------------------------------------- linalg glue


def _rsvd_module():  # late import keeps ``import spectralcache.cache.block`` cheap
    from spectralcache.linalg import rsvd

    return rsvd


def _quant_module():
    from spectralcache.linalg import quant

    return quant


def low_rank_fit(
    m: torch.Tensor, rank: int, config: SpectralConfig, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``m [N, T, D]`` (compute dtype) -> coefficients ``U S [N, T, r]`` and basis ``Vh [N, r, D]``."""
    rsvd = _rsvd_module()
    if config.svd_method == "exact" or rank >= min(m.shape[-2], m.shape[-1]):
        u, s, vh = rsvd.truncated_svd(m, rank)
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


def _quantize(coeffs: torch.Tensor, bits: int, model_dtype: torch.dtype):
    """-> (stored coeffs, float16 scales [..., T, 1] or None) via the project's quantizer."""
    if bits == 16:
        # copy=True: with the identity codec the "coefficients" are the input rows themselves,
        # and the cold tier must own its storage (no aliasing of, or pinning, the hot buffer)
        return coeffs.to(model_dtype, copy=True), None
    q = _quant_module().quantize_rows(coeffs, bits=bits, scale_dtype=torch.float16)
    return q.data, q.scales


def dequantize_coeffs(
    coeffs: torch.Tensor,
    scales: torch.Tensor | None,
    bits: int,
    rank: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Stored coefficients -> ``[..., T, rank]`` in ``dtype`` (scales applied)."""
    if bits == 16:
        return coeffs.to(dtype)
    quant = _quant_module()
    return quant.dequantize_rows(
        quant.QuantizedRows(data=coeffs, scales=scales, bits=bits, n_cols=rank), dtype
    )


def _row_sq_norm(x: torch.Tensor) -> torch.Tensor:
    return x.square().sum(-1)


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
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """Fit + quantize (``bits`` default ``config.coeff_bits``); returns (stored coeffs, scales,
    stored basis or None for the identity codec, reconstruction in compute dtype)."""
    bits = config.coeff_bits if bits is None else bits
    if codec == "identity":
        q, scales = _quantize(m, bits, model_dtype)
        recon = dequantize_coeffs(q, scales, bits, m.shape[-1], m.dtype)
        return q.contiguous(), None if scales is None else scales.contiguous(), None, recon
    coeffs, basis = low_rank_fit(m, rank, config, generator)
    q, scales = _quantize(coeffs, bits, model_dtype)
    basis_stored = basis.to(basis_dtype).contiguous()
    recon = dequantize_coeffs(q, scales, bits, rank, m.dtype) @ basis_stored.to(m.dtype)
    return q.contiguous(), None if scales is None else scales.contiguous(), basis_stored, recon


def compress_blocks(
    keys: torch.Tensor,
    values: torch.Tensor,
    config: SpectralConfig,
    rank_keys: int,
    rank_values: int,
    *,
    basis_dtype: torch.dtype | None = None,
    exact_keys: torch.Tensor | None = None,
) -> CompressedBlocks:
    """Compress blocks ``keys, values [..., T, D]``.

    ``keys`` is what the low-rank fit sees (pre-RoPE keys in ``pre_rope`` mode); ``exact_keys``
    (default ``keys``) is what outliers store, i.e. the post-RoPE keys as the model cached
    them. Stored dtypes follow ``values.dtype`` (the model dtype).
    """
    if keys.shape != values.shape:
        raise ValueError(f"keys {tuple(keys.shape)} and values {tuple(values.shape)} differ in shape")
    if keys.ndim < 2:
        raise ValueError(f"blocks must be [..., T, D], got shape {tuple(keys.shape)}")
    exact_keys = keys if exact_keys is None else exact_keys
    if exact_keys.shape != keys.shape:
        raise ValueError("exact_keys must have the shape of keys")
    *lead, t, d = keys.shape
    if t != config.block_size:
        raise ValueError(f"a block has {t} tokens but block_size is {config.block_size}")
    for rank, codec, side in (
        (rank_keys, config.key_codec, "keys"),
        (rank_values, config.value_codec, "values"),
    ):
        if codec == "identity":
            if rank != d:
                raise ValueError(f"identity codec for {side}: rank must be head_dim={d}, got {rank}")
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

    def gen() -> torch.Generator:
        return torch.Generator(device=kf.device).manual_seed(config.seed)

    kc, vc = config.key_codec, config.value_codec
    kq, ks, kb, krec = _fit_and_store(kf, rank_keys, config, gen(), model_dtype, basis_dtype, kc)
    vbits = config.value_bits
    vq, vs, vb, vrec = _fit_and_store(vf, rank_values, config, gen(), model_dtype, basis_dtype, vc, vbits)

    if o > 0:
        score = outlier_score(kf, krec, vf, vrec)  # [N, T]
        idx = score.topk(o, dim=-1).indices.sort(dim=-1).values  # [N, o]
        if config.refit_after_outliers:
            # only a fitted basis can be re-spent; identity rows stay as they are
            keep = torch.ones(n, t, 1, dtype=cdt, device=kf.device)
            keep.scatter_(1, idx.unsqueeze(-1), 0.0)
            if kc == "lowrank":
                kq, ks, kb, _ = _fit_and_store(kf * keep, rank_keys, config, gen(), model_dtype, basis_dtype)
            if vc == "lowrank":
                vq, vs, vb, _ = _fit_and_store(
                    vf * keep, rank_values, config, gen(), model_dtype, basis_dtype, "lowrank", vbits
                )
        gather = idx.unsqueeze(-1).expand(n, o, d)
        out_k = torch.gather(exact_keys.reshape(n, t, d), 1, gather)
        out_v = torch.gather(values.reshape(n, t, d), 1, gather)
    else:
        idx = torch.zeros(n, 0, dtype=torch.int64, device=kf.device)
        out_k = exact_keys.new_zeros(n, 0, d)
        out_v = values.new_zeros(n, 0, d)

    def shaped(x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None else x.reshape(*lead, *x.shape[1:]).contiguous()

    return CompressedBlocks(
        key_coeffs=shaped(kq),
        key_scales=shaped(ks),
        key_basis=shaped(kb),
        value_coeffs=shaped(vq),
        value_scales=shaped(vs),
        value_basis=shaped(vb),
        outlier_keys=shaped(out_k.to(exact_keys.dtype)),
        outlier_values=shaped(out_v.to(values.dtype)),
        outlier_index=shaped(idx.to(torch.int64)),
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
    blocks: CompressedBlocks,
    rotate: Callable[[torch.Tensor], torch.Tensor] | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Reference decode of the keys ``[..., T, D]``: low-rank part (rotated with ``rotate`` for
    pre-RoPE blocks), then the exact outlier rows written over it."""
    c = dequantize_coeffs(blocks.key_coeffs, blocks.key_scales, blocks.coeff_bits, blocks.rank_keys, dtype)
    recon = c if blocks.key_basis is None else c @ blocks.key_basis.to(dtype)
    if rotate is not None:
        recon = rotate(recon).to(dtype)
    return _scatter_outliers(recon, blocks.outlier_index, blocks.outlier_keys)


def reconstruct_values(blocks: CompressedBlocks, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    c = dequantize_coeffs(
        blocks.value_coeffs, blocks.value_scales, blocks.value_bits, blocks.rank_values, dtype
    )
    recon = c if blocks.value_basis is None else c @ blocks.value_basis.to(dtype)
    return _scatter_outliers(recon, blocks.outlier_index, blocks.outlier_values)


def reconstruct(
    blocks: CompressedBlocks,
    rotate: Callable[[torch.Tensor], torch.Tensor] | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference decode of keys and values ``[..., T, D]`` (for tests and for crop)."""
    return reconstruct_keys(blocks, rotate, dtype), reconstruct_values(blocks, dtype)
