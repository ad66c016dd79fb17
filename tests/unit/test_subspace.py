"""The eigensolver-free subspace fit (``linalg/subspace.py``) against exact SVD, on CPU.

Fresh random inputs per test (seeds drawn from a counter, so no two tests share data); the
bounds are tight enough to fail: rank-r error within a few % of the Eckart-Young optimum
(``torch.linalg.svd``), basis orthonormal to float32 working precision, rank-deficient and
zero blocks reconstructed exactly, non-finite blocks flagged without touching the others.
The GPU half (no host synchronization, 128-dim blocks at scale) is tests/gpu/test_compress_cuda.py.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from spectralcache.cache.block import (
    _quantize,
    compress_blocks,
    fit_solver,
    low_rank_fit,
    reconstruct,
)
from spectralcache.config import SpectralConfig
from spectralcache.linalg import quant
from spectralcache.linalg.subspace import subspace_fit

pytestmark = pytest.mark.usefixtures("one_thread")

_seeds = itertools.count(9100)


def gen(seed: int | None = None) -> torch.Generator:
    return torch.Generator().manual_seed(next(_seeds) if seed is None else seed)


def kv_like(b: int, t: int, d: int, *, decay: float, g: torch.Generator, noise: float = 1e-2) -> torch.Tensor:
    """Blocks with singular values ~ exp(-i / decay), a noise floor and a large first row (sink)."""
    p = min(t, d)
    u = torch.linalg.qr(torch.randn(b, t, p, generator=g)).Q
    v = torch.linalg.qr(torch.randn(b, d, p, generator=g)).Q
    s = torch.exp(-torch.arange(p, dtype=torch.float32) / decay)
    m = (u * s) @ v.mT + noise * torch.randn(b, t, d, generator=g) / (t * d) ** 0.5
    m[:, 0] *= 8.0
    return m


def opt_error(m: torch.Tensor, r: int) -> float:
    s = torch.linalg.svdvals(m.double())
    return float((s[:, r:] ** 2).sum().sqrt() / (s**2).sum().sqrt())


def fit_error(m: torch.Tensor, c: torch.Tensor, b: torch.Tensor) -> float:
    md = m.double()  # float64 norms: a 1e30-scaled block's float32 norm would overflow
    return float(torch.linalg.vector_norm(md - c.double() @ b.double()) / torch.linalg.vector_norm(md))


def orth_error(basis: torch.Tensor) -> float:
    eye = torch.eye(basis.shape[-2], dtype=torch.float64)
    return float((basis.double() @ basis.double().mT - eye).abs().max())


@pytest.mark.parametrize(
    ("t", "d", "r", "decay"), [(256, 64, 8, 6.0), (256, 64, 24, 20.0), (96, 128, 32, 12.0)]
)
def test_error_close_to_optimal_and_basis_orthonormal(t, d, r, decay):
    m = kv_like(6, t, d, decay=decay, g=gen())
    fit = subspace_fit(m, r, n_iter=4, generator=gen())
    assert fit.coeffs.shape == (6, t, r) and fit.basis.shape == (6, r, d)
    assert bool(fit.ok.all())
    opt = opt_error(m, r)
    err = fit_error(m, fit.coeffs, fit.basis)
    assert opt <= err * (1 + 1e-6) and err <= 1.04 * opt, (err, opt)
    assert orth_error(fit.basis) < 1e-5
    # the coefficients are the block projected on the basis (best fit within its span)
    torch.testing.assert_close(fit.coeffs, m @ fit.basis.mT, rtol=1e-5, atol=1e-5)


def test_iterations_matter():
    """A slowly decaying spectrum: the bare sketch (n_iter=0) is clearly off the optimum, the
    iterations bring it within 2 %; error never grows by more than rounding with n_iter."""
    m = kv_like(8, 256, 64, decay=24.0, g=gen())
    opt = opt_error(m, 16)
    errs = [fit_error(m, *_cb(subspace_fit(m, 16, n_iter=q, generator=gen(5)))) / opt for q in range(7)]
    assert errs[0] > 1.05, errs
    assert errs[6] < 1.02, errs
    assert all(b <= a * (1 + 1e-4) for a, b in itertools.pairwise(errs)), errs


def _cb(fit):
    return fit.coeffs, fit.basis


@pytest.mark.parametrize("n_iter", [2, 10])
def test_rank_deficient_and_zero_blocks_are_exact(n_iter):
    """Rank 3 < r, a repeated row (rank 1: e.g. 512 copies of one pre-RoPE key) and zeros; many
    iterations must not let the spare directions' shrinking break the final basis."""
    g = gen()
    low = torch.randn(3, 100, 3, generator=g) @ torch.randn(3, 3, 40, generator=g)  # rank 3 < r = 8
    rep = torch.randn(1, 1, 40, generator=g).expand(1, 100, 40)
    m = torch.cat([low, rep, torch.zeros(1, 100, 40)])
    fit = subspace_fit(m, 8, n_iter=n_iter, generator=gen())
    assert bool(fit.ok.all()) and torch.isfinite(fit.basis).all() and torch.isfinite(fit.coeffs).all()
    assert orth_error(fit.basis) < 1e-5
    torch.testing.assert_close(fit.coeffs @ fit.basis, m, rtol=0, atol=1e-4 * float(m.abs().max()))
    assert float(fit.coeffs[4].abs().max()) == 0.0


def test_full_rank_is_exact():
    m = torch.randn(2, 50, 16, generator=gen(), dtype=torch.float64)
    fit = subspace_fit(m, 16, n_iter=1, generator=gen())
    assert fit.coeffs.dtype == torch.float64
    torch.testing.assert_close(fit.coeffs @ fit.basis, m, rtol=1e-10, atol=1e-10)


def test_scale_invariant_for_huge_and_tiny_blocks():
    """Each block is scaled before the float32 Gram: 1e30 (Gram would overflow) and 1e-25
    (squares would underflow) blocks fit exactly as well as the same block at unit scale."""
    m = kv_like(1, 128, 32, decay=5.0, g=gen())
    ref = fit_error(m, *_cb(subspace_fit(m, 6, n_iter=3, generator=gen(1))))
    for scale in (1e30, 1e-25):
        x = m * scale
        fit = subspace_fit(x, 6, n_iter=3, generator=gen(1))
        assert bool(fit.ok.all())
        assert abs(fit_error(x, fit.coeffs, fit.basis) - ref) < 1e-4 * ref


def test_nonfinite_block_is_flagged_and_isolated():
    m = kv_like(4, 64, 32, decay=5.0, g=gen())
    bad = m.clone()
    bad[1, 3, 4] = float("nan")
    bad[2, 7, 0] = float("inf")
    f_bad = subspace_fit(bad, 5, generator=gen(3))
    f_ref = subspace_fit(m, 5, generator=gen(3))
    assert f_bad.ok.tolist() == [True, False, False, True]
    for i in (1, 2):
        assert torch.isnan(f_bad.coeffs[i]).all() and torch.isnan(f_bad.basis[i]).all()
    for i in (0, 3):
        torch.testing.assert_close(f_bad.coeffs[i], f_ref.coeffs[i], rtol=0, atol=0)
        torch.testing.assert_close(f_bad.basis[i], f_ref.basis[i], rtol=0, atol=0)


def test_batched_equals_one_by_one_and_seed_is_deterministic():
    m = kv_like(5, 64, 24, decay=4.0, g=gen())
    whole = subspace_fit(m, 6, n_iter=2, generator=gen(11))
    for i in range(5):
        one = subspace_fit(m[i : i + 1], 6, n_iter=2, generator=gen(11))
        torch.testing.assert_close(
            one.coeffs[0] @ one.basis[0], whole.coeffs[i] @ whole.basis[i], rtol=1e-5, atol=1e-6
        )
    again = subspace_fit(m, 6, n_iter=2, generator=gen(11))
    assert torch.equal(again.coeffs, whole.coeffs) and torch.equal(again.basis, whole.basis)


def test_input_errors():
    m = torch.randn(2, 16, 8)
    for bad_rank in (0, 9, 2.0, True):
        with pytest.raises(ValueError, match="rank must be"):
            subspace_fit(m, bad_rank)
    with pytest.raises(ValueError, match="n_iter"):
        subspace_fit(m, 2, n_iter=-1)
    with pytest.raises(ValueError, match=r"\[B, T, D\]"):
        subspace_fit(m[0], 2)
    with pytest.raises(ValueError, match="floating"):
        subspace_fit(m.to(torch.int32), 2)


# ------------------------------------------------------------------ compress_blocks glue


def test_solver_dispatch():
    cfg = SpectralConfig()
    assert fit_solver(cfg, torch.device("cpu")) == "rsvd"
    assert fit_solver(cfg, torch.device("cuda")) == "subspace"
    assert fit_solver(cfg.replace(svd_solver="subspace"), torch.device("cpu")) == "subspace"
    assert fit_solver(cfg.replace(svd_solver="rsvd"), torch.device("cuda")) == "rsvd"
    with pytest.raises(ValueError, match="svd_solver"):
        cfg.replace(svd_solver="jacobi")
    with pytest.raises(ValueError, match="svd_subspace_iter"):
        cfg.replace(svd_subspace_iter=-1)


def test_compress_blocks_with_the_subspace_solver_matches_rsvd_error():
    """Whole pipeline (int8 coefficients, outliers) on CPU with each solver: the subspace
    solver's stored representation (4 iterations) is within 5 % of the rsvd's error (over 20
    seeds of this setup: 1.00-1.04 for keys, 1.01-1.02 for values), both near the exact fit."""
    g = gen()
    k = 3 * kv_like(6, 128, 32, decay=5.0, g=g)
    v = kv_like(6, 128, 32, decay=12.0, g=g)
    base = SpectralConfig(block_size=128, rank_keys=6, rank_values=12, outliers_per_block=8, hot_size=4)
    errs = {}
    for name, cfg in (
        ("subspace", base.replace(svd_solver="subspace", svd_subspace_iter=4)),
        ("rsvd", base.replace(svd_solver="rsvd")),
        ("exact", base.replace(svd_method="exact")),
    ):
        rk, rv = reconstruct(compress_blocks(k, v, cfg, 6, 12))
        errs[name] = (float((rk - k).norm() / k.norm()), float((rv - v).norm() / v.norm()))
    for side in (0, 1):
        assert errs["subspace"][side] <= 1.05 * errs["rsvd"][side], errs
        assert errs["subspace"][side] <= 1.06 * errs["exact"][side], errs
    # the subspace solver's coefficients really come from it (orthonormal basis, unordered)
    _, b = low_rank_fit(k, 6, base.replace(svd_solver="subspace"), gen(0))
    assert orth_error(b) < 1e-5


@pytest.mark.parametrize("bits", [8, 4])
def test_unchecked_quantizer_is_bit_identical(bits):
    g = gen()
    x = torch.randn(3, 40, 17, generator=g) * torch.logspace(-3, 4, 40).unsqueeze(-1)
    x[0, 5] = 0.0  # a zero row: scale 0, data 0
    ref = quant.quantize_rows(x, bits=bits, scale_dtype=torch.float16)
    unchecked = quant.quantize_rows(x, bits=bits, scale_dtype=torch.float16, check_finite=False)
    assert torch.equal(unchecked.data, ref.data) and torch.equal(unchecked.scales, ref.scales)
    data_c, scales_c, offsets_c = _quantize(x, bits, torch.float32)  # CPU: the checked quantizer
    assert torch.equal(data_c, ref.data) and torch.equal(scales_c, ref.scales) and offsets_c is None


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("solver", ["subspace", "rsvd"])
def test_compress_blocks_refuses_nonfinite_blocks(bad, solver):
    k = kv_like(2, 64, 16, decay=4.0, g=gen())
    v = kv_like(2, 64, 16, decay=4.0, g=gen())
    cfg = SpectralConfig(block_size=64, rank_keys=4, rank_values=4, outliers_per_block=4, svd_solver=solver)
    v[1, 9, 2] = bad
    with pytest.raises(ValueError, match="NaN or inf"):
        compress_blocks(k, v, cfg, 4, 4)


@pytest.mark.parametrize(
    ("solver", "codec"), [("subspace", "lowrank"), ("rsvd", "lowrank"), ("rsvd", "identity")]
)
def test_outliers_are_the_reference_scores_top_rows(solver, codec):
    """compress_blocks ranks outliers from residuals formed in place (``m - C B`` as one GEMM);
    the rows it keeps are the top rows of the reference ``outlier_score`` on the stored
    representation (dequantized coefficients times the stored basis)."""
    from spectralcache.cache.block import dequantize_coeffs, outlier_score

    g = gen()
    k = 3 * kv_like(4, 64, 16, decay=3.0, g=g)
    v = kv_like(4, 64, 16, decay=6.0, g=g)
    rk = 16 if codec == "identity" else 4
    cfg = SpectralConfig(
        block_size=64, rank_keys=rk, rank_values=5, outliers_per_block=6, svd_solver=solver, key_codec=codec
    )
    b = compress_blocks(k, v, cfg, rk, 5)
    k_lr = dequantize_coeffs(b.key_coeffs, b.key_scales, b.coeff_bits, rk)
    if b.key_basis is not None:
        k_lr = k_lr @ b.key_basis.float()
    v_lr = dequantize_coeffs(b.value_coeffs, b.value_scales, b.value_bits, 5) @ b.value_basis.float()
    ref = outlier_score(k, k_lr, v, v_lr).topk(6, dim=-1).indices.sort(dim=-1).values
    assert torch.equal(b.outlier_index, ref)


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
def test_half_precision_copy_gives_the_same_fit(half):
    """``lowp`` (the half-precision K/V the float32 blocks came from): the Gram from the same
    exact products and the coefficients from a two-part split of Z; the fit equals the float32
    one to ~1e-4 and keeps its error; misuse is refused."""
    low = kv_like(4, 128, 32, decay=6.0, g=gen()).to(half)
    m = low.float()
    ref = subspace_fit(m, 8, n_iter=3, generator=gen(2), prescale=False)
    fit = subspace_fit(m, 8, n_iter=3, generator=gen(2), prescale=False, lowp=low)
    torch.testing.assert_close(
        fit.coeffs @ fit.basis, ref.coeffs @ ref.basis, rtol=0, atol=2e-4 * float(m.abs().max())
    )
    torch.testing.assert_close(
        fit.coeffs, m @ fit.basis.mT, rtol=0, atol=1e-4 * float(fit.coeffs.abs().max())
    )
    assert fit_error(m, fit.coeffs, fit.basis) <= 1.0001 * fit_error(m, ref.coeffs, ref.basis) + 1e-6
    with pytest.raises(ValueError, match="prescale=False"):
        subspace_fit(m, 8, lowp=low)
    with pytest.raises(ValueError, match="lowp must be"):
        subspace_fit(m, 8, lowp=m, prescale=False)


def test_float64_small_side_agrees(monkeypatch):
    """The block-side small work in float64 (a benchmark switch) gives the float32 fit's subspace."""
    from spectralcache.linalg import subspace

    m = kv_like(3, 128, 48, decay=8.0, g=gen())
    ref = subspace_fit(m, 12, n_iter=4, generator=gen(4))
    monkeypatch.setattr(subspace, "_SMALL_DTYPE", torch.float64)
    f64 = subspace_fit(m, 12, n_iter=4, generator=gen(4))
    torch.testing.assert_close(
        f64.coeffs @ f64.basis, ref.coeffs @ ref.basis, rtol=0, atol=1e-4 * float(m.abs().max())
    )
    assert orth_error(f64.basis) < 1e-6
