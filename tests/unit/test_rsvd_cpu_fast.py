"""The CPU fast path of randomized_svd (Gram + Rayleigh-Ritz at level 0, ``_pipeline_cpu_rr``)
against its reference, the generic checked pipeline (``_pipeline``), on fresh random inputs:
same singular values, same product, error at the optimum, orthonormal factors, the same
robustness (NaN input, rank deficiency, overflow, steep spectra), and the Gram from row strips."""

from __future__ import annotations

import pytest
import torch

from spectralcache.bench.svd import decaying_matrix, rel_error
from spectralcache.linalg import RandomizedSVD, randomized_svd, rsvd, truncated_svd

FAST_ORTHS = ("cholqr2", "shifted_cholqr")


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def orth_err(X: torch.Tensor) -> float:
    X = X.double()
    eye = torch.eye(X.shape[-1], dtype=X.dtype)
    return float(torch.linalg.matrix_norm(X.mT @ X - eye).max())


def steep_matrix(batch: int, m: int, n: int, ratio: float, seed: int, rank: int) -> torch.Tensor:
    """Singular values falling geometrically to S₁/S_k = ``ratio`` over the first ``rank``,
    then a floor at half of S_k: the regime where G's float32 rounding shows in U. (Much
    steeper tails fail the Gram path's final-pass check in the reference too and go down
    the fallback chain: G resolves only ~3e-4 of S₁.)"""
    g = gen(seed)
    U, _ = torch.linalg.qr(torch.randn(batch, m, n, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(batch, n, n, generator=g, dtype=torch.float64))
    i = torch.arange(n, dtype=torch.float64)
    sig = (ratio ** (-i / (rank - 1))).clamp_min(0.5 / ratio)
    return ((U * sig) @ V.mT).float()


def run(M, rank, *, fast: bool, monkeypatch, **kw):
    monkeypatch.setattr(rsvd, "_CPU_RAYLEIGH_RITZ", fast)
    return randomized_svd(M, rank, generator=gen(kw.pop("seed", 0)), return_info=True, **kw)


@pytest.mark.parametrize("orth", FAST_ORTHS)
@pytest.mark.parametrize(
    "shape,rank,n_iter,oversample",
    [
        ((8, 512, 128), 16, 2, 8),  # the seed shape
        ((5, 192, 96), 12, 1, 4),
        ((3, 70, 160), 10, 3, 8),  # wide: transposed to the tall side
        ((2, 3, 120, 64), 6, 3, 2),  # leading dims, little oversampling
        ((4, 256, 96), 10, 0, 8),  # n_iter=0: G applied implicitly, U from Y = M Z
    ],
)
@pytest.mark.parametrize("seed", [1, 2])
def test_fast_path_equals_reference(orth, shape, rank, n_iter, oversample, seed, monkeypatch):
    M = decaying_matrix(shape, generator=gen(100 + seed), noise=1e-2)
    Uf, Sf, Vhf, info_f = run(M, rank, fast=True, monkeypatch=monkeypatch, orth=orth, n_iter=n_iter,
                              oversample=oversample, seed=seed)  # fmt: skip
    Ur, Sr, Vhr, info_r = run(M, rank, fast=False, monkeypatch=monkeypatch, orth=orth, n_iter=n_iter,
                              oversample=oversample, seed=seed)  # fmt: skip
    batch = M[..., 0, 0].numel()
    assert info_f.paths == info_r.paths == {orth: batch}
    assert Uf.shape == Ur.shape and Sf.shape == Sr.shape and Vhf.shape == Vhr.shape
    assert Uf.dtype == Sf.dtype == Vhf.dtype == torch.float32
    # same sketch, same subspace: the same singular values and the same rank-k product
    torch.testing.assert_close(Sf, Sr, rtol=2e-5, atol=1e-6 * float(Sr.max()))
    torch.testing.assert_close(
        (Uf * Sf.unsqueeze(-2)) @ Vhf, (Ur * Sr.unsqueeze(-2)) @ Vhr, rtol=1e-4, atol=2e-5
    )
    opt = rel_error(M, *truncated_svd(M, rank))
    assert rel_error(M, Uf, Sf, Vhf) <= 1.05 * opt
    assert abs(rel_error(M, Uf, Sf, Vhf) - rel_error(M, Ur, Sr, Vhr)) <= 1e-5 * opt
    assert orth_err(Uf) < 1e-5 and orth_err(Vhf.mT) < 1e-5
    assert torch.all(Sf[..., :-1] >= Sf[..., 1:])


@pytest.mark.parametrize("estimate", [True, False])
@pytest.mark.parametrize("ratio", [10.0, 40.0, 100.0])
def test_steep_spectra_take_u_from_the_real_product(ratio, estimate, monkeypatch):
    """Above S₁/S_k = _GRAM_RR_MAX_KAPPA, U from the float32 Gram would lose orthogonality
    (~0.1·eps32·κ²: 6e-5 at κ=100); those elements take U from Y = M Z in float64, so U
    stays orthonormal to float32 precision, with no fallback. ``estimate=False``: the
    Cholesky-diagonal estimate is switched off, so the check on the computed S routes them."""
    if not estimate:
        monkeypatch.setattr(rsvd, "_STEEP_ESTIMATE_MARGIN", float("inf"))
    rank = 16
    M = steep_matrix(4, 512, 128, ratio, seed=int(ratio), rank=rank)
    M[1] = decaying_matrix((512, 128), generator=gen(3))  # a mild element in the same batch
    calls = []
    real = rsvd._rr_cholqr2

    def spy(Mc, Z, *a):
        calls.append(Mc.shape[0])
        return real(Mc, Z, *a)

    monkeypatch.setattr(rsvd, "_rr_cholqr2", spy)
    U, S, Vh, info = run(M, rank, fast=True, monkeypatch=monkeypatch)
    assert info.paths == {"cholqr2": 4}
    assert calls == ([3] if ratio > rsvd._GRAM_RR_MAX_KAPPA else [])
    assert orth_err(U) < 5e-6 and orth_err(Vh.mT) < 1e-5
    opt = rel_error(M, *truncated_svd(M, rank))
    assert rel_error(M, U, S, Vh) <= 1.05 * opt
    monkeypatch.setattr(rsvd, "_rr_cholqr2", real)
    _, Sr, _, _ = run(M, rank, fast=False, monkeypatch=monkeypatch)
    torch.testing.assert_close(S, Sr, rtol=1e-4, atol=1e-6 * float(Sr.max()))


def test_nonfinite_input_raises_from_the_gram_check(monkeypatch):
    """The fast path validates from G's trace instead of a separate pass over M: any NaN or
    inf still raises the same clear error, whichever entry it is in."""
    monkeypatch.setattr(rsvd, "_CPU_RAYLEIGH_RITZ", True)
    for where, value in (
        ((0, 0, 0), float("nan")),
        ((3, 511, 127), float("inf")),
        ((5, 7, 9), -float("inf")),
    ):
        M = decaying_matrix((8, 512, 128), generator=gen(0))
        M[where] = value
        with pytest.raises(ValueError, match="NaN or inf"):
            randomized_svd(M, 16)
    with pytest.raises(ValueError, match="NaN or inf"):  # implicit Gram (n_iter=0): M is scanned first
        randomized_svd(torch.full((2, 256, 96), float("nan")), 10, n_iter=0)


def test_finite_input_whose_gram_overflows_falls_back_like_the_reference(monkeypatch):
    """1e22-scaled float32 blocks: G = MᵀM overflows, so the trace check scans M (finite: no
    error), the element's Cholesky fails and the chain finishes it exactly, as it does
    for the reference; the unscaled element in the same batch stays on the fast path."""
    M = decaying_matrix((3, 200, 96), generator=gen(0)) * 1e22
    M[1] /= 1e22
    outs = {fast: run(M, 8, fast=fast, monkeypatch=monkeypatch) for fast in (True, False)}
    for U, S, Vh, info in outs.values():
        assert info.paths == {"cholqr2": 1, "exact_svd": 2}
        assert all(torch.isfinite(t).all() for t in (U, S, Vh))
        Md = M.double()
        assert rel_error(Md, U.double(), S.double(), Vh.double()) <= 1.05 * rel_error(
            Md, *truncated_svd(Md, 8)
        )
    torch.testing.assert_close(outs[True][1], outs[False][1], rtol=1e-5, atol=0)


@pytest.mark.parametrize("orth", FAST_ORTHS)
def test_degenerate_elements_fall_back_per_element(orth, monkeypatch):
    """Zero and exactly rank-deficient elements fail the fast path's checks (Cholesky info,
    S_k >= 1e-6 S₁) and only they go down the chain; the good ones match the reference."""
    g = gen(4)
    M = decaying_matrix((4, 160, 64), generator=gen(2))
    M[1] = 0
    M[2] = torch.randn(160, 3, generator=g) @ torch.randn(3, 64, generator=g)  # rank 3, ask for 6
    U, S, Vh, info = run(M, 6, fast=True, monkeypatch=monkeypatch, orth=orth)
    assert info.paths[orth] == 2 and info.n_fallback == 2
    assert all(torch.isfinite(t).all() for t in (U, S, Vh))
    assert torch.equal(S[1], torch.zeros(6))
    assert rel_error(M[2:3], U[2:3], S[2:3], Vh[2:3]) < 1e-4
    _, Sr, _, info_r = run(M, 6, fast=False, monkeypatch=monkeypatch, orth=orth)
    assert info_r.paths == info.paths
    torch.testing.assert_close(S[[0, 3]], Sr[[0, 3]], rtol=2e-5, atol=1e-6)


def test_default_cpu_call_and_plan_use_the_fast_path(monkeypatch):
    """The cache's call (defaults: cholqr2, host_sync on CPU) and an eager CPU plan both run
    level 0 through _pipeline_cpu_rr; "cholqr", "householder" and "direct" do not."""
    calls = []
    real = rsvd._pipeline_cpu_rr

    def spy(*a, **k):
        calls.append(a[0].shape)
        return real(*a, **k)

    monkeypatch.setattr(rsvd, "_pipeline_cpu_rr", spy)
    M = decaying_matrix((3, 96, 40), generator=gen(5))
    a = randomized_svd(M, 5, generator=gen(3))
    assert len(calls) == 1
    plan = RandomizedSVD(M.shape, 5, generator=gen(3))
    b = plan(M)
    assert len(calls) == 2
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    for kw in ({"orth": "cholqr"}, {"orth": "householder"}, {"algorithm": "direct"}, {"host_sync": False}):
        randomized_svd(M, 5, generator=gen(3), **kw)
    assert len(calls) == 2


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_other_input_dtypes(dtype, monkeypatch):
    """float64 runs the fast path in float64 throughout; bfloat16 input in float32 (CPU), and
    both match the reference."""
    M = decaying_matrix((4, 160, 48), generator=gen(7)).to(dtype)
    Uf, Sf, Vhf, _ = run(M, 8, fast=True, monkeypatch=monkeypatch)
    Ur, Sr, Vhr, _ = run(M, 8, fast=False, monkeypatch=monkeypatch)
    assert Uf.dtype == Sf.dtype == Vhf.dtype == dtype
    tol = {"rtol": 1e-10, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-2, "atol": 1e-2}
    torch.testing.assert_close(Sf, Sr, **tol)
    torch.testing.assert_close((Uf * Sf.unsqueeze(-2)) @ Vhf, (Ur * Sr.unsqueeze(-2)) @ Vhr, **tol)
    Mf = M.double() if dtype == torch.float64 else M.float()
    opt = rel_error(Mf, *truncated_svd(M, 8))
    assert rel_error(Mf, Uf, Sf, Vhf) <= 1.05 * opt


@pytest.mark.parametrize("n", [64, 96, 128, 130, 200])
def test_gram_from_row_strips_equals_one_gemm(n):
    M = decaying_matrix((3, 150, n), generator=gen(n))
    G = rsvd._gram(M, torch.float32)
    torch.testing.assert_close(G, M.mT @ M, rtol=1e-5, atol=1e-4)
    assert torch.equal(G, G.mT)


def test_bench_svd_reports_default_against_baselines_and_its_reference(tmp_path, capsys):
    """`spectralcache bench svd` on CPU times the fast path's reference too and writes a
    per-shape summary of the default call (ratios from the same run) and the load average."""
    import json

    from spectralcache.bench.svd import DEFAULT_METHOD, GENERIC_METHOD
    from spectralcache.bench.svd import main as bench_main

    rc = bench_main(
        ["--device", "cpu", "--shapes", "3x96x40:5", "--repeats", "3", "--warmup", "1", "--interleave",
         "--profile", "2", "--out", str(tmp_path), "--tag", "s", "--no-plot"]
    )  # fmt: skip
    assert rc == 0
    data = json.loads((tmp_path / "rsvd_s.json").read_text())
    rows = {r["method"]: r for r in data["results"]}
    assert {DEFAULT_METHOD, GENERIC_METHOD, "torch.linalg.svd"} <= set(rows)
    assert rows[GENERIC_METHOD]["path"] == rows[DEFAULT_METHOD]["path"] == {"cholqr2": 3}
    top = rows[DEFAULT_METHOD]["profile_top"]  # --profile: where the default call's time goes
    assert top and any(op["op"] == "aten::bmm" and op["self_us"] > 0 for op in top)
    (summary,) = data["summary"]
    assert summary["method"] == DEFAULT_METHOD and summary["shape"] == [3, 96, 40]
    assert (
        summary["x_vs_linalg_svd"]
        == rows["torch.linalg.svd"]["median_ms"] / rows[DEFAULT_METHOD]["median_ms"]
    )
    assert summary["x_vs_generic_pipeline"] > 0 and summary["err_ratio"] <= 1.05
    assert len(data["meta"]["load_avg_end"]) == 3
    out = capsys.readouterr().out
    assert "rsvd[cholqr2,generic]" in out and "(default)" in out  # names survive rich's markup


def spectrum_matrix(kind: str, shape: tuple[int, int, int], seed: int) -> torch.Tensor:
    """Fresh random [B, m, n] with a named singular-value profile (float64 factors, float32 out)."""
    g = gen(1000 + seed)
    b, m, n = shape
    U, _ = torch.linalg.qr(torch.randn(b, m, n, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(b, n, n, generator=g, dtype=torch.float64))
    i = torch.arange(n, dtype=torch.float64)
    sig = {
        "decaying": torch.exp(-i / 8),
        "power_law": 1.0 / (1.0 + i),  # slow decay around k: where power iterations matter
        "flat": torch.ones(n, dtype=torch.float64) + 0.01 * torch.rand(n, generator=g, dtype=torch.float64),
        "gap_then_flat": torch.where(i < 16, 1.0, 0.3),
        "rank_deficient_plus_noise": torch.where(i < 10, torch.exp(-i / 3), 1e-3),
    }[kind]
    return ((U * sig) @ V.mT).float()


SPECTRA = ["decaying", "power_law", "flat", "gap_then_flat", "rank_deficient_plus_noise"]


@pytest.mark.parametrize("kind", SPECTRA)
@pytest.mark.parametrize("scale", [1.0, 1e-12, 1e12])
@pytest.mark.parametrize("seed", [0, 1])
def test_seed_shape_default_call_against_linalg_svd(kind, scale, seed):
    """The default CPU call on the seed shape ([8, 512, 128], rank 16, n_iter 2, oversample 8)
    against torch.linalg.svd on fresh inputs of several spectra and scales: error at most
    1.05x the optimal rank-16 error (this assertion fails if the path's subspace is not good
    enough: n_iter=0 without oversampling gives 1.14-1.28x here), the leading singular values
    of torch.linalg.svd, orthonormal factors, and the call finishes at level 0 (the fast
    path) without any fallback."""
    rank = 16
    M = spectrum_matrix(kind, (8, 512, 128), seed) * scale
    U, S, Vh, info = randomized_svd(M, rank, generator=gen(seed), return_info=True)
    assert info.paths == {"cholqr2": 8}
    Ue, Se, Vhe = torch.linalg.svd(M.double(), full_matrices=False)
    Md = M.double()
    opt = rel_error(Md, Ue[..., :rank], Se[..., :rank], Vhe[..., :rank, :])
    err = rel_error(Md, U.double(), S.double(), Vh.double())
    assert err <= 1.05 * opt, f"{kind} x{scale:g}: error {err:.6g} = {err / opt:.4f}x optimal"
    # Ritz values never exceed the singular values; where the spectrum decays, the top ones
    # match to float32 accuracy (on a flat spectrum any k of the near-equal directions will do)
    assert torch.all(S.double() <= Se[..., :rank] * (1 + 1e-4))
    if kind != "flat":
        torch.testing.assert_close(S[..., :4].double(), Se[..., :4], rtol=1e-4, atol=0)
    assert orth_err(U) < 1e-5 and orth_err(Vh.mT) < 1e-5
    assert torch.all(S[..., :-1] >= S[..., 1:])
