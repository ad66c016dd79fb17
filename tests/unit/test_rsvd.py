"""randomized_svd / truncated_svd / RandomizedSVD: accuracy, orthogonality, batching,
degenerate inputs, errors, the fallback chain and its reporting."""

from __future__ import annotations

import pytest
import torch

from spectralcache.bench.svd import decaying_matrix, rel_error
from spectralcache.linalg import (
    ORTH_METHODS,
    RandomizedSVD,
    randomized_svd,
    reset_rsvd_stats,
    rsvd_stats,
    truncated_svd,
)

ALGORITHMS = ("gram", "direct")
DEV = "cuda" if torch.cuda.is_available() else "cpu"  # where the Triton kernel tests run


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def orth_err(X: torch.Tensor) -> float:
    """Largest ||XᵀX - I||_F over the batch (X with orthonormal columns)."""
    X = X.double()
    eye = torch.eye(X.shape[-1], dtype=X.dtype)
    return float(torch.linalg.matrix_norm(X.mT @ X - eye).max())


def make_matrix(shape, seed, *, dtype=torch.float32, noise=1e-2, decay=None):
    return decaying_matrix(shape, noise=noise, dtype=dtype, generator=gen(seed), decay=decay)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("orth", ORTH_METHODS)
@pytest.mark.parametrize("shape,rank", [((6, 192, 48), 8), ((3, 40, 160), 12)])
def test_fp32_error_and_orthogonality(orth, algorithm, shape, rank):
    """Spectrum exp(-i/(p/4)) plus noise: κ of the l-column sketch ~ 10-50, inside the
    range where even a single CholeskyQR pass keeps float32 orthogonality ~1e-5."""
    seed = sum(map(ord, orth + algorithm)) + shape[-1]
    M = make_matrix(shape, seed, decay=min(shape[-2:]) / 4)
    U, S, Vh, info = randomized_svd(
        M, rank, orth=orth, algorithm=algorithm, generator=gen(seed), return_info=True
    )
    assert (
        U.shape == (*shape[:-1], rank)
        and S.shape == (*shape[:-2], rank)
        and Vh.shape == (*shape[:-2], rank, shape[-1])
    )
    assert U.dtype == S.dtype == Vh.dtype == torch.float32
    Ue, Se, Vhe = truncated_svd(M, rank)
    opt = rel_error(M, Ue, Se, Vhe)
    err = rel_error(M, U, S, Vh)
    assert err <= 1.05 * opt, (err, opt, info)
    assert orth_err(U) < 1e-3 and orth_err(Vh.mT) < 1e-3
    assert torch.all(S[..., :-1] >= S[..., 1:])
    assert info.paths == {orth: shape[0]}  # no fallback on well-conditioned input
    assert info.algorithm == algorithm


@pytest.mark.parametrize("compute_dtype", [None, torch.bfloat16])
@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("orth", ORTH_METHODS)
def test_bf16_error_vs_exact_svd_of_the_rounded_matrix(orth, algorithm, compute_dtype):
    """bf16 input: compare with the optimum *for the bf16 matrix*, returned in bf16 too.

    The input is already rounded, so the reference is the exact truncated SVD of that
    rounded matrix with its factors rounded to bf16 (what any method returning bf16 can
    at best give). Rounding the factors adds ~u_bf16·||M|| in quadrature, far below 5%
    of the optimal error here (noise level 1e-2, optimum ~0.1), so 1.05 is meaningful.
    """
    shape, rank = (5, 160, 48), 8
    Mb = make_matrix(shape, 7).to(torch.bfloat16)
    U, S, Vh = randomized_svd(
        Mb, rank, orth=orth, algorithm=algorithm, compute_dtype=compute_dtype, generator=gen(1)
    )
    assert U.dtype == S.dtype == Vh.dtype == torch.bfloat16
    Mf = Mb.float()
    ref = rel_error(Mf, *truncated_svd(Mb, rank))
    assert rel_error(Mf, U, S, Vh) <= 1.05 * ref


@pytest.mark.parametrize("orth", ORTH_METHODS)
def test_batched_equals_per_matrix(orth):
    M = make_matrix((4, 96, 40), 3)
    U, S, Vh = randomized_svd(M, 6, orth=orth, generator=gen(5))
    for i in range(M.shape[0]):
        u, s, vh = randomized_svd(M[i], 6, orth=orth, generator=gen(5))
        torch.testing.assert_close(s, S[i], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close((u * s) @ vh, (U[i] * S[i]) @ Vh[i], rtol=1e-4, atol=1e-5)
        # same subspace, same sign conventions (deterministic given the same sketch)
        torch.testing.assert_close(u, U[i], rtol=1e-3, atol=1e-4)


def test_leading_dims_and_wide_input():
    M = make_matrix((2, 3, 30, 70), 11)  # m < n: the sketch goes on the smaller side
    U, S, Vh = randomized_svd(M, 5, generator=gen())
    assert U.shape == (2, 3, 30, 5) and S.shape == (2, 3, 5) and Vh.shape == (2, 3, 5, 70)
    assert rel_error(M, U, S, Vh) <= 1.05 * rel_error(M, *truncated_svd(M, 5))


def test_same_generator_seed_is_deterministic():
    M = make_matrix((3, 64, 32), 2)
    a = randomized_svd(M, 4, generator=gen(9))
    b = randomized_svd(M, 4, generator=gen(9))
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.parametrize("orth", ORTH_METHODS)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_zero_matrix_gives_zeros_without_nan(orth, algorithm):
    M = torch.zeros(3, 50, 20)
    U, S, Vh, info = randomized_svd(M, 4, orth=orth, algorithm=algorithm, return_info=True)
    assert torch.isfinite(U).all() and torch.isfinite(Vh).all()
    assert torch.equal(S, torch.zeros(3, 4))
    assert torch.equal((U * S.unsqueeze(-2)) @ Vh, M[..., :, :])
    assert sum(info.paths.values()) == 3


@pytest.mark.parametrize("orth", ORTH_METHODS)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_rank_deficient_input(orth, algorithm):
    g = gen(4)
    M = torch.randn(2, 60, 3, generator=g) @ torch.randn(2, 3, 25, generator=g)  # rank 3, ask for 6
    U, S, Vh = randomized_svd(M, 6, orth=orth, algorithm=algorithm, generator=gen())
    for t in (U, S, Vh):
        assert torch.isfinite(t).all()
    assert rel_error(M, U, S, Vh) < 1e-4
    assert orth_err(U) < 1e-3 and orth_err(Vh.mT) < 1e-3
    assert float(S[..., 3:].abs().max()) < 1e-4 * float(S[..., 0].min())


def test_mixed_batch_only_bad_element_falls_back():
    M = make_matrix((4, 64, 24), 5)
    M[2] = 0
    reset_rsvd_stats()
    U, S, Vh, info = randomized_svd(M, 4, orth="cholqr2", return_info=True)
    assert info.paths["cholqr2"] == 3 and info.n_fallback == 1
    good = [0, 1, 3]
    assert rel_error(M[good], U[good], S[good], Vh[good]) <= 1.05 * rel_error(
        M[good], *truncated_svd(M[good], 4)
    )
    assert torch.equal(S[2], torch.zeros(4))
    stats = rsvd_stats()
    assert stats["calls"] == 1 and stats["path:cholqr2"] == 3


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_plain_cholqr_failure_is_caught_and_reported(algorithm):
    """Singular values spread over 1e7: plain CholeskyQR in float32 breaks down (its Gram
    has condition ~1e14). The chain must recover with a correct result and say so."""
    g = gen(8)
    m, n, p = 120, 40, 40
    Uo, _ = torch.linalg.qr(torch.randn(2, m, p, generator=g, dtype=torch.float64))
    Vo, _ = torch.linalg.qr(torch.randn(2, n, p, generator=g, dtype=torch.float64))
    sig = torch.logspace(0, -7, p, dtype=torch.float64)
    M = ((Uo * sig) @ Vo.mT).float()
    U, S, Vh, info = randomized_svd(
        M, 20, orth="cholqr", algorithm=algorithm, generator=gen(), return_info=True
    )
    assert info.n_fallback > 0 and info.path != "cholqr", info.paths
    for t in (U, S, Vh):
        assert torch.isfinite(t).all()
    opt = rel_error(M, *truncated_svd(M, 20))
    assert rel_error(M, U, S, Vh) <= 1.05 * opt + 1e-6
    assert orth_err(U) < 1e-3 and orth_err(Vh.mT) < 1e-3


def test_timing_is_opt_in():
    M = make_matrix((2, 64, 32), 1)
    *_, info = randomized_svd(M, 4, return_info=True)
    assert info.timings_ms is None
    *_, info = randomized_svd(M, 4, return_info=True, timing=True)
    assert set(info.timings_ms) >= {"sketch", "power", "orth", "core", "lift"}
    assert all(v >= 0 for v in info.timings_ms.values())


def test_n_iter_zero_and_no_oversample_still_valid():
    M = make_matrix((2, 80, 30), 6)
    for n_iter, over in ((0, 0), (0, 8), (4, 0)):
        U, S, Vh = randomized_svd(M, 5, n_iter=n_iter, oversample=over, generator=gen())
        assert orth_err(U) < 1e-3 and torch.isfinite(S).all()
    # rank == min(m, n): the sketch is the whole space, so the result is exact
    U, S, Vh = randomized_svd(M, 30, generator=gen())
    assert rel_error(M, U, S, Vh) < 1e-5


def test_float64_stays_float64():
    M = make_matrix((2, 50, 20), 2, dtype=torch.float64)
    U, S, Vh = randomized_svd(M, 4, generator=gen())
    assert U.dtype == torch.float64
    assert rel_error(M, U, S, Vh) <= 1.05 * rel_error(M, *truncated_svd(M, 4))


@pytest.mark.parametrize(
    "make,rank,match",
    [
        (lambda: torch.full((4, 3), float("nan")), 1, "NaN or inf"),
        (lambda: torch.tensor([[1.0, float("inf")], [0.0, 1.0]]), 1, "NaN or inf"),
        (lambda: torch.randn(5, 4), 5, "rank 5 > min"),
        (lambda: torch.randn(5, 4), 0, "rank must be >= 1"),
        (lambda: torch.ones(5, 4, dtype=torch.int32), 1, "floating dtype"),
        (lambda: torch.randn(5), 1, "at least 2 dimensions"),
    ],
)
@pytest.mark.parametrize("fn", [randomized_svd, truncated_svd])
def test_bad_input_is_a_clear_value_error(fn, make, rank, match):
    with pytest.raises(ValueError, match=match):
        fn(make(), rank)


def test_bad_options_are_value_errors():
    M = torch.randn(10, 6)
    with pytest.raises(ValueError, match="orth must be one of"):
        randomized_svd(M, 2, orth="qr")
    with pytest.raises(ValueError, match="n_iter"):
        randomized_svd(M, 2, n_iter=-1)
    with pytest.raises(ValueError, match="algorithm"):
        randomized_svd(M, 2, algorithm="fast")
    with pytest.raises(ValueError, match="CUDA"):
        randomized_svd(M, 2, use_cuda_graph=True)
    with pytest.raises(ValueError, match="CUDA"):
        RandomizedSVD((10, 6), 2, use_cuda_graph=True)


def test_plan_without_graph_matches_function_with_same_seed():
    """The plan draws its sketch once; with the same seed it equals randomized_svd."""
    M = make_matrix((3, 70, 28), 4)
    plan = RandomizedSVD(M.shape, 5, generator=gen(3))
    a = plan(M)
    b = randomized_svd(M, 5, generator=gen(3))
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    M2 = make_matrix((3, 70, 28), 5)  # fresh input, same plan
    U, S, Vh = plan(M2)
    assert rel_error(M2, U, S, Vh) <= 1.05 * rel_error(M2, *truncated_svd(M2, 5))
    assert plan.last_info is not None and plan.graph_mode is None
    with pytest.raises(ValueError, match="plan built for"):
        plan(torch.randn(2, 70, 28))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("compute_dtype", [None, torch.bfloat16])
def test_cuda_graph_plan_matches_eager(compute_dtype):
    M = make_matrix((8, 512, 128), 1).cuda()
    eager = RandomizedSVD(M.shape, 16, device="cuda", compute_dtype=compute_dtype, generator=gen(2))
    graph = RandomizedSVD(
        M.shape, 16, device="cuda", compute_dtype=compute_dtype, generator=gen(2), use_cuda_graph=True
    )
    for seed in (1, 2):  # second call replays the captured graph on new data
        X = make_matrix((8, 512, 128), seed).cuda()
        a, b = eager(X), graph(X)
        assert graph.graph_mode in ("full", "split")
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=1e-3, atol=1e-4)
    X[3] = 0  # a failing element is recomputed eagerly down the chain
    U, S, Vh = graph(X)
    assert graph.last_info.n_fallback == 1
    assert all(torch.isfinite(t).all() for t in (U, S, Vh))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("orth", ORTH_METHODS)
def test_cuda_half_gemms_accuracy(orth):
    Mb = make_matrix((4, 512, 128), 3).cuda().to(torch.bfloat16)
    U, S, Vh = randomized_svd(Mb, 16, orth=orth, generator=torch.Generator(device="cuda").manual_seed(0))
    assert U.dtype == torch.bfloat16
    Mf = Mb.float()
    assert rel_error(Mf, U, S, Vh) <= 1.05 * rel_error(Mf, *truncated_svd(Mb, 16))


# ------------------------------------------- sync-free Rayleigh-Ritz pipeline (host_sync=False)


@pytest.mark.parametrize(
    "shape,rank,dtype",
    [
        ((8, 512, 128), 16, torch.float32),
        ((6, 192, 48), 8, torch.float32),
        ((3, 40, 160), 12, torch.float32),  # wide: the sketch goes on the smaller side
        ((4, 512, 128), 64, torch.float32),
        ((3, 100, 30), 5, torch.float64),
    ],
)
def test_sync_free_pipeline_error_and_orthogonality(shape, rank, dtype):
    seed = shape[-1] + rank
    M = make_matrix(shape, seed, dtype=dtype, decay=min(shape[-2:]) / 4)
    U, S, Vh, info = randomized_svd(M, rank, generator=gen(seed), host_sync=False, return_info=True)
    assert U.dtype == S.dtype == Vh.dtype == dtype
    assert U.shape == (*shape[:-1], rank) and Vh.shape == (*shape[:-2], rank, shape[-1])
    opt = rel_error(M, *truncated_svd(M, rank))
    assert rel_error(M, U, S, Vh) <= 1.05 * opt
    assert orth_err(U) < 1e-5 and orth_err(Vh.mT) < 1e-5  # float64 bases: orthonormal to float32 precision
    assert torch.all(S[..., :-1] >= S[..., 1:])
    assert info.ok is not None and info.paths == {"rayleigh_ritz": shape[0]} and info.n_fallback == 0
    # the same subspace as the checked pipeline (same sketch)
    _, Sc, _ = randomized_svd(M, rank, generator=gen(seed), host_sync=True)
    torch.testing.assert_close(S, Sc, rtol=1e-4, atol=1e-6 * float(Sc.max()))


def test_sync_free_bf16_input_vs_exact_svd_of_the_rounded_matrix():
    Mb = make_matrix((5, 160, 48), 7).to(torch.bfloat16)
    U, S, Vh = randomized_svd(Mb, 8, generator=gen(1), host_sync=False)
    assert U.dtype == torch.bfloat16
    Mf = Mb.float()
    assert rel_error(Mf, U, S, Vh) <= 1.05 * rel_error(Mf, *truncated_svd(Mb, 8))


def test_sync_free_degenerate_blocks_need_no_fallback():
    """Zero, exactly low-rank and huge-but-finite blocks in one batch: every element gets
    orthonormal factors and the exact product, with no element flagged."""
    g = gen(4)
    low = torch.randn(60, 3, generator=g) @ torch.randn(3, 25, generator=g)  # rank 3, ask for 6
    M = torch.stack([torch.zeros(60, 25), low, make_matrix((60, 25), 3) * 1e30, make_matrix((60, 25), 4)])
    U, S, Vh, info = randomized_svd(M, 6, generator=gen(), host_sync=False, return_info=True)
    assert info.paths == {"rayleigh_ritz": 4}
    assert all(torch.isfinite(t).all() for t in (U, S, Vh))
    assert orth_err(U) < 1e-5 and orth_err(Vh.mT) < 1e-5
    assert torch.equal(S[0], torch.zeros(6))
    assert rel_error(M[1:2], U[1:2], S[1:2], Vh[1:2]) < 1e-5
    assert float(S[1, 3:].max()) < 1e-5 * float(S[1, 0])
    for i in (2, 3):  # the huge block is scaled before its Gram, so it cannot overflow
        Mi = M[i : i + 1].double()
        opt = rel_error(Mi, *truncated_svd(Mi, 6))
        assert (
            rel_error(Mi, U[i : i + 1].double(), S[i : i + 1].double(), Vh[i : i + 1].double()) <= 1.05 * opt
        )


def test_sync_free_nonfinite_element_is_nan_and_flagged_lazily():
    M = make_matrix((4, 64, 24), 5)
    M[1, 3, 3] = float("nan")
    M[2, 0, 0] = float("inf")
    U, S, Vh, info = randomized_svd(M, 4, generator=gen(), host_sync=False, return_info=True)
    assert info.ok.tolist() == [True, False, False, True]  # a device tensor: nothing was read yet
    for t in (U, S, Vh):  # never a plausible-looking number for a bad element
        assert torch.isnan(t[1]).all() and torch.isnan(t[2]).all()
        assert torch.isfinite(t[0]).all() and torch.isfinite(t[3]).all()
    assert info.paths == {"rayleigh_ritz": 2, "nonfinite": 2} and info.path == "nonfinite"
    with pytest.raises(ValueError, match="2 of 4 matrices contain NaN or inf"):
        info.raise_if_nonfinite()
    good = [0, 3]
    assert rel_error(M[good], U[good], S[good], Vh[good]) <= 1.05 * rel_error(
        M[good], *truncated_svd(M[good], 4)
    )


def test_sync_free_batched_equals_per_matrix_and_is_deterministic():
    M = make_matrix((4, 96, 40), 3)
    U, S, Vh = randomized_svd(M, 6, generator=gen(5), host_sync=False)
    again = randomized_svd(M, 6, generator=gen(5), host_sync=False)
    assert all(torch.equal(a, b) for a, b in zip((U, S, Vh), again))
    for i in range(M.shape[0]):
        u, s, vh = randomized_svd(M[i], 6, generator=gen(5), host_sync=False)
        torch.testing.assert_close(s, S[i], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close((u * s) @ vh, (U[i] * S[i]) @ Vh[i], rtol=1e-4, atol=1e-5)


def test_sync_free_option_errors_and_defaults():
    M = make_matrix((2, 40, 30), 1)
    with pytest.raises(ValueError, match="host_sync must be"):
        randomized_svd(M, 2, host_sync=1)
    with pytest.raises(ValueError, match="algorithm='gram'"):
        randomized_svd(M, 2, algorithm="direct", host_sync=False)
    # CPU default: the checked pipeline, which validates its input on the host
    *_, info = randomized_svd(M, 2, return_info=True)
    assert info.ok is None and info.paths == {"cholqr2": 2}
    with pytest.raises(ValueError, match="NaN or inf"):
        randomized_svd(torch.full((5, 4), float("nan")), 1)


def test_gram_from_two_gemms_equals_the_full_gram():
    from spectralcache.linalg.rsvd import _gram

    M = make_matrix((3, 200, 96), 2)
    G = _gram(M, torch.float32)
    torch.testing.assert_close(G, M.mT @ M, rtol=1e-5, atol=1e-5)
    assert torch.equal(G, G.mT)
    G64 = _gram(M.double(), torch.float64)
    torch.testing.assert_close(G64, M.double().mT @ M.double(), rtol=1e-12, atol=1e-12)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("compute_dtype", [None, torch.bfloat16])
def test_cuda_default_is_sync_free_and_accurate(compute_dtype):
    """On CUDA the default pipeline reads nothing back: run it under torch's sync debug
    mode set to "error" (any host synchronization raises)."""
    M = make_matrix((64, 512, 128), 1).cuda()
    g = torch.Generator(device="cuda").manual_seed(0)
    randomized_svd(M, 32, generator=g, compute_dtype=compute_dtype)  # warm-up (cuSOLVER handles)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        U, S, Vh, info = randomized_svd(M, 32, generator=g, compute_dtype=compute_dtype, return_info=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert info.paths == {"rayleigh_ritz": 64}
    opt = rel_error(M, *truncated_svd(M, 32))
    assert rel_error(M, U, S, Vh) <= 1.05 * opt
    assert orth_err(U.cpu()) < 1e-4 and orth_err(Vh.mT.cpu()) < 1e-4


# ------------------------------------------------------- the Triton Jacobi eigensolver (core)


def test_round_robin_rounds_meet_every_pair_once():
    from spectralcache.linalg.jacobi import round_robin_pairs

    for n in (2, 3, 8, 9, 40, 73):
        rounds = round_robin_pairs(n)
        pairs = [p for r in rounds for p in r]
        assert len(pairs) == len(set(pairs)) == n * (n - 1) // 2
        for r in rounds:  # disjoint within a round: the rotations commute
            idx = [i for p in r for i in p]
            assert len(idx) == len(set(idx)) and all(p < q for p, q in r)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n", [1, 2, 5, 12])
def test_jacobi_eigh_matches_lapack(n, dtype):
    """The kernel (under Triton's interpreter on CPU) against LAPACK, on fresh random
    symmetric matrices with spread eigenvalues, a repeated eigenvalue and a zero matrix."""
    pytest.importorskip("triton")
    from spectralcache.linalg.jacobi import jacobi_eigh

    g = gen(n)
    x = torch.randn(3, 2 * n, n, generator=g, dtype=torch.float64) * torch.logspace(
        0, -3, n, dtype=torch.float64
    )
    A = x.mT @ x
    A[1] = torch.eye(n, dtype=torch.float64) * 2.0  # all eigenvalues equal
    A[2] = 0
    A = A.to(dtype)
    w, V = jacobi_eigh(A.to(DEV))  # compiled on a GPU, interpreted on CPU
    w, V = w.cpu(), V.cpu()
    we = torch.linalg.eigvalsh(A.double()).flip(-1)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert torch.all(w[..., :-1] >= w[..., 1:])
    torch.testing.assert_close(w.double(), we, rtol=0, atol=tol * float(we.abs().max()))
    eye = torch.eye(n, dtype=dtype)
    assert float((V.mT @ V - eye).abs().max()) < 10 * tol
    recon = V @ torch.diag_embed(w) @ V.mT
    assert float((recon - A).abs().max()) <= 10 * tol * float(A.abs().max()) + 1e-30
    assert torch.equal(A[2], torch.zeros(n, n, dtype=dtype)) and torch.equal(
        w[2], torch.zeros(n, dtype=dtype)
    )


def test_jacobi_persistent_grid_equals_one_program_per_matrix():
    """The persistent launch (programs loop over matrices) does the same arithmetic per matrix."""
    pytest.importorskip("triton")
    from spectralcache.linalg.jacobi import jacobi_eigh

    x = torch.randn(5, 24, 12, generator=gen(3), dtype=torch.float64)
    A = (x.mT @ x).to(DEV)
    w0, V0 = jacobi_eigh(A, programs_per_sm=0)
    w1, V1 = jacobi_eigh(A, programs_per_sm=1)
    assert torch.equal(w0, w1) and torch.equal(V0, V1)
    torch.testing.assert_close(w0.cpu(), torch.linalg.eigvalsh(A.cpu()).flip(-1), rtol=1e-12, atol=1e-12)


def test_jacobi_eigh_rejects_bad_shapes():
    from spectralcache.linalg.jacobi import jacobi_eigh

    with pytest.raises(ValueError, match=r"\[B, n, n\]"):
        jacobi_eigh(torch.zeros(3, 4, 5))
    with pytest.raises(ValueError, match="float32 or float64"):
        jacobi_eigh(torch.zeros(1, 3, 3, dtype=torch.float16))


def test_sync_free_pipeline_with_the_jacobi_core_equals_lapack_core():
    pytest.importorskip("triton")
    M = make_matrix((3, 60, 10), 8).to(DEV)
    a = [
        t.cpu() for t in randomized_svd(M, 4, oversample=4, generator=gen(2), host_sync=False, core="jacobi")
    ]
    b = [t.cpu() for t in randomized_svd(M, 4, oversample=4, generator=gen(2), host_sync=False, core="eigh")]
    torch.testing.assert_close(a[1], b[1], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(
        (a[0] * a[1].unsqueeze(-2)) @ a[2], (b[0] * b[1].unsqueeze(-2)) @ b[2], rtol=1e-5, atol=1e-6
    )
    with pytest.raises(ValueError, match="core must be one of"):
        randomized_svd(M, 4, host_sync=False, core="qr")


def test_compress_layer_benchmark_runs_on_cpu_and_writes_json(tmp_path):
    """benchmarks/compress_layer.py end to end at a tiny context: rows for compress_blocks and
    the randomized SVD with errors at the optimum's level, JSON rewritten per row."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    subprocess.run(
        [sys.executable, str(root / "benchmarks" / "compress_layer.py"), "--device", "cpu", "--tokens", "1088",
         "--heads", "2", "--repeats", "1", "--warmup", "0", "--out", str(tmp_path), "--tag", "t", "--no-slow"],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    data = json.loads((tmp_path / "compress_layer_t.json").read_text())
    assert data["meta"]["blocks"] == 2 and data["meta"]["ranks"] == [32, 64]
    rows = {r["what"].split(" [")[0].split(" rank")[0].split(",")[0]: r for r in data["results"]}
    assert {
        "compress_blocks",
        "randomized_svd keys",
        "randomized_svd values",
        "torch.linalg.svd keys (exact",
    } <= set(rows)
    opt = rows["torch.linalg.svd keys (exact"]["opt_rel_err"]
    assert rows["randomized_svd keys"]["rel_err"] <= 1.05 * opt
    assert 0 < rows["compress_blocks"]["key_rel_err"] < 0.2 and all(
        r["median_ms"] > 0 for r in data["results"]
    )


@pytest.mark.parametrize("orth", ORTH_METHODS)
def test_implicit_and_formed_gram_agree(orth, monkeypatch):
    """At n_iter=0 the Gram algorithm applies G = MᵀM as Mᵀ(M Z) (fewer FLOPs); forcing it to
    form G must give the same factorization up to rounding, both at the optimum's error."""
    from spectralcache.linalg import rsvd

    M = make_matrix((4, 256, 96), 12)
    opt = rel_error(M, *truncated_svd(M, 10))
    out = {}
    for implicit in (True, False):
        monkeypatch.setattr(rsvd, "_FORCE_IMPLICIT_GRAM", implicit)
        *f, info = randomized_svd(
            M, 10, n_iter=0, orth=orth, algorithm="gram", generator=gen(4), return_info=True
        )
        assert info.paths == {orth: 4}
        assert rel_error(M, *f) <= 1.05 * opt and orth_err(f[0]) < 1e-4
        out[implicit] = f
    torch.testing.assert_close(out[True][1], out[False][1], rtol=1e-4, atol=1e-5)
    monkeypatch.setattr(rsvd, "_FORCE_IMPLICIT_GRAM", None)
    assert rsvd._implicit_gram(M, 24, 0) and not rsvd._implicit_gram(M, 24, 2)


def test_bench_svd_interleaved_timing(tmp_path):
    """``--interleave`` times the methods taking turns; every method gets exactly --repeats calls."""
    import json

    from spectralcache.bench.svd import main as bench_main

    rc = bench_main(
        ["--device", "cpu", "--shapes", "2x48x24:4", "--repeats", "3", "--warmup", "1", "--interleave",
         "--out", str(tmp_path), "--tag", "il", "--no-plot"]
    )  # fmt: skip
    assert rc == 0
    data = json.loads((tmp_path / "rsvd_il.json").read_text())
    assert data["meta"]["interleaved"] is True
    assert {r["repeats"] for r in data["results"]} == {3}
    assert any(r["method"] == "rsvd[rayleigh_ritz]" for r in data["results"])
    assert all(r["err_ratio"] <= 1.05 for r in data["results"] if r["method"].startswith("rsvd["))
