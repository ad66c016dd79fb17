"""Batched symmetric eigendecomposition by cyclic Jacobi rotations, one Triton program per matrix.

Why this exists: the randomized SVD's Rayleigh-Ritz step needs the eigenpairs of thousands of
small ``l x l`` matrices (``l = rank + oversample``, 40 and 72 for the default preset) at
once. ``torch.linalg.eigh`` on CUDA solves batches of such matrices one by one (measured on an
H100, torch 2.11: 1.1 s for 2040 matrices of 40 x 40 in float64) and checks its error codes on
the host (a synchronization). This kernel never synchronizes: it is queued like any other
kernel and is CUDA-graph capturable.

Method: the parallel ("round-robin") ordering of the cyclic Jacobi method. A sweep is
``L - 1`` rounds (``L`` = l rounded up to even); round ``r`` pairs every index with another
(``L/2`` disjoint pairs, a perfect matching; over a sweep every pair meets once), and the
``L/2`` rotations of a round commute, so they are applied together: rows of all pairs, a
barrier, then columns of A and of V. Each rotation is the classical symmetric Schur 2x2
(Golub & Van Loan, Alg. 8.4.1), which zeroes ``a_pq``. A program's matrix and its
eigenvector accumulator live in global scratch that stays in the SM's L1/L2; sweeps stop
when the off-diagonal mass is below ``tol`` of the total (checked on the device), at most
``max_sweeps``. Jacobi converges quadratically; float64 needs 5-8 sweeps for ``l <= 80``.

Measured on an H100 (``benchmarks/compress_layer.py``, float64, 2040 matrices, the 128K-token
layer of Llama-3.1-8B shape): 38 ms for 40 x 40 and 280 ms for 72 x 72, against 1059 ms and
1986 ms for ``torch.linalg.eigh``; relative residual ~3e-14; no host synchronization. That is
still the bulk of a layer's compression (271 ms): the kernel streams each matrix through
L2/HBM once per round (about 1.5 TB/s effective for 72 x 72), because a program's 80 KB of
scratch does not stay in L1 when all 2040 programs are resident. Keeping A and V on chip
(shared memory, or registers with the re-pairing done by gathers) is the next step.

On CPU the same kernel runs through Triton's interpreter (tests); production CPU code uses
LAPACK (``torch.linalg.eigh``).
"""

from __future__ import annotations

import torch

__all__ = ["jacobi_eigh", "round_robin_pairs"]

_TABLES: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
_MIN_COMPILED_N = 40


def round_robin_pairs(n: int) -> list[list[tuple[int, int]]]:
    """The rounds of one sweep over ``n`` indices: each a list of disjoint ``(p, q)``, ``p < q``.

    Circle method on ``L = n + n % 2`` players (index ``n`` is a dummy when n is odd; its pairs
    are left out). Every pair of ``0..n-1`` appears in exactly one round.
    """
    size = n + n % 2
    players = list(range(size))
    rounds = []
    for _ in range(size - 1):
        pairs = []
        for i in range(size // 2):
            a, b = players[i], players[size - 1 - i]
            if max(a, b) < n:
                pairs.append((min(a, b), max(a, b)))
        rounds.append(pairs)
        players = [players[0], players[-1], *players[1:-1]]
    return rounds


def _tables(n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``P, Q [rounds, L/2]`` int32 on ``device``; -1 marks a dummy slot."""
    key = (n, str(device))
    if key not in _TABLES:
        half = (n + n % 2) // 2
        rounds = round_robin_pairs(n)
        P = torch.full((len(rounds), half), -1, dtype=torch.int32)
        Q = torch.full((len(rounds), half), -1, dtype=torch.int32)
        for r, pairs in enumerate(rounds):
            for i, (p, q) in enumerate(pairs):
                P[r, i], Q[r, i] = p, q
        _TABLES[key] = (P.to(device), Q.to(device))
    return _TABLES[key]


_KERNEL = None


def _kernel():
    """Build the Triton kernel on first use (``import triton`` is slow and optional on CPU)."""
    global _KERNEL
    if _KERNEL is not None:
        return _KERNEL
    import os

    import triton
    import triton.language as tl

    if os.environ.get("TRITON_INTERPRET") == "1":  # CPU tests: numpy >= 2.4 needs the project's shim
        from spectralcache.attention.triton import _interpreter_compat

        _interpreter_compat.apply()

    @triton.jit
    def _jacobi_kernel(
        A_ptr,
        V_ptr,
        P_ptr,
        Q_ptr,
        n,
        rounds,
        half,
        tol2,
        MAX_SWEEPS: tl.constexpr,
        HP: tl.constexpr,
        KC: tl.constexpr,
        RB: tl.constexpr,
    ):
        b = tl.program_id(0).to(tl.int64)
        A = A_ptr + b * n * n
        V = V_ptr + b * n * n
        i = tl.arange(0, HP)
        kk = tl.arange(0, KC)
        rr = tl.arange(0, RB)
        # relative off-diagonal mass (squared), computed on the device; > tol2: not converged
        off = tol2 * 0.0 + 1.0  # a float32 scalar > tol2 (tol2 < 1 always)
        for _sweep in range(MAX_SWEEPS):
            if off > tol2:
                for r in range(rounds):
                    pm = i < half
                    p = tl.load(P_ptr + r * half + i, mask=pm, other=-1)
                    q = tl.load(Q_ptr + r * half + i, mask=pm, other=-1)
                    pm = p >= 0
                    app = tl.load(A + p * n + p, mask=pm, other=0.0)
                    aqq = tl.load(A + q * n + q, mask=pm, other=0.0)
                    apq = tl.load(A + p * n + q, mask=pm, other=0.0)
                    nz = apq != 0.0
                    tau = (aqq - app) / (2.0 * tl.where(nz, apq, 1.0))
                    sgn = tl.where(tau >= 0.0, 1.0, -1.0)
                    t = tl.where(nz, sgn / (tl.abs(tau) + tl.sqrt(1.0 + tau * tau)), 0.0)
                    c = 1.0 / tl.sqrt(1.0 + t * t)
                    s = t * c
                    c2 = c[:, None]
                    s2 = s[:, None]
                    tl.debug_barrier()  # every pair read its 2x2 before any row moves
                    for k0 in range(0, n, KC):
                        k = k0 + kk
                        m2 = pm[:, None] & (k < n)[None, :]
                        offp = p[:, None] * n + k[None, :]
                        offq = q[:, None] * n + k[None, :]
                        ap = tl.load(A + offp, mask=m2, other=0.0)
                        aq = tl.load(A + offq, mask=m2, other=0.0)
                        tl.store(A + offp, c2 * ap - s2 * aq, mask=m2)
                        tl.store(A + offq, s2 * ap + c2 * aq, mask=m2)
                    tl.debug_barrier()
                    cr = c[None, :]
                    sr = s[None, :]
                    for k0 in range(0, n, KC):
                        k = k0 + kk
                        m3 = (k < n)[:, None] & pm[None, :]
                        offp = k[:, None] * n + p[None, :]
                        offq = k[:, None] * n + q[None, :]
                        ap = tl.load(A + offp, mask=m3, other=0.0)
                        aq = tl.load(A + offq, mask=m3, other=0.0)
                        tl.store(A + offp, ap * cr - aq * sr, mask=m3)
                        tl.store(A + offq, ap * sr + aq * cr, mask=m3)
                        vp = tl.load(V + offp, mask=m3, other=0.0)
                        vq = tl.load(V + offq, mask=m3, other=0.0)
                        tl.store(V + offp, vp * cr - vq * sr, mask=m3)
                        tl.store(V + offq, vp * sr + vq * cr, mask=m3)
                    tl.debug_barrier()
                # off-diagonal and total mass summed separately (total - diagonal would cancel)
                tot = tl.zeros((RB, KC), dtype=tl.float64)
                odg = tl.zeros((RB, KC), dtype=tl.float64)
                for r0 in range(0, n, RB):
                    row = r0 + rr
                    for k0 in range(0, n, KC):
                        k = k0 + kk
                        m = (row < n)[:, None] & (k < n)[None, :]
                        a = tl.load(A + row[:, None] * n + k[None, :], mask=m, other=0.0).to(tl.float64)
                        a2 = a * a
                        tot += a2
                        odg += tl.where(row[:, None] != k[None, :], a2, 0.0)
                total = tl.sum(tl.sum(tot, axis=1), axis=0)
                offd = tl.sum(tl.sum(odg, axis=1), axis=0)
                off = (offd / tl.maximum(total, 1e-300)).to(tl.float32)

    _KERNEL = _jacobi_kernel
    return _KERNEL


def jacobi_eigh(
    A: torch.Tensor, *, max_sweeps: int = 12, tol: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenpairs of symmetric ``A [B, n, n]`` (float32/float64), eigenvalues in descending order.

    Returns ``(w [B, n], V [B, n, n])`` with ``A ≈ V diag(w) Vᵀ``. Only the upper and lower
    triangles' average is used implicitly (A is assumed symmetric). ``tol`` bounds the
    relative off-diagonal Frobenius mass at which a matrix stops (default: 100 eps of the
    dtype). No host synchronization; the input is not modified.
    """
    if A.ndim != 3 or A.shape[-1] != A.shape[-2]:
        raise ValueError(f"jacobi_eigh needs [B, n, n], got shape {tuple(A.shape)}")
    if A.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"jacobi_eigh needs float32 or float64, got {A.dtype}")
    B, n0, _ = A.shape
    work = A.contiguous().clone()
    n = n0
    if A.is_cuda and 1 < n0 < _MIN_COMPILED_N:
        # Tiles smaller than a warp group's layout would hold each element in several
        # threads, whose load/store of the same entry could interleave; padding keeps every
        # compiled launch at the tile shapes validated on an H100 (n = 40 and 72). The pad is
        # a decoupled diagonal below every eigenvalue of A, so it sorts last and is dropped.
        n = _MIN_COMPILED_N
        low = -(torch.linalg.matrix_norm(work) + 1.0)  # < every eigenvalue of A
        pad = torch.zeros(B, n, n, dtype=A.dtype, device=A.device)
        pad[:, :n0, :n0] = work
        pad.diagonal(dim1=-2, dim2=-1)[:, n0:] = low.unsqueeze(-1)
        work = pad
    V = torch.eye(n, dtype=A.dtype, device=A.device).expand(B, n, n).contiguous()
    if B and n > 1:
        P, Q = _tables(n, A.device)
        half = P.shape[1]
        hp = max(2, 1 << (half - 1).bit_length())
        eps = torch.finfo(A.dtype).eps
        tol = 100 * eps if tol is None else tol
        _kernel()[(B,)](
            work, V, P, Q, n, P.shape[0], half, float(tol) ** 2,
            MAX_SWEEPS=max_sweeps, HP=hp, KC=32, RB=16, num_warps=4,
        )  # fmt: skip
    w = work.diagonal(dim1=-2, dim2=-1)
    w, order = torch.sort(w, dim=-1, descending=True)
    V = torch.gather(V, 2, order.unsqueeze(-2).expand(B, n, n))
    return w[:, :n0], V[:, :n0, :n0]
