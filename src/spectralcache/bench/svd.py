"""Randomized-SVD benchmark: ours vs ``torch.linalg.svd`` and ``torch.svd_lowrank``.

All methods run side by side in one process on the same matrices (decaying spectrum
plus noise, the shape of real KV blocks, not pure noise), so machine load hits them
alike. For each method: median latency (CUDA events on GPU, after warm-up), speed-up
against ``torch.linalg.svd`` and ``torch.svd_lowrank(niter=n_iter)``, the relative
reconstruction error ``||M - U S Vh||_F / ||M||_F`` and its ratio to the optimal rank-k
error (from the exact spectrum). Writes ``rsvd_<tag>.json`` (self-describing: machine,
device, torch version, date, command) and ``rsvd_<tag>.png``.

``--sweep`` instead draws, per shape, latency, per-stage breakdown and error against the
number of power iterations (0, 1, 2, 4, 8) and against the oversampling.
"""

from __future__ import annotations

import argparse
import contextlib
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

from spectralcache.linalg.rsvd import ORTH_METHODS, RR_PATH, RandomizedSVD, generic_cpu_level0, randomized_svd

__all__ = ["configure", "decaying_matrix", "main", "optimal_errors", "parse_shapes", "run"]

CPU_SHAPES = "8x512x128:16,32x512x128:32,16384x1024:160"
# What the library runs by default (randomized_svd's defaults, the cache's svd_orth): the
# headline row, summarized per shape against torch.linalg.svd and torch.svd_lowrank.
DEFAULT_METHOD = "rsvd[cholqr2]"
# The same call with the CPU fast path off: its reference (the generic checked pipeline).
GENERIC_METHOD = "rsvd[cholqr2,generic]"
CUDA_SHAPES = CPU_SHAPES + ",65536x4096:256"
SWEEP_N_ITER = (0, 1, 2, 4, 8)
SWEEP_OVERSAMPLE = (0, 4, 8, 16, 32)


# ------------------------------------------------------------------ test matrices


def parse_shapes(text: str) -> list[tuple[tuple[int, ...], int]]:
    """``"8x512x128:16,16384x1024:160"`` -> [((8, 512, 128), 16), ((16384, 1024), 160)]."""
    out = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        try:
            dims, rank = item.split(":")
            shape = tuple(int(d) for d in dims.lower().split("x"))
            k = int(rank)
        except ValueError:
            raise ValueError(f"bad shape {item!r}: expected like 8x512x128:16 (dims, then :rank)") from None
        if len(shape) < 2 or min(shape) < 1 or k < 1 or k > min(shape[-2:]):
            raise ValueError(f"bad shape {item!r}: need >= 2 positive dims and 1 <= rank <= min(m, n)")
        out.append((shape, k))
    if not out:
        raise ValueError("no shapes given")
    return out


def decaying_matrix(
    shape: tuple[int, ...],
    *,
    decay: float | None = None,
    noise: float = 1e-2,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``[..., m, n]`` with singular values ~ exp(-i/decay) plus Gaussian noise of level ``noise``.

    Why: KV blocks have a fast-decaying spectrum with a noise floor; pure Gaussian
    matrices have a flat spectrum where every method's error is the same. The factors
    are Gaussian (nearly orthonormal after scaling), so building a 65536x4096 matrix
    costs one GEMM, not a QR. ``decay`` defaults to min(m, n) / 16.
    """
    *lead, m, n = shape
    p = min(m, n)
    decay = decay if decay is not None else max(p / 16.0, 2.0)
    dev = torch.device(device)
    g = generator

    def randn(*s: int) -> torch.Tensor:
        if g is not None and g.device.type != dev.type:
            return torch.randn(*s, generator=g, device=g.device).to(dev)
        return torch.randn(*s, generator=g, device=dev)

    sig = torch.exp(-torch.arange(p, device=dev, dtype=torch.float32) / decay)
    A = randn(*lead, m, p) / m**0.5
    B = randn(*lead, n, p) / n**0.5
    M = (A * sig) @ B.mT
    M += noise * randn(*lead, m, n) / max(m, n) ** 0.5
    return M.to(dtype)


def optimal_errors(M: torch.Tensor, ranks: list[int]) -> dict[int, float]:
    """Relative Frobenius error of the best rank-k approximation, from the exact spectrum.

    Eigenvalues of the smaller Gram matrix in float64 (cheaper than an SVD of M and
    exact enough: absolute error ~1e-16·σ1²).
    """
    x = M.double()
    G = x.mT @ x if x.shape[-1] <= x.shape[-2] else x @ x.mT
    lam = torch.linalg.eigvalsh(G).flip(-1).clamp_min(0)  # [..., p] descending
    total = lam.sum(-1)
    out = {}
    for k in ranks:
        tail = (total - lam[..., :k].sum(-1)).clamp_min(0)
        out[k] = float((tail.sum() / total.sum()).sqrt()) if float(total.sum()) > 0 else 0.0
    return out


def rel_error(M: torch.Tensor, U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor) -> float:
    """||M - U diag(S) Vh||_F / ||M||_F over the whole batch, in float32 or better."""
    acc = torch.float64 if M.dtype == torch.float64 else torch.float32
    x = M.to(acc)
    R = x - (U.to(acc) * S.to(acc).unsqueeze(-2)) @ Vh.to(acc)
    return float(torch.linalg.vector_norm(R) / torch.linalg.vector_norm(x))


# ------------------------------------------------------------------------ methods

Method = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def build_methods(
    M: torch.Tensor,
    rank: int,
    n_iter: int,
    oversample: int,
    seed: int,
    include: list[str] | None,
    skip_svd_above: int = 0,
) -> dict[str, Method]:
    """Name -> callable for one shape. Ours use a fixed seed per call (fair and repeatable)."""
    dev = M.device
    q = min(rank + oversample, *M.shape[-2:])

    def gen() -> torch.Generator:
        return torch.Generator(device=dev).manual_seed(seed)

    def linalg_svd(x: torch.Tensor):
        U, S, Vh = torch.linalg.svd(x, full_matrices=False)
        return U[..., :rank], S[..., :rank], Vh[..., :rank, :]

    def lowrank(x: torch.Tensor):
        # Seeded like ours, so both draw the same Gaussian sketch and any error
        # difference comes from the algorithms, not from the luck of the draw.
        torch.manual_seed(seed)
        U, S, V = torch.svd_lowrank(x, q=q, niter=n_iter)
        return U[..., :rank], S[..., :rank], V[..., :rank].mT

    methods: dict[str, Method] = {
        "torch.linalg.svd": linalg_svd,
        f"torch.svd_lowrank(niter={n_iter})": lowrank,
    }
    if skip_svd_above and M.numel() > skip_svd_above:
        del methods["torch.linalg.svd"]
    for orth in ORTH_METHODS:  # the checked pipelines (host_sync=True: reads failure flags on the host)
        methods[f"rsvd[{orth}]"] = lambda x, o=orth: randomized_svd(
            x, rank, n_iter=n_iter, oversample=oversample, orth=o, generator=gen(), host_sync=True
        )
    if dev.type == "cpu":  # the CPU fast path's reference: level 0 by the generic pipeline
        default = methods[DEFAULT_METHOD]

        def generic(x: torch.Tensor):
            with generic_cpu_level0():
                return default(x)

        methods[GENERIC_METHOD] = generic
    if min(M.shape[-2:]) <= 256:  # the sync-free Rayleigh-Ritz pipeline (Gram algorithm only)
        methods[f"rsvd[{RR_PATH}]"] = lambda x: randomized_svd(
            x, rank, n_iter=n_iter, oversample=oversample, generator=gen(), host_sync=False
        )
    if dev.type == "cuda":
        if M.dtype == torch.float32:
            methods["rsvd[cholqr2,bf16-gemm]"] = lambda x: randomized_svd(
                x,
                rank,
                n_iter=n_iter,
                oversample=oversample,
                orth="cholqr2",
                compute_dtype=torch.bfloat16,
                generator=gen(),
                host_sync=True,
            )
            if min(M.shape[-2:]) <= 256:
                methods[f"rsvd[{RR_PATH},bf16-gemm]"] = lambda x: randomized_svd(
                    x, rank, n_iter=n_iter, oversample=oversample, compute_dtype=torch.bfloat16,
                    generator=gen(), host_sync=False,
                )  # fmt: skip
        if M.dtype == torch.float32:

            def tf32(x: torch.Tensor):
                prev = torch.backends.cuda.matmul.allow_tf32
                torch.backends.cuda.matmul.allow_tf32 = True
                try:
                    return randomized_svd(
                        x, rank, n_iter=n_iter, oversample=oversample, orth="cholqr2", generator=gen(),
                        host_sync=True,
                    )  # fmt: skip
                finally:
                    torch.backends.cuda.matmul.allow_tf32 = prev

            methods["rsvd[cholqr2,tf32]"] = tf32
        plan = RandomizedSVD(
            M.shape, rank, dtype=M.dtype, device=dev, n_iter=n_iter, oversample=oversample,
            orth="cholqr2", generator=gen(), use_cuda_graph=True,
        )  # fmt: skip
        methods["rsvd[cholqr2,cuda-graph]"] = plan
        if M.dtype == torch.float32:
            plan16 = RandomizedSVD(
                M.shape, rank, dtype=M.dtype, device=dev, n_iter=n_iter, oversample=oversample,
                orth="cholqr2", compute_dtype=torch.bfloat16, generator=gen(), use_cuda_graph=True,
            )  # fmt: skip
            methods["rsvd[cholqr2,bf16-gemm,cuda-graph]"] = plan16
    if include:
        unknown = [n for n in include if not any(n == k or n in k for k in methods)]
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; available: {list(methods)}")
        methods = {k: v for k, v in methods.items() if any(n == k or n in k for n in include)}
    return methods


# ------------------------------------------------------------------------- timing


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


_CLOCK: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "thread": time.thread_time}


def time_method(
    fn: Callable[[], Any], dev: torch.device, repeats: int, warmup: int, budget_s: float, clock: str = "wall"
) -> tuple[list[float], Any]:
    """Median-ready list of per-call ms (CUDA events on GPU) and the last output.

    A method whose first call alone exceeds the per-method budget is timed from fewer
    repeats (at least one), so ``torch.linalg.svd`` on the big shapes stays affordable.
    ``clock="thread"`` (CPU, one thread) counts this thread's CPU time: on a shared
    machine it leaves out the time other processes hold the core.
    """
    t0 = time.perf_counter()
    out = fn()
    _sync(dev)
    first = time.perf_counter() - t0
    est = max(first, 1e-6)
    warm = min(warmup, max(0, int(budget_s / 2 / est)))
    for _ in range(warm):
        out = fn()
    _sync(dev)
    reps = max(1, min(repeats, int(budget_s / est)))
    times: list[float] = []
    for _ in range(reps):
        if dev.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            now = _CLOCK[clock]
            t = now()
            out = fn()
            times.append((now() - t) * 1e3)
    return times, out


def stage_times(
    M: torch.Tensor, rank: int, n_iter: int, oversample: int, orth: str, reps: int, **kw: Any
) -> tuple[dict[str, float], dict[str, int], str]:
    """Median per-stage ms (``timing=True`` syncs per stage), paths taken, algorithm."""
    acc: dict[str, list[float]] = {}
    info = None
    for _ in range(max(reps, 1)):
        *_, info = randomized_svd(
            M, rank, n_iter=n_iter, oversample=oversample, orth=orth, timing=True, return_info=True, **kw
        )
        for k, v in (info.timings_ms or {}).items():
            acc.setdefault(k, []).append(v)
    assert info is not None
    return {k: statistics.median(v) for k, v in acc.items()}, dict(info.paths), info.algorithm


def profile_ops(fn: Callable[[], Any], calls: int, top: int = 25) -> list[dict[str, Any]]:
    """Self CPU time per call of ``fn``'s heaviest ops (torch.profiler, grouped by input shape):
    where a call's time goes, op by op (the profiler adds a little to every op)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(calls):
            fn()
    events = sorted(prof.key_averages(group_by_input_shape=True), key=lambda e: -e.self_cpu_time_total)
    return [
        {
            "op": e.key,
            "self_us": e.self_cpu_time_total / calls,
            "calls": e.count / calls,
            "shapes": str(e.input_shapes)[:80],
        }
        for e in events[:top]
    ]


# ------------------------------------------------------------------------ metadata


def metadata(args: argparse.Namespace, dev: torch.device) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "benchmark": "spectralcache bench svd",
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "hostname": socket.gethostname(),
        "machine": args.machine or platform.machine(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(dev),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_avg": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "n_iter": args.n_iter,
        "oversample": args.oversample,
        "seed": args.seed,
        "noise": args.noise,
        "clock": "cuda events" if dev.type == "cuda" else args.clock,
        "interleaved": bool(getattr(args, "interleave", False)),
    }
    if dev.type == "cuda":
        meta["device_name"] = torch.cuda.get_device_name(dev)
        meta["cuda"] = torch.version.cuda
    else:
        meta["device_name"] = platform.processor() or platform.machine()
    return meta


# ---------------------------------------------------------------------- reporting


def _console():
    try:
        from rich.console import Console

        return Console(width=None if sys.stdout.isatty() else 220)
    except ImportError:  # plain output where rich is missing (e.g. a bare GPU image)
        return None


def print_table(rows: list[dict[str, Any]], title: str) -> None:
    cols = [
        "shape",
        "rank",
        "method",
        "median_ms",
        "x_vs_linalg_svd",
        "x_vs_svd_lowrank",
        "rel_err",
        "err_ratio",
        "path",
    ]
    con = _console()

    def fmt(r: dict[str, Any], c: str) -> str:
        v = r.get(c)
        if c == "shape":
            return "x".join(map(str, v))
        if c == "path":
            return ",".join(f"{k}:{n}" for k, n in (v or {}).items())
        if isinstance(v, float):
            return f"{v:.4g}" if c in ("rel_err",) else f"{v:.3f}" if c == "err_ratio" else f"{v:.2f}"
        return "" if v is None else str(v)

    if con is not None:
        from rich.markup import escape
        from rich.table import Table

        t = Table(title=escape(title))
        for c in cols:
            t.add_column(c, justify="left" if c in ("method", "path", "shape") else "right")
        for r in rows:  # escaped: "rsvd[cholqr2]" is not rich markup
            t.add_row(*(escape(fmt(r, c)) for c in cols))
        con.print(t)
    else:
        print(title)
        print(" | ".join(cols))
        for r in rows:
            print(" | ".join(fmt(r, c) for c in cols))


def plot_results(rows: list[dict[str, Any]], path: Path, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        print("matplotlib not installed: no PNG written")
        return False
    shapes = list(dict.fromkeys(("x".join(map(str, r["shape"])) + f" r{r['rank']}") for r in rows))
    fig, axes = plt.subplots(2, len(shapes), figsize=(4.2 * len(shapes), 7.5), squeeze=False)
    for j, sh in enumerate(shapes):
        rs = [r for r in rows if ("x".join(map(str, r["shape"])) + f" r{r['rank']}") == sh]
        names = [r["method"] for r in rs]
        colors = ["tab:gray" if n.startswith("torch") else "tab:blue" for n in names]
        axes[0, j].barh(names, [r["median_ms"] for r in rs], color=colors)
        axes[0, j].set_xscale("log")
        axes[0, j].set_xlim(left=min(r["median_ms"] for r in rs) / 3)
        axes[0, j].xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        axes[0, j].set_title(sh, fontsize=9)
        axes[0, j].set_xlabel("median ms (log)")
        axes[1, j].barh(names, [r["err_ratio"] for r in rs], color=colors)
        axes[1, j].axvline(1.05, color="red", lw=0.8, ls="--")
        lo = min(r["err_ratio"] for r in rs)
        axes[1, j].set_xlim(max(0.0, min(lo, 1.0) - 0.01), max(1.1, max(r["err_ratio"] for r in rs) + 0.01))
        axes[1, j].set_xlabel("error / optimal rank-k error")
        for ax in axes[:, j]:
            ax.tick_params(axis="y", labelsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_sweep(sweep: dict[str, Any], path: Path, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no sweep PNG written")
        return False
    fig, axes = plt.subplots(2, 3, figsize=(14, 7.5))
    for row, key, label in ((0, "n_iter", "power iterations"), (1, "oversample", "oversampling")):
        pts = sweep[key]
        xs = [p[key] for p in pts]
        for orth in sorted({p["orth"] for p in pts}):
            ps = [p for p in pts if p["orth"] == orth]
            axes[row, 0].plot([p[key] for p in ps], [p["median_ms"] for p in ps], "o-", label=orth)
            axes[row, 2].plot([p[key] for p in ps], [p["err_ratio"] for p in ps], "o-", label=orth)
        axes[row, 0].set_xlabel(label)
        axes[row, 0].set_ylabel("median ms")
        axes[row, 0].legend(fontsize=7)
        axes[row, 2].set_xlabel(label)
        axes[row, 2].set_ylabel("error / optimal")
        axes[row, 2].set_yscale("log")
        axes[row, 2].axhline(1.05, color="red", lw=0.8, ls="--")
        # stacked stage breakdown for the default variant
        ps = [p for p in pts if p["orth"] == sweep["stage_orth"]]
        bottom = [0.0] * len(ps)
        xs = list(range(len(ps)))
        for stage in ("sketch", "power", "orth", "core", "lift", "fallback"):
            vals = [p["stages_ms"].get(stage, 0.0) for p in ps]
            if any(vals):
                axes[row, 1].bar(xs, vals, bottom=bottom, label=stage)
                bottom = [b + v for b, v in zip(bottom, vals)]
        axes[row, 1].set_xticks(xs, [str(p[key]) for p in ps])
        axes[row, 1].set_xlabel(label)
        axes[row, 1].set_ylabel(f"stage ms ({sweep['stage_orth']}, synced per stage)")
        axes[row, 1].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------- CLI


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda if available)")
    parser.add_argument(
        "--shapes",
        default=None,
        help=f"comma list of BxMxN:rank or MxN:rank (default CPU: {CPU_SHAPES}; CUDA adds 65536x4096:256)",
    )
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per method (median reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls per method first")
    parser.add_argument(
        "--budget", type=float, default=20.0, help="seconds per method and shape at most (approx.)"
    )
    parser.add_argument("--n-iter", type=int, default=2, help="power iterations (ours and svd_lowrank)")
    parser.add_argument("--oversample", type=int, default=8)
    parser.add_argument("--noise", type=float, default=1e-2, help="noise level of the test matrices")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
    parser.add_argument("--methods", default=None, help="comma list of method names (or substrings) to run")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: leave as is)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results", help="directory for JSON and PNG")
    parser.add_argument("--tag", default=None, help="file name tag (default: cpu / cuda)")
    parser.add_argument("--machine", default=None, help="machine description stored in the JSON")
    parser.add_argument("--sweep", action="store_true", help="sweep n_iter and oversampling instead")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG")
    parser.add_argument(
        "--skip-svd-above",
        type=int,
        default=None,
        help="skip torch.linalg.svd for inputs with more elements (default: 1e8 on CUDA, never on CPU)",
    )
    parser.add_argument(
        "--clock",
        choices=["wall", "thread"],
        default="wall",
        help="CPU timer: wall (default) or thread CPU time (needs --threads 1; robust to other load)",
    )
    parser.add_argument(
        "--from-json", default=None, help="only redraw the PNG(s) from a JSON this benchmark wrote"
    )
    parser.add_argument(
        "--interleave",
        action="store_true",
        help="time the methods taking turns (each round calls every method once): same load for all",
    )
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        help="also profile N calls of the default method per shape (torch.profiler, CPU ops): "
        "self time per call of its top ops, printed and stored as the row's profile_top",
    )


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but CUDA is not available")
    return dev


def _progress(total: int, desc: str):
    try:
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, file=sys.stderr, leave=False)
    except ImportError:

        class _P:
            def update(self, n: int = 1) -> None:
                pass

            def set_postfix_str(self, s: str) -> None:
                print(f"  {desc}: {s}", file=sys.stderr)

            def close(self) -> None:
                pass

        return _P()


def interleaved_times(
    methods: dict[str, Method], M: torch.Tensor, dev: torch.device, args: argparse.Namespace
) -> dict[str, tuple[list[float], Any]]:
    """Per-call ms of every method, taking turns: repeat r times each method once.

    Why: on a shared machine the load changes within a run; timing the methods one after
    the other gives each its own load, taking turns gives them the same. Every method gets
    ``--warmup`` untimed calls first, then ``--repeats`` rounds (no per-method budget).
    """
    outs: dict[str, Any] = {}
    for name, fn in methods.items():
        for _ in range(max(1, args.warmup)):
            outs[name] = fn(M)
    _sync(dev)
    times: dict[str, list[float]] = {name: [] for name in methods}
    now = _CLOCK[args.clock]
    for _ in range(args.repeats):
        for name, fn in methods.items():
            if dev.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                outs[name] = fn(M)
                end.record()
                end.synchronize()
                times[name].append(start.elapsed_time(end))
            else:
                t = now()
                outs[name] = fn(M)
                times[name].append((now() - t) * 1e3)
    return {name: (times[name], outs[name]) for name in methods}


def run_compare(
    args: argparse.Namespace, dev: torch.device, shapes, dtype: torch.dtype
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    include = [m.strip() for m in args.methods.split(",")] if args.methods else None
    for shape, rank in shapes:
        g = torch.Generator(device="cpu").manual_seed(args.seed)
        M = decaying_matrix(shape, noise=args.noise, dtype=dtype, device=dev, generator=g)
        opt = optimal_errors(M, [rank])[rank]
        methods = build_methods(
            M, rank, args.n_iter, args.oversample, args.seed, include, args.skip_svd_above
        )
        bar = _progress(len(methods), "x".join(map(str, shape)) + f" r{rank}")
        shape_rows = []
        timed = interleaved_times(methods, M, dev, args) if args.interleave else {}
        for name, fn in methods.items():
            bar.set_postfix_str(name)
            if args.interleave:
                times, (U, S, Vh) = timed[name]
            else:
                times, (U, S, Vh) = time_method(
                    lambda f=fn, x=M: f(x), dev, args.repeats, args.warmup, args.budget, args.clock
                )
            err = rel_error(M, U, S, Vh)
            row: dict[str, Any] = {
                "shape": list(shape),
                "rank": rank,
                "method": name,
                "median_ms": statistics.median(times),
                "min_ms": min(times),
                "repeats": len(times),
                "rel_err": err,
                "opt_err": opt,
                "err_ratio": err / opt if opt > 0 else float("nan"),
            }
            if name.startswith("rsvd[") and "cuda-graph" not in name and "tf32" not in name:
                orth = name[5:-1].split(",")[0]
                kw: dict[str, Any] = {"compute_dtype": torch.bfloat16} if "bf16" in name else {}
                kw["host_sync"] = orth != RR_PATH
                orth = "cholqr2" if orth == RR_PATH else orth
                with generic_cpu_level0() if "generic" in name else contextlib.nullcontext():
                    stages, paths, alg = stage_times(M, rank, args.n_iter, args.oversample, orth, 3, **kw)
                row.update(stages_ms=stages, path=paths, algorithm=alg)
            elif "cuda-graph" in name:
                row.update(path=dict(fn.last_info.paths) if fn.last_info else {}, graph_mode=fn.graph_mode)
                if fn.capture_error:
                    row["capture_error"] = fn.capture_error
            if name == DEFAULT_METHOD and getattr(args, "profile", 0):
                row["profile_top"] = profile_ops(lambda f=fn, x=M: f(x), args.profile)
                print(
                    f"{'x'.join(map(str, shape))} r{rank} {name}: top ops, self us per call (calls per call)"
                )
                for op in row["profile_top"]:
                    print(f"  {op['op']:32s} {op['self_us']:8.1f}  x{op['calls']:4.1f}  {op['shapes']}")
            shape_rows.append(row)
            bar.update(1)
        bar.close()
        base = next((r["median_ms"] for r in shape_rows if r["method"] == "torch.linalg.svd"), None)
        low = next((r["median_ms"] for r in shape_rows if r["method"].startswith("torch.svd_lowrank")), None)
        for r in shape_rows:
            r["x_vs_linalg_svd"] = base / r["median_ms"] if base else None
            r["x_vs_svd_lowrank"] = low / r["median_ms"] if low else None
        rows.extend(shape_rows)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def run_sweep(args: argparse.Namespace, dev: torch.device, shapes, dtype: torch.dtype) -> dict[str, Any]:
    out: dict[str, Any] = {}
    orths = [m.strip() for m in args.methods.split(",")] if args.methods else list(ORTH_METHODS)
    for o in orths:
        if o not in ORTH_METHODS:
            raise ValueError(f"--sweep --methods takes orth variants {ORTH_METHODS}, got {o!r}")
    for shape, rank in shapes:
        g = torch.Generator(device="cpu").manual_seed(args.seed)
        M = decaying_matrix(shape, noise=args.noise, dtype=dtype, device=dev, generator=g)
        opt = optimal_errors(M, [rank])[rank]
        key = "x".join(map(str, shape)) + f"_r{rank}"
        sweep: dict[str, Any] = {"shape": list(shape), "rank": rank, "opt_err": opt, "stage_orth": "cholqr2"}
        if "cholqr2" not in orths:
            sweep["stage_orth"] = orths[0]
        grid = [("n_iter", v, args.oversample) for v in SWEEP_N_ITER]
        grid += [("oversample", args.n_iter, v) for v in SWEEP_OVERSAMPLE]
        bar = _progress(len(grid) * len(orths), f"sweep {key}")
        for axis, n_iter, over in grid:
            for orth in orths:
                bar.set_postfix_str(f"{orth} n_iter={n_iter} oversample={over}")

                def fn(n=n_iter, p=over, o=orth, x=M, k=rank):
                    gen = torch.Generator(device=dev).manual_seed(args.seed)
                    return randomized_svd(x, k, n_iter=n, oversample=p, orth=o, generator=gen, host_sync=True)

                times, (U, S, Vh) = time_method(fn, dev, args.repeats, args.warmup, args.budget, args.clock)
                err = rel_error(M, U, S, Vh)
                stages, paths, alg = stage_times(M, rank, n_iter, over, orth, 3, host_sync=True)
                sweep.setdefault(axis, []).append(
                    {
                        axis: n_iter if axis == "n_iter" else over,
                        "n_iter": n_iter,
                        "oversample": over,
                        "orth": orth,
                        "median_ms": statistics.median(times),
                        "rel_err": err,
                        "err_ratio": err / opt if opt > 0 else float("nan"),
                        "stages_ms": stages,
                        "path": paths,
                        "algorithm": alg,
                    }
                )
                bar.update(1)
        bar.close()
        out[key] = sweep
    return out


def run(args: argparse.Namespace) -> int:
    if args.from_json:
        return replot(Path(args.from_json))
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "thread" and torch.get_num_threads() != 1:
        raise SystemExit("spectralcache bench svd: --clock thread needs --threads 1 (it counts one thread)")
    if args.repeats < 1 or args.warmup < 0 or args.n_iter < 0 or args.oversample < 0:
        raise SystemExit("spectralcache bench svd: --repeats >= 1, --warmup/--n-iter/--oversample >= 0")
    try:
        dev = _device(args.device)
        shapes = parse_shapes(args.shapes or (CUDA_SHAPES if dev.type == "cuda" else CPU_SHAPES))
    except ValueError as err:
        raise SystemExit(f"spectralcache bench svd: {err}") from None
    if args.skip_svd_above is None:
        args.skip_svd_above = 10**8 if dev.type == "cuda" else 0
    dtype = getattr(torch, args.dtype)
    tag = args.tag or dev.type
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = metadata(args, dev)
    title = _title(meta) + f" {args.dtype}"
    if args.sweep:
        sweeps = run_sweep(args, dev, shapes, dtype)
        (out_dir / f"rsvd_sweep_{tag}.json").write_text(
            json.dumps({"meta": meta, "sweeps": sweeps}, indent=1)
        )
        for key, sw in sweeps.items():
            if not args.no_plot:
                plot_sweep(sw, out_dir / f"rsvd_sweep_{tag}_{key}.png", f"{title}: {key}")
            for axis in ("n_iter", "oversample"):
                print(f"sweep {key} vs {axis}:")
                for p in sw[axis]:
                    print(
                        f"  {p['orth']:15s} {axis}={p[axis]:2d}  {p['median_ms']:9.3f} ms  "
                        f"err/opt {p['err_ratio']:.4f}"
                    )
        print(f"wrote {out_dir / f'rsvd_sweep_{tag}.json'}")
        return 0
    try:
        rows = run_compare(args, dev, shapes, dtype)
    except ValueError as err:
        raise SystemExit(f"spectralcache bench svd: {err}") from None
    if hasattr(os, "getloadavg"):
        meta["load_avg_end"] = os.getloadavg()
    summary = summarize(rows)
    (out_dir / f"rsvd_{tag}.json").write_text(
        json.dumps({"meta": meta, "summary": summary, "results": rows}, indent=1)
    )
    print_table(rows, title)
    for line in summary_lines(summary):
        print(line)
    print(f"load average (1, 5, 15 min) at start {meta.get('load_avg')}, at end {meta.get('load_avg_end')}")
    if not args.no_plot:
        plot_results(rows, out_dir / f"rsvd_{tag}.png", title)
    print(f"wrote {out_dir / f'rsvd_{tag}.json'}")
    return 0


def _title(meta: dict[str, Any]) -> str:
    dev = str(meta.get("device", ""))
    threads = f", {meta['torch_threads']} thread(s)" if dev == "cpu" and "torch_threads" in meta else ""
    return f"randomized SVD on {meta.get('device_name')} ({dev}{threads}, torch {meta.get('torch')})"


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per shape: the library's default call (:data:`DEFAULT_METHOD`) against torch.linalg.svd,
    torch.svd_lowrank and, on CPU, its own reference (:data:`GENERIC_METHOD`), from this run."""
    out = []
    for key in dict.fromkeys((tuple(r["shape"]), r["rank"]) for r in rows):
        by = {r["method"]: r for r in rows if (tuple(r["shape"]), r["rank"]) == key}
        ours = by.get(DEFAULT_METHOD)
        if ours is None:
            continue
        low = next((r for n, r in by.items() if n.startswith("torch.svd_lowrank")), None)
        svd = by.get("torch.linalg.svd")
        gen = by.get(GENERIC_METHOD)
        out.append(
            {
                "shape": list(key[0]),
                "rank": key[1],
                "method": DEFAULT_METHOD,
                "median_ms": ours["median_ms"],
                "err_ratio": ours["err_ratio"],
                "x_vs_linalg_svd": svd["median_ms"] / ours["median_ms"] if svd else None,
                "x_vs_svd_lowrank": low["median_ms"] / ours["median_ms"] if low else None,
                "svd_lowrank_err_ratio": low["err_ratio"] if low else None,
                "x_vs_generic_pipeline": gen["median_ms"] / ours["median_ms"] if gen else None,
            }
        )
    return out


def summary_lines(summary: list[dict[str, Any]]) -> list[str]:
    def x(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}x"

    return [
        f"{'x'.join(map(str, s['shape']))} r{s['rank']}: {s['method']} (default) {s['median_ms']:.3f} ms = "
        f"{x(s['x_vs_linalg_svd'])} torch.linalg.svd, {x(s['x_vs_svd_lowrank'])} torch.svd_lowrank, "
        f"{x(s['x_vs_generic_pipeline'])} its generic pipeline; error/optimal {s['err_ratio']:.4f}"
        + (
            f" (svd_lowrank {s['svd_lowrank_err_ratio']:.4f})"
            if s["svd_lowrank_err_ratio"] is not None
            else ""
        )
        for s in summary
    ]


def replot(path: Path) -> int:
    """Redraw PNGs next to a JSON written by this benchmark (e.g. one from a GPU box)."""
    data = json.loads(path.read_text())
    title = _title(data["meta"])
    if "results" in data:
        plot_results(data["results"], path.with_suffix(".png"), title)
        print(f"wrote {path.with_suffix('.png')}")
    for key, sw in data.get("sweeps", {}).items():
        out = path.with_name(f"{path.stem}_{key}.png")
        plot_sweep(sw, out, f"{title}: {key}")
        print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/rsvd.py", description=__doc__.splitlines()[0])
    configure(parser)
    return run(parser.parse_args(argv))
