"""The bfloat16 sketch in front of the CPU level 0 of randomized_svd (``_pipeline_cpu_bf16``)
against the float32 path it sits in front of (``_pipeline_cpu_rr``), on fresh random inputs:
the same accuracy (error within 1e-3 of the float32 path's, orthonormal factors), steep
elements handed to the float32 path and nothing else, NaN refused, and where it applies.
The sketch is forced on here, so it runs (emulated, slower) on CPUs without bfloat16 units too."""

from __future__ import annotations

import pytest
import torch

from spectralcache.bench.svd import decaying_matrix, rel_error
from spectralcache.linalg import randomized_svd, reset_rsvd_stats, rsvd, rsvd_stats


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def orth_err(X: torch.Tensor) -> float:
    X = X.double()
    return float(torch.linalg.matrix_norm(X.mT @ X - torch.eye(X.shape[-1], dtype=X.dtype)).max())


def per_element_error(M: torch.Tensor, U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor) -> torch.Tensor:
    M64 = M.double()
    approx = (U.double() * S.double().unsqueeze(-2)) @ Vh.double()
    return torch.linalg.matrix_norm(M64 - approx) / torch.linalg.matrix_norm(M64)


def optimal_error(M: torch.Tensor, rank: int) -> torch.Tensor:
    s = torch.linalg.svdvals(M.double())
    return s[..., rank:].norm(dim=-1) / s.norm(dim=-1)


def run(M: torch.Tensor, rank: int, *, bf16: bool, monkeypatch, seed: int = 0, **kw):
    monkeypatch.setattr(rsvd, "_CPU_BF16_SKETCH", bf16)
    return randomized_svd(M, rank, generator=gen(seed), return_info=True, **kw)


def offset_batch(batch: int, offsets: list[float], seed: int) -> torch.Tensor:
    """Decaying spectra plus a common row offset of the given sizes per element: the offset
    makes one direction dominant, S₁/S_16 grows from ~6 (no offset) past 40 (0.03)."""
    M = decaying_matrix((batch, 512, 128), generator=gen(seed), noise=1e-3)
    g = gen(seed + 1)
    for i, c in enumerate(offsets):
        M[i] += c * torch.randn(1, 128, generator=g)
    return M


@pytest.mark.parametrize(
    "shape,rank,n_iter,oversample",
    [
        ((8, 512, 128), 16, 2, 8),  # the seed shape
        ((6, 512, 256), 32, 2, 8),  # the default preset's keys at head_dim 256
        ((3, 70, 160), 10, 3, 8),  # wide: transposed to the tall side
        ((2, 3, 120, 64), 6, 2, 4),  # leading dims
    ],
)
@pytest.mark.parametrize("seed", [1, 2])
def test_bf16_sketch_matches_the_float32_path(shape, rank, n_iter, oversample, seed, monkeypatch):
    M = decaying_matrix(shape, generator=gen(100 + seed), noise=1e-2)
    reset_rsvd_stats()
    Ub, Sb, Vhb, info_b = run(M, rank, bf16=True, monkeypatch=monkeypatch, seed=seed, n_iter=n_iter,
                              oversample=oversample)  # fmt: skip
    batch = M[..., 0, 0].numel()
    assert rsvd_stats().get("cpu_bf16_sketch", 0) == batch  # every element kept by the sketch
    Uf, Sf, Vhf, info_f = run(M, rank, bf16=False, monkeypatch=monkeypatch, seed=seed, n_iter=n_iter,
                              oversample=oversample)  # fmt: skip
    assert info_b.paths == info_f.paths == {"cholqr2": batch}
    assert Ub.shape == Uf.shape and Sb.shape == Sf.shape and Vhb.shape == Vhf.shape
    assert Ub.dtype == Sb.dtype == Vhb.dtype == torch.float32
    err_b, err_f = rel_error(M, Ub, Sb, Vhb), rel_error(M, Uf, Sf, Vhf)
    assert err_b <= err_f * (1 + 1e-3)
    assert err_b <= 1.05 * rel_error(M, *rsvd.truncated_svd(M, rank))
    torch.testing.assert_close(Sb, Sf, rtol=1e-3, atol=1e-6 * float(Sf.max()))
    assert orth_err(Ub) < 5e-6 and orth_err(Vhb.mT) < 5e-6
    assert torch.all(Sb[..., :-1] >= Sb[..., 1:])


def test_steep_elements_go_to_the_float32_path_and_only_they(monkeypatch):
    offsets = [0.0, 0.003, 0.2, 0.0, 1.0, 0.01, 3.0, 0.0]
    M = offset_batch(8, offsets, seed=7)
    S_true = torch.linalg.svdvals(M.double())
    steep = (S_true[:, 0] / S_true[:, 15]) > 2 * rsvd._BF16_SKETCH_MAX_KAPPA
    mild = (S_true[:, 0] / S_true[:, 15]) < rsvd._BF16_SKETCH_MAX_KAPPA
    assert steep.sum() >= 2 and mild.sum() >= 4  # the batch has both kinds
    calls: list[int] = []
    real = rsvd._pipeline_cpu_rr

    def spy(Mc, *a, **k):
        calls.append(Mc.shape[0])
        return real(Mc, *a, **k)

    monkeypatch.setattr(rsvd, "_pipeline_cpu_rr", spy)
    reset_rsvd_stats()
    U, S, Vh, info = run(M, 16, bf16=True, monkeypatch=monkeypatch)
    stats = rsvd_stats()
    rerouted = stats.get("cpu_bf16_rerouted", 0)
    assert calls == [rerouted] and rerouted >= int(steep.sum())
    assert stats["cpu_bf16_sketch"] + rerouted == 8 and stats["cpu_bf16_sketch"] >= int(mild.sum())
    # the elements the float32 path recomputed are exactly what it gives on its own (the
    # steepest, S₁/S_16 ~ 4000, fails its level 0 too and goes down the same fallback chain)
    monkeypatch.setattr(rsvd, "_pipeline_cpu_rr", real)
    Uf, Sf, Vhf, info_f = run(M, 16, bf16=False, monkeypatch=monkeypatch)
    assert info.paths == info_f.paths
    torch.testing.assert_close(S[steep], Sf[steep], rtol=1e-6, atol=0)
    err, err_f, opt = per_element_error(M, U, S, Vh), per_element_error(M, Uf, Sf, Vhf), optimal_error(M, 16)
    assert torch.all(err <= err_f * (1 + 1e-3) + 1e-7)
    assert torch.all(err[mild] <= 1.05 * opt[mild])  # (the steepest is at ~1.05 on either path)
    assert orth_err(U) < 5e-6 and orth_err(Vh.mT) < 5e-6


def test_rank_deficient_input_is_handed_on(monkeypatch):
    """Exactly rank 5 asked for rank 8: S_k is ~0, which the sketch does not trust; the float32
    path and its fallback chain deliver a valid factorization as they do without the sketch."""
    g = gen(4)
    M = torch.randn(3, 256, 5, generator=g) @ torch.randn(3, 5, 96, generator=g)
    reset_rsvd_stats()
    U, S, Vh, _ = run(M, 8, bf16=True, monkeypatch=monkeypatch)
    assert rsvd_stats().get("cpu_bf16_rerouted", 0) == 3
    assert torch.isfinite(U).all() and torch.isfinite(S).all() and torch.isfinite(Vh).all()
    assert rel_error(M, U, S, Vh) < 1e-5


def test_nonfinite_input_raises(monkeypatch):
    M = decaying_matrix((4, 256, 64), generator=gen(2))
    M[2, 17, 5] = float("nan")
    with pytest.raises(ValueError, match=r"NaN|inf|finite"):
        run(M, 8, bf16=True, monkeypatch=monkeypatch)


def test_where_it_applies(monkeypatch):
    """float32 (and half, multiplied in float32) CPU inputs through the formed Gram only:
    float64 input, an implicit Gram (n_iter=0 at this size) and the switch turned off keep
    the float32 path."""
    calls: list[int] = []
    real = rsvd._pipeline_cpu_bf16

    def spy(Mc, *a, **k):
        calls.append(Mc.shape[0])
        return real(Mc, *a, **k)

    monkeypatch.setattr(rsvd, "_pipeline_cpu_bf16", spy)
    M = decaying_matrix((2, 256, 96), generator=gen(3))
    run(M, 8, bf16=True, monkeypatch=monkeypatch)
    run(M.bfloat16(), 8, bf16=True, monkeypatch=monkeypatch)
    assert calls == [2, 2]
    run(M.double(), 8, bf16=True, monkeypatch=monkeypatch)
    run(M, 8, bf16=True, monkeypatch=monkeypatch, n_iter=0)
    run(M, 8, bf16=False, monkeypatch=monkeypatch)
    assert calls == [2, 2]


@pytest.mark.parametrize("value,expected", [("0", False), ("off", False), ("1", True), ("yes", True)])
def test_environment_switch(value, expected, monkeypatch):
    monkeypatch.setenv("SPECTRALCACHE_CPU_BF16_SKETCH", value)
    rsvd._bf16_sketch_default.cache_clear()
    try:
        assert rsvd._bf16_sketch_default() is expected
    finally:
        monkeypatch.delenv("SPECTRALCACHE_CPU_BF16_SKETCH")
        rsvd._bf16_sketch_default.cache_clear()
