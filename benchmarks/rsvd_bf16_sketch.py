"""The CPU bfloat16 sketch of randomized_svd against the float32 path it sits in front of.

Two measurements, both with the sketch forced on and off in the same process (one torch thread,
thread CPU-time clock, so another job on the box moves both sides alike):

* ``offsets``: decaying-spectrum blocks ([8, 512, 128] rank 16 and [8, 512, 256] rank 32) plus a
  common row offset of growing size, the structure where the bfloat16 Gram's ~2⁻⁸ relative error
  hurts most (one dominant direction). Per element: S₁/S_k, whether the sketch kept it, and the
  excess error over the float32 path. This is what ``_BF16_SKETCH_MAX_KAPPA`` is chosen from.
* ``real``: the exact K/V of Gemma 3 270M's full-attention layers after a prose prefill
  (``benchmarks/subspace_error.py``'s capture, ``--kv FILE``; skipped without one), in blocks of
  512 tokens at the default preset's ranks: time and error against the optimum, both paths.

    OMP_NUM_THREADS=1 python benchmarks/rsvd_bf16_sketch.py [--kv /tmp/kv.pt]

Writes ``benchmarks/results/rsvd_bf16_sketch.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time
from pathlib import Path

import torch

import spectralcache.linalg.rsvd as rsvd
from spectralcache.bench.svd import decaying_matrix

OUT = Path(__file__).resolve().parent / "results" / "rsvd_bf16_sketch.json"


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def errors(M: torch.Tensor, U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor) -> torch.Tensor:
    M64 = M.double()
    return torch.linalg.matrix_norm(M64 - (U.double() * S.double().unsqueeze(-2)) @ Vh.double())


def solve(M: torch.Tensor, rank: int, bf16: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rsvd._CPU_BF16_SKETCH = bf16
    return rsvd.randomized_svd(M, rank, generator=gen(0))


def offsets(seeds: int) -> list[dict]:
    rows = []
    for seed in range(seeds):
        for c in (0.0, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04):
            for n, rank in ((128, 16), (256, 32)):
                M = decaying_matrix((8, 512, n), generator=gen(seed), noise=1e-3)
                M = M + c * torch.randn(8, 1, n, generator=gen(seed + 50))
                Uf, Sf, Vf = solve(M, rank, False)
                Ub, Sb, Vb = solve(M, rank, True)
                sv = torch.linalg.svdvals(M.double())
                kappa = sv[:, 0] / sv[:, rank - 1]
                kept = Sb[:, 0] <= rsvd._BF16_SKETCH_MAX_KAPPA * Sb[:, -1]
                excess = errors(M, Ub, Sb, Vb) / errors(M, Uf, Sf, Vf) - 1
                for i in range(8):
                    rows.append({"seed": seed, "offset": c, "n": n, "rank": rank, "kappa": float(kappa[i]),
                                 "kept_by_sketch": bool(kept[i]), "excess_error": float(excess[i])})  # fmt: skip
    return rows


def timed(M: torch.Tensor, rank: int, bf16: bool, repeats: int) -> float:
    for _ in range(3):
        solve(M, rank, bf16)
    ts = []
    for _ in range(repeats):
        t0 = time.thread_time()
        solve(M, rank, bf16)
        ts.append(time.thread_time() - t0)
    return sorted(ts)[len(ts) // 2] * 1e3


def real(kv_path: Path, repeats: int) -> list[dict]:
    kv = torch.load(kv_path)
    rows = []
    for kind, rank in (("keys_post_rope", 32), ("keys_pre_rope", 32), ("values", 64)):
        blocks = []
        for layer in sorted(kv):
            x = kv[layer][kind].float().reshape(-1, kv[layer][kind].shape[-1])
            nb = x.shape[0] // 512
            blocks.append(x[: nb * 512].reshape(nb, 512, -1))
        M = torch.cat(blocks)
        opt = torch.linalg.svdvals(M.double())[..., rank:].norm(dim=-1)
        row = {"kind": kind, "shape": list(M.shape), "rank": rank}
        for name, bf16 in (("float32", False), ("bf16_sketch", True)):
            rsvd.reset_rsvd_stats()
            U, S, Vh = solve(M, rank, bf16)
            rerouted = rsvd.rsvd_stats().get("cpu_bf16_rerouted", 0)
            row[name] = {
                "ms": timed(M, rank, bf16, repeats),
                "error_over_optimal": float((errors(M, U, S, Vh) / opt).mean()),
                "rerouted": rerouted,
            }
        rows.append(row)
        print(kind, row)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--kv", type=Path, default=None, help="a capture written by benchmarks/subspace_error.py --kv"
    )
    ap.add_argument("--seeds", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    torch.set_num_threads(1)
    prev = rsvd._CPU_BF16_SKETCH
    try:
        rows = offsets(args.seeds)
        kept = [r for r in rows if r["kept_by_sketch"]]
        by_kappa = {}
        for lo, hi in ((0, 16), (16, 20), (20, 24), (24, 32), (32, 1e9)):
            sel = [r["excess_error"] for r in kept if lo <= r["kappa"] < hi]
            by_kappa[f"{lo}-{hi:g}"] = {"kept": len(sel), "max_excess": max(sel) if sel else None}
        print("offsets: excess error over the float32 path among elements the sketch kept, by S1/S_k:")
        for k, v in by_kappa.items():
            print(f"  {k:>10}: {v}")
        real_rows = real(args.kv, args.repeats) if args.kv and args.kv.exists() else []
    finally:
        rsvd._CPU_BF16_SKETCH = prev
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "meta": {"command": "python benchmarks/rsvd_bf16_sketch.py" + (f" --kv {args.kv}" if args.kv else ""),
                 "commit": commit, "machine": platform.processor() or platform.machine(), "threads": 1,
                 "clock": "thread CPU time", "max_kappa": rsvd._BF16_SKETCH_MAX_KAPPA,
                 "native_bf16": rsvd._native_bf16_cpu(), "torch": torch.__version__},
        "offsets_by_kappa": by_kappa, "offsets": rows, "real": real_rows}, indent=1))  # fmt: skip
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
