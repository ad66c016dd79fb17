"""Eigensolver-free rank-``r`` fits of many small blocks: randomized subspace iteration on the Gram.

Why this exists: compressing a long-context layer fits thousands of ``[T, D]`` blocks (a
128K-token layer of Llama-3.1-8B shape: 8 KV heads x 255 blocks of 512 x 128) at once, and
the cache needs only *a* good rank-``r`` basis of each block, not its singular values or
ordered singular vectors: a block is stored as coefficients ``C = M Z [T, r]`` and basis
``Zᵀ [r, D]`` (any orthonormal basis of the same span gives the same ``C Zᵀ``), and nothing
downstream reads singular values or the order of the basis rows (attention scores through
``q Bᵀ Cᵀ``; outliers are chosen from the stored representation's residuals). The randomized
SVD's Rayleigh-Ritz step (an ``l x l`` symmetric eigenproblem per block, ``l = r + p``) exists
only to *order* directions so the top ``r`` of an oversampled sketch can be kept; on CUDA it
was the bulk of a layer's compression (the batched Triton Jacobi kernel: 38 ms for the keys'
40 x 40 and 280 ms for the values' 72 x 72 problems of a 128K layer, H100).

Method (no oversampling, so no small eigenproblem):

1. ``G = Mᵀ M`` ``[D, D]`` per block, float32 accumulation (the one pass over the block before
   the coefficients), plus ``δ I`` with ``δ = 1e-7 trace(G)`` (a floor for zero blocks):
   the same eigenvectors, but ``G Z`` has full column rank for any full-rank ``Z``, so a
   zero block, a block of rank < r or one of fewer than ``r`` tokens needs no special case;
2. ``Z₀ = orth(G Ω)`` with a Gaussian ``Ω [D, r]`` shared by the batch, then ``n_iter``
   subspace iterations ``Z ← orth(G Z)`` (each costs a ``[D, D] x [D, r]`` product and an
   ``r x r`` factorization, nothing against the block itself);
3. ``C = M Z`` (one more pass over the block) and basis ``Zᵀ``.

Each iteration multiplies the tail's share of the subspace by ``(σ_{r+1} / σ_r)²``, and for a
near-flat spectrum around ``r`` the directions it cannot separate carry nearly equal energy,
so the Frobenius error approaches the optimal rank-``r`` error quickly (measured by
``benchmarks/subspace_error.py`` and ``benchmarks/compress_layer.py``; tested against
``torch.linalg.svd`` in ``tests/unit/test_subspace.py``).

Orthonormalization is CholeskyQR on the ``r x r`` Gram ``XᵀX``. Between iterations only the
span matters: one shifted pass with the Gram and its Cholesky in float64 (Fukaya et al. 2020:
``XᵀX + sI`` with ``s`` proportional to ``trace(XᵀX)`` and the precision's epsilon is positive
definite in that precision for any finite ``X``, so the Cholesky cannot break down). The final
basis: a shifted then a plain pass, likewise in float64 (shifted CholeskyQR2; the
regularization above bounds what the shift can squash, see :func:`_orth`), orthonormal to
float32 working precision. ``X R⁻¹`` is applied as a GEMM with the small triangular inverse on
CUDA (cuBLAS' batched triangular solve against the tall ``X`` was the largest kernel of a
compression on the H100).

Measured on an H100 (``benchmarks/results/compress_layer_cuda_h100.log``; 2040 blocks of 512 x
128, bf16 input as ``lowp``, 4 iterations): keys (r 32) 3.5 ms at 1.0027x the optimal error,
values (r 64) 9.1 ms at 1.0103x, against the rsvd's 34 ms / 225 ms at 1.0003x / 1.0014x; the
whole ``compress_blocks`` of that 128K-token layer 19.6 ms instead of 266 ms.

No host synchronization anywhere (batched GEMMs, ``cholesky_ex`` whose ``info`` is never
read, triangular solves), so the whole fit queues on the GPU like any other kernel sequence.
Non-finite input is not detected on the host: the result's ``ok`` flag (device bool per
block) is False exactly where the block's Gram was not finite (NaN/inf in the block, or a
Gram overflow when ``prescale=False``), and those blocks come back as NaN, never as plausible
numbers. Callers that must never store NaN validate before (``compress_blocks`` does, in its
one synchronization).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from spectralcache.linalg.rsvd import _cholqr_pass, _draw_omega, _right_solve

__all__ = ["SubspaceFit", "subspace_fit"]

_F64 = torch.float64
_HALF = (torch.float16, torch.bfloat16)
# Dtype of the block-side small work (G, X = G Z, X R⁻¹); the r x r Gram and its Cholesky are
# float64 either way. float32 (default) or float64; benchmarks/compress_layer.py compares them.
_SMALL_DTYPE: torch.dtype | None = None  # None: float32, float64 for float64 input
# δ / trace(G): 1e-7 keeps G Z full rank for rank-deficient blocks (measured: 10 iterations on
# zero / rank-1 / rank-2 blocks stay orthonormal to 3e-6); 1e-5 already slowed the convergence
# of keys with a sink row (1.0021 -> 1.0035 x optimal at 4 iterations)
_REG = 1e-7
_OUT_DTYPE_OK: list[bool] = [True]  # bmm(out_dtype=) available (CUDA, recent torch)


def _orth_span(x: torch.Tensor) -> torch.Tensor:
    """A well-conditioned basis of span(x) for the next product with G: one shifted pass with
    the Gram in float64. (In float32 the shift that guarantees the Cholesky leaves the basis
    conditioned ~10-40, which compounds over iterations until the weak directions drown in
    float32 rounding: measured 1.02 -> 2.2x the optimal error at 4 iterations.)"""
    return _cholqr_pass(x, True, _F64, _right_solve)


def _orth(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of span(x), x ``[B, n, l]``: a shifted pass then a plain one, both
    with the ``l x l`` Gram in float64 (shifted CholeskyQR2).

    Why two passes suffice: the shifted pass squashes only directions of ``x`` below
    ``sqrt(s) ~ 1e-5 ||x||`` (float64 shift), and ``x = (G + δI) Z`` has its top-r directions far
    above that; what lies below are spare directions of a rank-deficient block (fewer than r
    eigenvalues above δ), which shrink by ~δ/sqrt(s) per iteration. Measured on CPU: zero,
    rank-1 and rank-2 blocks after 10 iterations come out orthonormal to 3e-6 and exact
    (``tests/unit/test_subspace.py``); a third pass would only matter far beyond that."""
    return _cholqr_pass(_cholqr_pass(x, True, _F64, _right_solve), False, _F64, _right_solve)


@dataclass
class SubspaceFit:
    """A batch of rank-``r`` fits ``M ≈ coeffs @ basis``.

    ``coeffs [B, T, r]`` and ``basis [B, r, D]`` (orthonormal rows) in float32 (float64 for
    float64 input); ``ok [B]`` device bool, False where the block was not finite (then that
    block's factors are NaN). The rows of ``basis`` span the fitted subspace in no particular
    order and ``coeffs`` are not ``U S`` of an SVD.
    """

    coeffs: torch.Tensor
    basis: torch.Tensor
    ok: torch.Tensor


def _check(m: torch.Tensor, rank: int, n_iter: int, lowp: torch.Tensor | None, prescale: bool) -> None:
    if not isinstance(m, torch.Tensor) or not m.is_floating_point():
        raise ValueError(f"subspace_fit needs a floating tensor, got {getattr(m, 'dtype', type(m).__name__)}")
    if m.ndim != 3:
        raise ValueError(f"subspace_fit needs blocks [B, T, D], got shape {tuple(m.shape)}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= min(m.shape[-2], m.shape[-1]):
        raise ValueError(
            f"rank must be an int in [1, min(T, D) = {min(m.shape[-2], m.shape[-1])}], got {rank!r}"
        )
    if isinstance(n_iter, bool) or not isinstance(n_iter, int) or n_iter < 0:
        raise ValueError(f"n_iter must be an int >= 0, got {n_iter!r}")
    if lowp is not None:
        if lowp.dtype not in _HALF or lowp.shape != m.shape or lowp.device != m.device:
            raise ValueError(
                f"lowp must be a float16/bfloat16 copy of m ({tuple(m.shape)} on {m.device}), "
                f"got {lowp.dtype} {tuple(lowp.shape)} on {lowp.device}"
            )
        if prescale:
            raise ValueError("lowp needs prescale=False (scaling would change its half-precision values)")


def _mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` for half ``a, b`` with float32 output straight from the float32 accumulator
    (CUDA tensor cores); elsewhere, or on a torch without ``out_dtype``, in float32."""
    if a.is_cuda and _OUT_DTYPE_OK[0]:
        try:
            return torch.bmm(a, b.expand(a.shape[0], *b.shape[-2:]), out_dtype=torch.float32)
        except (RuntimeError, TypeError):
            _OUT_DTYPE_OK[0] = False
    return a.float() @ b.float()


def subspace_fit(
    m: torch.Tensor,
    rank: int,
    *,
    n_iter: int = 2,
    generator: torch.Generator | None = None,
    prescale: bool = True,
    lowp: torch.Tensor | None = None,
) -> SubspaceFit:
    """Rank-``rank`` fit of every block of ``m [B, T, D]``: ``m ≈ coeffs @ basis``, without host sync.

    ``n_iter`` subspace iterations after the first product with the Gram (``Z`` spans
    ``G^(n_iter+1) Ω``, as :func:`spectralcache.linalg.rsvd.randomized_svd`'s Gram algorithm
    with the same ``n_iter``). ``generator`` draws the shared start ``Ω`` (so a batched call
    equals per-block calls with the same seed). Half inputs are fitted in float32.

    ``prescale`` (default) divides each block by its largest magnitude before the float32
    Gram, so no finite block can overflow it (one extra pass over the blocks). A caller that
    bounds its entries (``T max|m|² < 1e36``; ``compress_blocks`` does for int8/int4
    coefficients) passes False and saves that pass.

    ``lowp``: a float16/bfloat16 tensor holding exactly ``m``'s values (``m`` was converted
    from it; needs ``prescale=False``). The Gram then runs on (CUDA) tensor cores from it —
    the same exact products, accumulated in float32 — and the coefficients as ``lowp Z_hi +
    lowp Z_lo`` with ``Z`` split into two half-precision parts (``|Z - Z_hi - Z_lo| ≲ 2^-16
    |Z|``), instead of float32 GEMMs.
    """
    _check(m, rank, n_iter, lowp, prescale)
    acc = _F64 if m.dtype == _F64 else torch.float32
    small = _SMALL_DTYPE or acc
    mc = m if m.dtype == acc else m.to(acc)
    b, _, d = mc.shape
    use_lowp = lowp is not None
    if prescale:
        # each block scaled by its largest magnitude, so the float32 Gram can neither overflow
        # nor underflow for any finite block (zero blocks keep scale 1)
        peak = torch.linalg.vector_norm(mc, ord=float("inf"), dim=(-2, -1))
        peak = torch.where(peak > 0, peak, torch.ones_like(peak))
        ms = mc / peak.view(b, 1, 1)
        g = ms.mT @ ms
        del ms
    elif use_lowp:
        g = _mm_f32(lowp.mT, lowp)
    else:
        g = mc.mT @ mc  # [B, D, D]
    g = g.to(small)
    diag = g.diagonal(dim1=-2, dim2=-1)
    # NaN/inf anywhere in a block (or a Gram overflow) reaches its Gram's diagonal
    ok = torch.isfinite(diag).all(-1)
    diag.add_((_REG * diag.sum(-1, keepdim=True)).nan_to_num(0.0) + 1e-30)
    z = g @ _draw_omega(d, rank, _F64, mc.device, generator).to(small)
    # one orthonormalization per product: with two (G² Z), strongly decaying spectra (keys with
    # a sink row) lost the final basis at 6 iterations even in float64 (measured on CPU)
    for _ in range(n_iter):
        z = g @ _orth_span(z)
    z = _orth(z)  # [B, D, r], orthonormal columns
    # a non-finite block gets a NaN basis, hence NaN coefficients (NaN spreads through the GEMM),
    # without a pass over the [B, T, r] coefficients
    nan = torch.full((), float("nan"), dtype=small, device=z.device)
    zc = torch.where(ok.view(b, 1, 1), z, nan).to(acc)
    if use_lowp:
        z_hi = zc.to(lowp.dtype)
        z_lo = (zc - z_hi.to(acc)).to(lowp.dtype)
        coeffs = _mm_f32(lowp, z_hi) + _mm_f32(lowp, z_lo)
    else:
        coeffs = mc @ zc
    basis = zc.mT.contiguous()
    return SubspaceFit(coeffs=coeffs, basis=basis, ok=ok)
