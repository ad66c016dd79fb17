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
(shared memory, or registers with the re-pairing done by gathers) is the next step. Since
then the cache's compression on CUDA no longer needs an eigensolver at all
(``SpectralConfig.svd_solver="auto"`` -> :mod:`spectralcache.linalg.subspace`); this kernel
serves ``randomized_svd(..., host_sync=False)`` and ``svd_solver="rsvd"``.

On CPU the same kernel runs through Triton's interpreter (tests); production CPU code uses
LAPACK (``torch.linalg.eigh``).
"""

from __future__ import annotations

import torch

__all__ = ["DEFAULT_PROGRAMS_PER_SM", "jacobi_eigh", "round_robin_pairs"]

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


def _kernel():
    """The two kernels, imported on first use (``import triton`` is slow and optional on CPU)."""
    from spectralcache.linalg import _jacobi_kernels as k

    return k.jacobi_kernel, k.jacobi_persistent_kernel


# Launch configuration used when ``programs_per_sm`` is not given (None: one program per matrix,
# measured; an int: the persistent grid, e.g. set by ``benchmarks/compress_layer.py``).
DEFAULT_PROGRAMS_PER_SM: int | None = None


def jacobi_eigh(
    A: torch.Tensor, *, max_sweeps: int = 12, tol: float | None = None, programs_per_sm: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenpairs of symmetric ``A [B, n, n]`` (float32/float64), eigenvalues in descending order.

    Returns ``(w [B, n], V [B, n, n])`` with ``A ≈ V diag(w) Vᵀ``. Only the upper and lower
    triangles' average is used implicitly (A is assumed symmetric). ``tol`` bounds the
    relative off-diagonal Frobenius mass at which a matrix stops (default: 100 eps of the
    dtype). No host synchronization; the input is not modified. ``programs_per_sm`` (CUDA):
    launch that many programs per SM, each looping over matrices, instead of one program per
    matrix (0; the configuration measured on the H100, see the module docstring); None takes
    :data:`DEFAULT_PROGRAMS_PER_SM`.
    """
    if A.ndim != 3 or A.shape[-1] != A.shape[-2]:
        raise ValueError(f"jacobi_eigh needs [B, n, n], got shape {tuple(A.shape)}")
    if A.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"jacobi_eigh needs float32 or float64, got {A.dtype}")
    B, n0, _ = A.shape
    work = A.contiguous().clone()
    n = n0
    if A.is_cuda and 1 < n0 < _MIN_COMPILED_N:
        # Tiles smaller than the warps' layout hold each element in several threads, whose
        # load and store of the same entry are not ordered within a phase; padding keeps every
        # compiled launch at tile shapes as large as those validated on an H100 (n = 40, 72).
        # The pad is a decoupled diagonal below every eigenvalue of A: it sorts last, dropped.
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
        one, persistent = _kernel()
        programs_per_sm = DEFAULT_PROGRAMS_PER_SM if programs_per_sm is None else programs_per_sm
        consts = {"MAX_SWEEPS": max_sweeps, "HP": hp, "KC": 32, "RB": 16, "num_warps": 4}
        if programs_per_sm and A.is_cuda:
            sms = torch.cuda.get_device_properties(A.device).multi_processor_count
            grid = (min(B, programs_per_sm * sms),)
            persistent[grid](work, V, P, Q, n, P.shape[0], half, float(tol) ** 2, B, **consts)
        elif programs_per_sm:  # interpreter (CPU): a small grid exercises the loop
            persistent[(min(B, 2),)](work, V, P, Q, n, P.shape[0], half, float(tol) ** 2, B, **consts)
        else:
            one[(B,)](work, V, P, Q, n, P.shape[0], half, float(tol) ** 2, **consts)
    w = work.diagonal(dim1=-2, dim2=-1)
    w, order = torch.sort(w, dim=-1, descending=True)
    V = torch.gather(V, 2, order.unsqueeze(-2).expand(B, n, n))
    return w[:, :n0], V[:, :n0, :n0]
