"""Fit error of the eigensolver-free subspace solver vs the optimum, on real Gemma 3 270M K/V (CPU).

What it measures: for every full-attention layer of Gemma 3 270M (5, 11, 17) the exact K/V of
one prose prefill (``spectralcache.eval.spectrum.capture``: keys post-RoPE as the cache stores
them, keys pre-RoPE, values; 1 KV head, head_dim 256) are cut into blocks of 512 tokens, and
each block is fitted at the default preset's ranks (keys 32, values 64) by

* ``subspace_fit`` (``spectralcache.linalg.subspace``) with ``n_iter`` = 0 .. 8;
* ``randomized_svd`` with the default preset's knobs (``n_iter`` 2, oversample 8, the path
  ``svd_solver="rsvd"`` runs on CPU);

and the relative Frobenius error over all blocks of a kind is divided by the optimal rank-r
error (``torch.linalg.svdvals`` in float64). Fit only: no quantization, no outliers.

    python benchmarks/subspace_error.py --tokens 4096
    python benchmarks/subspace_error.py --kv /tmp/kv.pt     # reuse (or create) a capture

Writes ``benchmarks/results/subspace_error_gemma3_270m.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from spectralcache.linalg.rsvd import randomized_svd
from spectralcache.linalg.subspace import subspace_fit

KINDS = {"keys_post_rope": "rank_keys", "keys_pre_rope": "rank_keys", "values": "rank_values"}


def rel(m: torch.Tensor, approx: torch.Tensor) -> float:
    md = m.double()
    return float(torch.linalg.vector_norm(md - approx.double()) / torch.linalg.vector_norm(md))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--block-size", type=int, default=512)
    p.add_argument(
        "--kv", default=None, help="torch.save file of the capture: loaded if it exists, else written"
    )
    p.add_argument("--iters", default="0,1,2,3,4,5,6,8")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/subspace_error_gemma3_270m.json")
    args = p.parse_args(argv)
    from spectralcache.config import SpectralConfig

    cfg = SpectralConfig()
    t0 = time.perf_counter()
    if args.kv and Path(args.kv).exists():
        kv = torch.load(args.kv)
    else:
        from spectralcache.eval.model import load_model
        from spectralcache.eval.spectrum import capture

        model, tok = load_model("gemma3-270m")
        kv = capture(model, tok, args.tokens)
        if args.kv:
            torch.save(kv, args.kv)
    capture_s = time.perf_counter() - t0
    results = {}
    for kind, rank_field in KINDS.items():
        r = getattr(cfg, rank_field)
        m = torch.cat(
            [
                x[kind].reshape(x[kind].shape[0], -1, args.block_size, x[kind].shape[-1]).flatten(0, 1)
                for x in kv.values()
            ]
        )  # fmt: skip  [blocks, T, D]
        s = torch.linalg.svdvals(m.double())
        opt = float((s[:, r:] ** 2).sum().sqrt() / (s**2).sum().sqrt())
        u, sv, vh = randomized_svd(
            m, r, n_iter=cfg.svd_n_iter, oversample=cfg.svd_oversample, orth=cfg.svd_orth,
            generator=torch.Generator().manual_seed(args.seed),
        )  # fmt: skip
        row = {"blocks": m.shape[0], "shape": list(m.shape[1:]), "rank": r, "optimal_rel_err": opt,
               "rsvd_over_optimal": rel(m, (u * sv.unsqueeze(-2)) @ vh) / opt, "subspace_over_optimal": {}}  # fmt: skip
        for q in (int(x) for x in args.iters.split(",")):
            f = subspace_fit(m, r, n_iter=q, generator=torch.Generator().manual_seed(args.seed))
            row["subspace_over_optimal"][str(q)] = rel(m, f.coeffs @ f.basis) / opt
        results[kind] = row
        subs = " ".join(f"q{q}:{v:.4f}" for q, v in row["subspace_over_optimal"].items())
        print(f"{kind:15s} r{r} opt {opt:.4f} rsvd {row['rsvd_over_optimal']:.4f} subspace {subs}")
    meta = {
        "benchmark": "benchmarks/subspace_error.py",
        "command": " ".join(
            ["python", "benchmarks/subspace_error.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "model": "gemma3-270m (embedded GGUF, float32)",
        "tokens": args.tokens,
        "layers": [int(i) for i in kv],
        "block_size": args.block_size,
        "capture_s": capture_s,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
