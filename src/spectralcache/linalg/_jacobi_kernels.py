"""Triton kernels of :mod:`spectralcache.linalg.jacobi` (imported on first use: Triton is optional on CPU).

See that module for the method. Kernels live at module level because Triton resolves the
functions a kernel calls through the module's globals.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

if os.environ.get("TRITON_INTERPRET") == "1":  # CPU tests: numpy >= 2.4 needs the project's shim
    from spectralcache.attention.triton import _interpreter_compat

    _interpreter_compat.apply()

__all__ = ["jacobi_kernel", "jacobi_persistent_kernel"]


@triton.jit
def _jacobi_one(
    A,
    V,
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
    """Diagonalize the matrix at ``A`` in place, accumulating rotations into ``V``."""
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
    """One program per matrix (the configuration measured on the H100)."""
    b = tl.program_id(0).to(tl.int64)
    _jacobi_one(
        A_ptr + b * n * n, V_ptr + b * n * n, P_ptr, Q_ptr, n, rounds, half, tol2, MAX_SWEEPS, HP, KC, RB
    )


@triton.jit
def _jacobi_persistent_kernel(
    A_ptr,
    V_ptr,
    P_ptr,
    Q_ptr,
    n,
    rounds,
    half,
    tol2,
    n_mat,
    MAX_SWEEPS: tl.constexpr,
    HP: tl.constexpr,
    KC: tl.constexpr,
    RB: tl.constexpr,
):
    """A fixed number of programs, each looping over matrices ``pid, pid + grid, ...``: fewer
    resident programs, so each one's scratch can stay in its SM's L1 (not yet measured)."""
    pid = tl.program_id(0).to(tl.int64)  # int64 loop variable: offsets b * n * n cannot overflow
    nprog = tl.num_programs(0)
    for b in range(pid, n_mat, nprog):
        _jacobi_one(
            A_ptr + b * n * n, V_ptr + b * n * n, P_ptr, Q_ptr, n, rounds, half, tol2, MAX_SWEEPS, HP, KC, RB
        )


jacobi_kernel = _jacobi_kernel
jacobi_persistent_kernel = _jacobi_persistent_kernel
