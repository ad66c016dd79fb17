"""Probe (stop 17, issue 7): how close to 10x ``torch.linalg.svd`` can the CPU randomized SVD get
at the seed shape ([8, 512, 128], rank 16, n_iter 2, oversample 8) on this machine?

It times, taking turns (each round calls every entry once, so all see the same load):

* ``torch.linalg.svd`` and the library's ``randomized_svd`` (the checked CPU fast path);
* ``bare``: the same mathematics with every safeguard removed -- no finiteness scan, no
  per-element checks, no fallback chain, no steep-spectrum routing, no info bookkeeping: the Gram
  (the library's strip GEMMs), ``G^3 Ω`` with a float64 CholeskyQR pass between products, the final
  basis, the float64 ``l x l`` eigendecomposition and the lift ``U = M V / S``. It is not a usable
  SVD (it returns garbage silently on steep or non-finite input) -- it is a lower bound on what
  any implementation of this algorithm costs here;
* the bare path's parts alone: the Gram, the four ``G Z`` products, LAPACK's batched ``eigh`` of
  the ``8 x 24 x 24`` core, and the lift ``M V``.

The 10x bar needs ``linalg_svd_ms / 10``; if the bare path is above that, no implementation of
this algorithm at this accuracy reaches it on this machine. Also writes the worst-element error
ratio (Frobenius error / optimal) of both.

    python benchmarks/rsvd_floor_probe.py --threads 2 --out benchmarks/results/rsvd_floor_probe.json
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

F64 = torch.float64


def bare_rsvd(M: torch.Tensor, omega: torch.Tensor, rank: int, n_iter: int):
    eye = torch.eye(omega.shape[-1], dtype=F64)
    G = R._gram(M, M.dtype)
    X = torch.bmm(G, omega.expand(M.shape[0], *omega.shape))
    for _ in range(n_iter):
        Rf, _ = torch.linalg.cholesky_ex((X.mT @ X).to(F64), upper=True)
        X = torch.bmm(G, X @ torch.linalg.solve_triangular(Rf, eye, upper=True).to(M.dtype))
    Xd = X.to(F64)
    Rf, _ = torch.linalg.cholesky_ex(Xd.mT @ Xd, upper=True)
    Z = Xd @ torch.linalg.solve_triangular(Rf, eye, upper=True)
    lam, W = torch.linalg.eigh(Z.mT @ torch.bmm(G, Z.to(M.dtype)).to(F64))
    lam, W = lam.flip(-1)[..., :rank], W.flip(-1)[..., :rank]
    s = lam.clamp_min(0).sqrt()
    V = (Z @ W).to(M.dtype)
    return M @ (V / s.to(M.dtype).unsqueeze(-2)), s.to(M.dtype), V.mT


def worst_ratio(M: torch.Tensor, U, S, Vh, rank: int) -> float:
    err = (M.double() - (U * S.unsqueeze(-2)).double() @ Vh.double()).square().sum((-2, -1)).sqrt()
    opt = torch.linalg.svdvals(M.double())[..., rank:].square().sum(-1).sqrt()
    return float((err / opt).max())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=200, help="timed rounds (every entry once per round)")
    ap.add_argument("--svd-every", type=int, default=10, help="time torch.linalg.svd every N rounds")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/rsvd_floor_probe.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rank, n_iter, width = 16, 2, 24
    M = decaying_matrix((8, 512, 128), noise=1e-2, generator=torch.Generator().manual_seed(0))
    omega = torch.randn(128, width, generator=torch.Generator().manual_seed(1))
    G = R._gram(M, M.dtype)
    Z = torch.linalg.qr(torch.randn(8, 128, width, generator=torch.Generator().manual_seed(2)))[0]
    A = torch.randn(8, width, width, dtype=F64)
    A = A @ A.mT
    V = torch.linalg.qr(torch.randn(8, 128, rank))[0]
    entries = {
        "library_ms": lambda: R.randomized_svd(M, rank, n_iter=n_iter),
        "bare_ms": lambda: bare_rsvd(M, omega, rank, n_iter),
        "part_gram_ms": lambda: R._gram(M, M.dtype),
        "part_4_gz_ms": lambda: [torch.bmm(G, Z) for _ in range(4)],
        "part_eigh_ms": lambda: torch.linalg.eigh(A),
        "part_lift_ms": lambda: M @ V,
    }
    times: dict[str, list[float]] = {k: [] for k in [*entries, "linalg_svd_ms"]}
    for _ in range(20):
        for fn in entries.values():
            fn()
    for r in range(args.rounds):
        for name, fn in entries.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
        if r % args.svd_every == 0:
            t = time.perf_counter()
            torch.linalg.svd(M, full_matrices=False)
            times["linalg_svd_ms"].append(time.perf_counter() - t)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    svd = med["linalg_svd_ms"]
    summary = {
        **med,
        "x_library": svd / med["library_ms"],
        "x_bare": svd / med["bare_ms"],
        "bar_10x_ms": svd / 10,
        "parts_sum_ms": sum(v for k, v in med.items() if k.startswith("part_")),
        "err_ratio_library": worst_ratio(M, *R.randomized_svd(M, rank, n_iter=n_iter), rank),
        "err_ratio_bare": worst_ratio(M, *bare_rsvd(M, omega, rank, n_iter), rank),
    }
    for k, v in summary.items():
        print(f"{k:22s} {v:9.4f}")
    meta = {
        "command": "python benchmarks/rsvd_floor_probe.py "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
        "machine": platform.processor() or platform.machine(),
        "threads": args.threads,
        "torch": torch.__version__,
        "load_avg": list(__import__("os").getloadavg()),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "summary": summary}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
