"""Probe (stop 16, issue 7): would a bfloat16 Gram make the CPU randomized SVD 10x faster than
``torch.linalg.svd`` at the seed shape without losing accuracy? Not adopted; this is the evidence.

The probe replaces level 0 of the checked CPU pipeline (``rsvd._pipeline_cpu_rr``) by: the Gram
``G = MᵀM`` from bfloat16 copies of M (oneDNN bf16 GEMM, float32 accumulation, bf16 output), the
same power iterations and CholeskyQR bases on G, then an *exact* Rayleigh-Ritz on the float32
product ``Y = M Z`` (``A = YᵀY`` in float64, ``U = Y W / S``, ``V = Z W``; steep elements by
``_rr_cholqr2``), so only the sketch's subspace sees bf16 rounding. It reports

* the error ratio (Frobenius error / optimal rank-16 error, worst element of 8) of the library's
  path and of the probe on ``[8, 512, 128]`` matrices from ``bench.svd.decaying_matrix`` over a grid
  of decay rates and noise floors (with each matrix's S1/S16 and optimal relative residual);
* median wall times (ms) of both and of ``torch.linalg.svd`` side by side, at the bench's seed
  shape (decay 8, noise 1e-2), ``--threads`` intra-op threads.

    python benchmarks/rsvd_bf16_gram_probe.py --threads 2 --out benchmarks/results/rsvd_bf16_gram_probe.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

import spectralcache.linalg.rsvd as R
from spectralcache.bench.svd import decaying_matrix

LIBRARY = R._pipeline_cpu_rr


def probe(M, omega, rank, n_iter, orth, gdtype, acc, timer, check_finite=False):
    ctx = R._Ctx(orth, 1.0, acc, True)
    Mc = M if M.dtype == gdtype else M.to(gdtype)
    if check_finite:
        R._validate(M, rank)
    Mb = Mc.to(torch.bfloat16)
    G = (Mb.mT @ Mb).to(acc)

    def gmul(Z: torch.Tensor) -> torch.Tensor:
        return torch.bmm(G, Z.expand(G.shape[0], *Z.shape)) if Z.ndim == 2 else G @ Z

    Z, Rr = R._sketch_basis(gmul, omega, n_iter, ctx, timer)
    steep = R._steep_estimate(Rr, rank, R._GRAM_RR_MAX_KAPPA, R._STEEP_ESTIMATE_MARGIN)
    if bool(steep.any()):
        U, s, V, ok = R._rr_cholqr2(Mc, Z, None, rank, gdtype, acc)
        V = V.to(acc)
    else:
        Zc = Z.to(acc)
        Y = Mc @ Zc
        A = (Y.mT @ Y).to(torch.float64)
        s, W = R._top_eigh(A, rank)
        ok = torch.isfinite(A.sum((-2, -1)))
        V = Zc @ W.to(acc)
        U = Y @ (W / s.clamp_min(1e-300).unsqueeze(-2)).to(acc)
    ctx.checks.append(ok)
    ctx.checks.append((s[..., -1] >= 1e-6 * s[..., 0]) & (s[..., 0] > 0))
    return U.to(acc), s.to(acc), V.mT, ctx.ok()


def run_with(level0, fn):
    R._pipeline_cpu_rr = level0
    try:
        return fn()
    finally:
        R._pipeline_cpu_rr = LIBRARY


def worst_ratio(M: torch.Tensor, rank: int, level0) -> float:
    U, S, Vh = run_with(level0, lambda: R.randomized_svd(M, rank, generator=torch.Generator().manual_seed(0)))
    err = (M.double() - (U * S.unsqueeze(-2)).double() @ Vh.double()).square().sum((-2, -1)).sqrt()
    opt = torch.linalg.svdvals(M.double())[..., rank:].square().sum(-1).sqrt()
    return float((err / opt).max())


def median_ms(fn, n: int, warmup: int = 20) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/rsvd_bf16_gram_probe.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for decay in (8.0, 6.0, 5.0, 4.0, 2.0):
        for noise in (1e-1, 1e-2, 1e-3, 1e-4):
            M = decaying_matrix(
                (8, 512, 128), noise=noise, decay=decay, generator=torch.Generator().manual_seed(3)
            )
            sv = torch.linalg.svdvals(M.double())
            row = {
                "decay": decay, "noise": noise,
                "s1_over_s16_max": float((sv[:, 0] / sv[:, 15]).max()),
                "opt_rel_residual_min": float((sv[:, 16:].square().sum(-1).sqrt() / sv.square().sum(-1).sqrt()).min()),
                "ratio_library": worst_ratio(M, 16, LIBRARY), "ratio_bf16_gram": worst_ratio(M, 16, probe),
            }  # fmt: skip
            rows.append(row)
            print(json.dumps(row), flush=True)
    M = decaying_matrix((8, 512, 128), noise=1e-2, generator=torch.Generator().manual_seed(0))

    def call(level0):
        return run_with(level0, lambda: R.randomized_svd(M, 16, generator=torch.Generator().manual_seed(0)))

    times = {
        "library_ms": median_ms(lambda: call(LIBRARY), args.repeats),
        "bf16_gram_ms": median_ms(lambda: call(probe), args.repeats),
        "linalg_svd_ms": median_ms(
            lambda: torch.linalg.svd(M, full_matrices=False), max(10, args.repeats // 10), 3
        ),
    }
    times["x_library"] = times["linalg_svd_ms"] / times["library_ms"]
    times["x_bf16_gram"] = times["linalg_svd_ms"] / times["bf16_gram_ms"]
    print(json.dumps(times), flush=True)
    meta = {
        "machine": platform.processor() or platform.machine(),
        "threads": args.threads,
        "torch": torch.__version__,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "accuracy": rows, "seed_shape_times": times}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
