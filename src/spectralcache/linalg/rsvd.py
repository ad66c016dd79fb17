"""Fast batched randomized SVD (Halko, Martinsson & Tropp 2011) and an exact reference.

Why this exists: the spectral cache compresses thousands of small ``[T, D]`` blocks per
forward pass, and exact SVD of many tiny matrices is launch- and LAPACK-bound. A
randomized range finder with Cholesky-based orthogonalization needs only a handful of
batched GEMMs plus ``l x l`` factorizations (``l = rank + oversample``).

Two algorithms share one interface (the input is always viewed as tall, ``m >= n``,
transposing when needed, so the sketch lives on the smaller side):

* ``"direct"``: the textbook range finder. ``Y = M Ω``; ``n_iter`` power iterations
  ``Y = M orth(Mᵀ orth(Y))``; ``Q = orth(Y)``; ``B = Qᵀ M``; SVD of the ``l x l``
  triangular factor of ``Bᵀ``; lift back. Best when ``n`` is large.
* ``"gram"``: for small ``n`` (head_dim-sized blocks) one GEMM forms ``G = Mᵀ M``
  (``n x n``, float32) and the power iterations run on ``G``, so they cost almost
  nothing. ``Z = orth(G^(n_iter+1) Ω)`` spans ``Mᵀ Q`` of the direct method with the
  same ``n_iter``, and ``M ≈ (M Z) Zᵀ`` is at least as accurate as ``Q Qᵀ M`` (its rows
  are the best approximation inside that span). The ``n x l`` bases are
  orthogonalized in float64 (they are tiny), which absorbs the squared condition
  number that products with ``G`` carry. ``Y = M Z`` is orthogonalized by CholeskyQR
  whose first pass takes its Gram ``ZᵀGZ`` from the small side (so ``Q1 = M (Z R1⁻¹)``
  is one GEMM) and whose later passes run on the real ``Q1``, so the output's
  orthogonality never depends on ``G``'s rounding. ``G`` is float32, so singular
  values below ~3e-4 of the largest are not resolved on this path; "direct" resolves
  them. ``algorithm="auto"`` picks "gram" for ``n <= 256`` or when it needs fewer FLOPs.

On CPU, level 0 of the checked Gram pipeline for ``orth="cholqr2"`` (the default) and
``"shifted_cholqr"`` is :func:`_pipeline_cpu_rr`: the same sketch ``Z``, then Rayleigh-Ritz
on the small side (one float64 ``l x l`` eigendecomposition of ``Zᵀ G Z``, ``U = M V S⁻¹``)
instead of CholeskyQR2 of ``Y = M Z`` plus a core SVD: half the small LAPACK calls and one
skinny product with M instead of two, with the same checks and fallback chain. The
generic pipeline stays the reference (``_CPU_RAYLEIGH_RITZ = False``; tests compare them).

The small core SVD: on CPU an eigendecomposition of ``RᵀR`` in float64 (a third of
LAPACK SVD's cost for many 24x24 cores); on CUDA cuSOLVER's batched Jacobi SVD for
cores up to 32x32 and the float64 eigendecomposition by the batched Triton Jacobi kernel
(:mod:`spectralcache.linalg.jacobi`) for larger ones, both on the device (nothing is
copied to the host). The Householder level always uses the SVD.

Two pipelines, chosen by ``host_sync``:

* checked (``host_sync=True``, the default on CPU and for ``algorithm="direct"``): the
  ``orth`` variants above with the fallback chain below; it reads the input's
  finiteness and the failure flags on the host.
* sync-free (``host_sync=False``, the default on CUDA for the Gram algorithm;
  :func:`_pipeline_rr`): Rayleigh-Ritz on ``Y = M Z`` with float64 bases that cannot
  break down on finite input, so nothing needs to be read back: no ``.item()``, no
  ``bool(tensor)``, no host copy; the failure flags stay on the device in
  :class:`RSVDInfo` and are read only when asked for. Its ``l x l`` eigenproblems go to
  a batched Triton Jacobi kernel on CUDA (:mod:`spectralcache.linalg.jacobi`;
  ``torch.linalg.eigh`` there solves a batch one matrix at a time and syncs), to LAPACK
  on CPU. Measured in ``benchmarks/compress_layer.py``.

Orthogonalization (``orth``): ``"householder"`` (``torch.linalg.qr``), ``"cholqr"``
(one CholeskyQR pass: orthogonality ~ eps·κ²), ``"cholqr2"`` (two passes: orthogonal to
working precision while κ ≲ eps^-1/2), ``"shifted_cholqr"`` (a pass on ``XᵀX + sI`` with
``s`` proportional to ``trace(XᵀX)`` that cannot break down, followed by CholeskyQR2:
the "shifted CholeskyQR3" of Fukaya et al. 2020). Power iterations only need a basis of
the right span, so they use a single pass of the chosen kind; the final bases get all
passes.

Fallbacks never return NaN or a non-orthonormal basis silently. Every Cholesky reports
failure through ``cholesky_ex``'s ``info`` (batched, no host sync), and each final pass
checks that its triangular factor is what an orthonormal basis would give. A batch
element that fails anywhere is recomputed one level down the chain
``requested -> shifted CholeskyQR with a 1000x larger shift -> Householder QR -> exact
SVD``; the path each element took is reported in :class:`RSVDInfo` and counted in
:func:`rsvd_stats`. Host syncs per call: the NaN/inf check of the input (one
reduction), the core solver (cuSOLVER reports its status to the host, as
``torch.linalg.svd`` does) and reading the failure flags; ``timing=True`` adds one per
stage and is otherwise free. :class:`RandomizedSVD` captures everything but the core in
CUDA graphs.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

__all__ = [
    "ORTH_METHODS",
    "RSVDInfo",
    "RandomizedSVD",
    "randomized_svd",
    "reset_rsvd_stats",
    "rsvd_stats",
    "truncated_svd",
]

ORTH_METHODS: tuple[str, ...] = ("householder", "cholqr", "cholqr2", "shifted_cholqr")
ALGORITHMS: tuple[str, ...] = ("auto", "gram", "direct")
STAGES: tuple[str, ...] = ("sketch", "power", "orth", "core", "lift", "fallback")
_HALF = (torch.float16, torch.bfloat16)
# Fallback levels, in order. Level 0 is the requested method.
_SHIFT_GROWTH = 1000.0
# Path name of the sync-free Rayleigh-Ritz pipeline (``host_sync=False``).
RR_PATH = "rayleigh_ritz"

_STATS: Counter[str] = Counter()


def rsvd_stats() -> dict[str, int]:
    """Process-wide counts of calls and of batch elements per path (for run statistics)."""
    return dict(_STATS)


def reset_rsvd_stats() -> None:
    _STATS.clear()


@dataclass
class RSVDInfo:
    """What one call did: which algorithm, which fallback path each batch element took.

    ``paths`` maps a path name (the requested ``orth``, ``"shifted_cholqr*"`` for the
    larger-shift retry, ``"householder"``, ``"exact_svd"``) to the number of batch
    elements that finished on it. ``path`` is the deepest one taken. ``timings_ms`` is
    filled only with ``timing=True``.
    """

    algorithm: str
    orth: str
    batch: int
    _paths: dict[str, int] = field(default_factory=dict)
    timings_ms: dict[str, float] | None = None
    ok: torch.Tensor | None = None  # [batch] bool on the device (sync-free calls only)

    @property
    def paths(self) -> dict[str, int]:
        """Elements per path. For a sync-free call (``host_sync=False``) this is where the
        host first reads the device-side flags (one synchronization, when asked):
        ``"rayleigh_ritz"`` counts the finite results, ``"nonfinite"`` the NaN ones."""
        if self.ok is not None and not self._paths:
            n_ok = int(self.ok.sum())
            self._paths = {k: v for k, v in ((RR_PATH, n_ok), ("nonfinite", self.batch - n_ok)) if v}
        return self._paths

    @property
    def path(self) -> str:
        order = [self.orth, RR_PATH, "shifted_cholqr*", "householder", "exact_svd", "nonfinite"]
        taken = [p for p in order if self.paths.get(p)]
        return taken[-1] if taken else self.orth

    def raise_if_nonfinite(self) -> None:
        """Raise ValueError if any element had non-finite input (reads the device flags)."""
        if self.paths.get("nonfinite"):
            raise ValueError(
                f"randomized_svd: {self.paths['nonfinite']} of {self.batch} matrices contain NaN or inf "
                "(their factors are NaN)"
            )

    @property
    def n_fallback(self) -> int:
        return sum(v for k, v in self.paths.items() if k not in (self.orth, RR_PATH))


# --------------------------------------------------------------------------- checks


def _validate(M: torch.Tensor, rank: int, *, check_finite: bool = True) -> None:
    if not isinstance(M, torch.Tensor):
        raise TypeError(f"M must be a torch.Tensor, got {type(M).__name__}")
    if M.ndim < 2:
        raise ValueError(f"M must have at least 2 dimensions [..., m, n], got shape {tuple(M.shape)}")
    if not M.is_floating_point():
        raise ValueError(f"M must have a floating dtype (float16/bfloat16/float32/float64), got {M.dtype}")
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise ValueError(f"rank must be an int, got {rank!r}")
    m, n = M.shape[-2], M.shape[-1]
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    if rank > min(m, n):
        raise ValueError(f"rank {rank} > min(m, n) = {min(m, n)} for M of shape {tuple(M.shape)}")
    # One reduction instead of an elementwise mask: any NaN/inf makes the sum
    # non-finite; a finite matrix whose sum overflows gets the exact check.
    if check_finite and M.numel() and not bool(torch.isfinite(M.sum())):
        if not bool(torch.isfinite(M).all()):
            raise ValueError("M contains NaN or inf; randomized_svd needs finite input")


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _gemm_dtype(M: torch.Tensor, compute_dtype: torch.dtype | None) -> torch.dtype:
    if compute_dtype is not None:
        if compute_dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            raise ValueError(f"compute_dtype must be a floating dtype, got {compute_dtype}")
        return compute_dtype
    if M.dtype in _HALF:
        # Half GEMMs pay off on GPUs; CPUs without native bf16 units run them slower
        # and less accurately than float32.
        return M.dtype if M.is_cuda else torch.float32
    return M.dtype


_OUT_DTYPE_OK: dict[str, bool] = {}


def _mm(a: torch.Tensor, b: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """``a @ b`` (3-D ``a``, 2/3-D ``b``, same dtype) returned in ``acc``.

    Half operands on CUDA write float32 straight from the float32 accumulator
    (``bmm(out_dtype=)``), so a bf16 GEMM costs no extra rounding of its output.
    """
    if a.dtype == acc:
        return a @ b
    if a.is_cuda and _OUT_DTYPE_OK.get("bmm", True):
        try:
            bb = b if b.ndim == 3 else b.expand(a.shape[0], *b.shape)
            return torch.bmm(a, bb, out_dtype=acc)
        except (RuntimeError, TypeError):
            _OUT_DTYPE_OK["bmm"] = False
    return (a @ b).to(acc)


# ------------------------------------------------------------------ orthogonalization


@dataclass
class _Ctx:
    """Per-call constants for the passes: which kind, shift multiplier, accumulators."""

    orth: str
    shift_mult: float
    acc: torch.dtype
    use_inverse: bool  # Q = X @ R^-1 as a GEMM (GPU) vs a triangular solve (CPU)
    infos: list[torch.Tensor] = field(default_factory=list)  # cholesky_ex info per pass
    checks: list[torch.Tensor] = field(default_factory=list)  # [B] bool per checked quantity

    def ok(self) -> torch.Tensor:
        """[B] bool: every Cholesky succeeded and every check held (a few ops, once)."""
        ok = torch.stack(self.infos).eq(0).all(0) if self.infos else None
        for c in self.checks:
            ok = c if ok is None else ok & c
        assert ok is not None
        return ok

    core_used: Callable | None = None

    def pick_core(
        self, R: torch.Tensor
    ) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Fastest adequate small-SVD for this core (measured on an H100 and 2 CPU cores).

        The Householder level is the robust one: LAPACK/cuSOLVER SVD. On CUDA, batched
        cores up to 32x32 go to cuSOLVER's batched Jacobi SVD; larger ones to the float64
        eigendecomposition by the Triton Jacobi kernel, on the device (never copied to the host).
        """
        if self.orth == "householder":
            core = _core_svd
        elif R.is_cuda and R.shape[-1] <= 32:
            core = _core_svd32
        else:
            core = _core_eigh
        self.core_used = core
        return core


def _eps(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).eps)


def _chol_pass(
    X: torch.Tensor, ctx: _Ctx, *, shifted: bool, check: str | None, gram_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One (shifted) CholeskyQR pass: returns (X R^-1, R) and records success in ctx.

    Every pass records cholesky_ex's ``info``. ``check`` adds: "identity" (the input was
    already nearly orthonormal, so R must be close to I: the proof that the previous
    pass worked) or "single" (a lone final pass: orthogonality loss ~ eps·κ², with κ
    estimated from R's diagonal, must stay below 1e-6 in float64 / 1e-4 in float32).
    Span-only passes need no more: any invertible R keeps the span.
    ``gram_dtype``: form ``XᵀX`` and its Cholesky in this dtype but return ``X R⁻¹`` in
    X's own dtype (the CPU fast path's span passes: float64 Gram, float32 product).
    """
    acc = gram_dtype or (torch.float64 if X.dtype == torch.float64 else ctx.acc)
    Xa = X if X.dtype == acc else X.to(acc)
    A = Xa.mT @ Xa
    ncol = A.shape[-1]
    if shifted:
        A = _shift(A, ctx)
    R, info = torch.linalg.cholesky_ex(A, upper=True)
    ctx.infos.append(info)
    if check == "identity":
        ctx.checks.append((R.diagonal(dim1=-2, dim2=-1) - 1).abs().amax(-1) < 0.5)
    elif check == "single":
        _single_check(R, ctx, acc)
    Xp = X if gram_dtype is not None else Xa
    if ctx.use_inverse:
        Rinv = torch.linalg.solve_triangular(R, _eye(ncol, R.dtype, R.device).expand_as(R), upper=True)
        return Xp @ Rinv.to(Xp.dtype), R
    return torch.linalg.solve_triangular(R.to(Xp.dtype), Xp, upper=True, left=False), R


def _shift(A: torch.Tensor, ctx: _Ctx) -> torch.Tensor:
    """A + s I with s = mult · max(l, 16) · eps · trace(A) (+ a floor so zero works)."""
    ncol = A.shape[-1]
    eps = _eps(A.dtype)
    tr = A.diagonal(dim1=-2, dim2=-1).sum(-1, keepdim=True)
    s = (ctx.shift_mult * max(ncol, 16) * eps) * tr + torch.finfo(A.dtype).tiny * 1e6
    return A + torch.diag_embed(s.expand(*s.shape[:-1], ncol))


def _single_check(R: torch.Tensor, ctx: _Ctx, dtype: torch.dtype) -> None:
    """A lone final pass: orthogonality loss ~ eps·κ², κ estimated from R's diagonal."""
    d = R.diagonal(dim1=-2, dim2=-1).abs()
    target = 1e-6 if dtype == torch.float64 else 1e-4
    # eps·(hi/lo)² <= target, written without a division (lo may be 0)
    ctx.checks.append(d.amax(-1) <= (target / _eps(dtype)) ** 0.5 * d.amin(-1))


def _orth(X: torch.Tensor, ctx: _Ctx, *, final: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Orthonormal basis of span(X) (final) or a well-scaled basis of it (span-only).

    Returns (Q, R) with X = Q R. A float64 input (the Gram path's tiny side) gets a
    single checked pass for every Cholesky kind: in float64 one pass already reaches
    float32-level orthogonality, and the check sends the element down the chain if not.
    """
    kind = ctx.orth
    if kind == "householder":
        Xa = X if X.dtype in (ctx.acc, torch.float64) else X.to(ctx.acc)
        return torch.linalg.qr(Xa)
    shifted = kind == "shifted_cholqr"
    if not final:
        return _chol_pass(X, ctx, shifted=shifted, check=None)
    if kind == "cholqr" or X.dtype == torch.float64:
        if shifted:
            Q0, R0 = _chol_pass(X, ctx, shifted=True, check=None)
            Q, R1 = _chol_pass(Q0, ctx, shifted=False, check="single")
            return Q, R1 @ R0
        return _chol_pass(X, ctx, shifted=False, check="single")
    if kind == "cholqr2":
        Q1, R1 = _chol_pass(X, ctx, shifted=False, check=None)
        Q, R2 = _chol_pass(Q1, ctx, shifted=False, check="identity")
        return Q, R2 @ R1
    if kind == "shifted_cholqr":
        Q0, R0 = _chol_pass(X, ctx, shifted=True, check=None)
        Q1, R1 = _chol_pass(Q0, ctx, shifted=False, check=None)
        Q, R2 = _chol_pass(Q1, ctx, shifted=False, check="identity")
        return Q, R2 @ (R1 @ R0)
    raise ValueError(f"orth must be one of {ORTH_METHODS}, got {kind!r}")


# ------------------------------------------------------------------------- timing


class _Timer:
    """Per-stage wall time; synchronizes CUDA at each mark, so only built when asked."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.ms: dict[str, float] = dict.fromkeys(STAGES, 0.0)
        self._sync()
        self.t = time.perf_counter()

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def mark(self, stage: str) -> None:
        self._sync()
        now = time.perf_counter()
        self.ms[stage] += (now - self.t) * 1e3
        self.t = now


# ----------------------------------------------------------------------- pipeline


def _choose_algorithm(m: int, n: int, width: int, n_iter: int, algorithm: str) -> str:
    if algorithm != "auto":
        return algorithm
    # FLOPs per row of M: Gram m·n² + M·Z m·n·l, vs direct (2q+2) m·n·l (l = width). For small n the
    # Gram path also has far fewer (launch-bound) ops, so prefer it there.
    gram_cost = n * n + 2 * n * width
    direct_cost = (2 * n_iter + 2) * n * width
    return "gram" if (n <= 256 or gram_cost <= direct_cost) else "direct"


def _gram(Mc: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """``Mcᵀ Mc`` for a batch ``[B, m, n]``, in ``acc``.

    On CPU the Gram is the largest single cost of the Gram path and BLAS has no batched
    SYRK in torch, so it is assembled from row strips of its lower block triangle: strip
    ``j`` is ``M[:, s_j]ᵀ M[:, :e_j]`` (one GEMM) and the strict upper blocks are the
    transposes of computed ones. With 4 strips (n >= 128) that is 10/16 of the FLOPs,
    with 2 strips 3/4; measured for [8, 512, 128] on the 2-core box: one GEMM 1.34 ms
    (1 thread) / 0.67 ms (2 threads), 2 strips 1.09 / 0.57, 4 strips 1.04 / 0.56 (GEMM
    efficiency drops for narrower strips, so more strips do not pay). GPUs run the one
    GEMM (it is not the bottleneck there).
    """
    n = Mc.shape[-1]
    if Mc.is_cuda or Mc.dtype != acc or n < 64 or Mc.ndim != 3:
        return _mm(Mc.mT, Mc, acc)
    strips = 4 if n >= 128 else 2
    edges = [n * j // strips for j in range(strips + 1)]
    G = torch.empty(Mc.shape[0], n, n, dtype=acc, device=Mc.device)
    for lo, hi in itertools.pairwise(edges):
        rows = Mc[..., lo:hi].mT @ Mc[..., :hi]  # [B, hi - lo, hi]: G[lo:hi, :hi]
        G[:, lo:hi, :hi] = rows
        if lo:
            G[:, :lo, lo:hi] = rows[..., :lo].mT  # above the diagonal block: by symmetry
    return G


_FORCE_IMPLICIT_GRAM: bool | None = None  # tests: force one way of applying G


def _implicit_gram(Mc: torch.Tensor, width: int, n_iter: int) -> bool:
    """Apply ``G = MᵀM`` as ``Mᵀ (M Z)`` instead of forming it, when that needs fewer FLOPs.

    Forming G costs ``m n²`` multiply-adds (3/4 of it on CPU, see :func:`_gram`) and each
    product with it ``n² l``; applying it implicitly costs ``2 m n l`` per product. With
    ``n_iter + 1`` products, the implicit way wins when ``2 (n_iter + 1) l < n`` (3/4 n on
    CPU): for [512, 128] blocks and l = 24, at ``n_iter = 0``. Same mathematics either way
    (the sketch spans ``G^(n_iter+1) Ω``); only the rounding of the products differs.
    """
    if _FORCE_IMPLICIT_GRAM is not None:
        return _FORCE_IMPLICIT_GRAM
    n = Mc.shape[-1]
    gram_cost = (0.75 if not Mc.is_cuda else 1.0) * n
    return 2 * (n_iter + 1) * width < gram_cost


def _gram_operator(
    Mc: torch.Tensor, width: int, n_iter: int, gdtype: torch.dtype, acc: torch.dtype
) -> tuple[torch.Tensor | None, Callable[[torch.Tensor], torch.Tensor]]:
    """``G = Mcᵀ Mc`` in ``acc`` (None where :func:`_implicit_gram` applies it as ``Mᵀ (M Z)``)
    and ``gmul(Z) = G Z`` either way. On CPU a 2-D ``Z`` (the shared test matrix) is
    expanded to a batched GEMM: MKL runs it faster than the [B·n, n] x [n, l] GEMM that
    ``G @ Z`` folds into (measured 43 vs 52-72 us for [8, 128, 128] x [128, 24], 2 threads)."""
    G = None if _implicit_gram(Mc, width, n_iter) else _gram(Mc, acc)

    def gmul(Z: torch.Tensor) -> torch.Tensor:
        if G is None:
            return _mm(Mc.mT, _mm(Mc, Z.to(gdtype), acc).to(gdtype), acc)
        if Z.ndim == 2 and not G.is_cuda:
            return torch.bmm(G, Z.expand(G.shape[0], *Z.shape))
        return G @ Z

    return G, gmul


def _pipeline(
    M: torch.Tensor,
    omega: torch.Tensor,
    rank: int,
    n_iter: int,
    algorithm: str,
    ctx: _Ctx,
    gdtype: torch.dtype,
    timer: _Timer | None,
):
    """Tall M [B, m, n] (m >= n) -> U [B,m,k], S [B,k], Vh [B,k,n] in the acc dtype.

    A generator: it yields the small core matrix and receives its SVD via ``send``, so a
    graph-captured plan can run the (host-syncing) core SVD between two captures.
    ``omega`` [n, width] is the Gaussian test matrix in the accumulation dtype, shared by
    the batch so that a batched call equals per-matrix calls with the same seed.
    """
    Mc = M if M.dtype == gdtype else M.to(gdtype)
    if algorithm == "gram":
        # G @ Z runs in the accumulation dtype; the n x l bases are orthogonalized in
        # float64 (tiny), since products with G carry squared singular values that a
        # float32 Cholesky could not handle.
        f64 = torch.float64
        G, gmul = _gram_operator(Mc, omega.shape[-1], n_iter, gdtype, ctx.acc)
        X = gmul(omega)
        if timer:
            timer.mark("sketch")
        for _ in range(n_iter):
            Z, _ = _orth(X.to(f64), ctx, final=False)
            X = gmul(Z.to(ctx.acc))
        if timer:
            timer.mark("power")
        Z, _ = _orth(X.to(f64), ctx, final=True)
        Zc = Z.to(ctx.acc)
        if ctx.orth == "householder":
            Q, R = _orth(_mm(Mc, Zc.to(gdtype), ctx.acc), ctx, final=True)
            if timer:
                timer.mark("orth")
            Ur, S, Wh = yield _core_input(R, ctx)
            U = Q @ Ur[..., :rank].to(Q.dtype)
        else:
            # CholeskyQR of Y = M Z whose first pass takes its Gram ZᵀGZ from the
            # float64 side: Q1 = M (Z R1⁻¹) costs one GEMM; the later passes run on
            # the real Q1, so orthogonality does not depend on G's rounding.
            if G is not None:
                A = Z.mT @ (G @ Zc).to(f64)
            else:  # no G: the first pass's Gram comes from Y = M Z, which Q1 needs anyway
                Y = _mm(Mc, Zc.to(gdtype), ctx.acc)
                A = (Y.mT @ Y).to(f64)
            if ctx.orth == "shifted_cholqr":
                A = _shift(A, ctx)
            R1, info = torch.linalg.cholesky_ex(A, upper=True)
            ctx.infos.append(info)
            if G is not None:
                W = torch.linalg.solve_triangular(R1, Z, upper=True, left=False)
                Q1 = _mm(Mc, W.to(gdtype), ctx.acc)
            else:
                Q1 = torch.linalg.solve_triangular(R1.to(ctx.acc), Y, upper=True, left=False)
            R = R1
            if ctx.orth == "cholqr":
                _single_check(R1, ctx, torch.float32)
            else:
                Q2 = Q1
                if ctx.orth == "shifted_cholqr":
                    Q2, R15 = _chol_pass(Q1, ctx, shifted=False, check=None)
                    R = R15.to(R.dtype) @ R
                A2 = Q2.mT @ Q2
                R2, info = torch.linalg.cholesky_ex(A2.to(torch.float64), upper=True)
                ctx.infos.append(info)
                ctx.checks.append((R2.diagonal(dim1=-2, dim2=-1) - 1).abs().amax(-1) < 0.5)
                R = R2 @ R
                Q1 = Q2
            if timer:
                timer.mark("orth")
            Ur, S, Wh = yield _core_input(R, ctx)
            Ck = Ur[..., :rank]
            if ctx.orth != "cholqr":
                Ck = torch.linalg.solve_triangular(R2, Ck, upper=True)  # Q = Q1 R2⁻¹
            U = Q1 @ Ck.to(Q1.dtype)
        if timer:
            timer.mark("core")
        Vh = Wh[..., :rank, :] @ Z.mT.to(Wh.dtype)
    else:
        Y = _mm(Mc, omega.to(gdtype), ctx.acc)
        if timer:
            timer.mark("sketch")
        for _ in range(n_iter):
            Q, _ = _orth(Y, ctx, final=False)
            Z = _mm(Mc.mT, Q.to(gdtype), ctx.acc)
            Z, _ = _orth(Z, ctx, final=False)
            Y = _mm(Mc, Z.to(gdtype), ctx.acc)
        if timer:
            timer.mark("power")
        Q, _ = _orth(Y, ctx, final=True)
        Bt = _mm(Mc.mT, Q.to(gdtype), ctx.acc)  # [B, n, width] = (Qᵀ M)ᵀ
        P, T = _orth(Bt, ctx, final=True)  # Bt = P T, so B = Tᵀ Pᵀ
        if timer:
            timer.mark("orth")
        Ut, S, Wh = yield _core_input(T.mT, ctx)
        if timer:
            timer.mark("core")
        U = Q @ Ut[..., :rank].to(Q.dtype)
        Vh = Wh[..., :rank, :].to(P.dtype) @ P.mT
    S = S[..., :rank]
    if ctx.core_used is _core_eigh:
        # NaN fails these comparisons too.
        ctx.checks.append((S[..., -1] >= 1e-6 * S[..., 0]) & (S[..., 0] > 0))
    else:
        ctx.checks.append(torch.isfinite(S).all(-1))
    if timer:
        timer.mark("lift")
    return U.to(ctx.acc), S.to(ctx.acc), Vh.to(ctx.acc)


def _core_input(R: torch.Tensor, ctx: _Ctx) -> torch.Tensor:
    # A failed Cholesky can leave non-finite entries; the element is already marked
    # failed, but LAPACK would raise on them, so hand the core a finite matrix.
    ctx.checks.append(torch.isfinite(R.sum((-2, -1))))
    return torch.nan_to_num(R, nan=0.0, posinf=0.0, neginf=0.0)


def _finish_gen(gen, core_out):
    try:
        gen.send(core_out)
    except StopIteration as stop:
        return stop.value
    raise RuntimeError("randomized_svd pipeline yielded twice")


def _run_pipeline(
    M: torch.Tensor,
    omega: torch.Tensor,
    rank: int,
    n_iter: int,
    algorithm: str,
    ctx: _Ctx,
    gdtype: torch.dtype,
    timer: _Timer | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = _pipeline(M, omega, rank, n_iter, algorithm, ctx, gdtype, timer)
    R = next(gen)
    return _finish_gen(gen, ctx.pick_core(R)(R))


# ----------------------------------------------- CPU level 0: Gram + Rayleigh-Ritz

# Tests set this to False to run the generic pipeline (the reference) at level 0 on CPU.
_CPU_RAYLEIGH_RITZ = True
_CPU_RR_ORTHS = ("cholqr2", "shifted_cholqr")
# Largest S₁/S_k for which U = M V S⁻¹ with V from the float32 Gram stays orthonormal to
# ~1e-5 (measured: ||UᵀU - I|| ≈ 0.1·eps32·(S₁/S_k)² for [512, 128] blocks); elements above
# it finish by CholeskyQR2 of the real product Y = M Z (:func:`_rr_cholqr2`), as the generic
# pipeline does.
_GRAM_RR_MAX_KAPPA = 32.0
# The estimate of S₁/S_k from a Cholesky diagonal is trusted to a factor 2 (tests set it
# to inf so that every steep element is caught by the check on the computed S instead).
_STEEP_ESTIMATE_MARGIN = 0.5


@contextlib.contextmanager
def generic_cpu_level0() -> Iterator[None]:
    """Within this block, level 0 of the checked pipeline on CPU runs the generic pipeline
    instead of :func:`_pipeline_cpu_rr`: the fast path's reference, for benchmarks that time
    both side by side (``spectralcache bench svd``'s ``rsvd[cholqr2,generic]``)."""
    global _CPU_RAYLEIGH_RITZ
    prev = _CPU_RAYLEIGH_RITZ
    _CPU_RAYLEIGH_RITZ = False
    try:
        yield
    finally:
        _CPU_RAYLEIGH_RITZ = prev


def _use_cpu_rr(M: torch.Tensor, algorithm: str, orth: str) -> bool:
    """Whether level 0 of the checked pipeline runs :func:`_pipeline_cpu_rr` for this call."""
    return _CPU_RAYLEIGH_RITZ and M.device.type == "cpu" and algorithm == "gram" and orth in _CPU_RR_ORTHS


def _top_eigh(A: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Square roots of the ``rank`` largest eigenvalues of symmetric ``A`` (descending) and
    their eigenvectors. Non-finite entries (a failed element, already flagged) become 0,
    since LAPACK would raise on them."""
    lam, W = _eigh_desc(torch.nan_to_num(A, nan=0.0, posinf=0.0, neginf=0.0), "eigh")
    return lam[..., :rank].clamp_min_(0).sqrt_(), W[..., :rank]


def _rr_cholqr2(
    Mc: torch.Tensor,
    Z: torch.Tensor,
    A: torch.Tensor | None,
    rank: int,
    gdtype: torch.dtype,
    acc: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rayleigh-Ritz on the real product ``Y = M Z`` through CholeskyQR2 of Y: U [acc], s, V (float64), ok.

    The generic pipeline's tail (:func:`_pipeline`): the first pass takes its Gram from
    ``A = Zᵀ G Z`` (float64, given) so ``Q1 = M (Z R1⁻¹)`` is one product with M, or, with
    ``A=None`` (G not formed), from Y itself; the second pass runs on the real, nearly
    orthonormal Q1, and the core is the float64 eigendecomposition of ``RᵀR``, R = R2 R1.
    U = Q1 R2⁻¹ Ur is orthonormal to ~eps32 + eps64 · (S₁/S_k)² whatever G's rounding, and
    every m-side product stays in float32 (float64 GEMMs on [B, 512, l] are 3-10x slower).
    ``ok``: both Choleskys succeeded, the second pass saw a nearly orthonormal Q1, finite.
    """
    f64 = torch.float64
    eye = torch.eye(Z.shape[-1], dtype=f64)
    Y = None
    if A is None:
        Y = _mm(Mc, Z.to(gdtype), acc)
        A = (Y.mT @ Y).to(f64)
    finite = torch.isfinite(A.sum((-2, -1)))
    R1, info1 = torch.linalg.cholesky_ex(A, upper=True)
    R1inv = torch.linalg.solve_triangular(R1, eye, upper=True)
    Q1 = Y @ R1inv.to(acc) if Y is not None else _mm(Mc, (Z @ R1inv).to(gdtype), acc)
    R2, info2 = torch.linalg.cholesky_ex((Q1.mT @ Q1).to(f64), upper=True)
    ok = info1.eq(0) & info2.eq(0) & finite & ((R2.diagonal(dim1=-2, dim2=-1) - 1).abs().amax(-1) < 0.5)
    R = R2 @ R1
    s, Wr = _top_eigh(R.mT @ R, rank)
    Ck = torch.linalg.solve_triangular(R2, (R @ Wr).div_(s.clamp_min(1e-300).unsqueeze(-2)), upper=True)
    return Q1 @ Ck.to(acc), s, Z @ Wr, ok


def _rr_gram(
    Mc: torch.Tensor,
    G: torch.Tensor,
    Z: torch.Tensor,
    steep: torch.Tensor,
    rank: int,
    gdtype: torch.dtype,
    acc: torch.dtype,
    timer: _Timer | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """U [acc], s, V [acc], ok for tall Mc [B, m, n] with G = MᵀM and orthonormal Z [B, n, l] (float64).

    Elements with S₁/S_k <= :data:`_GRAM_RR_MAX_KAPPA`: the float64 eigendecomposition of
    ``A = Zᵀ G Z`` gives ``V = Z W``, S and ``U = M V S⁻¹`` (one product with M of k
    columns). The others: :func:`_rr_cholqr2` from the same A. ``steep`` [B] bool is the
    caller's estimate of which is which (from the final basis pass's Cholesky diagonal), so
    steep elements are not eigendecomposed twice; the computed S is checked too, and an
    element the estimate let through is recomputed by :func:`_rr_cholqr2`.
    """
    f64 = torch.float64
    Zc = Z.to(acc)
    A = Z.mT @ (G @ Zc).to(f64)  # Zᵀ G Z, l x l
    n_steep = int(steep.sum())
    B, m, n = Mc.shape
    if n_steep == B:
        U, s, V, ok = _rr_cholqr2(Mc, Z, A, rank, gdtype, acc)
        if timer:
            timer.mark("core")
        return U, s, V.to(acc), ok
    flat = None if n_steep == 0 else (~steep).nonzero().flatten()

    def pick(t: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
        return t if idx is None else t.index_select(0, idx)

    Af = pick(A, flat)
    s, Wk = _top_eigh(Af, rank)
    finite = torch.isfinite(Af.sum((-2, -1)))
    if timer:
        timer.mark("core")
    Vf = pick(Zc, flat) @ Wk.to(acc)  # both orthonormal: V is, to the working precision
    Uf = _mm(pick(Mc, flat), Vf.div(s.to(acc).clamp_min(torch.finfo(acc).tiny).unsqueeze(-2)).to(gdtype), acc)
    late = s[..., -1] * _GRAM_RR_MAX_KAPPA < s[..., 0]  # the estimate let it through
    if flat is None and not bool(late.any()):
        return Uf, s, Vf, finite
    U = Mc.new_empty(B, m, rank, dtype=acc)
    S = s.new_empty(B, rank)
    V = Zc.new_empty(B, n, rank)
    ok = finite.new_empty(B)
    flat = torch.arange(B) if flat is None else flat
    U[flat], S[flat], V[flat], ok[flat] = Uf, s, Vf, finite
    steep = steep.clone()
    steep[flat[late]] = True
    idx = steep.nonzero().flatten()
    Ut, st, Vt, okt = _rr_cholqr2(Mc.index_select(0, idx), Z.index_select(0, idx), A.index_select(0, idx),
                                  rank, gdtype, acc)  # fmt: skip
    U[idx], S[idx], V[idx], ok[idx] = Ut, st, Vt.to(acc), okt
    return U, S, V, ok


def _sketch_basis(
    gmul: Callable[[torch.Tensor], torch.Tensor],
    omega: torch.Tensor,
    n_iter: int,
    ctx: _Ctx,
    timer: _Timer | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The CPU fast path's sketch: ``Z = orth(G^(n_iter+1) Ω)`` [B, n, l] float64 and X = Z R's R.

    One CholeskyQR pass per power iteration (float64 Gram and Cholesky, product in G's
    dtype; shifted for ``orth="shifted_cholqr"``), then the final basis by :func:`_orth`
    (float64: one checked pass). Where one float64 pass is not enough (κ(X) beyond ~1e5:
    S_k/S₁ near G's resolution, e.g. a noise floor ~1e-3 of S₁ inside the rank), a second
    pass on the nearly orthonormal Z, checked against the identity (CholeskyQR2), instead
    of sending the element down the chain. Checks and Cholesky infos go to ``ctx``.
    """
    f64 = torch.float64
    shifted = ctx.orth == "shifted_cholqr"
    X = gmul(omega)
    for _ in range(n_iter):
        X = gmul(_chol_pass(X, ctx, shifted=shifted, check=None, gram_dtype=f64)[0])
    if timer:
        timer.mark("power")
    Z, R = _orth(X.to(f64), ctx, final=True)
    assert R is not None
    if not bool(ctx.checks[-1].all()):
        ctx.checks.pop()
        Z, R2 = _chol_pass(Z, ctx, shifted=False, check="identity")
        R = R2 @ R
    if timer:
        timer.mark("orth")
    return Z, R


def _steep_estimate(R: torch.Tensor, rank: int, kappa: float, margin: float) -> torch.Tensor:
    """[B] bool: S₁/S_k estimated above ``margin · kappa`` from the sketch's R (X = Z R).

    X is power-iterated, so R's diagonal grades like S²: S₁/S_k ≈ sqrt(d_max/d_k), within
    ~35% on the steep spectra of the tests (the l x l Cholesky of Zᵀ G Z did no better)."""
    d = R.diagonal(dim1=-2, dim2=-1)
    return d.amax(-1) > (margin * kappa) ** 2 * d[..., rank - 1]


def _pipeline_cpu_rr(
    M: torch.Tensor,
    omega: torch.Tensor,
    rank: int,
    n_iter: int,
    orth: str,
    gdtype: torch.dtype,
    acc: torch.dtype,
    timer: _Timer | None,
    check_finite: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Level 0 of the checked Gram pipeline on CPU: tall M [B, m, n] -> U, S, Vh, ok [B].

    Why: on CPU a [8, 512, 128] call is ~1 ms of Gram GEMM and, in the generic pipeline
    (:func:`_pipeline`), as much again in small batched ops: CholeskyQR2 of ``Y = M Z``
    costs two products with M, two Cholesky passes, triangular solves on m x l matrices
    and a separate core eigenproblem. Here the same sketch ``Z = orth(G^(n_iter+1) Ω)``
    (float64 CholeskyQR on the n x l side: one pass per power iteration, one checked final
    pass; shifted first passes for ``orth="shifted_cholqr"``) is followed by Rayleigh-Ritz
    on the small side: the float64 eigendecomposition of ``Zᵀ G Z`` (l x l) gives
    ``V = Z W``, ``S = sqrt(λ)`` and ``U = M V S⁻¹``, one product with M of k columns. The
    result ``U S Vh = M V Vᵀ`` is the projection of M onto the best rank-k subspace of
    span(Z) that G resolves, as the generic pipeline's is (tests compare them).

    Per-op cost matters at this size (2-core box, [8, 512, 128], rank 16: ~45 ops, a few
    microseconds each besides the GEMMs), so: ``X R⁻¹`` is a GEMM with the l x l inverse
    (LAPACK's batched triangular solve on [8, 128, 24] costs 3x the inverse plus that GEMM);
    the span passes form their Gram and Cholesky in float64 but multiply in the
    accumulation dtype (X itself carries that rounding already); which elements are steep
    (below) is estimated from the final pass's Cholesky diagonal, which costs nothing
    (``d_i ~ S_i²``: the basis is power-iterated).

    Orthogonality: ``VᵀV = I + O(eps64 · κ(X)²)`` (the final pass's check). ``UᵀU``
    carries G's float32 rounding amplified by ``(S₁/S_k)²``, so elements with
    ``S₁/S_k > _GRAM_RR_MAX_KAPPA`` finish as the generic pipeline does, by CholeskyQR2 of
    the real product ``Y = M Z`` (:func:`_rr_cholqr2`; :func:`_rr_gram` routes; that is also
    the whole path when G is applied implicitly). Checks as in the generic pipeline, per
    element: every Cholesky's ``info``, the final pass's condition estimate
    (:func:`_single_check`), finiteness, and ``S_k >= 1e-6 S₁`` (U orthonormal to ~1e-4 at
    worst); an element failing any of them is recomputed by the caller one level down.

    ``check_finite``: validate the input here instead of before the call: G's trace (a
    sum of squares) is finite exactly when M is, unless it overflows, and only then is M
    itself scanned (:func:`_validate`); that saves a pass over M.
    """
    ctx = _Ctx(orth, 1.0, acc, True)
    Mc = M if M.dtype == gdtype else M.to(gdtype)
    G, gmul = _gram_operator(Mc, omega.shape[-1], n_iter, gdtype, acc)
    if check_finite and G is None:
        _validate(M, rank)
    if check_finite and G is not None and not bool(torch.isfinite(G.diagonal(dim1=-2, dim2=-1).sum())):
        # raises on NaN/inf; a finite M whose Gram overflowed goes on (and fails its checks)
        _validate(M, rank)
    if timer:
        timer.mark("sketch")
    Z, R = _sketch_basis(gmul, omega, n_iter, ctx, timer)
    if G is None:
        U, s, V, ok = _rr_cholqr2(Mc, Z, None, rank, gdtype, acc)
        V = V.to(acc)
        if timer:
            timer.mark("core")
    else:
        steep = _steep_estimate(R, rank, _GRAM_RR_MAX_KAPPA, _STEEP_ESTIMATE_MARGIN)
        U, s, V, ok = _rr_gram(Mc, G, Z, steep, rank, gdtype, acc, timer)
    ctx.checks.append(ok)
    ctx.checks.append((s[..., -1] >= 1e-6 * s[..., 0]) & (s[..., 0] > 0))  # NaN fails too
    if timer:
        timer.mark("lift")
    return U.to(acc), s.to(acc), V.mT, ctx.ok()


# ------------------------------------------------- sync-free Rayleigh-Ritz pipeline

_FILLS: dict[tuple, torch.Tensor] = {}


def _fill_matrix(rows: int, cols: int, device: torch.device) -> torch.Tensor:
    """A fixed Gaussian ``[rows, cols]`` float64 matrix with unit columns (own seed, cached).

    It completes rank-deficient bases (zero or exactly low-rank blocks) without a data-
    dependent branch; a separate seed leaves the caller's generator stream untouched.
    """
    key = (rows, cols, str(device))
    fill = _FILLS.get(key)
    if fill is None:
        g = torch.Generator().manual_seed(0x5EC7)
        fill = torch.randn(rows, cols, generator=g, dtype=torch.float64)
        fill = (fill / torch.linalg.vector_norm(fill, dim=0)).to(device)
        if len(_FILLS) > 64:
            _FILLS.clear()
        _FILLS[key] = fill
    return fill


def _robust_orth(X: torch.Tensor, passes: int) -> torch.Tensor:
    """Float64 basis of span(X) ``[B, n, l]`` that cannot break down on finite input.

    A perturbation of 1e-12 of ``||X||_F`` (plus 1e-30: zero input) along fixed random unit directions makes X full
    rank (it only decides directions that float32 data cannot resolve anyway, ~1e-12 of
    the largest); the first pass is a shifted CholeskyQR (``XᵀX + sI`` is positive
    definite), the following ones plain CholeskyQR: three passes are the shifted
    CholeskyQR3 of Fukaya et al. 2020, orthonormal to float64 working precision.
    """
    f64 = torch.float64
    Xd = X.to(f64)
    n, width = Xd.shape[-2], Xd.shape[-1]
    scale = torch.linalg.matrix_norm(Xd).unsqueeze(-1).unsqueeze(-1)
    Xd = Xd + (1e-12 * scale + 1e-30) * _fill_matrix(n, width, Xd.device)
    for i in range(passes):
        Xd = _cholqr_pass(Xd, i == 0, f64)
    return Xd


def _cholqr_pass(
    X: torch.Tensor,
    shifted: bool,
    dtype: torch.dtype,
    solve: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """One CholeskyQR pass ``X R⁻¹`` with ``RᵀR = XᵀX (+ s I)`` formed and factored in ``dtype``
    (no host sync; ``info`` is not read: the callers say why it cannot fail).

    The shift ``s = 11 (n l + l (l + 1)) eps trace(XᵀX)`` (``eps`` of ``dtype``; the trace
    bounds ``||X||₂²``) is Fukaya et al.'s (2020) sufficient condition for the Cholesky of
    ``XᵀX + s I`` to succeed in that precision for any finite X, rank-deficient included.
    ``solve`` applies ``X R⁻¹`` (default :func:`_right_solve`; benchmarks pass variants)."""
    n, width = X.shape[-2], X.shape[-1]
    Xd = X if X.dtype == dtype else X.to(dtype)
    A = Xd.mT @ Xd
    if shifted:
        eps = torch.finfo(dtype).eps
        shift = 11.0 * (n * width + width * (width + 1)) * eps * A.diagonal(dim1=-2, dim2=-1).sum(-1)
        A.diagonal(dim1=-2, dim2=-1).add_(shift.unsqueeze(-1))
    R, _ = torch.linalg.cholesky_ex(A, upper=True)
    return (solve or _right_solve)(X, R)


_EYES: dict[tuple[int, torch.dtype, str], torch.Tensor] = {}


def _eye(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A cached identity (on CUDA, ``torch.eye`` is a kernel launch per call)."""
    key = (n, dtype, str(device))
    eye = _EYES.get(key)
    if eye is None:
        if len(_EYES) > 32:
            _EYES.clear()
        eye = _EYES[key] = torch.eye(n, dtype=dtype, device=device)
    return eye


def _right_solve(X: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """``X R⁻¹`` for upper-triangular ``R``, in X's dtype (batched, no host sync).

    CUDA: the small inverse (a triangular solve against I, in R's dtype) times a GEMM
    (cuBLAS' batched triangular solve against a tall X is slow); CPU: a triangular solve.
    The inverse may be rounded to X's dtype: span passes need only the span, and a final
    pass sees ``R`` close to the identity."""
    if X.is_cuda:
        rinv = torch.linalg.solve_triangular(R, _eye(R.shape[-1], R.dtype, R.device).expand_as(R), upper=True)
        return X @ rinv.to(X.dtype)
    return torch.linalg.solve_triangular(R.to(X.dtype), X, upper=True, left=False)


CORES: tuple[str, ...] = ("auto", "jacobi", "eigh")
_JACOBI_BROKEN: list[str] = []  # why the Triton kernel could not run here (then: torch.linalg.eigh)


def _eigh_desc(A: torch.Tensor, core: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenpairs of symmetric ``A [B, l, l]`` in descending order, on A's device.

    ``"jacobi"`` (the CUDA default): the batched Triton Jacobi kernel of
    :mod:`spectralcache.linalg.jacobi`, which never synchronizes; ``torch.linalg.eigh`` on
    CUDA solves the batch one matrix at a time (1.1 s for 2040 matrices of 40 x 40 in
    float64 on an H100) and reads its error codes on the host. ``"eigh"`` (the CPU
    default): LAPACK through ``torch.linalg.eigh``.
    """
    use_jacobi = core == "jacobi" or (core == "auto" and A.is_cuda and not _JACOBI_BROKEN)
    if use_jacobi:
        try:
            from spectralcache.linalg.jacobi import jacobi_eigh

            return jacobi_eigh(A)
        except Exception as err:  # no Triton, or it cannot compile here: cuSOLVER instead
            if core == "jacobi":
                raise
            _JACOBI_BROKEN.append(f"{type(err).__name__}: {str(err).splitlines()[0][:200]}")
    neg, W = torch.linalg.eigh(-A)
    return neg.neg(), W


def _pipeline_rr(
    M: torch.Tensor,
    omega: torch.Tensor,
    rank: int,
    n_iter: int,
    gdtype: torch.dtype,
    acc: torch.dtype,
    timer: _Timer | None,
    core: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tall M [B, m, n] -> U, S, Vh (acc dtype) and ok [B], with no host synchronization.

    Every step is a batched tensor op whose result is used whatever its value, so the
    whole pipeline can be queued (and CUDA-graph captured) without reading anything back:

    1. each block is scaled by its largest magnitude (the float32 Gram cannot overflow
       or underflow; zero blocks get scale 1), ``G = Mᵀ M``;
    2. ``X = G^(n_iter+1) Ω`` with a :func:`_robust_orth` pass between products, then an
       orthonormal ``Z`` (shifted CholeskyQR3 in float64: no breakdown on finite input);
    3. Rayleigh-Ritz on the real product ``Y = M Z``: eigendecomposition of ``YᵀY``
       (float64, ``l x l``), ``V = Z W``, ``S = sqrt(λ)``, ``U = Y W S⁻¹``;
    4. columns of U whose singular value is below 1e-7 of the largest (rank-deficient
       blocks) are replaced by fixed random directions, and one float64 CholeskyQR pass
       makes U orthonormal to working precision (its Gram is near the identity, so it
       cannot fail); those columns carry a zero-ish S, so the product is unchanged.

    ``ok`` is False exactly where the input (or an intermediate, e.g. an overflow) was not
    finite; those elements are returned as NaN, never as plausible numbers. The ``l x l``
    eigenproblem goes to :func:`_eigh_desc` (``core``): on CUDA the Triton Jacobi kernel,
    so nothing synchronizes; ``core="eigh"`` there would sync in torch's error check.
    """
    f64 = torch.float64
    B, m = M.shape[0], M.shape[1]
    Ma = M.to(acc)
    scale = torch.linalg.vector_norm(Ma, ord=float("inf"), dim=(-2, -1))
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    Mc = (Ma / scale.view(B, 1, 1)).to(gdtype)
    del Ma
    G = _gram(Mc, acc)
    X = G @ omega
    if timer:
        timer.mark("sketch")
    for _ in range(n_iter):
        X = G @ _robust_orth(X, 1).to(acc)
    if timer:
        timer.mark("power")
    Z = _robust_orth(X, 3)  # [B, n, l] float64, orthonormal
    if timer:
        timer.mark("orth")
    Yd = _mm(Mc, Z.to(gdtype), acc).to(f64)  # [B, m, l]
    A = Yd.mT @ Yd
    finite = torch.isfinite(A).flatten(1).all(-1)
    lam, W = _eigh_desc(torch.nan_to_num(A, nan=0.0, posinf=0.0, neginf=0.0), core)
    if timer:
        timer.mark("core")
    s = lam[..., :rank].clamp_min(0).sqrt()  # [B, k]
    Wk = W[..., :rank]
    good = s > 1e-7 * s[..., :1]
    inv = torch.where(good, 1.0 / torch.where(good, s, torch.ones_like(s)), torch.zeros_like(s))
    U0 = Yd @ (Wk * inv.unsqueeze(-2))
    U0 = torch.where(good.unsqueeze(-2), U0, _fill_matrix(m, rank, M.device))
    R, _ = torch.linalg.cholesky_ex(U0.mT @ U0, upper=True)
    U = _right_solve(U0, R).to(acc)
    Vh = (Z @ Wk).mT.to(acc)
    S = (s * scale.to(f64).unsqueeze(-1)).to(acc)
    ok = finite & torch.isfinite(S).all(-1)
    nan = U.new_full((), float("nan"))  # a fill kernel, not a host-to-device copy
    U = torch.where(ok.view(B, 1, 1), U, nan)
    S = torch.where(ok.view(B, 1), S, nan)
    Vh = torch.where(ok.view(B, 1, 1), Vh, nan)
    if timer:
        timer.mark("lift")
    return U, S, Vh, ok


def _core_svd(R: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.linalg.svd(R, full_matrices=False)


def _core_svd32(R: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.linalg.svd(R.float(), full_matrices=False)


def _core_eigh(R: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD of the small core via a float64 eigendecomposition of RᵀR.

    Why: batched LAPACK SVD of many 24x24 matrices costs ~60 us each on CPU, eigh about
    a third of that. Squaring the condition number in float64 still leaves the
    singular vectors accurate far beyond float32 for singular values above ~1e-6 of the
    largest; the pipeline sends elements whose rank-th singular value is smaller down
    the fallback chain (Householder level, which uses LAPACK SVD). On CUDA the
    eigenproblems go to the batched Jacobi kernel (:func:`_eigh_desc`), not copied to the host.
    """
    Rd = R.double()
    if Rd.is_cuda:
        lam, W = _eigh_desc(Rd.mT @ Rd)
        s = lam.clamp_min(0).sqrt()
    else:  # eigh of -RᵀR lists RᵀR's eigenpairs in descending order (no flips needed)
        neg, W = torch.linalg.eigh(Rd.mT @ -Rd)
        s = neg.neg_().clamp_min_(0).sqrt_()
    # zero singular values give garbage columns here; the caller's S check catches
    # them inside the kept rank, and columns beyond it are dropped
    Ur = (Rd @ W) / s.clamp_min(1e-300).unsqueeze(-2)
    return Ur, s, W.mT


def truncated_svd(M: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact rank-``rank`` SVD via ``torch.linalg.svd`` (reference for tests/benchmarks).

    Half inputs are decomposed in float32 and returned in their own dtype.
    """
    _validate(M, rank)
    x = M.to(_acc_dtype(M.dtype)) if M.dtype != torch.float64 else M
    U, S, Vh = torch.linalg.svd(x, full_matrices=False)
    U, S, Vh = U[..., :rank], S[..., :rank], Vh[..., :rank, :]
    if M.dtype in _HALF:
        return U.to(M.dtype), S.to(M.dtype), Vh.to(M.dtype)
    return U, S, Vh


def _draw_omega(
    n: int, width: int, acc: torch.dtype, device: torch.device, generator: torch.Generator | None
) -> torch.Tensor:
    if generator is not None and generator.device.type != device.type:
        # Draw on the generator's device so a CPU generator reproduces on any device.
        return torch.randn(n, width, generator=generator, dtype=acc, device=generator.device).to(device)
    return torch.randn(n, width, generator=generator, dtype=acc, device=device)


def _fallback_levels(orth: str) -> list[tuple[str, str, float]]:
    """(report name, orth kind, shift multiplier) for each level of the chain."""
    levels = [(orth, orth, 1.0)]
    if orth != "householder":
        levels.append(("shifted_cholqr*", "shifted_cholqr", _SHIFT_GROWTH))
        levels.append(("householder", "householder", 1.0))
    levels.append(("exact_svd", "exact_svd", 1.0))
    return levels


def _solve(
    Mt: torch.Tensor,
    rank: int,
    width: int,
    n_iter: int,
    orth: str,
    algorithm: str,
    gdtype: torch.dtype,
    omega: torch.Tensor,
    timer: _Timer | None,
    paths: dict[str, int],
    first: Callable[[torch.Tensor], tuple[torch.Tensor, ...]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the chain on tall Mt [B, m, n]; returns acc-dtype U, S, Vh."""
    acc = _acc_dtype(Mt.dtype)
    U = S = Vh = None
    todo: torch.Tensor | None = None  # indices still to solve (None = all)
    for level, (name, kind, shift_mult) in enumerate(_fallback_levels(orth)):
        sub = Mt if todo is None else Mt.index_select(0, todo)
        if kind == "exact_svd":
            u, s, vh = truncated_svd(sub.to(acc), rank)
            ok = torch.ones(sub.shape[0], dtype=torch.bool, device=sub.device)
        elif level == 0 and first is not None:
            u, s, vh, ok = first(sub)
        else:
            ctx = _Ctx(kind, shift_mult, acc, Mt.is_cuda)
            u, s, vh = _run_pipeline(
                sub, omega, rank, n_iter, algorithm, ctx, gdtype, None if level else timer
            )
            ok = ctx.ok()
        if todo is None:
            U, S, Vh = u, s, vh
        else:
            U[todo], S[todo], Vh[todo] = u, s, vh
        # The one host sync of a call: which elements need the next level.
        n_bad = int((~ok).sum()) if kind != "exact_svd" else 0
        n_sub = sub.shape[0]
        if n_sub - n_bad:
            paths[name] = paths.get(name, 0) + n_sub - n_bad
        if n_bad == 0:
            break
        bad = (~ok).nonzero().flatten()
        todo = bad if todo is None else todo[bad]
    assert U is not None and S is not None and Vh is not None
    if timer and todo is not None:
        timer.mark("fallback")
    return U, S, Vh


def _prepare(M: torch.Tensor) -> tuple[torch.Tensor, bool, tuple[int, ...]]:
    m, n = M.shape[-2], M.shape[-1]
    lead = tuple(M.shape[:-2])
    transposed = m < n
    Mt = M.mT if transposed else M
    Mt = Mt.reshape(-1, Mt.shape[-2], Mt.shape[-1])
    return Mt, transposed, lead


def _finish(
    U: torch.Tensor,
    S: torch.Tensor,
    Vh: torch.Tensor,
    transposed: bool,
    lead: tuple[int, ...],
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if transposed:
        U, Vh = Vh.mT, U.mT
    U = U.reshape(*lead, *U.shape[-2:])
    S = S.reshape(*lead, S.shape[-1])
    Vh = Vh.reshape(*lead, *Vh.shape[-2:])
    return U.to(dtype), S.to(dtype), Vh.to(dtype)


def _check_params(n_iter: int, oversample: int, orth: str, algorithm: str) -> None:
    if orth not in ORTH_METHODS:
        raise ValueError(f"orth must be one of {ORTH_METHODS}, got {orth!r}")
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    if isinstance(n_iter, bool) or not isinstance(n_iter, int) or n_iter < 0:
        raise ValueError(f"n_iter must be an int >= 0, got {n_iter!r}")
    if isinstance(oversample, bool) or not isinstance(oversample, int) or oversample < 0:
        raise ValueError(f"oversample must be an int >= 0, got {oversample!r}")


def randomized_svd(
    M: torch.Tensor,
    rank: int,
    *,
    n_iter: int = 2,
    oversample: int = 8,
    orth: str = "cholqr2",
    compute_dtype: torch.dtype | None = None,
    generator: torch.Generator | None = None,
    algorithm: str = "auto",
    return_info: bool = False,
    timing: bool = False,
    use_cuda_graph: bool = False,
    host_sync: bool | None = None,
    core: str = "auto",
) -> (
    tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    | tuple[torch.Tensor, torch.Tensor, torch.Tensor, RSVDInfo]
):
    """Rank-``rank`` SVD of ``M [..., m, n]``: ``U [..., m, rank]``, ``S [..., rank]``, ``Vh [..., rank, n]``.

    ``compute_dtype``: dtype of the GEMMs against ``M`` (default: the input's dtype on
    CUDA, float32 for half inputs on CPU). Gram matrices, Cholesky and the core SVD
    always run in float32 (float64 for float64 input); half inputs come back in their
    dtype. ``return_info`` appends an :class:`RSVDInfo`; ``timing`` fills its
    per-stage ``timings_ms`` (synchronizes; off by default). ``use_cuda_graph`` (CUDA
    only) runs a cached, graph-captured :class:`RandomizedSVD` plan for this shape; its
    test matrix is drawn once per plan.

    ``host_sync`` (default: False on CUDA for the Gram algorithm, True otherwise) chooses
    between two pipelines. True: the checked pipeline of ``orth`` above, which reads the
    finiteness of the input and the per-element failure flags on the host (a few
    synchronizations per call) and recomputes failed elements down the fallback chain.
    False: the sync-free Rayleigh-Ritz pipeline (:func:`_pipeline_rr`; ``orth`` does not
    apply, its float64 bases use shifted CholeskyQR3), which cannot break down on finite
    input, so nothing needs reading back: NaN/inf input gives NaN factors for that
    element, flagged in ``RSVDInfo.ok`` and read only when ``info.paths`` is asked for.
    Callers that must never see NaN validate before (the cache validates every block).
    ``core`` picks the sync-free pipeline's ``l x l`` eigensolver (:data:`CORES`; "auto":
    the Triton Jacobi kernel on CUDA, LAPACK on CPU).
    """
    _check_params(n_iter, oversample, orth, algorithm)
    if core not in CORES:
        raise ValueError(f"core must be one of {CORES}, got {core!r}")
    if host_sync is not None and not isinstance(host_sync, bool):
        raise ValueError(f"host_sync must be None, True or False, got {host_sync!r}")
    _validate(M, rank, check_finite=False)
    m, n = M.shape[-2], M.shape[-1]
    alg = _choose_algorithm(max(m, n), min(m, n), min(rank + oversample, m, n), n_iter, algorithm)
    sync = host_sync if host_sync is not None else not (M.is_cuda and alg == "gram" and not use_cuda_graph)
    if not sync and (alg != "gram" or use_cuda_graph):
        raise ValueError(
            "host_sync=False runs the Gram-based Rayleigh-Ritz pipeline eagerly: it needs "
            "algorithm='gram' or 'auto' (n <= 256) and use_cuda_graph=False"
        )
    # The CPU fast path validates from the Gram it forms anyway (saves a pass over M).
    cpu_rr = sync and not use_cuda_graph and _use_cpu_rr(M, alg, orth)
    if sync and not cpu_rr:
        _validate(M, rank)
    if use_cuda_graph:
        if not M.is_cuda:
            raise ValueError("use_cuda_graph=True needs a CUDA tensor")
        if timing:
            raise ValueError("timing=True cannot time stages inside a CUDA graph; use use_cuda_graph=False")
        plan = _cached_plan(M, rank, n_iter, oversample, orth, compute_dtype, generator, algorithm)
        U, S, Vh = plan(M, _validated=True)
        if return_info:
            return U, S, Vh, plan.last_info
        return U, S, Vh
    small = min(m, n)
    width = min(rank + oversample, small)
    acc = _acc_dtype(M.dtype)
    Mt, transposed, lead = _prepare(M)
    gdtype = _gemm_dtype(M, compute_dtype)
    timer = _Timer(M.device) if timing else None
    omega = _draw_omega(small, width, acc, M.device, generator)
    paths: dict[str, int] = {}
    if not sync and Mt.shape[0]:
        U, S, Vh, ok = _pipeline_rr(Mt, omega, rank, n_iter, gdtype, acc, timer, core)
        out = _finish(U, S, Vh, transposed, lead, M.dtype)
        _STATS["calls"] += 1
        _STATS[f"path:{RR_PATH}"] += Mt.shape[0]
        if return_info:
            timings = dict(timer.ms) if timer else None
            return (*out, RSVDInfo(alg, orth, Mt.shape[0], {}, timings, ok=ok))
        return out
    if Mt.shape[0] == 0:
        U = M.new_zeros(0, Mt.shape[-2], rank, dtype=acc)
        S = M.new_zeros(0, rank, dtype=acc)
        Vh = M.new_zeros(0, rank, Mt.shape[-1], dtype=acc)
    else:
        first = None
        if cpu_rr:

            def first(sub: torch.Tensor):
                return _pipeline_cpu_rr(sub, omega, rank, n_iter, orth, gdtype, acc, timer, True)

        U, S, Vh = _solve(Mt, rank, width, n_iter, orth, alg, gdtype, omega, timer, paths, first)
    out = _finish(U, S, Vh, transposed, lead, M.dtype)
    _STATS["calls"] += 1
    for k, v in paths.items():
        _STATS[f"path:{k}"] += v
    if return_info:
        info = RSVDInfo(alg, orth, Mt.shape[0], paths, dict(timer.ms) if timer else None)
        return (*out, info)
    return out


# -------------------------------------------------------------- CUDA-graph plans


class RandomizedSVD:
    """A reusable randomized-SVD plan for one input shape/dtype/device.

    Why: on a GPU the tiny per-block problems are launch-bound; capturing the whole
    pipeline in a CUDA graph replays ~50 kernels for the cost of one launch. The test
    matrix is drawn once when the plan is built (fixed across calls, like a seed).
    With ``use_cuda_graph=False`` (or on CPU) the plan runs the ordinary eager pipeline
    with that fixed test matrix, which is what the graph replays. Failed elements are
    recomputed eagerly down the same fallback chain as :func:`randomized_svd`.

    The core ``l x l`` SVD syncs inside ``torch.linalg.svd`` on CUDA; if it cannot be
    captured the plan captures the stages before and after it as two graphs and runs
    the core eagerly in between (``self.graph_mode`` says which: "full" or "split").
    """

    def __init__(
        self,
        shape: tuple[int, ...] | torch.Size,
        rank: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        n_iter: int = 2,
        oversample: int = 8,
        orth: str = "cholqr2",
        compute_dtype: torch.dtype | None = None,
        generator: torch.Generator | None = None,
        algorithm: str = "auto",
        use_cuda_graph: bool = False,
    ) -> None:
        _check_params(n_iter, oversample, orth, algorithm)
        self.device = torch.device(device)
        _validate(torch.empty(tuple(shape), dtype=dtype, device="meta"), rank, check_finite=False)
        if use_cuda_graph and self.device.type != "cuda":
            raise ValueError("use_cuda_graph=True needs a CUDA device")
        self.shape = tuple(shape)
        self.rank = rank
        self.dtype = dtype
        self.n_iter = n_iter
        self.orth = orth
        m, n = self.shape[-2], self.shape[-1]
        small = min(m, n)
        self.width = min(rank + oversample, small)
        self.acc = _acc_dtype(dtype)
        self.algorithm = _choose_algorithm(max(m, n), small, self.width, n_iter, algorithm)
        self.gdtype = _gemm_dtype(torch.empty(0, dtype=dtype, device=self.device), compute_dtype)
        self.omega = _draw_omega(small, self.width, self.acc, self.device, generator)
        self.use_cuda_graph = use_cuda_graph
        self.graph_mode: str | None = None
        self.last_info: RSVDInfo | None = None
        self._graphs: list[torch.cuda.CUDAGraph] = []
        self.capture_error: str | None = None

    # the level-0 attempt on tall [B, m, n]: eager, or replayed from graphs
    def _new_ctx(self, Mt: torch.Tensor) -> _Ctx:
        return _Ctx(self.orth, 1.0, self.acc, Mt.is_cuda)

    def _eager_first(self, Mt: torch.Tensor):
        if _use_cpu_rr(Mt, self.algorithm, self.orth):
            return _pipeline_cpu_rr(
                Mt, self.omega, self.rank, self.n_iter, self.orth, self.gdtype, self.acc, None
            )
        ctx = self._new_ctx(Mt)
        U, S, Vh = _run_pipeline(
            Mt, self.omega, self.rank, self.n_iter, self.algorithm, ctx, self.gdtype, None
        )
        return U, S, Vh, ctx.ok()

    def _capture(self, Mt: torch.Tensor) -> None:
        self._static_in = Mt.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up: cuBLAS/cuSOLVER handles and workspaces
                self._eager_first(self._static_in)
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        try:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                self._static_out = self._eager_first(self._static_in)
            self._graphs = [g]
            self.graph_mode = "full"
            return
        except RuntimeError as err:  # the core SVD syncs: capture around it
            self.capture_error = str(err).splitlines()[0][:200]
            torch.cuda.synchronize()
        try:
            ctx = self._new_ctx(self._static_in)
            gen = _pipeline(
                self._static_in, self.omega, self.rank, self.n_iter, self.algorithm, ctx, self.gdtype, None
            )
            g1 = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g1):
                self._R = next(gen)
            self._core = ctx.pick_core(self._R)
            self._core_out = tuple(t.clone() for t in self._core(self._R))
            g2 = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g2, pool=g1.pool()):
                U, S, Vh = _finish_gen(gen, self._core_out)
                self._static_out = (U, S, Vh, ctx.ok())
            self._graphs = [g1, g2]
            self.graph_mode = "split"
        except RuntimeError as err:
            torch.cuda.synchronize()
            self.capture_error = str(err).splitlines()[0][:200]
            self.graph_mode = "eager"
            self.use_cuda_graph = False

    def _graph_first(self, Mt: torch.Tensor):
        if self.graph_mode is None:
            self._capture(Mt)
        if not self.use_cuda_graph:
            return self._eager_first(Mt)
        self._static_in.copy_(Mt)
        self._graphs[0].replay()
        if self.graph_mode == "split":
            for dst, src in zip(self._core_out, self._core(self._R)):
                dst.copy_(src)
            self._graphs[1].replay()
        return self._static_out

    def __call__(
        self, M: torch.Tensor, *, _validated: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if tuple(M.shape) != self.shape or M.dtype != self.dtype or M.device.type != self.device.type:
            raise ValueError(
                f"plan built for {self.shape} {self.dtype} on {self.device}, "
                f"got {tuple(M.shape)} {M.dtype} on {M.device}"
            )
        if not _validated:
            _validate(M, self.rank)
        Mt, transposed, lead = _prepare(M)
        first = self._graph_first if self.use_cuda_graph else self._eager_first
        paths: dict[str, int] = {}
        U, S, Vh = _solve(
            Mt,
            self.rank,
            self.width,
            self.n_iter,
            self.orth,
            self.algorithm,
            self.gdtype,
            self.omega,
            None,
            paths,
            first,
        )
        if self.use_cuda_graph:  # outputs alias the graph's static buffers
            U, S, Vh = U.clone(), S.clone(), Vh.clone()
        _STATS["calls"] += 1
        for k, v in paths.items():
            _STATS[f"path:{k}"] += v
        self.last_info = RSVDInfo(self.algorithm, self.orth, Mt.shape[0], paths, None)
        return _finish(U, S, Vh, transposed, lead, M.dtype)


_PLANS: OrderedDict[tuple, RandomizedSVD] = OrderedDict()


def _cached_plan(
    M: torch.Tensor,
    rank: int,
    n_iter: int,
    oversample: int,
    orth: str,
    compute_dtype: torch.dtype | None,
    generator: torch.Generator | None,
    algorithm: str,
) -> RandomizedSVD:
    key = (tuple(M.shape), M.dtype, str(M.device), rank, n_iter, oversample, orth, compute_dtype, algorithm)
    plan = _PLANS.get(key)
    if plan is None:
        plan = RandomizedSVD(
            M.shape,
            rank,
            dtype=M.dtype,
            device=M.device,
            n_iter=n_iter,
            oversample=oversample,
            orth=orth,
            compute_dtype=compute_dtype,
            generator=generator,
            algorithm=algorithm,
            use_cuda_graph=True,
        )
        _PLANS[key] = plan
        while len(_PLANS) > 8:
            _PLANS.popitem(last=False)
    else:
        _PLANS.move_to_end(key)
    return plan
