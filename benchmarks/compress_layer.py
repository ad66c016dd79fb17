"""Time the compression of one long-context layer: every full block of every KV head in one call.

What it measures: ``spectralcache.cache.block.compress_blocks`` (the entry point the cache
calls once per layer) on keys/values of one layer at Llama-3.1-8B KV shape (8 KV heads,
head_dim 128), ``--tokens`` long (default 131072 = 128K), with a preset's block size,
ranks and outliers. The number of blocks is what the cache compresses for that context:
the hot buffer keeps ``hot_size`` tokens exact, so ``(tokens - hot_size) // block_size``
full blocks (255 for 128K with the default ``--preset lowrank``: the low-rank preset, the library's
default until stop 17, is what needs an SVD; today's default preset quantizes per channel / token).

``compress_blocks`` is timed once per ``SpectralConfig.svd_solver`` in ``--solvers`` (default:
``auto``, which is the eigensolver-free subspace solver on CUDA, and ``rsvd``, the randomized
SVD with its Rayleigh-Ritz eigenproblems: the path before it), at ``--tokens`` and at each of
``--also-tokens`` (the first blocks of the same layer; 32K by default). Every fit row reports
its error over the optimal rank-r error of the same blocks (``err_over_optimal``; the optimum
from the eigenvalues of each block's Gram in float64 on the host). The subspace fit alone is
timed per ``--subspace-iters`` value; ``--profile`` prints the CUDA kernels of one
compression; ``--solve-variants`` times the subspace fit with other ``X R⁻¹`` implementations.

Also timed, side by side in the same process on the same data: the randomized SVD alone
for the key and the value shapes, with the sync-free Rayleigh-Ritz pipeline
(``host_sync=False``, the CUDA default) and the checked pipeline (``host_sync=True``), and
``torch.linalg.svd`` of the key blocks (the exact reference; skipped with
``--no-exact``). Host synchronizations per compression call are counted with
``torch.cuda.set_sync_debug_mode`` (CUDA only).

Timing: CUDA events around each call after warm-up and a synchronize (median of
``--repeats``); on CPU wall clock (the machine's load average is recorded).
Writes ``benchmarks/results/compress_layer_<tag>.json``.

    python benchmarks/compress_layer.py --device cuda
    python benchmarks/compress_layer.py --device cpu --tokens 8192
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import socket
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from spectralcache.bench.common import sync_sites
from spectralcache.bench.svd import decaying_matrix, rel_error
from spectralcache.cache.block import compress_blocks, fit_solver, reconstruct
from spectralcache.config import get_preset
from spectralcache.linalg import rsvd as rsvd_module
from spectralcache.linalg.rsvd import randomized_svd
from spectralcache.linalg.subspace import subspace_fit


def layer_kv(
    heads: int, blocks: int, block: int, head_dim: int, dtype: torch.dtype, device: torch.device, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys/values ``[heads, blocks, block, head_dim]`` with a KV-like spectrum per block.

    Keys: fast-decaying spectrum (decay 8) plus noise and a few large "sink" rows; values:
    slower decay (32). Built on the device in chunks (a 128K layer is 2 x 0.5 GB in float32).
    """
    g = torch.Generator(device="cpu").manual_seed(seed)
    n = heads * blocks
    k = torch.empty(n, block, head_dim, dtype=dtype, device=device)
    v = torch.empty_like(k)
    step = 256
    for i in range(0, n, step):
        j = min(n, i + step)
        k[i:j] = (3.0 * decaying_matrix((j - i, block, head_dim), decay=8.0, generator=g)).to(device, dtype)
        v[i:j] = decaying_matrix((j - i, block, head_dim), decay=32.0, generator=g).to(device, dtype)
    k[:, 0] *= 20.0  # an attention-sink-like first token per block
    shape = (heads, blocks, block, head_dim)
    return k.view(shape), v.view(shape)


def _time(fn: Callable[[], Any], dev: torch.device, repeats: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    out = []
    for _ in range(repeats):
        if dev.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            out.append(a.elapsed_time(b))
        else:
            t = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t) * 1e3)
    return out


def count_syncs(fn: Callable[[], Any], dev: torch.device) -> int | None:
    """Host synchronizations torch reports during one call (CUDA only)."""
    if dev.type != "cuda":
        return None
    with torch.cuda.device(dev):
        return len(sync_sites(fn))


def _git_commit() -> str | None:
    import subprocess

    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def optimal_error(m: torch.Tensor, rank: int) -> float:
    """Relative Frobenius error of the best rank-``rank`` fit of every block of ``m [N, T, D]``
    (Eckart-Young), from the eigenvalues of each block's ``D x D`` Gram in float64 on the host
    (LAPACK; much cheaper than SVDs of the blocks, and float64 resolves the tail)."""
    tail = total = 0.0
    for i in range(0, m.shape[0], 256):
        g = m[i : i + 256].double()
        lam = torch.linalg.eigvalsh((g.mT @ g).cpu()).clamp_min(0)  # ascending
        total += float(lam.sum())
        tail += float(lam[:, : lam.shape[-1] - rank].sum())
    return (tail / total) ** 0.5


def profile_compress(fn: Callable[[], Any], top: int = 20) -> None:
    """Print the CUDA kernels of one call, by total device time (where a layer's time goes)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=top, max_name_column_width=70))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tokens", type=int, default=131072)
    p.add_argument("--heads", type=int, default=8, help="KV heads")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--preset", default="lowrank")
    p.add_argument("--dtype", default=None, help="model dtype (default bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    p.add_argument("--no-exact", action="store_true", help="skip the torch.linalg.svd reference timing")
    p.add_argument(
        "--no-slow",
        action="store_true",
        help="skip the slow references (torch.linalg.eigh cores, the checked pipeline): ~1-2 s a call on CUDA",
    )
    p.add_argument(
        "--jacobi-programs-per-sm",
        type=int,
        default=None,
        help="run the Jacobi core as a persistent grid of N programs per SM everywhere (default: one per matrix)",
    )
    p.add_argument(
        "--solvers",
        default="auto,rsvd",
        help="compress_blocks rows, one per SpectralConfig.svd_solver (auto = subspace on CUDA, rsvd on CPU)",
    )
    p.add_argument(
        "--also-tokens",
        type=int,
        nargs="*",
        default=[32768],
        help="also time compress_blocks on the first blocks of this many tokens",
    )
    p.add_argument("--subspace-iters", default="2,3,4,6", help="n_iter values of the subspace_fit rows")
    p.add_argument(
        "--compress-iters",
        default="2,3",
        help="extra compress_blocks rows with the subspace solver at these svd_subspace_iter values",
    )
    p.add_argument(
        "--small-dtypes",
        default="float64",
        help="extra compress_blocks rows with the subspace fit's block-side small work in these dtypes",
    )
    p.add_argument(
        "--profile", action="store_true", help="print the CUDA kernels of one compress_blocks call"
    )
    p.add_argument(
        "--solve-variants",
        action="store_true",
        help="time the subspace fit with other X R^-1 implementations",
    )
    p.add_argument(
        "--no-core",
        action="store_true",
        help="skip the rsvd's l x l eigensolver rows (Jacobi kernel vs eigh)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--tag", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from spectralcache.linalg import jacobi as jacobi_module

    jacobi_module.DEFAULT_PROGRAMS_PER_SM = args.jacobi_programs_per_sm
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but CUDA is not available")
    dtype = (
        getattr(torch, args.dtype)
        if args.dtype
        else (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    )
    cfg = get_preset(args.preset)
    blocks = (args.tokens - cfg.hot_size) // cfg.block_size
    if blocks < 1:
        raise SystemExit(
            f"--tokens {args.tokens} gives no full block of {cfg.block_size} after the hot buffer"
        )
    rk, rv = cfg.ranks_for(args.head_dim)
    keys, values = layer_kv(args.heads, blocks, cfg.block_size, args.head_dim, dtype, dev, args.seed)
    rows: list[dict[str, Any]] = []
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"compress_layer_{args.tag or dev.type}.json"

    def save() -> None:
        """(Re)write the JSON after every row, so a run stopped by a time limit keeps its numbers."""
        meta = {
            "benchmark": "benchmarks/compress_layer.py",
            "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
            "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "hostname": socket.gethostname(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "device": str(dev),
            "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "load_avg": os.getloadavg() if hasattr(os, "getloadavg") else None,
            "tokens": args.tokens,
            "blocks": blocks,
            "heads": args.heads,
            "head_dim": args.head_dim,
            "preset": cfg.name,
            "dtype": str(dtype),
            "ranks": [rk, rv],
            "timing": "cuda events, median after warm-up" if dev.type == "cuda" else "wall clock, median",
            "jacobi_programs_per_sm": args.jacobi_programs_per_sm,
            "git_commit": os.environ.get("SPECTRALCACHE_GIT_COMMIT") or _git_commit(),
            "optimal_rel_err": opt,
            "jacobi_kernel_unavailable": list(
                rsvd_module._JACOBI_BROKEN
            ),  # non-empty: cuSOLVER eigh was used
        }
        path.write_text(json.dumps({"meta": meta, "results": rows}, indent=1))

    def record(name: str, fn: Callable[[], Any], repeats: int | None = None, **extra: Any) -> None:
        """Time ``fn``; slow references (``repeats`` given) get one warm-up call."""
        times = _time(fn, dev, repeats or args.repeats, 1 if repeats else args.warmup)
        row = {
            "what": name,
            "median_ms": statistics.median(times),
            "min_ms": min(times),
            "repeats": len(times),
        }
        row.update(extra)
        rows.append(row)
        save()
        print(
            f"{name:55s} {row['median_ms']:10.2f} ms  (min {row['min_ms']:.2f}, n={len(times)}) {extra or ''}"
        )

    cdt = cfg.compute_torch_dtype()
    kf = keys.reshape(-1, cfg.block_size, args.head_dim).to(cdt)
    vf = values.reshape(-1, cfg.block_size, args.head_dim).to(cdt)
    # the optimal rank-r error of every block (Eckart-Young), from the eigenvalues of its Gram in
    # float64 on the host: the floor every fit row below is compared with
    opt = {"keys": optimal_error(kf, rk), "values": optimal_error(vf, rv)}
    print(f"optimal rank-r errors (fit only, before quantization): {opt}")
    from spectralcache.linalg import subspace as subspace_module

    # (label, config, small dtype of the subspace fit): every --solvers entry at the preset's
    # knobs, then the subspace solver at each --compress-iters value and each --small-dtypes
    variants: list[tuple[str, Any, str | None]] = [
        (f"solver={fit_solver(cfg.replace(svd_solver=x), dev)}", cfg.replace(svd_solver=x), None)
        for x in args.solvers.split(",")
        if x
    ]
    if fit_solver(cfg, dev) == "subspace":
        for q in (int(x) for x in args.compress_iters.split(",") if x):
            if q != cfg.svd_subspace_iter:
                variants.append((f"solver=subspace n_iter={q}", cfg.replace(svd_subspace_iter=q), None))
        for sd in (x for x in args.small_dtypes.split(",") if x):
            variants.append((f"solver=subspace small={sd}", cfg, sd))
    for n_tok in [args.tokens, *args.also_tokens]:
        nb = (n_tok - cfg.hot_size) // cfg.block_size
        if nb < 1 or nb > blocks:
            continue
        k_l, v_l = keys[:, :nb], values[:, :nb]
        for label, c, small in variants:
            subspace_module._SMALL_DTYPE = getattr(torch, small) if small else None

            def compress(k_l: torch.Tensor = k_l, v_l: torch.Tensor = v_l, c: Any = c) -> Any:
                return compress_blocks(k_l, v_l, c, rk, rv)

            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
                torch.cuda.reset_peak_memory_stats(dev)
            out = compress()
            kr, vr = reconstruct(out)
            k_err = float(torch.linalg.vector_norm(k_l.float() - kr) / torch.linalg.vector_norm(k_l.float()))
            v_err = float(torch.linalg.vector_norm(v_l.float() - vr) / torch.linalg.vector_norm(v_l.float()))
            del kr, vr, out
            peak = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None
            compress()  # a second warm call: the counted one below allocates nothing new
            record(
                f"compress_blocks [{args.heads}x{nb} blocks of {cfg.block_size}x{args.head_dim}] r{rk}/{rv} {label}",
                compress,
                host_syncs=count_syncs(compress, dev),
                key_rel_err=k_err,
                value_rel_err=v_err,
                tokens=n_tok,
                solver=fit_solver(c, dev),
                subspace_iter=c.svd_subspace_iter,
                small_dtype=small,
                peak_mem_gb=peak,
            )
            subspace_module._SMALL_DTYPE = None
    if args.profile and dev.type == "cuda":
        profile_compress(lambda: compress_blocks(keys, values, cfg.replace(svd_solver="subspace"), rk, rv))

    def gen() -> torch.Generator:
        return torch.Generator(device=dev).manual_seed(cfg.seed)

    # the eigensolver-free subspace fit alone, per side and iteration count; 0 host syncs expected
    # (as compress_blocks calls it on CUDA: no pre-scaling, the bf16 K/V as tensor-core input;
    # and the generic call: pre-scaled float32 blocks)
    iters = [int(x) for x in args.subspace_iters.split(",") if x]
    half_in = dtype in (torch.float16, torch.bfloat16) and dev.type == "cuda"
    for side, m, r, low in (("keys", kf, rk, keys), ("values", vf, rv, values)):
        low = low.reshape(m.shape) if half_in else None
        for q, how in [(q, "lowp") for q in iters] + [(cfg.svd_subspace_iter, "prescale")]:
            kw = dict(prescale=False, lowp=low) if how == "lowp" else {}

            def sfn(m: torch.Tensor = m, r: int = r, q: int = q, kw: dict = kw) -> Any:
                return subspace_fit(m, r, n_iter=q, generator=gen(), **kw)

            f = sfn()
            err = float(torch.linalg.vector_norm(m - f.coeffs @ f.basis) / torch.linalg.vector_norm(m))
            del f
            record(
                f"subspace_fit {side} rank {r} n_iter={q} {how if how == 'prescale' or low is not None else ''}",
                sfn,
                host_syncs=count_syncs(sfn, dev),
                rel_err=err,
                err_over_optimal=err / opt[side],
            )
    if dev.type == "cuda" and args.solve_variants:
        # how the subspace fit's small X R^-1 is applied: triangular solve (default) or the
        # explicit inverse (triangular solve against I, or LU inv_ex) times a GEMM
        from spectralcache.linalg import subspace as subspace_module

        default_solve = subspace_module._right_solve

        def via_inverse(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
            eye = torch.eye(r.shape[-1], dtype=r.dtype, device=r.device)
            return x @ torch.linalg.solve_triangular(r, eye.expand_as(r), upper=True)

        def via_inv_ex(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
            return x @ torch.linalg.inv_ex(r)[0]

        for label, solve in (("solve_triangular", default_solve), ("trsm inverse + bmm", via_inverse),
                             ("inv_ex + bmm", via_inv_ex)):  # fmt: skip
            subspace_module._right_solve = solve
            try:
                for side, m, r in (("keys", kf, rk), ("values", vf, rv)):

                    def vfn(m: torch.Tensor = m, r: int = r) -> Any:
                        return subspace_fit(m, r, n_iter=cfg.svd_subspace_iter, generator=gen())

                    f = vfn()
                    err = float(
                        torch.linalg.vector_norm(m - f.coeffs @ f.basis) / torch.linalg.vector_norm(m)
                    )
                    del f
                    record(f"subspace_fit {side} rank {r} right-solve={label}", vfn,
                           host_syncs=count_syncs(vfn, dev), rel_err=err)  # fmt: skip
            finally:
                subspace_module._right_solve = default_solve
    # the randomized SVD alone: sync-free pipeline with the Triton Jacobi core (the CUDA default)
    # and with torch.linalg.eigh as its core, and the checked pipeline (host_sync=True)
    variants = [("host_sync=False core=auto", False, "auto", None)]
    if not args.no_slow:
        if dev.type == "cuda":
            variants.append(("host_sync=False core=eigh", False, "eigh", 2))
        variants.append(("host_sync=True", True, "auto", 2 if dev.type == "cuda" else None))
    for side, m, r in (("keys", kf, rk), ("values", vf, rv)):
        for label, hs, core, reps in variants:

            def fn(m: torch.Tensor = m, r: int = r, hs: bool = hs, core: str = core) -> Any:
                return randomized_svd(
                    m, r, n_iter=cfg.svd_n_iter, oversample=cfg.svd_oversample, orth=cfg.svd_orth,
                    generator=gen(), host_sync=hs, core=core,
                )  # fmt: skip

            U, S, Vh = fn()
            err = rel_error(m, U, S, Vh)
            del U, S, Vh
            record(
                f"randomized_svd {side} rank {r} {label}",
                fn,
                reps,
                host_syncs=count_syncs(fn, dev),
                rel_err=err,
                err_over_optimal=err / opt[side],
            )
    # the core solve alone: the l x l Rayleigh-Ritz eigenproblems of one layer, float64
    from spectralcache.linalg.jacobi import jacobi_eigh

    for r in () if args.no_core else (rk, rv):
        width = min(r + cfg.svd_oversample, args.head_dim)
        x = torch.randn(kf.shape[0], 2 * width, width, device=dev, dtype=torch.float64)
        A = x.mT @ x
        cores: list[tuple[str, Callable[[], Any], int | None]] = [
            ("torch.linalg.eigh", lambda A=A: torch.linalg.eigh(A), 2 if dev.type == "cuda" else None)
        ]
        if args.no_slow:
            cores = []
        if dev.type == "cuda":
            for pps in (4, 2, 1):  # persistent grids: fewer resident programs, scratch in L1
                cores.insert(
                    0,
                    (
                        f"jacobi_eigh, {pps} programs/SM",
                        lambda A=A, k=pps: jacobi_eigh(A, programs_per_sm=k),
                        None,
                    ),
                )
            cores.insert(
                0, ("spectralcache jacobi_eigh (Triton)", lambda A=A: jacobi_eigh(A, programs_per_sm=0), None)
            )
        for name, fn, reps in cores:
            w, V = fn()
            resid = float(
                torch.linalg.matrix_norm(V @ torch.diag_embed(w) @ V.mT - A).max()
                / torch.linalg.matrix_norm(A).max()
            )
            record(
                f"{name} [{A.shape[0]}, {width}, {width}] float64",
                fn,
                reps,
                host_syncs=count_syncs(fn, dev),
                rel_resid=resid,
            )
    if not args.no_exact:

        def exact() -> Any:
            return torch.linalg.svd(kf, full_matrices=False)

        U, S, Vh = exact()
        opt_k = rel_error(kf, U[..., :rk], S[..., :rk], Vh[..., :rk, :])
        record(
            f"torch.linalg.svd keys (exact, rank {rk} error {opt_k:.4g})", exact, repeats=3, opt_rel_err=opt_k
        )
    save()
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
