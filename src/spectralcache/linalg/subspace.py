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

1. ``G = Mᵀ M`` ``[D, D]`` per block (float32 accumulation over the block scaled by its
   largest magnitude, so no finite block overflows), held in float64 (tiny: ``D x D``);
2. ``Z₀ = orth(G Ω)`` with a Gaussian ``Ω [D, r]`` shared by the batch, then ``n_iter``
   subspace iterations ``Z ← orth(G Z)`` (each costs a ``[D, D] x [D, r]`` product, nothing
   against the block itself);
3. ``C = M Z`` (one more pass over the block) and basis ``Zᵀ``.

Each iteration multiplies the tail's share of the subspace by ``(σ_{r+1} / σ_r)²``, and for a
near-flat spectrum around ``r`` the directions it cannot separate carry nearly equal energy,
so the Frobenius error approaches the optimal rank-``r`` error quickly (measured by
``benchmarks/subspace_error.py``; tested against ``torch.linalg.svd`` in
``tests/unit/test_subspace.py``).

``orth`` is a float64 shifted CholeskyQR (Fukaya et al. 2020): ``XᵀX + sI`` with ``s``
proportional to ``trace(XᵀX)`` is positive definite for any finite ``X``, so the Cholesky
cannot break down; for the final basis two plain CholeskyQR passes follow (shifted
CholeskyQR3), orthonormal to float64 working precision. Before every pass ``X`` gets a
perturbation of ``1e-12 ||X||_F`` along fixed random unit directions (its own seed, not the
caller's generator), which makes a rank-deficient ``X`` (zero block, block of rank < r, T < r
tokens) full rank without a data-dependent branch: directions float32 data cannot resolve are
then filled by arbitrary orthonormal ones, which carry no energy.

No host synchronization anywhere (batched GEMMs, ``cholesky_ex`` whose ``info`` is never
read, triangular solves), so the whole fit queues on the GPU like any other kernel sequence.
Non-finite input is not detected on the host: the result's ``ok`` flag (device bool per
block) is False exactly where the block or its Gram was not finite, and those blocks come
back as NaN, never as plausible numbers. Callers that must never store NaN validate before
(``compress_blocks`` does, in its one synchronization).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["SubspaceFit", "subspace_fit"]

_F64 = torch.float64
_FILLS: dict[tuple[int, int, str], torch.Tensor] = {}
_FILL_SEED = 0x5B5B  # the perturbation directions' own seed: the caller's generator stream is untouched


def _fill(rows: int, cols: int, device: torch.device) -> torch.Tensor:
    """Fixed Gaussian ``[rows, cols]`` float64 directions with unit columns (cached per device)."""
    key = (rows, cols, str(device))
    fill = _FILLS.get(key)
    if fill is None:
        g = torch.Generator().manual_seed(_FILL_SEED)
        fill = torch.randn(rows, cols, generator=g, dtype=_F64)
        fill = (fill / torch.linalg.vector_norm(fill, dim=0)).to(device)
        if len(_FILLS) > 32:
            _FILLS.clear()
        _FILLS[key] = fill
    return fill


def _right_solve(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """``x R⁻¹`` for upper-triangular ``R`` (batched; no host synchronization)."""
    return torch.linalg.solve_triangular(r, x, upper=True, left=False)


def _orth(x: torch.Tensor, passes: int) -> torch.Tensor:
    """Orthonormal (``passes >= 2``) or well-conditioned (1) basis of span(x), x ``[B, n, l]`` float64.

    Pass 1 factors ``xᵀx + s I`` (shifted CholeskyQR, cannot break down on finite input),
    later passes ``xᵀx`` itself (their input is already nearly orthonormal)."""
    n, width = x.shape[-2], x.shape[-1]
    scale = torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True)
    x = x + (1e-12 * scale + 1e-30) * _fill(n, width, x.device)
    eps = torch.finfo(_F64).eps
    for i in range(passes):
        a = x.mT @ x
        if i == 0:
            shift = 11.0 * (n * width + width * (width + 1)) * eps * a.diagonal(dim1=-2, dim2=-1).sum(-1)
            a = a + torch.diag_embed(shift.unsqueeze(-1).expand(*shift.shape, width))
        r, _ = torch.linalg.cholesky_ex(a, upper=True)  # info unread: success is guaranteed on finite x
        x = _right_solve(x, r)
    return x


@dataclass
class SubspaceFit:
    """A batch of rank-``r`` fits ``M ≈ coeffs @ basis``.

    ``coeffs [B, T, r]`` and ``basis [B, r, D]`` (orthonormal rows) in the input's dtype
    (float32 for half inputs); ``ok [B]`` device bool, False where the block was not finite
    (then that block's factors are NaN). The rows of ``basis`` span the fitted subspace in no
    particular order and ``coeffs`` are not ``U S`` of an SVD.
    """

    coeffs: torch.Tensor
    basis: torch.Tensor
    ok: torch.Tensor


def _check(m: torch.Tensor, rank: int, n_iter: int) -> None:
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


def draw_omega(d: int, rank: int, device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
    """The Gaussian start ``Ω [d, rank]`` (float64), drawn on the generator's device and moved,
    so a CPU generator reproduces on any device."""
    gen_dev = generator.device if generator is not None else device
    return torch.randn(d, rank, generator=generator, dtype=_F64, device=gen_dev).to(device)


def subspace_fit(
    m: torch.Tensor,
    rank: int,
    *,
    n_iter: int = 2,
    generator: torch.Generator | None = None,
) -> SubspaceFit:
    """Rank-``rank`` fit of every block of ``m [B, T, D]``: ``m ≈ coeffs @ basis``, without host sync.

    ``n_iter`` subspace iterations after the first product with the Gram (``Z`` spans
    ``G^(n_iter+1) Ω``, as :func:`spectralcache.linalg.rsvd.randomized_svd`'s Gram algorithm
    with the same ``n_iter``). ``generator`` draws the shared start ``Ω`` (so a batched call
    equals per-block calls with the same seed). Half inputs are fitted in float32.
    """
    _check(m, rank, n_iter)
    acc = _F64 if m.dtype == _F64 else torch.float32
    mc = m if m.dtype == acc else m.to(acc)
    b, _, d = mc.shape
    # each block scaled by its largest magnitude before the Gram, so the float32 Gram can
    # neither overflow nor underflow for any finite block (zero blocks keep scale 1); NaN/inf
    # propagate into the scale and mark the block in ``ok``
    peak = torch.linalg.vector_norm(mc, ord=float("inf"), dim=(-2, -1))
    ok = torch.isfinite(peak)
    peak = torch.where(ok & (peak > 0), peak, torch.ones_like(peak))
    ms = mc / peak.view(b, 1, 1)
    g = (ms.mT @ ms).to(_F64)  # [B, D, D]: the one pass over the blocks before the coefficients
    del ms
    # non-finite blocks are zeroed here so that nothing downstream sees inf (their output is NaN)
    g = torch.where(ok.view(b, 1, 1), g, torch.zeros((), dtype=_F64, device=g.device))
    z = g @ draw_omega(d, rank, mc.device, generator)
    for _ in range(n_iter):
        z = g @ _orth(z, 1)
    z = _orth(z, 3)  # [B, D, r], orthonormal columns
    # a non-finite block gets a NaN basis, hence NaN coefficients (NaN spreads through the GEMM),
    # without a pass over the [B, T, r] coefficients
    nan = torch.full((), float("nan"), dtype=_F64, device=z.device)
    zc = torch.where(ok.view(b, 1, 1), z, nan).to(acc)
    coeffs = mc @ zc
    basis = zc.mT.contiguous()
    return SubspaceFit(coeffs=coeffs, basis=basis, ok=ok)
